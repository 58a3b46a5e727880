"""Summary, table (markdown) and plot (PNG) of the small-scale recipe's results."""

from __future__ import annotations

import statistics

ROWS = ("random init", "distilled, random teacher", "distilled, trained teacher", "supervised (upper bound)")
METRICS = (("linear_top1", "linear probe top-1 (%)"), ("knn_top1", "k-NN top-1 (%)"))
# the acceptance pairs: (better row, worse row); the margin must exceed 3 standard deviations over seeds
ACCEPTANCE = (("distilled, trained teacher", "random init"),
              ("distilled, trained teacher", "distilled, random teacher"))


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarise(results: dict[str, dict[str, dict]]) -> dict:
    """Mean and sample std (ddof=1) over seeds per row and metric, and the acceptance check.

    A pair (A, B) passes when mean(A) - mean(B) > 3 * max(std(A), std(B)).
    """
    summary: dict = {"rows": {}, "acceptance": []}
    for row in ROWS:
        per_seed = results.get(row, {})
        summary["rows"][row] = {metric: _stats([100 * r[metric] for r in per_seed.values() if metric in r])
                                for metric, _ in METRICS if any(metric in r for r in per_seed.values())}
    for better, worse in ACCEPTANCE:
        if "linear_top1" not in summary["rows"][better] or "linear_top1" not in summary["rows"][worse]:
            continue
        a, b = summary["rows"][better]["linear_top1"], summary["rows"][worse]["linear_top1"]
        margin, spread = a["mean"] - b["mean"], max(a["std"], b["std"])
        summary["acceptance"].append({
            "better": better, "worse": worse, "margin": margin, "max_std": spread,
            "margin_in_std": margin / spread if spread > 0 else float("inf") if margin > 0 else float("-inf"),
            "passes": bool(margin > 3 * spread and a["n"] > 1)})
    return summary


def write_table(record: dict, path: str) -> None:
    summary = record["summary"]
    seeds = (sorted({int(seed) for row in record.get("per_seed", {}).values() for seed in row})
             or record["args"]["seeds"])
    if not record.get("complete", True):
        seeds = f"{seeds} (PARTIAL: {len(seeds)} of {len(record['args']['seeds'])} seeds done)"
    header = (f"Data: {record['data']}. Student: {record['args']['student']}, probe features: "
              f"{record['args']['features']} (global average pool). Seeds: {seeds}. Mean ± sample std over seeds.")
    lines = [header, "",
             "| backbone | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for row in ROWS:
        cells = []
        for metric, _ in METRICS:
            s = summary["rows"][row].get(metric)
            cells.append(f"{s['mean']:.2f} ± {s['std']:.2f}" if s else "n/a")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Acceptance (linear probe; margin > 3 x max std of the two rows):"]
    for a in summary["acceptance"]:
        lines.append(f"- {a['better']} vs {a['worse']}: {a['margin']:+.2f} points = {a['margin_in_std']:.1f} std "
                     f"-> {'PASS' if a['passes'] else 'FAIL'}")
    timings = ", ".join(f"{k} {v / 60:.1f} min" for k, v in record["timings_s"].items())
    lines += ["", f"Machine: {record['machine']}. Wall time: {timings}.", f"Command: `{record['command']}`", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def write_plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = record["summary"]["rows"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), squeeze=False)
    colours = ("#999999", "#d08c60", "#3a7dc9", "#5aa469")
    for ax, (metric, label) in zip(axes[0], METRICS):
        for i, row in enumerate(ROWS):
            s = summary[row].get(metric)
            if not s:
                continue
            ax.bar(i, s["mean"], yerr=s["std"], color=colours[i], capsize=4)
            ax.scatter([i] * len(s["values"]), s["values"], color="black", s=10, zorder=3)
        ax.set_xticks(range(len(ROWS)), [r.replace(", ", ",\n").replace(" (", "\n(") for r in ROWS], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{record['args']['student']} on {record['data']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
