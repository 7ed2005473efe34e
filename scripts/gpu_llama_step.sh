#!/usr/bin/env bash
# scripts/gpu_llama_step.sh: on the GPU host, the long-context Llama training
# step of ours next to PyTorch's, in one call: bench_train_step on a
# SmolLM2-135M-shaped Llama (random weights, random tokens: speed does not
# depend on the weights, except the hash buckets' balance) and
# bench/llama_step_torch.py (eager and torch.compile, SDPA flash with GQA and
# cuDNN on repeated K/V, with and without activation checkpointing).
#
# Environment:
#   OUT=DIR          results: llama-step-ours.json, llama-step-torch.json, logs.tgz
#   STEP_N=32768     context (one sequence per step)
#   STEP_MODES=...   ours (default dense,hash:16:sep,shift)
#   TORCH_CASES=...  the anchors (llama_step_torch.py --cases); none: skip them
#   STEP_CKPT="false true"  activation checkpointing settings to time
#   STEP_PHASES=true GPU time per phase of the step (default false)
#   STEP_KERNELS=true the top kernels of one step by GPU time (Kineto; default false)
#   RUN_TESTS=1      also build and run fused_test and the attention tests (attention_test, lsh_test, local_window_test) first
#   TEST_FILTER=...  their --gtest_filter (default: all)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
gpu_logs logs
targets="bench_train_step"
[ "${RUN_TESTS:-0}" = 1 ] && targets="$targets fused_test attention_test lsh_test local_window_test"
OUT=$LOGS GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="$targets" \
  bash scripts/gpu_host.sh >"$LOGS/setup.log" 2>&1 || {
  echo "setup failed"; grep -E "error|FAILED" "$LOGS/setup.log" | head -30; exit 1; }
echo "setup: ${SECONDS}s"
status=0
if [ "${RUN_TESTS:-0}" = 1 ]; then
  for t in fused_test attention_test lsh_test local_window_test; do
    "build-gpu/tests/$t" --gtest_brief=1 --gtest_filter="${TEST_FILTER:-*}" >"$LOGS/$t.log" 2>&1 ||
      status=1
    echo "$t: $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]' "$LOGS/$t.log" | tr '\n' ' ')"
    grep -B2 -A10 "Failure" "$LOGS/$t.log" | head -30
  done
fi
N=${STEP_N:-32768}
F=$(( N / 8192 > 1 ? N / 8192 : 1 ))
shape="model.arch=LLAMA,model.n_layer=30,model.n_head=9,model.n_kv_head=3,model.d_model=576"
shape="$shape,model.head_dim=64,model.d_ff=1536,model.rope_theta=100000,model.tie_embeddings=true"
shape="$shape,model.norm_eps=1e-5,model.rope_scaling.type=linear,model.rope_scaling.factor=$F"
shape="$shape,model.rope_scaling.original_max_position_embeddings=8192"
for ck in ${STEP_CKPT:-false true}; do
  build-gpu/bench/bench_train_step --config preset:llama_finetune --vocab 49152 --n "$N" \
    --tokens "$N" --modes "${STEP_MODES:-dense,hash:16:sep,shift}" --phases="${STEP_PHASES:-false}" \
    --kernels="${STEP_KERNELS:-false}" --steps 5 \
    --warmup 2 --set "$shape,train.activation_checkpointing=$ck" \
    --json "$OUT/llama-step-ours-ckpt-$ck.json" >"$LOGS/ours-$ck.log" 2>&1 || status=1
  grep -E "^N " "$LOGS/ours-$ck.log" | head -20 | sed "s/^/[ours, checkpointing $ck] /"
done
if [ "${TORCH_CASES:-}" != none ]; then
  PYTHONUNBUFFERED=1 python3 bench/llama_step_torch.py --n "$N" --tokens "$N" \
    ${TORCH_CASES:+--cases $TORCH_CASES} --json "$OUT/llama-step-torch.json" \
    >"$LOGS/torch.log" 2>&1 || status=1
  tail -8 "$LOGS/torch.log"
fi
echo "total: ${SECONDS}s"
exit $status
