#!/usr/bin/env bash
# benchmarks/device_check.sh OUTDIR: the GPU part of the project in one go, ending by itself in < 5 min.
#
# For a CUDA machine with torch / triton / transformers (pytest-xdist and pytest-timeout used when
# present), no internet and no `adapters`, run from a copy of the working tree (no .git needed).
#
# What comes back: OUTDIR holds exactly four files, no folders (the GPU lender returns <= 8 files,
# <= 2 folders deep, <= 16 MiB each, <= 64 MiB in all):
#   device_check.tar.gz  everything else: env.txt, steps.tsv, pytest-*.{xml,log}, build-cuda.log,
#                        spills.json (ptxas -v of the target-row kernels with this machine's Triton),
#                        bench/ (results.csv, results.json, skipped.json, summary.md, PNG plots),
#                        bench-graphs/ (BERT-base, eager and CUDA graphs), bench-switches/ (the target
#                        row per kernel switch), bench-multitask/ (routed K fusions vs separate,
#                        results.json serving, train.json training steps),
#                        bench-configs-v1/ (the autotune lists before),
#                        each with results.{json,csv}, and *.log of every step; summary.{md,json};
#                        logs over 2 MiB keep their last 2 MiB, and if the archive would pass 15 MiB
#                        the plots are left out
#   summary.md / summary.json   dry run or not, GPU, versions, commit, every step with its status,
#                        test counts and failures, spills, the issue-3 target row, the archive's contents
#   device_check.log     this script's own output
#
# The commit: a copied tree has no .git. The caller passes it as BENCH_GIT_COMMIT=<hash>, e.g.
#   BENCH_GIT_COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD || echo +dirty) bash benchmarks/device_check.sh OUT
# or writes it into the tree before the copy: `git rev-parse HEAD > benchmarks/.git_commit` (an
# untracked, not ignored file, so it travels with the tree). Without either, `git rev-parse HEAD`.
#
# Steps (each recorded in steps.tsv as name, exit code, seconds, kind; a failing step is recorded
# and the next one runs; every step has its own timeout):
#   env          GPU and versions -> env.txt
#   build-cuda   (background, MAX_JOBS=8) the CUDA extension, ahead of the tests that need it
#   spills       (background, CPU only) ptxas -v spill report of the target-row kernels -> spills.json
#   tests-triton GPU tests of the Triton backend first: parity fwd+bwd fp32/fp16/bf16, adapter
#                masks, dropout replay, numerics, one autotuned config per kernel (pytest -n, xdist)
#   tests-cuda   the CUDA backend's tests and its CUDA-graph test (after build-cuda;
#                FUSEDADAPTER_SKIP_CUDA=1 if it failed)
#   bench        python -m benchmarks gpu: the issue-3 target row (Triton op, bf16, 16384 tokens, H=768,
#                N=8, r=48: % of roofline, ratio to the torch backend) first, then the grid while the
#                steps below keep their time
#   bench-graphs python -m benchmarks.devicecheck_graphs: BERT-base (B=8, S=128, bf16) with 8 fused
#                adapters against the bare model, eager and as a captured CUDA graph (target <= 10% over)
#   bench-switches  python -m benchmarks.devicecheck_switches: the target row per kernel switch in one
#                process, interleaved (kernels/fusion.py: bf16 w_query split off, PRECAST, PRESPLIT,
#                GEMM2=v2, the new ones together; the CUDA backend's split on/off), fixed configs
#   bench-multitask  python -m benchmarks multitask: one routed forward of K fusions (bf16, triton,
#                B=32 S=128, K = 4, 2, 8 as time allows) vs the K separate forwards, and vs the same
#                routed call group by group (the grouped op off): issue 16's >= 1.5x on a GPU
#   bench-multitask-train  the same at K=4 as training steps (--train: forward + backward, the grouped
#                op's backward) -> bench-multitask/train.json
#   bench-configs-v1  FUSEDADAPTER_TRITON_CONFIGS=v1 (the autotune lists before the spill measurement):
#                the target row again, autotuned over those lists (an import-time switch: own process)
#   summary      summary.{md,json}
# Tests that need no GPU are not run here (CI runs them).
#
# DEVICE_CHECK_DRY_RUN=1: the same script on a CPU machine; every GPU step (build-cuda, spills,
# tests-*, bench*) is replaced by benchmarks/devicecheck_stub.py, which writes the files the step
# would write (JUnit report and log, results.json/csv, skipped.json, summary.md, plots), packed as
# a real run packs them; summary.md says it was a dry run. tests/test_device_check.py runs it in CI.
#
# Budgets (seconds, override by environment): DC_TOTAL=280 (all steps), DC_BUILD=120 (CUDA build),
# DC_TESTS=95 (Triton and other GPU tests), DC_TESTS_CUDA=35, DC_WORKERS=6 (xdist workers),
# DC_TEST_TIMEOUT=80 (per test, with pytest-timeout). Each step's limit is also cut to what the
# total leaves after the time reserved for the steps that follow (the bench steps in the order above
# get at most 55 (+ the grid's time) + 40 + 45 + 30 + 20 + 25 s). PYTHON picks the interpreter (default python3).
set -u
OUT=${1:?usage: benchmarks/device_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
DRY=${DEVICE_CHECK_DRY_RUN:-0}
TOTAL=${DC_TOTAL:-280}
T_BUILD=${DC_BUILD:-120}
T_TESTS=${DC_TESTS:-95}
T_TESTS_CUDA=${DC_TESTS_CUDA:-35}
WORKERS=${DC_WORKERS:-6}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
rm -f "$OUT/device_check.tar.gz" "$OUT/summary.md" "$OUT/summary.json" "$OUT/device_check.log"
: > "$WORK/steps.tsv"
exec > >(tee -a "$OUT/device_check.log") 2>&1
export DEVICE_CHECK_DRY_RUN=$DRY DEVICE_CHECK_WORK=$WORK PYTHONDONTWRITEBYTECODE=1

if [ -z "${BENCH_GIT_COMMIT:-}" ] && [ -s benchmarks/.git_commit ]; then
  BENCH_GIT_COMMIT=$(head -c 200 benchmarks/.git_commit | tr -d '[:space:]')
fi
if [ -z "${BENCH_GIT_COMMIT:-}" ]; then
  BENCH_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || true)
