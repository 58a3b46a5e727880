#!/usr/bin/env bash
# Everything a lent GPU machine runs, in ONE call of <= 8 minutes by default (see ../shared/device/README.md):
#   wheels -> extension build -> CUDA tests of the fused loss -> loss benchmark (+ Triton profile) -> optimizer
#   benchmark (LAMB implementations) -> dtfast.bench (ImageNet R50 +
#   ADM-256, random teacher weights, baseline and optimised rows at 2-3 batch sizes, synthetic data) -> teacher
#   benchmark (ADM-256 eager vs compiled) -> the training step on generated JPEGs decoded by nvJPEG (data-wait
#   share) -> data benchmark (nvJPEG) -> the other CUDA tests -> op test files in full.
# On an H200 (2026-11-27, GPU_CHECK_BUDGET=545) the stages up to the real-data step took 533 s, compiling the
# optimised training step ~120 s of it; with the default budget the last stages are skipped. A 15-minute device
# session can afford GPU_CHECK_BUDGET=545 with timeout_s ~580, then a short follow-up call on the still-warm machine.
# Every stage runs under its own `timeout`, capped by what is left of GPU_CHECK_BUDGET (seconds, default 465), and
# a stage that fails or is missing is recorded and skipped: one hang cannot eat the budget. Stages are ordered by
# value, so the ones that get skipped when time runs out are the least important. The stage logs are packed into
# $OUT after every stage, so they come back even when the device call is cut off.
#
# Usage (repository root, on the GPU machine; carry `.whl`):
#   DTFAST_COMMIT=<output of `git rev-parse --short=12 HEAD` here, +dirty if so> bash benchmarks/gpu_check.sh
#   (the copied tree's git metadata may be missing or stale: every record takes its commit from DTFAST_COMMIT)
# What comes back under $OUT (<= 8 files, flat): summary.txt (the table printed last), gpu_info.json,
#   logs.tar.gz (one log per stage), results.tar.gz (benchmarks/results/ after the run + the bench folders),
#   bench_r50.{json,md,png} (dtfast.bench, synthetic data), bench_real.json (nvJPEG data). Record them here with:
#   python benchmarks/record_gpu_results.py <folder the files came back to>
# Knobs (environment): GPU_CHECK_BUDGET, BENCH_BATCHES (default [128,256]), BENCH_ROWS, BENCH_STEPS,
#   CUDA_BWD_ROUNDS (loss_bench --cuda-bwd-rounds, default 1,4,8,16; empty: none),
#   TEACHER_BENCH_ARGS (extra teacher_bench.py arguments, e.g. --rows), BENCH_WARMUP, BENCH_ENGINE (default ddp),
#   BENCH_CONFIG (default configs/imagenet_r50_adm256.yaml), REAL_IMAGES / REAL_ROWS / REAL_BATCHES / REAL_STEPS /
#   REAL_BACKEND (the real-data stage), SKIP_STAGES (space-separated stage names), CAP_<stage>=SECONDS (a stage's
#   own timeout cap).
# Default caps (s): wheels 90, build_ext 150, cuda_tests_ops 120, loss_bench 75, optim_bench 40, dtfast_bench 240, teacher_bench 120,
#   make_jpegs 40, bench_real 150, data_bench 45, cuda_tests_rest 150, op_tests 90; each is further capped by what
#   is left of the budget.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-465}
RESERVE=15                                  # kept back for packaging and the summary
WORK=$(mktemp -d /tmp/dtfast_gpu_check.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
SUMMARY=$WORK/stages.tsv
: > "$SUMMARY"
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_cache

elapsed() { echo $(( $(date +%s) - START )); }
cap() { local var="CAP_$1"; echo "${!var:-$2}"; }   # CAP_<stage>=SECONDS overrides a stage's default cap

pack_logs() { tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs stages.tsv 2>/dev/null; }

# run_stage NAME MAX_SECONDS COMMAND...: runs COMMAND under timeout, logs to $LOGS/NAME.log, one summary line.
run_stage() {
    local name=$1 max=$2; shift 2
    local left=$(( BUDGET - $(elapsed) - RESERVE ))
    if [[ " ${SKIP_STAGES:-} " == *" $name "* ]]; then
        printf '%s\tSKIPPED\t0\tSKIP_STAGES\n' "$name" >> "$SUMMARY"; return 0
    fi
    if (( left < 20 )); then
        printf '%s\tSKIPPED\t0\tbudget spent (%ss)\n' "$name" "$(elapsed)" >> "$SUMMARY"; return 0
    fi
    local limit=$(( max < left ? max : left ))
    echo "=== [$(elapsed)s] stage $name (timeout ${limit}s): $*" | tee -a "$LOGS/$name.log"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
    local rc=$? dt=$(( $(date +%s) - t0 )) status
    if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=TIMEOUT; else status="FAILED($rc)"; fi
    local last; last=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | tr '\t' ' ' | cut -c1-110)
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$last" >> "$SUMMARY"
    echo "=== [$(elapsed)s] stage $name: $status in ${dt}s"
    pack_logs  # the logs so far come back even if the device call itself is cut off before the packaging at the end
    return $rc
}

