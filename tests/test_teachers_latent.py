"""Latent (Stable Diffusion layout) teacher: loading a saved folder, equality with the stock diffusers path, strides."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from dtfast.teachers import LatentDiffusionTeacher, TeacherOptions, build_teacher
from dtfast.teachers.archs import LATENT_ARCHS, PIXEL_ARCHS, SD_SCHEDULER
from dtfast.teachers.latent import empty_prompt_embedding

SPEC = LATENT_ARCHS["tiny-sd"]
STRIDES = (8, 16, 32, 64)


def tiny_tokenizer(folder):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(**SPEC["vae"]).eval()
    unet = UNet2DConditionModel(**SPEC["unet"]).eval()
    text_config = transformers.CLIPTextConfig(**SPEC["text"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


@pytest.fixture(scope="module")
def saved(components, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-tiny")
    for name, part in components.items():
        part.save_pretrained(folder / name)
    return folder


def in_memory_teacher(components, **kwargs):
    text = empty_prompt_embedding(components["text_encoder"], components["tokenizer"])
    return LatentDiffusionTeacher(
        components["vae"], components["unet"], components["scheduler"], text, strides=STRIDES, **kwargs
    )


def images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loaded_folder_equals_in_memory(components, saved):
    loaded = build_teacher(pretrained=saved, strides=STRIDES)
    reference = in_memory_teacher(components)
    assert isinstance(loaded, LatentDiffusionTeacher) and not loaded.is_random
    assert loaded.strides == STRIDES and loaded.channels == (32, 64, 64, 64)
    x = images()
    got = loaded(x, generator=torch.Generator().manual_seed(5))
    want = reference(x, generator=torch.Generator().manual_seed(5))
    assert (
        [tuple(f.shape[1:]) for f in got]
        == loaded.feature_shapes(64, 64)
        == [(32, 8, 8), (64, 4, 4), (64, 2, 2), (64, 1, 1)]
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the text encoder is gone: only the cached (1, 77, D) embedding remains
    assert not any(name.startswith("text") for name, _ in loaded.named_parameters())
    assert tuple(loaded.text_embedding.shape) == (1, 77, SPEC["unet"]["cross_attention_dim"])


def test_features_equal_stock_diffusers_path(components):
    teacher = in_memory_teacher(components)
    vae, unet, scheduler = components["vae"], components["unet"], components["scheduler"]
    x = images(seed=2)
    features = teacher(x, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(teacher._noise_shape(x), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        noisy = scheduler.add_noise(latents, noise, torch.tensor([teacher.timestep]))
        text = empty_prompt_embedding(components["text_encoder"], components["tokenizer"]).expand(2, -1, -1)
        found, handles = {}, []
        for index in teacher.blocks:
            block = unet.up_blocks[index]
            layer = block.attentions[-1] if hasattr(block, "attentions") else block.resnets[-1]
            def hook(module, inputs, output, index=index):
                found[index] = output[0] if isinstance(output, tuple) else output

            handles.append(layer.register_forward_hook(hook))
        unet(noisy, teacher.timestep, encoder_hidden_states=text)
        for handle in handles:
            handle.remove()
    for got, index in zip(features, teacher.blocks):
        torch.testing.assert_close(got, found[index], rtol=1e-5, atol=1e-5)


def test_posterior_sample_mode(components):
    mean_teacher = in_memory_teacher(components)
    sample_teacher = in_memory_teacher(components, options=TeacherOptions(latent_mode="sample"))
    x = images(1)
    posterior_noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = components["vae"].encode(x).latent_dist
        expected = (expected.mean + expected.std * posterior_noise) * 0.18215
        got = sample_teacher.encode_latents(x, posterior_noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert sample_teacher._noise_shape(x) == (1, 8, 8, 8)
    a = sample_teacher(x, torch.Generator().manual_seed(0))
    b = mean_teacher(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(a[0], b[0])


def test_strides_a_latent_teacher_cannot_give(saved):
    with pytest.raises(ValueError, match=r"stride\(s\) \[4\].*\[8, 16, 32, 64\].*latents at stride 8"):
        build_teacher(pretrained=saved)  # default strides (4, 8, 16, 32)
    teacher = build_teacher(pretrained=saved, strides=(16, 32))
    with pytest.raises(ValueError, match="multiple of 64"):
        teacher(torch.zeros(1, 3, 96, 64))


def test_broken_layouts(tmp_path, components):
    components["vae"].save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"\['unet'\].*missing"):
        build_teacher(pretrained=tmp_path, strides=STRIDES)
    UNet2DModel(**PIXEL_ARCHS["tiny"]).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="expected a UNet2DConditionModel"):
        build_teacher(pretrained=tmp_path, strides=STRIDES)
    components["unet"].save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"needs \['text_encoder', 'tokenizer'\]"):
        build_teacher(pretrained=tmp_path, strides=STRIDES)


def test_tiny_sd_arch_and_meta_load(saved):
    teacher = build_teacher("tiny-sd", strides=STRIDES)
    assert teacher.is_random
    assert [tuple(f.shape) for f in teacher(images(1))] == [(1, 32, 8, 8), (1, 64, 4, 4), (1, 64, 2, 2), (1, 64, 1, 1)]
    on_meta = build_teacher(pretrained=saved, strides=STRIDES, device="meta")
    assert [f.device.type for f in on_meta(torch.zeros(1, 3, 64, 64, device="meta"))] == ["meta"] * 4


def test_sd15_on_meta_shapes_and_early_exit():
    flops = {}
    for early_exit in (True, False):
        teacher = build_teacher("sd15", strides=STRIDES, device="meta", early_exit=early_exit)
        with FlopCounterMode(display=False) as counter:
            features = teacher(torch.zeros(1, 3, 512, 512, device="meta"))
        flops[early_exit] = counter.get_total_flops()
    assert [tuple(f.shape[1:]) for f in features] == [(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8)]
    # stride 8 is the last decoder level: early exit only skips the output conv
    assert flops[True] < flops[False]
    teacher = build_teacher("sd15", strides=(16, 32, 64), device="meta")
    with FlopCounterMode(display=False) as counter:
        teacher(torch.zeros(1, 3, 512, 512, device="meta"))
    assert counter.get_total_flops() < 0.9 * flops[True]  # dropping the stride-8 level skips its 3 blocks


def test_vae_with_per_channel_latent_statistics(components):
    # SDXL-family VAEs give latents_mean/std: z = (E(x) - mean) * scaling_factor / std (they were ignored)
    torch.manual_seed(0)
    mean, std = [0.1, 0.2, 0.3, 0.4], [2.0, 1.5, 1.0, 0.5]
    vae = AutoencoderKL(**{**SPEC["vae"], "latents_mean": mean, "latents_std": std}).eval()
    text = empty_prompt_embedding(components["text_encoder"], components["tokenizer"])
    teacher = LatentDiffusionTeacher(vae, components["unet"], components["scheduler"], text, strides=STRIDES)
    x = images()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist.mean
        want = (posterior - torch.tensor(mean).view(1, 4, 1, 1)) * vae.config.scaling_factor \
            / torch.tensor(std).view(1, 4, 1, 1)
        torch.testing.assert_close(teacher.encode_latents(x), want, rtol=1e-5, atol=1e-5)


def test_unet_that_takes_other_input_channels_is_refused(components):
    # inpainting (9), depth (5) or instruct-pix2pix (8) UNets passed every check and failed at the first step
    unet = UNet2DConditionModel(**{**SPEC["unet"], "in_channels": 9}).eval()
    text = empty_prompt_embedding(components["text_encoder"], components["tokenizer"])
    with pytest.raises(ValueError, match="UNet takes 9 input channels but the VAE gives 4 latent channels"):
        LatentDiffusionTeacher(components["vae"], unet, components["scheduler"], text, strides=STRIDES)


def test_fourier_time_unet_is_refused():
    # a score-SDE (NCSN++) UNet2DModel takes continuous noise levels, not DDPM timesteps: NaN features at t=0
    from dtfast.teachers.unet_walk import check_supported

    unet = UNet2DModel(**{**PIXEL_ARCHS["tiny"], "time_embedding_type": "fourier", "flip_sin_to_cos": False})
    with pytest.raises(ValueError, match="fourier"):
        check_supported(unet)


def test_latent_mode_is_a_pretraining_config_key():
    from dtfast.train.config import ConfigError, load_config

    assert load_config(None, ["teacher.latent_mode=sample"]).teacher.latent_mode == "sample"
    with pytest.raises(ConfigError, match="teacher.latent_mode"):
        load_config(None, ["teacher.latent_mode=median"])
