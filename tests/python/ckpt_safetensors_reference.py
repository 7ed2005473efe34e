"""safetensors cross-checks for checkpoint_test, with the safetensors package.

write DIR --seed S: writes a model sharded over two files with
  model.safetensors.index.json (F32, F16, BF16 tensors of random values) and
  DIR/expected.json: {name: {"dtype", "shape", "values" (as float32)}}.
check FILE EXPECTED: loads FILE with safetensors and compares every tensor and
  the metadata with EXPECTED (written by the C++ side); exits 1 on a mismatch.
"""
import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def write(out_dir, seed):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    shapes = {"a.weight": ([7, 5], "F32"), "b.weight": ([3, 4, 2], "F16"),
              "c.bias": ([9], "BF16"), "d.scalar": ([], "F32"), "e.weight": ([2, 33], "BF16")}
    tensors = {n: (torch.randn(s, generator=g) * 2).to(DTYPES[d]) for n, (s, d) in shapes.items()}
    shard_of = {"a.weight": 1, "b.weight": 2, "c.bias": 1, "d.scalar": 2, "e.weight": 2}
    weight_map = {}
    for k in (1, 2):
        name = f"model-0000{k}-of-00002.safetensors"
        save_file({n: t for n, t in tensors.items() if shard_of[n] == k},
                  os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors if shard_of[n] == k})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    expected = {n: {"dtype": shapes[n][1], "shape": list(t.shape),
                    "values": t.float().reshape(-1).tolist()} for n, t in tensors.items()}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f)


def check(path, expected_path):
    with open(expected_path) as f:
        expected = json.load(f)
    ok = True
    with safe_open(path, framework="pt") as f:
        if dict(f.metadata() or {}) != expected.get("__metadata__", {}):
            print("metadata differs:", f.metadata(), expected.get("__metadata__"))
            ok = False
        names = set(f.keys())
        want = {n for n in expected if n != "__metadata__"}
        if names != want:
            print("tensor names differ:", sorted(names), sorted(want))
            return False
        for n in names:
            t = f.get_tensor(n)
            e = expected[n]
            if list(t.shape) != e["shape"] or t.dtype != DTYPES[e["dtype"]]:
                print(n, "shape/dtype", list(t.shape), t.dtype, e["shape"], e["dtype"])
                ok = False
            elif t.float().reshape(-1).tolist() != e["values"]:
                print(n, "values differ")
                ok = False
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("out_dir")
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check")
    c.add_argument("file")
    c.add_argument("expected")
    args = parser.parse_args()
    if args.cmd == "write":
        write(args.out_dir, args.seed)
    else:
        sys.exit(0 if check(args.file, args.expected) else 1)


if __name__ == "__main__":
    main()
