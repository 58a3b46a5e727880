import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recipes.report import ROWS, summarise, write_plot, write_table  # noqa: E402


def _results(means, spread=0.01):
    return {row: {str(seed): {"linear_top1": means[row] + spread * (seed - 1), "knn_top1": means[row]}
                  for seed in range(3)} for row in ROWS}


def test_acceptance_needs_a_margin_of_three_std():
    means = dict(zip(ROWS, (0.20, 0.25, 0.40, 0.80)))
    summary = summarise(_results(means))  # std over seeds = 1 point
    assert [a["passes"] for a in summary["acceptance"]] == [True, True]
    assert summary["rows"]["random init"]["linear_top1"]["mean"] == pytest.approx(20.0)
    assert summary["rows"]["random init"]["linear_top1"]["std"] == pytest.approx(1.0)
    close = dict(zip(ROWS, (0.20, 0.38, 0.40, 0.80)))  # 2 points = 2 std from the random teacher: not enough
    assert [a["passes"] for a in summarise(_results(close))["acceptance"]] == [True, False]
    worse = dict(zip(ROWS, (0.50, 0.25, 0.40, 0.80)))
    assert summarise(_results(worse))["acceptance"][0]["passes"] is False


def test_table_and_plot_are_written(tmp_path):
    record = {"data": "test", "args": {"student": "resnet18", "features": "last", "seeds": [0, 1, 2]},
              "summary": summarise(_results(dict(zip(ROWS, (0.2, 0.25, 0.4, 0.8))))), "machine": "here",
              "timings_s": {"total": 60.0}, "command": "recipes/small_scale.py"}
    write_table(record, str(tmp_path / "t.md"))
    write_plot(record, str(tmp_path / "t.png"))
    table = (tmp_path / "t.md").read_text()
    assert "| distilled, trained teacher | 40.00 ± 1.00 |" in table and table.count("PASS") == 2
    assert (tmp_path / "t.png").stat().st_size > 1000


@pytest.mark.slow
def test_quick_recipe_runs_end_to_end(tmp_path):
    """The whole recipe at toy size (a few minutes on a 2-core CPU): every row is produced for every seed."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "small_scale.py"), "--preset", "quick",
                    "--seeds", "0", "1", "--out", str(tmp_path)], check=True, env=env, cwd=ROOT, timeout=1800)
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["per_seed"]) == set(ROWS)
    assert all(set(seeds) == {"0", "1"} for seeds in record["per_seed"].values())
    assert (tmp_path / "results.png").is_file() and (tmp_path / "results.md").is_file()
    assert (tmp_path / "teacher" / "teacher" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
