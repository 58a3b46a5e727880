"""Input backends (torch / DALI CPU / nvJPEG): same images, same order, resume, bad files, the endless pipeline."""

import multiprocessing
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from dtfast.data import (
    DecodeError,
    ImageFolder,
    InputPipeline,
    ProceduralImages,
    build_input_pipeline,
    build_loader,
    resolve_backend,
)
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
    """The batches of ``loader`` (or of ``loader()``, so that warnings of its construction count too) and the
    warnings about undecodable files."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader() if callable(loader) else loader)
    return batches, [str(w.message) for w in caught if "undecodable" in str(w.message)]


@needs_dali
@pytest.mark.parametrize("split", ["val", "train"])
@pytest.mark.parametrize("size", [32, (24, 40), (40, 24)], ids=["32", "24x40", "40x24"])
def test_dali_cpu_matches_torch_backend(tmp_path, split, size):
    smooth_folder(tmp_path)
    data = ImageFolder(str(tmp_path), size, split=split, seed=3)
    dali_batches, _ = collect(DaliLoader(data, 3, seed=11, num_threads=1))
    torch_batches, _ = collect(build_loader(data, 3, seed=11, num_workers=0))
    assert len(dali_batches) == len(torch_batches) == 3
    for (dali_images, dali_labels), (torch_images, torch_labels) in zip(dali_batches, torch_batches):
        assert dali_images.dtype == torch.uint8 and dali_images.shape == (3, 3, *data.image_size)
        assert torch.equal(dali_labels, torch_labels)
        difference = (dali_images.int() - torch_images.int()).abs().float()
        # same file, same window, same flip; only the resampling filters' rounding differs
        assert difference.mean() < 0.5 and difference.max() <= 4, (difference.mean(), difference.max())


@needs_dali
@pytest.mark.parametrize("split", ["val", "train"])
def test_dali_crops_extreme_aspect_ratios_like_the_torch_backend(tmp_path, split):
    # DALI resizes only the crop's window (a 1x3000 image is not first resized to 32x96000): the window comes from
    # the header's size inside the pipeline and must be plan_crop's, including strips thinner than the crop
    _strip_folder(tmp_path)
    data = ImageFolder(str(tmp_path), 32, split=split, seed=3)
    dali_batches, _ = collect(DaliLoader(data, 2, seed=1, num_threads=1))
    torch_batches, _ = collect(build_loader(data, 2, seed=1, num_workers=0))
    assert len(dali_batches) == len(torch_batches) == 3
    for (dali_images, dali_labels), (torch_images, _) in zip(dali_batches, torch_batches):
        assert dali_images.shape == (2, 3, 32, 32)
        difference = (dali_images.int() - torch_images.int()).abs().float()
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
    loaders = []
    batches, messages = collect(lambda: loaders.append(DaliLoader(data, 2, seed=0, num_threads=1, shuffle=False))
                                or loaders[0])
    # screened before DALI reads them: one warning for the epoch, and DALI never decodes them (no repair)
    assert len(batches) == 4 and loaders[0].skipped_files == bad
    assert len(messages) == 1 and "replaced 2 undecodable" in messages[0], messages
    assert all(data.files[loaders[0]._resolve(i)] not in bad for i in range(len(data)))
    # the next epoch replaces them again, and counts and warns again, as the torch backend does
    again, messages = collect(lambda: DaliLoader(data, 2, seed=0, num_threads=1, shuffle=False, start_step=4))
    assert len(again) == 4 and len(messages) == 1 and "replaced 2 undecodable" in messages[0]
    # the replacement is the next file of the data set, as in the torch backend
    reference, _ = collect(build_loader(data, 2, num_workers=0, shuffle=False))
    for (a, la), (b, lb) in zip(batches, reference):
        assert torch.equal(la, lb) and (a.int() - b.int()).abs().float().mean() < 0.5
    strict = ImageFolder(str(tmp_path), 16, split="val", strict=True)
    with pytest.raises(DecodeError, match="ant/01.jpg': OSError: Truncated File Read") as error:
        list(DaliLoader(strict, 2, seed=0, num_threads=1, shuffle=False))
    assert "Critical error" not in str(error.value)  # PIL's reason, not DALI's first line


def test_dali_screen_reads_only_plain_complete_jpeg_and_png_files(tmp_path):
    from dtfast.data.dali import _intact

    smooth_folder(tmp_path, classes=("a",), per_class=1)
    jpeg = (tmp_path / "a" / "00.jpg").read_bytes()
    png = tmp_path / "p.png"
    Image.new("RGB", (9, 7), (1, 2, 3)).save(png)
    cases = {
        "jpeg": (jpeg, True), "jpeg padded with zeros": (jpeg + b"\0" * 40, True),
        "png": (png.read_bytes(), True), "png with a trailer": (png.read_bytes() + b"x" * 100, False),
        # a camera JPEG cut after its EXIF thumbnail: an EOI marker near the end, but not at it
        "truncated after an early EOI": (jpeg[:600] + b"\xff\xd9" + jpeg[600:900], False),
        "jpeg with data appended (a motion photo)": (jpeg + os.urandom(10000), False),
        "garbage with SOI": (b"\xff\xd8junk" * 50, False), "html": (b"<html>404</html>", False), "empty": (b"", False),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / "case.bin"
        path.write_bytes(data)
        assert _intact(str(path)) is expected, name


@needs_dali
def test_dali_decides_screened_out_files_with_pil(tmp_path):
    smooth_folder(tmp_path, per_class=4)
    files = sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    appended = files[1]  # a complete JPEG with data after EOI: read as it is, no PNG copy, not replaced
    with open(appended, "ab") as fh:
        fh.write(os.urandom(8000))
    garbage, fake = files[2], files[3]
    # garbage that fails the screen, followed by a file that passes it (SOI ... EOI) but does not decode: the
    # stand-in for the first must not be the second, and the second is found when DALI fails on it
    (tmp_path / garbage).write_bytes(b"\xff\xd8junk" * 50)
    (tmp_path / fake).write_bytes(b"\xff\xd8\xff" + b"\x00junk" * 60 + b"\xff\xd9")
    data = ImageFolder(str(tmp_path), 16, split="val")
    loaders = []
    batches, messages = collect(lambda: loaders.append(DaliLoader(data, 2, num_threads=1, shuffle=False))
                                or loaders[0])
    loader = loaders[0]
    assert loader._transcoded == {} and data.files.index(appended) not in loader._replacements
    assert sorted(loader.skipped_files) == sorted([garbage, fake]), loader.skipped_files
    assert all(data.files[loader._resolve(data.files.index(p))] not in (garbage, fake) for p in (garbage, fake))
    expected, _ = collect(build_loader(ImageFolder(str(tmp_path), 16, split="val"), 2, num_workers=0, shuffle=False))
    assert len(batches) == len(expected) == 4
    for (a, la), (b, lb) in zip(batches, expected):
        assert torch.equal(la, lb) and (a.int() - b.int()).abs().float().mean() < 0.5


@needs_dali
def test_dali_never_decodes_a_bad_file_in_a_large_batch(tmp_path):
    # DALI 2.4's CPU decoder segfaults (3 in 6 runs) when a file fails in a batch of 32+: the screen keeps every
    # undecodable file away from it. In a subprocess, so that a crash fails this test, not the test run
    os.makedirs(tmp_path / "a")
    for i in range(64):
        Image.fromarray(np.full((24, 24, 3), i * 4, np.uint8)).save(tmp_path / "a" / f"{i:03d}.jpg")
    (tmp_path / "a" / "005.jpg").write_bytes(b"\xff\xd8junk" * 50)
    (tmp_path / "a" / "040.jpg").write_bytes((tmp_path / "a" / "041.jpg").read_bytes()[:300])  # truncated
    (tmp_path / "a" / "050.jpg").write_bytes(b"<html>not found</html>")
    script = textwrap.dedent(f"""
        import warnings
        from dtfast.data import ImageFolder
        from dtfast.data.dali import DaliLoader
        warnings.simplefilter("ignore")
        data = ImageFolder({str(tmp_path)!r}, 16, split="val")
        for epoch in range(2):
            loader = DaliLoader(data, 32, num_threads=1, shuffle=epoch > 0, start_step=2 * epoch)
            batches = list(loader)
            assert len(batches) == 2 and all(b[0].shape == (32, 3, 16, 16) for b in batches)
            print(epoch, sorted(p.rsplit("/", 1)[1] for p in loader.skipped_files))
        """)
    for _ in range(4):  # before the screen, 2 of 4 runs of this (epoch 0) crashed
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split("\n")[:2] == ["0 ['005.jpg', '040.jpg', '050.jpg']",
                                               "1 ['005.jpg', '040.jpg', '050.jpg']"], proc.stdout


@needs_dali
def test_dali_returns_the_file_lists_int64_labels(tmp_path):
    smooth_folder(tmp_path, per_class=2)
    lines = [f"{name}/{i:02d}.jpg {label}" for name, base in (("ant", 3_000_000_000), ("bee", -5))
             for i, label in ((0, base), (1, base + 1))]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    data = ImageFolder(str(tmp_path / "list.txt"), 16, split="val")
    batches, _ = collect(DaliLoader(data, 2, num_threads=1, shuffle=False))
    assert [b[1].tolist() for b in batches] == [[3_000_000_000, 3_000_000_001], [-5, -4]]


@needs_dali
def test_dali_survives_many_undecodable_files(tmp_path):
    # 70 bad files, each in its own prefetch window: 70 repairs in one epoch (the loader used to give up after 64)
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "a")
    for i in range(280):
        pixels = np.full((20 + i % 7, 24 + i % 5, 3), rng.integers(0, 256, 3), np.uint8)
        path = tmp_path / "a" / f"{i:03d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=95)
        if i % 4 == 0:
            path.write_bytes(b"\xff\xd8 garbage" * 30)
    data = ImageFolder(str(tmp_path), 16, split="val")
    loader = DaliLoader(data, 1, num_threads=1, shuffle=False)
    batches, _ = collect(loader)
    reference = build_loader(ImageFolder(str(tmp_path), 16, split="val"), 1, num_workers=0, shuffle=False)
    expected, _ = collect(reference)
    assert len(batches) == len(expected) == 280 and len(loader.skipped_files) == 70
    assert all((a.int() - b.int()).abs().max() <= 2 for (a, _), (b, _) in zip(batches, expected))


@needs_dali
def test_dali_reads_files_that_only_pil_decodes(tmp_path):
    # a GIF named .jpg: PIL (the torch backend) decodes it, DALI's decoder cannot; DALI then reads a lossless PNG
    # of PIL's decoding, so the batch and its pixels are the torch backend's
    smooth_folder(tmp_path, per_class=3)
    gif = tmp_path / "bee" / "01.jpg"
    with Image.open(gif) as image:
        image.convert("RGB").save(gif, "GIF")
    data = ImageFolder(str(tmp_path), 16, split="val")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = DaliLoader(data, 2, num_threads=1, shuffle=False)
        batches = list(loader)
    assert any("PNG copies" in str(w.message) and "01.jpg" in str(w.message) for w in caught)
    expected, _ = collect(build_loader(ImageFolder(str(tmp_path), 16, split="val"), 2, num_workers=0, shuffle=False))
    assert len(batches) == len(expected) == 3 and loader.skipped_files == []
    for (a, la), (b, lb) in zip(batches, expected):
        assert torch.equal(la, lb) and (a.int() - b.int()).abs().float().mean() < 0.5


@needs_dali
def test_dali_random_resized_crops_differ_across_ranks(tmp_path):
    # the same image everywhere: rank 0 and rank 1 must still crop different windows (DALI's generator is seeded
    # per rank); with one seed for all ranks every GPU got the same windows
    os.makedirs(tmp_path / "a")
    yy, xx = np.mgrid[0:96, 0:128]
    pixels = np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)
    for i in range(8):
        Image.fromarray(pixels).save(tmp_path / "a" / f"{i}.png")
    data = ImageFolder(str(tmp_path), 16, random_resized_crop=True)
    ranks = [list(DaliLoader(data, 2, rank=r, world_size=2, num_threads=1)) for r in (0, 1)]
    differences = [min((a.int() - b.int()).abs().max(), (a.int() - b.flip(-1).int()).abs().max())
                   for (x, _), (y, _) in zip(*ranks) for a, b in zip(x, y)]
    assert len(differences) == 4 and sum(d > 20 for d in differences) >= 3, differences


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_nvjpeg_code_path_matches_torch_backend_on_cpu(tmp_path, fmt):
    smooth_folder(tmp_path, fmt=fmt)
    data = ImageFolder(str(tmp_path), 32, seed=5)
    ours, _ = collect(NvjpegLoader(data, 3, seed=2, device="cpu", num_workers=0))
    reference, _ = collect(build_loader(data, 3, seed=2, num_workers=0))
    assert len(ours) == len(reference) == 3
    for (a, la), (b, lb) in zip(ours, reference):
        assert torch.equal(la, lb) and (a.int() - b.int()).abs().max() <= 1


def _strip_folder(root):
    """Smooth PNGs of extreme and ordinary aspect ratios (1x300 ... 40x41) in root/a."""
    os.makedirs(root / "a")
    rng = np.random.default_rng(5)
    for i, (height, width) in enumerate([(1, 300), (300, 2), (7, 301), (150, 13), (33, 32), (40, 41)]):
        yy, xx = np.mgrid[0:height, 0:width] / 50
        pixels = np.stack([128 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy))
                           for _ in range(3)], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "a" / f"{i}.png")


def test_window_weights_are_pils_bilinear_resampling():
    from dtfast.data.nvjpeg import resize_window
    from dtfast.data.transforms import Crop

    # PIL's float ("F") images resample with double coefficients and no 8-bit rounding: the same map to float32
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        image = rng.uniform(0, 255, (height, width)).astype(np.float32)
        if trial % 3 == 0:
            top, left, box_h, box_w = 0.0, 0.0, float(height), float(width)
        else:
            top, left = rng.uniform(0, height - 0.01), rng.uniform(0, width - 0.01)
            box_h, box_w = rng.uniform(0.01, height - top), rng.uniform(0.01, width - left)
        out_h, out_w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        expected = np.asarray(Image.fromarray(image, "F").resize(
            (out_w, out_h), Image.BILINEAR, box=(left, top, left + box_w, top + box_h)), dtype=np.float64)
        ours = resize_window(torch.from_numpy(image)[None], Crop(top, left, box_h, box_w, False), (out_h, out_w))
        assert ours.dtype == torch.float64 and ours.shape == (1, out_h, out_w)
        np.testing.assert_allclose(ours[0].numpy(), expected, atol=5e-3, rtol=0,
                                   err_msg=f"{height}x{width} box {(top, left, box_h, box_w)} -> {out_h}x{out_w}")


@pytest.mark.parametrize("split", ["val", "train"])
def test_nvjpeg_resizes_only_the_window_of_extreme_aspect_ratios(tmp_path, split, monkeypatch):
    from dtfast.data import nvjpeg

    _strip_folder(tmp_path)
    calls = []
    resize_window = nvjpeg.resize_window
    monkeypatch.setattr(nvjpeg, "resize_window", lambda *a: calls.append(a[0].shape) or resize_window(*a))
    data = ImageFolder(str(tmp_path), 32, split=split, seed=3)
    ours, _ = collect(NvjpegLoader(data, 2, seed=1, device="cpu", num_workers=0))
    reference, _ = collect(build_loader(data, 2, seed=1, num_workers=0))
    # the four strips (a whole-image resize would take 32x9600, 4800x32, 32x1376, 369x32 pixels) take the window
    # path; the near-square images keep the whole-image resize
    assert sorted(calls) == sorted([(3, 1, 300), (3, 300, 2), (3, 7, 301), (3, 150, 13)])
    assert len(ours) == len(reference) == 3
    for (a, la), (b, lb) in zip(ours, reference):
        assert torch.equal(la, lb) and a.shape == (2, 3, 32, 32)
        difference = (a.int() - b.int()).abs()
        assert difference.max() <= 1, difference.max()


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


@pytest.mark.needs_cuda
def test_nvjpeg_strips_on_gpu_match_the_cpu_path(tmp_path):
    _strip_folder(tmp_path)  # PNGs: decoded on the CPU by both, so only the window resize runs on the device
    data = ImageFolder(str(tmp_path), 32, seed=3)
    gpu, _ = collect(NvjpegLoader(data, 2, seed=1, device="cuda", num_workers=0))
    cpu, _ = collect(NvjpegLoader(data, 2, seed=1, device="cpu", num_workers=0))
    assert len(gpu) == len(cpu) == 3
    for (a, _), (b, _) in zip(gpu, cpu):
        assert a.is_cuda and a.shape == b.shape == (2, 3, 32, 32) and (a.cpu().int() - b.int()).abs().max() <= 1


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


@pytest.mark.parametrize("backend", ["torch", "nvjpeg", pytest.param("dali", marks=needs_dali)])
def test_16_bit_grey_pngs_are_scaled_not_clipped(tmp_path, backend):
    # PIL's convert("RGB") clips 16-bit grey values at 255 (a white image) and torchvision decodes them as uint16:
    # every backend gives the 8-bit image (value / 257), as DALI's decoder does
    os.makedirs(tmp_path / "a")
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    for i in range(2):
        Image.fromarray(ramp).save(tmp_path / "a" / f"{i}.png")
    data = ImageFolder(str(tmp_path), 48, split="val")
    loader = {"torch": lambda: build_loader(data, 2, num_workers=0, shuffle=False),
              "nvjpeg": lambda: NvjpegLoader(data, 2, device="cpu", num_workers=0, shuffle=False),
              "dali": lambda: DaliLoader(data, 2, num_threads=1, shuffle=False)}[backend]()
    (images, _), = collect(loader)[0]
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 48, 48)
    expected = ramp[:, 8:56] / 257.0  # the centre 48x48 crop of the 48x64 image
    assert abs(images.float().mean().item() - expected.mean()) < 2.0, images.float().mean()


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


# ---------------------------------------------------------------- worker processes and threads
_FORKS_SEEN: list | None = None  # while a test watches: (thread name, Python threads alive) of each os.fork()
_AUDIT_INSTALLED = False


def _audit(event, _args):
    if event == "os.fork" and _FORKS_SEEN is not None:
        _FORKS_SEEN.append((threading.current_thread().name, threading.active_count()))


def _watch_forks() -> list:
    global _FORKS_SEEN, _AUDIT_INSTALLED
    if not _AUDIT_INSTALLED:  # audit hooks cannot be removed: one, inert while _FORKS_SEEN is None
        sys.addaudithook(_audit)
        _AUDIT_INSTALLED = True
    _FORKS_SEEN = []
    return _FORKS_SEEN


def test_pipelines_with_workers_and_prefetch_threads_never_fork_the_process(tmp_path, monkeypatch):
    """The H100 failure: DataLoader workers forked (filelock refused os.fork) while another pipeline's prefetch
    thread ran. Three pipelines with worker processes, two prefetching on threads, interleaved across two epoch
    boundaries: no os.fork() at all in this process, the same batches as without prefetching, workers stopped
    by close()."""
    global _FORKS_SEEN
    monkeypatch.delenv("DTFAST_WORKER_START", raising=False)
    smooth_folder(tmp_path, per_class=4)  # 8 images, batch 3 -> 2 steps per epoch
    kwargs = {"mean": MEAN, "std": STD, "seed": 1, "num_workers": 1}
    children_before = set(multiprocessing.active_children())
    forks = _watch_forks()
    pipelines = []
    try:
        plain = build_input_pipeline(str(tmp_path), 16, 3, backend="torch", prefetch=0, **kwargs)
        ahead = build_input_pipeline(str(tmp_path), 16, 3, backend="torch", prefetch=2, **kwargs)
        files = build_input_pipeline(str(tmp_path), 16, 3, backend="nvjpeg", device="cpu", prefetch=2, **kwargs)
        pipelines = [plain, ahead, files]
        for _ in range(5):  # steps 0..4: epochs 0, 1, 2, rolled over while the other pipelines' threads run
            expected, got, decoded = next(ahead), next(plain), next(files)
            for a, b in zip(expected, got):
                assert torch.equal(a, b)
            assert torch.equal(decoded[2], expected[2])
            torch.testing.assert_close(decoded[0], expected[0], rtol=0, atol=1 / 127.5 + 1e-6)
        assert plain.epoch == ahead.epoch == files.epoch == 2
        assert ahead._thread.is_alive() and files._thread.is_alive()
    finally:
        _FORKS_SEEN = None
        for pipeline in pipelines:
            pipeline.close()
    assert forks == [], f"os.fork() called by (thread, Python threads alive): {forks}"
    assert set(multiprocessing.active_children()) <= children_before  # close() stopped every worker
    with pytest.raises(RuntimeError, match="after close"):
        next(ahead)


_HELD = threading.Lock()


class _LockAndPid(Dataset):
    """Procedural images labelled with the pid of the process that made them; each item takes ``_HELD``."""

    def __init__(self, num_images: int, size: int) -> None:
        self.data = ProceduralImages(num_images, size)

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)

    def __getitem__(self, index):
        if not _HELD.acquire(timeout=3):
            raise RuntimeError("worker inherited a lock that another thread held when the worker was forked")
        _HELD.release()
        return self.data[index][0], os.getpid()


@pytest.mark.parametrize("start_method", [None, "fork"])
def test_workers_never_inherit_a_lock_held_by_another_thread(monkeypatch, start_method):
    """The hazard itself, deterministically: another thread holds a lock while the workers start. A forked worker
    gets the lock held forever (the "fork" control shows the test detects it); the default start method gives
    fresh processes, which then serve every epoch (persistent: the same two pids over three epochs)."""
    monkeypatch.delenv("DTFAST_WORKER_START", raising=False)
    taken, release = threading.Event(), threading.Event()

    def hold():
        with _HELD:
            taken.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(10)
    pipeline = InputPipeline(_LockAndPid(8, 16), 2, mean=MEAN, std=STD, backend="torch", num_workers=2, prefetch=2,
                             start_method=start_method)  # 8 images, batch 2 -> 4 steps per epoch
    try:
        if start_method == "fork":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: "multi-threaded, fork()"
                with pytest.raises(RuntimeError, match="inherited a lock"):
                    next(pipeline)
            return
        pids = torch.cat([next(pipeline)[2] for _ in range(12)])  # epochs 0, 1, 2
    finally:
        release.set()
        pipeline.close()
        holder.join(10)
    assert pipeline.epoch == 3 and os.getpid() not in pids.tolist()
    assert len(set(pids.tolist())) == 2, pids  # one pair of worker processes for all three epochs


OWNER = textwrap.dedent("""
    import multiprocessing, time
    from dtfast.data import InputPipeline, ProceduralImages


    def main():
        pipeline = InputPipeline(ProceduralImages(16, 16), 4, mean=(0.5,) * 3, std=(0.5,) * 3, backend="torch",
                                 num_workers=2, prefetch=1)
        next(pipeline)
        print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
        time.sleep(300)


    if __name__ == "__main__":
        main()
