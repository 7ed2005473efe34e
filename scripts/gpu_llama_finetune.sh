#!/usr/bin/env bash
# scripts/gpu_llama_finetune.sh: on the GPU host, fine-tuning steps of a
# pretrained Llama-family model (SmolLM2-135M by default) through the model
# interface at one context, per attention kind (dense through cuDNN where it
# applies and through our kernels, hash, drop; GQA): tokens/s, peak memory,
# pattern density and loss of each (bench_train_step with model.init_from), then
# a short `sparseflash train` fine-tune (loss per step), all in one call.
#
# The model file is given by LLAMA_MODEL, or assembled from the pieces under
# data/llama-parts*/ (the device tool moves at most 64 MiB per call, so a larger
# GGUF travels in pieces over consecutive calls: `split -b 48M`; the pieces
# are joined in name order and checked against data/llama-parts*/SHA256 if present).
#
# Environment:
#   PHASE=build|run|all  build (and the GPU tests) only, the measurements only, or both
#   OUT=DIR              results: llama-finetune.json (bench rows), logs.tgz
#   LLAMA_DATA=DIR       corpus prepared with the model's tokenizer (required for run)
#   LLAMA_N=8192         context; LLAMA_TOKENS=16384 tokens per step
#   LLAMA_MODES=...      bench_train_step --modes (default dense,dense-ours,hash:16:sep,
#                        hash:8:sep,drop:0.5,drop:0.3)
#   LLAMA_TRAIN_STEPS=30 steps of the closing `sparseflash train` (0 skips it);
#                        LLAMA_TRAIN_SET: its attention overrides (default hash nb 16)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
gpu_logs logs
PHASE=${PHASE:-all}
status=0

if [ "$PHASE" = build ] || [ "$PHASE" = all ]; then
  OUT=$LOGS GPU_PHASES="deps configure build" \
    GPU_BUILD_TARGETS="${GPU_BUILD_TARGETS:-bench_train_step sparseflash model_test fused_test attention_test lsh_test local_window_test llama_test llama_finetune_test}" \
    bash scripts/gpu_host.sh >"$LOGS/setup.log" 2>&1 || {
    echo "setup failed"; grep -E "error|FAILED" "$LOGS/setup.log" | head -30; tail -5 "$LOGS/setup.log"; status=1; }
  echo "setup: ${SECONDS}s"
  for t in model_test fused_test attention_test lsh_test local_window_test "llama_test --gtest_filter=LlamaGpu.*:Llama.*" llama_finetune_test; do
    name=${t%% *}
    [ -x "build-gpu/tests/$name" ] || { echo "$name: not built"; status=1; continue; }
    # shellcheck disable=SC2086
    build-gpu/tests/$t --gtest_brief=1 >"$LOGS/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc, $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \]' "$LOGS/$name.log" | tr '\n' ' ')"
    [ $rc -eq 0 ] || { status=1; grep -B2 -A12 "Failure\|error" "$LOGS/$name.log" | head -40; }
  done
fi

if [ "$PHASE" = run ] || [ "$PHASE" = all ]; then
  model=${LLAMA_MODEL:-}
  if [ -z "$model" ]; then
    mapfile -t pieces < <(ls -1 data/llama-parts*/piece-* 2>/dev/null | sort -t/ -k2)
    if [ ${#pieces[@]} -eq 0 ]; then echo "no LLAMA_MODEL and no data/llama-parts*/"; exit 1; fi
    model=/tmp/llama-model.gguf
    cat "${pieces[@]}" >"$model"
    sums=$(cat data/llama-parts*/SHA256 2>/dev/null | head -1)
    if [ -n "$sums" ]; then
      got=$(sha256sum "$model" | cut -d' ' -f1)
      [ "$got" = "${sums%% *}" ] || { echo "model pieces do not join to the recorded file ($got)"; exit 1; }
    fi
    echo "model: joined ${#pieces[@]} pieces into $model ($(stat -c %s "$model") bytes)"
  fi
  [ -n "${LLAMA_DATA:-}" ] || { echo "LLAMA_DATA is required"; exit 1; }
  N=${LLAMA_N:-8192}
  MODES=${LLAMA_MODES:-dense,dense-ours,hash:16:sep,hash:8:sep,drop:0.5,drop:0.3}
  cmd="build-gpu/bench/bench_train_step --config preset:llama_finetune --vocab 0 --n $N
       --tokens ${LLAMA_TOKENS:-16384} --modes $MODES --data $LLAMA_DATA --set model.init_from=$model
       --phases=false"
  echo "+" $cmd
  # shellcheck disable=SC2086
  $cmd --json "$OUT/llama-finetune.json" 2>&1 | tee "$LOGS/bench.log" | grep -v "trained" | tail -20
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  steps=${LLAMA_TRAIN_STEPS:-30}
  if [ "$steps" -gt 0 ]; then
    tcmd="build-gpu/cli/sparseflash train --config preset:llama_finetune
          --set model.init_from=$model --set data.dir=$LLAMA_DATA --set data.seq_len=$N
          --set data.batch_size=$(( ${LLAMA_TOKENS:-16384} / N )) --set train.max_steps=$steps
          --set logging.interval=5 --set eval.interval=0 --set eval.batches=4
          --set eval.sample_tokens=0 --set checkpoint.out_dir=/tmp/llama-run
          --set optim.lr=1e-4 --set schedule.warmup_steps=5
          ${LLAMA_TRAIN_SET:---set attention.kind=HASH --set attention.num_buckets=16}"
    echo "+" $tcmd
    # shellcheck disable=SC2086
    $tcmd 2>&1 | tee "$LOGS/train.log" | grep -E "^step|^model|^final|error" | tail -12
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  fi
fi
echo "total: ${SECONDS}s"
exit $status
