#!/usr/bin/env bash
# scripts/gpu_experiment.sh: one of the resumable experiments on the GPU host,
# spread over consecutive device calls of one warm machine:
#   EXPERIMENT=long-context  issue 20's long-context fine-tuning
#                            (scripts/long_context_experiment.sh; EXP default runs/long-context)
#   EXPERIMENT=lm            issue 21's language-modelling comparison
#                            (scripts/lm_experiment.sh; EXP default runs/lm-experiment)
#
# Each call builds `sparseflash` (incremental after the first call), runs the
# experiment's phases until DEADLINE seconds have passed (a training run in
# progress stops with a checkpoint and resumes on the next call), and packs what
# it has so far (results/*.json, logs, each run's metrics.jsonl, the report)
# into $OUT/$EXPERIMENT.tgz. The experiment's directory (EXP, git-ignored) stays
# on the machine while it is warm; on a fresh machine RESULTS_FROM=DIR (results
# fetched earlier and committed, e.g. bench/results/lm-experiment-h100) copies
# them into EXP/results first, so finished steps are skipped.
#
# Inputs the host lacks travel with the call: .deps always; for long-context the
# model's GGUF in pieces (data/llama-parts-a with .deps on the first call, then
# data/llama-parts-b; or MODEL=PATH); for lm the tokenizer (TOKENIZER=FILE, e.g.
# data/tokenizers/smollm2.gguf made by scripts/staging/tokenizer_gguf.py).
#
# Usage (on the host, from the repo root):
#   EXPERIMENT=lm PHASE=build bash scripts/gpu_experiment.sh         # build only
#   EXPERIMENT=lm DEADLINE=540 bash scripts/gpu_experiment.sh [PHASE...]
# Environment: OUT (default ./gpu-out), DEADLINE (default 540), GPU_BUILD_TARGETS
# (default sparseflash), and everything the experiment's script reads.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
case ${EXPERIMENT:-} in
  long-context) script=scripts/long_context_experiment.sh; EXP=${EXP:-runs/long-context} ;;
  lm) script=scripts/lm_experiment.sh; EXP=${EXP:-runs/lm-experiment} ;;
  *) echo "gpu_experiment.sh: set EXPERIMENT=long-context or EXPERIMENT=lm" >&2; exit 2 ;;
esac
export EXP
mkdir -p "$EXP/logs" "$EXP/results"
if [ -n "${RESULTS_FROM:-}" ]; then
  cp -n "$RESULTS_FROM"/*.json "$EXP/results/" 2>/dev/null || true
fi

# shellcheck disable=SC2317  # called by the EXIT trap
pack() {
  local extra=()
  mapfile -t extra < <(cd "$EXP" && ls -d report.md experiment.json ./*.png runs/*/metrics.jsonl \
                         runs/*/device-seconds 2>/dev/null)
  tar czf "$OUT/$EXPERIMENT.tgz" -C "$EXP" results logs "${extra[@]}" 2>/dev/null
}
trap pack EXIT

OUT=$OUT/build GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="${GPU_BUILD_TARGETS:-sparseflash}" \
  bash scripts/gpu_host.sh >"$EXP/logs/build.log" 2>&1 ||
  { echo "build failed:"; grep -E "error|FAILED" "$EXP/logs/build.log" | head -20; tail -3 "$EXP/logs/build.log"; exit 1; }
echo "build: ${SECONDS}s"
[ "${PHASE:-}" = build ] && exit 0

# The deadline counts from this script's start; the experiment's own clock
# starts later, after the build.
DEADLINE=$(( ${DEADLINE:-540} - SECONDS )) bash "$script" "$@"
rc=$?
PYTHON=python3 bash "$script" report >/dev/null 2>&1
echo "---- after ${SECONDS}s (exit $rc)"
[ -s "$EXP/report.md" ] && grep -v '^$' "$EXP/report.md" | head -60
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
exit $rc
