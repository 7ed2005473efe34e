#!/usr/bin/env bash
# scripts/test.sh: set up and build (scripts/setup.sh), then run the test suite.
#
# Usage: scripts/test.sh [CTEST_ARGS...]     e.g. scripts/test.sh -R data_test
# Extra arguments go to ctest. SPARSEFLASH_BUILD_DIR and the other settings of
# scripts/setup.sh apply. The exit status is ctest's (or setup's, if that fails).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ME=scripts/test.sh
SECONDS=0
BUILD_DIR=${SPARSEFLASH_BUILD_DIR:-build}

set +e
bash scripts/setup.sh
rc=$?
set -e
if [ $rc -ne 0 ]; then
  printf '%s: setup failed (exit %d) after %ds; no tests were run\n' "$ME" "$rc" "$SECONDS" >&2
  exit "$rc"
fi
setup_s=$SECONDS

printf '==> [%4ds] running the tests in %s\n' "$SECONDS" "$BUILD_DIR"
# Keep a copy of ctest's output to read the totals from; tee keeps it on screen.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$(nproc)" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
test_s=$((SECONDS - setup_s))

# ctest ends with e.g. "100% tests passed, 0 tests failed out of 57".
totals=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1 || true)
if [ -n "$totals" ]; then
  total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$totals")
  failed=$(sed -E 's/.*passed, ([0-9]+) tests? failed.*/\1/' <<<"$totals")
  counts="$total tests, $failed failed"
elif grep -q 'No tests were found' "$log"; then
  counts="no tests found"
else
  counts="test count unknown"
fi
printf '%s: %s (exit %d); wall time %ds (setup %ds, tests %ds)\n' \
  "$ME" "$counts" "$rc" "$SECONDS" "$setup_s" "$test_s"
exit "$rc"
