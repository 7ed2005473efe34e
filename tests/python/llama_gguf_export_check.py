"""Checks a GGUF written by `sparseflash convert --to gguf` with the gguf package's reader.

EXPORT was converted from SOURCE (a llama.cpp GGUF, e.g. SmolLM2's Q4_1) with
--gguf-type TYPE. Checks, printing every failure and exiting 1 if any:
- the header: GGUF version 3, general.architecture "llama", general.alignment 32,
  general.file_type of TYPE (0 f32, 1 f16, 7 q8_0, 32 bf16);
- the llama.* hyperparameters llama.cpp requires, with the value types it reads;
- every key of SOURCE but general.file_type present with the same type and value
  (llama.context_length and the rope scaling keys as --rope says, when given);
- the same tensor names as SOURCE, each with its shape, 1-D tensors F32 and
  2-D ones TYPE, and its bytes equal to what the gguf package makes of SOURCE's
  dequantised values: the float32 bytes, numpy's float16, gguf.quants.quantize
  for BF16 and Q8_0. SOURCE is a llama.cpp file, so this also checks that our
  Q/K rows come back in llama.cpp's order.
"""
import argparse
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, quants

TYPES = {"f32": (T.F32, 0), "f16": (T.F16, 1), "bf16": (T.BF16, 32), "q8_0": (T.Q8_0, 7)}

REQUIRED_U32 = ["context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                "vocab_size"]
REQUIRED_F32 = ["rope.freq_base", "attention.layer_norm_rms_epsilon"]


def value(field):
    """A field's value as plain Python (lists for arrays)."""
    return field.contents()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True)
    parser.add_argument("--export", required=True)
    parser.add_argument("--type", required=True, choices=sorted(TYPES))
    parser.add_argument("--rope", default="", help="TYPE:FACTOR:ORIGINAL_CONTEXT expected in EXPORT")
    args = parser.parse_args()
    qtype, file_type = TYPES[args.type]
    src, out = GGUFReader(args.source), GGUFReader(args.export)
    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)

    check(value(out.fields["GGUF.version"]) == 3, "GGUF version is not 3")
    expect = {"general.architecture": "llama", "general.alignment": 32, "general.file_type": file_type}
    for key, want in expect.items():
        got = value(out.fields[key]) if key in out.fields else None
        check(got == want, f"{key}: {got!r}, expected {want!r}")
    for name in REQUIRED_U32:
        f = out.fields.get("llama." + name)
        check(f is not None and f.types == [GGUFValueType.UINT32], f"llama.{name} missing or not uint32")
    for name in REQUIRED_F32:
        f = out.fields.get("llama." + name)
        check(f is not None and f.types == [GGUFValueType.FLOAT32], f"llama.{name} missing or not float32")

    scaled = {}
    if args.rope:
        kind, factor, original = args.rope.split(":")
        scaled = {"llama.rope.scaling.type": kind,
                  "llama.rope.scaling.factor": float(factor),
                  "llama.rope.scaling.original_context_length": int(original),
                  "llama.context_length": round(float(factor) * int(original))}
        for key, want in scaled.items():
            got = value(out.fields[key]) if key in out.fields else None
            check(got == want, f"{key}: {got!r}, expected {want!r}")
    keys = 0
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type" or key in scaled:
            continue
        keys += 1
        if key not in out.fields:
            failures.append(f"{key}: missing")
            continue
        o = out.fields[key]
        check(o.types == field.types, f"{key}: types {o.types} != {field.types}")
        check(value(o) == value(field), f"{key}: value differs")

    src_tensors = {t.name: t for t in src.tensors}
    out_tensors = {t.name: t for t in out.tensors}
    check(set(src_tensors) == set(out_tensors),
          f"tensor names differ: only in source {sorted(set(src_tensors) - set(out_tensors))[:5]}, "
          f"only in export {sorted(set(out_tensors) - set(src_tensors))[:5]}")
    for name in sorted(set(src_tensors) & set(out_tensors)):
        s, o = src_tensors[name], out_tensors[name]
        check(list(o.shape) == list(s.shape), f"{name}: shape {list(o.shape)} != {list(s.shape)}")
        want_type = T.F32 if len(s.shape) == 1 else qtype
        check(o.tensor_type == want_type, f"{name}: {o.tensor_type.name}, expected {want_type.name}")
        values = quants.dequantize(s.data, s.tensor_type).astype(np.float32).reshape(-1)
        if want_type == T.F32:
            expected = values.view(np.uint8)
        elif want_type == T.F16:
            expected = values.astype(np.float16).view(np.uint8)
        else:
            expected = quants.quantize(values.reshape(-1, 32), want_type).reshape(-1)
        got = np.ascontiguousarray(o.data).view(np.uint8).reshape(-1)
        check(got.size == expected.size and np.array_equal(got, expected), f"{name}: data differs")

    for f in failures:
        print("FAIL:", f)
    print(f"{args.export}: {len(out.fields)} keys ({keys} carried from the source), "
          f"{len(out.tensors)} tensors, {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
