#!/usr/bin/env bash
# scripts/long_context_experiment.sh: issue 20's experiment. A pretrained Llama
# (SmolLM2-135M by default, native context 8192) is extended to N = 32768 by
# RoPE scaling and fine-tuned with each attention kind (dense, S2-Attn, hash,
# drop, a hybrid; full and LoRA), then evaluated densely (and under its own
# pattern): sliding-window perplexity on held-out documents at several
# contexts, and pass-key retrieval. Then SAAP is fitted on the extended models.
#
# Every phase is resumable: a finished step leaves its JSON under $EXP and is
# skipped when the script runs again (training resumes from its checkpoint),
# so the experiment can be spread over several device calls.
#
# Usage: MODEL=SmolLM2.gguf bash scripts/long_context_experiment.sh [PHASE...]
#   PHASE: data zeroshot train eval saap report (default: all, in that order)
#
# Environment (defaults in brackets):
#   MODEL        the pretrained model (a .gguf, HF directory...); without it, the
#                pieces under data/llama-parts*/ are joined (scripts/gpu_llama_finetune.sh)
#   SF           the sparseflash binary [build-gpu/cli/sparseflash]
#   EXP          where everything goes [runs/long-context]
#   SOURCE       what `prepare` reads [the Python site-packages of python3]; files
#                matching INCLUDE ['*.py'], one document per directory;
#                PREPARE_ARGS: more prepare flags (e.g. --max-bytes 300000000)
#   N            training context [32768]; FACTOR RoPE factor [N / 8192]; ROPE [linear]
#   STEPS        optimizer steps per run [200]; LR [5e-5]; WARMUP [20]; SEEDS [1,2]
#   RUNS         which runs [dense,shift,hash8,hash16,drop50,hybrid,lora-dense,lora-hash16]
#   CKPT         activation checkpointing in training [false]
#   EVAL_CONTEXTS  perplexity contexts [4096,8192,16384,32768]; EVAL_TOKENS per context [262144]
#   PASSKEY_CONTEXTS [8192,16384,24576,32768]; PASSKEY_DEPTHS [10]
#   DEVICE       [cuda]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SF=${SF:-build-gpu/cli/sparseflash}
EXP=${EXP:-runs/long-context}
N=${N:-32768}
BASE_CONTEXT=${BASE_CONTEXT:-8192}
FACTOR=${FACTOR:-$(( N / BASE_CONTEXT > 1 ? N / BASE_CONTEXT : 1 ))}
ROPE=${ROPE:-linear}
STEPS=${STEPS:-200}
LR=${LR:-5e-5}
WARMUP=${WARMUP:-20}
SEEDS=${SEEDS:-1,2}
RUNS=${RUNS:-dense,shift,hash8,hash16,drop50,hybrid,lora-dense,lora-hash16}
CKPT=${CKPT:-false}
EVAL_CONTEXTS=${EVAL_CONTEXTS:-4096,8192,16384,32768}
EVAL_TOKENS=${EVAL_TOKENS:-262144}
PASSKEY_CONTEXTS=${PASSKEY_CONTEXTS:-8192,16384,24576,32768}
PASSKEY_DEPTHS=${PASSKEY_DEPTHS:-10}
DEVICE=${DEVICE:-cuda}
INCLUDE=${INCLUDE:-*.py}
PHASES=${*:-data zeroshot train eval saap report}
mkdir -p "$EXP"/{results,logs,runs}
log() { echo "[$(date +%H:%M:%S)] $*"; }
die() { echo "long_context_experiment: $*" >&2; exit 1; }
[ -x "$SF" ] || die "no binary at $SF (build it, or set SF)"

