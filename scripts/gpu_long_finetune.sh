#!/usr/bin/env bash
# scripts/gpu_long_finetune.sh: on the GPU host, long-context fine-tuning of a
# pretrained Llama (SmolLM2-135M by default, native context 8192) extended by
# RoPE scaling: the training step (bench_train_step with model.init_from) at
# 32k per attention kind (dense, hash, drop, S2-Attn), full and LoRA, then how
# far one GPU goes with activation checkpointing (64k, 128k), and the S2-Attn
# kernel next to the others (bench_attention). Prints a short table; JSON
# under $OUT.
#
# Run it after `PHASE=build bash scripts/gpu_llama_finetune.sh` in the same
# warm machine (that builds build-gpu/ and runs the GPU tests), or with
# PHASE=all here, which does the same first. The model file is LLAMA_MODEL or
# the pieces under data/llama-parts*/ (see scripts/gpu_llama_finetune.sh).
#
# Environment:
#   OUT=DIR            results: long-finetune-{full,lora,reach}.json, attention-shift.json
#   LLAMA_DATA=DIR     corpus prepared with the model's tokenizer (required)
#   LONG_N=32768       context of the kind-by-kind rows; ROPE_FACTOR = LONG_N / 8192
#   LONG_MODES=...     bench_train_step --modes (default dense,hash:8:sep,hash:16:sep,drop:0.5,shift)
#   REACH_N=65536,131072  contexts of the checkpointing rows (REACH_MODES: dense,hash:16:sep,shift)
#   LORA_SET=a=1,b=2   the LoRA overrides (default rank 8, alpha 16, embeddings and norms train)
#   STEPS=5 WARMUP=2   timed and untimed steps per row
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
gpu_logs logs-long
status=0

if [ "${PHASE:-run}" = all ]; then
  OUT=$LOGS PHASE=build bash scripts/gpu_llama_finetune.sh || status=1
fi

model=${LLAMA_MODEL:-}
if [ -z "$model" ]; then
  mapfile -t pieces < <(ls -1 data/llama-parts*/piece-* 2>/dev/null | sort -t/ -k2)
  [ ${#pieces[@]} -gt 0 ] || { echo "no LLAMA_MODEL and no data/llama-parts*/"; exit 1; }
  model=/tmp/llama-model.gguf
  cat "${pieces[@]}" >"$model"
  sums=$(cat data/llama-parts*/SHA256 2>/dev/null | head -1)
  if [ -n "$sums" ] && [ "$(sha256sum "$model" | cut -d' ' -f1)" != "${sums%% *}" ]; then
    echo "model pieces do not join to the recorded file"; exit 1
  fi
fi
[ -n "${LLAMA_DATA:-}" ] || { echo "LLAMA_DATA is required"; exit 1; }
N=${LONG_N:-32768}
FACTOR=$(( N / 8192 ))
MODES=${LONG_MODES:-dense,hash:8:sep,hash:16:sep,drop:0.5,shift}
LORA=${LORA_SET:-model.lora.rank=8,model.lora.alpha=16,model.lora.train_embeddings=true,model.lora.train_norms=true}
# bench NAME N MODES FACTOR [OVERRIDES]: OVERRIDES comma-separated (bench_train_step's
# --set is one list: a second --set would replace the first).
bench() {
  local name=$1 n=$2 modes=$3 factor=$4 extra=${5:-}
  local cmd="build-gpu/bench/bench_train_step --config preset:llama_finetune --vocab 0 --n $n
       --tokens $n --modes $modes --data $LLAMA_DATA
       --set model.init_from=$model,model.rope_scaling.type=linear,model.rope_scaling.factor=$factor${extra:+,$extra}
       --phases=false --steps ${STEPS:-5} --warmup ${WARMUP:-2}"
  echo "+" $cmd
  # shellcheck disable=SC2086
  $cmd --json "$OUT/long-finetune-$name.json" >"$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E "^N |error" "$LOGS/$name.log" | sed "s/^/[$name] /"
  [ $rc -eq 0 ] || { status=1; tail -5 "$LOGS/$name.log"; }
}
bench full "$N" "$MODES" "$FACTOR"
bench lora "$N" "$MODES" "$FACTOR" "$LORA"
bench checkpointed "$N" "${LONG_CKPT_MODES:-dense,hash:16:sep}" "$FACTOR" \
  train.activation_checkpointing=true
REACH_N=${REACH_N:-65536,131072}
for n in ${REACH_N//,/ }; do
  bench "reach-$n" "$n" "${REACH_MODES:-dense,hash:16:sep,shift}" $(( n / 8192 )) \
    train.activation_checkpointing=true
done

# The S2-Attn kernel beside dense and hash (GQA-free D = 64, B N = 65536).
# KERNEL_N=none skips it.
if [ "${KERNEL_N:-16384,32768}" != none ]; then
  build-gpu/bench/bench_attention --n "${KERNEL_N:-16384,32768}" --d 64 \
    --cases dense,hash:16,drop:0.5,shift:4 --json "$OUT/attention-shift.json" \
    >"$LOGS/attention.log" 2>&1 || status=1
  tail -12 "$LOGS/attention.log"
fi
echo "total: ${SECONDS}s"
exit $status
