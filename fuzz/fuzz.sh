#!/usr/bin/env bash
# Builds the file parsers' libFuzzer targets with clang++ and runs each
# for a bounded time on a generated seed corpus. See --help.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: fuzz/fuzz.sh [--build-dir DIR] [--seconds N] [--only NAME] [--no-run]

Builds the libFuzzer targets of the parsers of untrusted files (clang++ with
-fsanitize=fuzzer,address,undefined; objects rebuilt only when a source
changed): fuzz_safetensors, fuzz_gguf, fuzz_llama2c (checkpoint/),
fuzz_tokenizer_json (tokenizer/hf_json.h, then encode/decode), fuzz_saap_index
(saap/index_file.h) and fuzz_checkpoint_info (trainer/checkpoint.h
read_checkpoint_info, linked against LibTorch). Writes seed corpora with
make_seeds and make_checkpoint_seeds, then runs each fuzzer for N seconds
(default 20) on DIR/corpus/NAME (kept between runs, so it grows).
Crashing inputs land in DIR/artifacts/NAME/; the script then exits non-zero.
Prints runs and runs/s per fuzzer.

  --build-dir DIR  where objects, binaries, corpora go (default build/fuzz)
  --seconds N      time per fuzzer (libFuzzer -max_total_time)
  --only NAME      build and run only this fuzzer (safetensors, gguf, llama2c,
                   tokenizer_json, saap_index or checkpoint_info)
  --no-run         build and write seeds only
Environment: CXX_FUZZ (default clang++), FUZZ_FLAGS (extra libFuzzer flags),
TORCH_DIR (the torch package or libtorch folder; default .venv's torch),
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
# --- Build --------------------------------------------------------------------
# Every fuzzer, the objects it links and its libraries. Objects are rebuilt when
# their source or any of our headers (or a generated .pb.h) is newer.
FUZZERS=(safetensors gguf llama2c tokenizer_json saap_index checkpoint_info)
CHECKPOINT=(io/atomic_file.cc io/errors.cc checkpoint/{mapped_file,tensor,safetensors,gguf,gguf_writer,llama,llama_write}.cc)
TOKENIZER=(tokenizer/{text,pretokenizer,byte,bpe,spm,hf_json,gguf_vocab,gguf_file_vocab,tokenizer}.cc)
GEN="$BUILD/gen"
PROTO_LIBS=($(pkg-config --libs protobuf absl_status absl_statusor absl_strings absl_str_format))
sources_of() {  # the project sources (and generated ones, under $GEN) fuzzer $1 links
  case "$1" in
    safetensors|gguf|llama2c) echo "${CHECKPOINT[@]}" ;;
    tokenizer_json) echo "${CHECKPOINT[@]} ${TOKENIZER[@]}" ;;
    saap_index) echo "${CHECKPOINT[@]} $GEN/saap/saap_index.pb.cc saap/index_file.cc" ;;
    checkpoint_info) echo "${CHECKPOINT[@]} $GEN/configs/experiment.pb.cc $GEN/configs/presets.cc" \
                          "configs/config.cc configs/validate.cc trainer/checkpoint.cc trainer/optimizer.cc" ;;
  esac
}
libs_of() {  # io/ (in every fuzzer) needs Abseil's status, statusor and strings
  case "$1" in
    safetensors|gguf|llama2c) pkg-config --libs absl_status absl_statusor absl_strings ;;
    tokenizer_json) pkg-config --libs re2 absl_status absl_statusor absl_strings ;;
    saap_index) echo "${PROTO_LIBS[@]}" ;;
    checkpoint_info) echo "${PROTO_LIBS[@]} ${TORCH_LIBS[*]}" ;;
  esac
}
uses_torch() { [[ "$1" == checkpoint_info ]]; }