if [ -z "${MODEL:-}" ]; then
  mapfile -t pieces < <(ls -1 data/llama-parts*/piece-* 2>/dev/null | sort -t/ -k2)
  [ ${#pieces[@]} -gt 0 ] || die "set MODEL (a pretrained model file or directory)"
  MODEL=$EXP/model.gguf
  [ -f "$MODEL" ] || cat "${pieces[@]}" >"$MODEL"
fi
DATA=$EXP/data
FILLER=$EXP/filler.txt

# The attention overrides of a run (train --set values, one per line).
run_settings() {
  case $1 in
    dense|lora-dense) echo "attention.kind=DENSE" ;;
    shift) echo "attention.kind=SHIFT" ;;
    hash8) printf '%s\n' "attention.kind=HASH" "attention.num_buckets=8" ;;
    hash16|lora-hash16) printf '%s\n' "attention.kind=HASH" "attention.num_buckets=16" ;;
    drop50) printf '%s\n' "attention.kind=DROP" "attention.drop_prob=0.5" ;;
    # Dense in the first two and the last layer (where attention is most
    # local and most global in trained Llamas), hash nb 16 elsewhere.
    hybrid) printf '%s\n' "attention.kind=HASH" "attention.num_buckets=16" \
              "layer_attention=[{layers: [0, 1, 29] attention {kind: DENSE}}]" ;;
    *) die "unknown run $1" ;;
  esac
  case $1 in
    lora-*) printf '%s\n' "model.lora.rank=8" "model.lora.alpha=16" \
              "model.lora.train_embeddings=true" "model.lora.train_norms=true" ;;
  esac
}
# eval_model NAME MODEL [extra eval flags]: perplexity at every EVAL_CONTEXT and
# the pass key, into $EXP/results/NAME-*.json (skipped when there).
eval_model() {
  local name=$1 model=$2
  shift 2
  for c in ${EVAL_CONTEXTS//,/ }; do
    local out=$EXP/results/$name-ppl-$c.json
    [ -s "$out" ] && continue
    log "eval $name: perplexity at $c"
    "$SF" eval --model "$model" --data "$DATA" --context "$c" --stride $(( c / 2 )) \
      --max-tokens "$EVAL_TOKENS" --device "$DEVICE" --json-file "$out.tmp" "$@" \
      >"$EXP/logs/$name-ppl-$c.log" 2>&1 && mv "$out.tmp" "$out" ||
      { log "  failed: $(tail -1 "$EXP/logs/$name-ppl-$c.log")"; rm -f "$out.tmp"; }
  done
  local out=$EXP/results/$name-passkey.json
  if [ ! -s "$out" ]; then
    log "eval $name: pass key at $PASSKEY_CONTEXTS"
    "$SF" eval --model "$model" --passkey --text "$FILLER" --passkey-contexts "$PASSKEY_CONTEXTS" \
      --passkey-depths "$PASSKEY_DEPTHS" --device "$DEVICE" --json-file "$out.tmp" "$@" \
      >"$EXP/logs/$name-passkey.log" 2>&1 && mv "$out.tmp" "$out" ||
      { log "  failed: $(tail -1 "$EXP/logs/$name-passkey.log")"; rm -f "$out.tmp"; }
  fi
}

for phase in $PHASES; do
  case $phase in
  data)
    if [ ! -s "$DATA/meta.json" ]; then
      src=${SOURCE:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
      log "data: $src ($INCLUDE, one document per directory) with the model's tokenizer"
      "$SF" prepare "$src" --out "$DATA" --include "$INCLUDE" --join-dir --tokenizer "$MODEL" \
        --val-fraction "${VAL_FRACTION:-0.05}" ${PREPARE_ARGS:-} >"$EXP/logs/prepare.log" 2>&1 ||
        die "prepare failed: $(tail -3 "$EXP/logs/prepare.log")"
      tail -2 "$EXP/logs/prepare.log"
    fi
    # Pass-key filler: the usual repeated sentences (Mohtashami and Jaggi 2023).
    if [ ! -s "$FILLER" ]; then
      for _ in $(seq 1 $(( 2 * N / 20 + 100 ))); do
        echo "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
      done >"$FILLER"
    fi
    ;;
  zeroshot)
    # The base model at its own context, and extended by each scaling kind.
    eval_model base "$MODEL" --attention dense
    for kind in linear dynamic yarn; do
      EVAL_CONTEXTS=$EVAL_CONTEXTS PASSKEY_CONTEXTS=$PASSKEY_CONTEXTS \
        eval_model "base-$kind$FACTOR" "$MODEL" --attention dense --rope-scaling "$kind:$FACTOR"
    done
    ;;
  train)
    for run in ${RUNS//,/ }; do
      for seed in ${SEEDS//,/ }; do
        name=$run-s$seed
        # LoRA runs and the hybrid once (seed 1); the rest at every seed.
        case $run in lora-*|hybrid) [ "$seed" = "${SEEDS%%,*}" ] || continue ;; esac
        [ -s "$EXP/results/$name-train.json" ] && continue
        sets=()
        while IFS= read -r s; do sets+=(--set "$s"); done < <(run_settings "$run")
        log "train $name: $STEPS steps at $N"
        "$SF" train --config preset:llama_finetune --set "model.init_from=$MODEL" \
          --set "data.dir=$DATA" --set "data.seq_len=$N" --set data.batch_size=1 \
          --set "model.block_size=$N" --set "model.rope_scaling.type=$ROPE" \
          --set "model.rope_scaling.factor=$FACTOR" --set "train.max_steps=$STEPS" \
          --set "train.seed=$seed" --set "data.seed=$seed" --set "optim.lr=$LR" \
          --set "schedule.warmup_steps=$WARMUP" --set "eval.interval=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" \
          --set eval.batches=4 --set eval.sample_tokens=0 --set "checkpoint.interval=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" \
          --set "checkpoint.out_dir=$EXP/runs/$name" --set "train.activation_checkpointing=$CKPT" \
          --set "train.device=$DEVICE" --set logging.interval=10 "${sets[@]}" \
          >>"$EXP/logs/$name-train.log" 2>&1 ||
          { log "  failed: $(tail -2 "$EXP/logs/$name-train.log")"; continue; }
        # The run's losses and speed, from its metrics (peak memory per kind:
        # scripts/gpu_long_finetune.sh).
        python3 - "$EXP/runs/$name/metrics.jsonl" "$EXP/results/$name-train.json" "$run" "$seed" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
out = {"run": sys.argv[3], "seed": int(sys.argv[4]),
       "train_loss": [(r["step"], r["loss"]) for r in train],
       "val_loss": [(r["step"], r["val_loss"]) for r in val],
       "tokens_per_s": [r.get("tokens_per_s") for r in train if r.get("tokens_per_s")]}
json.dump(out, open(sys.argv[2], "w"), indent=1)
PY
      done
    done
    ;;
  eval)
    for run in ${RUNS//,/ }; do
      for seed in ${SEEDS//,/ }; do
        name=$run-s$seed
        [ -s "$EXP/runs/$name/ckpt.pt" ] || continue
        eval_model "$name-dense" "$EXP/runs/$name" --attention dense
        # Under its own training pattern too (a run without --attention attends
        # as trained, per layer), at the training context only.
        EVAL_CONTEXTS=$N PASSKEY_CONTEXTS=$N eval_model "$name-own" "$EXP/runs/$name"
      done
    done
    ;;
  saap)
    # SAAP at N on the dense-fine-tuned model and on the best sparse one
    # (SAAP_RUNS, default dense-s1 and hash16-s1).
    for name in ${SAAP_RUNS:-dense-s1,hash16-s1}; do
      name=${name//,/ }
      for one in $name; do
        model=$EXP/runs/$one
        [ -s "$model/ckpt.pt" ] || continue
        index=$EXP/results/$one.saap
        if [ ! -s "$index" ]; then
          log "saap fit $one at $N"
          "$SF" saap fit --model "$model" --data "$DATA" --context "$N" --saap-index "$index" \
            --device "$DEVICE" >"$EXP/logs/$one-saap-fit.log" 2>&1 ||
            { log "  failed: $(tail -2 "$EXP/logs/$one-saap-fit.log")"; continue; }
        fi
        EVAL_CONTEXTS=$N PASSKEY_CONTEXTS=$N eval_model "$one-saap" "$model" --attention saap \
          --saap-index "$index" --top-l "${SAAP_TOP_L:-16}"
      done
    done
    ;;
  report)
    python3 - "$EXP" <<'PY'
import glob, json, os, sys
exp = sys.argv[1]
res = {}
for f in sorted(glob.glob(os.path.join(exp, "results", "*.json"))):
    res[os.path.basename(f)[:-5]] = json.load(open(f))
json.dump(res, open(os.path.join(exp, "experiment.json"), "w"), indent=1)
ppl = {k: v for k, v in res.items() if "-ppl-" in k}
print(f"{'model':28} {'context':>8} {'perplexity':>11}")
for k in sorted(ppl):
    name, ctx = k.rsplit("-ppl-", 1)
    print(f"{name:28} {ctx:>8} {ppl[k].get('perplexity', float('nan')):11.3f}")
print(f"\n{'model':28} passkey found/trials per context")
for k in sorted(x for x in res if x.endswith("-passkey")):
    rows = res[k].get("rows", [])
    print(f"{k[:-8]:28} " + "  ".join(f"{r['context']}: {r['found']}/{r['trials']}" for r in rows))
PY
    ;;
  *) die "unknown phase $phase (data zeroshot train eval saap report)" ;;
  esac
done
