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


def test_quick_recipe_reruns_continue_and_other_arguments_are_refused(tmp_path):
    """One seed of the quick recipe for real (about a minute); a rerun with the same arguments reuses every step,
    one with other arguments is refused instead of labelling the old numbers with the new arguments."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "small_scale.py"), "--preset", "quick", "--seeds", "0",
           "--out", str(tmp_path)]

    def recipe(*extra):
        return subprocess.run([*cmd, *extra], env=env, cwd=ROOT, timeout=900, capture_output=True, text=True)

    first = recipe()
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert all(set(seeds) == {"0"} for seeds in record["per_seed"].values())
    again = recipe()
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "results.json").read_text())
    assert rerun["per_seed"] == record["per_seed"]
    assert "distillation (made by an earlier run)" in rerun["timings_s"] and "distillation" not in rerun["timings_s"]
    other = recipe("--timestep", "150")
    assert other.returncode == 2 and "other settings" in other.stderr and "teacher.timestep=50" in other.stderr
    assert "Traceback" not in other.stderr
    missing = recipe("--teacher", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_step_records_and_logged_time(tmp_path):
    from recipes.small_scale import RecipeError, claim_step, logged_seconds

    claim_step(str(tmp_path / "a"), {"keys": ["x=1"]})
    claim_step(str(tmp_path / "a"), {"keys": ["x=1"]})  # the same: continue
    with pytest.raises(RecipeError, match="other settings.*keys"):
        claim_step(str(tmp_path / "a"), {"keys": ["x=2"]})
    metrics = tmp_path / "metrics.jsonl"  # two sessions: elapsed_s restarts at a resume
    metrics.write_text("".join(json.dumps({"step": s, "elapsed_s": e}) + "\n"
                               for s, e in [(1, 10.0), (2, 20.0), (3, 5.0), (4, 12.0)]))
    assert logged_seconds(str(metrics)) == 32.0


def test_control_of_a_given_teacher_has_its_architecture_and_scheduler(tmp_path):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from dtfast.teachers.build import export_teacher
    from recipes.small_scale import parse_args, random_teacher

    torch.manual_seed(123)  # not the control's init seed (0): its weights must differ from these
    unet = UNet2DModel(sample_size=32, block_out_channels=(16, 24, 24, 32, 32, 32), norm_num_groups=8,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 6, up_block_types=("UpBlock2D",) * 6)
    given = str(tmp_path / "given")
    export_teacher(unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), given, info={"image_size": 32})
    args = parse_args(["--preset", "quick", "--teacher", given, "--out", str(tmp_path / "out")])
    control = random_teacher(args, given)
    config = json.loads(open(os.path.join(control, "unet", "config.json")).read())
    assert config["block_out_channels"] == [16, 24, 24, 32, 32, 32] and config["norm_num_groups"] == 8
    scheduler = json.loads(open(os.path.join(control, "scheduler", "scheduler_config.json")).read())
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2"
    weights = UNet2DModel.from_pretrained(os.path.join(control, "unet")).state_dict()
    assert not torch.equal(weights["conv_in.weight"], unet.state_dict()["conv_in.weight"])  # random, not a copy


def test_ship_teacher_checks_before_it_replaces_and_records_the_real_command(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from recipes.ship_teacher import main as ship

    source = tmp_path / "run" / "teacher"
    shutil.copytree(os.path.join(ROOT, "dtfast", "assets", "teacher_tiny32"), source)
    assets = tmp_path / "assets"
    assert ship([str(source), "--assets", str(assets)]) == 0
    readme = (assets / "teacher_tiny32" / "README.md").read_text()
    assert "model.block_out_channels=[16,32,32,64,64,64]" in readme and "train.max_steps=3000" in readme
    assert "linear betas 0.0001..0.02, 1000 steps" in readme and "default teacher" in readme
    assert "embedded procedural image set" in readme
    shipped = sorted(os.listdir(assets / "teacher_tiny32"))
    # a teacher whose fp16 copy overflows is refused, and the shipped one stays as it was
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    state["conv_in.weight"][0, 0, 0, 0] = 1e6
    save_file(state, str(weights))
    assert ship([str(source), "--assets", str(assets)]) == 2
    assert "not finite in fp16" in capsys.readouterr().err
    assert sorted(os.listdir(assets / "teacher_tiny32")) == shipped and not list(assets.glob(".tmp_*"))
    assert ship([str(source.parent), "--assets", str(assets)]) == 2  # the run folder, not its teacher
    assert "is a dtfast.train_teacher run folder: ship its teacher" in capsys.readouterr().err


def test_ship_teacher_takes_a_non_square_teacher(tmp_path):
    import shutil

    from recipes.ship_teacher import main as ship

    source = tmp_path / "run" / "teacher"
    shutil.copytree(os.path.join(ROOT, "dtfast", "assets", "teacher_tiny32"), source)
    info = json.loads((source / "dtfast_teacher.json").read_text())
    info["image_size"] = "32x64"  # as dtfast.train_teacher data.image_width=64 records it
    (source / "dtfast_teacher.json").write_text(json.dumps(info))
    assert ship([str(source), "--assets", str(tmp_path / "assets"), "--name", "teacher_wide"]) == 0
    readme = (tmp_path / "assets" / "teacher_wide" / "README.md").read_text()
    assert "at 32x64 for" in readme and "data.image_size=32 data.image_width=64 teacher.timestep=50" in readme


def test_glyph_folder_refuses_to_mix_with_older_images(tmp_path, capsys):
    from recipes.make_glyph_folder import main as glyphs

    out = str(tmp_path / "g")
    assert glyphs([out, "--train", "20", "--val", "10"]) == 0
    assert glyphs([out, "--train", "10", "--val", "10", "--size", "48"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert glyphs([out, "--train", "10", "--val", "10", "--size", "48", "--overwrite"]) == 0
    from PIL import Image

    files = [p for p in (tmp_path / "g" / "train").rglob("*.png")]
    assert len(files) == 10 and {Image.open(p).size for p in files} == {(48, 48)}


def test_older_folders_are_refused_and_plain_diffusers_teachers_are_identified(tmp_path):
    import shutil

    from recipes.small_scale import RecipeError, claim_step, teacher_identity

    old = tmp_path / "old_run"
    old.mkdir()
    (old / "backbone.safetensors").write_bytes(b"x")  # an older recipe's output, no record of its settings
    with pytest.raises(RecipeError, match="without a record of its settings"):
        claim_step(str(old), {"keys": []})
    plain = tmp_path / "plain"  # a diffusers folder that dtfast did not write: no dtfast_teacher.json
    shutil.copytree(os.path.join(ROOT, "dtfast", "assets", "teacher_tiny32", "unet"), plain / "unet")
    first = teacher_identity(str(plain))
    assert first == teacher_identity(str(plain))
    weights = plain / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"")
    os.utime(weights, ns=(1, 1))
    assert teacher_identity(str(plain)) != first  # other weights (here: another time) are another teacher
