"""FlexAttention anchor for bench/attention: causal and hash-bucketed attention
with a prebuilt block mask, plus the time to build that mask (which a
hash-sparse training step pays every step, since bucket ids change).

Hash modes: "hash" keeps rows in time order (as a model produces them: random
buckets leave no 128x128 block empty, so nothing can be skipped); "hash_sorted"
first sorts the rows of each (batch, head) by bucket, stably, as our kernels'
packing does, and masks with the carried original positions, so whole blocks
drop out. The sort itself is not timed (the mask build is, separately).

Runs on the GPU host's PyTorch (no install needed there). Not part of the
product: it only times the peer we compare against, in the same shapes as
bench_attention (B*N = 65,536, 12 heads, D = 64, bf16, causal).

usage: python3 bench/flex_attention.py [--n 8192,16384] [--nb 16] [--reps 20] [--json FILE]
                                      [--modes dense,hash,hash_sorted]
"""
import argparse
import json
import statistics

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def median_ms(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="8192,16384")
    ap.add_argument("--nb", type=int, default=16)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default="")
    ap.add_argument("--modes", default="dense,hash,hash_sorted")
    args = ap.parse_args()
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    print(f"{'mode':11} {'param':>5} {'N':>6} {'fwd_ms':>8} {'bwd_ms':>8} {'fwdbwd':>8} {'mask_ms':>8}")
    for n in [int(x) for x in args.n.split(",")]:
        b, h, d = max(1, 65536 // n), args.heads, args.d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)
        qb = torch.randint(0, args.nb, (b, h, n), device="cuda")
        kb = torch.randint(0, args.nb, (b, h, n), device="cuda")

        def causal(bi, hi, qi, ki):
            return qi >= ki

        def hashed(bi, hi, qi, ki):
            return (qi >= ki) & (qb[bi, hi, qi] == kb[bi, hi, ki])

        # Sorted by bucket (stable): sorted row i is original row qperm[..., i].
        qbs, qperm = torch.sort(qb, dim=-1, stable=True)
        kbs, kperm = torch.sort(kb, dim=-1, stable=True)
        qs, ks, vs = (x.detach().gather(2, p.unsqueeze(-1).expand(-1, -1, -1, d)).requires_grad_()
                      for x, p in ((q, qperm), (k, kperm), (v, kperm)))
        gs = g.gather(2, qperm.unsqueeze(-1).expand(-1, -1, -1, d))

        def hashed_sorted(bi, hi, qi, ki):
            return (qperm[bi, hi, qi] >= kperm[bi, hi, ki]) & (qbs[bi, hi, qi] == kbs[bi, hi, ki])

        for mode, mask_mod, param in (("dense", causal, None), ("hash", hashed, args.nb),
                                      ("hash_sorted", hashed_sorted, args.nb)):
            if mode not in args.modes.split(","):
                continue
            qq, kk, vv, gg = (qs, ks, vs, gs) if mode == "hash_sorted" else (q, k, v, g)
            # Causal does not depend on batch or head: one broadcast mask. The hash mask
            # does; _compile=True keeps its construction from materialising B*H*N*N.
            mb, mh = (None, None) if mode == "dense" else (b, h)
            build = lambda: create_block_mask(mask_mod, mb, mh, n, n, device="cuda", _compile=True)
            mask = build()
            mask_ms = median_ms(build, max(3, args.reps // 4))

            def fwd():
                with torch.no_grad():
                    flex(qq, kk, vv, block_mask=mask)

            def fwdbwd():
                flex(qq, kk, vv, block_mask=mask).backward(gg)

            f, fb = median_ms(fwd, args.reps), median_ms(fwdbwd, args.reps)
            rows.append({"impl": "flex", "mode": mode, "param": param, "N": n, "D": d, "B": b,
                         "H": h, "fwd_ms": f, "bwd_ms": fb - f, "fwdbwd_ms": fb,
                         "mask_build_ms": mask_ms})
            print(f"{mode:11} {str(param):>5} {n:6} {f:8.3f} {fb - f:8.3f} {fb:8.3f} {mask_ms:8.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
