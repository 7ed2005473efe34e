"""A tiny random Llama saved by transformers, for checkpoint_test.

ckpt_hf_llama.py OUT --seed S [--tied] [--sharded]: OUT/model (save_pretrained,
safetensors; --sharded splits it with a small max_shard_size) and
OUT/expected.json: the config fields and {name: {"shape", "values"}} of the
saved state dict.
ckpt_hf_llama.py OUT --check DIR: loads DIR with LlamaForCausalLM.from_pretrained
and exits 1 unless its config and weights equal OUT/expected.json.
"""
import argparse
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def check(out, model_dir):
    with open(os.path.join(out, "expected.json")) as f:
        expected = json.load(f)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    c, e = model.config, expected["config"]
    rope = c.rope_parameters
    got = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
           "max_position_embeddings": c.max_position_embeddings, "rope_theta": rope["rope_theta"],
           "tied": c.tie_word_embeddings}
    ok = got == e and rope["rope_type"] == "llama3" and rope["factor"] == 4.0
    if not ok:
        print("config differs:", got, rope, e)
    state = model.state_dict()
    for name, t in expected["tensors"].items():
        if list(state[name].shape) != t["shape"] or state[name].float().reshape(-1).tolist() != t["values"]:
            print("tensor differs:", name)
            ok = False
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--check", metavar="DIR")
    args = parser.parse_args()
    if args.check:
        raise SystemExit(0 if check(args.out, args.check) else 1)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=53, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96,
                         rms_norm_eps=1e-5, tie_word_embeddings=args.tied, bos_token_id=1, eos_token_id=2,
                         rope_theta=31337.0,
                         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model_dir = os.path.join(args.out, "model")
    model.save_pretrained(model_dir, max_shard_size="20KB" if args.sharded else "10GB")
    state = model.state_dict()
    names = [n for n in state if not (args.tied and n == "lm_head.weight")]
    expected = {"config": {"vocab_size": 53, "hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 2,
                           "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
                           "max_position_embeddings": 96, "rope_theta": 31337.0, "tied": args.tied},
                "tensors": {n: {"shape": list(state[n].shape), "values": state[n].float().reshape(-1).tolist()}
                            for n in names},
                "files": sorted(os.listdir(model_dir))}
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main()
