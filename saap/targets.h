// The classifier's training targets: for each sampled query, the attention
// mass the model puts on each key partition, counting only the keys SAAP
// would route (outside the local window and the sinks).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace sparseflash::saap {

using at::Tensor;

struct MassOptions {
  int64_t local_window = 0;  // keys j with q_pos - j < local_window are always attended
  int64_t sink_tokens = 0;   // keys j < sink_tokens are always attended
  double scale = 0;          // softmax scale; <= 0 means 1 / sqrt(d)
  int64_t chunk_size = 256;  // queries per chunk: bounds the [kv_heads, group * chunk, nk] block
};

// q [Hq, nq, d] and k [Hkv, nk, d]: the queries and keys as attention sees
// them (RoPE applied), keys at positions 0 .. nk-1, query i at q_pos[i]
// (int64 [nq], each in [0, nk)). Hq a multiple of Hkv (query head h reads KV
// head h / (Hq / Hkv)). partition int64 [Hkv, nk] in [0, C): each key's
// partition (from its pre-RoPE value).
// Returns float32 [Hq, nq, C]: the causal softmax weights (over all keys
// j <= q_pos, window and sinks included) summed per partition over the keys
// sink_tokens <= j <= q_pos - local_window. A row sums to the query's routed
// mass (1 minus what the window and sinks take).
Tensor partition_attention_mass(const Tensor& q, const Tensor& k, const Tensor& q_pos,
                                const Tensor& partition, int64_t num_partitions,
                                const MassOptions& options);

// Routable keys per partition for queries at positions q_pos: partition
// int64 [..., T] (each key's partition in [0, C)), q_pos int64 [nq] ->
// float32 [..., nq, C], the number of keys j of each partition with
// sink_tokens <= j <= q_pos - local_window (0 where that range is empty).
// What a query at q_pos can route to; scores use its log (count prior).
Tensor routable_key_counts(const Tensor& partition, int64_t num_partitions, const Tensor& q_pos,
                           int64_t local_window, int64_t sink_tokens);

}  // namespace sparseflash::saap
