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
