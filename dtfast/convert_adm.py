"""Convert an OpenAI guided-diffusion (ADM) checkpoint into a diffusers teacher folder for `teacher.pretrained=`.

    python -m dtfast.convert_adm 256x256_diffusion_uncond.pt /models/adm256-diffusers
    torchrun --nproc_per_node 8 -m dtfast.pretrain --config configs/imagenet_r50_adm256.yaml \\
        teacher.pretrained=/models/adm256-diffusers data.root=/data/imagenet/train

The paper's ImageNet teacher is `256x256_diffusion_uncond.pt` from https://github.com/openai/guided-diffusion
(https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt). The defaults fit it
and the LSUN models (lsun_bedroom.pt, lsun_cat.pt, lsun_horse.pt): 64-channel heads, legacy qkv order, linear
1000-step schedule. The other released models are class-conditional, which a teacher cannot use.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dtfast.convert_adm",
        description="Convert a guided-diffusion (ADM) UNet checkpoint into a diffusers folder (unet/, scheduler/) "
                    "that dtfast loads with teacher.pretrained=<out>. The architecture is read from the checkpoint.")
    parser.add_argument("checkpoint", help="the guided-diffusion .pt file (a state dict), e.g. "
                                           "256x256_diffusion_uncond.pt")
    parser.add_argument("out", help="the folder to write (must not exist unless --overwrite)")
    parser.add_argument("--num-head-channels", type=int, default=64,
                        help="attention head width the model was trained with (guided-diffusion's "
                             "--num_head_channels; 64 for the unconditional ImageNet and the LSUN models)")
    parser.add_argument("--attention-order", choices=["legacy", "new"], default="legacy",
                        help="qkv layout: legacy (default, the released checkpoints) or new "
                             "(trained with --use_new_attention_order True)")
    parser.add_argument("--image-size", type=int, default=256, help="training resolution (recorded as sample_size, "
                                                                     "and the size the folder is checked at)")
    parser.add_argument("--noise-schedule", choices=["linear", "cosine"], default="linear",
                        help="guided-diffusion's --noise_schedule (linear for the ImageNet models)")
    parser.add_argument("--diffusion-steps", type=int, default=1000, help="guided-diffusion's --diffusion_steps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="store the weights in this dtype (default: as in the checkpoint; dtfast casts the teacher "
                             "to bf16 on GPU when it loads it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dtfast import _deps

    if not _deps.require("python -m dtfast.convert_adm", _deps.CONVERT):
        return 2
    import torch

    from dtfast.teachers.convert import ConversionError, convert_checkpoint

    try:
        out = convert_checkpoint(
            args.checkpoint, args.out, num_head_channels=args.num_head_channels,
            attention_order=args.attention_order, image_size=args.image_size, noise_schedule=args.noise_schedule,
            diffusion_steps=args.diffusion_steps, dtype=getattr(torch, args.dtype) if args.dtype else None,
            overwrite=args.overwrite)
    except (ConversionError, FileNotFoundError, FileExistsError) as error:
        print(f"dtfast.convert_adm: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (unet/, scheduler/, dtfast_teacher.json); use it with teacher.pretrained={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
