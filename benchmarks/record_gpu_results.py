"""Record what `benchmarks/gpu_check.sh` brought back from a GPU machine into benchmarks/results/.

    python benchmarks/record_gpu_results.py <folder with summary.txt, gpu_info.json, results.tar.gz, bench_r50.json>

- dtfast.bench rows (bench_*.json): appended to bench_results.jsonl (skipping rows already recorded, by date,
  row and batch size), and the table/chart written as bench_<card>_<preset>.{md,png}.
- Other benchmarks' result files inside results.tar.gz (benchmarks/results/*): *.jsonl / *.csv lines that are
  not in the local file yet are appended, each JSON line tagged with "gpu_check_card"; a text file that is the
  local one with text appended (the markdown logs) gets the new text appended; any other file is copied in when
  it does not exist here, else under benchmarks/results/gpu_<card>/ (nothing local is overwritten).
- summary.txt and gpu_info.json: written as bench_gpu_check_<card>.md.
Rows carry the card's name (nvidia-smi) everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dtfast._provenance import git_commit
from dtfast.bench import report


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def record_bench_json(path: str, results: str, card: str, commit: str | None) -> list[str]:
    """Append the rows of one dtfast.bench JSON (unless recorded already); write its table and chart."""
    with open(path) as fh:
        result = json.load(fh)
    meta = result["meta"]
    if meta.get("commit") in (None, "", "unknown") and commit:
        meta["commit"] = commit
    meta["machine"]["card"] = card
    if meta["machine"].get("device_type") == "cuda":
        meta["machine"]["device_name"] = meta["machine"].get("device_name") or card
    target = os.path.join(results, "bench_results.jsonl")
    seen = set()
    for line in _read_lines(target):
        try:
            row = json.loads(line)
            seen.add((row.get("date"), row.get("row"), row.get("batch_size"), row.get("device")))
        except json.JSONDecodeError:
            continue
    written = []
    stem = report.table_stem(result)  # gpu_check's real-data stage has its own table beside the synthetic one
    png = os.path.join(os.path.dirname(path), os.path.splitext(os.path.basename(path))[0] + ".png")
    fresh = [r for r in result["rows"]
             if (meta["date"], r["row"], r["batch_size"], meta["machine"]["device_name"]) not in seen]
    if fresh:
        rest = {**result, "rows": fresh}
        report.record(rest, results, None)
        written.append(target)
    # the whole run's table (report.record above wrote one of the fresh rows only)
    report.write_markdown(result, os.path.join(results, stem + ".md"))
    written.append(os.path.join(results, stem + ".md"))
    if os.path.isfile(png):
        shutil.copyfile(png, os.path.join(results, stem + ".png"))
    else:
        report.write_png(result, os.path.join(results, stem + ".png"))
    if os.path.isfile(os.path.join(results, stem + ".png")):
        written.append(os.path.join(results, stem + ".png"))
    return written


def merge_results_tar(tar_path: str, results: str, card: str) -> list[str]:
    """Merge benchmarks/results/* of the GPU machine's checkout into the local one (bench_results.jsonl aside)."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("benchmarks/results/")
                       and ".." not in m.name]
            # the "data" filter (Python 3.12, backported to 3.11.4): no absolute paths, links out or special files;
            # it is the default from 3.14, and 3.12-3.13 warn without it
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
        base = os.path.join(tmp, "benchmarks", "results")
        for dirpath, _, files in os.walk(base):
            for name in sorted(files):
                source = os.path.join(dirpath, name)
                relative = os.path.relpath(source, base)
                target = os.path.join(results, relative)
                if name == "bench_results.jsonl" or name.startswith("bench_"):
                    continue  # dtfast.bench rows come from the bench JSON (complete even after a timeout)
                if name.endswith((".jsonl", ".csv")):
                    local = set(_read_lines(target))
                    new = [line for line in _read_lines(source) if line not in local]
                    if name.endswith(".jsonl"):
                        new = [_tag(line, card) for line in new]
                        new = [line for line in new if line not in local]
                    if new:
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        with open(target, "a") as fh:
                            fh.write("\n".join(new) + "\n")
                        written.append(target)
                elif not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(source, target)
                    written.append(target)
                elif (tail := _appended_text(source, target)) is not None:  # an append-only log (loss_bench.md)
                    with open(target, "a") as fh:
                        fh.write(tail)
                    written.append(target)
                elif not _same(source, target):
                    aside = os.path.join(results, f"gpu_{report.slug(card)}", relative)
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    shutil.copyfile(source, aside)
                    written.append(aside)
    return written


def _tag(line: str, card: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return line
    if isinstance(row, dict) and "gpu_check_card" not in row:
        row["gpu_check_card"] = card
        return json.dumps(row)
    return line


def _appended_text(source: str, target: str) -> str | None:
    """The text ``source`` adds at the end of ``target`` when it is ``target`` plus more (the remote copy of a local
    append-only log), else None."""
    if not source.endswith((".md", ".txt", ".log")):
        return None
    try:
        with open(source) as fa, open(target) as fb:
            new, old = fa.read(), fb.read()
    except (OSError, UnicodeDecodeError):
        return None
    return new[len(old):] if len(new) > len(old) and new.startswith(old) else None


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


# versions gpu_check.sh reads off the machine besides torch and triton (all but python absent before 2026-12-07)
OTHER_PACKAGES = ("python", "numpy", "torchvision", "timm", "transformers", "safetensors", "nvidia-dali-cuda130")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where the files from $OUT were fetched")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    info_path = os.path.join(args.folder, "gpu_info.json")
    info = {}
    if os.path.isfile(info_path):
        with open(info_path) as fh:
            info = json.load(fh)
    card = info.get("device") or info.get("card") or "unknown GPU"
    commit = info.get("commit") if info.get("commit") not in (None, "", "unknown", "HEAD") else None
    commit = f"{commit} (gpu_info.json)" if commit else f"{git_commit()} (local checkout at record time)"
    os.makedirs(args.results, exist_ok=True)
    written: list[str] = []
    for name in sorted(os.listdir(args.folder)):
        if name.startswith("bench_") and name.endswith(".json"):
            written += record_bench_json(os.path.join(args.folder, name), args.results, card, commit)
    tar_path = os.path.join(args.folder, "results.tar.gz")
    if os.path.isfile(tar_path):
        written += merge_results_tar(tar_path, args.results, card)
    summary = os.path.join(args.folder, "summary.txt")
    if os.path.isfile(summary):
        target = os.path.join(args.results, f"bench_gpu_check_{report.slug(card)}.md")
        with open(summary) as fh:
            summary_text = fh.read().rstrip()
        with open(target, "w") as fh:
            others = "".join(f", {name} {info[name]}" for name in OTHER_PACKAGES if info.get(name))
            fh.write(f"# gpu_check on {card}\n\ncommit {commit}, {info.get('date', '')}, torch {info.get('torch')}, "
                     f"triton {info.get('triton')}{others}\n\n```\n{summary_text}\n```\n")
        written.append(target)
    for path in dict.fromkeys(written):
        print(f"recorded {os.path.relpath(path, ROOT)}")
    if not written:
        print(f"nothing to record in {args.folder}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
