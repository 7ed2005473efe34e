#!/usr/bin/env python3
"""The PyTorch anchor of the long-context Llama fine-tuning step.

A plain Llama in one file, shaped as SmolLM2-135M (30 layers, d 576, 9 query
and 3 key/value heads of 64, SwiGLU 1536, vocabulary 49152, tied head, RoPE
theta 100000 with linear scaling by N / 8192), trained on random tokens with
bf16 autocast, AdamW(fused=True) and clipping at 1.0: what a user of
transformers / torchtune runs (HF's LlamaForCausalLM does the same operations:
repeat_kv + F.scaled_dot_product_attention, float32 logits, cross-entropy).

Attention backends: "flash" (SDPA flash with enable_gqa, no copies of K/V) and
"cudnn" (SDPA cuDNN on K/V repeated to 9 heads, as transformers' repeat_kv).
Implementations: eager and torch.compile; with --checkpointing the blocks run
under torch.utils.checkpoint (use_reentrant=False), as HF's
gradient_checkpointing_enable() does. Warm-up steps (compilation included)
are not timed; then --steps steps are timed by wall clock with one loss read
per step.

Writes JSON rows {n, impl, backend, checkpointing, tokens_per_s, ms_per_step,
peak_gib}. Runs on the GPU host's Python (torch 2.11); nothing is downloaded.
"""
import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_anchor import adamw, record, time_steps

LAYERS, D, HEADS, KV_HEADS, HEAD_DIM, FF, VOCAB, THETA = 30, 576, 9, 3, 64, 1536, 49152, 100000.0


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Layer(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.input_layernorm = RMSNorm(D)
        self.q_proj = nn.Linear(D, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(D, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(D, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, D, bias=False)
        self.post_attention_layernorm = RMSNorm(D)
        self.gate_proj = nn.Linear(D, FF, bias=False)
        self.up_proj = nn.Linear(D, FF, bias=False)
        self.down_proj = nn.Linear(FF, D, bias=False)

    def forward(self, x, cos, sin):
        B, N, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, N, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(h).view(B, N, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(h).view(B, N, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.backend == "flash":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = HEADS // KV_HEADS
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                               v.repeat_interleave(rep, 1), is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, N, HEADS * HEAD_DIM))
        m = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


class Llama(nn.Module):
    def __init__(self, n, backend, checkpointing):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer(backend) for _ in range(LAYERS))
        self.norm = RMSNorm(D)
        self.checkpointing = checkpointing
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
        factor = max(1.0, n / 8192)
        inv_freq = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)) / factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, idx, targets):
        N = idx.shape[1]
        freqs = torch.arange(N, device=idx.device).float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), -1)
        x = self.embed_tokens(idx)
        # In the autocast dtype, so q and k stay bf16 (transformers keeps them
        # float32 here, which is slower).
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        for layer in self.layers:
            if self.checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = F.linear(self.norm(x), self.embed_tokens.weight)
        return F.cross_entropy(logits.view(-1, VOCAB).float(), targets.view(-1))


BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def run(n, impl, backend, checkpointing, args):
    torch.manual_seed(0)
    B = max(1, args.tokens // n)
    model = Llama(n, backend, checkpointing).cuda()
    opt = adamw(model)
    fwd = torch.compile(model) if impl == "compiled" else model
    x = torch.randint(0, VOCAB, (B, n), device="cuda")
    y = x.roll(-1, 1)

    def step():
        # The backward inside the backend's context too: checkpointing
        # recomputes the blocks there, and must pick the same kernel.
        with sdpa_kernel(BACKENDS[backend]):
            with torch.autocast("cuda", torch.bfloat16):
                loss = fwd(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    row = {"n": n, "impl": impl, "backend": backend, "checkpointing": checkpointing, "batch": B,
           **time_steps(step, args.warmup, args.steps, B * n)}
    del model, opt, fwd
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="32768", help="contexts, comma separated")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per step (B = tokens / N)")
    ap.add_argument("--cases", default="eager:flash,eager:cudnn,compiled:flash,compiled:cudnn,"
                    "eager:flash:ckpt,eager:cudnn:ckpt,compiled:flash:ckpt",
                    help="IMPL:BACKEND[:ckpt], comma separated (IMPL eager or compiled; BACKEND flash or cudnn)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for n in [int(s) for s in args.n.split(",")]:
        for case in args.cases.split(","):
            parts = case.split(":")
            if len(parts) not in (2, 3) or parts[0] not in ("eager", "compiled") or \
                    parts[1] not in BACKENDS or (len(parts) == 3 and parts[2] != "ckpt"):
                sys.exit(f"llama_step_torch.py: bad case {case!r} (IMPL:BACKEND[:ckpt])")
            impl, backend, ckpt = parts[0], parts[1], len(parts) == 3
            try:
                row = run(n, impl, backend, ckpt, args)
            except Exception as e:  # a backend that refuses a shape, or OOM
                row = {"n": n, "impl": impl, "backend": backend, "checkpointing": ckpt,
                       "error": str(e)[:500]}
                torch.cuda.empty_cache()
            record(rows, row, args.json)
    print(f"\n{'N':>6} {'impl':9} {'backend':7} {'ckpt':5} {'tok/s':>9} {'ms/step':>8} {'GiB':>6}")
    for r in rows:
        ck = "yes" if r["checkpointing"] else "no"
        if "error" in r:
            print(f"{r['n']:>6} {r['impl']:9} {r['backend']:7} {ck:5} error: {r['error'][:60]}")
        else:
            print(f"{r['n']:>6} {r['impl']:9} {r['backend']:7} {ck:5} {r['tokens_per_s']:9.0f} "
                  f"{r['ms_per_step']:8.1f} {r['peak_gib']:6.1f}")


if __name__ == "__main__":
    main()
