"""Input backends (torch / DALI CPU / nvJPEG): same images, same order, resume, bad files, the endless pipeline."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dtfast.data import DecodeError, ImageFolder, ProceduralImages, build_input_pipeline, build_loader, resolve_backend
from dtfast.data.dali import DaliLoader, dali_available
from dtfast.data.nvjpeg import NvjpegLoader

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def smooth_folder(root, classes=("ant", "bee"), per_class=5, seed=0, fmt="JPEG"):
    """Photo-like (smooth) images of varied sizes and aspect ratios, so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            width, height = int(rng.integers(60, 140)), int(rng.integers(50, 120))
            yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
            channels = [128 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy)
                                           + rng.uniform(0, 6)) for _ in range(3)]
            pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
            extension = "jpg" if fmt == "JPEG" else "png"
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i:02d}.{extension}"), fmt,
                                         **({"quality": 90} if fmt == "JPEG" else {}))


def collect(loader):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    return batches, [str(w.message) for w in caught if "undecodable" in str(w.message)]


@needs_dali
@pytest.mark.parametrize("split", ["val", "train"])
def test_dali_cpu_matches_torch_backend(tmp_path, split):
    smooth_folder(tmp_path)
    data = ImageFolder(str(tmp_path), 32, split=split, seed=3)
    dali_batches, _ = collect(DaliLoader(data, 3, seed=11, num_threads=1))
    torch_batches, _ = collect(build_loader(data, 3, seed=11, num_workers=0))
    assert len(dali_batches) == len(torch_batches) == 3
    for (dali_images, dali_labels), (torch_images, torch_labels) in zip(dali_batches, torch_batches):
        assert dali_images.dtype == torch.uint8 and dali_images.shape == (3, 3, 32, 32)
        assert torch.equal(dali_labels, torch_labels)
        difference = (dali_images.int() - torch_images.int()).abs().float()
        # same file, same window, same flip; only the resampling filters' rounding differs
        assert difference.mean() < 0.5 and difference.max() <= 4, (difference.mean(), difference.max())


@needs_dali
def test_dali_resume_and_sharding(tmp_path):
    smooth_folder(tmp_path, per_class=7)  # 14 images, 2 ranks x batch 2 -> 3 steps per epoch
    data = ImageFolder(str(tmp_path), 16, seed=0)
    full = {rank: collect(DaliLoader(data, 2, rank=rank, world_size=2, seed=4, num_threads=1))[0] for rank in (0, 1)}
    assert len(full[0]) == len(full[1]) == 3
    resumed = collect(DaliLoader(data, 2, rank=1, world_size=2, seed=4, start_step=2, num_threads=1))[0]
    assert len(resumed) == 1 and torch.equal(resumed[0][0], full[1][2][0])
    second_epoch = DaliLoader(data, 2, rank=1, world_size=2, seed=4, start_step=3, num_threads=1)
    assert second_epoch.epoch == 1 and len(second_epoch) == 3


def _bad_folder(tmp_path):
    """8 images: ant/01.jpg truncated (in the first batch), bee/02.jpg garbage with a JPEG start marker."""
    smooth_folder(tmp_path, per_class=4)
    truncated, garbage = tmp_path / "ant" / "01.jpg", tmp_path / "bee" / "02.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_bytes(b"\xff\xd8 this is not a jpeg" * 20)
    return [str(truncated), str(garbage)]