""")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_workers_exit_when_the_training_process_is_killed(tmp_path):
    """Workers forked by the fork server are ITS children: after a SIGKILL of the training process (preemption,
    OOM killer) they must still go (DataLoader's own check watches their parent, the server)."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DTFAST_WORKER_START", None)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([owner.stdout], [], [], 180)
        workers = [int(pid) for pid in owner.stdout.readline().split()] if ready else []
        assert len(workers) == 2 and all(_running(pid) for pid in workers), workers
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:  # do not leave them behind when the test fails
        os.kill(pid, 9)
    assert not left, f"worker processes {left} outlived the process that started them"


def test_class_folder_named_like_the_split_is_not_taken_for_the_split(tmp_path):
    # PASCAL VOC / COCO have a class "train": root/train used to become the whole (unlabelled) data set
    root = tmp_path / "voc"
    smooth_folder(str(root), classes=("aeroplane", "boat", "train"), per_class=2)
    data = ImageFolder(str(root), 16, split="train")
    assert data.classes == ["aeroplane", "boat", "train"] and len(data) == 6
    # a real split layout still picks root/train
    split_root = tmp_path / "imagenet"
    smooth_folder(str(split_root / "train"), per_class=2)
    smooth_folder(str(split_root / "val"), per_class=1)
    assert ImageFolder(str(split_root), 16, split="train").classes == ["ant", "bee"]
    assert len(ImageFolder(str(split_root), 16, split="val")) == 2


def test_folders_inside_a_class_and_dangling_links_are_counted_as_skipped(tmp_path):
    root = tmp_path / "data"
    smooth_folder(str(root), per_class=1)
    smooth_folder(str(root / "ant" / "more"), classes=("x",), per_class=1)
    os.symlink(str(tmp_path / "gone.jpg"), str(root / "bee" / "link.jpg"))
    with pytest.warns(UserWarning, match="skipped 2 .*folder"):
        data = ImageFolder(str(root), 16)
    assert len(data) == 2
    assert sorted(os.path.basename(p.rstrip("/")) for p in data.skipped_at_scan) == ["link.jpg", "more"]


def test_nvjpeg_skips_a_file_that_cannot_be_read(tmp_path):
    # a file gone after the scan (a cleaning job, a flaky network filesystem) is replaced, as on the torch backend
    smooth_folder(str(tmp_path), per_class=3)
    data = ImageFolder(str(tmp_path), 16, split="val")
    os.remove(data.files[1])
    with pytest.warns(UserWarning, match="replaced undecodable file"):
        batches = list(NvjpegLoader(data, 2, device="cpu", num_workers=0, shuffle=False))
    assert len(batches) == 3 and all(b[0].shape == (2, 3, 16, 16) for b in batches)


def test_nvjpeg_takes_the_first_frame_of_an_animated_gif_like_pil(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(root / "00_anim.jpg", "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = ImageFolder(str(tmp_path), 16, split="val", strict=True)
    nv = next(iter(NvjpegLoader(data, 1, device="cpu", num_workers=0, shuffle=False)))[0]
    torch_backend = next(iter(build_loader(data, 1, num_workers=0, shuffle=False)))[0]
    assert nv.shape == torch_backend.shape == (1, 3, 16, 16)
    assert (nv.int() - torch_backend.int()).abs().max() <= 2


class _StallAfterFirst(Dataset):
    """The first item a worker makes is instant; later ones take 30 s (a stalled network read)."""

    def __init__(self):
        self.made = 0

    def __len__(self):
        return 8

    def __getitem__(self, index):
        self.made += 1
        if self.made > 1:
            time.sleep(30)
        return torch.zeros(3, 8, 8, dtype=torch.uint8), index


def test_close_ends_a_prefetch_thread_waiting_on_a_stalled_worker():
    # close() used to leave the prefetch thread polling the stopped loader for ever (and the pipeline alive)
    pipeline = InputPipeline(_StallAfterFirst(), 1, mean=(0.5,) * 3, std=(0.5,) * 3, backend="torch",
                             num_workers=1, prefetch=1)
    next(pipeline)
    time.sleep(0.2)
    started = time.monotonic()
    pipeline.close()
    deadline = time.monotonic() + 15
    while any(t.name == "dtfast-input-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(t.name == "dtfast-input-prefetch" for t in threading.enumerate())
    assert time.monotonic() - started < 20
