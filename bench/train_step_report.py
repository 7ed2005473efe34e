#!/usr/bin/env python3
"""Merge bench_train_step's JSON and bench/train_step_torch.py's JSON of one
call into one file and print the table of docs/performance.md: tokens/s per
context and mode, and each sparseflash row's ratio to PyTorch torch.compile
with SDPA cuDNN at the same context (the acceptance's reference).

Usage: train_step_report.py OURS.json TORCH.json [--out MERGED.json] [--command CMD]
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ours")
    ap.add_argument("torch")
    ap.add_argument("--out")
    ap.add_argument("--command", default="", help="the command that produced both, for the record")
    args = ap.parse_args()
    ours = json.load(open(args.ours))
    try:
        anchor = json.load(open(args.torch))
    except (OSError, ValueError):
        anchor = {"rows": []}
    compiled = {r["n"]: r for r in anchor["rows"]
                if r.get("impl") == "compiled" and r.get("backend") == "cudnn" and "error" not in r}
    for r in ours["rows"]:
        ref = compiled.get(r["n"])
        if ref and "tokens_per_s" in r:
            r["ratio_to_compiled_cudnn"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["memory_ratio_to_compiled_cudnn"] = r["peak_gib"] / ref["peak_gib"]
    merged = {"gpu": ours.get("gpu"), "command": args.command, "sparseflash": ours,
              "pytorch": anchor}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(merged, f, indent=2)

    print(f"{'N':>6}  {'what':28} {'tok/s':>9} {'ms/step':>8} {'GiB':>6} {'x compiled':>10} {'density':>8}")
    ns = sorted({r["n"] for r in ours["rows"]} | {r["n"] for r in anchor["rows"]})
    labelled = [(f"pytorch {r['impl']} {r['backend']}", r) for r in anchor["rows"]] + \
               [(f"sparseflash {r['mode']}", r) for r in ours["rows"]]
    for n in ns:
        for name, r in labelled:
            if r["n"] != n:
                continue
            if "error" in r:
                print(f"{n:>6}  {name:28} error: {r['error'][:50]}")
                continue
            ref = compiled.get(n)
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
            density = r.get("pattern_density")
            print(f"{n:>6}  {name:28} {r['tokens_per_s']:9.0f} {r['ms_per_step']:8.1f} "
                  f"{r['peak_gib']:6.1f} {ratio:>10} "
                  f"{(f'{sum(density) / len(density):8.3f}' if density else ''):>8}")

if __name__ == "__main__":
    main()
