#!/usr/bin/env bash
# scripts/gpu_train_step.sh: on the GPU host, build and run the training-step
# benchmark (bench/train_step.cc) and, in the same call, the PyTorch anchors
# (bench/train_step_torch.py: eager and torch.compile, SDPA cuDNN and flash),
# then merge both into one JSON and print the table (bench/train_step_report.py).
#
# Environment:
#   OUT=DIR            results: train-step-<gpu>.json (merged), the two raw JSONs,
#                      logs.tgz (every log; the device tool returns at most 8 files)
#   STEP_N=1024,...    contexts (default 1024,4096,8192,16384,32768)
#   STEP_MODES=...     bench_train_step --modes (default: dense, dense-ours,
#                      hash:8/16/32 shared and separate, drop:0.3/0.5/0.7)
#   STEP_DATA=DIR      a prepared corpus (sparseflash prepare) for real tokens;
#                      STEP_TRAIN_FIRST=K trains K steps on it before timing
#   STEP_ARGS=...      more bench_train_step flags (--kernels, --steps 10, ...)
#   TORCH_N=...        contexts of the anchors (default STEP_N); TORCH_ARGS: more
#                      train_step_torch.py flags; RUN_TORCH=0 skips the anchors
#   RUN_TESTS=1        also run fused_test, attention_test, lsh_test, local_window_test and model_test first
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
gpu_logs logs
N=${STEP_N:-1024,4096,8192,16384,32768}
MODES=${STEP_MODES:-dense,dense-ours,hash:8,hash:16,hash:32,hash:8:sep,hash:16:sep,hash:32:sep,drop:0.3,drop:0.5,drop:0.7}
OUT=$LOGS GPU_PHASES="deps configure build" \
  GPU_BUILD_TARGETS="${GPU_BUILD_TARGETS:-bench_train_step fused_test attention_test lsh_test local_window_test model_test}" \
  bash scripts/gpu_host.sh >"$LOGS/setup.log" 2>&1 || {
  echo "setup failed"; grep -E "error|FAILED" "$LOGS/setup.log" | head -30; tail -5 "$LOGS/setup.log"; }
echo "setup: ${SECONDS}s"
status=0
if [ "${RUN_TESTS:-1}" = 1 ]; then
  for t in fused_test attention_test lsh_test local_window_test model_test; do
    [ -x "build-gpu/tests/$t" ] || { echo "$t: not built"; status=1; continue; }
    "build-gpu/tests/$t" --gtest_brief=1 >"$LOGS/$t.log" 2>&1
    rc=$?
    echo "$t: exit $rc, $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \]' "$LOGS/$t.log" | tr '\n' ' ')"
    [ $rc -eq 0 ] || { status=1; grep -B2 -A12 "Failure\|error" "$LOGS/$t.log" | head -60; }
  done
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-' | tr 'A-Z' 'a-z')
data_args=()
[ -n "${STEP_DATA:-}" ] && data_args=(--data "$STEP_DATA" --train_first "${STEP_TRAIN_FIRST:-0}")
cmd="build-gpu/bench/bench_train_step --n $N --modes $MODES ${data_args[*]} ${STEP_ARGS:-}"
echo "+ $cmd"
$cmd --json "$OUT/ours.json" 2>&1 | tee "$LOGS/ours.log" | grep -v "^ *N .*trained" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ "${RUN_TORCH:-1}" = 1 ]; then
  PYTHONUNBUFFERED=1 python3 bench/train_step_torch.py --n "${TORCH_N:-$N}" ${TORCH_ARGS:-} \
    --json "$OUT/torch.json" >"$LOGS/torch.log" 2>&1 || status=1
  tail -15 "$LOGS/torch.log"
fi
python3 bench/train_step_report.py "$OUT/ours.json" "$OUT/torch.json" \
  --out "$OUT/train-step-$gpu.json" --command "$cmd" || status=1
echo "total: ${SECONDS}s"
exit $status
