"""Logits of a GGUF file as llama.cpp computes them (the llama-cpp-python package, CPU).

A manual check that llama.cpp runs what `sparseflash convert --to gguf` writes
(docs/llama.md, "Writing GGUF"): writes OUT.logits.f32 ([len(ids), vocab] float32)
for the ids in IDS (a JSON list), and with --compare REF.logits.f32 (e.g. from
llama_reference.py) prints max and mean |difference| and the argmax agreement.
"""
import argparse
import json

import numpy as np
import llama_cpp


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", default="")
    args = parser.parse_args()
    ids = json.load(open(args.ids))
    model = llama_cpp.Llama(model_path=args.model, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)),
                            logits_all=True, verbose=False)
    model.eval(ids)
    logits = np.array(model.scores[: len(ids)], dtype=np.float32)
    logits.tofile(args.out + ".logits.f32")
    if args.compare:
        ref = np.fromfile(args.compare, dtype=np.float32).reshape(logits.shape)
        diff = np.abs(logits - ref)
        agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
        print(f"{args.model}: max |diff| {diff.max():.4g}, mean {diff.mean():.4g}, "
              f"argmax agreement {agree:.3f}, max |logit| {np.abs(ref).max():.4g}")


if __name__ == "__main__":
    main()
