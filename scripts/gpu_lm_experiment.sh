#!/usr/bin/env bash
# scripts/gpu_lm_experiment.sh: issue 21's experiment (scripts/lm_experiment.sh)
# on the GPU host, spread over consecutive device calls of one warm machine.
#
# Each call builds `sparseflash` (incremental after the first call), runs the
# experiment's phases until DEADLINE seconds have passed (a training run in
# progress stops with a checkpoint and resumes on the next call), and packs
# results/*.json, the logs and each run's metrics.jsonl into $OUT/lm-experiment.tgz.
# The experiment's directory (EXP, default runs/lm-experiment, git-ignored)
# stays on the machine while it is warm; a fresh machine starts it again (the
# results already fetched are kept by copying them back into EXP/results first:
# RESULTS_FROM=DIR).
#
# The tokenizer: TOKENIZER=FILE (carried), e.g. the SmolLM2 tokenizer as a
# 2 MB tokenizer-only GGUF: python3 scripts/tokenizer_gguf.py SmolLM2.gguf
# data/smollm2-tokenizer.gguf (data/ is git-ignored: carry it).
#
# Usage (on the host, from the repo root):
#   TOKENIZER=data/smollm2-tokenizer.gguf DEADLINE=540 bash scripts/gpu_lm_experiment.sh [PHASE...]
# Environment: OUT (default ./gpu-out), DEADLINE (default 540), and everything
# scripts/lm_experiment.sh reads (CONTEXTS, STEPS, NAMES, MODEL_SETS, ...).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
SECONDS=0
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
EXP=${EXP:-runs/lm-experiment}
export EXP
mkdir -p "$EXP/logs" "$EXP/results"
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
if [ -n "${RESULTS_FROM:-}" ]; then
  cp -n "$RESULTS_FROM"/*-train.json "$EXP/results/" 2>/dev/null || true
fi

# shellcheck disable=SC2317  # called by the EXIT trap
pack() {
  local extra=()
  mapfile -t extra < <(cd "$EXP" && ls -d report.md runs/*/metrics.jsonl runs/*/device-seconds 2>/dev/null)
  tar czf "$OUT/lm-experiment.tgz" -C "$EXP" results logs "${extra[@]}" 2>/dev/null
}
trap pack EXIT

OUT=$OUT/build GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="${GPU_BUILD_TARGETS:-sparseflash}" \
  bash scripts/gpu_host.sh >"$EXP/logs/build.log" 2>&1 ||
  { echo "build failed:"; grep -E "error|FAILED" "$EXP/logs/build.log" | head -20; tail -3 "$EXP/logs/build.log"; exit 1; }
echo "build: ${SECONDS}s"
[ "${PHASE:-}" = build ] && exit 0

# The deadline counts from this script's start.
DEADLINE=$(( ${DEADLINE:-540} - SECONDS )) bash scripts/lm_experiment.sh "${@:-data train}"
rc=$?
PYTHON=python3 bash scripts/lm_experiment.sh report >/dev/null 2>&1
echo "---- after ${SECONDS}s (exit $rc)"
[ -s "$EXP/report.md" ] && sed -n '/^## N =/,$p' "$EXP/report.md" | grep -v '^$' | head -40
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
exit $rc
