#!/usr/bin/env bash
# scripts/gpu_profile.sh: on the GPU host, build bench_attention and profile one
# kernel of it with Nsight Compute (stall reasons, instruction mix, top stall
# locations in the source).
#   KERNEL=regex   kernel name regex (default dkdv_kernel); TAG: suffix of the report files
#   BENCH_N / BENCH_D   the shape (default 16384 / 64); OUT=DIR for the report.
#   CASES=LIST  bench_attention --cases (e.g. drop:0.7); SDPA is left out then
#   SKIP_BUILD=1  reuse build-gpu
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="bench_attention" \
    bash scripts/gpu_host.sh >"$OUT/setup.log" 2>&1 || { echo "setup failed"; tail -30 "$OUT/setup.log"; exit 1; }
fi
case_args=()
if [ -n "${CASES:-}" ]; then case_args=(--cases "$CASES" --nosdpa); fi
m=smsp__pcsamp_warps_issue_stalled
metrics=$(for s in barrier wait math_pipe_throttle short_scoreboard long_scoreboard mio_throttle \
  lg_throttle dispatch_stall not_selected selected tex_throttle branch_resolving no_instructions; do
  printf '%s_%s,' "$m" "$s"; done)
metrics+="smsp__inst_executed_pipe_tensor_op_hmma.sum,smsp__inst_executed_op_ldsm.sum,"
metrics+="smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_shared_st.sum,"
metrics+="smsp__inst_executed_op_local_ld.sum,smsp__inst_executed_op_global_red.sum,"
metrics+="smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_alu.sum,"
metrics+="smsp__inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,gpu__time_duration.sum"
ncu --kernel-name "regex:${KERNEL:-dkdv_kernel}" --launch-count 1 --import-source yes \
  --section SourceCounters --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --metrics "$metrics" -o "$OUT/profile${TAG:-}" \
  build-gpu/bench/bench_attention --n "${BENCH_N:-16384}" --d "${BENCH_D:-64}" --reps 1 "${case_args[@]}" >"$OUT/ncu_run${TAG:-}.log" 2>&1
ncu --import "$OUT/profile${TAG:-}.ncu-rep" --print-units base --page details > "$OUT/details${TAG:-}.txt" 2>&1
ncu --import "$OUT/profile${TAG:-}.ncu-rep" --page source --csv --print-source sass > "$OUT/source_sass${TAG:-}.csv" 2>&1
grep -E "stalled|inst_executed|bank_conflicts|duration" "$OUT/details${TAG:-}.txt" | sed 's/  */ /g'
