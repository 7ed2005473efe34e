#!/usr/bin/env bash
# shellcheck disable=SC2317  # the phase_* functions are called through run_phase
# scripts/gpu_host.sh: build, test and exercise sparseflash on the offline GPU host.
#
# The host (Ubuntu 24.04, no network) has cmake, ninja, nvcc 13, cuDNN, protobuf
# 3.21 + protoc, GoogleTest, nlohmann-json, and torch 2.11 in /opt/torch/.venv
# (whose python3 is on PATH). It lacks Abseil and libarchive: those come as Debian
# .deb files in .deps/ (made by scripts/staging/fetch_gpu_debs.sh; .deps/ is git-ignored,
# so it must be carried to the host explicitly) and are unpacked, not installed,
# into /opt/deps.
#
# Phases: deps configure build ctest prepare train bench train8k. Each is timed;
# a failed phase does not stop the later ones (those that need its result are
# skipped), and the exit status is non-zero if any phase failed or was skipped.
# A summary table comes last (also in $OUT/summary.txt).
#
# Environment:
#   OUT=DIR               where logs and results go (default: ./gpu-out)
#   GPU_PHASES="a b ..."  run only these phases (space or comma separated; deps
#                         always runs), e.g. to split the work over several calls
#                         ("configure build", then "ctest prepare train bench train8k")
#   GPU_TRAIN_STEPS=N     steps of the gpu_default training check (default 300)
#   GPU_BUILD_TARGETS="t1 t2"  build only these targets (default: everything);
#                         "label:L" stands for the test programs of ctest label L
#                         (build-gpu/tests/targets-L.txt, written by the configure step)
#   CTEST_LABEL=L         the ctest phase runs only the tests of label L (ctest -L L)
#   SF_CMAKE_ARGS="-D..."  extra CMake arguments of the configure phase, e.g.
#                         -DSF_PRECOMPILED_HEADERS=OFF
#   SPARSEFLASH_DEPS_ROOT where to unpack .deps/*.deb (default /opt/deps)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ME=scripts/gpu_host.sh
SECONDS=0

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

B=build-gpu
BIN=$B/cli/sparseflash
BENCH=$B/bench/bench_reference_attention
CORPUS=/tmp/pycorpus
DEPS_ROOT=${SPARSEFLASH_DEPS_ROOT:-/opt/deps}
LIBDIR=$DEPS_ROOT/usr/lib/x86_64-linux-gnu

ALL_PHASES=(deps configure build ctest prepare train bench train8k)
# deps always runs: it takes seconds, and everything after it (the build, and the
# binaries at run time) needs the unpacked libraries, which a fresh machine lacks.
WANTED=" deps $(tr ',' ' ' <<<"${GPU_PHASES:-${ALL_PHASES[*]}}") "
for p in $WANTED; do
  case " ${ALL_PHASES[*]} " in
    *" $p "*) ;;
    *) printf '%s: error: unknown phase "%s" in GPU_PHASES (phases: %s)\n' "$ME" "$p" "${ALL_PHASES[*]}" >&2
       exit 2 ;;
  esac
done

# ---------------------------------------------------------------------------
# Environment, set in this shell so that every phase (and ctest's children) sees it.

# nvcc 13 may be installed without being on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null | tail -n 1 || true)
# The environment variable CMAKE_PREFIX_PATH is ':'-separated on Unix (the
# -DCMAKE_PREFIX_PATH below is a CMake list, ';'-separated).
export CMAKE_PREFIX_PATH="$DEPS_ROOT/usr${TORCH_PREFIX:+:$TORCH_PREFIX}"
# The unpacked libraries are not in the loader's cache (no ldconfig, no install).
# The build tree's RPATH covers our binaries; this covers everything else.
export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PKG_CONFIG_PATH="$LIBDIR/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

{
  echo "date:   $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "gpus:   $( (nvidia-smi -L 2>/dev/null || echo 'none (nvidia-smi -L failed)') | tr '\n' ' ')"
  echo "nvcc:   $(nvcc --version 2>&1 | tail -n 1)"
  echo "cmake:  $(cmake --version 2>&1 | head -n 1)"
  echo "torch:  $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -n 1)"
  echo "prefix: $TORCH_PREFIX"
  echo "git:    $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
} | tee "$OUT/env.txt"

# ---------------------------------------------------------------------------
# Phase bookkeeping.

declare -A STATUS SECS
ANY_FAILED=0

