#!/usr/bin/env bash
# scripts/gpu_kernel_times.sh: on the GPU host, the time of every kernel of
# our attention call, case by case (Nsight Compute, one metric, clocks left
# alone), to see where a mode's fwd+bwd time goes (packing, forward, delta,
# dK/dV, dQ finalize, ...).
#   OUT=DIR  where the CSVs and the summary go
#   CASES    bench_attention --cases entries, space-separated (default: dense hash:16 drop:0.5 drop:0.7)
#   BENCH_N / BENCH_D  the shape (default 16384 / 64)
#   SKIP_BUILD=1  reuse build-gpu
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="bench_attention" \
    bash scripts/gpu_host.sh >"$OUT/setup.log" 2>&1 || { echo "setup failed"; tail -30 "$OUT/setup.log"; exit 1; }
fi
for c in ${CASES:-dense hash:16 drop:0.5 drop:0.7}; do
  for d in ${BENCH_D:-64}; do
    tag=$(echo "${c}_d$d" | tr ':.' '__')
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      build-gpu/bench/bench_attention --n "${BENCH_N:-16384}" --d "$d" --cases "$c" --nosdpa --reps 3 \
      >"$OUT/ncu_$tag.csv" 2>"$OUT/ncu_$tag.err"
  done
done
python3 - "$OUT" <<'PY'
import csv, glob, os, statistics, sys
out = sys.argv[1]
lines = []
for f in sorted(glob.glob(os.path.join(out, "ncu_*.csv"))):
    rows = [l for l in open(f) if l.startswith('"')]
    times = {}
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r["Kernel Name"].split("(")[0].split("<")[0].replace("void ", "")
        full = r["Kernel Name"][:90]
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        us = v / 1000 if unit in ("ns", "nsecond") else (v if unit in ("us", "usecond") else v * 1000)
        times.setdefault(full, []).append(us)
    lines.append(f"== {os.path.basename(f)[4:-4]}")
    for k, v in sorted(times.items(), key=lambda kv: -statistics.median(kv[1])):
        lines.append(f"  {statistics.median(v):10.1f} us  x{len(v):3d}  {k}")
text = "\n".join(lines)
open(os.path.join(out, "kernel_times.txt"), "w").write(text + "\n")
print(text)
PY
