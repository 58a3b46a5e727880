"""Copy a trained teacher folder into ``dtfast/assets/`` (fp16 weights, a few MB) with a README.

    python recipes/ship_teacher.py recipes/runs/procedural/teacher/teacher [--name teacher_tiny32]

The README records the exact commands that produced the teacher (from its ``dtfast_teacher.json``) and how to
use it. The copy is checked: ``build_teacher(pretrained=copy)`` gives the same features as the original (to fp16
rounding) for the same images and noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

README = """# {name}: {title}

A small pixel-space DDPM (diffusers `UNet2DModel`, widths {widths}, {params:.2f}M parameters, fp16 weights, EMA)
trained on {data} at {hw} for {steps} steps of {batch} images. Use it at **{hw}**
(`{size_keys}`; any multiple of 32 works convolutionally, but it has only seen {hw} images) and
**t = 50** (the recipe's `teacher.timestep`; the DreamTeacher choice for small in-domain data).

    python -m dtfast.pretrain teacher.arch=embedded:{name} {size_keys} teacher.timestep=50
    python -m dtfast.pretrain teacher.pretrained={rel} {size_keys} teacher.timestep=50   # the same
{default}
Produced by (from a clean checkout, on {machine}):

    python -m dtfast.train_teacher {overrides}
    python recipes/ship_teacher.py <out>/teacher --name {name}

(the `dtfast.train_teacher` keys are every training setting that differs from its defaults, from
`dtfast_teacher.json`; `recipes/small_scale.py` runs this step for the embedded procedural set.)

Layout: `unet/` (config.json + diffusion_pytorch_model.safetensors), `scheduler/` (DDPMScheduler: {schedule}),
`dtfast_teacher.json` (the full training config).
"""

DEFAULT_TEACHER = """
It is the default teacher of `python -m dtfast.pretrain` (`teacher.arch=embedded:{name}`, 32x32, t = 50), so the
main job distils a trained model out of the box. What it is worth: `recipes/RESULTS.md` (the small-scale proof).
"""

# operational keys: they do not change the teacher
NOT_RECORDED = {"out", "device", "data.num_workers", "train.log_every", "train.save_every", "train.keep_last",
                "train.resume", "train.max_minutes"}


class ShipError(RuntimeError):
    """A source folder that cannot be shipped, or a copy that fails its check; nothing was replaced."""


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def training_overrides(config: dict) -> list[str]:
    """``key=value`` for every training setting of ``config`` that differs from ``dtfast.train_teacher``'s defaults."""
    from dtfast.teacher_training.config import TeacherTrainConfig
    from dtfast.train.config import to_dict

    defaults = _flat(to_dict(TeacherTrainConfig()))
    keys = []
    for key, value in _flat(config).items():
        if key in NOT_RECORDED or defaults.get(key) == value:
            continue
        text = f"[{','.join(str(v) for v in value)}]" if isinstance(value, list) else str(value)
        keys.append(f"{key}={text}")
    return keys


def check_source(source: str) -> dict:
    """The source's dtfast_teacher.json, after checking that it is a teacher dtfast.train_teacher wrote."""
    info_file = os.path.join(source, "dtfast_teacher.json")
    if not os.path.isfile(info_file):
        if os.path.isfile(os.path.join(source, "teacher", "dtfast_teacher.json")):
            raise ShipError(f"{source} is a dtfast.train_teacher run folder: ship its teacher, {source}/teacher")
        raise ShipError(f"{source}: no dtfast_teacher.json; expected a teacher folder written by "
                        "dtfast.train_teacher (<out>/teacher)")
    with open(info_file) as fh:
        info = json.load(fh)
    if "config" not in info or "image_size" not in info:
        raise ShipError(f"{info_file} records no training config: only teachers trained by dtfast.train_teacher "
                        "are shipped (their README gives the command that made them)")
    for part in ("unet", "scheduler"):
        if not os.path.isdir(os.path.join(source, part)):
            raise ShipError(f"{source}: {part}/ is missing")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a teacher folder written by dtfast.train_teacher (<out>/teacher)")
    p.add_argument("--name", default="teacher_tiny32")
    p.add_argument("--machine", default="a 2-core CPU")
    p.add_argument("--assets", default=os.path.join(ROOT, "dtfast", "assets"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        ship(a.source, a.name, a.machine, a.assets)
    except ShipError as exc:
        print(f"recipes/ship_teacher.py: {exc}", file=sys.stderr)
        return 2
    return 0


def ship(source: str, name: str, machine: str, assets: str) -> str:
    """Build the fp16 copy next to ``assets/<name>``, check it, then put it in place (the old one is replaced only
    by a copy that passed)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from dtfast import _files
    from dtfast.data.transforms import parse_size_text
    from dtfast.teachers import build_teacher

    info = check_source(source)
    dest = os.path.join(assets, name)
    os.makedirs(assets, exist_ok=True)
    tmp = _files.mkdtemp(dir=assets, prefix=".tmp_ship_")
    try:
        unet = UNet2DModel.from_pretrained(os.path.join(source, "unet"))
        half = unet.to(torch.float16)
        broken = [k for k, v in half.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        if broken:
            raise ShipError(f"{source}: {len(broken)} weight tensor(s) are not finite in fp16 (overflow), e.g. "
                            f"{broken[:3]}")
        half.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        scheduler = DDPMScheduler.from_pretrained(os.path.join(source, "scheduler"))
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        shutil.copy(os.path.join(source, "dtfast_teacher.json"), os.path.join(tmp, "dtfast_teacher.json"))
        cfg = info["config"]
        sc = scheduler.config
        height, width = parse_size_text(info["image_size"])
        root = cfg.get("data", {}).get("root") or ""
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(README.format(
                name=name, title="the embedded default teacher of dtfast" if name == "teacher_tiny32" else
                "a teacher embedded in dtfast", widths=tuple(unet.config.block_out_channels),
                params=sum(q.numel() for q in unet.parameters()) / 1e6, hw=f"{height}x{width}",
                size_keys=f"data.image_size={height}" + (f" data.image_width={width}" if width != height else ""),
                data=f"the images of `{root}`" if root else "the embedded procedural image set",
                steps=info.get("steps", cfg.get("train", {}).get("max_steps")),
                batch=cfg.get("train", {}).get("batch_size"), machine=machine, rel=f"dtfast/assets/{name}",
                default=DEFAULT_TEACHER.format(name=name) if name == "teacher_tiny32" else "",
                overrides=" ".join(["out=<out>", *training_overrides(cfg)]),
                schedule=f"{sc.beta_schedule} betas {sc.beta_start:g}..{sc.beta_end:g}, "
                         f"{sc.num_train_timesteps} steps"))
        _files.set_default_modes(tmp)
        images = torch.rand(4, 3, height, width) * 2 - 1
        features = [build_teacher(pretrained=folder, timestep=50)(images, generator=torch.Generator().manual_seed(0))
                    for folder in (source, tmp)]
        for level, (original, copy) in enumerate(zip(*features)):
            error = float((original - copy).abs().max() / original.abs().max())
            if not (copy.isfinite().all() and error <= 2e-2):  # NaN compares false: it fails here
                raise ShipError(f"the fp16 copy's level-{level} features differ from the original's by {error:.3g} "
                                "(relative) or are not finite; nothing was replaced")
        _files.replace_folder(tmp, dest)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
    print(f"shipped {source} -> {dest} ({total / 2**20:.1f} MiB); features match the original")
    return dest


if __name__ == "__main__":
    sys.exit(main())
