import json
import os

import pytest
import torch
import torch.nn.functional as F

from dtfast.eval.config import ConfigError, load_eval_config
from dtfast.eval.features import load_backbone, pooled_features, probe_datasets
from dtfast.eval.probe import fit_logistic, knn_top1, linear_probe, standardise


def _blobs(n, dim, classes, separation, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * separation
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_logistic_solution_is_stationary():
    # the L-BFGS result must satisfy the first-order optimality condition of the regularised objective
    x, y = _blobs(300, 17, 5, 1.0, 0)
    (x,) = standardise(x)
    wd = 1e-2
    weight, bias = fit_logistic(x, y, 5, wd, max_iter=500)
    w, b = weight.double().requires_grad_(), bias.double().requires_grad_()
    loss = F.cross_entropy(x.double() @ w + b, y) + 0.5 * wd * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4


def test_linear_probe_separates_and_does_not_invent_signal():
    x, y = _blobs(600, 32, 4, 2.0, 0)
    xv, yv = _blobs(400, 32, 4, 2.0, 1)
    good = linear_probe(x, y, xv, yv, weight_decays=(1e-3, 1e-1), max_iter=50, seed=0)
    assert good["top1"] > 0.95
    assert linear_probe(x, y, xv, yv, weight_decays=(1e-3, 1e-1), max_iter=50, seed=0) == good  # deterministic
    noise = linear_probe(torch.randn(600, 32), y, torch.randn(400, 32), yv, weight_decays=(1e-3, 1e-1), max_iter=50)
    assert noise["top1"] < 0.4  # chance is 0.25


def _knn_reference(train_x, train_y, val_x, val_y, k, t):
    train_s, val_s = standardise(train_x, val_x)
    train_s, val_s = F.normalize(train_s.double(), dim=1), F.normalize(val_s.double(), dim=1)
    correct = 0
    for i in range(val_s.shape[0]):
        sims = [(float(val_s[i] @ train_s[j]), int(train_y[j])) for j in range(train_s.shape[0])]
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for sim, label in sims[:k]:
            votes[label] = votes.get(label, 0.0) + torch.tensor(sim / t).exp().item()
        correct += max(votes, key=votes.get) == int(val_y[i])
    return correct / val_s.shape[0]


def test_knn_matches_bruteforce_reference():
    x, y = _blobs(90, 7, 3, 0.7, 0)
    xv, yv = _blobs(31, 7, 3, 0.7, 1)
    assert knn_top1(x, y, xv, yv, k=5, temperature=0.1, chunk=8) == pytest.approx(_knn_reference(x, y, xv, yv, 5, 0.1))


def test_backbone_weights_round_trip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    a, b = load_backbone("resnet18", "random", seed=1), load_backbone("resnet18", "random", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = load_backbone("resnet18", "random", seed=2)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    path = str(tmp_path / "backbone.safetensors")
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, path)
    loaded = load_backbone("resnet18", path)
    assert torch.equal(loaded.conv1.weight, c.conv1.weight)
    with pytest.raises(ValueError, match="do not fit timm 'resnet34'"):
        load_backbone("resnet34", path)


def test_pooled_features_shapes_and_normalisation():
    model = load_backbone("resnet18", "random", seed=0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    last = pooled_features(model, images, "last", batch_size=2)
    every = pooled_features(model, images, "all", batch_size=5)
    assert last.shape == (5, 512) and every.shape == (5, 64 + 128 + 256 + 512)
    assert torch.allclose(every[:, -512:], last, atol=1e-5)
    with torch.no_grad():  # the last stage pooled = timm's own headless forward (avg pool)
        x = (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        assert torch.allclose(model(x), last, atol=1e-4)


def test_folder_needs_train_and_val(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        probe_datasets(str(tmp_path), 32)


def test_cli_writes_results(tmp_path):
    from dtfast.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["backbone=random", f"out={out}", "data.num_train=30", "data.num_val=20", "data.num_workers=0",
                 "probe.max_iter=20", "probe.knn_k=3"]) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["linear_top1"] <= 1.0 and 0.0 <= result["knn_top1"] <= 1.0
    assert result["num_train"] == 30 and result["num_val"] == 20 and result["feature_dim"] == 512
    assert main(["probe.features=mean"]) == 2  # a config error is reported, not raised


def test_config_rejects_missing_backbone_file(tmp_path):
    with pytest.raises(ConfigError, match="backbone"):
        load_eval_config(None, [f"backbone={os.path.join(tmp_path, 'nope.safetensors')}"])


# ------------------------------------------------------------------------------------- review findings 5-8, 15
_SMALL = ["data.num_train=8", "data.num_val=4", "data.num_workers=0", "probe.max_iter=5", "probe.knn_k=0",
          "probe.weight_decays=[0.1]"]


def _tmp_leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp_")]


def test_cli_out_folder_gets_the_default_name(tmp_path):
    # out= an existing folder, or a new one ending in '/', used to crash in os.replace after the whole evaluation
    from dtfast.evaluate import main

    (tmp_path / "existing").mkdir()
    assert main(["backbone=random", "seed=3", f"out={tmp_path / 'existing'}", *_SMALL]) == 0
    assert json.loads((tmp_path / "existing" / "random-resnet18-seed3.eval.json").read_text())["num_train"] == 8
    assert main(["backbone=random", f"out={tmp_path / 'new' / 'sub'}/", *_SMALL]) == 0
    assert (tmp_path / "new" / "sub" / "random-resnet18-seed0.eval.json").is_file()
    assert not _tmp_leftovers(tmp_path)


def test_out_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="'out'.*a_file is a file"):
        load_eval_config(None, ["backbone=random", f"out={tmp_path / 'a_file' / 'eval.json'}"])
    (tmp_path / "dir" / "random-resnet18-seed0.eval.json").mkdir(parents=True)  # the resolved name is a folder
    with pytest.raises(ConfigError, match="'out'.*is a folder"):
        load_eval_config(None, ["backbone=random", f"out={tmp_path / 'dir'}"])


def test_atomic_writers_leave_no_temp_file_on_failure(tmp_path, monkeypatch):
    from dtfast import _files
    from dtfast.train.checkpoint import atomic_write_text

    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):  # os.replace onto a folder
        atomic_write_text(str(tmp_path / "folder"), "text")
    assert not _tmp_leftovers(tmp_path)

    def broken_chmod(path, umask=None):
        raise PermissionError("chmod refused")

    monkeypatch.setattr(_files, "set_default_mode", broken_chmod)
    with pytest.raises(PermissionError):
        _files.mkstemp(str(tmp_path), ".tmp_")
    with pytest.raises(PermissionError):
        _files.mkdtemp(str(tmp_path), ".tmp_")
    assert not _tmp_leftovers(tmp_path)


def _save_backbone(model_or_state, path, arch=None):
    from safetensors.torch import save_file

    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"arch": arch} if arch else None)
    return str(path)


