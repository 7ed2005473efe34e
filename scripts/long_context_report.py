#!/usr/bin/env python3
"""The report of scripts/long_context_experiment.sh (issue 20's experiment).

Reads EXP/results/*.json and writes EXP/experiment.json (everything, one file),
EXP/report.md (the tables, in markdown) and, where matplotlib is installed,
EXP/val-loss.png (validation loss per step of each run) and
EXP/perplexity.png (dense-evaluated perplexity against context).

Usage: python3 scripts/long_context_report.py EXP [--title TEXT]
"""
import argparse
import glob
import json
import os
import statistics
import sys


def load(exp):
    res = {}
    for f in sorted(glob.glob(os.path.join(exp, "results", "*.json"))):
        try:
            res[os.path.basename(f)[:-5]] = json.load(open(f))
        except (OSError, ValueError) as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
    return res


def fmt(x, spec=".3f", missing="–"):
    return missing if x is None else format(x, spec)


def ppl(res, name, context):
    r = res.get(f"{name}-ppl-{context}")
    return r.get("perplexity") if r else None


def passkey(res, name):
    r = res.get(f"{name}-passkey")
    return {row["context"]: (row["found"], row["trials"]) for row in r["rows"]} if r else {}


def contexts_of(res, name):
    out = []
    for k in res:
        if k.startswith(name + "-ppl-"):
            tail = k[len(name) + 5:]
            if tail.isdigit():
                out.append(int(tail))
    return sorted(out)


def runs_of(res):
    """Trained runs (NAME = RUN-sSEED) in the order of their training results."""
    return [k[:-6] for k in res if k.endswith("-train")]


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.mean(values), (max(values) - min(values)) / 2, len(values)


