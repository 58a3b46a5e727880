"""Smoke tests of the benchmark scripts the GPU check runs that have no other test: optim_bench.py and
data_bench.py, on CPU at toy sizes (a broken script would otherwise first fail on a lent GPU machine)."""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@functools.cache
def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_optim_bench_rows(capsys):
    bench = load("optim_bench")
    rows = "dtfast Lamb, per parameter;dtfast Lamb, foreach;torch AdamW (foreach)"
    assert bench.main(["--arch", "resnet18", "--width", "16", "--warmup", "1", "--steps", "2", "--rows", rows,
                       "--no-record"]) == 0
    out = capsys.readouterr().out
    for name in rows.split(";"):
        assert f"| {name} |" in out, out
    assert "FAILED" not in out
    with pytest.raises(SystemExit):  # a row name that matches nothing is an error, not an empty run
        bench.main(["--rows", "torch AdamW", "--no-record"])
    assert "no row(s) ['torch AdamW'] here" in capsys.readouterr().err


def test_data_bench_cpu_backends(tmp_path, monkeypatch, capsys):
    bench = load("data_bench")
    out_file = tmp_path / "data_bench.jsonl"
    monkeypatch.setattr(sys, "argv", ["data_bench.py", "--num-images", "16", "--image-size", "32",
                                      "--image-width", "64", "--batch-size", "4", "--threads", "1", "--steps", "2",
                                      "--warmup", "1", "--backends", "torch", "--out", str(out_file)])
    bench.main()
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["torch"] and rows[0]["images_per_s"] > 0
    assert (rows[0]["image_size"], rows[0]["image_width"]) == (32, 64)
