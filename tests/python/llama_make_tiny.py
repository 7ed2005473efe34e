"""Tiny random LlamaForCausalLM checkpoints for the parity tests.

usage: llama_make_tiny.py OUT_DIR [--seed S]

Writes one HF directory (config.json + safetensors) per variant under OUT_DIR,
chosen to exercise what differs between Llama checkpoints:
  gqa_llama3_sharded  GQA (6 query / 2 key-value heads), untied head, llama3 rope
                      scaling, theta 50000, saved in several shards with an index
  tied_linear         tied embeddings/head, linear rope scaling, theta 30000
  odd_sizes           odd hidden/intermediate/vocab sizes, head_dim not hidden/heads,
                      MQA (1 key-value head), theta 500000, no scaling
  head_dim_64         head_dim 64 (what the CUDA kernels take), GQA, tied, theta 100000
  dynamic_ntk         dynamic NTK scaling from 16 positions (factor 4), GQA
  yarn                YaRN from 16 to 64 positions (factor 4, derived attention factor)
  yarn_mscale         YaRN with beta_fast 16, mscale / mscale_all_dim (DeepSeek's form)
Weights are drawn wider than the HF initialisation (and norms are random) so
logits are far apart and greedy continuations are not decided by ties.
Prints the variant names, one per line.
"""
import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VARIANTS = {
    "gqa_llama3_sharded": dict(
        config=dict(vocab_size=101, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                         low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16)),
        shard="20KB"),
    "tied_linear": dict(
        config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                    max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="linear", rope_theta=30000.0, factor=2.0)),
        shard=None),
    "odd_sizes": dict(
        config=dict(vocab_size=97, hidden_size=36, intermediate_size=53, num_hidden_layers=2,
                    num_attention_heads=3, num_key_value_heads=1, head_dim=10,
                    max_position_embeddings=300, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
        shard=None),
    "head_dim_64": dict(
        config=dict(vocab_size=89, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
        shard=None),
    "dynamic_ntk": dict(
        config=dict(vocab_size=83, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0)),
        shard=None),
    "yarn": dict(
        config=dict(vocab_size=79, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                    max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                         original_max_position_embeddings=16)),
        shard=None),
    "yarn_mscale": dict(
        config=dict(vocab_size=71, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                    max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=8.0,
                                         original_max_position_embeddings=16, beta_fast=16.0,
                                         beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5)),
        shard=None),
}


def make(out_dir, name, seed):
    spec = VARIANTS[name]
    torch.manual_seed(seed)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **spec["config"])
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    path = os.path.join(out_dir, name)
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for i, name in enumerate(args.variants.split(",")):
        make(args.out_dir, name, args.seed * 100 + i)
        print(name)


if __name__ == "__main__":
    main()