missing() {  # missing NAME PATH: record a stage whose script is not in the checkout
    printf '%s\tMISSING\t0\t%s not in the checkout\n' "$1" "$2" >> "$SUMMARY"
}

# ---- 0. the machine ---------------------------------------------------------------------------------------------
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
CARD=${CARD:-unknown}
nvidia-smi > "$LOGS/info.log" 2>&1
# one Python start (importing torch takes a while): versions, card, compute capability, into gpu_info.json
$PY - "$CARD" "$OUT/gpu_info.json" "$WORK/arch" >> "$LOGS/info.log" 2>&1 <<'EOF' || echo "{\"card\": \"$CARD\"}" > "$OUT/gpu_info.json"
import datetime, json, platform, subprocess, sys
card, info_path, arch_path = sys.argv[1:4]
info = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
        with open(arch_path, "w") as fh:
            fh.write(info["capability"])
    import triton
    info["triton"] = triton.__version__
except Exception as error:  # noqa: BLE001
    info["error"] = repr(error)
# the machine's own packages the CPU suite cannot pin (timm's API, NumPy's scalar rules and Triton's interpreter differ
# between releases); diffusers and DeepSpeed come from the carried wheels, whose names give their versions
import importlib.metadata as md
for name in ("numpy", "torchvision", "timm", "transformers", "safetensors", "nvidia-dali-cuda130"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:  # noqa: BLE001
    pass
from dtfast._provenance import git_commit  # DTFAST_COMMIT (set by the sender) or this copy's git, else "unknown"

info["commit"] = git_commit()
text = json.dumps(info, indent=1)
print(text)
with open(info_path, "w") as fh:
    fh.write(text + "\n")
EOF
echo "gpu_check on $CARD, budget ${BUDGET}s, logs in $LOGS"

# ---- 1. carried wheels (diffusers, deepspeed, ...) ---------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=$WORK/site
    if run_stage wheels "$(cap wheels 90)" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$SITE:$PYTHONPATH"
    fi
else
    missing wheels ".whl/*.whl"
fi

# ---- 2. the extension (CUDA + C++), built against this machine's torch --------------------------------------------
# only this card's architecture (setup.py's default builds 8.0 and 9.0: twice the nvcc time)
ARCH=$(cat "$WORK/arch" 2>/dev/null)
run_stage build_ext "$(cap build_ext 150)" env MAX_JOBS=16 DTFAST_CUDA_ARCHS="${DTFAST_CUDA_ARCHS:-${ARCH:-8.0;9.0}}" \
    $PY setup.py build_ext --inplace

# ---- 3. tests that need CUDA: the fused-loss ones first (they go with the loss benchmark) ----------------------------
if compgen -G "tests/test_ops*.py" > /dev/null; then
    run_stage cuda_tests_ops "$(cap cuda_tests_ops 120)" $PY -m pytest --maxfail=25 -q -p no:cacheprovider -m needs_cuda \
        tests/test_ops*.py
else
    missing cuda_tests_ops "tests/test_ops*.py"
fi

# ---- 4. loss benchmark ---------------------------------------------------------------------------------------------
if [[ -f benchmarks/loss_bench.py ]]; then
    # --profile (after the timings are recorded, ~10 s): why the Triton fwd+bwd exceeds fwd + bwd (issue #3):
    # synchronising calls, host issue vs GPU time per iteration, torch.profiler kernels/API calls, cache counters;
    # appended to benchmarks/results/loss_profile.jsonl (comes back in results.tar.gz).
    # --cuda-bwd-rounds (a few s): the CUDA C++ backward at other rows per block than its default 2 (CUDA fwd+bwd
    # was 1.24x Triton's on the H200, its backward 1.9x): which value to make the default
    # CUDA_BWD_ROUNDS="" leaves the extra rows out
    run_stage loss_bench "$(cap loss_bench 75)" $PY benchmarks/loss_bench.py --device cuda --profile \
        --cuda-bwd-rounds "${CUDA_BWD_ROUNDS-1,4,8,16}"
else
    missing loss_bench benchmarks/loss_bench.py
fi

# ---- 4b. optimizer step of the ResNet-50 student: timm's LAMB vs dtfast's (issue #7: 18 ms/step on an H200) ----
if [[ -f benchmarks/optim_bench.py ]]; then
    run_stage optim_bench "$(cap optim_bench 40)" $PY benchmarks/optim_bench.py --device cuda
else
    missing optim_bench benchmarks/optim_bench.py
fi

# ---- 5. dtfast.bench: the training step, R50 + ADM-256 at 256x256, bf16, random teacher weights --------------------
# bench_budget MAX: dtfast.bench's own time budget inside a stage capped at MAX (what the stage will get, less 25 s
# for writing its files); a row whose build + warm-up (compile) would not leave time for the others is cut off
bench_budget() {
    local left=$(( BUDGET - $(elapsed) - RESERVE )) max=$1
    local limit=$(( max < left ? max : left ))
    echo $(( limit > 60 ? limit - 25 : 30 ))
}
BENCH_OUT=$WORK/bench_r50
BENCH_MAX=$(cap dtfast_bench 240)
# One process, one GPU: dist.engine=ddp is the plain module there (no wrapper, no process group); DeepSpeed would
# need a launcher's environment. BENCH_ENGINE=deepspeed measures its single-GPU engine instead.
# bench.time_budget_s: a row is skipped at the next batch size when the time it took at the previous one no longer
# fits (a compiled row recompiles per batch size), so the cheap rows still run; the stage timeout is the backstop
run_stage dtfast_bench "$BENCH_MAX" $PY -m dtfast.bench --config "${BENCH_CONFIG:-configs/imagenet_r50_adm256.yaml}" \
    --out "$BENCH_OUT" \
    "bench.rows=${BENCH_ROWS:-[baseline,optimized-compile,optimized]}" \
    "bench.batch_sizes=${BENCH_BATCHES:-[128,256]}" "bench.warmup=${BENCH_WARMUP:-3}" \
    "bench.steps=${BENCH_STEPS:-6}" "bench.time_budget_s=$(bench_budget "$BENCH_MAX")" \
    "dist.engine=${BENCH_ENGINE:-ddp}" "bench.results_dir="   # recorded from bench_r50.json by record_gpu_results.py
for ext in json md png; do
    [[ -f $BENCH_OUT/bench.$ext ]] && cp "$BENCH_OUT/bench.$ext" "$OUT/bench_r50.$ext"
done

# ---- 6. teacher benchmark ------------------------------------------------------------------------------------------
if [[ -f benchmarks/teacher_bench.py ]]; then
    # default: ADM-256 only, eager vs compiled (a compile takes ~60 s on an H200; SD-1.5 and the other switches with
    # TEACHER_BENCH_ARGS, e.g. "--archs adm256,sd15"); --profile: where each row's GPU time goes (conv, attention,
    # fused Triton, norm, layout), for the 60%-of-peak target of issue #4
    run_stage teacher_bench "$(cap teacher_bench 120)" $PY benchmarks/teacher_bench.py --device cuda \
        ${TEACHER_BENCH_ARGS:---archs adm256 --rows fast-eager,+compile,+compile+cuda_graph --budget-s 110 --profile}
else
    missing teacher_bench benchmarks/teacher_bench.py
fi

# ---- 7. the training step on real JPEGs decoded by nvJPEG: the data-wait share of the step (issue #5) -------------
# A generated folder of ImageNet-sized JPEGs (about 500x375, quality 90; data_bench's generator), the preset as
# configured (compile on: the inductor cache of stage 5 is reused) with data.backend=nvjpeg and bench.data=real.
REAL_ROOT=$WORK/jpegs
REAL_OUT=$WORK/bench_real
if [[ -f benchmarks/data_bench.py ]]; then
    run_stage make_jpegs "$(cap make_jpegs 40)" $PY -c "import sys; sys.path.insert(0, 'benchmarks'); import data_bench
print('generated', sys.argv[2], 'JPEGs, mean KiB', data_bench.make_folder(sys.argv[1], int(sys.argv[2])))" \
        "$REAL_ROOT" "${REAL_IMAGES:-1536}"
    REAL_MAX=$(cap bench_real 150)
    run_stage bench_real "$REAL_MAX" $PY -m dtfast.bench --config "${BENCH_CONFIG:-configs/imagenet_r50_adm256.yaml}" \
        --out "$REAL_OUT" "bench.rows=${REAL_ROWS:-[config]}" "bench.batch_sizes=${REAL_BATCHES:-[128]}" \
        bench.data=real "data.root=$REAL_ROOT" "data.backend=${REAL_BACKEND:-nvjpeg}" \
        "bench.warmup=${BENCH_WARMUP:-3}" "bench.steps=${REAL_STEPS:-8}" \
        "bench.time_budget_s=$(bench_budget "$REAL_MAX")" "dist.engine=${BENCH_ENGINE:-ddp}" "bench.results_dir="
    [[ -f $REAL_OUT/bench.json ]] && cp "$REAL_OUT/bench.json" "$OUT/bench_real.json"
else
    missing bench_real benchmarks/data_bench.py
fi

# ---- 8. data benchmark (torchvision nvJPEG path; DALI's wheel cannot travel) ----------------------------------------
if [[ -f benchmarks/data_bench.py ]]; then
    REAL_ARGS=()
    [[ -d $REAL_ROOT ]] && REAL_ARGS=(--root "$REAL_ROOT")   # the folder stage 7 generated
    run_stage data_bench "$(cap data_bench 45)" $PY benchmarks/data_bench.py --device cuda "${REAL_ARGS[@]}"
else
    missing data_bench benchmarks/data_bench.py
fi

# ---- 9. the other tests that need CUDA (teachers' fast path, DeepSpeed on GPU, nvJPEG data path) ---------------------
run_stage cuda_tests_rest "$(cap cuda_tests_rest 150)" $PY -m pytest --maxfail=25 -q -p no:cacheprovider -m needs_cuda tests \
    --ignore-glob='tests/test_ops*'

# ---- 10. the op test files in full (CPU and CUDA cases), with what time is left -------------------------------------
if compgen -G "tests/test_ops*.py" > /dev/null; then
    # without the host emulation of the CUDA kernels (CI runs it; here stage 3 ran the real ones)
    run_stage op_tests "$(cap op_tests 90)" $PY -m pytest -q -p no:cacheprovider tests/test_ops*.py \
        --ignore=tests/test_ops_cuda_emulated.py
else
    missing op_tests "tests/test_ops*.py"
fi

# ---- package: <= 8 flat files --------------------------------------------------------------------------------------
pack_logs || echo "FAILED to pack logs"
RESULT_DIRS=(benchmarks/results)
[[ -e $BENCH_OUT ]] && RESULT_DIRS+=("$BENCH_OUT")
[[ -e $REAL_OUT ]] && RESULT_DIRS+=("$REAL_OUT")
tar -czf "$OUT/results.tar.gz" --exclude='*.pt' --exclude='*.safetensors' --exclude='checkpoints' \
    --exclude='inductor_cache' "${RESULT_DIRS[@]}" 2>/dev/null || echo "FAILED to pack results"

{
    echo "dtfast gpu_check on $CARD: $(elapsed)s of ${BUDGET}s"
    for json_file in "$OUT/bench_r50.json" "$OUT/bench_real.json"; do
        [[ -f $json_file ]] || continue
        $PY - "$json_file" <<'EOF' || echo "(could not read $json_file)"
import json, sys
result = json.load(open(sys.argv[1]))
flops = result.get("flops", {})
peak = result["meta"]["peak"]["tflops"]
meta = result["meta"]
print(f"dtfast.bench {meta['preset']} at {meta['image_size']}px, {meta['data']} data: peak {peak:.1f} TFLOP/s "
      f"({meta['peak']['source']}); GFLOP/img teacher "
      f"{(flops.get('teacher_early_exit') or 0) / 1e9:.0f} (early exit) / {(flops.get('teacher_full') or 0) / 1e9:.0f}"
      f" (full), student fwd+bwd {(flops.get('student_train') or 0) / 1e9:.0f}")
print(f"{'row':<24}{'batch':>6}{'img/s':>9}{'MFU':>7}{'x base':>8}{'step ms':>9}{'teach ms':>9}{'data %':>7}"
      f"{'peak GB':>9}")
for r in result["rows"]:
    if r.get("status") != "ok":
        print(f"{r['row']:<24}{r['batch_size']:>6}  {r.get('status')}: {r.get('error', '')[:70]}")
        continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    speedup = f"{r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else "-"
    stages = r.get("stage_s_per_step", {})
    data_share = 100 * stages.get("data", 0.0) / r["step_time_s"]["mean"]
    print(f"{r['row']:<24}{r['batch_size']:>6}{r['images_per_s']:>9.1f}{mfu:>7}{speedup:>8}"
          f"{1e3 * r['step_time_s']['median']:>9.1f}{1e3 * stages.get('teacher', 0.0):>9.1f}{data_share:>6.1f}%"
          f"{r['peak_memory_gb']:>9.1f}")
EOF
    done
    echo
    printf '%-16s %-11s %6s  %s\n' stage status secs "last log line"
    while IFS=$'\t' read -r name status secs last; do
        printf '%-16s %-11s %6s  %s\n' "$name" "$status" "$secs" "$last"
    done < "$SUMMARY"
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
exit 0
