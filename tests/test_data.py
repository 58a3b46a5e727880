"""Data: procedural set, image folders (layout, crops, bad inputs), resumable sharded loader, model views."""

import os
import warnings

import numpy as np
import pytest
import torch
from conftest import cpu_and_cuda
from PIL import Image

from dtfast.data import (
    DecodeError,
    ImageFolder,
    ProceduralImages,
    build_dataset,
    build_loader,
    steps_per_epoch,
    to_views,
)
from dtfast.data.transforms import image_hw, parse_size_text, plan_crop, resized_cover_size, size_text


def write_folder(root, classes=("ant", "bee", "cat"), per_class=4, size=(50, 38), fmt="JPEG", seed=0):
    """root/<class>/<i>.jpg with random-noise content; returns {path: class}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = os.path.join(root, name, f"{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}")
            Image.fromarray(pixels).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            written[path] = name
    return written


# ---------------------------------------------------------------- procedural set
def test_procedural_is_deterministic_and_splits_differ():
    a, b = ProceduralImages(20, 32, seed=3), ProceduralImages(20, 32, seed=3)
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] == i % 10
    other_seed, val = ProceduralImages(20, 32, seed=4), ProceduralImages(20, 32, seed=3, split="val")
    assert not torch.equal(a[5][0], other_seed[5][0])
    assert not torch.equal(a[5][0], val[5][0])
    image, label = a[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and isinstance(label, int)
    assert image.float().std() > 10  # not blank


def test_procedural_train_flips_depend_on_epoch_only():
    data = ProceduralImages(16, 32, seed=0)
    base = [data.render(i) for i in range(16)]
    flipped = []
    for epoch in (0, 1):
        data.set_epoch(epoch)
        for i in range(16):
            image = data[i][0].permute(1, 2, 0).numpy().astype(np.float64)
            as_is = np.abs(image - base[i] * 255).max()
            mirrored = np.abs(image - base[i][:, ::-1] * 255).max()
            assert min(as_is, mirrored) <= 1.0
            flipped.append(mirrored < as_is)
    assert 4 <= sum(flipped) <= 28  # about half of 32, deterministic given the seed
    val = ProceduralImages(4, 32, seed=0, split="val")
    val.set_epoch(5)
    assert np.abs(val[1][0].permute(1, 2, 0).numpy() - val.render(1) * 255).max() <= 1.0


def test_procedural_colour_alone_does_not_give_the_class():
    """Colour is a nuisance: nearest class-mean on the mean RGB is close to chance (10 classes)."""
    train, val = ProceduralImages(300, 24, seed=0), ProceduralImages(200, 24, seed=0, split="val")

    def mean_rgb(data):
        return np.stack([data[i][0].float().mean(dim=(1, 2)).numpy() for i in range(len(data))])

    x_train, x_val = mean_rgb(train), mean_rgb(val)
    y_train, y_val = np.arange(300) % 10, np.arange(200) % 10
    centres = np.stack([x_train[y_train == k].mean(0) for k in range(10)])
    predicted = np.argmin(((x_val[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y_val).mean() < 0.3


def test_procedural_non_square_is_the_centre_of_the_square_image():
    square, wide, tall = (ProceduralImages(6, size, seed=2, split="val") for size in (40, (24, 40), (40, 16)))
    for i in range(6):
        full = square.render(i)
        assert np.array_equal(wide.render(i), full[8:32]) and np.array_equal(tall.render(i), full[:, 12:28])
        assert wide[i][0].shape == (3, 24, 40) and tall[i][0].shape == (3, 40, 16)
    with pytest.raises(ValueError, match="image_size >= 16"):
        ProceduralImages(4, (8, 32))


def test_procedural_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ProceduralImages(split="test")
    with pytest.raises(ValueError, match="num_classes"):
        ProceduralImages(num_classes=21)
    with pytest.raises(IndexError):
        ProceduralImages(4, 32).render(4)


# ---------------------------------------------------------------- image folders
def test_folder_labels_match_folder_names(tmp_path):
    written = write_folder(tmp_path / "train")
    write_folder(tmp_path / "val", per_class=1)
    data = build_dataset(str(tmp_path), 32)  # picks root/train for the train split
    assert isinstance(data, ImageFolder) and data.classes == ["ant", "bee", "cat"] and len(data) == 12
    for path, label in zip(data.files, data.labels):
        assert data.classes[label] == written[path]
    assert len(build_dataset(str(tmp_path), 32, split="val")) == 3
    image, label = data[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 1


def test_flat_folder_is_unlabelled(tmp_path):
    write_folder(tmp_path, classes=("x",), per_class=3)
    data = ImageFolder(str(tmp_path / "x"), 16)
    assert data.classes == [] and data.labels == [-1, -1, -1]


def test_file_list(tmp_path):
    written = write_folder(tmp_path / "images", classes=("a", "b"), per_class=2)
    paths = sorted(written)
    lines = ["# path label", "images/a/000.jpg 3", "", f"{paths[3]} 1", "images/a/missing.jpg 0", "images/b/000.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 missing"):
        data = build_dataset(str(tmp_path / "list.txt"), 16)
    assert [os.path.relpath(p, tmp_path) for p in data.files] == ["images/a/000.jpg", "images/b/001.jpg",
                                                                     "images/b/000.jpg"]
    assert data.labels == [3, 1, -1] and data[0][1] == 3
    (tmp_path / "bad.txt").write_text("images/a/000.jpg three\n")
    with pytest.raises(ValueError, match="line 1"):
        build_dataset(str(tmp_path / "bad.txt"), 16)


def test_centre_crop_equals_resize_then_crop(tmp_path):
    write_folder(tmp_path, classes=("a",), per_class=1, size=(500, 375), fmt="PNG")
    data = ImageFolder(str(tmp_path), 256, split="val")
    ours = data[0][0].permute(1, 2, 0).numpy().astype(int)
    with Image.open(data.files[0]) as image:
        height, width = resized_cover_size(image.height, image.width, 256)
        assert (height, width) == (256, 341)
        full = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR)).astype(int)
    left = (341 - 256 + 1) // 2  # round-half-up of the centre, the convention shared with DALI
    assert np.abs(ours - full[:, left:left + 256]).max() <= 1


def test_cover_size_is_resize_shorter_for_squares_and_covers_non_square_outputs():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width, size = (int(v) for v in rng.integers(1, 3000, 3))
        # the square case as DALI's resize_shorter: the shorter side becomes S, the other rounded half up
        shorter, longer = min(height, width), max(height, width)
        other = max(size, int(np.floor(longer * size / shorter + 0.5)))
        assert resized_cover_size(height, width, size) == ((size, other) if height <= width else (other, size))
        out_h, out_w = (int(v) for v in rng.integers(1, 400, 2))
        got_h, got_w = resized_cover_size(height, width, (out_h, out_w))
        assert got_h >= out_h and got_w >= out_w and (got_h == out_h or got_w == out_w)  # covers, and fits one side
        scale = max(out_h / height, out_w / width)  # the aspect ratio is kept, up to rounding the other side
        assert abs(got_h - height * scale) <= 0.5 + 1e-9 * got_h or got_h == out_h
        assert abs(got_w - width * scale) <= 0.5 + 1e-9 * got_w or got_w == out_w
    assert resized_cover_size(720, 1280, (128, 256)) == (144, 256)  # BDD100K frames for the 128x256 recipe
    assert resized_cover_size(2, 2, (3, 5)) == (5, 5) and image_hw(7) == (7, 7) and image_hw([3, 5]) == (3, 5)
    assert size_text(32) == "32" and size_text((32, 32)) == "32" and size_text((128, 256)) == "128x256"
    with pytest.raises(ValueError, match="image size"):
        image_hw((1, 2, 3))
    assert parse_size_text("128x256") == (128, 256) and parse_size_text(32) == parse_size_text("32") == (32, 32)
    for bad in ("", "0", "32x", "x32", "a", "3x4x5", "-2"):
        with pytest.raises(ValueError, match="image size"):
            parse_size_text(bad)


def test_non_square_crops_equal_resize_then_crop(tmp_path):
    write_folder(tmp_path, classes=("a",), per_class=1, size=(400, 300), fmt="PNG")  # (width, height)
    data = ImageFolder(str(tmp_path), (48, 128), split="val")
    ours = data[0][0].permute(1, 2, 0).numpy().astype(int)
    assert ours.shape == (48, 128, 3)
    with Image.open(data.files[0]) as image:
        full = np.asarray(image.convert("RGB").resize((128, 96), Image.BILINEAR)).astype(int)  # covers 48x128
    top = (96 - 48 + 1) // 2
    assert np.abs(ours - full[top:top + 48]).max() <= 1
    # training windows keep the output's aspect ratio, span the limiting side and move along the other
    train = ImageFolder(str(tmp_path), (48, 128), seed=2)
    windows = {(round(c.top, 6), round(c.left, 6), round(c.height, 6), round(c.width, 6))
               for c in (train.crop_for(i, 300, 400) for i in range(12))}
    assert len(windows) > 4
    for top, left, height, width in windows:
        assert abs(width - 400) < 1e-6 and left == 0 and abs(height - 150) < 1e-6 and 0 <= top <= 150
    assert train[0][0].shape == (3, 48, 128)
    # a portrait output from a landscape image: resized to 128x171 (400 * 128 / 300 = 170.7), centre left 62
    crop = plan_crop(None, 300, 400, (128, 48), train=False)
    assert (crop.top, crop.height) == (0, 300)
    assert abs(crop.width - 48 * 400 / 171) < 1e-9 and abs(crop.left - 62 * 400 / 171) < 1e-9


def test_train_crops_are_seeded_per_epoch_and_index(tmp_path):
    write_folder(tmp_path, classes=("a",), per_class=2, size=(80, 48), fmt="PNG")
    first, second = ImageFolder(str(tmp_path), 32, seed=1), ImageFolder(str(tmp_path), 32, seed=1)
    assert torch.equal(first[0][0], second[0][0])
    crops = set()
    for epoch in range(8):
        first.set_epoch(epoch)
        crop = first.crop_for(0, 48, 80)
        crops.add((round(crop.left, 3), crop.flip))
        assert crop.top == 0 and abs(crop.height - 48) < 1e-9  # shorter side fully used, only x varies
    assert len(crops) >= 4
    rrc = ImageFolder(str(tmp_path), 32, random_resized_crop=True)
    windows = {(c.top, c.left, c.height, c.width) for c in (rrc.crop_for(i, 48, 80) for i in range(20))}
    assert len(windows) > 10 and all(0 < h <= 48 and 0 < w <= 80 for _, _, h, w in windows)


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"), 32)
    with pytest.raises(ValueError, match="is empty"):
        build_dataset(str(tmp_path), 32)
    write_folder(tmp_path, classes=("full",), per_class=1)
    os.makedirs(tmp_path / "hollow")
    (tmp_path / "hollow" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"without image files: \['hollow'\]"):
        build_dataset(str(tmp_path), 32)


def test_non_image_and_empty_files_are_skipped_with_a_count(tmp_path):
    write_folder(tmp_path, classes=("a", "b"), per_class=2)
    (tmp_path / "a" / "readme.txt").write_text("x")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 missing, non-image or empty"):
        data = build_dataset(str(tmp_path), 16)
    assert len(data) == 4 and sorted(os.path.basename(p) for p in data.skipped_at_scan) == ["empty.jpg", "readme.txt"]


def _corrupt_folder(tmp_path):
    write_folder(tmp_path, classes=("a", "b"), per_class=3)
    good = (tmp_path / "a" / "000.jpg").read_bytes()
    (tmp_path / "a" / "001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "b" / "001.jpg").write_bytes(b"this is not a jpeg at all" * 10)  # garbage
    return [str(tmp_path / "a" / "001.jpg"), str(tmp_path / "b" / "001.jpg")]


def test_corrupt_files_are_replaced_and_counted(tmp_path):
    bad = _corrupt_folder(tmp_path)
    data = build_dataset(str(tmp_path), 16, split="val")
    index = data.files.index(bad[0])
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        image, label = data[index]
    replacement = ImageFolder(str(tmp_path), 16, split="val").load(index + 1)
    assert torch.equal(image, replacement[0]) and label == replacement[1] and replacement[2] == []
    # a whole epoch through worker processes: same number of batches, every bad file named once
    loader = build_loader(data, batch_size=2, num_workers=2, shuffle=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        batches = list(loader)
    assert len(batches) == 3 and sorted(loader.skipped_files) == sorted(bad)


def test_strict_fails_naming_the_file(tmp_path):
    bad = _corrupt_folder(tmp_path)
    data = build_dataset(str(tmp_path), 16, strict=True)
    with pytest.raises(DecodeError, match=os.path.basename(os.path.dirname(bad[0])) + "/001.jpg"):
        data[data.files.index(bad[0])]
    loader = build_loader(data, batch_size=6, num_workers=1, shuffle=False)
    with pytest.raises(DecodeError, match="001.jpg"):  # re-raised from the worker, not a hang
        list(loader)


# ---------------------------------------------------------------- loader
def test_loader_shards_resume_and_epochs():
    data = ProceduralImages(26, 16, seed=0)
    assert steps_per_epoch(26, 4, 2) == 3  # 13 per rank -> 3 full batches
    seen = {}
    for rank in (0, 1):
        loader = build_loader(data, 4, rank=rank, world_size=2, seed=5, num_workers=0)
        assert len(loader) == 3 and loader.epoch == 0
        seen[rank] = list(loader.sampler)
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 26

    full = [batch for batch in build_loader(data, 4, rank=1, world_size=2, seed=5, num_workers=0)]
    resumed = list(build_loader(data, 4, rank=1, world_size=2, seed=5, num_workers=0, start_step=2))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], full[2][0]) and torch.equal(resumed[0][1], full[2][1])
    next_epoch = build_loader(data, 4, rank=1, world_size=2, seed=5, num_workers=0, start_step=3)
    assert next_epoch.epoch == 1 and list(next_epoch.sampler) != seen[1]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_loader(data, 16, rank=0, world_size=2)


def test_loader_workers_match_in_process_and_keep_global_rng():
    data = ProceduralImages(12, 16, seed=0)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    with_workers = list(build_loader(data, 3, num_workers=2, seed=1))
    assert torch.equal(torch.rand(1), expected_next)
    in_process = list(build_loader(data, 3, num_workers=0, seed=1))
    for (a, la), (b, lb) in zip(with_workers, in_process):
        assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == torch.uint8 and la.dtype == torch.int64


# ---------------------------------------------------------------- views
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_to_views_formula(device):
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher, student = to_views(images, mean, std)
    x = images.double().cpu()
    expected_teacher = x / 127.5 - 1
    expected_student = (x / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    assert teacher.dtype == student.dtype == torch.float32 and teacher.device == images.device
    torch.testing.assert_close(teacher.cpu().double(), expected_teacher, rtol=0, atol=1e-6)
    torch.testing.assert_close(student.cpu().double(), expected_student, rtol=0, atol=1e-5)
    assert teacher.min() >= -1 and teacher.max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        to_views(images.float(), mean, std)