@needs_dali
def test_dali_skips_or_fails_on_undecodable_files(tmp_path):
    bad = _bad_folder(tmp_path)
    data = ImageFolder(str(tmp_path), 16, split="val")
    loader = DaliLoader(data, 2, seed=0, num_threads=1, shuffle=False)
    batches, messages = collect(loader)
    assert len(batches) == 4 and loader.skipped_files == bad
    assert sum("replaced 1 undecodable" in m for m in messages) == 2
    # the replacement is the next file of the data set, as in the torch backend
    reference, _ = collect(build_loader(data, 2, num_workers=0, shuffle=False))
    for (a, la), (b, lb) in zip(batches, reference):
        assert torch.equal(la, lb) and (a.int() - b.int()).abs().float().mean() < 0.5
    strict = ImageFolder(str(tmp_path), 16, split="val", strict=True)
    with pytest.raises(DecodeError, match="ant/01.jpg"):
        list(DaliLoader(strict, 2, seed=0, num_threads=1, shuffle=False))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_nvjpeg_code_path_matches_torch_backend_on_cpu(tmp_path, fmt):
    smooth_folder(tmp_path, fmt=fmt)
    data = ImageFolder(str(tmp_path), 32, seed=5)
    ours, _ = collect(NvjpegLoader(data, 3, seed=2, device="cpu", num_workers=0))
    reference, _ = collect(build_loader(data, 3, seed=2, num_workers=0))
    assert len(ours) == len(reference) == 3
    for (a, la), (b, lb) in zip(ours, reference):
        assert torch.equal(la, lb) and (a.int() - b.int()).abs().max() <= 1


def test_nvjpeg_skips_or_fails_on_undecodable_files(tmp_path):
    bad = _bad_folder(tmp_path)
    loader = NvjpegLoader(ImageFolder(str(tmp_path), 16, split="val"), 2, device="cpu", num_workers=1, shuffle=False)
    batches, messages = collect(loader)
    assert len(batches) == 4 and loader.skipped_files == bad and len(messages) == 2
    strict = ImageFolder(str(tmp_path), 16, split="val", strict=True)
    with pytest.raises(DecodeError, match="ant/01.jpg"):
        list(NvjpegLoader(strict, 2, device="cpu", num_workers=0, shuffle=False))


@pytest.mark.needs_cuda
def test_nvjpeg_on_gpu_matches_cpu_decoding(tmp_path):
    smooth_folder(tmp_path)
    data = ImageFolder(str(tmp_path), 32, seed=5)
    gpu, _ = collect(NvjpegLoader(data, 3, seed=2, device="cuda", num_workers=0))
    cpu, _ = collect(NvjpegLoader(data, 3, seed=2, device="cpu", num_workers=0))
    for (a, la), (b, lb) in zip(gpu, cpu):
        assert a.is_cuda and la.is_cuda and torch.equal(la.cpu(), lb)
        difference = (a.cpu().int() - b.int()).abs().float()
        # nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo
        assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())


def test_backend_resolution():
    procedural = ProceduralImages(8, 16)
    assert resolve_backend("auto", procedural) == "torch"
    with pytest.raises(ValueError, match="data.backend=dali decodes image files"):
        resolve_backend("dali", procedural)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("opencv", procedural)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali), "nvjpeg"])