SELECTED=()
for f in "${FUZZERS[@]}"; do [[ -z "$ONLY" || "$ONLY" == "$f" ]] && SELECTED+=("$f"); done
if [[ ${#SELECTED[@]} == 0 ]]; then
  echo "fuzz.sh: no fuzzer named '$ONLY' (one of: ${FUZZERS[*]})" >&2
  exit 2
fi

# LibTorch (checkpoint_info only): the wheel in .venv, as the CMake build uses,
# or TORCH_DIR. Only our code is instrumented; libtorch.so is linked as is.
TORCH_CFLAGS=() TORCH_LIBS=()
if [[ " ${SELECTED[*]} " == *" checkpoint_info "* ]]; then
  TORCH_DIR="${TORCH_DIR:-$(ls -d "$ROOT"/.venv/lib/python3*/site-packages/torch 2>/dev/null | head -1)}"
  if [[ ! -f "$TORCH_DIR/include/torch/script.h" ]]; then
    echo "fuzz.sh: LibTorch not found (set TORCH_DIR to the torch package or libtorch folder)" >&2
    exit 1
  fi
  # Our protobuf headers (system) before torch's older copy, as CMakeLists.txt does.
  mkdir -p "$BUILD/protobuf_shim"
  ln -sfn /usr/include/google "$BUILD/protobuf_shim/google"
  TORCH_CFLAGS=(-I"$BUILD/protobuf_shim" -isystem "$TORCH_DIR/include"
                -isystem "$TORCH_DIR/include/torch/csrc/api/include")
  # libstdc++ first: libtorch.so exports its own std::filesystem (CMakeLists.txt).
  TORCH_LIBS=(-Wl,--push-state,--no-as-needed -lstdc++ -Wl,--pop-state -L"$TORCH_DIR/lib"
              -Wl,-rpath,"$TORCH_DIR/lib" -ltorch -ltorch_cpu -lc10)
fi

# Generated sources: protobuf messages (our protoc, so they match the system
# headers) and the embedded config presets.
mkdir -p "$BUILD/obj" "$GEN/configs" "$GEN/saap"
for proto in configs/experiment saap/saap_index; do
  if [[ ! -f "$GEN/$proto.pb.cc" || "$ROOT/$proto.proto" -nt "$GEN/$proto.pb.cc" ]]; then
    protoc --proto_path="$ROOT" --cpp_out="$GEN" "$ROOT/$proto.proto"
  fi
done
if [[ ! -f "$GEN/configs/presets.cc" || -n "$(find "$ROOT/configs/presets" -newer "$GEN/configs/presets.cc" -print -quit)" ]]; then
  cmake -DOUT="$GEN/configs/presets.cc" -DDIR="$ROOT/configs/presets" -P "$ROOT/configs/embed_presets.cmake"
fi

HEADER_DIRS=("$ROOT"/{io,checkpoint,tokenizer,saap,configs,trainer,model,attention} "$GEN")
compile() {  # compile SOURCE (relative to ROOT, or absolute under GEN) -> prints the object
  local src="$1" obj path
  path="$src"; [[ "$src" == /* ]] || path="$ROOT/$src"
  obj="$BUILD/obj/$(echo "${src#$GEN/}" | tr / _).o"; obj="${obj%.cc.o}.o"
  if [[ ! -f "$obj" || "$path" -nt "$obj" ]] || \
     [[ -n "$(find "${HEADER_DIRS[@]}" -name '*.h' -newer "$obj" -print -quit)" ]]; then
    echo "compile ${src#$BUILD/}" >&2
    "$CXX" "${COMMON[@]}" -I"$GEN" "${TORCH_CFLAGS[@]}" -fsanitize=fuzzer-no-link -c "$path" -o "$obj" \
      || return 1
  fi
  echo "$obj"
}

link() {  # link OUTPUT SOURCE SANITIZERS OBJECTS... -- LIBS...
  local out="$1" src="$2" san="$3" objs=() libs=()
  shift 3
  while [[ $# -gt 0 && "$1" != -- ]]; do objs+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  libs=("$@")
  local newest_obj
  newest_obj="$(ls -t "${objs[@]}" | head -1)"
  if [[ ! -f "$out" || "$src" -nt "$out" || "$newest_obj" -nt "$out" ]]; then
    echo "build $(basename "$out")"
    "$CXX" "${COMMON[@]}" -I"$GEN" "${TORCH_CFLAGS[@]}" "$san" "$src" "${objs[@]}" -o "$out" \
      "${libs[@]}" -lpthread
  fi
}

declare -A OBJECTS_OF
for f in "${SELECTED[@]}"; do
  objs=()
  for src in $(sources_of "$f"); do obj="$(compile "$src")" || exit 1; objs+=("$obj"); done
  OBJECTS_OF[$f]="${objs[*]}"
  # shellcheck disable=SC2046
  link "$BUILD/fuzz_$f" "$ROOT/fuzz/fuzz_$f.cc" -fsanitize=fuzzer ${OBJECTS_OF[$f]} -- $(libs_of "$f")
done

# Seeds: make_seeds writes every torch-free format; make_checkpoint_seeds writes
# real (tiny) training checkpoints with LibTorch.
seed_objs=()
for src in "${CHECKPOINT[@]}" "${TOKENIZER[@]}" "$GEN/saap/saap_index.pb.cc" saap/index_file.cc; do
  obj="$(compile "$src")" || exit 1; seed_objs+=("$obj")
done
link "$BUILD/make_seeds" "$ROOT/fuzz/make_seeds.cc" -fsanitize=address "${seed_objs[@]}" -- \
  $(pkg-config --libs re2) "${PROTO_LIBS[@]}"
rm -rf "$BUILD/seeds"
"$BUILD/make_seeds" "$BUILD/seeds"
if [[ " ${SELECTED[*]} " == *" checkpoint_info "* ]]; then
  # shellcheck disable=SC2046
  link "$BUILD/make_checkpoint_seeds" "$ROOT/fuzz/make_checkpoint_seeds.cc" -fsanitize=address \
    ${OBJECTS_OF[checkpoint_info]} -- $(libs_of checkpoint_info)
  "$BUILD/make_checkpoint_seeds" "$BUILD/seeds/checkpoint_info"
fi
[[ "$RUN" == 1 ]] || exit 0

# --- Run --------------------------------------------------------------------------
status=0
SUMMARY=()
for f in "${SELECTED[@]}"; do
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
  SUMMARY+=("$(printf '%-22s %12s runs %8s runs/s  corpus %s files' "fuzz_$f" "${runs:-?}" "$rate" \
                "$(ls "$corpus" | wc -l)")")
done
printf '%s\n' "${SUMMARY[@]}"
exit "$status"
