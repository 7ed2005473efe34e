#!/usr/bin/env python3
"""The PyTorch anchor of bench/train_step: what a user would run instead.

A plain nanoGPT-style GPT-2-small (12 layers, 12 heads, d 768, vocab 50304,
learned positions, pre-LayerNorm without biases, tied head, GELU MLP), trained
on random tokens with bf16 autocast, F.scaled_dot_product_attention(is_causal)
under one SDPA backend, gradient clipping at 1.0 and AdamW(fused=True), eager
and under torch.compile. For each context N, B = --tokens / N. Warm-up steps
(compilation included) are not timed; then --steps steps are timed by wall
clock with one loss read per step, as a training loop logs it.

Writes JSON rows {n, impl, backend, tokens_per_s, ms_per_step, peak_gib}; with
--kernels also the top CUDA kernels of one more step by GPU time (torch.profiler),
to set beside `bench_train_step --kernels` of the same shape.
Runs on the GPU host's Python (torch 2.11); nothing is downloaded.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_anchor import adamw, record, time_steps


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, N, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(B, N, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, N, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_ctx, vocab=50304, layers=12, heads=12, d=768):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def run(n, impl, backend, args):
    torch.manual_seed(0)
    B = max(1, args.tokens // n)
    model = GPT(n).cuda()
    opt = adamw(model)
    fwd = torch.compile(model) if impl == "compiled" else model
    x = torch.randint(0, 50304, (B, n), device="cuda")
    y = x.roll(-1, 1)

    def step():
        with sdpa_kernel(BACKENDS[backend]), torch.autocast("cuda", torch.bfloat16):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    row = {"n": n, "impl": impl, "backend": backend, "batch": B,
           **time_steps(step, args.warmup, args.steps, B * n)}
    if args.kernels:
        row["kernels"] = top_kernels(step, args.kernels)
    del model, opt, fwd
    torch.cuda.empty_cache()
    return row


def top_kernels(step, count):
    """GPU time of one step per CUDA kernel (and memcpy/memset), the `count`
    largest, plus the step's total kernel time: [{name, ms, calls}]."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms, calls = totals.get(e.name, (0.0, 0))
        totals[e.name] = (ms + e.device_time_total / 1e3, calls + 1)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    rows = [{"name": "(all kernels)", "ms": sum(v[0] for v in totals.values()),
             "calls": sum(v[1] for v in totals.values())}]
    rows += [{"name": k, "ms": v[0], "calls": v[1]} for k, v in ranked[:count]]
    print("\n".join(f"{r['ms']:9.3f} ms {r['calls']:5d}x  {r['name'][:110]}" for r in rows),
          flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1024,8192,16384", help="contexts, comma separated")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step")
    ap.add_argument("--impls", default="eager,compiled", help="eager, compiled")
    ap.add_argument("--backends", default="cudnn,flash", help="SDPA backends: cudnn, flash")
    ap.add_argument("--compiled-backends", default="cudnn",
                    help="backends also run under torch.compile (compilation is slow)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kernels", type=int, default=0, metavar="K",
                    help="also profile one step and list its K largest kernels by GPU time")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for n in [int(s) for s in args.n.split(",")]:
        for impl in args.impls.split(","):
            backends = args.backends if impl == "eager" else args.compiled_backends
            for backend in backends.split(","):
                if not backend:
                    continue
                try:
                    row = run(n, impl, backend, args)
                except Exception as e:  # a backend that refuses a shape, or OOM
                    row = {"n": n, "impl": impl, "backend": backend, "error": str(e)[:500]}
                    torch.cuda.empty_cache()
                record(rows, row, args.json)
    print(f"\n{'N':>6} {'impl':9} {'backend':7} {'tok/s':>9} {'ms/step':>8} {'GiB':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['n']:>6} {r['impl']:9} {r['backend']:7} error: {r['error'][:60]}")
        else:
            print(f"{r['n']:>6} {r['impl']:9} {r['backend']:7} {r['tokens_per_s']:9.0f} "
                  f"{r['ms_per_step']:8.1f} {r['peak_gib']:6.1f}")


if __name__ == "__main__":
    main()
