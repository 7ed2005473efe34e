// The attention interface the model calls, and its reference implementation.
//
// Four kinds, one semantics: query i may attend to key j when
//   q_pos(i) >= k_pos(j)                         (causal)
//   and, for HASH, q_bucket(i) == k_bucket(j)     (same LSH bucket)
//   and, for SHIFT, q_bucket(i) == k_bucket(j)    (same position group)
//   and, for DROP, q_keep(i) and k_keep(j)        (neither dropped)
// or, whatever the kind's constraint, causally when the pattern names sinks
// or a local window:
//   k_pos(j) < sink_tokens  or  q_pos(i) - k_pos(j) < local_window
// A query with no allowed key outputs 0 (and gets zero gradients).
// Positions: with Nq queries and Nk keys, query i sits at position
// i + Nk - Nq (bottom-right aligned, as in FlashAttention), key j at j.
//
// The sparsity pattern of a call is drawn first and returned explicitly
// (bucket ids, keep masks), then attention is computed under it. The CUDA
// kernels are tested against this reference under the same pattern.
#pragma once

#include <cstdint>
#include <tuple>
#include <utility>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "configs/experiment.pb.h"

namespace sparseflash::attention {

using at::Tensor;

// kShift: LongLoRA's shifted sparse attention (S2-Attn), a fixed bucket
// pattern of position groups (shift_groups below).
enum class Kind { kDense, kHash, kDrop, kShift };
// kAuto: cuDNN for dense layers where it applies, else our kernels where they
// apply, else the reference (configs/experiment.proto, Attention.Backend).
enum class Backend { kAuto, kReference, kKernel, kCudnn };

struct Options {
  Kind kind = Kind::kDense;
  int num_buckets = 16;        // HASH
  bool fixed_rotation = false;  // HASH: R from rotation_seed instead of redrawn
  uint64_t rotation_seed = 1234;
  bool shared_qk = false;       // HASH: keys are normalised queries, same buckets
  double drop_prob = 0.5;       // DROP
  int64_t chunk_size = 1024;    // reference: query rows per chunk
  Backend backend = Backend::kAuto;
  bool deterministic = false;   // kernels: bit-identical gradients (slower dQ)
  bool lsh_center = true;       // HASH: hash rows minus the mean of earlier blocks
  int64_t lsh_center_block = 256;
  double lsh_capacity = 0;      // HASH: bucket capacity (lsh_buckets' capacity); 0 = none
  int64_t group_size = 0;       // SHIFT: 0 = ceil(Nk / 4)
  int64_t sink_tokens = 0;      // HASH, DROP, SHIFT: first keys every query sees
  int64_t local_window = 0;     // HASH, DROP, SHIFT: and the keys this close behind it

  static Options from_config(const config::Attention& c);
};

// The explicit sparsity pattern of one call. Undefined tensors mean "no
// constraint of that kind".
struct Pattern {
  Tensor q_bucket;  // int64 [B, H, Nq]      (HASH)
  Tensor k_bucket;  // int64 [B, Hkv, Nk]    (HASH)
  Tensor q_keep;    // bool  [B, H, Nq]      (DROP)
  Tensor k_keep;    // bool  [B, Hkv, Nk]    (DROP)
  int64_t num_buckets = 0;  // HASH: ids are below this (0 = unknown)
  // Keys allowed to every query besides the constraint above (causally): the
  // first sink_tokens positions and the local_window positions ending at the
  // query's. 0 = none. Only with a constraint (a dense pattern has no use for them).
  int64_t sink_tokens = 0;
  int64_t local_window = 0;
  bool has_local() const { return sink_tokens > 0 || local_window > 0; }
};

// Angular LSH: x [B, Hx, N, D], rotations [Hr, D, nb/2] with Hx a multiple of
// Hr (query head h uses rotation h / (Hx / Hr)). bucket = argmax([xR, -xR]).
// center_block > 0 hashes the rows centred as center_by_earlier_blocks(x,
// center_block) does; on the GPU kernel's path the earlier blocks' means are
// projected (float32) and subtracted from xR in the kernel, without a centred
// copy of x, so rows whose two best projections are within rounding may pick
// the other one.
//
// capacity > 0 caps the buckets: of each block of kLshCapacityBlock
// consecutive rows, at most lsh_bucket_capacity(capacity, nb) go to one
// bucket, the rows of a block taken in order, each to its best-scoring bucket
// with room (capped_argmax on the scores [xR, -xR]). Causal: a row's bucket
// depends only on the rows before it in its block.
Tensor lsh_buckets(const Tensor& x, const Tensor& rotations, int64_t center_block = 0,
                   double capacity = 0);

// The block of lsh_buckets' capacity: the rows of one CUDA thread block of
// the LSH kernel, which assigns them in order.
constexpr int64_t kLshCapacityBlock = 128;

// Rows per bucket per block for a capacity factor: ceil(capacity *
// kLshCapacityBlock / num_buckets); 0 for capacity 0 (no cap). Throws unless
// capacity is 0 or >= 1 (every row then finds a bucket with room).
int64_t lsh_bucket_capacity(double capacity, int64_t num_buckets);

// scores [..., N, nb] (float or double, on the CPU) -> int64 [..., N]: the
// rows of each block of `block` consecutive rows in order, each to the index
// of its largest score among the buckets that hold fewer than `cap` rows of
// the block so far (the first of equal scores). With cap >= block it is
// scores.argmax(-1). Needs cap * nb >= block.
Tensor capped_argmax(const Tensor& scores, int64_t block, int64_t cap);

// The mean of the rows of the whole blocks of `block` rows before each block:
// float32 [B, H, ceil(N / block), D], zero for the first block (the vector
// center_by_earlier_blocks subtracts from the rows of each block).
Tensor earlier_block_means(const Tensor& x, int64_t block);

// x [B, H, N, D] minus, for each row, the mean of the rows of the whole
// blocks of `block` rows before its block (same batch and head); rows of the
// first block are returned as they are. In x's dtype, means in float32.
// Causal: row i's result depends on rows < i only through earlier blocks.
Tensor center_by_earlier_blocks(const Tensor& x, int64_t block);

// S2-Attn's pattern (Kind::kShift) for q heads H over Hkv key heads, Nq
// queries and Nk keys (queries bottom-right aligned) on `device`: a position
// p's bucket is p / G, or (p + G / 2) / G on a shifted key head and its query
// heads. Key heads j >= Hkv / 2 are shifted (with Hkv = 1 none is: see
// Attention::forward, which then gives each half of the query heads its own
// copy of the keys). G = group_size, or ceil(Nk / 4) when it is 0.
// Buckets are int64 [B, H, Nq] and [B, Hkv, Nk]; num_buckets is set.
Pattern shift_groups(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk,
                     int64_t group_size, const at::Device& device);

// Draws the pattern of one call. q [B, H, Nq, D], k [B, Hkv, Nk, D].
// `generator` is a CPU generator, part of the run's state (checkpoints hold
// it). On the CPU the rotations and keep masks are drawn from it directly; on
// a GPU they are drawn on the device by a Philox generator seeded with one
// 64-bit number taken from it, so a step needs no host work, no copy and no
// synchronisation, and the patterns still follow from the seed and the step.
// Fixed rotations come from options.rotation_seed and `layer` only.
Pattern draw_pattern(const Options& options, const Tensor& q, const Tensor& k,
                     at::Generator& generator, int layer);

// The share of the dense causal pairs the pattern allows, per layer call,
// estimated from bucket (and keep) frequencies per (batch, head):
// sum_b P(q in b) P(k in b) for hash, P(q kept) P(k kept) for drop, 1 for
// dense; averaged over batch and heads. Uniform buckets give 1 / nb; real
// LSH buckets of a trained model are rarely uniform, and the kernels' work
// grows with this figure (sinks and a local window, which add a few pairs per
// query, are not counted). A float32 scalar on the pattern's device.
Tensor pattern_density(const Pattern& pattern);

// Reference attention under `pattern`: differentiable (custom backward that
// recomputes scores chunk by chunk, as flash attention does), computed in
// float32 (float64 for float64 inputs) and returned in q's dtype. Memory is
// O(B * H * chunk_size * Nk), never O(N^2) for the whole batch.
// q [B, H, Nq, D], k and v [B, Hkv, Nk, D], H a multiple of Hkv (GQA).
// scale <= 0 means 1 / sqrt(D).
Tensor reference_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                           const Pattern& pattern, int64_t chunk_size = 1024,
                           double scale = 0);

