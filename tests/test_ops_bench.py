"""Smoke tests of benchmarks/loss_bench.py (its main function on tiny shapes, recording into a temporary folder)
and benchmarks/loss_host_overhead.py."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("loss_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_bench_quick_run_records_a_row(tmp_path, capsys):
    bench = load_bench()
    record = bench.main(["--quick", "--backends", "torch,cpu", "--repeats", "1", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "byte floor" in out and "torch (eager reference)" in out
    row = record["results"]["torch (eager reference)"]
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["saved_MB"] > 0
    assert record["copy_GBps"] > 0 and record["floor_ms"]["fwd_bwd"] > 0
    lines = (tmp_path / "loss_bench.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["commit"] == record["commit"]
    assert "| byte floor |" in (tmp_path / "loss_bench.md").read_text()


def test_loss_bench_unknown_backend_is_an_error(tmp_path):
    bench = load_bench()
    with pytest.raises(SystemExit, match=r"unknown \['foo'\]"):
        bench.main(["--quick", "--backends", "torch,foo", "--repeats", "1", "--results-dir", str(tmp_path)])
    assert not (tmp_path / "loss_bench.jsonl").exists()


def test_loss_bench_cuda_bwd_rounds_rows(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    for bad in ("0", "2,x", "65"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--cuda-bwd-rounds", bad])
    assert "1..64" in capsys.readouterr().err
    assert bench.parse_args(["--cuda-bwd-rounds", "1, 8"]).cuda_bwd_rounds == [1, 8]
    # on CPU the rows are named as not run
    record = bench.main(["--quick", "--backends", "torch", "--repeats", "1", "--cuda-bwd-rounds", "4",
                         "--no-record"])
    assert record["results"]["cuda (dtfast._C), bwd rounds"].startswith("--cuda-bwd-rounds needs --device cuda")
    # the variable is set for a row's forward and backward only, and restored after
    monkeypatch.setenv("DTFAST_CUDA_BWD_ROUNDS", "3")
    with bench.cuda_bwd_rounds(8):
        assert bench.os.environ["DTFAST_CUDA_BWD_ROUNDS"] == "8"
    assert bench.os.environ["DTFAST_CUDA_BWD_ROUNDS"] == "3"
    monkeypatch.delenv("DTFAST_CUDA_BWD_ROUNDS")
    with bench.cuda_bwd_rounds(8):
        pass
    assert "DTFAST_CUDA_BWD_ROUNDS" not in bench.os.environ


def test_loss_host_overhead_smoke(monkeypatch, capsys):
    """benchmarks/loss_host_overhead.py on tiny maps: every row measured, the Triton kernels restored afterwards."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend takes CPU tensors only when interpreting
    spec = importlib.util.spec_from_file_location("loss_host_overhead", BENCH.parent / "loss_host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from triton.runtime.jit import KernelInterface

    from dtfast.ops._backends import triton_kernels

    threads = torch.get_num_threads()
    try:
        record = module.main(["--levels", "8x4x4,16x2x2", "--iters", "2", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert set(record["us_per_call_best"]) == {"kernels fwd", "kernels bwd", "loss fwd", "loss bwd", "loss fwd+bwd",
                                               "custom op fwd+bwd"}
    assert all(v > 0 for v in record["us_per_call_best"].values())
    assert record["stubbed_launches"]["_fwd_level_kernel"] > 0
    kern = triton_kernels()
    assert all(isinstance(getattr(kern, name), KernelInterface) for name in record["stubbed_launches"])
    assert "| loss fwd+bwd |" in capsys.readouterr().out
