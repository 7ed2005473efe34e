// Fused operations of the language models, as LibTorch autograd functions:
// each has a CUDA path (model/kernels/fused.cu) and a path in ATen ops for
// everything else, with the same semantics (tests compare the two).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace sparseflash::model {

using at::Tensor;

// Mean cross-entropy (nats; a float32 scalar, float64 for float64 x) of the logits x @ weight^T
// against `targets`, over the positions whose target is >= 0 (negative
// targets are ignored, as cross_entropy's ignore_index). x [..., d],
// weight [V, d], targets [...] int64 with values below V.
//
// The [rows, V] logits are never held whole, nor ever in float32: rows go
// through in chunks of `chunk_rows` (0: a size that keeps each chunk's logits
// near 256 MB), each chunk's logits are computed in the matmul dtype
// (bfloat16 under CUDA autocast), turned in place into their gradient, and
// consumed at once by the two matmuls of the backward (dx, and dweight
// accumulated in float32). So when gradients are wanted, the backward work is
// done in the forward and backward() only scales by the incoming gradient.
// Under CUDA autocast the matmuls run in the autocast dtype; otherwise in
// x's dtype (weight is cast to it).
Tensor linear_cross_entropy(const Tensor& x, const Tensor& weight, const Tensor& targets,
                            int64_t chunk_rows = 0);

// x / max(|x|, eps) over the last dimension of x [B, H, N, D], in x's dtype
// (norms in float32). On CUDA (bf16, fp16 or float32, D contiguous) one
// kernel each way; the result has x's memory order.
Tensor unit_norm_rows(const Tensor& x, double eps = 1e-6);

// The residual stream's add and the LayerNorm that reads it, in one pass:
// h = x + y (y undefined: h = x) and out = layer_norm(h) * weight + bias
// over the last dimension (bias may be undefined). Returns {h, out}: h in x's
// dtype, out in the dtype the next matmul takes (the autocast dtype under
// CUDA autocast, else x's). On CUDA (x float32, y float32/bf16/fp16, width a
// multiple of 4 up to 2048, float32 weight and bias) one kernel each way;
// elsewhere ATen ops with the same results.
std::pair<Tensor, Tensor> add_layer_norm(const Tensor& x, const Tensor& y, const Tensor& weight,
                                         const Tensor& bias, double eps);

// The three Llama operations below take their CUDA kernels only with
// SPARSEFLASH_FUSED_LLAMA=1 (attention/kernels/options.h) for now; otherwise
// their ATen paths, on every device.
//
// The same for RMSNorm (Llama): h = x + y (y undefined: h = x) and
// out = weight * (h * rsqrt(mean(h^2) + eps)) over the last dimension, with
// h normalised in float32 as transformers does. Returns {h, out}: out in the
// autocast dtype under CUDA autocast, else in the type of that product. On
// CUDA (the same conditions as add_layer_norm) one kernel each way.
std::pair<Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight,
                                       double eps);

// The SwiGLU product silu(gate) * up (gate, up of one shape and type). On
// CUDA (bf16, fp16 or float32, both contiguous) one kernel each way, which
// keeps no silu(gate) for the backward; elsewhere ATen ops.
Tensor swiglu(const Tensor& gate, const Tensor& up);

// Rotary positions, rotate-half layout: x [B, H, N, D] (any strides, D even),
// cos and sin [N, D]; returns x * cos + rotate_half(x) * sin with
// rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]), in x's type. On CUDA
// (bf16, fp16 or float32; x's last dimension contiguous; cos and sin of x's
// type, not requiring gradients) one kernel each way, computing in float32
// (ATen rounds each product to x's type) and writing token-major memory
// ([B, N, H, D], what ATen gives for the heads view of a projection);
// elsewhere ATen ops.
Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin);

}  // namespace sparseflash::model
