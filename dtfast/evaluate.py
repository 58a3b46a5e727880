"""Evaluate a backbone by linear probe and k-NN on frozen, globally pooled features.

    python -m dtfast.evaluate backbone=runs/pretrain/backbone.safetensors [data.root=ROOT] [out=FILE|FOLDER/]
    python -m dtfast.evaluate backbone=random arch=resnet18 seed=1
    python -m dtfast.evaluate backbone=timm arch=resnet50 data.root=/data/labelled data.image_size=224

Data: ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (centre crops, no augmentation), or with
no ``data.root`` the embedded procedural set's train and val splits. Prints and writes top-1 accuracy (JSON):
by default ``<backbone stem>.eval.json`` next to the backbone file, ``random-<arch>-seed<seed>.eval.json`` or
``timm-<arch>.eval.json`` in the current folder. ``arch`` defaults to the one the exported file records.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from dtfast.eval.config import ConfigError, EvalConfig, help_text, load_eval_config

    parser = argparse.ArgumentParser(
        prog="python -m dtfast.evaluate",
        description="Linear probe and k-NN of a timm backbone's frozen features on labelled train/val images.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key.sub=value):\n" + help_text(EvalConfig),
    )
    parser.add_argument("--config", default=None, help="YAML file with any of the keys below")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML file")
    args = parser.parse_args(argv)
    from dtfast import _deps

    if not _deps.require("python -m dtfast.evaluate"):
        return 2
    try:
        cfg = load_eval_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"dtfast.evaluate: {exc}", file=sys.stderr)
        return 2
    from dtfast.eval.features import BackboneError
    from dtfast.eval.runner import ProbeDataError, evaluate

    try:
        evaluate(cfg)
    except (ConfigError, BackboneError, ProbeDataError) as exc:
        print(f"dtfast.evaluate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
