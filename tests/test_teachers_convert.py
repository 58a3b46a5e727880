"""guided-diffusion (ADM) checkpoint -> diffusers teacher folder (`dtfast.convert_adm`), against an independent
float64 implementation of guided-diffusion's UNet (tests/guided_diffusion_ref.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402

from dtfast.convert_adm import main as convert_main  # noqa: E402
from dtfast.teachers import build_teacher  # noqa: E402
from dtfast.teachers.archs import PIXEL_ARCHS  # noqa: E402
from dtfast.teachers.convert import ConversionError, convert_state_dict, read_layout  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guided_diffusion_ref import UNetModel  # noqa: E402

# A small ADM: six levels (strides 1..32) like ADM-256, 32/64 channels, attention at ds 8, 16, 32 with 16-channel
# heads (2-4 heads, so a wrong qkv head order changes the output).
SMALL = dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2, attention_resolutions=(8, 16, 32),
             channel_mult=(1, 1, 2, 2, 2, 2), num_head_channels=16)


def small_adm(seed: int = 0, **overrides) -> UNetModel:
    """The reference UNet in float64 with every parameter random (ADM zero-initialises its output convolutions,
    which would hide a wrong attention or residual mapping)."""
    torch.manual_seed(seed)
    model = UNetModel(**{**SMALL, **overrides}).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".norm." in name or "layers.0." in name or name.startswith("out.0"):
                param.copy_(0.2 * torch.randn_like(param) + (1.0 if name.endswith("weight") else 0.0))
            else:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
    return model


def converted_unet(reference: UNetModel, **kwargs) -> UNet2DModel:
    config, state = convert_state_dict(reference.state_dict(), num_head_channels=16, image_size=64, **kwargs)
    unet = UNet2DModel(**config).double().eval()
    unet.load_state_dict(state, strict=True)
    return unet


def outputs(reference: UNetModel, unet: UNet2DModel, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64)
    t = torch.tensor([150, 999])
    with torch.no_grad():
        return reference(x, t), unet(x, t).sample


@pytest.mark.parametrize("scale_shift,new_order", [(True, False), (False, False), (True, True)],
                         ids=["adm-legacy-qkv", "no-scale-shift", "new-qkv-order"])
def test_converted_unet_matches_guided_diffusion(scale_shift, new_order):
    reference = small_adm(use_scale_shift_norm=scale_shift, use_new_attention_order=new_order)
    unet = converted_unet(reference, attention_order="new" if new_order else "legacy")
    expected, got = outputs(reference, unet)
    assert got.shape == expected.shape == (2, 6, 64, 64)
    assert expected.abs().mean() > 0.1  # the output depends on every block (nothing zero-initialised)
    # float64 throughout except the timestep embedding, which both compute in float32 (in different op orders)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_teacher_features_are_adms_decoder_levels(tmp_path):
    # the features dtfast distils (walk_unet on the converted UNet, early exit) are guided-diffusion's decoder levels
    # before their upsamplers, at strides 4, 8, 16, 32 (DESIGN.md section 1)
    from dtfast.teachers.unet_walk import feature_blocks, walk_unet

    reference = small_adm(seed=5)
    unet = converted_unet(reference)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = torch.tensor([150])
    strides = (4, 8, 16, 32)
    with torch.no_grad():
        _, levels = reference(x, t.expand(2), features=True)
        features, output = walk_unet(unet, x, t, feature_blocks(unet, strides), early_exit=True)
    assert output is None  # stopped after the stride-4 level
    by_stride = {64 // level.shape[-1]: level for level in levels}
    for stride, feature in zip(strides, features):
        assert feature.shape == by_stride[stride].shape
        torch.testing.assert_close(feature, by_stride[stride], rtol=1e-6, atol=1e-6)


def test_wrong_qkv_order_is_visible():
    # the same weights read with the other head layout give a different network: the test above can fail
    reference = small_adm()
    unet = converted_unet(reference, attention_order="new")
    expected, got = outputs(reference, unet)
    assert (got - expected).abs().max() > 1e-3


def test_adm256_layout_is_dtfasts_adm256_arch():
    # the released 256x256_diffusion_uncond.pt flags (guided-diffusion README), on the meta device: no memory
    with torch.device("meta"):
        reference = UNetModel()
    state = reference.state_dict()
    layout = read_layout(state)
    assert layout.block_out_channels == (256, 256, 512, 512, 1024, 1024)
    assert layout.attention == (False, False, False, True, True, True) and layout.scale_shift
    config, converted = convert_state_dict(state)
    arch = PIXEL_ARCHS["adm256"]
    assert {k: config[k] for k in arch} == arch
    with torch.device("meta"):
        unet = UNet2DModel(**arch)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(v.numel() for v in converted.values()) == sum(p.numel() for p in reference.parameters())


def test_cli_writes_a_teacher_folder_that_loads(tmp_path):
    reference = small_adm(seed=3)
    checkpoint = tmp_path / "adm_small.pt"
    torch.save(reference.state_dict(), checkpoint)
    out = tmp_path / "adm-diffusers"
    args = [str(checkpoint), str(out), "--num-head-channels", "16", "--image-size", "64"]
    assert convert_main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dtfast_teacher.json", "scheduler", "unet"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not the 0700 of the temporary folder it was built in
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~umask  # safetensors itself writes 0600
    info = json.loads((out / "dtfast_teacher.json").read_text())
    assert info["file"] == "adm_small.pt" and info["bytes"] == checkpoint.stat().st_size and len(info["sha256"]) == 64
    # the same loading path a user's folder takes
    teacher = build_teacher(pretrained=str(out), timestep=150, strides=(4, 8, 16, 32), early_exit=False)
    assert not teacher.is_random
    assert teacher.feature_shapes(64, 64) == [(64, 16, 16), (64, 8, 8), (64, 4, 4), (64, 2, 2)]
    unet = teacher.unet.double()
    expected, got = outputs(reference, unet, seed=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # stored as float32
    # guided-diffusion's linear schedule
    betas = teacher.scheduler.betas.double()
    torch.testing.assert_close(betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rtol=1e-6, atol=0)
    # an existing folder is not replaced without --overwrite
    assert convert_main(args) == 2
    assert convert_main([*args, "--overwrite"]) == 0


def test_cosine_schedule_and_step_count(tmp_path):
    checkpoint = tmp_path / "adm.pt"
    torch.save(small_adm().state_dict(), checkpoint)
    out = tmp_path / "out"
    assert convert_main([str(checkpoint), str(out), "--num-head-channels", "16", "--image-size", "64",
                         "--noise-schedule", "cosine", "--diffusion-steps", "4000"]) == 0
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["num_train_timesteps"] == 4000 and config["beta_schedule"] == "squaredcos_cap_v2"


def _state(**overrides):
    return small_adm(**overrides).state_dict()


@pytest.mark.parametrize("edit,message", [
    (lambda s: {**s, "label_emb.weight": torch.zeros(10, 128)}, "class-conditional"),
    (lambda s: {k: v for k, v in s.items() if k != "output_blocks.3.0.in_layers.2.weight"},
     "output_blocks.3.0.in_layers.2.weight"),
    (lambda s: {**s, "extra.weight": torch.zeros(1)}, "extra.weight"),
    (lambda s: {"conv.weight": torch.zeros(1)}, "not a guided-diffusion UNetModel"),
], ids=["class-conditional", "missing-tensor", "unknown-tensor", "not-adm"])
def test_bad_checkpoints_say_what_is_wrong(edit, message):
    with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
        convert_state_dict(edit(_state()), num_head_channels=16)


def test_head_width_must_divide_the_attention_widths():
    with pytest.raises(ConversionError, match="num_head_channels=24"):
        convert_state_dict(_state(), num_head_channels=24)


def test_cli_errors_name_the_file(tmp_path, capsys):
    assert convert_main([str(tmp_path / "nope.pt"), str(tmp_path / "out")]) == 2
    assert "nope.pt: no such checkpoint file" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert convert_main([str(junk), str(tmp_path / "out")]) == 2
    assert "junk.pt: not a readable PyTorch state dict" in capsys.readouterr().err
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    assert convert_main([str(listing), str(tmp_path / "out")]) == 2
    assert "list.pt: expected a state dict (name -> tensor), got a list" in capsys.readouterr().err
    mixed = tmp_path / "mixed.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "step": 5}, mixed)
    assert convert_main([str(mixed), str(tmp_path / "out")]) == 2
    assert "'step' is of type int, not a tensor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ddp_prefix_and_wrapped_state_dicts():
    state = _state()
    plain, _ = convert_state_dict(state, num_head_channels=16)
    wrapped, _ = convert_state_dict({"state_dict": {f"module.{k}": v for k, v in state.items()}}, num_head_channels=16)
    assert plain == wrapped


def _reshaped(state, key, shape):
    return {**state, key: torch.zeros(shape, dtype=state[key].dtype)}


@pytest.mark.parametrize("key,shape", [("time_embed.2.weight", (128, 64)), ("output_blocks.4.0.in_layers.2.weight",
                                                                            (32, 96, 3, 3)),
                                       ("input_blocks.10.1.qkv.weight", (190, 64, 1)),
                                       ("input_blocks.10.1.proj_out.weight", (32, 64, 1))])
def test_tensors_of_the_wrong_shape_are_named_by_their_checkpoint_key(key, shape):
    # they ended in a traceback naming the diffusers key, or no key at all (the qkv/proj_out reshapes)
    state = _state()
    assert key in state and tuple(state[key].shape) != shape
    with pytest.raises(ConversionError, match=f"checkpoint tensor '{key}' has shape {tuple(shape)}".replace(
            "(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        convert_state_dict(_reshaped(state, key, shape), num_head_channels=16)


def test_a_wrapper_with_model_and_ema_gives_the_ema_weights():
    model, ema = _state(seed=0), _state(seed=1)
    _, from_ema = convert_state_dict(ema, num_head_channels=16)
    _, converted = convert_state_dict({"model": model, "ema": ema}, num_head_channels=16)
    assert all(torch.equal(converted[k], from_ema[k]) for k in from_ema)


def test_cli_refuses_bad_steps_and_sizes(tmp_path, capsys):
    path = tmp_path / "adm.pt"
    torch.save(_state(), path)
    assert convert_main([str(path), str(tmp_path / "a"), "--num-head-channels", "16", "--diffusion-steps", "0"]) == 2
    assert "diffusion_steps must be > 0" in capsys.readouterr().err
    assert convert_main([str(path), str(tmp_path / "b"), "--num-head-channels", "16", "--image-size", "30"]) == 2
    assert "positive multiple of 32" in capsys.readouterr().err


def test_an_ema_entry_without_weights_is_not_taken_for_them():
    model = _state(seed=0)
    _, plain = convert_state_dict(model, num_head_channels=16)
    _, converted = convert_state_dict({"model": model, "ema": {"decay": torch.tensor(0.999)}}, num_head_channels=16)
    assert all(torch.equal(converted[k], plain[k]) for k in plain)
