"""Host-side model of the tile pairs the attention kernels visit, for planning.

Draws random buckets (hash: nb buckets, uniform and independent for queries and
keys; drop: each row dropped with probability s, queries and keys independently),
packs them as pack_by_bucket does (stable sort by bucket), cuts the packed rows
into blocks and tiles, and counts the (block, tile) pairs whose ranges meet, with
the kernels' rule (sparse_flash.h, tiles_meet): bucket ranges overlap and the key
side's first position is not after the query side's last. Dropped rows count for
the bucket ranges but not for the positions (Packing::dead_bucket).

Schemes, per pass (forward: 128-row query blocks x 64-row key tiles; dK/dV:
128-row key blocks x 64-row query tiles):
  fixed     blocks and tiles of consecutive packed rows (no segments);
  blocks    blocks start at every bucket (what the kernels do with segments),
            tiles fixed;
  both      blocks and tiles start at every bucket (not built: the estimate
            for aligning the other side too).
Counts are for one (batch, head) times the number of sequences, like bench_attention's
fwd_pairs / bwd_pairs (B * H = 65,536 / N * heads).

usage: python3 bench/tile_pairs_model.py [--n 16384] [--heads 12] [--cases hash:16,drop:0.7]
                                          [--trials 2] [--seed 0]
"""
import argparse
import sys

import numpy as np

INT_MAX, INT_MIN = 2**31 - 1, -(2**31)


def parse_cases(text):
    cases = []
    for part in text.split(","):
        kind, _, value = part.partition(":")
        if kind == "hash" and value.isdigit() and int(value) >= 1:
            cases.append(("hash", int(value)))
        elif kind == "drop":
            try:
                s = float(value)
            except ValueError:
                s = -1
            if not 0 <= s < 1:
                raise argparse.ArgumentTypeError(f"drop needs a fraction in [0, 1), got {part!r}")
            cases.append(("drop", s))
        else:
            raise argparse.ArgumentTypeError(f"bad case {part!r} (hash:NB or drop:S)")
    return cases


def cuts(sorted_buckets, size, aligned):
    """(start, end) of the blocks or tiles of `size` packed rows."""
    n = len(sorted_buckets)
    if not aligned:
        starts = np.arange(0, n, size)
        return starts, np.minimum(starts + size, n)
    edges = np.flatnonzero(np.diff(sorted_buckets)) + 1
    bounds = np.concatenate([[0], edges, [n]])
    starts, ends = [], []
    for a, e in zip(bounds[:-1], bounds[1:]):
        for s in range(a, e, size):
            starts.append(s)
            ends.append(min(e, s + size))
    return np.array(starts), np.array(ends)


def ranges(sorted_buckets, positions, starts, ends, dead):
    """[count, 4] int64: bucket min, bucket max, live position min, live position max."""
    out = np.empty((len(starts), 4), dtype=np.int64)
    for i, (a, e) in enumerate(zip(starts, ends)):
        b, p = sorted_buckets[a:e], positions[a:e]
        live = b < dead
        out[i] = (b.min(), b.max(), p[live].min() if live.any() else INT_MAX,
                  p[live].max() if live.any() else INT_MIN)
    return out


def meet(q, k):
    """[len(q), len(k)] bool: tiles_meet(q, k)."""
    return ((k[None, :, 0] <= q[:, None, 1]) & (k[None, :, 1] >= q[:, None, 0]) &
            (k[None, :, 2] <= q[:, None, 3]))


def count(case, n, rng):
    kind, param = case
    if kind == "hash":
        qb, kb, dead = rng.integers(0, param, n), rng.integers(0, param, n), INT_MAX
    else:  # as attention/flash.cc: dropped queries bucket 1, dropped keys 2
        qb = np.where(rng.random(n) < param, 1, 0)
        kb = np.where(rng.random(n) < param, 2, 0)
        dead = 1
    qperm, kperm = np.argsort(qb, kind="stable"), np.argsort(kb, kind="stable")
    qs, ks = qb[qperm], kb[kperm]
    result = {}
    for scheme, block_aligned, tile_aligned in (("fixed", False, False), ("blocks", True, False),
                                                ("both", True, True)):
        fwd = meet(ranges(qs, qperm, *cuts(qs, 128, block_aligned), dead),
                   ranges(ks, kperm, *cuts(ks, 64, tile_aligned), dead))
        bwd = meet(ranges(qs, qperm, *cuts(qs, 64, tile_aligned), dead),
                   ranges(ks, kperm, *cuts(ks, 128, block_aligned), dead))
        result[scheme] = (int(fwd.sum()), int(bwd.sum()))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    ap.add_argument("--heads", type=int, default=12, help="heads (default 12, as at D = 64)")
    ap.add_argument("--cases", type=parse_cases, default=parse_cases("hash:16,drop:0.5,drop:0.7"),
                    help="hash:NB and drop:S entries (default hash:16,drop:0.5,drop:0.7)")
    ap.add_argument("--trials", type=int, default=2, help="random draws averaged (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.n < 1 or args.heads < 1 or args.trials < 1:
        sys.exit("tile_pairs_model.py: --n, --heads and --trials must be positive")
    sequences = max(1, 65536 // args.n) * args.heads
    rng = np.random.default_rng(args.seed)
    print(f"N = {args.n}, {sequences} sequences; tile pairs (forward / dK/dV), mean of {args.trials} draws")
    print(f"{'case':<10} {'fixed':>20} {'blocks aligned':>20} {'both aligned':>20}")
    for case in args.cases:
        runs = [count(case, args.n, rng) for _ in range(args.trials)]
        cells = []
        for scheme in ("fixed", "blocks", "both"):
            f = np.mean([r[scheme][0] for r in runs]) * sequences
            b = np.mean([r[scheme][1] for r in runs]) * sequences
            cells.append(f"{f:9.0f} / {b:9.0f}")
        print(f"{case[0] + ':' + str(case[1]):<10} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
