"""Reference dequantisation for checkpoint_test: the gguf package's numpy code.

For each type writes OUT/<TYPE>.raw (the stored bytes) and OUT/<TYPE>.f32 (what
gguf.quants.dequantize makes of them). Half of the blocks are quantised from
random normal floats, the other half are random bytes whose fp16 scale fields
are replaced by finite random halves, so every bit pattern of the quants occurs.
The K-quants (Q2_K..Q6_K) are all such random blocks; Q8_K's reference is
d * q computed here, as the package has no dequantisation for it.
"""
import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

# (type, bytes per block, offsets of the fp16 fields in a block)
TYPES = {
    "Q8_0": (T.Q8_0, 34, [0]),
    "Q4_0": (T.Q4_0, 18, [0]),
    "Q4_1": (T.Q4_1, 20, [0, 2]),
    "Q5_0": (T.Q5_0, 22, [0]),
    "Q5_1": (T.Q5_1, 24, [0, 2]),
}

# K-quants (256 values per block): the gguf package dequantises them but cannot
# quantise, so every block is random bytes with finite random fp16 scale fields.
K_TYPES = {
    "Q2_K": (T.Q2_K, 84, [80, 82]),
    "Q3_K": (T.Q3_K, 110, [108]),
    "Q4_K": (T.Q4_K, 144, [0, 2]),
    "Q5_K": (T.Q5_K, 176, [0, 2]),
    "Q6_K": (T.Q6_K, 210, [208]),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)

    def save(name, raw, values):
        raw.tofile(os.path.join(args.out_dir, name + ".raw"))
        values.astype(np.float32).tofile(os.path.join(args.out_dir, name + ".f32"))

    floats = rng.standard_normal(args.blocks * 32).astype(np.float32) * 3
    f16 = floats.astype(np.float16)
    save("F16", f16.view(np.uint8), quants.dequantize(f16.view(np.uint8), T.F16))
    bf16 = rng.integers(0, 1 << 16, size=args.blocks * 32, dtype=np.uint16)
    bf16[(bf16 & 0x7F80) == 0x7F80] = 0x3F80  # no inf/nan
    save("BF16", bf16.view(np.uint8), quants.dequantize(bf16.view(np.uint8), T.BF16))

    for name, (qtype, block_bytes, half_fields) in TYPES.items():
        half = args.blocks // 2
        quantised = quants.quantize(floats[: half * 32].reshape(-1, 32), qtype).reshape(-1)
        noise = rng.integers(0, 256, size=(args.blocks - half, block_bytes), dtype=np.uint8)
        for offset in half_fields:
            scales = (rng.standard_normal(args.blocks - half) * 0.1).astype(np.float16)
            noise[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
        raw = np.concatenate([quantised, noise.reshape(-1)])
        save(name, raw, quants.dequantize(raw, qtype).reshape(-1))

    k_blocks = max(2, args.blocks // 8)
    for name, (qtype, block_bytes, half_fields) in K_TYPES.items():
        raw = rng.integers(0, 256, size=(k_blocks, block_bytes), dtype=np.uint8)
        for offset in half_fields:
            scales = (rng.standard_normal(k_blocks) * 0.1).astype(np.float16)
            raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(-1)
        save(name, raw, quants.dequantize(raw, qtype).reshape(-1))

    # Q8_K (the package has no dequantisation for it): float32 d, int8 qs[256],
    # int16 bsums[16] (unused); x = d * q.
    raw = rng.integers(0, 256, size=(k_blocks, 292), dtype=np.uint8)
    d = rng.standard_normal(k_blocks).astype(np.float32)
    raw[:, 0:4] = d.view(np.uint8).reshape(-1, 4)
    q = raw[:, 4:260].view(np.int8).astype(np.float32)
    save("Q8_K", raw.reshape(-1), (d[:, None] * q).reshape(-1))


if __name__ == "__main__":
    main()