# run_phase NAME FUNCTION: time FUNCTION in a subshell under `set -e` (a plain
# `if fn` would switch -e off inside it), record ok or FAILED, keep going.
run_phase() {
  local name=$1 fn=$2 t=$SECONDS rc
  printf '\n==> [%4ds] %s\n' "$SECONDS" "$name"
  set +e
  (set -e; "$fn")
  rc=$?
  set -e
  SECS[$name]=$((SECONDS - t))
  if [ $rc -eq 0 ]; then
    STATUS[$name]=ok
  else
    STATUS[$name]="FAILED (exit $rc)"
    ANY_FAILED=1
    printf '%s: phase %s failed (exit %d)\n' "$ME" "$name" "$rc" >&2
  fi
}

skip_phase() {
  printf '\n==> [%4ds] %s: skipped, %s\n' "$SECONDS" "$1" "$2"
  STATUS[$1]="SKIPPED ($2)"
  SECS[$1]=0
  ANY_FAILED=1
}

wanted() { [[ $WANTED == *" $1 "* ]]; }

# target_ready TARGET FILE: the binary exists and is current. After a failed
# build (ninja -k 0 builds what it can) ask ninja whether this target is stale,
# so an old binary is never mistaken for a new one.
target_ready() {
  [ -x "$2" ] || return 1
  [ "${STATUS[build]:-}" = ok ] && return 0
  cmake --build "$B" --target "$1" -- -n 2>/dev/null | grep -q 'no work to do'
}

# ---------------------------------------------------------------------------
# Phases.

