#!/usr/bin/env bash
# scripts/gpu_saap_decode.sh: on the GPU host, build the SAAP decode kernel's
# test and benchmark only (saap_decode_test, bench_saap_decode in build-gpu),
# run the test, then time one decode step against SDPA over the full cache
# (Llama-3.1-8B attention shapes, N = 128k/256k/512k, batch 1 and 8). Uses
# scripts/gpu_host.sh's set-up (carry .deps). Logs and the bench JSON go to
# $OUT; the bench table is printed last.
#   SAAP_DECODE_BENCH_ARGS: more bench_saap_decode flags (e.g. "--n 131072 --batch 1").
#   SAAP_DECODE_TEST_FILTER: a gtest filter for saap_decode_test.
#   SAAP_DECODE_PHASES: any of "build test bench" (default all three), e.g. "build" in
#   one call and "test bench" in the next (the build tree stays on a warm host).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
ME=scripts/gpu_saap_decode.sh
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

PHASES=" ${SAAP_DECODE_PHASES:-build test bench} "
for p in $PHASES; do
  case $p in build | test | bench) ;; *) die "unknown phase '$p' in SAAP_DECODE_PHASES (build test bench)" ;; esac
done
wanted() { [[ $PHASES == *" $1 "* ]]; }

# deps always runs (seconds): the binaries need the unpacked libraries at run time.
if wanted build; then gpu_phases="deps configure build"; else gpu_phases="deps"; fi
GPU_PHASES="$gpu_phases" GPU_BUILD_TARGETS="saap_decode_test bench_saap_decode" \
  OUT=/tmp/sf-saap-decode-host bash scripts/gpu_host.sh >"$OUT/setup.log" 2>&1 ||
  { tail -n 40 "$OUT/setup.log"; die "set-up or build failed (log above)"; }
cp /tmp/sf-saap-decode-host/build.log "$OUT/build.log" 2>/dev/null

status=0
if wanted test; then
  SF_KERNEL_TEST_VERBOSE=1 build-gpu/tests/saap_decode_test --gtest_brief=1 \
    ${SAAP_DECODE_TEST_FILTER:+--gtest_filter=$SAAP_DECODE_TEST_FILTER} 2>&1 |
    tee "$OUT/saap_decode_test.log" | tail -n 40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if ! wanted bench; then
  printf '%s: phases%s: %s\n' "$ME" "$PHASES" "$([ $status -eq 0 ] && echo ok || echo 'FAILED (see logs)')"
  exit $status
fi

# bench/results/<what>-<gpu>.json (bench/results/README.md): the GPU's short model name
# (h100, h200), else its whole name.
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
gpu=$(printf '%s' "$gpu_name" | grep -oE '\b[A-Z][0-9]{2,4}\b' | head -n 1 | tr '[:upper:]' '[:lower:]')
[ -n "$gpu" ] || gpu=$(printf '%s' "$gpu_name" | tr ' ' '_' | tr -cd 'A-Za-z0-9_-' | tr '[:upper:]' '[:lower:]')
mkdir -p bench/results
json="bench/results/saap-decode-${gpu:-gpu}.json"
# shellcheck disable=SC2086  # SAAP_DECODE_BENCH_ARGS is a list of flags
build-gpu/bench/bench_saap_decode --json "$json" ${SAAP_DECODE_BENCH_ARGS:-} >"$OUT/bench.log" 2>&1 ||
  status=1
cp "$json" "$OUT/" 2>/dev/null || status=1
# The table last: from the line "GPU: ..." on (the set-up progress lines come before it).
sed -n '/^GPU: /,$p' "$OUT/bench.log"
[ -s "$OUT/bench.log" ] && ! grep -q '^GPU: ' "$OUT/bench.log" && tail -n 30 "$OUT/bench.log"
printf '%s: %s; results in %s\n' "$ME" "$([ $status -eq 0 ] && echo ok || echo 'FAILED (see logs)')" "$OUT"
exit $status
