"""transformers' side of scripts/gpu_llama.sh: sliding-window perplexity and greedy
decoding of a GGUF model (dequantised by transformers) on one device.

usage: llama_hf_eval.py --gguf FILE --text FILE --context L --stride S --json OUT
                        [--dtype bfloat16] [--device cuda]
                        [--prompt TEXT --greedy N --greedy-dtype float32]

Perplexity follows transformers' documented recipe (docs: "Perplexity of
fixed-length models"): windows of L tokens every S tokens, labels -100 on the
tokens an earlier window scored, loss from model(input_ids, labels=...), summed
as loss * scored tokens. `sparseflash eval` uses the same windows, so both score
the same tokens with the same contexts. The text is tokenized as SmolLM2's own
tokenizer does (digits split one by one; see smollm_pretokenizer), which is what
our GGUF tokenizer does; both token counts are in the results. tokens/s counts scored tokens over the
wall time of all windows (CUDA synchronised), as `sparseflash eval` reports.
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Shared with the CPU parity tests (the same folder, so importable as a module).
from llama_reference import smollm_pretokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def load(path, dtype, device):
    folder, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.to(device).eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def perplexity(model, ids, context, stride, device):
    total, count, prev_end, windows = 0.0, 0, 0, 0
    sync(device)
    start = time.time()
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        new = end - prev_end
        x = torch.tensor([ids[begin:end]], device=device)
        labels = x.clone()
        labels[:, :-new] = -100
        scored = int((labels[0, 1:] != -100).sum())
        loss = model(x, labels=labels).loss
        total += float(loss) * scored
        count += scored
        windows += 1
        prev_end = end
        if end == len(ids):
            break
    sync(device)
    return total, count, windows, time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--stride", type=int, required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", required=True)
    ap.add_argument("--prompt", default="")
    ap.add_argument("--greedy", type=int, default=0)
    ap.add_argument("--greedy-dtype", default="float32", choices=DTYPES)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = smollm_pretokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    with open(args.text, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]
    result = {"implementation": "transformers", "text_tokens": len(ids),
              "context": args.context, "stride": args.stride, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}

    model = load(args.gguf, DTYPES[args.dtype], args.device)
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", "?")
    total, count, windows, seconds = perplexity(model, ids, args.context, args.stride,
                                                args.device)
    result.update(tokens=count, windows=windows, mean_nll=total / count,
                  perplexity=float(torch.tensor(total / count).exp()), seconds=seconds,
                  tokens_per_second=count / seconds)
    print(f"transformers: {count} tokens, perplexity {result['perplexity']:.4f}, "
          f"{result['tokens_per_second']:.0f} tokens/s", flush=True)

    if args.greedy > 0:
        if args.greedy_dtype != args.dtype:
            del model
            model = load(args.gguf, DTYPES[args.greedy_dtype], args.device)
        prompt_ids = tokenizer(args.prompt)["input_ids"]
        x = torch.tensor([prompt_ids], device=args.device)
        out = model.generate(x, do_sample=False, max_new_tokens=args.greedy,
                             attention_mask=torch.ones_like(x))
        result["greedy"] = {"dtype": args.greedy_dtype, "prompt_ids": prompt_ids,
                            "ids": out[0, len(prompt_ids):].tolist()}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
