// SAAP decode attention on the GPU: the torch-free interface.
//
// One new token per sequence attends to (a) the keys of the partitions its
// query head selected, stored partition-contiguous in k_part / v_part, and
// (b) up to two always-attended row ranges (sinks, local window) of the
// time-ordered cache k_dense / v_dense. Exact softmax over that union.
//
// Flash-decoding: the keys of one (batch, query head) are laid end to end as
// one virtual sequence (selected partitions in list order, then the dense
// ranges) and cut into `decode_splits(p)` equal chunks, one CTA each. A CTA
// keeps a running (max, sum, acc) in fp32 and writes it to the workspace; a
// combine kernel merges the chunks into out and lse. With one split the first
// kernel writes out and lse itself and no workspace is needed.
//
// Semantics of `selected` (docs/saap.md): entries outside [0, C) (in
// particular -1) are skipped; a partition listed twice counts once (its
// keys are attended once). Partition rows outside [0, part_capacity) are
// ignored rather than read. The partitions and the dense ranges live in
// different tensors, so the caller keeps them disjoint as sets of tokens
// (the partitioned cache never holds a sink or window key).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace sparseflash::saap::kernels {

enum class DType { kBF16, kFP16 };

// The largest top_l a launch accepts (the span list of a head lives in shared memory).
inline constexpr int kMaxTopL = 1024;

struct DecodeParams {
  DType dtype = DType::kBF16;
  int batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;  // head_dim 64 or 128
  int num_partitions = 0;                                  // C
  int top_l = 0;                                           // selected partitions per query head
  const void* q = nullptr;  // [batch, q_heads, head_dim], contiguous (RoPE'd query of the new token)
  // Routed keys, partition-contiguous: partition c of (b, kv head g) is rows
  // [part_start[i], part_start[i] + part_len[i]) with i = (b * kv_heads + g) * C + c,
  // of k_part / v_part [batch, kv_heads, part_capacity, head_dim] (contiguous).
  const void* k_part = nullptr;
  const void* v_part = nullptr;
  int64_t part_capacity = 0;
  const int32_t* part_start = nullptr;
  const int32_t* part_len = nullptr;  // [batch, kv_heads, C]
  const int32_t* selected = nullptr;  // [batch, q_heads, top_l] partition ids; -1 entries are skipped
  // Always-attended keys (sinks + local window) in the time-ordered cache
  // k_dense / v_dense [batch, kv_heads, dense_capacity, head_dim] (contiguous):
  // rows [dense_begin[r], dense_end[r]) for r = 0, 1 (same for every batch row;
  // empty when begin == end; the two ranges must not overlap).
  const void* k_dense = nullptr;
  const void* v_dense = nullptr;
  int64_t dense_capacity = 0;
  int64_t dense_begin[2] = {0, 0}, dense_end[2] = {0, 0};
  float scale = 0;      // <= 0: 1/sqrt(head_dim)
  void* out = nullptr;  // [batch, q_heads, head_dim], q's dtype; 0 for a head with no key at all
  float* lse = nullptr;  // optional [batch, q_heads] float32, natural log (-inf when no key)
  void* workspace = nullptr;
  size_t workspace_bytes = 0;  // >= decode_workspace_bytes(params)
  cudaStream_t stream = nullptr;
  int num_splits = 0;  // chunks per (batch, query head), 1..kMaxSplits; 0: decode_splits chooses
};

inline constexpr int kMaxSplits = 64;

// Chunks per (batch, query head): num_splits when set, else a choice from
// the shapes only (not from the device or the contents of part_len), so
// workspace sizes are stable.
int decode_splits(const DecodeParams& p);

// Workspace a launch needs (0 when decode_splits(p) == 1); 16-byte aligned.
size_t decode_workspace_bytes(const DecodeParams& p);

// Validates (throws std::invalid_argument naming the field; nothing touches
// the device before that) and launches on p.stream; asynchronous. Throws
// std::runtime_error when a launch fails.
void launch_saap_decode(const DecodeParams& p);

}  // namespace sparseflash::saap::kernels
