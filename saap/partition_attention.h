// SAAP attention at inference: exact attention over the union of the sinks,
// the local window and the keys of each query's selected partitions.
//
// A query at position p attends to key j <= p when
//   j < sink_tokens  or  p - j < local_window          (always attended)
//   or  sink_tokens <= j <= p - local_window  and  partition(j) is selected
// Each key counts once (duplicated ids in `selected` too; -1 ids are skipped).
// partition(j) is the nearest centroid of the key's PRE-RoPE value
// (assign_key_partitions); attention uses the RoPE'd q/k and v.
// GQA: query head h reads KV head h / (Hq / Hkv).
//
// Two paths: saap_attention for full sequences (prefill, evaluation), and
// PartitionedKVCache for decoding one token per sequence, whose routed keys
// are kept partition-contiguous so that a step reads only the selected
// partitions (the CUDA kernel in saap/kernels/decode.h).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace sparseflash::saap {

using at::Tensor;

struct SaapAttentionOptions {
  int64_t local_window = 64;  // >= 1: the query's own key is always attended
  int64_t sink_tokens = 4;    // >= 0
  int64_t top_l = 16;         // partitions per query, for callers of select_partitions
  int64_t num_partitions = 0; // C (> 0): partition ids lie in [0, C)
  double scale = 0;           // softmax scale; <= 0 means 1 / sqrt(D)
  int64_t chunk_size = 512;   // queries per chunk: memory O(B * Hq * chunk * Nk)
};

// Summed over batch rows, query heads and queries.
struct SaapVisitStats {
  int64_t visited_pairs = 0;   // (query, key) pairs attended
  int64_t causal_pairs = 0;    // (query, key) pairs with key <= query: what dense attends
  int64_t routed_visited = 0;  // attended pairs among the routable ones
  int64_t routable_pairs = 0;  // pairs with sink_tokens <= key <= query - local_window

  double visited_fraction() const {
    return causal_pairs > 0 ? static_cast<double>(visited_pairs) / causal_pairs : 0.0;
  }
  double routed_fraction() const {
    return routable_pairs > 0 ? static_cast<double>(routed_visited) / routable_pairs : 0.0;
  }
  SaapVisitStats& operator+=(const SaapVisitStats& o);
};

// Top-l partitions per query: scores [..., C] floating -> int64 [..., l],
// by descending score. l must lie in [1, C].
Tensor select_partitions(const Tensor& scores, int64_t l);

// Partition of every key: k_pre [B, Hkv, N, D] (PRE-RoPE keys), centroids
// [Hkv, C, D] -> int64 [B, Hkv, N], the nearest centroid (Euclidean), on
// k_pre's device.
Tensor assign_key_partitions(const Tensor& k_pre, const Tensor& centroids);

// Exact SAAP attention for full sequences, CPU or CUDA, any floating dtype
// (computed in float32, float64 for float64 inputs; returned in q's dtype).
// q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] RoPE'd, Nq <= Nk, queries
// bottom-right aligned (query i at position Nk - Nq + i), keys at 0 .. Nk-1.
// key_partition int64/int32 [B, Hkv, Nk] in [0, C); selected int64/int32
// [B, Hq, Nq, l] in [-1, C) (-1 = none). options.num_partitions = C.
// Returns [B, Hq, Nq, D]. `stats`, when given, is overwritten with the counts
// of this call (one device sync at the end). Throws c10::Error naming the
// argument at fault.
Tensor saap_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& key_partition,
                      const Tensor& selected, const SaapAttentionOptions& options,
                      SaapVisitStats* stats = nullptr);

// The decode-time KV cache of one layer for B sequences of equal length T.
//
// It keeps
//  - the time-ordered cache keys()/values() [B, Hkv, T, D] (RoPE'd keys),
//    from which the sinks and the local window are read, and the partition
//    of every key, key_partition() [B, Hkv, T];
//  - the routed keys, sink_tokens <= j <= T - 1 - local_window, partition-
//    contiguous: per (b, kv head) rows [start_c, start_c + len_c) of
//    routed_keys()/routed_values() [B, Hkv, capacity, D] hold partition c's
//    keys in time order, with room up to start_c + cap_c. A key enters its
//    partition when it leaves the local window. When an append would
//    overfill a partition, every partition is laid out anew from the
//    time-ordered cache with cap_c = len_c + ceil(len_c / 4) + 16
//    (rebuilds(); O(T log T), a sort of the routed keys). A partition then
//    fills only after the cache grew by about a quarter (with steady
//    routing), so rebuilds are O(log T) and insertion amortised O(1)
//    (2000 one-token appends with C = 16: 8 rebuilds, tested).
// Memory: the routed keys are held twice (time-ordered and partitioned),
// the partitioned buffer with about 25% + 16 * C rows of slack.
// Appends need no device sync until the new keys could exceed the smallest
// slack known since the last check (about every 16 tokens or more); a
// rebuild syncs once.
class PartitionedKVCache {
 public:
  // centroids [Hkv, C, D] (any float dtype; kept in float32 on `device`);
  // options: local_window >= 1, sink_tokens >= 0, scale; num_partitions is
  // taken from the centroids. Keys and values are stored in `dtype`.
  PartitionedKVCache(const Tensor& centroids, int64_t batch, const SaapAttentionOptions& options,
                     at::ScalarType dtype, at::Device device);

