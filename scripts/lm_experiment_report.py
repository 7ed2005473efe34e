#!/usr/bin/env python3
"""The report of scripts/lm_experiment.sh (issue 21's experiment).

Reads EXP/results/*-train.json (and data-meta.json) and writes
EXP/experiment.json (everything, one file), EXP/report.md (the tables, in
markdown) and, where matplotlib is installed, EXP/val-loss-tokens.png and
EXP/val-loss-time.png (validation loss against training tokens and against
training time, one panel per context).

"Time to dense's loss" is the training time (metrics' train_s: no evaluations,
no checkpoint writes) at which a run's validation loss first reaches the final
validation loss of dense at the same context (the mean over dense's seeds),
interpolated linearly between the two evaluations around it.

Usage: python3 scripts/lm_experiment_report.py EXP [--title TEXT]
"""
import argparse
import glob
import json
import os
import statistics
import sys

ORDER = ["dense", "hash8", "hash8sep", "hash16", "hash16sep", "hash32", "hash32sep",
         "hash8cap", "hash8sepcap", "hash16cap", "hash16sepcap", "hash32cap", "hash32sepcap",
         "drop30", "drop50", "hybrid", "hybridcap"]
LABEL = {"dense": "dense", "hash8": "hash nb 8, shared QK", "hash8sep": "hash nb 8, separate Q/K",
         "hash16": "hash nb 16, shared QK", "hash16sep": "hash nb 16, separate Q/K",
         "hash32": "hash nb 32, shared QK", "hash32sep": "hash nb 32, separate Q/K",
         "drop30": "drop s = 0.3", "drop50": "drop s = 0.5",
         "hybrid": "hybrid (layers 0-1 dense)",
         "hybridcap": "hybrid (layers 0-1 dense), capped buckets"}
for _nb in (8, 16, 32):
    LABEL[f"hash{_nb}cap"] = f"hash nb {_nb}, shared QK, capped buckets"
    LABEL[f"hash{_nb}sepcap"] = f"hash nb {_nb}, separate Q/K, capped buckets"


def load(exp):
    runs, meta = [], None
    for f in sorted(glob.glob(os.path.join(exp, "results", "*.json"))):
        try:
            r = json.load(open(f))
        except (OSError, ValueError) as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
            continue
        if f.endswith("data-meta.json"):
            meta = r
        elif f.endswith("-train.json"):
            runs.append(r)
    key = lambda r: (r["n"], ORDER.index(r["run"]) if r["run"] in ORDER else 99, r["seed"])
    return sorted(runs, key=key), meta


