"""Smoke test of benchmarks/loss_bench.py: its main function on tiny shapes, recording into a temporary folder."""

import importlib.util
import json
from pathlib import Path

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