def test_pipeline_crosses_epochs_and_resumes(tmp_path, backend):
    smooth_folder(tmp_path, per_class=4)  # 8 images, batch 3 -> 2 steps per epoch
    kwargs = {"mean": MEAN, "std": STD, "backend": backend, "seed": 1, "num_workers": 0, "num_threads": 1}
    pipeline = build_input_pipeline(str(tmp_path), 16, 3, **kwargs)
    assert pipeline.backend == backend and pipeline.steps_per_epoch == 2
    run = [next(pipeline) for _ in range(5)]  # steps 0..4: epochs 0, 1, 2
    assert pipeline.step == 5 and pipeline.epoch == 2
    resumed = build_input_pipeline(str(tmp_path), 16, 3, start_step=3, **kwargs)
    for (teacher, student, labels), (teacher_r, student_r, labels_r) in zip(run[3:], [next(resumed) for _ in range(2)]):
        assert torch.equal(teacher, teacher_r) and torch.equal(labels, labels_r)
    teacher, student, labels = run[0]
    assert teacher.dtype == student.dtype == torch.float32 and teacher.shape == (3, 3, 16, 16)
    assert labels.dtype == torch.int64 and -1 <= teacher.min() and teacher.max() <= 1
    # both views come from the same uint8 pixels
    pixels = (teacher + 1) * 127.5
    expected = (pixels / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(student, expected, rtol=0, atol=1e-4)
    assert not torch.equal(run[0][0], run[2][0])  # epoch 1 is a new order / new crops


@pytest.mark.parametrize("backend", ["nvjpeg", pytest.param("dali", marks=needs_dali)])
def test_cmyk_and_grayscale_jpegs_decode_like_pil(tmp_path, backend):
    """Valid but unusual JPEGs (ImageNet has a few CMYK and grayscale ones) are images, not bad files."""
    smooth_folder(tmp_path, classes=("a",), per_class=2)
    with Image.open(tmp_path / "a" / "00.jpg") as image:
        image.convert("CMYK").save(tmp_path / "a" / "00.jpg", "JPEG", quality=95)
    with Image.open(tmp_path / "a" / "01.jpg") as image:
        image.convert("L").save(tmp_path / "a" / "01.jpg", "JPEG", quality=95)
    data = ImageFolder(str(tmp_path), 24, split="val")
    if backend == "dali":
        loader = DaliLoader(data, 2, num_threads=1, shuffle=False)
    else:
        loader = NvjpegLoader(data, 2, device="cpu", num_workers=0, shuffle=False)
    (images, _), = collect(loader)[0]
    assert loader.skipped_files == []
    (reference, _), = collect(build_loader(data, 2, num_workers=0, shuffle=False))[0]
    difference = (images.int() - reference.int()).abs().float()
    assert difference.mean() < 1.0, difference.mean()


@needs_dali
def test_dali_random_resized_crops(tmp_path):
    smooth_folder(tmp_path, per_class=3)
    data = ImageFolder(str(tmp_path), 24, random_resized_crop=True)
    batches, _ = collect(DaliLoader(data, 3, num_threads=1))
    assert len(batches) == 2 and all(images.shape == (3, 3, 24, 24) for images, _ in batches)
    plain, _ = collect(DaliLoader(ImageFolder(str(tmp_path), 24), 3, num_threads=1))
    assert not torch.equal(batches[0][0], plain[0][0])


def test_prefetching_pipeline_gives_the_same_batches_and_reraises(tmp_path):
    smooth_folder(tmp_path, per_class=4)
    kwargs = {"mean": MEAN, "std": STD, "backend": "torch", "seed": 1, "num_workers": 0}
    plain = build_input_pipeline(str(tmp_path), 16, 3, prefetch=0, **kwargs)
    ahead = build_input_pipeline(str(tmp_path), 16, 3, prefetch=2, **kwargs)
    for _ in range(5):  # crosses two epoch boundaries
        for a, b in zip(next(plain), next(ahead)):
            assert torch.equal(a, b)
    assert ahead.step == plain.step == 5
    ahead.close()
    (tmp_path / "bee" / "00.jpg").write_bytes(b"broken")
    lenient = build_input_pipeline(str(tmp_path), 16, 8, prefetch=0, **kwargs)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for _ in range(3):  # three epochs of one batch each
            next(lenient)
    assert lenient.skipped_files == [str(tmp_path / "bee" / "00.jpg")] * 3
    strict = build_input_pipeline(str(tmp_path), 16, 8, prefetch=1, strict=True, **kwargs)
    with pytest.raises(DecodeError, match="bee/00.jpg"):
        next(strict)
    assert strict._thread is None  # stopped after handing the error over


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["nvjpeg", "torch"])
def test_gpu_pipeline_prefetch_on_a_side_stream(tmp_path, backend):
    smooth_folder(tmp_path, per_class=4)
    kwargs = {"mean": MEAN, "std": STD, "backend": backend, "seed": 1, "num_workers": 1, "device": "cuda"}
    plain = build_input_pipeline(str(tmp_path), 16, 3, prefetch=0, **kwargs)
    ahead = build_input_pipeline(str(tmp_path), 16, 3, prefetch=2, **kwargs)
    for _ in range(5):
        expected, got = next(plain), next(ahead)
        for a, b in zip(expected, got):
            assert b.is_cuda and torch.equal(a, b)
    ahead.close()