def test_default_out_is_per_backbone_file(tmp_path):
    # two backbones of one run used to share <folder>/eval.json, the second evaluation replacing the first's
    from dtfast.eval.config import out_path
    from dtfast.evaluate import main

    model = load_backbone("resnet18", "random", seed=0)
    step = _save_backbone(model, tmp_path / "backbone_step_10.safetensors", arch="resnet18")
    final = _save_backbone(model, tmp_path / "backbone.safetensors", arch="resnet18")
    assert out_path(load_eval_config(None, [f"backbone={step}"])) == str(tmp_path / "backbone_step_10.eval.json")
    assert out_path(load_eval_config(None, [f"backbone={final}"])) == str(tmp_path / "backbone.eval.json")
    assert out_path(load_eval_config(None, ["backbone=random", "arch=resnet34", "seed=2"])) == \
        "random-resnet34-seed2.eval.json"
    assert out_path(load_eval_config(None, ["backbone=timm", "arch=resnet50"])) == "timm-resnet50.eval.json"
    assert main([f"backbone={step}", *_SMALL]) == 0
    assert main([f"backbone={final}", *_SMALL]) == 0
    assert json.loads((tmp_path / "backbone_step_10.eval.json").read_text())["backbone"] == step
    assert json.loads((tmp_path / "backbone.eval.json").read_text())["backbone"] == final
    assert not (tmp_path / "eval.json").exists()


def test_standardise_one_row_is_finite():
    x = torch.randn(1, 4)
    train, other = standardise(x, torch.randn(3, 4))
    assert torch.isfinite(train).all() and torch.isfinite(other).all()
    many = torch.randn(10, 4, dtype=torch.float64)  # two or more rows: still the unbiased std, as before
    assert torch.allclose(standardise(many)[0].double(), (many - many.mean(0)) / many.std(0), atol=1e-6)


