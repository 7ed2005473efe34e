#!/usr/bin/env bash
# scripts/gpu_saap_attention.sh: on the GPU host, build and run the SAAP
# attention tests (tests/saap_attention_test.cc): saap_attention on CUDA vs
# CPU and vs PyTorch's causal SDPA at SmolLM2-135M's eval shape (8192 tokens,
# 9 query heads on 3 KV heads, C = 256, bf16), and the partitioned KV cache's
# decode through the CUDA kernel vs its torch reference (D = 64 and 128) and
# vs a CPU cache. Uses scripts/gpu_host.sh's set-up (carry .deps). The two
# timed tests print their lines (ms per layer for saap_attention at l = 16,
# us per append + decode step); they are shown last. Logs go to $OUT.
#   --help: this text.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
ME=scripts/gpu_saap_attention.sh
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,10p' "$ME" | sed 's/^# \{0,1\}//'
  exit 0
fi
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="saap_attention_test" \
  OUT=/tmp/sf-saap-attention-host bash scripts/gpu_host.sh >"$OUT/setup.log" 2>&1 ||
  { tail -n 40 "$OUT/setup.log"; die "build failed (log above)"; }

build-gpu/tests/saap_attention_test --gtest_brief=1 \
  --gtest_output="json:$OUT/saap_attention_test.json" >"$OUT/saap_attention_test.log" 2>&1
status=$?
tail -n 25 "$OUT/saap_attention_test.log"
echo "--- timings"
grep -E '^(saap_attention|PartitionedKVCache step)' "$OUT/saap_attention_test.log"
exit $status
