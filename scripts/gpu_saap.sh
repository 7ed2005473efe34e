#!/usr/bin/env bash
# scripts/gpu_saap.sh: on the GPU host, build and run the SAAP tests (the CUDA
# k-means check included) and time the fitting phases at SmolLM2-135M scale on
# random data (saap_bench: k-means over 30 layers x 3 KV heads of 65536 keys,
# C = 256; classifiers for 30 x 9 query heads, 16384 queries each, 2000 steps).
# Uses scripts/gpu_host.sh's set-up (carry .deps). Prints the bench table last;
# logs and saap_bench.json go to $OUT.
#   SAAP_BENCH_ARGS: more saap_bench flags (e.g. "--partitions 1024 --keys 131072").
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
ME=scripts/gpu_saap.sh
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="saap_test saap_bench" OUT=/tmp/sf-saap-host \
  bash scripts/gpu_host.sh >"$OUT/setup.log" 2>&1 ||
  { tail -n 40 "$OUT/setup.log"; die "build failed (log above)"; }

status=0
build-gpu/tests/saap_test --gtest_brief=1 2>&1 | tee "$OUT/saap_test.log" | tail -n 20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# shellcheck disable=SC2086  # SAAP_BENCH_ARGS is a list of flags
build-gpu/bench/saap_bench --device cuda --json "$OUT/saap_bench.json" ${SAAP_BENCH_ARGS:-} \
  2>&1 | tee "$OUT/saap_bench.log" || status=1
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
