"""Benchmark rows: named sets of optimisation switches, turned into config overrides.

A row is ``baseline``, ``optimized`` or ``config`` (the configuration as given), optionally followed by
``+switch`` / ``-switch`` modifiers, e.g. ``optimized-compile`` or ``baseline+early_exit``.

- ``baseline``: the straightforward implementation: full teacher forward (no early exit), no torch.compile,
  the reference PyTorch loss (``loss.backend=torch``), no channels_last, the plain PyTorch data loader, and
  fp32 on CPU / bf16 (teacher weights, student autocast) on GPU, cuDNN's heuristics (no cudnn.benchmark).
- ``optimized``: every switch at the value that is fast on the device (below); on CPU torch.compile stays off
  (compiling costs more than the few steps a CPU run makes) and so does channels_last (the teacher's own CPU
  default; it measured the same, 5.4 vs 5.4 img/s, on the tiny preset here); on GPU everything is on.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from dtfast.train.config import ConfigError

# switch -> (config overrides when on, when off). "teacher.early_exit" is applied through the teacher's
# build options by the runner (the config has no such key).
SWITCHES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "early_exit": ({"teacher.early_exit": True}, {"teacher.early_exit": False}),
    "bf16": ({"teacher.dtype": "bf16", "train.bf16": True}, {"teacher.dtype": "fp32", "train.bf16": False}),
    "channels_last": ({"teacher.channels_last": True, "student.channels_last": True},
                      {"teacher.channels_last": False, "student.channels_last": False}),
    "compile": ({"teacher.compile": True, "train.compile": True}, {"teacher.compile": False, "train.compile": False}),
    "fused_loss": ({"loss.backend": "auto"}, {"loss.backend": "torch"}),
    "data_backend": ({"data.backend": "auto"}, {"data.backend": "torch"}),
    "cudnn_benchmark": ({"train.cudnn_benchmark": True}, {"train.cudnn_benchmark": False}),
}

_ON: dict[str, dict[str, frozenset[str]]] = {
    "baseline": {"cpu": frozenset(), "cuda": frozenset({"bf16"})},
    "optimized": {"cpu": frozenset({"early_exit", "fused_loss", "data_backend"}),
                  "cuda": frozenset(SWITCHES)},
}

_ROW = re.compile(r"^(baseline|optimized|config)((?:[+-][a-z_0-9]+)*)$")


@dataclasses.dataclass(frozen=True)
class Row:
    """A parsed row: its name, the switches it sets (None for ``config`` rows) and its config overrides."""

    name: str
    switches: dict[str, bool] | None
    overrides: dict[str, Any]

    @property
    def early_exit(self) -> bool | None:
        return self.overrides.get("teacher.early_exit")


def parse_row(spec: str, device_type: str) -> Row:
    """``spec`` -> Row for a device type ("cpu" or "cuda"); ConfigError (a ValueError) naming the unknown part."""
    match = _ROW.match(spec.strip())
    if not match:
        raise ConfigError(f"bench row {spec!r}: expected baseline | optimized | config followed by +switch / -switch "
                         f"modifiers (switches: {', '.join(SWITCHES)})")
    base, modifiers = match.group(1), re.findall(r"([+-])([a-z_0-9]+)", match.group(2))
    device_type = "cuda" if device_type == "cuda" else "cpu"
    if base == "config":
        switches: dict[str, bool] | None = None
        overrides: dict[str, Any] = {}
    else:
        on = _ON[base][device_type]
        switches = {name: name in on for name in SWITCHES}
    for sign, name in modifiers:
        if name not in SWITCHES:
            raise ConfigError(f"bench row {spec!r}: unknown switch {name!r}; switches: {', '.join(SWITCHES)}")
        if switches is None:  # config row: the modifiers alone
            overrides.update(SWITCHES[name][0 if sign == "+" else 1])
        else:
            switches[name] = sign == "+"
    if switches is not None:
        overrides = {}
        for name, enabled in switches.items():
            overrides.update(SWITCHES[name][0 if enabled else 1])
    return Row(spec.strip(), switches, overrides)


def sweep_rows(device_type: str, data: str = "synthetic") -> list[str]:
    """baseline, optimized, and optimized without each of its switches (what each one buys); the data backend
    switch only with real data (synthetic batches are already on the device)."""
    device_type = "cuda" if device_type == "cuda" else "cpu"
    on = [name for name in SWITCHES if name in _ON["optimized"][device_type]]
    return ["baseline", "optimized"] + [f"optimized-{name}" for name in on if name != "data_backend" or data == "real"]


def split_overrides(overrides: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(dotted ``key=value`` config overrides, teacher build options the config has no key for)."""
    config_items, teacher_options = [], {}
    for key, value in overrides.items():
        if key == "teacher.early_exit":
            teacher_options["early_exit"] = bool(value)
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            config_items.append(f"{key}={text}")
    return config_items, teacher_options
