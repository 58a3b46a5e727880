"""The optional dependencies of dtfast's commands, checked up front.

``pip install -e .`` gives the loss ops only (torch, numpy); the commands need the ``[train]`` extra. Without it they
would stop on an ImportError deep in the set-up; this says which packages are missing and how to install them.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> pip name
TRAIN = {"timm": "timm", "diffusers": "diffusers", "safetensors": "safetensors", "yaml": "pyyaml"}
CONVERT = {"diffusers": "diffusers", "safetensors": "safetensors"}


def missing(modules: dict[str, str]) -> list[str]:
    """The pip names of the ``modules`` that cannot be imported here."""
    return [pip for module, pip in modules.items() if importlib.util.find_spec(module) is None]


def check(prog: str, modules: dict[str, str] = TRAIN) -> str | None:
    """An error message for ``prog`` when some of ``modules`` are missing, else None."""
    absent = missing(modules)
    if not absent:
        return None
    return (f"{prog}: needs {', '.join(absent)}, which this Python cannot import. Install dtfast with its [train] "
            "extra: pip install --no-build-isolation -e \".[train]\" (torch first; see the README), or "
            f"pip install {' '.join(absent)}")


def require(prog: str, modules: dict[str, str] = TRAIN) -> bool:
    """True when ``modules`` import; otherwise print ``check``'s message to stderr and return False (the command
    then exits with 2)."""
    message = check(prog, modules)
    if message:
        print(message, file=sys.stderr)
    return message is None
