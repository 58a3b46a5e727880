"""Does DreamTeacher work? The small-scale proof, one command, <= 60 minutes on a 2-core CPU.

    python recipes/small_scale.py                      # the embedded procedural set
    python recipes/small_scale.py --data ROOT          # any labelled folder ROOT/{train,val}/<class>/<image>

Steps (each skipped when its output already exists, so an interrupted run continues where it stopped):
1. train one small DDPM teacher on the (unlabelled) train images: ``python -m dtfast.train_teacher``;
2. write a random-weight teacher of the SAME architecture (the control: same UNet, no knowledge);
3. for every seed: distil each teacher into a ResNet-18 with ``python -m dtfast.pretrain``, and train the same
   ResNet-18 with labels (the supervised upper bound);
4. linear probe (and k-NN) of the frozen pooled last-stage features of: random init, distilled from the random
   teacher, distilled from the trained teacher, supervised; mean and std over seeds.
Outputs in ``--out``: ``results.json``, ``results.md`` (the table), ``results.png``, and every run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recipes.report import ROWS, summarise, write_plot, write_table

# The teacher: the `tiny` layout (6 levels, attention at strides 16/32) at a quarter of its width cost.
TEACHER_MODEL = ["model.arch=tiny", "model.block_out_channels=[16,32,32,64,64,64]", "model.norm_num_groups=8"]

PRESETS = {
    # the real recipe, sized for <= 60 minutes on an idle 2-core CPU at 32x32
    "full": dict(teacher_steps=3000, teacher_batch=32, distill_steps=600, distill_batch=32, supervised_steps=1500,
                 supervised_batch=32, num_images=4096, num_train=4000, num_val=2000),
    # seconds: the CI check that the whole pipeline runs end to end
    "quick": dict(teacher_steps=4, teacher_batch=8, distill_steps=3, distill_batch=8, supervised_steps=3,
                  supervised_batch=8, num_images=64, num_train=60, num_val=40),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="labelled folder ROOT/{train,val}/<class>/<image>; empty = procedural")
    p.add_argument("--out", default="", help="output folder (default recipes/runs/<data name>)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--timestep", type=int, default=50, help="teacher timestep t (paper: 50 for in-domain data)")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="", help="use this trained teacher folder instead of training one")
    p.add_argument("--features", choices=("last", "all"), default="all", help="probe features (see dtfast.evaluate)")
    p.add_argument("--workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--supervised-lr", type=float, default=1e-3, help="peak learning rate of the supervised row")
    for key in PRESETS["full"]:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help="override the preset")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.out:
        name = os.path.basename(os.path.normpath(args.data)) if args.data else "procedural"
        args.out = os.path.join(ROOT, "recipes", "runs", name + ("" if args.preset == "full" else "_" + args.preset))
    return args


class RecipeError(RuntimeError):
    """A recipe step that cannot run as asked (its folder holds a run with other settings, a missing input)."""


STEP_KEY = "recipe_step.json"


def claim_step(folder: str, key: dict, key_file: str = "") -> None:
    """Record what a step runs with in ``folder/recipe_step.json`` before it runs, or check that an earlier record
    matches: a step whose output exists is skipped (an interrupted recipe continues), so a rerun with other
    arguments must not find and reuse, or resume, a run made with the old ones. A non-empty folder without a record
    (an older recipe's) is refused too: what made it is unknown. ``key_file``: where the record goes when not in
    ``folder`` (a folder replaced whole)."""
    path = key_file or os.path.join(folder, STEP_KEY)
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        if old != key:
            diffs = [f"{k}: {old.get(k)!r} -> {key.get(k)!r}" for k in sorted(set(old) | set(key))
                     if old.get(k) != key.get(k)]
            raise RecipeError(f"{folder} holds this step run with other settings ({'; '.join(diffs)[:600]}); rerun "
                              "with the same arguments to continue it, or use another --out (or delete the folder)")
        return
    if os.path.isdir(folder) and os.listdir(folder):
        raise RecipeError(f"{folder} holds a run without a record of its settings (made by an older version of "
                          "this recipe?): use another --out, or delete the folder to run the step again")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from dtfast.train.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(key, indent=1, sort_keys=True) + "\n")


def file_identity(path: str) -> str:
    """sha256 of a small file (a teacher's dtfast_teacher.json, a config): changes when the file is rewritten."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def teacher_identity(teacher: str) -> str:
    """What distinguishes one teacher folder's weights from another's: its dtfast_teacher.json (dtfast's exports),
    else the UNet's config and the size and time of its weight files (any diffusers folder)."""
    info = os.path.join(teacher, "dtfast_teacher.json")
    if os.path.isfile(info):
        return file_identity(info)
    from pathlib import Path

    from dtfast.teachers.loading import detect_layout

    _, model = detect_layout(Path(teacher))
    weights = sorted(str(p.relative_to(teacher)) + f":{p.stat().st_size}:{p.stat().st_mtime_ns}"
                     for p in Path(teacher).rglob("*") if p.suffix in (".safetensors", ".bin"))
    return file_identity(str(model / "config.json")) + "|" + ",".join(weights)


def run(cmd: list[str], log: str) -> None:
    """Run a dtfast command with its output teed into ``log``; fail loudly with the log's tail."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        with open(log) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")


def data_keys(args: argparse.Namespace) -> list[str]:
    if args.data:
        return [f"data.root={args.data}"]
    return ["data.root=", f"data.num_images={args.num_images}"]


def train_teacher(args: argparse.Namespace) -> str:
    out = os.path.join(args.out, "teacher")
    folder = os.path.join(out, "teacher")
    keys = [*TEACHER_MODEL, *data_keys(args), f"data.image_size={args.image_size}",
            f"train.max_steps={args.teacher_steps}", f"train.batch_size={args.teacher_batch}"]
    from dtfast.teacher_training.config import TeacherTrainConfig

    if args.teacher_steps < TeacherTrainConfig().train.warmup_steps:  # the default warm-up is longer than this run
        keys.append(f"train.warmup_steps={args.teacher_steps}")
    claim_step(out, {"step": "teacher", "keys": keys})
    if os.path.isfile(os.path.join(folder, "dtfast_teacher.json")):
        return folder
    run([sys.executable, "-m", "dtfast.train_teacher", f"out={out}", *keys, f"data.num_workers={args.workers}",
         "train.log_every=50", "train.save_every=250"],
        os.path.join(out, "log.txt"))
    return folder


def random_teacher(args: argparse.Namespace, teacher: str, seed: int = 0) -> str:
    """A teacher folder with the trained teacher's architecture and scheduler but random (init) weights: the
    recipe's own UNet, or with ``--teacher`` the given folder's UNet config and scheduler."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from dtfast.teacher_training.config import load_teacher_config
    from dtfast.teacher_training.trainer import build_scheduler, export_teacher, unet_config

    folder = os.path.join(args.out, "random_teacher")
    if args.teacher:
        from pathlib import Path

        from dtfast.teachers.loading import detect_layout, scheduler_folder

        layout, unet_folder = detect_layout(Path(teacher))
        if layout != "pixel":
            raise RecipeError(f"--teacher {teacher}: the random-teacher control is built for a pixel-space "
                              "UNet2DModel teacher; this one is a latent (Stable Diffusion) layout")
        unet_config_file = unet_folder / "config.json"
        source = {"teacher": os.path.abspath(teacher), "unet_config": file_identity(str(unet_config_file))}
    else:
        source = {"teacher_model": TEACHER_MODEL}
    claim_step(folder, {"step": "random teacher", "seed": seed, "image_size": args.image_size, **source},
               key_file=folder + "." + STEP_KEY)  # export_teacher replaces the folder whole
    if not os.path.isfile(os.path.join(folder, "dtfast_teacher.json")):
        torch.manual_seed(seed)
        if args.teacher:
            unet = UNet2DModel.from_config(UNet2DModel.load_config(str(unet_folder)))
            found = scheduler_folder(Path(teacher))
            scheduler = DDPMScheduler.from_pretrained(str(found)) if found else DDPMScheduler()
        else:
            cfg = load_teacher_config(None, [*TEACHER_MODEL, f"data.image_size={args.image_size}"])
            unet, scheduler = UNet2DModel(**unet_config(cfg)), build_scheduler(cfg)
        export_teacher(unet, scheduler, folder,
                       info={"random": True, "seed": seed, "image_size": args.image_size, "steps": 0, **source})
    return folder


def distil(args: argparse.Namespace, teacher: str, name: str, seed: int) -> str:
    out = os.path.join(args.out, f"{name}_s{seed}")
    backbone = os.path.join(out, "backbone.safetensors")
    keys = [f"teacher.pretrained={os.path.abspath(teacher)}", f"teacher.timestep={args.timestep}",
            f"student.arch={args.student}", *data_keys(args), f"data.image_size={args.image_size}",
            f"train.max_steps={args.distill_steps}", f"train.batch_size={args.distill_batch}", f"train.seed={seed}",
            f"train.warmup_steps={max(1, args.distill_steps // 10)}"]
    # the teacher's own record: a teacher trained again (other weights, same folder) is another distillation
    claim_step(out, {"step": "distillation", "keys": keys,
                     "teacher": teacher_identity(teacher)})
    if os.path.isfile(backbone):
        return backbone
    run([sys.executable, "-m", "dtfast.pretrain", f"out={out}", *keys, f"data.num_workers={args.workers}",
         "train.save_every=200", "train.log_every=50"],
        os.path.join(out, "log.txt"))
    return backbone


def supervised(args: argparse.Namespace, num_classes: int, seed: int) -> str:
    from dtfast.data import build_dataset
    from dtfast.eval.supervised import train_supervised

    out = os.path.join(args.out, f"supervised_s{seed}")
    claim_step(out, {"step": "supervised", "student": args.student, "data": data_keys(args),
                     "image_size": args.image_size, "steps": args.supervised_steps, "batch": args.supervised_batch,
                     "lr": args.supervised_lr, "seed": seed})
    if os.path.isfile(os.path.join(out, "done.json")):
        return os.path.join(out, "backbone.safetensors")
    # the seed is also the procedural set's content seed here: seeds 1, 2 train on other images than seed 0's
    # (the recipe's published rows were made so); a labelled --data folder is the same for every seed
    dataset = build_dataset(args.data or None, args.image_size, split="train", num_images=args.num_images,
                            seed=seed)
    return train_supervised(args.student, dataset, num_classes, out, steps=args.supervised_steps,
                            batch_size=args.supervised_batch, lr=args.supervised_lr, seed=seed,
                            num_workers=args.workers,
                            warmup_steps=max(1, args.supervised_steps // 10))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dtfast.eval.runner import ProbeDataError

    try:
        return _main(args, argv)
    except (RecipeError, ProbeDataError, FileNotFoundError, ValueError) as exc:  # the message names what is wrong
        print(f"recipes/small_scale.py: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.teacher:  # checked before any work (it is read only at the distillation step)
        from pathlib import Path

        from dtfast.teachers.loading import detect_layout

        if not os.path.isdir(args.teacher):
            raise RecipeError(f"--teacher {args.teacher}: no such folder (a teacher folder: dtfast.train_teacher "
                              "writes <out>/teacher)")
        detect_layout(Path(args.teacher))
    if args.data and not os.path.isdir(args.data):
        raise RecipeError(f"--data {args.data}: no such folder (expected ROOT/train/<class>/ and ROOT/val/<class>/)")
    os.makedirs(args.out, exist_ok=True)
    from dtfast.eval.config import load_eval_config
    from dtfast.eval.features import load_backbone
    from dtfast.eval.runner import evaluate_model, load_probe_data

    start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(key: str, fn, *a):
        t0 = time.perf_counter()
        value = fn(*a)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return value

    eval_cfg = load_eval_config(None, [f"arch={args.student}", f"data.root={args.data}",
                                       f"data.image_size={args.image_size}", f"data.num_train={args.num_train}",
                                       f"data.num_val={args.num_val}", f"data.num_workers={args.workers}",
                                       f"probe.features={args.features}"])
    data = timed("load probe data", load_probe_data, eval_cfg)
    earlier = 0.0  # the teacher's training time, when an earlier run of this recipe trained it (read from its log)
    if args.teacher:
        teacher = args.teacher
    else:
        folder = os.path.join(args.out, "teacher", "teacher")
        trained_before = os.path.isfile(os.path.join(folder, "dtfast_teacher.json"))
        teacher = timed("teacher training", train_teacher, args)
        if trained_before:
            earlier = logged_seconds(os.path.join(args.out, "teacher", "metrics.jsonl"))
            timings["teacher training (earlier run)"] = earlier
    control = random_teacher(args, teacher)
    command = " ".join(["recipes/small_scale.py", *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, dict[str, dict]] = {row: {} for row in ROWS}

    def evaluate(row: str, seed: int, path: str) -> None:
        """Probe one backbone; the result is cached next to it so that a restarted recipe does not redo it."""
        folder = os.path.dirname(path) if path != "random" else os.path.join(args.out, f"random_init_s{seed}")
        cache = os.path.join(folder, f"probe_{args.features}.json")
        key = {"data": data.description, "num_train": args.num_train, "num_val": args.num_val, "row": row,
               "student": args.student, "backbone": backbone_identity(path)}
        if os.path.isfile(cache):
            with open(cache) as fh:
                cached = json.load(fh)
            if cached.get("key") == key:
                results[row][str(seed)] = cached["result"]
        if str(seed) not in results[row]:
            model = load_backbone(args.student, path, seed)
            results[row][str(seed)] = timed("evaluation", evaluate_model, model, data, eval_cfg)
            os.makedirs(folder, exist_ok=True)
            with open(cache, "w") as fh:
                json.dump({"key": key, "result": results[row][str(seed)]}, fh, indent=2)
        r = results[row][str(seed)]
        print(f"[recipe] {row:<28} seed {seed}: linear {100 * r['linear_top1']:.2f}%  "
              f"k-NN {100 * r.get('knn_top1', float('nan')):.2f}%", flush=True)

    def label(step: str, output: str) -> str:
        """The timing key of a step: steps whose output an earlier run made are counted apart (they took ~0 s)."""
        return f"{step} (made by an earlier run)" if os.path.isfile(os.path.join(args.out, output)) else step

    for seed in args.seeds:  # one seed at a time: the table is rewritten after each, so partial runs report
        evaluate("random init", seed, "random")
        for row, name, source in (("distilled, trained teacher", "distill_trained", teacher),
                                  ("distilled, random teacher", "distill_random", control)):
            step = label("distillation", os.path.join(f"{name}_s{seed}", "backbone.safetensors"))
            evaluate(row, seed, timed(step, distil, args, source, name, seed))
        step = label("supervised", os.path.join(f"supervised_s{seed}", "done.json"))
        evaluate("supervised (upper bound)", seed, timed(step, supervised, args, data.num_classes, seed))
        timings["total"] = time.perf_counter() - start + earlier
        record = {"command": command, "machine": machine(), "args": vars(args), "teacher": teacher,
                  "data": data.description, "summary": summarise(results), "per_seed": results,
                  "timings_s": timings, "complete": seed == args.seeds[-1]}
        with open(os.path.join(args.out, "results.json"), "w") as fh:
            json.dump(record, fh, indent=2, default=str)
        write_table(record, os.path.join(args.out, "results.md"))
        write_plot(record, os.path.join(args.out, "results.png"))
    with open(os.path.join(args.out, "results.md")) as fh:
        print(fh.read())
    return 0


def backbone_identity(path: str) -> str:
    """What a probe result was computed on: the backbone file's size, modification time and recorded step (a
    backbone trained again in the same place is another one); "random" for the random init."""
    if path == "random":
        return "random"
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        step = (fh.metadata() or {}).get("step", "?")
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}:step {step}"


def logged_seconds(metrics: str) -> float:
    """The training time a dtfast metrics.jsonl logged, summed over its sessions: ``elapsed_s`` restarts at 0 when a
    run is resumed, so each drop closes a session (0 if there is nothing logged)."""
    if not os.path.isfile(metrics):
        return 0.0
    total, last = 0.0, 0.0
    with open(metrics) as fh:
        for line in fh:
            if not line.strip():
                continue
            elapsed = float(json.loads(line).get("elapsed_s", 0.0))
            if elapsed < last:
                total += last
            last = elapsed
    return total + last


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {platform.system()}"


if __name__ == "__main__":
    sys.exit(main())
