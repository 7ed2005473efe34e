#!/usr/bin/env bash
# scripts/gpu_saap_llama.sh: on the GPU host, SAAP on SmolLM2-135M-Instruct
# (GGUF Q4_1, bf16, context 8192): the SAAP tests, `saap fit` on calibration
# text (pre-RoPE keys = SAAP, and RoPE'd keys = the baseline), then `saap eval`
# on held-out text (recall@l and keys visited for SAAP and the baselines,
# perplexity dense vs SAAP, pass-key retrieval), and `eval` / `generate` with
# --attention saap. Prints the tables last; JSON and logs go to $OUT.
#
# Inputs (scripts/staging/fetch_gpu_llama.sh makes them; git-ignored, so carry them):
#   .deps/ (Debian packages, .deps/llama/SmolLM2.sha256, .deps/saap/{calibration,heldout}.txt)
#   .deps-gguf/part1, part2: the model in halves, in two calls (scripts/staging/stage_smollm2.sh).
#
# Environment: OUT (default ./gpu-out); SAAP_PHASES (default "build tests fit eval"; the
# index files stay in build-gpu/saap-run/ between calls on the same host);
# SAAP_FIT_ARGS / SAAP_EVAL_ARGS: more flags for saap fit / saap eval; SAAP_SPACES (default
# "pre-rope rope"): the indexes to fit; SAAP_TAG: a name for this configuration's index files.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
ME=scripts/gpu_saap_llama.sh
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }
PHASES=" ${SAAP_PHASES:-build tests fit eval} "
want() { [[ "$PHASES" == *" $1 "* ]]; }

# shellcheck source=scripts/staging/stage_smollm2.sh
. scripts/staging/stage_smollm2.sh
stage_smollm2 || exit $?
CAL=.deps/saap/calibration.txt
HELD=.deps/saap/heldout.txt
[ -f "$CAL" ] && [ -f "$HELD" ] || die "$CAL / $HELD missing: carry .deps (scripts/staging/fetch_gpu_llama.sh)"
BIN=build-gpu/cli/sparseflash
RUN=build-gpu/saap-run
TAG=${SAAP_TAG:-smollm2}
mkdir -p "$RUN"
status=0

if want build; then
  GPU_PHASES="configure build" \
  GPU_BUILD_TARGETS="sparseflash saap_test saap_attention_test" OUT=/tmp/sf-saap-llama-host \
    bash scripts/gpu_host.sh >"$OUT/build.log" 2>&1 ||
    { tail -n 40 "$OUT/build.log"; die "build failed (log above)"; }
  echo "[${SECONDS}s] built"
else
  GPU_PHASES="deps" OUT=/tmp/sf-saap-llama-host bash scripts/gpu_host.sh >/dev/null 2>&1
fi

if want tests; then
  for t in saap_test saap_attention_test; do
    build-gpu/tests/$t --gtest_brief=1 >"$OUT/$t.log" 2>&1 || status=1
    echo "[${SECONDS}s] $t: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/$t.log" | tr '\n' ' ')"
  done
fi

COMMON=(--model "$GGUF" --context 8192 --device cuda --dtype bfloat16)
if want fit; then
  for space in ${SAAP_SPACES:-pre-rope rope}; do
    # shellcheck disable=SC2086  # SAAP_FIT_ARGS is a list of flags
    "$BIN" saap fit "${COMMON[@]}" --text "$CAL" --key-space "$space" \
        --saap-index "$RUN/$TAG-$space.saap" --json-file "$OUT/fit-$TAG-$space.json" \
        ${SAAP_FIT_ARGS:-} >"$OUT/fit-$TAG-$space.log" 2>&1 ||
      { tail -n 20 "$OUT/fit-$TAG-$space.log"; die "saap fit --key-space $space failed"; }
    echo "[${SECONDS}s] fit $TAG $space:"; tail -n 6 "$OUT/fit-$TAG-$space.log"
  done
fi

if want routing; then  # routing only, no perplexity or needle: quick comparisons
  ROPE=()
  [ -f "$RUN/$TAG-rope.saap" ] && ROPE=(--rope-index "$RUN/$TAG-rope.saap")
  # shellcheck disable=SC2086
  "$BIN" saap eval "${COMMON[@]}" --text "$HELD" --saap-index "$RUN/$TAG-pre-rope.saap" \
      "${ROPE[@]}" --top-l 4,8,16,32 --windows 2 --queries-per-window 512 --noneedle --perplexity-tokens 32768 \
      --json-file "$OUT/routing-$TAG.json" ${SAAP_EVAL_ARGS:-} >"$OUT/routing-$TAG.txt" \
      2>"$OUT/routing-$TAG.log" || { tail -n 20 "$OUT/routing-$TAG.log"; die "saap eval failed"; }
  echo "[${SECONDS}s] routing $TAG:"; grep -v "^symmetric_dot\|^random" "$OUT/routing-$TAG.txt"
fi

if want eval; then
  # shellcheck disable=SC2086  # SAAP_EVAL_ARGS is a list of flags
  ROPE=()
  [ -f "$RUN/$TAG-rope.saap" ] && ROPE=(--rope-index "$RUN/$TAG-rope.saap")
  "$BIN" saap eval "${COMMON[@]}" --text "$HELD" --saap-index "$RUN/$TAG-pre-rope.saap" \
      "${ROPE[@]}" --top-l 4,8,16,32 --windows 4 \
      --queries-per-window 512 --json-file "$OUT/eval.json" ${SAAP_EVAL_ARGS:-} \
      >"$OUT/eval.txt" 2>"$OUT/eval.log" ||
    { tail -n 20 "$OUT/eval.log"; die "saap eval failed"; }
  echo "[${SECONDS}s] saap eval done"
  # The same SAAP attention through the ordinary commands.
  "$BIN" eval "${COMMON[@]}" --text "$HELD" --stride 4096 --max-tokens 65536 --attention saap \
      --saap-index "$RUN/$TAG-pre-rope.saap" --top-l 16 --json-file "$OUT/eval-saap16.json" \
      >"$OUT/eval-saap16.txt" 2>"$OUT/eval-saap16.log" || status=1
  "$BIN" generate --model "$GGUF" --device cuda --dtype bfloat16 --attention saap --saap-index "$RUN/$TAG-pre-rope.saap" \
      --top-l 16 --prompt "The Linux kernel's memory management subsystem" --max-new-tokens 48 \
      --temperature 0 --json-file "$OUT/generate-saap16.json" >"$OUT/generate-saap16.txt" \
      2>"$OUT/generate-saap16.log" || status=1
  echo "[${SECONDS}s] eval / generate --attention saap done (status $status)"
  cat "$OUT/eval-saap16.txt" "$OUT/generate-saap16.txt"
  echo
  cat "$OUT/eval.txt"
fi
exit $status