fi
export BENCH_GIT_COMMIT
echo "device_check: commit ${BENCH_GIT_COMMIT:-unknown}, dry run $DRY, work folder $WORK, budget ${TOTAL}s"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, record rc and seconds, never abort
  local name=$1 limit=$2 kind=real; shift 2
  local t0 rc
  t0=$(date +%s)
  if [ "$limit" -le 5 ]; then
    echo "== $name: skipped (no time left)"; printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$kind" >> "$WORK/steps.tsv"; return
  fi
  echo "== $name (limit ${limit}s, $(elapsed)s elapsed)"
  timeout --signal=INT --kill-after=10 "$limit" "$@"; rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$kind" >> "$WORK/steps.tsv"
  echo "== $name: exit $rc"
}
gpu_step() {  # gpu_step NAME TIMEOUT_S CMD...: step, or in a dry run the stub writing the same files
  local name=$1 limit=$2; shift 2
  if [ "$DRY" = "1" ]; then
    local t0 rc
    t0=$(date +%s)
    echo "== $name: dry run stub"
    timeout 150 "$PY" benchmarks/devicecheck_stub.py "$name" "$WORK"; rc=$?  # (a busy CI machine: torch + plots)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" stub >> "$WORK/steps.tsv"
    return
  fi
  step "$name" "$limit" "$@"
}

step env 30 bash -c "nvidia-smi 2>&1 || echo 'nvidia-smi: not available'; echo commit ${BENCH_GIT_COMMIT:-unknown}; $PY - <<'PYEOF'
import importlib.metadata as md, os, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return 'absent'
print('python', sys.version.split()[0], '| cpus', os.cpu_count())
for name in ('torch', 'triton', 'transformers', 'adapters', 'pytest', 'pytest-xdist', 'pytest-timeout', 'onnxruntime'):
    print(name, version(name))
if os.environ.get('DEVICE_CHECK_DRY_RUN') == '1':
    print('torch.cuda: not queried (dry run)')