// Forward only, also returning the log-sum-exp per query ([B, H, Nq], float32,
// float64 for float64 inputs; -inf for queries with no allowed key): what the
// kernels return.
std::pair<Tensor, Tensor> reference_attention_with_lse(const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Pattern& pattern,
                                                       int64_t chunk_size = 1024,
                                                       double scale = 0);

// The reference's backward as a function: gradients of attention under
// `pattern` given the output and log-sum-exp of the *whole* attention the
// pattern's keys are part of (out [B, H, Nq, D], lse [B, H, Nq]) and dL/dout.
// With the pattern's own out and lse it is reference_attention's backward;
// with those of a larger attention (local_attention) it is this part's share.
// Gradients in the inputs' dtypes.
std::tuple<Tensor, Tensor, Tensor> reference_backward(const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Pattern& pattern,
                                                      int64_t chunk_size, double scale,
                                                      const Tensor& out, const Tensor& lse,
                                                      const Tensor& grad_out);

// Attention under a pattern with sinks or a local window (pattern.has_local()),
// computed as two disjoint parts merged by their log-sum-exps: the pattern's
// own constraint (buckets, drops) by the kernels (kernel = true; CUDA tensors
// they take) or the reference, and the sink and window keys the constraint does
// not allow, gathered per block of queries (local_part below). Differentiable;
// same contract as reference_attention.
Tensor local_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pattern,
                       bool kernel, int64_t chunk_size = 1024, double scale = 0,
                       bool deterministic = false);

// The local part alone, forward: output and log-sum-exp (compute precision:
// float64 for float64 inputs, else float32; lse -inf where a query has no such
// key) of attention over the keys that the sinks and window allow and the
// pattern's constraint does not. For tests and local_attention.
std::pair<Tensor, Tensor> local_part(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Pattern& pattern, double scale = 0);

// Plain masked softmax over the full N x N mask, differentiated by autograd.
// For tests on small shapes only.
Tensor naive_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                       const Pattern& pattern, double scale = 0);

// The boolean [B, H, Nq, Nk] mask of allowed pairs (small shapes, tests).
Tensor allowed_mask(const Pattern& pattern, int64_t B, int64_t H, int64_t Nq, int64_t Nk,
                    const at::TensorOptions& device);

// What the model calls: draw the pattern, then attend with the CUDA kernels
// where they apply (options.backend), else the reference. Keeps the last pattern
// so tests and tools can inspect it.
class Attention {
 public:
  Attention(Options options, int layer) : options_(options), layer_(layer) {}
  Tensor forward(const Tensor& q, const Tensor& k, const Tensor& v, at::Generator& generator);
  const Options& options() const { return options_; }
  const Pattern& last_pattern() const { return last_pattern_; }

 private:
  Options options_;
  int layer_;
  Pattern last_pattern_;
};

}  // namespace sparseflash::attention