  // Appends n >= 1 tokens to every sequence: k_pre (PRE-RoPE, for the
  // partition), k_rope and v, each [B, Hkv, n, D] on the cache's device.
  void append(const Tensor& k_pre, const Tensor& k_rope, const Tensor& v);
  // Room for `tokens` tokens in the time-ordered cache without reallocating
  // (it otherwise grows by doubling).
  void reserve(int64_t tokens);

  // Attention of the newest token (position T - 1, already appended):
  // q_rope [B, Hq, D], selected int64/int32 [B, Hq, l] in [-1, C).
  // Returns [B, Hq, D] in q's dtype. On CUDA with bf16/fp16 q and cache and
  // D in {64, 128} it runs the decode kernel; otherwise a torch reference
  // reading the same rows of the partition buffers. `stats`, when given,
  // receives decode_stats(selected) (a device sync). The kernel path does no
  // device sync: it does not check the values of `selected` (ids outside
  // [0, C) are skipped by the kernel); the reference path refuses them.
  Tensor decode(const Tensor& q_rope, const Tensor& selected,
                SaapVisitStats* stats = nullptr) const;
  // The torch reference of decode, whatever the device (tests compare).
  Tensor decode_reference(const Tensor& q_rope, const Tensor& selected,
                          SaapVisitStats* stats = nullptr) const;
  // What decode() visits for this selection (counted from the partition
  // lengths; one device sync).
  SaapVisitStats decode_stats(const Tensor& selected) const;
  // Whether decode() runs the CUDA kernel for a query of this dtype.
  bool uses_kernel(at::ScalarType q_dtype) const;

  int64_t batch() const { return batch_; }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t num_partitions() const { return num_partitions_; }
  int64_t length() const { return length_; }  // T
  int64_t rebuilds() const { return rebuilds_; }
  const SaapAttentionOptions& options() const { return options_; }

  Tensor keys() const;           // [B, Hkv, T, D], time-ordered (a view)
  Tensor values() const;         // [B, Hkv, T, D]
  Tensor key_partition() const;  // int64 [B, Hkv, T]
  // Routed keys entered so far: those j with sink_tokens <= j < routed_end().
  int64_t routed_end() const { return routed_end_; }
  const Tensor& routed_keys() const { return k_part_; }    // [B, Hkv, capacity, D]
  const Tensor& routed_values() const { return v_part_; }  // [B, Hkv, capacity, D]
  const Tensor& partition_start() const { return start_; }  // int32 [B, Hkv, C]
  const Tensor& partition_length() const { return len_; }   // int32 [B, Hkv, C]
  const Tensor& partition_capacity() const { return cap_; } // int32 [B, Hkv, C]
  // Time position of each routed row, -1 for unused rows: int64 [B, Hkv, capacity].
  const Tensor& routed_position() const { return row_pos_; }
  // Partition c's keys of (b, kv head g), in the order stored: [len_c, D].
  Tensor partition_keys(int64_t b, int64_t g, int64_t c) const;

 private:
  void rebuild();
  void insert(int64_t begin, int64_t end);
  void write_rows(const Tensor& row, int64_t begin);
  void refresh_slack();

  SaapAttentionOptions options_;
  Tensor centroids_;  // float32 [Hkv, C, D]
  int64_t batch_, kv_heads_, head_dim_, num_partitions_;
  at::ScalarType dtype_;
  at::Device device_;
  int64_t length_ = 0;
  int64_t routed_end_ = 0;  // routed keys entered: [sink_tokens, routed_end_)
  int64_t rebuilds_ = 0;
  int64_t min_slack_ = 0;   // lower bound of cap_c - len_c over all rows and partitions
  Tensor k_time_, v_time_;  // [B, Hkv, time capacity, D]
  Tensor part_time_;        // int64 [B, Hkv, time capacity]
  Tensor k_part_, v_part_;  // [B, Hkv, capacity, D]
  Tensor row_pos_;          // int64 [B, Hkv, capacity]
  Tensor start_, len_, cap_;  // int32 [B, Hkv, C]
};

}  // namespace sparseflash::saap
