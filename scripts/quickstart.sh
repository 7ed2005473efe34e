#!/usr/bin/env bash
# scripts/quickstart.sh: from a bare machine to a trained model and a sample.
#
# Usage: scripts/quickstart.sh [TRAIN_ARGS...]
#   e.g. scripts/quickstart.sh --set train.max_steps=100
# Steps: scripts/setup.sh --with-corpus; prepare data/linux-docs from the Debian
# linux-source-6.1 tarball (once); `sparseflash train TRAIN_ARGS...`; then
# `sparseflash generate` from the run directory.
#
# Environment:
#   SPARSEFLASH_RUN_DIR=DIR   the run directory to sample from; by default the
#                             checkpoint.out_dir that train resolves (runs/gpu_default
#                             with a GPU, runs/cpu_default without)
#   SPARSEFLASH_BUILD_DIR and the other settings of scripts/setup.sh apply.
#
# Rerunning is fine: the corpus is kept, and train resumes from the run directory;
# once that run is complete, train only evaluates and samples again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ME=scripts/quickstart.sh
SECONDS=0
step() { printf '==> [%4ds] %s\n' "$SECONDS" "$*"; }
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

case ${1:-} in
  -h | --help) sed -n '2,18p' scripts/quickstart.sh | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

BUILD_DIR=${SPARSEFLASH_BUILD_DIR:-build}
BIN=$BUILD_DIR/cli/sparseflash
TARBALL=/usr/src/linux-source-6.1.tar.xz
DATA=data/linux-docs

# Seconds per phase, for the summary at the end.
PHASES=()
t0=$SECONDS
done_phase() { PHASES+=("$(printf '%-8s %5ds' "$1" $((SECONDS - t0)))"); t0=$SECONDS; }

# --- setup ------------------------------------------------------------------
step "setup (scripts/setup.sh --with-corpus)"
bash scripts/setup.sh --with-corpus || die "setup failed; see the messages above"
[ -x "$BIN" ] || die "$BIN is missing after setup"
done_phase setup

# --- prepare ----------------------------------------------------------------
# meta.json is written last, so its presence means a complete corpus.
if [ -f "$DATA/meta.json" ]; then
  step "prepare: $DATA already exists (delete it to rebuild)"
else
  [ -f "$TARBALL" ] ||
    die "$TARBALL not found; install the Debian package linux-source-6.1 (scripts/setup.sh --with-corpus does)"
  step "prepare: $TARBALL -> $DATA"
  "$BIN" prepare "$TARBALL" --out "$DATA" \
      --include '*/Documentation/*.rst,*/Documentation/*.txt' ||
    die "prepare failed; see the messages above"
fi
done_phase prepare

# --- where will the run go? ---------------------------------------------------
# Ask the binary: --print-config resolves the preset (GPU or not, as train itself
# decides) and any --config/--set in TRAIN_ARGS. Fall back to guessing from
# nvidia-smi if that does not work (e.g. TRAIN_ARGS ends in `--`).
RUN_DIR=${SPARSEFLASH_RUN_DIR:-}
if [ -z "$RUN_DIR" ]; then
  RUN_DIR=$("$BIN" train "$@" --print-config 2>/dev/null |
            sed -n 's/^ *out_dir: "\(.*\)"$/\1/p' | head -n 1 || true)
fi
if [ -z "$RUN_DIR" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then RUN_DIR=runs/gpu_default; else RUN_DIR=runs/cpu_default; fi
fi

# --- train --------------------------------------------------------------------
step "train $* (run directory: $RUN_DIR)"
set +e
"$BIN" train "$@"
rc=$?
set -e
if [ $rc -ge 128 ]; then
  printf '%s: training was interrupted (exit %d); rerun the same command to resume from %s\n' \
    "$ME" "$rc" "$RUN_DIR" >&2
  exit $rc
elif [ $rc -ne 0 ]; then
  printf '%s: training failed (exit %d); see the messages above\n' "$ME" "$rc" >&2
  exit $rc
fi
done_phase train

# --- sample -------------------------------------------------------------------
step "sample from $RUN_DIR"
"$BIN" generate --model "$RUN_DIR" --max-new-tokens 300 --top-k 40 || die "sampling from $RUN_DIR failed (set SPARSEFLASH_RUN_DIR if the run went elsewhere)"
done_phase sample

printf '%s: done in %ds\n' "$ME" "$SECONDS"
printf '  %s\n' "${PHASES[@]}"
