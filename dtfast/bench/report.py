"""Benchmark output: the terminal/markdown table, the JSON file, the PNG breakdown chart, the results record."""

from __future__ import annotations

import json
import os
import platform
import re
from typing import Any

import torch

from dtfast.train.checkpoint import atomic_write_text
from dtfast.train.timing import STAGES

# "communication": the exposed gradient all-reduce of multi-process DDP rows (measured by difference; "-" where it
# is not measured, e.g. DeepSpeed, whose communication stays inside backward and optimizer)
BREAKDOWN = (*STAGES, "communication", "other")


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads(), "cpu": _cpu_name()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = f"CPU {info['cpu']} ({torch.get_num_threads()} threads)"
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def table(result: dict[str, Any]) -> str:
    """A markdown table (also readable on a terminal): one line per measured (row, batch size)."""
    head = ["row", "batch", "img/s", "img/s/dev", "step ms (p10-p90)", *[f"{s} ms" for s in BREAKDOWN],
            "TFLOP/s", "MFU", "peak GiB", "vs baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['row']} | {row['batch_size']} | {row.get('status')}: "
                         f"{row.get('error', '')[:100]} |" + " |" * (len(head) - 3))
            continue
        step = row["step_time_s"]
        stages = [_fmt(_ms(row["stage_s_per_step"].get(s, 0.0)), ".1f") for s in BREAKDOWN]
        lines.append("| " + " | ".join([
            row["row"], str(row["batch_size"]), _fmt(row["images_per_s"], ".1f"),
            _fmt(row["images_per_s_per_device"], ".1f"),
            f"{1e3 * step['median']:.1f} ({1e3 * step['p10']:.1f}-{1e3 * step['p90']:.1f})", *stages,
            _fmt(row.get("achieved_tflops"), ".2f"),
            (f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"),
            _fmt(row["peak_memory_gb"], ".2f"),
            (f"{row['speedup_vs_baseline']:.2f}x" if row.get("speedup_vs_baseline") else "-"),
        ]) + " |")
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    meta, flops = result["meta"], result["flops"]
    gf = {k: (None if v is None else v / 1e9) for k, v in flops.items() if k != "errors"}
    text = [
        (f"dtfast.bench on {meta['machine']['device_name']} (torch {meta['machine']['torch']}), "
         f"commit {meta['commit']}, {meta['date']}"),
        f"command: {meta['command']}",
        f"data: {meta['data']}, image size {meta['image_size']}, "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps",
        (f"FLOPs/image (GFLOP): teacher forward {_fmt(gf.get('teacher_early_exit'), '.1f')} with early exit, "
         f"{_fmt(gf.get('teacher_full'), '.1f')} full; student fwd+bwd {_fmt(gf.get('student_train'), '.2f')}"),
        f"peak: {meta['peak']['tflops']:.2f} TFLOP/s ({meta['peak']['source']}"
        + (f", {meta['peak']['matmul']}" if meta["peak"].get("matmul") else "") + ")",
    ]
    if flops.get("errors"):
        text.append("FLOP count errors: " + "; ".join(flops["errors"]))
    return "\n".join(text)


def write_markdown(result: dict[str, Any], path: str) -> None:
    """The header (as a code block) and the table, written atomically."""
    atomic_write_text(path, "```\n" + header(result) + "\n```\n\n" + table(result) + "\n")


def write_json(result: dict[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(result, indent=1, default=str))


def write_png(result: dict[str, Any], path: str) -> bool:
    """Horizontal stacked bars: milliseconds per step in each stage, one bar per (row, batch size)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    if not rows:
        return False
    labels = [f"{r['row']} @ {r['batch_size']}\n{r['images_per_s']:.1f} img/s" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.55 * len(rows)))
    left = [0.0] * len(rows)
    colors = plt.get_cmap("tab10").colors
    for index, stage in enumerate(BREAKDOWN):
        widths = [_ms(r["stage_s_per_step"].get(stage, 0.0)) or 0.0 for r in rows]
        if not any(widths):
            continue
        ax.barh(range(len(rows)), widths, left=left, label=stage, color=colors[index % len(colors)])
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per optimizer step (mean of timed steps)")
    meta = result["meta"]
    ax.set_title(f"dtfast.bench: {meta['preset']} on {meta['machine']['device_name']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table_stem(result: dict[str, Any]) -> str:
    """File stem of the latest table per machine, preset and data kind (a real-data run has its own table)."""
    meta = result["meta"]
    stem = f"bench_{slug(meta['machine']['device_name'])}_{slug(meta['preset'])}"
    return stem + "_real-data" if meta.get("data") == "real" else stem


def record(result: dict[str, Any], results_dir: str, png_path: str | None) -> list[str]:
    """Append compact rows to <dir>/bench_results.jsonl; latest table (and chart) per machine and preset."""
    if not results_dir or not os.path.isdir(results_dir):
        return []
    meta = result["meta"]
    written = []
    path = os.path.join(results_dir, "bench_results.jsonl")
    with open(path, "a") as fh:
        for row in result["rows"]:
            compact = {k: v for k, v in row.items() if k != "step_times_s"}
            line = {"date": meta["date"], "commit": meta["commit"], "device": meta["machine"]["device_name"],
                    "torch": meta["machine"]["torch"], "preset": meta["preset"], "command": meta["command"],
                    "data": meta["data"], "image_size": meta["image_size"], "peak_tflops": meta["peak"]["tflops"],
                    "flops_per_image": result["flops"], **compact}
            fh.write(json.dumps(line, default=str) + "\n")
    written.append(path)
    stem = table_stem(result)
    md_path = os.path.join(results_dir, stem + ".md")
    write_markdown(result, md_path)
    written.append(md_path)
    if png_path and os.path.isfile(png_path):
        import shutil

        shutil.copyfile(png_path, os.path.join(results_dir, stem + ".png"))
        written.append(os.path.join(results_dir, stem + ".png"))
    return written
