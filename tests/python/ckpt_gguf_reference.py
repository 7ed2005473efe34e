"""GGUF fixtures and reference values for checkpoint_test, with the gguf package.

write OUT --seed S: OUT/test.gguf with metadata of every value type (nested
  arrays included), alignment 64, and tensors of every supported type;
  OUT/expected.json: metadata {key: value} and tensors {name: {"type",
  "shape" (outermost first), "values" (gguf.quants.dequantize)}}.
llama OUT --seed S [--untied]: OUT/llama.gguf, a tiny random Llama in
  llama.cpp's naming, and OUT/expected.json: the HF config fields and
  {HF name: {"shape", "values"}}.
real GGUF OUT: for an existing file, OUT/expected.json with the version,
  tensor count, a few metadata values and per tensor its type, shape, float64
  sum of all dequantised values and the dequantised first row (OUT/rows.f32,
  concatenated in file order).
"""
import argparse
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants


def add_tensor(writer, expected, name, values, qtype):
    if qtype == T.F32:
        stored = values.astype(np.float32)
        writer.add_tensor(name, stored)
        deq = stored
    elif qtype == T.F16:
        stored = values.astype(np.float16)
        writer.add_tensor(name, stored)
        deq = stored.astype(np.float32)
    else:
        stored = quants.quantize(values.astype(np.float32), qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
        deq = quants.dequantize(stored, qtype)
    expected[name] = {"type": qtype.name, "shape": list(values.shape),
                      "values": deq.astype(np.float32).reshape(-1).tolist()}


def write_test(out, seed):
    rng = np.random.default_rng(seed)
    path = os.path.join(out, "test.gguf")
    w = GGUFWriter(path, "testarch")
    w.add_custom_alignment(64)
    meta = {}
    for key, fn, val in [
        ("t.u8", w.add_uint8, 200), ("t.i8", w.add_int8, -100), ("t.u16", w.add_uint16, 60000),
        ("t.i16", w.add_int16, -30000), ("t.u32", w.add_uint32, 4000000000),
        ("t.i32", w.add_int32, -2000000000), ("t.u64", w.add_uint64, 2**62 + 5),
        ("t.i64", w.add_int64, -(2**62) - 5), ("t.f32", w.add_float32, 1.5),
        ("t.f64", w.add_float64, float(rng.standard_normal())), ("t.bool", w.add_bool, True),
        ("t.str", w.add_string, "héllo wörld"),
    ]:
        fn(key, val)
        meta[key] = val
    for key, val in [("t.arr_str", ["a", "", "ünï", "tok" * 10]), ("t.arr_int", [3, -1, 7]),
                     ("t.arr_f32", [0.5, -2.25]), ("t.arr_bool", [True, False, True]),
                     ("t.arr_nested", [[1, 2], [3]])]:
        w.add_array(key, val)
        meta[key] = val
    w.add_key_value("t.arr_u8", [1, 2, 255], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT8)
    meta["t.arr_u8"] = [1, 2, 255]
    meta["general.alignment"] = 64
    meta["general.architecture"] = "testarch"
    tensors = {}
    add_tensor(w, tensors, "f32", rng.standard_normal((3, 5)), T.F32)
    add_tensor(w, tensors, "f16", rng.standard_normal((4, 8)), T.F16)
    add_tensor(w, tensors, "bf16", rng.standard_normal((2, 6)), T.BF16)
    add_tensor(w, tensors, "vec", rng.standard_normal((7,)), T.F32)
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        add_tensor(w, tensors, "q." + qtype.name, rng.standard_normal((3, 64)) * 2, qtype)
    add_tensor(w, tensors, "q3d", rng.standard_normal((2, 3, 32)), T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"metadata": meta, "tensors": tensors}, f)


