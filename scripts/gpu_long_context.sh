#!/usr/bin/env bash
# scripts/gpu_long_context.sh: issue 20's experiment (scripts/long_context_experiment.sh)
# on the GPU host, spread over consecutive device calls of one warm machine.
#
# Each call builds `sparseflash` (incremental after the first call), then runs the
# experiment's phases until DEADLINE seconds have passed (a training run in
# progress stops with a checkpoint and resumes on the next call), and packs what
# it has so far (results/*.json, logs, report) into $OUT/long-context.tgz. The
# experiment's directory (EXP, default runs/long-context, git-ignored) stays on
# the machine between calls while it is warm.
#
# The model: SmolLM2-135M's GGUF in pieces under data/llama-parts*/ (the device
# tool carries at most 64 MiB per call, so the pieces travel over the first two
# calls: data/llama-parts-a with .deps, then data/llama-parts-b); or MODEL=PATH.
#
# Usage (on the host, from the repo root):
#   PHASE=build bash scripts/gpu_long_context.sh        # first call: build only
#   DEADLINE=540 bash scripts/gpu_long_context.sh [PHASE...]   # later calls
# Environment: OUT (default ./gpu-out), DEADLINE (default 540), and everything
# scripts/long_context_experiment.sh reads (N, STEPS, NAMES, ...).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
SECONDS=0
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
EXP=${EXP:-runs/long-context}
export EXP
mkdir -p "$EXP/logs" "$EXP/results"
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}

# shellcheck disable=SC2317  # called by the EXIT trap
pack() {
  local extra=()
  mapfile -t extra < <(cd "$EXP" && ls -d report.md experiment.json ./*.png runs/*/metrics.jsonl 2>/dev/null)
  tar czf "$OUT/long-context.tgz" -C "$EXP" results logs "${extra[@]}" 2>/dev/null
}
trap pack EXIT

OUT=$OUT/build GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="${GPU_BUILD_TARGETS:-sparseflash}" \
  bash scripts/gpu_host.sh >"$EXP/logs/build.log" 2>&1 ||
  { echo "build failed:"; grep -E "error|FAILED" "$EXP/logs/build.log" | head -20; tail -3 "$EXP/logs/build.log"; exit 1; }
echo "build: ${SECONDS}s"
[ "${PHASE:-}" = build ] && exit 0

# The deadline counts from this script's start; the experiment's own clock
# starts later, after the build.
DEADLINE=$(( ${DEADLINE:-540} - SECONDS )) bash scripts/long_context_experiment.sh "$@"
rc=$?
PYTHON=python3 bash scripts/long_context_experiment.sh report >/dev/null 2>&1
echo "---- after ${SECONDS}s (exit $rc)"
[ -s "$EXP/report.md" ] && cat "$EXP/report.md"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
exit $rc
