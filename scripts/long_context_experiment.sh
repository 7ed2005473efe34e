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
#                pieces under data/llama-parts*/ are joined (checked against their SHA256)
#   SF           the sparseflash binary [build-gpu/cli/sparseflash]
#   EXP          where everything goes [runs/long-context]
#   SOURCE       what `prepare` reads [the Python site-packages of python3]; files
#                matching INCLUDE ['*.py'], one document per directory, documents
#                shorter than MIN_DOC_TOKENS [N] dropped, VAL_FRACTION [0.1] of the
#                directories held out; PREPARE_ARGS: more prepare flags
#                (e.g. --max-bytes 80000000)
#   N            training context [32768]; FACTOR RoPE factor [N / 8192]; ROPE [linear]
#   STEPS        optimizer steps per run [150]; LR [5e-5]; LORA_LR [5e-4]; WARMUP [15]
#   RUNS         which runs [dense,hash16,shift,drop50,hash8,hybrid,lora-dense,lora-hash16];
#                a sparse run NAME-local adds SINKS [4] sink tokens and a local window
#                of WINDOW [64] keys (attention.sink_tokens, attention.local_window),
#                NAME-localW a window of W keys (e.g. hash16-local256);
#                a hash run NAME-cap caps the LSH buckets (attention.lsh_capacity=1:
#                equal sizes in each block of 128 rows), e.g. hash16-cap-local
#   SEEDS        [1,2]; the first seed runs every run, later seeds only SEED_RUNS [dense,hash16]
#   NAMES        the runs to train and evaluate, in this order, as RUN-sSEED (e.g.
#                dense-s1,hash16-s1,dense-s2); overrides RUNS, SEEDS and SEED_RUNS
#   CKPT         activation checkpointing in training [false]
#   EVAL_CONTEXTS  perplexity contexts [4096,8192,16384,32768]; EVAL_TOKENS per context [262144]
#   PASSKEY_CONTEXTS [8192,16384,24576,32768]; PASSKEY_DEPTHS [10]
#   OWN_PASSKEY  also the pass key under a run's own pattern [0]
#   EVAL_AFTER_TRAIN  evaluate each run as soon as it is trained [1]
#   DEADLINE     seconds after which no new work starts and a training run in
#                progress is stopped with a checkpoint (SIGTERM), to resume on the
#                next call [0 = none]
#   DEVICE       [cuda]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
SECONDS=0
SF=${SF:-build-gpu/cli/sparseflash}
EXP=${EXP:-runs/long-context}
N=${N:-32768}
BASE_CONTEXT=${BASE_CONTEXT:-8192}
FACTOR=${FACTOR:-$(( N / BASE_CONTEXT > 1 ? N / BASE_CONTEXT : 1 ))}
ROPE=${ROPE:-linear}
STEPS=${STEPS:-150}
LR=${LR:-5e-5}
LORA_LR=${LORA_LR:-5e-4}
WARMUP=${WARMUP:-15}
SEEDS=${SEEDS:-1,2}
RUNS=${RUNS:-dense,hash16,shift,drop50,hash8,hybrid,lora-dense,lora-hash16}
SEED_RUNS=${SEED_RUNS:-dense,hash16}
CKPT=${CKPT:-false}
EVAL_CONTEXTS=${EVAL_CONTEXTS:-4096,8192,16384,32768}
EVAL_TOKENS=${EVAL_TOKENS:-262144}
PASSKEY_CONTEXTS=${PASSKEY_CONTEXTS:-8192,16384,24576,32768}
PASSKEY_DEPTHS=${PASSKEY_DEPTHS:-10}
OWN_PASSKEY=${OWN_PASSKEY:-0}
EVAL_AFTER_TRAIN=${EVAL_AFTER_TRAIN:-1}
MIN_DOC_TOKENS=${MIN_DOC_TOKENS:-$N}
VAL_FRACTION=${VAL_FRACTION:-0.1}
DEADLINE=${DEADLINE:-0}
SINKS=${SINKS:-4}
WINDOW=${WINDOW:-64}
DEVICE=${DEVICE:-cuda}
INCLUDE=${INCLUDE:-*.py}
PHASES=${*:-data zeroshot train eval saap report}
mkdir -p "$EXP"/{results,logs,runs}
ME=long_context_experiment
# log, die, past_deadline; refuses a missing binary.
# shellcheck source=scripts/experiment_lib.sh
source scripts/experiment_lib.sh

