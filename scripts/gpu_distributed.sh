#!/usr/bin/env bash
# scripts/gpu_distributed.sh: the data-parallel acceptance run, on a host with
# 2 GPUs (the nvidia-h200-x2 kind). GPT-2-small shape at N = 8192 with hash
# attention (preset gpt2_small_hash8k: nb 16, shared QK; the CUDA kernels are
# used automatically), the same global batch of 4 sequences per step, 3 runs:
#   2gpu: data.batch_size 2 per GPU (sparseflash launch --nproc-per-node 2, NCCL)
#   b4:   1 GPU, data.batch_size 4: the same computation (same rows, same hash
#         rotations), so the losses differ by bf16 rounding only: the loss check
#   acc:  1 GPU, data.batch_size 2, train.grad_accum 2: the same rows and the
#         same per-GPU micro-batch as 2gpu (rotations are drawn per forward, so
#         they differ): the scaling check, what data parallelism costs
#   zero1: as 2gpu with distributed.zero1 (sharded AdamW state; ZERO1=0 skips it)
# Prints the loss of every step, tokens/s, the scaling efficiency (2-GPU
# tokens/s / (2 x 1-GPU tokens/s)) against both 1-GPU runs, the time per step
# in gradient all-reduce and its bus bandwidth; writes $OUT/distributed.json.
#
# Builds what it needs first (deps and configure through scripts/gpu_host.sh,
# which needs .deps/ carried to the host; then only the sparseflash target),
# and prepares a small corpus unless /tmp/pycorpus exists.
#
# Environment: OUT (default ./gpu-out), STEPS (default 25), WARMUP (steps left
# out of tokens/s and communication figures, default 5), ZERO1 (default 1).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
STEPS=${STEPS:-25}
WARMUP=${WARMUP:-5}
B=build-gpu
BIN=$B/cli/sparseflash
die() { echo "gpu_distributed.sh: error: $*" >&2; exit 1; }

[ "$STEPS" -gt "$WARMUP" ] || die "STEPS ($STEPS) must exceed WARMUP ($WARMUP)"
[ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ] ||
  die "needs 2 GPUs; nvidia-smi -L shows: $(nvidia-smi -L 2>&1 | tr '\n' ' ')"

# --- build (deps + configure as gpu_host.sh does them; then one target)
echo "==> [${SECONDS}s] deps, configure"
OUT=$OUT/host GPU_PHASES=configure scripts/gpu_host.sh >"$OUT/host.log" 2>&1 ||
  { tail -20 "$OUT/host.log"; die "gpu_host.sh configure failed (log: $OUT/host.log)"; }
export PATH=/usr/local/cuda/bin:$PATH
echo "==> [${SECONDS}s] build sparseflash"
cmake --build "$B" --target sparseflash -j16 >"$OUT/build.log" 2>&1 ||
  { tail -30 "$OUT/build.log"; die "build failed (log: $OUT/build.log)"; }
grep -q "^SF_NCCL_INCLUDE:PATH=/" "$B/CMakeCache.txt" ||
  die "nccl.h was not found at configure time (SF_NCCL_INCLUDE in $B/CMakeCache.txt): no NCCL backend"

# --- corpus: the one gpu_host.sh prepares, or a smaller one of the same sources
CORPUS=/tmp/pycorpus
if [ ! -f "$CORPUS/meta.json" ]; then
  CORPUS=/tmp/pycorpus_dp
  if [ ! -f "$CORPUS/meta.json" ]; then
    echo "==> [${SECONDS}s] prepare $CORPUS"
    "$BIN" prepare /opt/torch/.venv/lib --include '*.py' --max-bytes 40000000 \
      --out "$CORPUS" >"$OUT/prepare.log" 2>&1 || { tail -5 "$OUT/prepare.log"; die "prepare failed"; }
  fi
fi

# --- the three runs
common=(train --config preset:gpt2_small_hash8k --set "data.dir=$CORPUS"
        --set "train.max_steps=$STEPS" --set logging.interval=1 --set eval.interval=0
        --set eval.batches=1 --set eval.sample_tokens=0 --set checkpoint.interval=0
        --set data.batch_size=2)
rm -rf /tmp/dp_run_2gpu /tmp/dp_run_b4 /tmp/dp_run_acc /tmp/dp_run_zero1 "$OUT"/metrics_*.jsonl
run() {  # NAME COMMAND...: one run; log and metrics into $OUT
  local name=$1 rc
  shift
  echo "==> [${SECONDS}s] $name"
  "$@" --set "checkpoint.out_dir=/tmp/dp_run_$name" >"$OUT/train_$name.log" 2>&1
  rc=$?
  cp "/tmp/dp_run_$name/metrics.jsonl" "$OUT/metrics_$name.jsonl" 2>/dev/null
  [ $rc -eq 0 ] || { tail -15 "$OUT/train_$name.log"; echo "$name: exit $rc" >&2; }
  return $rc
}
run 2gpu "$BIN" launch --nproc-per-node 2 --master-port 29731 -- "${common[@]}" ||
  die "the 2-GPU run failed (log: $OUT/train_2gpu.log)"
run b4 env CUDA_VISIBLE_DEVICES=0 "$BIN" "${common[@]}" --set data.batch_size=4
run acc env CUDA_VISIBLE_DEVICES=0 "$BIN" "${common[@]}" --set train.grad_accum=2 ||
  die "the 1-GPU run failed (log: $OUT/train_acc.log)"
if [ "${ZERO1:-1}" = 1 ]; then
  run zero1 "$BIN" launch --nproc-per-node 2 --master-port 29732 -- "${common[@]}" \
    --set distributed.zero1=true
fi