def write_llama(out, seed, untied):
    rng = np.random.default_rng(seed)
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=not untied,
               bos_token_id=1, eos_token_id=2)
    w = GGUFWriter(os.path.join(out, "llama.gguf"), "llama")
    w.add_uint32("llama.context_length", cfg["max_position_embeddings"])
    w.add_uint32("llama.embedding_length", cfg["hidden_size"])
    w.add_uint32("llama.block_count", cfg["num_hidden_layers"])
    w.add_uint32("llama.feed_forward_length", cfg["intermediate_size"])
    w.add_uint32("llama.attention.head_count", cfg["num_attention_heads"])
    w.add_uint32("llama.attention.head_count_kv", cfg["num_key_value_heads"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32("llama.rope.freq_base", cfg["rope_theta"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    tensors = {}

    def put(gguf_name, hf_name, shape, qtype):
        t = {}
        add_tensor(w, t, gguf_name, rng.standard_normal(shape) * 0.5, qtype)
        tensors[hf_name] = {"shape": list(shape), "values": t[gguf_name]["values"]}

    put("token_embd.weight", "model.embed_tokens.weight", (v, h), T.Q8_0)
    put("output_norm.weight", "model.norm.weight", (h,), T.F32)
    if untied:
        put("output.weight", "lm_head.weight", (v, h), T.Q4_1)
    names = [("attn_q", "self_attn.q_proj", (h, h), T.Q4_0), ("attn_k", "self_attn.k_proj", (kv, h), T.Q4_1),
             ("attn_v", "self_attn.v_proj", (kv, h), T.Q8_0), ("attn_output", "self_attn.o_proj", (h, h), T.F16),
             ("ffn_gate", "mlp.gate_proj", (i, h), T.Q5_0), ("ffn_up", "mlp.up_proj", (i, h), T.Q5_1),
             ("ffn_down", "mlp.down_proj", (h, i), T.F32), ("attn_norm", "input_layernorm", (h,), T.F32),
             ("ffn_norm", "post_attention_layernorm", (h,), T.F32)]
    for layer in range(cfg["num_hidden_layers"]):
        for g, hf, shape, qtype in names:
            put(f"blk.{layer}.{g}.weight", f"model.layers.{layer}.{hf}.weight", shape, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"config": cfg, "tensors": tensors}, f)


def describe_real(path, out):
    r = GGUFReader(path)
    tensors = []
    rows = []
    for t in r.tensors:
        deq = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape.tolist())]
        deq = deq.reshape(-1)
        row = deq[: shape[-1]]
        rows.append(row)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": shape,
                        "sum": float(deq.astype(np.float64).sum()),
                        "abs_sum": float(np.abs(deq.astype(np.float64)).sum())})
    np.concatenate(rows).astype(np.float32).tofile(os.path.join(out, "rows.f32"))

    def field(key):
        f = r.fields[key]
        return f.contents()

    tokens = field("tokenizer.ggml.tokens")
    meta = {"general.architecture": field("general.architecture"),
            "llama.block_count": int(field("llama.block_count")),
            "llama.embedding_length": int(field("llama.embedding_length")),
            "llama.rope.freq_base": float(field("llama.rope.freq_base")),
            "tokenizer.ggml.model": field("tokenizer.ggml.model"),
            "tokens.count": len(tokens), "tokens.first": tokens[:5], "tokens.last": tokens[-5:],
            "merges.count": len(field("tokenizer.ggml.merges"))}
    version = int(r.fields["GGUF.version"].parts[-1][0])
    kv_count = int(r.fields["GGUF.kv_count"].parts[-1][0])
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"version": version, "metadata_count": kv_count, "metadata": meta,
                   "tensors": tensors}, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("write")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("llama")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--untied", action="store_true")
    p = sub.add_parser("real")
    p.add_argument("gguf")
    p.add_argument("out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.cmd == "write":
        write_test(args.out, args.seed)
    elif args.cmd == "llama":
        write_llama(args.out, args.seed, args.untied)
    else:
        describe_real(args.gguf, args.out)


if __name__ == "__main__":
    main()