def report(exp, title):
    res = load(exp)
    json.dump(res, open(os.path.join(exp, "experiment.json"), "w"), indent=1)
    lines = [f"# {title}", ""]
    meta = res.get("data-meta")
    if meta:
        lines += [f"Data: {meta['train']['documents']} train documents ({meta['train']['tokens']:,} tokens), "
                  f"{meta['val']['documents']} held-out documents ({meta['val']['tokens']:,} tokens), "
                  f"documents of at least {meta.get('min_document_tokens', 0):,} tokens "
                  f"({meta.get('short_documents', 0)} shorter ones dropped).", ""]

    # Zero-shot: the base model and the RoPE-scaled variants.
    base = sorted({k.split("-ppl-")[0] for k in res if k.startswith("base") and "-ppl-" in k} |
                  {k[:-len("-passkey")] for k in res if k.startswith("base") and k.endswith("-passkey")})
    if base:
        ctx = sorted({c for b in base for c in contexts_of(res, b)})
        pk = sorted({c for b in base for c in passkey(res, b)})
        lines += ["## Zero-shot (no fine-tuning), dense attention", "",
                  "| model | " + " | ".join(f"ppl {c}" for c in ctx) + " | " +
                  " | ".join(f"pass key {c}" for c in pk) + " |",
                  "|---|" + "---|" * (len(ctx) + len(pk))]
        for b in base:
            p = passkey(res, b)
            lines.append(f"| {b} | " + " | ".join(fmt(ppl(res, b, c)) for c in ctx) + " | " +
                         " | ".join(f"{p[c][0]}/{p[c][1]}" if c in p else "–" for c in pk) + " |")
        lines.append("")

    runs = runs_of(res)
    if runs:
        ctx = sorted({c for r in runs for c in contexts_of(res, r + "-dense")})
        pk = sorted({c for r in runs for c in passkey(res, r + "-dense")})
        n = max((c for r in runs for c in contexts_of(res, r + "-own")), default=None)
        dense_tps = [res[r + "-train"].get("median_tokens_per_s") for r in runs
                     if res[r + "-train"]["run"] == "dense"]
        dense_tps = statistics.mean([t for t in dense_tps if t]) if any(dense_tps) else None
        lines += ["## Fine-tuning runs: evaluated with dense attention, and with their own pattern",
                  "",
                  "| run | lr | final val loss | " + " | ".join(f"ppl {c}" for c in ctx) +
                  f" | ppl {n} own pattern | " + " | ".join(f"pass key {c}" for c in pk) +
                  " | tokens/s | step ms | vs dense | peak GiB |",
                  "|---|---|---|" + "---|" * (len(ctx) + 1 + len(pk)) + "---|---|---|---|"]
        for r in runs:
            t = res[r + "-train"]
            p = passkey(res, r + "-dense")
            tps = t.get("median_tokens_per_s")
            step_ms = 1000 * n / tps if (tps and n) else None
            ratio = tps / dense_tps if (tps and dense_tps) else None
            val = t["val_loss"][-1][1] if t.get("val_loss") else None
            lines.append(
                f"| {r} | {t.get('lr', '–')} | {fmt(val, '.4f')} | " +
                " | ".join(fmt(ppl(res, r + "-dense", c)) for c in ctx) +
                f" | {fmt(ppl(res, r + '-own', n))} | " +
                " | ".join(f"{p[c][0]}/{p[c][1]}" if c in p else "–" for c in pk) +
                f" | {fmt(tps, ',.0f')} | {fmt(step_ms, '.0f')} | {fmt(ratio, '.2f')}x | "
                f"{fmt(t.get('peak_gpu_gib'), '.1f')} |")
        lines.append("")

        # Seeds: mean and half-range of the perplexity at the longest context.
        by_kind = {}
        for r in runs:
            by_kind.setdefault(res[r + "-train"]["run"], []).append(r)
        multi = {k: v for k, v in by_kind.items() if len(v) > 1}
        if multi and ctx:
            c = ctx[-1]
            lines += [f"Over seeds (perplexity at {c}, dense evaluation; mean ± half the range):", "",
                      "| run | seeds | ppl | own pattern |", "|---|---|---|---|"]
            dense_mean = None
            for k, rs in multi.items():
                m, h, cnt = spread([ppl(res, r + "-dense", c) for r in rs])
                mo, ho, _ = spread([ppl(res, r + "-own", c) for r in rs])
                if k == "dense":
                    dense_mean = m
                lines.append(f"| {k} | {cnt} | {fmt(m)} ± {fmt(h)} | {fmt(mo)} ± {fmt(ho)} |")
            if dense_mean:
                for k, rs in multi.items():
                    m, _, _ = spread([ppl(res, r + "-dense", c) for r in rs])
                    if k != "dense" and m:
                        lines.append(f"\n{k} against dense at {c}: {100 * (m / dense_mean - 1):+.2f}%")
            lines.append("")

    saap = [k for k in res if k.endswith("-saap-ppl-" + str(max(
        (int(k.rsplit("-", 1)[1]) for k in res if "-saap-ppl-" in k), default=0)))]
    if saap:
        lines += ["## SAAP on the extended models", "",
                  "| model | ppl dense | ppl SAAP | change | keys visited | pass key |",
                  "|---|---|---|---|---|---|"]
        for k in saap:
            name, c = k.split("-saap-ppl-")
            s = res[k]
            d = ppl(res, name + "-dense", c)
            p = passkey(res, name + "-saap")
            change = 100 * (s["perplexity"] / d - 1) if d else None
            visited = s.get("saap", {}).get("keys_visited")
            lines.append(f"| {name} | {fmt(d)} | {fmt(s['perplexity'])} | {fmt(change, '+.2f')}% | "
                         f"{fmt(100 * visited if visited is not None else None, '.2f')}% | " +
                         " ".join(f"{v[0]}/{v[1]}" for v in p.values()) + " |")
        lines.append("")

    text = "\n".join(lines) + "\n"
    open(os.path.join(exp, "report.md"), "w").write(text)
    print(text)
    plots(exp, res, runs)


def plots(exp, res, runs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            v = res[r + "-train"].get("val_loss") or []
            if v:
                ax.plot([s for s, _ in v], [l for _, l in v], marker="o", label=r)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Fine-tuning at the extended context: validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(exp, "val-loss.png"), dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({k.split("-ppl-")[0] for k in res if "-ppl-" in k and "-own" not in k})
    for name in names:
        cs = contexts_of(res, name)
        if len(cs) > 1:
            ax.plot(cs, [ppl(res, name, c) for c in cs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("perplexity (dense evaluation)")
    ax.set_title("Sliding-window perplexity on held-out documents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(exp, "perplexity.png"), dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exp", help="the experiment directory (EXP of the script)")
    ap.add_argument("--title", default="Long-context fine-tuning experiment")
    a = ap.parse_args()
    if not os.path.isdir(os.path.join(a.exp, "results")):
        sys.exit(f"long_context_report: no results/ under {a.exp}")
    report(a.exp, a.title)


if __name__ == "__main__":
    main()