# --- the table
python3 - "$OUT" "$WARMUP" "$SECONDS" <<'PY'
import json, os, re, sys
out, warmup, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def load(name):
    path = f"{out}/metrics_{name}.jsonl"
    if not os.path.exists(path):
        return None
    return [r for r in map(json.loads, open(path)) if "loss" in r]

def throughput(rs):  # tokens/s over the steps after the warm-up
    a, b = rs[warmup - 1], rs[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])

def mean(rs, key):
    vals = [r[key] for r in rs[warmup:]]
    return sum(vals) / len(vals)

def cell(x, fmt):
    return "n/a" if x is None else format(x, fmt)

two, zero1 = load("2gpu"), load("zero1")
ones = {"1gpu_batch4": load("b4"), "1gpu_batch2_accum2": load("acc")}
log2 = open(f"{out}/train_2gpu.log").read()
probe = re.search(r"all-reduce bus bandwidth ([0-9.]+) GB/s \(([0-9.]+) MB probe\)", log2)
attention = re.search(r"attention (\w+); device (\S+)", log2)
tps2 = throughput(two)
result = {
    "steps": len(two), "warmup_steps": warmup, "global_batch_sequences": 4, "seq_len": 8192,
    "loss": {"2gpu": [r["loss"] for r in two],
             **{k: [r["loss"] for r in v] if v else None for k, v in ones.items()}},
    "tokens_per_s": {"2gpu": tps2, **{k: throughput(v) if v else None for k, v in ones.items()}},
    "scaling_efficiency": {k: tps2 / (2 * throughput(v)) if v else None for k, v in ones.items()},
    "max_abs_loss_diff": {k: max(abs(a["loss"] - b["loss"]) for a, b in zip(two, v)) if v else None
                          for k, v in ones.items()},
    "allreduce_ms_per_step": mean(two, "comm_ms"),
    "allreduce_wait_ms_per_step": mean(two, "comm_wait_ms"),
    "allreduce_bus_gb_per_s": mean(two, "comm_bus_gb_per_s"),
    "probe_bus_gb_per_s": float(probe.group(1)) if probe else None,
    "zero1": None if not zero1 else {
        "loss": [r["loss"] for r in zero1], "tokens_per_s": throughput(zero1),
        "max_abs_loss_diff_vs_2gpu": max(abs(a["loss"] - b["loss"]) for a, b in zip(two, zero1)),
        "reduce_scatter_ms_per_step": mean(zero1, "comm_ms"),
        "reduce_scatter_bus_gb_per_s": mean(zero1, "comm_bus_gb_per_s")},
    "step_ms_2gpu": 1000 * (two[-1]["elapsed_s"] - two[warmup - 1]["elapsed_s"]) / (len(two) - warmup),
    "script_seconds": seconds,
}
json.dump(result, open(f"{out}/distributed.json", "w"), indent=1)

print(f"\nGPT-2-small shape, N 8192, attention {attention.group(1) if attention else '?'} "
      f"(nb 16, shared QK; CUDA kernels by attention.backend AUTO), global batch 4 x 8192 tokens")
print(f"{'step':>4} {'2 GPUs':>9} {'1 GPU b4':>9} {'diff':>8} {'1 GPU 2x2':>10} {'diff':>8}")
for i, t in enumerate(two):
    row = f"{t['step']:>4} {t['loss']:>9.4f}"
    for v in ones.values():
        if v and i < len(v):
            row += f" {v[i]['loss']:>9.4f} {t['loss'] - v[i]['loss']:>+8.4f}"
        else:
            row += f" {'n/a':>9} {'n/a':>8}"
    print(row)
tp, eff, diff = result["tokens_per_s"], result["scaling_efficiency"], result["max_abs_loss_diff"]
b4, acc = "1gpu_batch4", "1gpu_batch2_accum2"
print(f"\n{'':36}{'2 GPUs':>12} {'1 GPU b4':>12} {'1 GPU 2x2':>12}")
print(f"{'tokens/s (steps > %d)' % warmup:36}{tp['2gpu']:>12,.0f} "
      f"{cell(tp[b4], ',.0f'):>12} {cell(tp[acc], ',.0f'):>12}")
print(f"{'scaling efficiency against it':36}{'':>12} {cell(eff[b4], '.3f'):>12} "
      f"{cell(eff[acc], '.3f'):>12}")
print(f"{'max |loss diff| against 2 GPUs':36}{'':>12} {cell(diff[b4], '.4f'):>12} "
      f"{cell(diff[acc], '.4f'):>12}")
print(f"{'2-GPU step time, ms':36}{result['step_ms_2gpu']:>12.1f}")
print(f"{'gradient all-reduce, ms per step':36}{result['allreduce_ms_per_step']:>12.2f}")
print(f"{'  not overlapped with backward, ms':36}{result['allreduce_wait_ms_per_step']:>12.2f}")
print(f"{'  bus bandwidth, GB/s':36}{result['allreduce_bus_gb_per_s']:>12.1f}")
if probe:
    print(f"{'probe all-reduce (%s MB), GB/s' % probe.group(2):36}{float(probe.group(1)):>12.1f}")
z = result["zero1"]
if z:
    print(f"\nZeRO-1, 2 GPUs: {z['tokens_per_s']:,.0f} tokens/s, max |loss diff| against 2 GPUs "
          f"{z['max_abs_loss_diff_vs_2gpu']:.4f}, gradient reduce-scatter "
          f"{z['reduce_scatter_ms_per_step']:.2f} ms per step at {z['reduce_scatter_bus_gb_per_s']:.1f} GB/s")
print(f"\n{out}/distributed.json; script time {seconds} s")
PY
