#!/usr/bin/env bash
# scripts/gpu_wgmma_probe.sh: on the GPU host (an H100: compute capability 9.0),
# build only wgmma_probe_test (build-gpu, through scripts/gpu_host.sh's set-up;
# carry .deps) and run it: the Hopper wgmma building blocks of
# attention/kernels/wgmma.cuh (128B-swizzled smem descriptors, K-major and
# MN-major B, A from registers, the accumulator layout) against a CPU product.
# Logs go to $OUT; a short summary is printed last.
#   WGMMA_PROBE_TEST_FILTER: a gtest filter for wgmma_probe_test.
#   WGMMA_PROBE_PHASES: any of "build test" (default both).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
ME=scripts/gpu_wgmma_probe.sh
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  echo "usage: OUT=DIR bash $ME"
  exit 0
fi
[ $# -eq 0 ] || { printf '%s: error: no arguments expected (got "%s"); see --help\n' "$ME" "$*" >&2; exit 1; }
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

PHASES=" ${WGMMA_PROBE_PHASES:-build test} "
for p in $PHASES; do
  case $p in build | test) ;; *) die "unknown phase '$p' in WGMMA_PROBE_PHASES (build test)" ;; esac
done
wanted() { [[ $PHASES == *" $1 "* ]]; }

# deps always runs (seconds): the test binary needs the unpacked libraries at run time.
if wanted build; then gpu_phases="deps configure build"; else gpu_phases="deps"; fi
GPU_PHASES="$gpu_phases" GPU_BUILD_TARGETS="wgmma_probe_test" \
  OUT=/tmp/sf-wgmma-probe-host bash scripts/gpu_host.sh >"$OUT/setup.log" 2>&1 ||
  { tail -n 40 "$OUT/setup.log"; die "set-up or build failed (log above)"; }
cp /tmp/sf-wgmma-probe-host/build.log "$OUT/build.log" 2>/dev/null

status=0
if wanted test; then
  nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader >"$OUT/gpu.txt" 2>&1
  SF_KERNEL_TEST_VERBOSE=1 build-gpu/tests/wgmma_probe_test \
    ${WGMMA_PROBE_TEST_FILTER:+--gtest_filter=$WGMMA_PROBE_TEST_FILTER} >"$OUT/wgmma_probe_test.log" 2>&1 ||
    status=1
  # Summary: the GPU, each case's verdict (and its measured error), the totals.
  echo "GPU: $(head -n 1 "$OUT/gpu.txt")"
  grep -E '^\[ +(OK|FAILED|SKIPPED) +\] Wgmma.* \([0-9]+ ms\)$|^  seed |: seed [0-9]+$|outside 1e-3|matched the reference|far from zero' \
    "$OUT/wgmma_probe_test.log" | head -n 60
  grep -m 1 -A 1 ': Skipped$' "$OUT/wgmma_probe_test.log" | tail -n 1 | sed 's/^/skip reason: /'
  grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ test' "$OUT/wgmma_probe_test.log"
fi
printf '%s: phases%s: %s; logs in %s\n' "$ME" "$PHASES" "$([ $status -eq 0 ] && echo ok || echo 'FAILED (see logs)')" "$OUT"
exit $status
