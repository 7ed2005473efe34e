"""Reference encodings for checkpoint_test: what the gguf package stores for float32 values.

Reads IN (raw little-endian float32, a multiple of 32 values) and writes
OUT_DIR/<TYPE>.raw for F16, BF16 and Q8_0, as gguf.quants.quantize makes them
(Q8_0 is the package's port of llama.cpp's quantize_row_q8_0_ref).
"""
import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    values = np.fromfile(args.input, dtype=np.float32).reshape(-1, 32)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, qtype in (("F16", T.F16), ("BF16", T.BF16), ("Q8_0", T.Q8_0)):
        quants.quantize(values, qtype).tofile(os.path.join(args.out_dir, name + ".raw"))


if __name__ == "__main__":
    main()