def test_linear_probe_with_too_few_images_says_so(tmp_path):
    from PIL import Image

    from dtfast.eval.runner import ProbeDataError, load_probe_data
    from dtfast.evaluate import main

    x, y = torch.randn(2, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="2 train images; it needs at least 3"):
        linear_probe(x, y, x, y, weight_decays=(0.1,), max_iter=5)
    assert linear_probe(torch.randn(3, 8), torch.tensor([0, 1, 0]), x, y, weight_decays=(0.1,), max_iter=5)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / label / "0.png")
    cfg = load_eval_config(None, [f"data.root={tmp_path}", "data.num_workers=0"])
    with pytest.raises(ProbeDataError, match=f"{tmp_path / 'train'} has 2 images; the linear probe needs at least 3"):
        load_probe_data(cfg)
    assert main(["backbone=random", f"data.root={tmp_path}", "data.num_workers=0",
                 f"out={tmp_path / 'e.json'}"]) == 2
    with pytest.raises(ConfigError, match="data.num_train"):
        load_eval_config(None, ["data.num_train=2"])


def test_backbone_file_errors_name_the_file_and_the_fix(tmp_path):
    from dtfast.eval.features import BackboneError

    r18 = load_backbone("resnet18", "random", seed=0)
    plain = _save_backbone(r18, tmp_path / "r18.safetensors")  # no metadata: only the shapes can tell
    with pytest.raises(BackboneError) as info:
        load_backbone("resnet50", plain)
    message = str(info.value)
    assert plain in message and "'resnet50'" in message and "\n" not in message
    assert "layer1.0.conv1.weight has shape [64, 64, 3, 3] in the file, [64, 64, 1, 1] in the model" in message

    tagged = _save_backbone(r18, tmp_path / "tagged.safetensors", arch="resnet18")
    with pytest.raises(BackboneError, match="exported for arch 'resnet18'.*arch='resnet50'"):
        load_backbone("resnet50", tagged)

    torch.save(r18.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(BackboneError, match=f"{tmp_path / 'r18.pt'}.*not a safetensors file"):
        load_backbone("resnet18", str(tmp_path / "r18.pt"))

    checkpoint = _save_backbone({**{f"backbone.{k}": v for k, v in r18.state_dict().items()},
                                 "regressor.w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(BackboneError, match="training checkpoint.*train.export_only=true"):
        load_backbone("resnet18", checkpoint)


def test_arch_defaults_to_the_files_and_a_different_one_is_refused(tmp_path):
    from dtfast.evaluate import main

    path = _save_backbone({"w": torch.zeros(1)}, tmp_path / "b.safetensors", arch="resnet34")
    assert load_eval_config(None, [f"backbone={path}"]).arch == "resnet34"
    assert load_eval_config(None, [f"backbone={path}", "arch=resnet34"]).arch == "resnet34"
    with pytest.raises(ConfigError, match="config key 'arch'.*'resnet34'.*arch='resnet18'"):
        load_eval_config(None, [f"backbone={path}", "arch=resnet18"])
    assert load_eval_config(None, ["backbone=random"]).arch == "resnet18"
    no_meta = _save_backbone({"w": torch.zeros(1)}, tmp_path / "c.safetensors")
    assert load_eval_config(None, [f"backbone={no_meta}"]).arch == "resnet18"
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="bad.safetensors.*not a safetensors file"):
        load_eval_config(None, [f"backbone={tmp_path / 'bad.safetensors'}"])
    assert main([f"backbone={path}", "arch=resnet18"]) == 2


@pytest.mark.parametrize("override,key", [("data.num_classes=21", "data.num_classes"),
                                          ("data.num_classes=0", "data.num_classes"),
                                          ("data.num_classes=1", "data.num_classes"),
                                          ("data.image_size=-1", "data.image_size"),
                                          ("data.num_workers=-1", "data.num_workers"),
                                          ("device=cuda", "device")])
def test_config_ranges_name_the_key(override, key, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_eval_config(None, ["backbone=random", override])


# ------------------------------------------------------------------------------- review of the eval numerics
def _knn_float64(train_x, train_y, val_x, val_y, k, t):
    """Weighted k-NN in float64 with weights relative to the best neighbour (no overflow at any T)."""
    train_s, val_s = standardise(train_x, val_x)
    train_s, val_s = F.normalize(train_s.double(), dim=1), F.normalize(val_s.double(), dim=1)
    sims, idx = (val_s @ train_s.T).topk(k, dim=1)
    votes = torch.zeros(val_s.shape[0], int(train_y.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], ((sims - sims[:, :1]) / t).exp())
    return float((votes.argmax(1) == val_y).double().mean())


@pytest.mark.parametrize("temperature", [0.07, 0.005, 0.001])
def test_knn_small_temperature_does_not_overflow(temperature):
    # exp(sim / T) in float32 overflowed for T < ~0.011: every vote inf, every class tied, the lowest one picked
    x, y = _blobs(200, 16, 5, 0.6, 0)
    xv, yv = _blobs(100, 16, 5, 0.6, 1)
    got = knn_top1(x, y, xv, yv, k=10, temperature=temperature)
    assert got == pytest.approx(_knn_float64(x, y, xv, yv, 10, temperature), abs=0.011)  # at most one tie apart
    assert got > 0.4  # chance is 0.2


def test_standardise_constant_train_feature_is_zero_everywhere():
    # a feature constant on train (a dead channel) was divided by eps=1e-6: val deviations became ~1e4
    train = torch.randn(50, 4)
    train[:, 2] = 0.25
    val = torch.randn(7, 4)
    train_s, val_s = standardise(train, val)
    assert (train_s[:, 2] == 0).all() and (val_s[:, 2] == 0).all()
    assert val_s.abs().max() < 100


def test_pooled_features_keeps_the_callers_mode():
    model = load_backbone("resnet18", "random").train()
    pooled_features(model, torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert model.training


def _folder(root, splits):
    """root/<split>/<class>/<i>.png for {split: {class: count}}, each image a distinct colour."""
    from PIL import Image

    colour = 0
    for split, classes in splits.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour += 1
                Image.new("RGB", (12, 12), (colour % 256, colour // 256, 7)).save(root / split / name / f"{i}.png")
    return root


def test_data_mistakes_are_one_line_errors(tmp_path, capsys):
    from dtfast.evaluate import main

    args = ["backbone=random", "data.num_workers=0", "probe.knn_k=0", "probe.max_iter=5", "probe.weight_decays=[0.1]"]
    cases = {
        "no_val": ({"train": {"a": 4, "b": 4}}, "missing: \\['val'\\]"),
        "missing_class": ({"train": {"a": 4, "b": 4}, "val": {"a": 2}}, "different classes"),
        "one_class": ({"train": {"a": 6}, "val": {"a": 2}}, "needs 2 or more classes"),
    }
    for name, (layout, message) in cases.items():
        root = _folder(tmp_path / name, layout)
        assert main([*args, f"data.root={root}", f"out={tmp_path / name}.json"]) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(message, err), (name, err)


def test_an_undecodable_image_is_an_error_not_a_substitute(tmp_path, capsys):
    # the probe used to score the next file (perhaps of another class) in its place
    from dtfast.evaluate import main

    root = _folder(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    (root / "val" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for workers in (0, 1):
        assert main(["backbone=random", f"data.root={root}", f"data.num_workers={workers}", "probe.knn_k=0",
                     "probe.max_iter=5", f"out={tmp_path / 'e.json'}"]) == 2
        err = capsys.readouterr().err
        assert "cannot decode" in err and "1.png" in err and "does not skip" in err and "Traceback" not in err, err


def test_val_images_identical_to_train_ones_are_counted(tmp_path):
    from dtfast.eval.runner import count_shared_images, load_probe_data

    train = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    val = torch.cat([train[[1, 3]], torch.randint(0, 255, (3, 3, 4, 4), dtype=torch.uint8)])
    assert count_shared_images(train, val) == 2
    root = _folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {}})
    import shutil

    shutil.copytree(root / "train", root / "val")  # val is a copy of train
    cfg = load_eval_config(None, [f"data.root={root}", "data.num_workers=0"])
    with pytest.warns(UserWarning, match="6 val image.*pixel-identical to train"):
        data = load_probe_data(cfg)
    assert data.shared_images == 6


def test_rerun_with_other_data_does_not_replace_the_results(tmp_path):
    from dtfast.evaluate import main

    out = tmp_path / "e.json"
    assert main(["backbone=random", f"out={out}", *_SMALL]) == 0
    first = json.loads(out.read_text())
    assert main(["backbone=random", f"out={out}", *_SMALL]) == 0  # the same settings: a rerun replaces it
    assert main(["backbone=random", f"out={out}", *_SMALL, "data.seed=1"]) == 2
    assert json.loads(out.read_text())["config"] == first["config"]
    with pytest.raises(ConfigError, match="other settings.*data.seed: 0 -> 1.*overwrite=true"):
        load_eval_config(None, ["backbone=random", f"out={out}", *_SMALL, "data.seed=1"])
    assert main(["backbone=random", f"out={out}", *_SMALL, "data.seed=1", "overwrite=true"]) == 0
    assert json.loads(out.read_text())["config"]["data"]["seed"] == 1


def test_image_size_defaults_to_the_exported_training_resolution(tmp_path):
    from safetensors.torch import save_file

    model = load_backbone("resnet18", "random")
    path = str(tmp_path / "b.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={"arch": "resnet18", "step": "5", "image_size": "48"})
    assert load_eval_config(None, [f"backbone={path}"]).data.image_size == 48
    with pytest.warns(UserWarning, match=r"trained at 48px.*evaluated at 32px \(data.image_size=32\)"):
        assert load_eval_config(None, [f"backbone={path}", "data.image_size=32"]).data.image_size == 32
    assert load_eval_config(None, ["backbone=random"]).data.image_size == 32


def test_a_non_square_training_crop_is_probed_at_that_crop(tmp_path):
    from safetensors.torch import save_file

    from dtfast.eval.runner import load_probe_data

    model = load_backbone("resnet18", "random")
    path = str(tmp_path / "b.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={"arch": "resnet18", "step": "5", "image_size": "32x48"})
    cfg = load_eval_config(None, [f"backbone={path}", *_SMALL])
    assert (cfg.data.image_size, cfg.data.image_width, cfg.data.crop_hw) == (32, 48, (32, 48))
    assert load_probe_data(cfg).train_images.shape == (8, 3, 32, 48)
    with pytest.warns(UserWarning, match=r"trained at 32x48px.*evaluated at 32px \(data.image_size=32\).*to use 32x48"):
        assert load_eval_config(None, [f"backbone={path}", "data.image_size=32"]).data.crop_hw == (32, 32)
    with pytest.raises(ConfigError, match="'data.image_width' = 48 needs data.image_size"):
        load_eval_config(None, [f"backbone={path}", "data.image_width=48"])
    # a folder's images are resized to cover the crop and centre-cropped, as in training
    root = _folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    folder = load_eval_config(None, [f"data.root={root}", "data.num_workers=0", "data.image_size=16",
                                     "data.image_width=24"])
    assert load_probe_data(folder).val_images.shape == (2, 3, 16, 24)
    # the same crop spelled square (width == height) is the square crop
    square = load_eval_config(None, ["data.image_size=24", "data.image_width=24"])
    assert (square.data.image_width, square.data.crop_hw) == (0, (24, 24))


def test_results_file_older_than_image_width_is_replaced_by_the_same_evaluation(tmp_path):
    from dtfast.evaluate import main

    out = tmp_path / "e.json"
    assert main(["backbone=random", f"out={out}", *_SMALL]) == 0
    result = json.loads(out.read_text())
    del result["config"]["data"]["image_width"]  # as written before the key existed (it meant square)
    out.write_text(json.dumps(result))
    assert main(["backbone=random", f"out={out}", *_SMALL]) == 0
    with pytest.raises(ConfigError, match="data.image_width: 0 -> 48"):
        load_eval_config(None, ["backbone=random", f"out={out}", *_SMALL, "data.image_width=48",
                                "data.image_size=32"])


def test_nan_weights_and_archs_without_a_stride_32_map_fail_before_the_data(tmp_path, capsys, monkeypatch):
    from dtfast.eval import runner
    from dtfast.evaluate import main

    def no_data(cfg):
        raise AssertionError("the data was decoded before the backbone was checked")

    monkeypatch.setattr(runner, "load_probe_data", no_data)
    state = load_backbone("resnet18", "random").state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = _save_backbone(state, tmp_path / "nan.safetensors", arch="resnet18")
    assert main([f"backbone={path}", *_SMALL]) == 2
    assert "NaN or inf" in capsys.readouterr().err
    assert main(["backbone=random", "arch=vit_tiny_patch16_224", *_SMALL]) == 2
    err = capsys.readouterr().err
    assert "no feature map at stride" in err and "Traceback" not in err
