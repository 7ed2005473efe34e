// The CUDA kernels behind the attention interface: a LibTorch autograd
// function over attention/kernels (packing included), used automatically for
// CUDA tensors the kernels support; the reference covers everything else.
#pragma once

#include <ATen/core/Tensor.h>

#include "attention/attention.h"

namespace sparseflash::attention {

// True when this build has the kernels and q, k, v qualify: CUDA, bf16 or
// fp16 (all three alike), head dim 64 or 128, H a multiple of Hkv, Nq <= Nk.
bool flash_supported(const Tensor& q, const Tensor& k, const Tensor& v);

// Same contract as reference_attention (output in q's dtype; rows with no
// allowed key give 0). Checks its inputs with messages naming the argument.
// deterministic: dQ by a second pass instead of fp32 atomics, so gradients are
// bit-identical run to run (the backward is slower).
Tensor flash_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pattern,
                       double scale = 0, bool deterministic = false);

// True when cuDNN's fused attention (SDPA's cuDNN backend) takes dense causal
// attention of these tensors: CUDA, bf16 or fp16 (all alike), head dim a
// multiple of 8 up to 128, as many key heads as query heads, Nq == Nk.
bool cudnn_supported(const Tensor& q, const Tensor& k, const Tensor& v);

// Dense causal attention through cuDNN (differentiable); the output keeps
// q's memory order. scale <= 0 means 1 / sqrt(D).
Tensor cudnn_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale = 0);

// LSH bucket ids on the GPU in one kernel (no float copy of x, no [.., nb]
// intermediate): the same function as lsh_buckets (argmax([xR, -xR]), first
// maximum wins), projections accumulated in float32 in another order, so rows
// whose two best projections are within float rounding may pick the other one.
// flash_lsh_supported: CUDA, bf16/fp16, head dim a multiple of 8 up to 256,
// contiguous head dim, strides and start 16-byte aligned.
// With offsets ([B, H, ceil(N / offset_block), nb/2]), row n hashes
// x R - offsets[b, h, n / offset_block] (see lsh_buckets' center_block).
// cap > 0: at most cap rows of each block of kLshCapacityBlock rows per
// bucket, as capped_argmax (attention.h) on the same scores; cap > 0 needs
// nb <= 64 and cap * nb >= kLshCapacityBlock.
bool flash_lsh_supported(const Tensor& x, const Tensor& rotations);
Tensor flash_lsh_buckets(const Tensor& x, const Tensor& rotations, const Tensor& offsets = {},
                         int64_t offset_block = 0, int64_t cap = 0);

// Forward only, with the log-sum-exp ([B, H, Nq] float32): for tests.
std::pair<Tensor, Tensor> flash_attention_with_lse(const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Pattern& pattern,
                                                   double scale = 0);

// The backward of the kernels for one part of a larger attention
// (local_attention): gradients of attention under `pattern` given the whole
// attention's output (q's dtype) and log-sum-exp (float32). Packs again.
std::tuple<Tensor, Tensor, Tensor> flash_backward_part(const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Pattern& pattern,
                                                       double scale, const Tensor& out,
                                                       const Tensor& lse, const Tensor& grad_out,
                                                       bool deterministic = false);

}  // namespace sparseflash::attention