phase_deps() {
  shopt -s nullglob   # (this runs in a subshell: the setting does not leak)
  local debs=(.deps/*.deb) f pc missing
  if [ ${#debs[@]} -eq 0 ]; then
    echo "no .deb files in .deps/: run scripts/staging/fetch_gpu_debs.sh on the development" \
         "machine and carry .deps/ to this host" >&2
    return 1
  fi
  mkdir -p "$DEPS_ROOT"
  for f in "${debs[@]}"; do
    echo "unpacking $f -> $DEPS_ROOT"
    dpkg -x "$f" "$DEPS_ROOT"
  done
  # The .pc files say prefix=/usr (and Abseil's libdir=/usr/..., includedir=/usr/...
  # outright); point every such variable at the unpacked tree. Idempotent.
  for pc in "$LIBDIR"/pkgconfig/*.pc; do
    sed -i -E "s#^([A-Za-z_]+)=/usr(/|\$)#\\1=$DEPS_ROOT/usr\\2#" "$pc"
  done
  # The debs are Debian 12 builds; their own dependencies (libxml2, nettle, zstd,
  # ...) must come from this host. Say which are missing rather than fail at link.
  missing=$(for f in "$LIBDIR"/*.so.*; do
              [ -L "$f" ] || ldd "$f" 2>/dev/null | awk '/not found/ {print $1}' || true
            done | sort -u)
  if [ -n "$missing" ]; then
    echo "libraries the unpacked packages need but this host lacks: ${missing//$'\n'/ }" >&2
    echo "add the Debian packages that provide them: scripts/staging/fetch_gpu_debs.sh PACKAGE..." >&2
    return 1
  fi
  local libs=("$LIBDIR"/*.so.*)
  echo "unpacked ${#debs[@]} package(s); ${#libs[@]} shared-library files in $LIBDIR"
}

phase_configure() {
  if [ -z "$TORCH_PREFIX" ]; then
    echo "python3 ($(command -v python3 || echo 'not on PATH')) cannot import torch;" \
         "put /opt/torch/.venv/bin on PATH" >&2
    return 1
  fi
  command -v nvcc >/dev/null 2>&1 || echo "warning: nvcc not found; the CUDA kernels will not be built" >&2
  if [ -f "$B/build.ninja" ] &&
     grep '^CMAKE_PREFIX_PATH:' "$B/CMakeCache.txt" 2>/dev/null | grep -qF "$TORCH_PREFIX"; then
    echo "$B is configured already (ninja reruns CMake itself when CMakeLists change)"
    return 0
  fi
  # 90a only (H100/H200): TORCH_CUDA_ARCH_LIST too, or Torch adds sm_80 code as well.
  cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$DEPS_ROOT/usr;$TORCH_PREFIX" \
        -DCMAKE_CUDA_ARCHITECTURES=90a -DTORCH_CUDA_ARCH_LIST=9.0a ${SF_CMAKE_ARGS:-} 2>&1 |
    tee "$OUT/configure.log"
}

phase_build() {
  # -k 0: build everything that can be built, so one broken target does not
  # stop the GPU checks whose binaries are fine.
  local targets=() t
  for t in ${GPU_BUILD_TARGETS:-}; do
    if [[ $t == label:* ]]; then
      local list="$B/tests/targets-${t#label:}.txt"
      [ -f "$list" ] || { echo "no test programs of label ${t#label:} ($list missing)" >&2; return 1; }
      for t in $(cat "$list"); do targets+=(--target "$t"); done
    else
      targets+=(--target "$t")
    fi
  done
  cmake --build "$B" -j16 "${targets[@]}" -- -k 0 2>&1 | tee "$OUT/build.log"
}

phase_ctest() {
  # The host has no clang: the fuzz test skips instead of failing.
  SPARSEFLASH_ALLOW_NO_FUZZ=1 ctest --test-dir "$B" --output-on-failure ${CTEST_LABEL:+-L "$CTEST_LABEL"} \
    2>&1 | tee "$OUT/ctest.log"
}

phase_prepare() {
  # meta.json is written last: if it is there, the corpus is complete.
  if [ -f "$CORPUS/meta.json" ]; then
    echo "reusing $CORPUS (delete it to prepare again)"
    return 0
  fi
  rm -rf "$CORPUS"
  "$BIN" prepare /opt/torch/.venv/lib --include '*.py' --max-bytes 200000000 \
      --out "$CORPUS" 2>&1 | tee "$OUT/prepare.log"
}

phase_train() {
  # Without a GPU, train would quietly pick cpu_default: that is no GPU check.
  nvidia-smi -L >/dev/null 2>&1 || { echo "no GPU visible (nvidia-smi -L fails)" >&2; return 1; }
  # Fresh run each time: an existing complete checkpoint would only be evaluated.
  rm -rf /tmp/run_gpu
  "$BIN" train --set data.dir="$CORPUS" --set train.max_steps="${GPU_TRAIN_STEPS:-300}" \
      --set checkpoint.out_dir=/tmp/run_gpu --set eval.interval=100 2>&1 | tee "$OUT/train.log"
  cp /tmp/run_gpu/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null || true
}

phase_bench() {
  "$BENCH" --n 8192 --batch 1 --heads 12 --head-dim 64 \
      --json "$OUT/reference_attention.json" 2>&1 | tee "$OUT/bench.log"
}

phase_train8k() {
  rm -rf /tmp/run_8k
  "$BIN" train --config preset:gpt2_small_hash8k --set data.dir="$CORPUS" \
      --set train.max_steps=20 --set logging.interval=5 --set eval.interval=0 \
      --set eval.batches=2 --set checkpoint.out_dir=/tmp/run_8k \
      --set eval.sample_tokens=0 2>&1 | tee "$OUT/train8k.log"
  cp /tmp/run_8k/metrics.jsonl "$OUT/train8k_metrics.jsonl" 2>/dev/null || true
}

# ---------------------------------------------------------------------------
# Run what was asked for, skipping what cannot work.

run_phase deps phase_deps
wanted configure && run_phase configure phase_configure

if wanted build; then
  if [ -f "$B/build.ninja" ]; then run_phase build phase_build
  else skip_phase build "not configured"; fi
fi

if wanted ctest; then
  if [ -f "$B/CTestTestfile.cmake" ]; then run_phase ctest phase_ctest
  else skip_phase ctest "not configured"; fi
fi

if wanted prepare; then
  if target_ready sparseflash "$BIN"; then run_phase prepare phase_prepare
  else skip_phase prepare "$BIN not built"; fi
fi

# train and train8k need the binary and the corpus.
training_phase() {
  if ! target_ready sparseflash "$BIN"; then skip_phase "$1" "$BIN not built"
  elif [ ! -f "$CORPUS/meta.json" ]; then skip_phase "$1" "no corpus in $CORPUS"
  else run_phase "$1" "phase_$1"; fi
}

wanted train && training_phase train

if wanted bench; then
  if target_ready bench_reference_attention "$BENCH"; then run_phase bench phase_bench
  else skip_phase bench "$BENCH not built"; fi
fi

wanted train8k && training_phase train8k

# ---------------------------------------------------------------------------
# Summary.

{
  printf '\n%-10s %8s  %s\n' phase seconds status
  for p in "${ALL_PHASES[@]}"; do
    wanted "$p" || continue
    printf '%-10s %8s  %s\n' "$p" "${SECS[$p]:-0}" "${STATUS[$p]:-not run}"
  done
  printf '%-10s %8s  %s\n' total "$SECONDS" "$([ $ANY_FAILED = 0 ] && echo ok || echo FAILED)"
} | tee "$OUT/summary.txt"

exit $ANY_FAILED
