#!/usr/bin/env bash
# scripts/gpu_kernels.sh: on the GPU host, build the CUDA kernels, their
# torch-free test and the attention benchmark; run both. Uses the environment
# set-up of scripts/gpu_host.sh (phases deps, configure, build).
#   OUT=DIR   results (ctest log, bench JSON); BENCH_N / BENCH_D: lists for the benchmark;
#   BENCH_ARGS: more bench_attention flags (e.g. --deterministic); KERNEL_TEST_FILTER:
#   a gtest filter for sparse_flash_test and lsh_packing_test; RUN_ATTENTION_TEST=0 skips attention_test, lsh_test and local_window_test;
#   RUN_KERNEL_TEST=0 skips sparse_flash_test and lsh_packing_test; RUN_FLEX=1 also times FlexAttention
#   (bench/flex_attention.py, causal and hash over sorted rows, D = 64) at FLEX_N
#   (default BENCH_N);
#   NCU_CASES="hash:16 drop:0.7": afterwards, every kernel's time for these cases
#   (scripts/gpu_kernel_times.sh on the same build, D = 64).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
GPU_PHASES="deps configure build" \
  GPU_BUILD_TARGETS="${GPU_BUILD_TARGETS:-sparse_flash_test lsh_packing_test bench_attention attention_test lsh_test local_window_test}" \
  bash scripts/gpu_host.sh >"$OUT/setup.log" 2>&1 || {
  echo "setup failed"; tail -30 "$OUT/setup.log"; }
status=0
if [ "${RUN_KERNEL_TEST:-1}" = 1 ]; then
  for t in sparse_flash_test lsh_packing_test; do
    build-gpu/tests/$t --gtest_brief=1 ${KERNEL_TEST_FILTER:+--gtest_filter=$KERNEL_TEST_FILTER} 2>&1 | tee "$OUT/$t.log" | tail -60
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
if [ "${RUN_ATTENTION_TEST:-1}" = 1 ]; then
  for t in attention_test lsh_test local_window_test; do
    build-gpu/tests/$t --gtest_brief=1 2>&1 | tee "$OUT/$t.log" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi
if [ "${RUN_FLEX:-0}" = 1 ]; then
  PYTHONUNBUFFERED=1 python3 bench/flex_attention.py --n "${FLEX_N:-${BENCH_N:-8192,16384}}" \
    --modes dense,hash_sorted --json "$OUT/flex-$gpu.json" 2>&1 | tee "$OUT/flex.log" | tail -8
fi
build-gpu/bench/bench_attention --n "${BENCH_N:-8192,16384}" --d "${BENCH_D:-64,128}" \
  ${BENCH_ARGS:-} --json "$OUT/attention-$gpu.json" 2>&1 | tee "$OUT/bench.log" || status=1
if [ -n "${NCU_CASES:-}" ]; then
  mkdir -p "$OUT/ncu"
  OUT="$OUT/ncu" SKIP_BUILD=1 CASES="$NCU_CASES" BENCH_N="${BENCH_N%%,*}" \
    bash scripts/gpu_kernel_times.sh 2>&1 | tail -40
fi
exit $status
