#!/usr/bin/env bash
# scripts/gpu_quality_8k.sh: on the GPU host, the validation loss after a short
# training run of each attention mode at N = 8192, with this tree and with an
# earlier commit's source, so that a speed change can be checked for quality.
#
# Each run: `sparseflash train --config preset:gpt2_small_hash8k` (GPT-2-small,
# 2 x 8192 tokens per step) on QUALITY_DATA for QUALITY_STEPS steps, then the
# validation loss over eval.batches = 20 batches; seeds QUALITY_SEEDS.
#
# Environment:
#   OUT=DIR               results: quality-8k.jsonl (a row per run), logs.tgz
#   QUALITY_DATA=DIR      a prepared corpus (required; carried to the host)
#   QUALITY_STEPS=200     steps per run
#   QUALITY_SEEDS="1 2"   train.seed values
#   QUALITY_MODES=...     space-separated NAME=override,override entries
#   OLD_SRC=DIR           the earlier source tree (e.g. `git archive COMMIT | tar -x -C DIR`);
#                         built in DIR/build-gpu; empty: this tree only
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
gpu_logs logs
DATA=${QUALITY_DATA:?set QUALITY_DATA to a prepared corpus}
DATA=$(cd "$DATA" && pwd)
STEPS=${QUALITY_STEPS:-200}
SEEDS=${QUALITY_SEEDS:-1 2}
MODES=${QUALITY_MODES:-"dense=attention.kind=DENSE,attention.shared_qk=false hash16=attention.kind=HASH,attention.shared_qk=true hash16sep=attention.kind=HASH,attention.shared_qk=false hash16raw=attention.kind=HASH,attention.shared_qk=true,attention.lsh_center=false drop0.5=attention.kind=DROP,attention.shared_qk=false"}
build() {  # build DIR NAME: the sparseflash binary of that tree
  mkdir -p "$LOGS/build-$2"
  (cd "$1" && OUT="$LOGS/build-$2" GPU_PHASES="deps configure build" GPU_BUILD_TARGETS=sparseflash \
     bash scripts/gpu_host.sh >"$LOGS/build-$2.log" 2>&1) || {
    echo "build of $1 failed"; grep -E "error" "$LOGS/build-$2.log" | head -20; }
}
[ -n "${OLD_SRC:-}" ] && [ ! -d "$OLD_SRC/.deps" ] && cp -r .deps "$OLD_SRC/"
trees=("new=.")
[ -n "${OLD_SRC:-}" ] && trees+=("old=$OLD_SRC")
for t in "${trees[@]}"; do build "${t#*=}" "${t%%=*}" & done
wait
echo "builds: ${SECONDS}s"
results="$OUT/quality-8k.jsonl"
: >"$results"
for t in "${trees[@]}"; do
  name=${t%%=*} dir=${t#*=}
  bin="$dir/build-gpu/cli/sparseflash"
  # Trees before the CLI moved to cli/ (d19867c among them) built it in launch/.
  [ -x "$bin" ] || bin="$dir/build-gpu/launch/sparseflash"
  [ -x "$bin" ] || { echo "$name: no binary"; continue; }
  for m in $MODES; do
    mode=${m%%=*} sets=()
    IFS=',' read -ra kv <<<"${m#*=}"
    for o in "${kv[@]}"; do sets+=(--set "$o"); done
    # A mode that sets a field this tree's config does not have is skipped.
    skip=0
    for o in "${kv[@]}"; do
      field=${o%%=*}
      grep -q "optional .* ${field##*.} = " "$dir/configs/experiment.proto" || skip=1
    done
    [ $skip = 1 ] && { echo "$name: $mode skipped (a field this tree lacks)"; continue; }
    for seed in $SEEDS; do
      run=/tmp/q_${name}_${mode}_$seed
      rm -rf "$run"
      start=$SECONDS
      "$bin" train --config preset:gpt2_small_hash8k --set data.dir="$DATA" \
        --set train.max_steps="$STEPS" --set train.seed="$seed" --set logging.interval=50 \
        --set eval.interval=0 --set eval.batches=20 --set eval.sample_tokens=0 \
        --set checkpoint.interval=0 --set checkpoint.out_dir="$run" "${sets[@]}" \
        >"$LOGS/q_${name}_${mode}_$seed.log" 2>&1
      rc=$?
      val=$(grep -o '"val_loss":[0-9.eE+-]*' "$run/metrics.jsonl" 2>/dev/null | tail -1 | cut -d: -f2)
      tps=$(grep -o '"tokens_per_s":[0-9.eE+-]*' "$run/metrics.jsonl" 2>/dev/null | tail -1 | cut -d: -f2)
      echo "{\"code\": \"$name\", \"mode\": \"$mode\", \"seed\": $seed, \"exit\": $rc, \"val_loss\": ${val:-null}, \"tokens_per_s\": ${tps:-null}, \"seconds\": $((SECONDS - start))}" | tee -a "$results"
    done
  done
done
python3 - "$results" <<'EOF'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(list)
for r in rows:
    if r["val_loss"] is not None:
        by[(r["mode"], r["code"])].append(r["val_loss"])
print(f"\n{'mode':10} {'code':5} {'val loss per seed':28} {'mean':>7}")
for (mode, code), v in sorted(by.items()):
    print(f"{mode:10} {code:5} {' '.join(f'{x:.4f}' for x in v):28} {sum(v)/len(v):7.4f}")
EOF
echo "total: ${SECONDS}s"
