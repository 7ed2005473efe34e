#!/usr/bin/env bash
# scripts/lm_experiment.sh: issue 21's experiment, the paper's language-modelling
# comparison. A GPT-2-small (preset:gpt2_small_hash8k: 12 layers, 12 heads,
# d 768, learned positions, no biases, tied head) is trained from scratch on long
# BPE-tokenized documents at N = 8192 and 16384 with each attention kind (dense,
# hash nb 8 and 16 with shared and with separate Q/K, drop s = 0.3 and 0.5, and
# a hybrid with the first two layers dense), with the same seed, tokens and
# schedule; validation loss is recorded against tokens and against training
# time (metrics' train_s: without evaluations and checkpoint writes).
#
# Every phase is resumable: a finished run leaves EXP/results/NAME-train.json
# and is skipped when the script runs again; a run stopped at the deadline
# resumes from its checkpoint. So the experiment spreads over device calls.
#
# Usage: TOKENIZER=FILE bash scripts/lm_experiment.sh [PHASE...]
#   PHASE: data train report (default: all three, in that order)
#
# Environment (defaults in brackets):
#   SF          the sparseflash binary [build-gpu/cli/sparseflash]
#   EXP         where everything goes [runs/lm-experiment]
#   TOKENIZER   the tokenizer of `prepare` (.gguf, tokenizer.json); the
#               SmolLM2 tokenizer (49152 tokens) as a tokenizer-only GGUF made
#               by scripts/staging/tokenizer_gguf.py is what the report used
#   SOURCE      what `prepare` reads [the Python site-packages of python3]: files
#               matching INCLUDE ['*.py'], one document per directory, documents
#               shorter than MIN_DOC_TOKENS [16384] dropped, VAL_FRACTION [0.05]
#               of the directories held out; PREPARE_ARGS: more prepare flags
#               (e.g. --max-bytes 160000000)
#   CONTEXTS    [8192,16384]; TOKENS_PER_STEP [16384] (batch = TOKENS_PER_STEP / N)
#   STEPS       optimizer steps per run [2000]; LR [1e-3]; WARMUP_FRACTION [0.02];
#               MIN_LR_RATIO [0.1] (cosine)
#   MODEL_SETS  more --set values for the model, space separated (a smaller
#               model of the family, e.g. "model.n_layer=6 model.d_model=384
#               model.n_head=6"); the report names the model from the config
#   RUNS        [dense,hash16,hash16sep,hash8,hash8sep,drop30,drop50,hybrid]
#               (hybrid: HYBRID_KIND [hash16] in every layer but the first two, dense;
#               a hash run or hybrid named ...cap has capped buckets: equal sizes in
#               each block of 128 rows, attention.lsh_capacity=1; e.g. hash16cap)
#   SEEDS       [1,2]; the first seed runs every run at every context, later
#               seeds only SEED_RUNS [dense,hash16] at SEED_CONTEXTS [8192]
#   NAMES       the runs to train, in this order, as RUN-N-sSEED (e.g.
#               dense-8192-s1,hash16-8192-s1); overrides RUNS, SEEDS, SEED_RUNS
#   EVAL_EVERY  steps between validation losses [STEPS / 20]; EVAL_BATCHES [8]
#               (each of TOKENS_PER_STEP tokens)
#   CHECKPOINT_EVERY  steps between checkpoints [STEPS / 4] (GPT-2-small with its
#               AdamW state is 1.5 GB a write; a stop at the deadline writes one too)
#   KEEP_CHECKPOINTS  keep each finished run's ckpt.pt [0: removed once its
#               results are written]
#   DEADLINE    seconds after which no new run starts and a run in progress is
#               stopped with a checkpoint (SIGTERM), to resume on the next call
#               [0 = none]
#   DEVICE      [cuda]
#   SOURCE_REV  the code's revision, recorded in each run's JSON [git describe
#               --always --dirty of this tree; on the GPU host, whose checkout is
#               the last landed commit plus a diff, pass this machine's commit]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
SECONDS=0
SF=${SF:-build-gpu/cli/sparseflash}
EXP=${EXP:-runs/lm-experiment}
CONTEXTS=${CONTEXTS:-8192,16384}
TOKENS_PER_STEP=${TOKENS_PER_STEP:-16384}
STEPS=${STEPS:-2000}
LR=${LR:-1e-3}
WARMUP_FRACTION=${WARMUP_FRACTION:-0.02}
MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}
MODEL_SETS=${MODEL_SETS:-}
RUNS=${RUNS:-dense,hash16,hash16sep,hash8,hash8sep,drop30,drop50,hybrid}
HYBRID_KIND=${HYBRID_KIND:-hash16}
SEEDS=${SEEDS:-1,2}
SEED_RUNS=${SEED_RUNS:-dense,hash16}
SEED_CONTEXTS=${SEED_CONTEXTS:-8192}
EVAL_EVERY=${EVAL_EVERY:-$(( STEPS / 20 > 0 ? STEPS / 20 : 1 ))}
EVAL_BATCHES=${EVAL_BATCHES:-8}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}
MIN_DOC_TOKENS=${MIN_DOC_TOKENS:-16384}
VAL_FRACTION=${VAL_FRACTION:-0.05}
INCLUDE=${INCLUDE:-*.py}
DEADLINE=${DEADLINE:-0}
DEVICE=${DEVICE:-cuda}
PHASES=${*:-data train report}
SOURCE_REV=${SOURCE_REV:-$(git describe --always --dirty 2>/dev/null || echo unknown)}
export SOURCE_REV
DATA=$EXP/data
mkdir -p "$EXP"/{results,logs,runs}
ME=lm_experiment
# log, die, past_deadline; refuses a missing binary.
# shellcheck source=scripts/experiment_lib.sh
source scripts/experiment_lib.sh
for phase in $PHASES; do
  case $phase in data|train|report) ;; *) die "unknown phase $phase (data train report)" ;; esac
