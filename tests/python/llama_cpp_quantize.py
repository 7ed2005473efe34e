"""Quantises a GGUF with llama.cpp's own quantiser (llama-cpp-python's
llama_model_quantize), for llama_test's K-quant check.

usage: llama_cpp_quantize.py SRC.gguf OUT.gguf TYPE   (TYPE: q4_k_m, q6_k, q5_k_m, ...)
Prints the tensor types of the result (read back with the gguf package).
"""
import collections
import ctypes
import sys

import gguf
import llama_cpp


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, out, kind = sys.argv[1:]
    ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind.upper(), None)
    if ftype is None:
        sys.exit(f"unknown type {kind}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    # llama.cpp logs every tensor to stderr; the caller keeps it in a log.
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc})")
    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(out).tensors)
    print(f"{out}: {kind}: tensor types {dict(sorted(types.items()))}")


if __name__ == "__main__":
    main()