def time_to(run, target):
    """Training seconds at which the validation loss first reaches target."""
    prev = None
    for p in run["val"]:
        if p["val_loss"] <= target:
            if prev is None:
                return p["train_s"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev["train_s"] + f * (p["train_s"] - prev["train_s"])
        prev = p
    return None


def fmt(x, spec=".4f", missing="–"):
    return missing if x is None else format(x, spec)


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def model_name(config):
    """'12 layers, 12 heads, d 768' from a run's resolved config."""
    fields = {}
    in_model = False
    for line in config.splitlines():
        s = line.strip()
        if s.startswith("model {"):
            in_model = True
        elif in_model and s == "}":
            break
        elif in_model and ":" in s:
            k, v = s.split(":", 1)
            fields[k.strip()] = v.strip()
    return (f"{fields.get('n_layer', '?')} layers, {fields.get('n_head', '?')} heads, "
            f"d {fields.get('d_model', '?')}, vocabulary {fields.get('vocab_size', '?')}")


def summarise(runs):
    """Per context: dense's final loss and time, and each run's comparison."""
    out = {}
    for n in sorted({r["n"] for r in runs}):
        at_n = [r for r in runs if r["n"] == n]
        dense = [r for r in at_n if r["run"] == "dense"]
        dense_loss = mean([r["final_val_loss"] for r in dense])
        dense_time = mean([r["train_s"] for r in dense])
        dense_tps = mean([r["median_tokens_per_s"] for r in dense])
        rows = []
        for r in at_n:
            t = time_to(r, dense_loss) if dense_loss is not None else None
            rows.append({
                "name": f"{r['run']}-{n}-s{r['seed']}", "run": r["run"], "seed": r["seed"],
                "final_val_loss": r["final_val_loss"],
                "vs_dense_pct": (100 * (r["final_val_loss"] / dense_loss - 1)
                                 if dense_loss and r["final_val_loss"] is not None else None),
                "tokens_per_s": r["median_tokens_per_s"],
                "speed_vs_dense": (r["median_tokens_per_s"] / dense_tps
                                   if dense_tps and r["median_tokens_per_s"] else None),
                "train_s": r["train_s"], "time_to_dense_loss_s": t,
                "time_ratio": t / dense_time if t is not None and dense_time else None,
                "peak_gpu_gib": r["peak_gpu_gib"], "device_s": r["device_s"],
                "tokens": r["tokens"], "final_density": final_density(r)})
        # The spread over seeds of each run that has more than one.
        spread = {}
        for run in sorted({r["run"] for r in at_n}):
            losses = [r["final_val_loss"] for r in at_n if r["run"] == run]
            if len(losses) > 1:
                spread[run] = {"mean": statistics.mean(losses),
                               "half_range": (max(losses) - min(losses)) / 2, "n": len(losses)}
        out[n] = {"dense_final_val_loss": dense_loss, "dense_train_s": dense_time,
                  "rows": rows, "seed_spread": spread}
    return out


def acceptance(summary):
    """Issue 21's points: hash nb 16 (the best of shared and separate Q/K, with
    and without capped buckets)."""
    lines = []
    for n, limit in ((8192, 0.75), (16384, 0.6)):
        s = summary.get(n)
        if not s:
            lines.append(f"| {n} | not run | | |")
            continue
        # Each kind over all its seeds: the mean final loss, and the time
        # ratio only where every seed reached dense's final loss.
        kinds = {}
        for r in s["rows"]:
            if r["run"] in ("hash16", "hash16sep", "hash16cap", "hash16sepcap"):
                kinds.setdefault(r["run"], []).append(r)
        if not kinds or s["dense_final_val_loss"] is None:
            lines.append(f"| {n} | not run | | |")
            continue
        def mean_of(rows, key):
            values = [r[key] for r in rows]
            return None if any(v is None for v in values) else statistics.mean(values)
        run, rows = min(kinds.items(), key=lambda kv: mean_of(kv[1], "vs_dense_pct"))
        vs_dense = mean_of(rows, "vs_dense_pct")
        ratio = mean_of(rows, "time_ratio")
        ok_loss = vs_dense <= 1.0
        ok_time = ratio is not None and ratio <= limit
        seeds = f"{len(rows)} seed{'s' if len(rows) > 1 else ''}"
        lines.append(
            f"| {n} | {LABEL[run]} ({seeds}): {fmt(vs_dense, '+.2f')}% "
            f"({'met' if ok_loss else 'missed'}) | "
            f"{'never reached' if ratio is None else format(ratio, '.2f') + 'x dense' + chr(39) + 's time'}"
            f", limit {limit}x "
            f"({'met' if ok_time else 'missed'}) | {fmt(mean_of(rows, 'speed_vs_dense'), '.2f')}x |")
    return lines


def write_report(exp, runs, meta, summary, title):
    md = [f"# {title}", ""]
    if runs:
        md.append(f"Model: {model_name(runs[0]['config'])}. Tokens per step: "
                  f"{runs[0]['tokens'] // max(1, runs[0]['train_loss'][-1][0])}.")
    if meta:
        md.append(f"Data: {meta['train']['tokens']:,} training tokens in "
                  f"{meta['train']['documents']} documents, {meta['val']['tokens']:,} held-out "
                  f"tokens in {meta['val']['documents']} documents; tokenizer "
                  f"{meta.get('tokenizer_kind', '?')} ({meta.get('vocab_size', '?')} tokens).")
    revs = sorted({r.get("source_rev", "not recorded") for r in runs})
    md.append(f"Code revision(s) of the runs: {', '.join(revs)}.")
    md.append("")
    for n, s in summary.items():
        md += [f"## N = {n}", "",
               f"Dense's final validation loss (mean over its seeds): "
               f"{fmt(s['dense_final_val_loss'])}, in {fmt(s['dense_train_s'], '.0f')} s of training.",
               "",
               "| run | seed | final val loss | vs dense | tokens/s | speed vs dense | training s "
               "| time to dense's loss | of dense's time | pattern density | peak GiB | device s |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            md.append(
                f"| {LABEL.get(r['run'], r['run'])} | {r['seed']} | {fmt(r['final_val_loss'])} | "
                f"{fmt(r['vs_dense_pct'], '+.2f')}% | {fmt(r['tokens_per_s'], ',.0f')} | "
                f"{fmt(r['speed_vs_dense'], '.2f')}x | {fmt(r['train_s'], '.0f')} | "
                f"{fmt(r['time_to_dense_loss_s'], '.0f', 'not reached')} | "
                f"{fmt(r['time_ratio'], '.2f')} | {fmt(r['final_density'], '.3f', '–')} | "
                f"{fmt(r['peak_gpu_gib'], '.1f')} | "
                f"{r['device_s']} |")
        if s["seed_spread"]:
            md += ["", "Spread over seeds (final validation loss, mean ± half the range):"]
            for run, sp in s["seed_spread"].items():
                md.append(f"- {LABEL.get(run, run)}: {sp['mean']:.4f} ± {sp['half_range']:.4f} "
                          f"({sp['n']} seeds)")
        md.append("")
    md += ["## Acceptance (hash nb 16, the best of shared and separate Q/K, with and without capped buckets; the mean over its seeds)", "",
           "| N | final val loss vs dense (≤ 1%) | time to dense's final loss | step speed |",
           "|---|---|---|---|"] + acceptance(summary) + [""]
    open(os.path.join(exp, "report.md"), "w").write("\n".join(md))


BASE_KINDS = [k for k in ORDER if not k.endswith("cap")]


def final_density(run):
    """The sparse layers' mean pattern density (share of the dense pairs
    allowed) at the last logged step; None for dense runs and for runs made
    before metrics logged it."""
    logged = run.get("pattern_density") or []
    if not logged:
        return None
    layers = [d for d in logged[-1][1] if d < 1.0]
    return sum(layers) / len(layers) if layers else None


def color_of(run):
    """One colour per kind, the same in every plot; a capped run shares its
    kind's colour (and is drawn dash-dotted)."""
    base = run[:-3] if run.endswith("cap") else run
    i = BASE_KINDS.index(base) if base in BASE_KINDS else len(BASE_KINDS)
    return f"C{i % 10}"


def plot(exp, runs, summary):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return
    contexts = list(summary)
    for x_key, x_label, fname in (("tokens", "training tokens (millions)", "val-loss-tokens.png"),
                                  ("train_s", "training time (s)", "val-loss-time.png")):
        fig, axes = plt.subplots(1, len(contexts), figsize=(6.5 * len(contexts), 4.8),
                                 squeeze=False)
        for ax, n in zip(axes[0], contexts):
            for r in runs:
                if r["n"] != n or not r["val"]:
                    continue
                xs = [p[x_key] / (1e6 if x_key == "tokens" else 1) for p in r["val"]]
                ys = [p["val_loss"] for p in r["val"]]
                capped = r["run"].endswith("cap")
                style = ("-." if capped else "-") if r["seed"] == 1 else ("--" if capped else ":")
                ax.plot(xs, ys, style, label=f"{LABEL.get(r['run'], r['run'])} s{r['seed']}",
                        linewidth=2.2 if r["run"] == "dense" else 1.2,
                        color="black" if r["run"] == "dense" else color_of(r["run"]))
            target = summary[n]["dense_final_val_loss"]
            if target is not None:
                ax.axhline(target, color="grey", linewidth=0.8, linestyle="--")
            # The second half of training, where the runs separate.
            finals = [r["final_val_loss"] for r in runs if r["n"] == n and r["final_val_loss"]]
            if finals:
                ax.set_ylim(min(finals) - 0.1, max(finals) + 1.0)
            ax.set_title(f"N = {n}")
            ax.set_xlabel(x_label)
            ax.set_ylabel("validation loss (nats per token)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(exp, fname), dpi=110)
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exp")
    ap.add_argument("--title", default="Sparse attention against dense: language modelling")
    args = ap.parse_args()
    runs, meta = load(args.exp)
    if not runs:
        sys.exit(f"lm_experiment_report.py: no finished runs under {args.exp}/results")
    summary = summarise(runs)
    json.dump({"data": meta, "runs": runs, "summary": {str(k): v for k, v in summary.items()}},
              open(os.path.join(args.exp, "experiment.json"), "w"), indent=1)
    write_report(args.exp, runs, meta, summary, args.title)
    plot(args.exp, runs, summary)
    print(open(os.path.join(args.exp, "report.md")).read())


if __name__ == "__main__":
    main()
