// Top-l partition selection on the GPU (torch-free): for every row of
// classifier scores, the ids of its l largest scores, written as the int32
// `selected` list launch_saap_decode reads. One launch replaces a top-k, a
// transpose and a cast to int32.
//
// Ids come out in increasing order (the decode kernel does not care about
// the order; a fixed order keeps its summation order, and so its bits,
// fixed). Ties at the l-th score go to the lower ids. Scores must not be NaN
// (where NaN lands among the others is unspecified).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sparseflash::saap::kernels {

enum class ScoreType { kFloat32, kBF16 };

struct TopLParams {
  ScoreType dtype = ScoreType::kFloat32;
  // [outer, inner, num_partitions], contiguous: the classifier's logits are
  // [q_heads, batch, C] (outer = q_heads, inner = batch).
  const void* scores = nullptr;
  int outer = 0, inner = 0, num_partitions = 0;
  int top_l = 0;  // 1 <= top_l <= num_partitions
  // false: out is [outer, inner, top_l]; true: out is [inner, outer, top_l]
  // (the [batch, q_heads, top_l] layout of DecodeParams::selected).
  bool transpose = false;
  int32_t* out = nullptr;
  cudaStream_t stream = nullptr;
};

// Validates (std::invalid_argument naming the field, before touching the
// device) and launches one CTA per row on p.stream; asynchronous.
void launch_top_l(const TopLParams& p);

}  // namespace sparseflash::saap::kernels