else:
    import torch
    print('torch cuda', torch.version.cuda, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PYEOF" > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

if [ "$DRY" != "1" ] && ! "$PY" -c "import fusedadapter.kernels, fusedadapter.csrc" >/dev/null 2>&1; then
  # not installed: map kernels/ and csrc/ under the package by links in this disposable copy of the
  # tree, as pyproject's package-dir does (an offline pip install is slower and may lack setuptools)
  echo "== linking kernels/ and csrc/ into fusedadapter/"
  [ -e fusedadapter/kernels ] || ln -s ../kernels fusedadapter/kernels
  [ -e fusedadapter/csrc ] || ln -s ../csrc fusedadapter/csrc
  printf '%s\t%s\t%s\t%s\n' link-packages 0 0 real >> "$WORK/steps.tsv"
fi

PYTEST_OPTS=(-q -rfE -p no:cacheprovider)
if "$PY" -c "import xdist" >/dev/null 2>&1; then PYTEST_OPTS+=(-n "$WORKERS"); fi
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PYTEST_OPTS+=(--timeout="${DC_TEST_TIMEOUT:-80}"); fi

# In the background while the Triton tests run: the CUDA extension build (needed by tests-cuda and
# the cuda provider) and the spill report (CPU only: Triton's own ptxas on this machine's Triton).
gpu_step build-cuda "$T_BUILD" env MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m fusedadapter.extension cuda \
  > "$WORK/build-cuda.log" 2>&1 &
BUILD_PID=$!
gpu_step spills 100 env -u TRITON_INTERPRET "$PY" -m fusedadapter.kernels.aot_check --target-only \
  --json-out "$WORK/spills.json" > "$WORK/spills.log" 2>&1 &
SPILLS_PID=$!

# The Triton tests run one fixed config per kernel (their fixtures set it; autotuning every variant
# they create would take minutes); test_gpu_autotune runs the autotuner and test_gpu_every_config
# each config of the autotune lists. tests/test_gpu_*.py are the GPU-only files (Triton on the GPU,
# the kernel switches' new sides, CUDA graphs and torch.compile's reduce-overhead mode).
TRITON_TESTS=(tests/test_triton.py tests/test_triton_switches.py tests/test_triton_grouped.py)
for f in tests/test_gpu_*.py; do [ -f "$f" ] && TRITON_TESTS+=("$f"); done
# (the CUDA backend's graph test waits for the extension: it runs with tests-cuda)
CUDA_GRAPH_TEST=tests/test_gpu_graphs.py::test_graph_by_hand_cuda_backend
gpu_step tests-triton "$(min "$T_TESTS" "$(( $(left) - 160 ))")" "$PY" -m pytest "${PYTEST_OPTS[@]}" \
  --junitxml="$WORK/pytest-triton.xml" --deselect "$CUDA_GRAPH_TEST" "${TRITON_TESTS[@]}" > "$WORK/pytest-triton.log" 2>&1
tail -n 15 "$WORK/pytest-triton.log"

echo "== waiting for build-cuda ($(elapsed)s elapsed)"
wait "$BUILD_PID"
if [ "$(grep '^build-cuda' "$WORK/steps.tsv" | cut -f2)" != "0" ]; then
  # a failed or killed build (which may leave its lock file behind) is not retried by every later
  # process: the cuda backend is recorded as unavailable and the rest goes on without it
  echo "== the CUDA extension did not build: FUSEDADAPTER_SKIP_CUDA=1 from here on"
  export FUSEDADAPTER_SKIP_CUDA=1
fi
gpu_step tests-cuda "$(min "$T_TESTS_CUDA" "$(( $(left) - 150 ))")" "$PY" -m pytest "${PYTEST_OPTS[@]}" \
  --junitxml="$WORK/pytest-cuda.xml" tests/test_native.py "$CUDA_GRAPH_TEST" -k "cuda" > "$WORK/pytest-cuda.log" 2>&1
tail -n 15 "$WORK/pytest-cuda.log"
wait "$SPILLS_PID"

# The target row first (its point starts at once: --budget-s only stops new points; it writes its
# rows when the point ends, so it gets 55 s), then the grid while 155 s stay for the rows below and
# the summary. Modes nograd and full: the summary's targets (forward/backward alone: the grid runs).
BUDGET=$(( $(left) - 155 - 55 ))
[ "$BUDGET" -lt 1 ] && BUDGET=1
gpu_step bench "$(min "$(( BUDGET + 55 ))" "$(( $(left) - 15 ))")" "$PY" -m benchmarks gpu --device cuda \
  --out "$WORK/bench" --budget-s "$BUDGET" --modes nograd full --no-progress > "$WORK/bench.log" 2>&1
tail -n 30 "$WORK/bench.log"
# BERT-base with 8 fused adapters against the bare model, eager and as a CUDA graph (issue 12's
# <= 10% over the bare model, both ways); then the target row once per kernel switch (one process,
# interleaved, so one run times both sides of each); then the autotune lists before the spill
# measurement. Each while 15 s stay for the summary (a row that does not fit is recorded as skipped).
LIM=$(min 40 "$(( $(left) - 15 ))")
gpu_step bench-graphs "$LIM" "$PY" -m benchmarks.devicecheck_graphs --out "$WORK/bench-graphs" \
  --budget-s "$(( LIM - 8 ))" > "$WORK/bench-graphs.log" 2>&1
tail -n 20 "$WORK/bench-graphs.log"
LIM=$(min 45 "$(( $(left) - 15 ))")
gpu_step bench-switches "$LIM" "$PY" -m benchmarks.devicecheck_switches --out "$WORK/bench-switches" \
  --budget-s "$(( LIM - 12 ))" > "$WORK/bench-switches.log" 2>&1
tail -n 25 "$WORK/bench-switches.log"
LIM=$(min 30 "$(( $(left) - 60 ))")
mkdir -p "$WORK/bench-multitask"
gpu_step bench-multitask "$LIM" "$PY" -m benchmarks multitask --device cuda --dtype bfloat16 --backend triton \
  --k 4 2 8 --rows contiguous interleaved --repeats 7 --threads 0 --budget-s "$(( LIM - 15 ))" \
  --json "$WORK/bench-multitask/results.json" > "$WORK/bench-multitask.log" 2>&1
tail -n 16 "$WORK/bench-multitask.log"
gpu_step bench-multitask-train "$(min 20 "$(( $(left) - 40 ))")" "$PY" -m benchmarks multitask --train --device cuda \
  --dtype bfloat16 --backend triton --k 4 --rows contiguous --repeats 7 --threads 0 \
  --json "$WORK/bench-multitask/train.json" > "$WORK/bench-multitask-train.log" 2>&1
tail -n 8 "$WORK/bench-multitask-train.log"
TARGET_ROW=(--providers triton torch --modes nograd full --tokens 16384 --dtype bfloat16 --no-plots --no-progress)
gpu_step bench-configs-v1 "$(min 25 "$(( $(left) - 15 ))")" env FUSEDADAPTER_TRITON_CONFIGS=v1 "$PY" -m benchmarks gpu \
  --device cuda --out "$WORK/bench-configs-v1" --budget-s 1 "${TARGET_ROW[@]}" > "$WORK/bench-configs-v1.log" 2>&1

# summary.{md,json} in the work folder (they go into the archive too) and in OUTDIR: the time left
# and the 15 s kept for it, at least 20 s (a few seconds on the GPU machine; a busy CPU machine's
# dry run may need more), at most 45
SUMMARY_LIM=$(min 45 "$(( $(left) + 15 ))")
[ "$SUMMARY_LIM" -lt 20 ] && SUMMARY_LIM=20
[ "$DRY" = "1" ] && SUMMARY_LIM=150  # no GPU time at stake; a busy CI machine is slow to import torch
step summary "$SUMMARY_LIM" "$PY" -m benchmarks device-summary "$WORK" --out "$OUT"

# pack: logs over 2 MiB keep their tail; an archive over 15 MiB goes without the plots
for f in $(find "$WORK" -type f \( -name '*.log' -o -name '*.xml' \) -size +2M); do
  tail -c 2000000 "$f" > "$f.tail" && mv "$f.tail" "$f"
done
tar -C "$WORK" -czf "$OUT/device_check.tar.gz" .
if [ "$(stat -c %s "$OUT/device_check.tar.gz")" -gt 15000000 ]; then
  echo "== archive over 15 MB: leaving the plots out"
  find "$WORK" -name '*.png' -delete
  tar -C "$WORK" -czf "$OUT/device_check.tar.gz" .
fi
rm -rf "$WORK"
echo "device_check: $(elapsed)s in all; OUTDIR holds: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "see $OUT/summary.md"
