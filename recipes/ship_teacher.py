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

README = """# {name}: the embedded default teacher of dtfast

A small pixel-space DDPM (diffusers `UNet2DModel`, the `tiny` layout of `dtfast.teachers.archs` at widths
{widths}, {params:.2f}M parameters, fp16 weights, EMA) trained on the embedded procedural image set at
{size}x{size} for {steps} steps of {batch} images. Use it at **{size}x{size}** (`data.image_size={size}`; any
multiple of 32 works convolutionally, but it has only seen {size}x{size} images) and **t = 50** (the recipe's
`teacher.timestep`; the DreamTeacher choice for small in-domain data).

    python -m dtfast.pretrain teacher.arch=embedded:{name} data.image_size={size} teacher.timestep=50
    python -m dtfast.pretrain teacher.pretrained={rel} data.image_size={size} teacher.timestep=50   # the same

It is the default teacher of `python -m dtfast.pretrain` (`teacher.arch=embedded:{name}`, 32x32, t = 50), so the
main job distils a trained model out of the box. What it is worth: `recipes/RESULTS.md` (the small-scale proof).

Produced by (from a clean checkout, on {machine}):

    python recipes/small_scale.py          # step 1 of the recipe runs exactly:
    python -m dtfast.train_teacher {overrides}
    python recipes/ship_teacher.py recipes/runs/procedural/teacher/teacher --name {name}

Layout: `unet/` (config.json + diffusion_pytorch_model.safetensors), `scheduler/` (DDPMScheduler, linear betas
1e-4..0.02, 1000 steps), `dtfast_teacher.json` (the full training config).
"""


def main() -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from dtfast.teachers import build_teacher

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a teacher folder written by dtfast.train_teacher (<out>/teacher)")
    p.add_argument("--name", default="teacher_tiny32")
    p.add_argument("--machine", default="a 2-core CPU")
    a = p.parse_args()
    with open(os.path.join(a.source, "dtfast_teacher.json")) as fh:
        info = json.load(fh)
    dest = os.path.join(ROOT, "dtfast", "assets", a.name)
    shutil.rmtree(dest, ignore_errors=True)
    unet = UNet2DModel.from_pretrained(os.path.join(a.source, "unet"))
    unet.to(torch.float16).save_pretrained(os.path.join(dest, "unet"), safe_serialization=True)
    DDPMScheduler.from_pretrained(os.path.join(a.source, "scheduler")).save_pretrained(os.path.join(dest, "scheduler"))
    shutil.copy(os.path.join(a.source, "dtfast_teacher.json"), os.path.join(dest, "dtfast_teacher.json"))
    cfg = info["config"]
    keys = [f"model.block_out_channels=[{','.join(str(c) for c in cfg['model']['block_out_channels'])}]",
            f"model.norm_num_groups={cfg['model']['norm_num_groups']}", f"data.image_size={cfg['data']['image_size']}",
            f"data.num_images={cfg['data']['num_images']}", f"train.max_steps={cfg['train']['max_steps']}",
            f"train.batch_size={cfg['train']['batch_size']}", "out=recipes/runs/procedural/teacher"]
    size = int(info["image_size"])
    with open(os.path.join(dest, "README.md"), "w") as fh:
        fh.write(README.format(name=a.name, widths=tuple(unet.config.block_out_channels),
                               params=sum(q.numel() for q in unet.parameters()) / 1e6, size=size,
                               steps=info["steps"], batch=cfg["train"]["batch_size"], machine=a.machine,
                               rel=f"dtfast/assets/{a.name}", overrides=" ".join(keys)))
    images = torch.rand(4, 3, size, size) * 2 - 1
    features = [build_teacher(pretrained=folder, timestep=50)(images, generator=torch.Generator().manual_seed(0))
                for folder in (a.source, dest)]
    for original, copy in zip(*features):
        error = float((original - copy).abs().max() / original.abs().max())
        if error > 2e-2:
            raise RuntimeError(f"the fp16 copy's features differ from the original's by {error:.3g} (relative)")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
    print(f"shipped {a.source} -> {dest} ({total / 2**20:.1f} MiB); features match the original")


if __name__ == "__main__":
    main()
