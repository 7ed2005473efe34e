#!/usr/bin/env bash
# Builds the checkpoint parsers' libFuzzer targets with clang++ and runs each
# for a bounded time on a generated seed corpus. See --help.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: fuzz/fuzz.sh [--build-dir DIR] [--seconds N] [--only NAME] [--no-run]

Builds fuzz_safetensors, fuzz_gguf and fuzz_llama2c (clang++ with
-fsanitize=fuzzer,address,undefined; objects rebuilt only when a source
changed), writes seed corpora with make_seeds, then runs each fuzzer for N
seconds (default 20) on DIR/corpus/NAME (kept between runs, so it grows).
Crashing inputs land in DIR/artifacts/NAME/; the script then exits non-zero.
Prints runs and runs/s per fuzzer.

  --build-dir DIR  where objects, binaries, corpora go (default build/fuzz)
  --seconds N      time per fuzzer (libFuzzer -max_total_time)
  --only NAME      run only this fuzzer (safetensors, gguf or llama2c)
  --no-run         build and write seeds only
Environment: CXX_FUZZ (default clang++), FUZZ_FLAGS (extra libFuzzer flags),
SPARSEFLASH_ALLOW_NO_FUZZ=1 (exit 77, a ctest skip, when the compiler is missing).
USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build/fuzz"
SECONDS_PER=20
ONLY=""
RUN=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir) BUILD="$2"; shift 2 ;;
    --seconds) SECONDS_PER="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --no-run) RUN=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "fuzz.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

CXX="${CXX_FUZZ:-clang++}"
if ! command -v "$CXX" >/dev/null; then
  # Machines set up by scripts/setup.sh (CI included) have clang and must run
  # the fuzzers; elsewhere (the offline GPU host) ctest reports a skip.
  if [ "${SPARSEFLASH_ALLOW_NO_FUZZ:-0}" = 1 ]; then
    echo "fuzz.sh: $CXX not found; skipped (SPARSEFLASH_ALLOW_NO_FUZZ=1)" >&2
    exit 77
  fi
  echo "fuzz.sh: $CXX not found (scripts/setup.sh installs clang)" >&2
  exit 1
fi

COMMON=(-std=c++17 -O1 -g -fno-omit-frame-pointer -I"$ROOT"
        -fsanitize=address,undefined -fno-sanitize-recover=all)
mkdir -p "$BUILD/obj"

# --- Build --------------------------------------------------------------------
LIB_SOURCES=(mapped_file atomic_file tensor safetensors gguf gguf_writer llama)
OBJECTS=()
for name in "${LIB_SOURCES[@]}"; do
  src="$ROOT/checkpoint/$name.cc"
  obj="$BUILD/obj/$name.o"
  # Rebuild when the source or any checkpoint header is newer than the object.
  if [[ ! -f "$obj" || "$src" -nt "$obj" ]] || \
     [[ -n "$(find "$ROOT/checkpoint" -name '*.h' -newer "$obj" -print -quit)" ]]; then
    echo "compile $name.cc"
    "$CXX" "${COMMON[@]}" -fsanitize=fuzzer-no-link -c "$src" -o "$obj"
  fi
  OBJECTS+=("$obj")
done

link() {  # link OUTPUT SOURCE SANITIZERS
  local out="$1" src="$2" san="$3"
  local newest_obj
  newest_obj="$(ls -t "${OBJECTS[@]}" | head -1)"
  if [[ ! -f "$out" || "$src" -nt "$out" || "$newest_obj" -nt "$out" ]]; then
    echo "build $(basename "$out")"
    "$CXX" "${COMMON[@]}" "$san" "$src" "${OBJECTS[@]}" -o "$out" -lpthread
  fi
}
FUZZERS=(safetensors gguf llama2c)
for f in "${FUZZERS[@]}"; do
  link "$BUILD/fuzz_$f" "$ROOT/fuzz/fuzz_$f.cc" -fsanitize=fuzzer
done
link "$BUILD/make_seeds" "$ROOT/fuzz/make_seeds.cc" -fsanitize=address

rm -rf "$BUILD/seeds"
"$BUILD/make_seeds" "$BUILD/seeds"
[[ "$RUN" == 1 ]] || exit 0

# --- Run --------------------------------------------------------------------------
status=0
SUMMARY=()
for f in "${FUZZERS[@]}"; do
  [[ -z "$ONLY" || "$ONLY" == "$f" ]] || continue
  corpus="$BUILD/corpus/$f"
  artifacts="$BUILD/artifacts/$f/"
  mkdir -p "$corpus" "$artifacts"
  cp -n "$BUILD/seeds/$f"/* "$corpus"/ 2>/dev/null || true
  log="$BUILD/fuzz_$f.log"
  echo "run fuzz_$f for ${SECONDS_PER}s (log: $log)"
  # -timeout: a single input taking 10 s is a hang; -rss_limit_mb: a parser
  # that allocates what a header claims would exceed it.
  if ! "$BUILD/fuzz_$f" "$corpus" -max_total_time="$SECONDS_PER" -max_len=65536 -timeout=10 \
       -rss_limit_mb=2048 -artifact_prefix="$artifacts" -print_final_stats=1 ${FUZZ_FLAGS:-} \
       >"$log" 2>&1; then
    echo "fuzz_$f FAILED; last lines of $log:" >&2
    tail -40 "$log" >&2
    status=1
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  secs="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)"
  rate="?"
  if [[ -n "$runs" && -n "$secs" && "$secs" -gt 0 ]]; then rate=$((runs / secs)); fi
  SUMMARY+=("$(printf '%-18s %12s runs %8s runs/s  corpus %s files' "fuzz_$f" "${runs:-?}" "$rate" \
                "$(ls "$corpus" | wc -l)")")
done
printf '%s\n' "${SUMMARY[@]}"
exit "$status"