done
# Every logged step must be a multiple of the logging interval for the
# validation losses to find their training time.
[ $(( EVAL_EVERY % 10 )) -eq 0 ] || die "EVAL_EVERY ($EVAL_EVERY) must be a multiple of 10"

# The attention overrides of a run (train --set values, one per line).
run_settings() {
  case $1 in
    dense) printf "%s\n" "attention.kind=DENSE" "attention.shared_qk=false" ;;
    # The preset caps the buckets; these runs are the paper's uncapped LSH.
    hash8|hash16|hash32) printf '%s\n' "attention.kind=HASH" "attention.num_buckets=${1#hash}" \
                           "attention.shared_qk=true" "attention.lsh_capacity=0" ;;
    hash8sep|hash16sep|hash32sep) local nb=${1#hash}; nb=${nb%sep}
      printf '%s\n' "attention.kind=HASH" "attention.num_buckets=$nb" "attention.shared_qk=false" \
        "attention.lsh_capacity=0" ;;
    # ...cap: buckets of equal size in each block of 128 rows (attention.lsh_capacity=1).
    hash8cap|hash16cap|hash32cap|hash8sepcap|hash16sepcap|hash32sepcap)
      run_settings "${1%cap}"; echo "attention.lsh_capacity=1" ;;
    drop30) printf '%s\n' "attention.kind=DROP" "attention.drop_prob=0.3" "attention.shared_qk=false" ;;
    drop50) printf '%s\n' "attention.kind=DROP" "attention.drop_prob=0.5" "attention.shared_qk=false" ;;
    # The first two layers dense: the layers whose attention is most local,
    # where a bucket or a drop loses the neighbours the model relies on most.
    hybrid) run_settings "$HYBRID_KIND"
      echo "layer_attention=[{layers: [0, 1] attention {kind: DENSE}}]" ;;
    hybridcap) run_settings hybrid; echo "attention.lsh_capacity=1" ;;
    *) die "unknown run $1 (dense hashNB[sep][cap] drop30 drop50 hybrid)" ;;
  esac
}

