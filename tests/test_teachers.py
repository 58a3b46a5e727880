"""Pixel-space diffusion teacher: shapes, early exit (FLOPs), equality with the stock diffusers forward, loading."""

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("diffusers")

from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

from dtfast.teachers import DiffusionTeacher, build_teacher
from dtfast.teachers.archs import PIXEL_ARCHS
from dtfast.teachers.base import attention_processors
from dtfast.teachers.unet_walk import up_block_strides, walk_unet


def images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hook_features(unet, noisy, timestep, blocks):
    """Features at `blocks` from the STOCK UNet2DModel.forward, read by hooks on each block's last layer."""
    found = {}
    handles = []
    for index in blocks:
        block = unet.up_blocks[index]
        layer = block.attentions[-1] if hasattr(block, "attentions") else block.resnets[-1]
        handles.append(layer.register_forward_hook(lambda m, i, o, index=index: found.__setitem__(index, o)))
    try:
        unet(noisy, timestep)
    finally:
        for handle in handles:
            handle.remove()
    return [found[i] for i in blocks]


@pytest.fixture(scope="module")
def tiny():
    return build_teacher("tiny", seed=0)


def test_adm256_feature_shapes_on_meta():
    teacher = build_teacher("adm256", device="meta")
    assert teacher.strides == (4, 8, 16, 32)
    assert teacher.channels == (512, 512, 1024, 1024)
    expected = [(512, 64, 64), (512, 32, 32), (1024, 16, 16), (1024, 8, 8)]
    assert teacher.feature_shapes(256, 256) == expected
    features = teacher(torch.zeros(2, 3, 256, 256, device="meta"))
    assert [tuple(f.shape) for f in features] == [(2, *s) for s in expected]
    # ADM-256 has 553M parameters (guided-diffusion 256x256 unconditional)
    assert 540e6 < sum(p.numel() for p in teacher.parameters()) < 560e6


def test_adm256_early_exit_flops():
    flops = {}
    for early_exit in (True, False):
        teacher = build_teacher("adm256", device="meta", early_exit=early_exit)
        with FlopCounterMode(display=False) as counter:
            teacher(torch.zeros(1, 3, 256, 256, device="meta"))
        flops[early_exit] = counter.get_total_flops() / 1e12
    assert 2.0 < flops[False] < 2.4, flops  # full forward: ~2.2 TFLOP
    assert 0.85 < flops[True] < 1.0, flops  # stopped after the stride-4 level: ~0.9-1.0 TFLOP
    assert flops[False] / flops[True] >= 2.0


def test_tiny_features_cpu(tiny):
    x = images()
    features = tiny(x)
    assert [tuple(f.shape[1:]) for f in features] == tiny.feature_shapes(64, 64)
    assert [f.shape[1] for f in features] == list(tiny.channels) == [64, 64, 128, 128]
    for f in features:
        assert f.dtype == torch.float32 and torch.isfinite(f).all() and not f.requires_grad
    # usable as a constant target in an autograd graph (not an inference tensor)
    student = torch.zeros_like(features[0], requires_grad=True)
    ((student - features[0]) ** 2).mean().backward()
    assert student.grad is not None


