#!/usr/bin/env bash
# scripts/gpu_train_kernels.sh: on the GPU host, after scripts/gpu_host.sh has
# built build-gpu and prepared /tmp/pycorpus: GPT-2-small at N = 8192 with hash
# attention (nb 16, shared QK), 30 steps with the CUDA kernels and 30 with the
# LibTorch reference; prints tokens/s and losses of both.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
BIN=build-gpu/cli/sparseflash
for backend in AUTO REFERENCE; do
  rm -rf "/tmp/run8k_$backend"
  "$BIN" train --config preset:gpt2_small_hash8k --set data.dir=/tmp/pycorpus \
    --set train.max_steps=${STEPS:-30} --set logging.interval=10 --set eval.interval=0 \
    --set eval.batches=4 --set eval.sample_tokens=0 --set "attention.backend=$backend" \
    --set "checkpoint.out_dir=/tmp/run8k_$backend" >"$OUT/train8k_$backend.log" 2>&1
  echo "== $backend (exit $?)"
  grep -E "^step|^final" "$OUT/train8k_$backend.log" | tail -5
done
