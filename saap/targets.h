// The classifier's training targets: for each sampled query, the attention
// mass the model puts on each key partition, counting only the keys SAAP
// would route (outside the local window and the sinks).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"

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


// ---------------------------------------------------------------------------
// Recency bands.
//
// Pre-RoPE keys do not carry where they sit in time, yet Llama attention
// leans on recent keys. A recency-aware count prior weights each partition's
// routable keys by how far they lie behind the query: with edges
// e_1 < ... < e_B, a routable key j of a query at q_pos (last routable key
// r = q_pos - local_window) is in band 0 when r - e_1 < j <= r, in band b
// when r - e_{b+1} < j <= r - e_b, and in band B when j <= r - e_B. Each
// query head h has log weights beta[h, 0..B]; the prior of partition c is
// log sum_b exp(beta[h, b]) * (keys of c in band b).

// InvalidArgument (naming `what`) unless the edges ascend strictly from >= 1
// (a user's --recency-edges; the tensor functions below throw
// std::invalid_argument with this message).
absl::Status check_recency_edges(const std::vector<int64_t>& edges, const char* what);

// Routed attention per recency band: q, k, q_pos as in
// partition_attention_mass -> float32 [Hq, nq, B + 1] (a row sums to the
// query's routed mass).
Tensor distance_band_mass(const Tensor& q, const Tensor& k, const Tensor& q_pos,
                          const std::vector<int64_t>& edges, const MassOptions& options);

// Routable keys per recency band for queries at q_pos (int64 [nq]) ->
// float32 [nq, B + 1].
Tensor distance_band_counts(const Tensor& q_pos, int64_t local_window, int64_t sink_tokens,
                            const std::vector<int64_t>& edges);

// Recency-weighted routable key counts, per query head:
//   routable [..., Hkv, nq, C]: routable_key_counts of the queries (all
//     routable keys, whatever their age);
//   partition [..., Hkv, T']: the partitions of the keys at positions
//     first_position .. first_position + T' - 1, which must include every
//     routable key of bands 0 .. B-1 of every query (a decode step passes
//     only the cache's recent keys);
//   log_weights [Hq, B + 1] (Hq a multiple of Hkv; query head h reads KV
//     head h / (Hq / Hkv)).
// q_pos may stay on the host (it is checked there and copied to the device).
// Returns float32 [..., Hq, nq, C]: sum_b exp(beta[h, b]) * keys of band b,
// the oldest band being routable minus the younger bands.
Tensor recency_weighted_counts(const Tensor& routable, const Tensor& partition,
                               int64_t first_position, const Tensor& q_pos,
                               int64_t local_window, int64_t sink_tokens,
                               const std::vector<int64_t>& edges, const Tensor& log_weights);

// The log weights from calibration sums: band_mass [Hq, B + 1] (routed
// attention summed over queries), band_keys [B + 1] (routable keys summed
// over the same queries, every band > 0) -> float32 [Hq, B + 1]: the log of
// the attention per key of each band, less that of the oldest band. A band
// with no attention gets 1e-6 of the head's densest band.
Tensor recency_log_weights(const Tensor& band_mass, const Tensor& band_keys);

}  // namespace sparseflash::saap