# The runs in order: every run at every context at the first seed, then
# SEED_RUNS at SEED_CONTEXTS at the later seeds.
run_names() {
  if [ -n "${NAMES:-}" ]; then tr ',' '\n' <<<"$NAMES"; return; fi
  local first=${SEEDS%%,*} seed run n
  for seed in ${SEEDS//,/ }; do
    for n in ${CONTEXTS//,/ }; do
      for run in ${RUNS//,/ }; do
        if [ "$seed" != "$first" ]; then
          [[ ",$SEED_RUNS," == *",$run,"* ]] && [[ ",$SEED_CONTEXTS," == *",$n,"* ]] || continue
        fi
        echo "$run-$n-s$seed"
      done
    done
  done
}

# train_run NAME (= RUN-N-sSEED): trains it, resuming from its checkpoint;
# 0 when done, 2 when stopped at the deadline, 1 when it failed.
train_run() {
  local name=$1
  local seed=${name##*-s} rest=${name%-s*}
  local n=${rest##*-} run=${rest%-*}
  [ -s "$EXP/results/$name-train.json" ] && return 0
  [[ $n =~ ^[0-9]+$ ]] && [ $(( TOKENS_PER_STEP % n )) -eq 0 ] ||
    { log "bad run name $name (RUN-N-sSEED, N dividing TOKENS_PER_STEP=$TOKENS_PER_STEP)"; return 1; }
  past_deadline && return 2
  local sets=() s
  while IFS= read -r s; do sets+=(--set "$s"); done < <(run_settings "$run")
  for s in $MODEL_SETS; do sets+=(--set "$s"); done
  log "train $name: $STEPS steps of $TOKENS_PER_STEP tokens at N = $n"
  local limit=()
  [ "$DEADLINE" -gt 0 ] && limit=(timeout -s TERM -k 60 $(( DEADLINE - SECONDS )))
  local start=$SECONDS
  "${limit[@]}" "$SF" train --config preset:gpt2_small_hash8k --set "data.dir=$DATA" \
    --set "data.seq_len=$n" --set "model.block_size=$n" \
    --set "data.batch_size=$(( TOKENS_PER_STEP / n ))" --set "train.max_steps=$STEPS" \
    --set "train.seed=$seed" --set "data.seed=$seed" --set "optim.lr=$LR" \
    --set schedule.warmup_steps=0 --set "schedule.warmup_fraction=$WARMUP_FRACTION" \
    --set "schedule.min_lr_ratio=$MIN_LR_RATIO" --set "eval.interval=$EVAL_EVERY" \
    --set "eval.batches=$EVAL_BATCHES" --set eval.sample_tokens=0 \
    --set "checkpoint.interval=$CHECKPOINT_EVERY" --set "checkpoint.out_dir=$EXP/runs/$name" \
    --set "train.device=$DEVICE" --set logging.interval=10 "${sets[@]}" \
    >>"$EXP/logs/$name-train.log" 2>&1
  local rc=$?
  # The device time of the run, over every call it took (evaluations included).
  mkdir -p "$EXP/runs/$name" && echo $(( SECONDS - start )) >>"$EXP/runs/$name/device-seconds"
  train_exit "$rc" "$name" || return
  python3 - "$EXP/runs/$name" "$EXP/results/$name-train.json" "$run" "$n" "$seed" <<'PY'
import json, os, statistics, sys
run_dir, out, run, n, seed = sys.argv[1:]
rows = [json.loads(l) for l in open(run_dir + "/metrics.jsonl") if l.strip()]
train = [r for r in rows if "loss" in r]
by_step = {r["step"]: r for r in train}
val = []
for r in rows:
    if "val_loss" in r and r["step"] in by_step:
        t = by_step[r["step"]]
        val.append({"step": r["step"], "tokens": t["tokens"], "train_s": t["train_s"],
                    "val_loss": r["val_loss"]})
# Steady state: the logging windows after the first (which holds start-up).
tps = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
device_s = sum(int(x) for x in open(run_dir + "/device-seconds").read().split())
config = open(run_dir + "/config.txtpb").read()
json.dump({"run": run, "n": int(n), "seed": int(seed),
           "train_loss": [(r["step"], r["loss"]) for r in train],
           "val": val,
           "final_val_loss": val[-1]["val_loss"] if val else None,
           "train_s": train[-1]["train_s"] if train else None,
           "tokens": train[-1]["tokens"] if train else None,
           "median_tokens_per_s": statistics.median(tps) if tps else None,
           "peak_gpu_gib": max((r.get("peak_gpu_gib", 0) for r in train), default=None),
           # Per layer, the share of the dense pairs the pattern allowed (sparse runs).
           "pattern_density": [(r["step"], r["pattern_density"]) for r in train
                               if "pattern_density" in r],
           "device_s": device_s, "source_rev": os.environ.get("SOURCE_REV", "unknown"),
           "config": config},
          open(out, "w"), indent=1)
PY
  [ "$KEEP_CHECKPOINTS" = 1 ] || rm -f "$EXP/runs/$name/ckpt.pt"
  log "  done: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"val loss {r['final_val_loss']}, {r['median_tokens_per_s'] or 0:.0f} tok/s, {r['train_s'] or 0:.0f} s training, peak {r['peak_gpu_gib'] or 0:.1f} GiB\")" "$EXP/results/$name-train.json")"
}

for phase in $PHASES; do
  case $phase in
  data)
    [ -s "$DATA/meta.json" ] || [ -n "${TOKENIZER:-}" ] ||
      die "set TOKENIZER (a tokenizer file: .gguf or tokenizer.json)"
    prepare_data "${TOKENIZER:-}" "with tokenizer ${TOKENIZER:-}"
    ;;
  train)
    [ -s "$DATA/meta.json" ] || die "no data at $DATA: run the data phase first"
    # Exit 0 when every run is done; 2 when the deadline stopped one (run the
    # phase again to resume); 1 when a run failed (the others still train).
    train_status=0
    for name in $(run_names); do
      train_run "$name"
      rc=$?
      [ $rc -eq 2 ] && { train_status=2; break; }
      [ $rc -eq 0 ] || train_status=1
    done
    [ $train_status -eq 0 ] || exit $train_status
    ;;
  report)
    "${PYTHON:-python3}" scripts/lm_experiment_report.py "$EXP"
    ;;
  esac
done
