#!/usr/bin/env python3
"""Writes a GGUF file that holds only a model's tokenizer (general.architecture
and the tokenizer.* metadata, no tensors): a few MB instead of the model's
size, for `sparseflash prepare --tokenizer FILE` on a machine the model file
cannot travel to whole (the GPU host takes at most 64 MiB per call).

Usage: python3 scripts/staging/tokenizer_gguf.py MODEL.gguf OUT.gguf
Needs the `gguf` package (installed by scripts/setup.sh).
"""
import argparse
import os
import sys

try:
    import gguf
except ImportError:
    sys.exit("tokenizer_gguf.py: the gguf package is not installed (pip install gguf)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a .gguf model file")
    ap.add_argument("out", help="where the tokenizer-only .gguf goes")
    args = ap.parse_args()
    try:
        reader = gguf.GGUFReader(args.model)
    except (OSError, ValueError) as e:
        sys.exit(f"tokenizer_gguf.py: cannot read {args.model}: {e}")
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None or not any(k.startswith("tokenizer.") for k in reader.fields):
        sys.exit(f"tokenizer_gguf.py: {args.model} has no tokenizer metadata")
    arch = arch_field.contents()
    tmp = args.out + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        sub_type = field.types[1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
        copied += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, args.out)
    print(f"{args.out}: {copied} tokenizer keys of {args.model} ({arch}), "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
