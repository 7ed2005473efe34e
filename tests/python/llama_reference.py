"""Reference logits, greedy continuation and sliding-window NLL from transformers.

usage: llama_reference.py --model PATH [--gguf-file NAME] (--ids IDS.json | --text FILE)
                          --out PREFIX [--greedy N] [--context L --stride S] [--gpt2]

IDS.json holds a JSON list of token ids; --text tokenizes FILE with the
model's own tokenizer (AutoTokenizer, default special tokens) instead and
also writes the ids as "ids" in PREFIX.json. Writes
  PREFIX.logits.f32   float32 logits [len(ids), vocab], row-major, little-endian
  PREFIX.json         {"vocab": V, "greedy": [...N ids after the prompt...],
                       "nll_sum": ..., "nll_tokens": ...}   (the last two with --context)
The greedy loop is plain argmax with the KV cache and no EOS stop, so both
implementations are compared on exactly N tokens. The sliding-window NLL
scores each token once: window w covers [begin, begin + L) with begin a
multiple of S and scores the tokens it sees first (HF's perplexity recipe).
--gpt2 loads GPT2LMHeadModel (our GPT exported to HF GPT-2) instead of
AutoModelForCausalLM.
"""
import argparse
import json

import torch



def smollm_pretokenizer(tokenizer):
    """SmolLM2's own tokenizer splits digits one by one before GPT-2's ByteLevel
    regex (llama.cpp: tokenizer.ggml.pre "smollm"); transformers' GGUF loader
    ignores tokenizer.ggml.pre and leaves that step out (docs/llama.md,
    Tokenizers). Put it back so the ids are SmolLM2's."""
    from tokenizers import pre_tokenizers
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return tokenizer

def load(args):
    if args.gpt2:
        from transformers import GPT2LMHeadModel
        return GPT2LMHeadModel.from_pretrained(args.model, dtype=torch.float32)
    from transformers import AutoModelForCausalLM
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kwargs)


def window_nll(model, ids, context, stride):
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        new = end - prev_end
        x = torch.tensor([ids[begin:end]])
        logp = torch.log_softmax(model(x).logits[0].float(), -1)
        first = max(end - new, begin + 1)  # the window's first token has no prediction
        for t in range(first, end):
            total -= logp[t - begin - 1, ids[t]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return total, count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf-file", default="")
    ap.add_argument("--ids", default="")
    ap.add_argument("--text", default="")
    ap.add_argument("--smollm-digits", action="store_true",
                    help="with --text: SmolLM2's digit splitting (see smollm_pretokenizer)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--greedy", type=int, default=0)
    ap.add_argument("--context", type=int, default=0)
    ap.add_argument("--stride", type=int, default=0)
    ap.add_argument("--gpt2", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load(args).eval()
    if args.text:
        from transformers import AutoTokenizer
        kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
        if args.smollm_digits:
            smollm_pretokenizer(tokenizer)
        with open(args.text, encoding="utf-8") as f:
            ids = tokenizer(f.read())["input_ids"]
    else:
        with open(args.ids) as f:
            ids = json.load(f)
    logits = model(torch.tensor([ids])).logits[0].float().contiguous()
    logits.numpy().astype("<f4").tofile(args.out + ".logits.f32")
    result = {"vocab": logits.shape[-1], "greedy": [], "ids": ids}
    if args.greedy > 0:
        out = model(torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        for _ in range(args.greedy):
            result["greedy"].append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
    if args.context > 0:
        total, count = window_nll(model, ids, args.context, args.stride or args.context)
        result["nll_sum"], result["nll_tokens"] = total, count
    with open(args.out + ".json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