if [ -z "${MODEL:-}" ]; then
  MODEL=$EXP/model.gguf
  if [ ! -s "$MODEL" ]; then
    mapfile -t pieces < <(ls -1 data/llama-parts*/piece-* 2>/dev/null | sort -t/ -k2)
    [ ${#pieces[@]} -gt 0 ] || die "set MODEL (a pretrained model file or directory)"
    cat "${pieces[@]}" >"$MODEL.tmp"
    want=$(cat data/llama-parts*/SHA256 2>/dev/null | head -1 | cut -d' ' -f1)
    have=$(sha256sum "$MODEL.tmp" | cut -d' ' -f1)
    if [ -n "$want" ] && [ "$want" != "$have" ]; then
      rm -f "$MODEL.tmp"
      die "the joined pieces (${pieces[*]}) have SHA-256 $have, expected $want: a piece is missing"
    fi
    mv "$MODEL.tmp" "$MODEL"
  fi
fi
DATA=$EXP/data
FILLER=$EXP/filler.txt

# The attention overrides of a run (train --set values, one per line).
run_settings() {
  local run=$1
  # Suffixes, in either order: -local (sinks and a window of WINDOW keys),
  # -localW (a window of W keys), -cap (capped buckets).
  while :; do
    if [[ $run =~ ^(.+)-local([0-9]*)$ ]]; then
      run=${BASH_REMATCH[1]}
      printf '%s\n' "attention.sink_tokens=$SINKS" "attention.local_window=${BASH_REMATCH[2]:-$WINDOW}"
    elif [[ $run == *-cap ]]; then
      run=${run%-cap}
      echo "attention.lsh_capacity=1"
    else
      break
    fi
  done
  case $run in
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
  case $run in
    lora-*) printf '%s\n' "model.lora.rank=8" "model.lora.alpha=16" \
              "model.lora.train_embeddings=true" "model.lora.train_norms=true" ;;
  esac
}
# eval_model NAME MODEL [extra eval flags]: perplexity at every EVAL_CONTEXT and
# the pass key at every PASSKEY_CONTEXT (none when empty), into
# $EXP/results/NAME-*.json (skipped when there).
eval_model() {
  local name=$1 model=$2
  shift 2
  for c in ${EVAL_CONTEXTS//,/ }; do
    local out=$EXP/results/$name-ppl-$c.json
    [ -s "$out" ] && continue
    past_deadline && return 1
    log "eval $name: perplexity at $c"
    "$SF" eval --model "$model" --data "$DATA" --context "$c" --stride $(( c / 2 )) \
      --max-tokens "$EVAL_TOKENS" --device "$DEVICE" --json-file "$out.tmp" "$@" \
      >"$EXP/logs/$name-ppl-$c.log" 2>&1 && mv "$out.tmp" "$out" ||
      { log "  failed: $(tail -1 "$EXP/logs/$name-ppl-$c.log")"; rm -f "$out.tmp"; }
  done
  local out=$EXP/results/$name-passkey.json
  if [ -n "$PASSKEY_CONTEXTS" ] && [ ! -s "$out" ]; then
    past_deadline && return 1
    log "eval $name: pass key at $PASSKEY_CONTEXTS"
    "$SF" eval --model "$model" --passkey --text "$FILLER" --passkey-contexts "$PASSKEY_CONTEXTS" \
      --passkey-depths "$PASSKEY_DEPTHS" --device "$DEVICE" --json-file "$out.tmp" "$@" \
      >"$EXP/logs/$name-passkey.log" 2>&1 && mv "$out.tmp" "$out" ||
      { log "  failed: $(tail -1 "$EXP/logs/$name-passkey.log")"; rm -f "$out.tmp"; }
  fi
}

# eval_run NAME: a trained run, densely at every context (and the pass key),
# and under its own training pattern at N.
eval_run() {
  local name=$1
  [ -s "$EXP/runs/$name/ckpt.pt" ] || return 0
  eval_model "$name-dense" "$EXP/runs/$name" --attention dense || return 1
  # A run without --attention attends as trained, per layer.
  local own_passkey=""
  [ "$OWN_PASSKEY" = 1 ] && own_passkey=$N
  EVAL_CONTEXTS=$N PASSKEY_CONTEXTS=$own_passkey eval_model "$name-own" "$EXP/runs/$name"
}

# The runs in order: every run at the first seed, then SEED_RUNS at the others.
run_names() {
  if [ -n "${NAMES:-}" ]; then tr ',' '\n' <<<"$NAMES"; return; fi
  local first=${SEEDS%%,*} seed run
  for seed in ${SEEDS//,/ }; do
    for run in ${RUNS//,/ }; do
      [ "$seed" = "$first" ] || [[ ",$SEED_RUNS," == *",$run,"* ]] || continue
      echo "$run-s$seed"
    done
  done
}

# train_run NAME: trains run NAME (= RUN-sSEED), resuming from its checkpoint;
# 0 when done, 2 when stopped at the deadline, 1 when it failed.
train_run() {
  local name=$1 run=${1%-s*} seed=${1##*-s}
  [ -s "$EXP/results/$name-train.json" ] && return 0
  past_deadline && return 2
  local sets=() lr=$LR
  while IFS= read -r s; do sets+=(--set "$s"); done < <(run_settings "$run")
  case $run in lora-*) lr=$LORA_LR ;; esac
  local every=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 ))
  log "train $name: $STEPS steps at $N"
  local limit=()
  [ "$DEADLINE" -gt 0 ] && limit=(timeout -s TERM -k 60 $(( DEADLINE - SECONDS )))
  "${limit[@]}" "$SF" train --config preset:llama_finetune --set "model.init_from=$MODEL" \
    --set "data.dir=$DATA" --set "data.seq_len=$N" --set data.batch_size=1 \
    --set "model.block_size=$N" --set "model.rope_scaling.type=$ROPE" \
    --set "model.rope_scaling.factor=$FACTOR" --set "train.max_steps=$STEPS" \
    --set "train.seed=$seed" --set "data.seed=$seed" --set "optim.lr=$lr" \
    --set "schedule.warmup_steps=$WARMUP" --set "eval.interval=$every" \
    --set eval.batches=4 --set eval.sample_tokens=0 --set "checkpoint.interval=$every" \
    --set "checkpoint.out_dir=$EXP/runs/$name" --set "train.activation_checkpointing=$CKPT" \
    --set "train.device=$DEVICE" --set logging.interval=10 "${sets[@]}" \
    >>"$EXP/logs/$name-train.log" 2>&1
  local rc=$?
  train_exit "$rc" "$name" || return
  # The run's losses, speed and peak memory, from its metrics.
  python3 - "$EXP/runs/$name/metrics.jsonl" "$EXP/results/$name-train.json" "$run" "$seed" \
    "$lr" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
# Steady state: the logging windows after the first (which holds start-up).
tps = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
out = {"run": sys.argv[3], "seed": int(sys.argv[4]), "lr": float(sys.argv[5]),
       "train_loss": [(r["step"], r["loss"]) for r in train],
       "val_loss": [(r["step"], r["val_loss"]) for r in val],
       "tokens_per_s": tps,
       "median_tokens_per_s": statistics.median(tps) if tps else None,
       "peak_gpu_gib": max((r.get("peak_gpu_gib", 0) for r in train), default=None)}
json.dump(out, open(sys.argv[2], "w"), indent=1)
PY
  log "  done: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"val loss {r['val_loss'][-1][1] if r['val_loss'] else 'n/a'}, {r['median_tokens_per_s'] or 0:.0f} tok/s, peak {r['peak_gpu_gib'] or 0:.1f} GiB\")" "$EXP/results/$name-train.json")"
  return 0
}

for phase in $PHASES; do
  case $phase in
  data)
    prepare_data "$MODEL" "with the model's tokenizer"
    # Pass-key filler: the usual repeated sentences (Mohtashami and Jaggi 2023).
    if [ ! -s "$FILLER" ]; then
      for _ in $(seq 1 $(( 2 * N / 20 + 100 ))); do
        echo "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
      done >"$FILLER"
    fi
    ;;
  zeroshot)
    # The base model within its own window; then extended by each scaling kind.
    native=$(for c in ${EVAL_CONTEXTS//,/ }; do [ "$c" -le "$BASE_CONTEXT" ] && echo "$c"; done | paste -sd,)
    EVAL_CONTEXTS=$native PASSKEY_CONTEXTS=$BASE_CONTEXT eval_model base "$MODEL" --attention dense || continue
    longer=$(for c in ${EVAL_CONTEXTS//,/ }; do [ "$c" -ge "$BASE_CONTEXT" ] && echo "$c"; done | paste -sd,)
    kinds=${ZEROSHOT_KINDS:-linear,dynamic,yarn}
    for kind in ${kinds//,/ }; do
      EVAL_CONTEXTS=$longer eval_model "base-$kind$FACTOR" "$MODEL" --attention dense \
        --rope-scaling "$kind:$FACTOR" || break
    done
    ;;
  train)
    for name in $(run_names); do
      train_run "$name"
      rc=$?
      [ $rc -eq 2 ] && break
      [ $rc -eq 0 ] && [ "$EVAL_AFTER_TRAIN" = 1 ] && { eval_run "$name" || break; }
    done
    ;;
  eval)
    for name in $(run_names); do eval_run "$name" || break; done
    ;;
  saap)
    # SAAP at N on the dense-fine-tuned model and on the best sparse one
    # (SAAP_RUNS, default dense-s1 and hash16-s1).
    for one in ${SAAP_RUNS:-dense-s1 hash16-s1}; do
      model=$EXP/runs/$one
      [ -s "$model/ckpt.pt" ] || continue
      past_deadline && break
      index=$EXP/results/$one.saap
      if [ ! -s "$index" ]; then
        log "saap fit $one at $N"
        # shellcheck disable=SC2086
        "$SF" saap fit --model "$model" --data "$DATA" --context "$N" --saap-index "$index" \
          --device "$DEVICE" ${SAAP_FIT_ARGS:-} --json-file "$EXP/results/$one-saap-fit.json" \
          >"$EXP/logs/$one-saap-fit.log" 2>&1 ||
          { log "  failed: $(tail -2 "$EXP/logs/$one-saap-fit.log")"; continue; }
      fi
      out=$EXP/results/$one-saap-eval.json
      if [ ! -s "$out" ]; then
        past_deadline && break
        log "saap eval $one at $N: recall, keys visited, perplexity"
        # shellcheck disable=SC2086
        "$SF" saap eval --model "$model" --data "$DATA" --context "$N" --saap-index "$index" \
          --max-tokens "$(( 2 * N ))" --device "$DEVICE" --noneedle \
          ${SAAP_EVAL_ARGS:---key-budgets 0.01,0.02,0.035,0.05 --per-head-budgets} \
          --json-file "$out.tmp" >"$EXP/logs/$one-saap-eval.log" 2>&1 && mv "$out.tmp" "$out" ||
          { log "  failed: $(tail -2 "$EXP/logs/$one-saap-eval.log")"; rm -f "$out.tmp"; }
      fi
      # Perplexity on the same held-out tokens as the dense evaluation, and the
      # pass key, with per-head budgets at SAAP_BUDGET of the keys.
      # shellcheck disable=SC2086
      EVAL_CONTEXTS=$N PASSKEY_CONTEXTS=$N eval_model "$one-saap" "$model" --attention saap \
        --saap-index "$index" ${SAAP_RUN_ARGS:---key-budget 0.03 --per-head-budgets}
    done
    ;;
  report)
    "${PYTHON:-python3}" scripts/long_context_report.py "$EXP"
    ;;
  *) die "unknown phase $phase (data zeroshot train eval saap report)" ;;
  esac
done