def test_frozen_eval_and_sdpa(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.unet.training
    processors = attention_processors(tiny.unet)
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_determinism_and_fresh_noise(tiny):
    x = images()
    a = tiny(x, generator=torch.Generator().manual_seed(3))
    b = tiny(x, generator=torch.Generator().manual_seed(3))
    c = tiny(x, generator=torch.Generator().manual_seed(4))
    d, e = tiny(x), tiny(x)
    for fa, fb in zip(a, b):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    assert not torch.allclose(a[0], c[0])
    assert not torch.allclose(d[0], e[0])


@pytest.mark.parametrize("strides", [(4, 8, 16, 32), (32, 8), (2,)])
def test_features_equal_stock_forward_hooks(tiny, strides):
    teacher = build_teacher("tiny", strides=strides, seed=0)
    x = images(seed=1)
    features = teacher(x, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    noisy = teacher.scheduler.add_noise(x, noise, torch.tensor([teacher.timestep]))
    expected = hook_features(teacher.unet, noisy, teacher.timestep, teacher.blocks)
    assert teacher.strides == tuple(sorted(strides))
    for got, want, stride in zip(features, expected, teacher.strides):
        assert got.shape[-1] == 64 // stride
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


SKIP_CONFIG = {  # NCSN++-like: skip blocks, Fourier time embedding, the other branches of the walk
    "sample_size": 32,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
    "up_block_types": ("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    "time_embedding_type": "fourier",
    "attention_head_dim": 16,
    "norm_num_groups": 16,
}


@pytest.mark.parametrize("config", [PIXEL_ARCHS["tiny"], SKIP_CONFIG], ids=["tiny", "skip-fourier"])
def test_walk_without_early_exit_equals_unet_forward(config):
    torch.manual_seed(0)
    unet = UNet2DModel(**config).eval()
    x = torch.randn(2, 3, 64, 64)
    timestep = torch.tensor([150.0 if config is SKIP_CONFIG else 150])
    with torch.no_grad():
        _, out = walk_unet(unet, x, timestep, [0], early_exit=False)
        expected = unet(x, timestep).sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    levels = len(config["block_out_channels"])
    assert up_block_strides(unet) == [2 ** (levels - 1 - i) for i in range(levels)]


def test_save_and_load_round_trip(tmp_path, tiny, caplog):
    tiny.save_pretrained(tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="dtfast.teachers"):
        loaded = build_teacher(pretrained=tmp_path / "model")
    assert "RANDOM" not in caplog.text and not loaded.is_random
    assert isinstance(loaded, DiffusionTeacher) and loaded.channels == tiny.channels
    x = images()
    for a, b in zip(tiny(x, torch.Generator().manual_seed(1)), loaded(x, torch.Generator().manual_seed(1))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_unet_at_root_with_own_scheduler(tmp_path, tiny):
    tiny.unet.save_pretrained(tmp_path)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-3, beta_end=0.03).save_pretrained(
        tmp_path
    )
    loaded = build_teacher(pretrained=str(tmp_path), timestep=50, strides=(8,))
    assert loaded.scheduler.config.beta_start == pytest.approx(1e-3)
    assert loaded.noise_scale[0] == pytest.approx(float(loaded.scheduler.alphas_cumprod[50].sqrt()))
    assert [tuple(f.shape) for f in loaded(images(1))] == [(1, 64, 8, 8)]


def test_random_teacher_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="dtfast.teachers"):
        teacher = build_teacher("tiny", strides=(32,))
    assert teacher.is_random and "RANDOM weights" in caplog.text and "teaches nothing" in caplog.text


def test_bad_arguments(tmp_path, tiny):
    with pytest.raises(ValueError, match="cannot give features at stride"):
        build_teacher("tiny", strides=(64,))
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="arch"):
        build_teacher()
    with pytest.raises(ValueError, match="unknown teacher arch"):
        build_teacher("adm1024")
    with pytest.raises(TypeError, match="unknown option"):
        build_teacher("tiny", compile_everything=True)
    with pytest.raises(ValueError, match="timestep"):
        build_teacher("tiny", timestep=1000)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_teacher(pretrained=str(tmp_path / "missing" / "model"))
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="no diffusers teacher found"):
        build_teacher(pretrained=tmp_path)
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="could not load a UNet2DModel"):
        tiny.unet.save_config(tmp_path / "unet")  # config without weights
        build_teacher(pretrained=tmp_path)


def test_partial_weights_other_schedulers_and_vq_models_are_refused(tmp_path, tiny):
    # found in review (2026-11-27): each of these loaded without an error and gave wrong features
    from diffusers import ScoreSdeVeScheduler
    from safetensors.torch import load_file, save_file

    tiny.save_pretrained(tmp_path / "partial")
    weights = tmp_path / "partial" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_in.bias"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['conv_in.bias'\]"):
        build_teacher(pretrained=tmp_path / "partial")  # diffusers would fill it with random values
    tiny.save_pretrained(tmp_path / "ve")
    ScoreSdeVeScheduler().save_pretrained(tmp_path / "ve" / "scheduler")
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler has no DDPM beta schedule"):
        build_teacher(pretrained=tmp_path / "ve")
    tiny.unet.save_pretrained(tmp_path / "ldm" / "unet")
    (tmp_path / "ldm" / "vqvae").mkdir()
    with pytest.raises(ValueError, match="VQ autoencoder"):
        build_teacher(pretrained=tmp_path / "ldm")


def test_export_after_an_interrupted_export(tmp_path, tiny):
    from dtfast.teachers.build import export_teacher

    folder = tmp_path / "teacher"
    export_teacher(tiny.unet, tiny.scheduler, folder, {"image_size": 64})
    (tmp_path / "teacher.old" / "unet").mkdir(parents=True)  # an export stopped between its two renames
    export_teacher(tiny.unet, tiny.scheduler, folder, {"image_size": 64})
    assert not (tmp_path / "teacher.old").exists() and (folder / "unet").is_dir()


def test_unreachable_hub_id_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="huggingface-cli download someone/adm-teacher"):
        build_teacher(pretrained="someone/adm-teacher")


def test_bf16_on_cpu():
    teacher = build_teacher("tiny", dtype=torch.bfloat16, strides=(16, 32))
    features = teacher(images(1))
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f.float()).all() for f in features)


def test_embedded_teacher_loads_and_is_trained():
    """`embedded:<name>` resolves to the teacher shipped in the package (the demo's default): it loads as a
    pretrained (not random) teacher at its training size, and an unknown name lists what is shipped."""
    from dtfast.teachers.loading import embedded_teachers

    names = embedded_teachers()
    assert names, "no teacher shipped in dtfast/assets"
    teacher = build_teacher(pretrained=f"embedded:{names[0]}", timestep=50)
    assert not teacher.is_random
    feats = teacher(images(1, 32), generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(f).all() for f in feats)
    with pytest.raises(FileNotFoundError, match=f"shipped: .*{names[0]}"):
        build_teacher(pretrained="embedded:no_such_teacher")
