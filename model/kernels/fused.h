// Fused elementwise kernels of the language models, torch-free: the
// cross-entropy of a block of logit rows with its gradient written in place,
// unit-norm rows (the keys k = q / |q| of shared-QK attention), the residual
// add + LayerNorm or RMSNorm, the SwiGLU product and rotary positions, each
// with its backward. model/fused.h wraps them as LibTorch autograd functions.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sparseflash::kernels {

enum class RowType { kF32, kBF16, kFP16 };

// For each of `rows` rows of `logits` (row r at logits + r * ld, `vocab`
// entries): loss[r] = logsumexp(row) - row[target[r]] in float32, and, when
// `write_grad`, the row is overwritten by d(loss)/d(row) * (*grad_scale), i.e.
// (softmax(row) - onehot(target)) * (*grad_scale), in the row's own type.
// A negative target (ignored position) gives loss 0 and a zero gradient row.
// grad_scale is a device pointer so that the mean's 1 / count needs no host
// synchronisation. Targets must be below `vocab` (checked by the caller).
cudaError_t cross_entropy_rows(RowType type, void* logits, int64_t ld, int rows, int vocab,
                               const int64_t* targets, const float* grad_scale, bool write_grad,
                               float* loss, cudaStream_t stream);

// Rows of a [B, H, N, D] view (element strides sb, sh, sn; D contiguous):
// y = x / max(|x|, eps), written to `y` with its own strides. Norms and dot
// products are accumulated in float32.
struct RowsView {
  void* data = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
};
cudaError_t unit_norm_rows_forward(RowType type, RowsView x, RowsView y, int B, int H, int N,
                                   int D, float eps, cudaStream_t stream);

// Its backward, recomputing |x|: dx = dy / n - x (x . dy) / n^3 where
// n = |x| > eps, dx = dy / eps where not (the clamp has zero derivative).
cudaError_t unit_norm_rows_backward(RowType type, RowsView x, RowsView dy, RowsView dx, int B,
                                    int H, int N, int D, float eps, cudaStream_t stream);

// Residual add + LayerNorm over rows of C float32 values (C a multiple of 4,
// at most kMaxLayerNormWidth): h = x + y (y optional, of `y_type`),
// out = (h - mean) * rstd * weight (+ bias), in `out_type`; mean and rstd
// (float32 per row) are kept for the backward. All row-major, contiguous.
// With `rms` it is RMSNorm instead (Llama): mean is taken as 0, so
// rstd = 1 / sqrt(mean(h^2) + eps) and out = h * rstd * weight (no bias).
inline constexpr int kMaxLayerNormWidth = 2048;

struct AddLayerNormParams {
  int rows = 0, width = 0;
  float eps = 1e-5f;
  const float* x = nullptr;
  const void* y = nullptr;  // nullptr: h = x
  RowType y_type = RowType::kF32;
  const float* weight = nullptr;
  const float* bias = nullptr;  // nullptr: no bias
  float* h = nullptr;
  void* out = nullptr;
  RowType out_type = RowType::kF32;
  float* mean = nullptr;
  float* rstd = nullptr;
  bool rms = false;
};
cudaError_t add_layer_norm_forward(const AddLayerNormParams& p, cudaStream_t stream);

// The backward: with g = dout * weight and xhat = (h - mean) * rstd,
// dh_total = dh + rstd * (g - mean(g) - xhat * mean(g * xhat)) (dh optional;
// RMSNorm drops the mean(g) term),
// written to dx (float32) and, if given, to dy (in y_type); the weight and
// bias gradients are summed per block into partial_dw / partial_db
// ([blocks, C] float32, blocks = add_layer_norm_backward_blocks(rows)), for
// the caller to sum over blocks.
struct AddLayerNormGrads {
  const void* dout = nullptr;  // out_type
  const float* dh = nullptr;   // nullptr: no gradient reaches h directly
  float* dx = nullptr;
  void* dy = nullptr;          // nullptr: not wanted
  float* partial_dw = nullptr;
  float* partial_db = nullptr;  // nullptr: no bias
};
int add_layer_norm_backward_blocks(int rows);
cudaError_t add_layer_norm_backward(const AddLayerNormParams& p, const AddLayerNormGrads& g,
                                    cudaStream_t stream);

// SwiGLU: out = silu(gate) * up over n elements of one type, silu(g) =
// g / (1 + exp(-g)), in float32 arithmetic. The backward, from dout:
// dgate = dout * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate),
// dup = dout * silu(gate). All contiguous.
cudaError_t swiglu_forward(RowType type, const void* gate, const void* up, void* out, int64_t n,
                           cudaStream_t stream);
cudaError_t swiglu_backward(RowType type, const void* gate, const void* up, const void* dout,
                            void* dgate, void* dup, int64_t n, cudaStream_t stream);

// Rotary positions in the rotate-half layout on the rows of a [B, H, N, D]
// view (D even and contiguous): with i < D/2 and j = i + D/2,
//   y_i = x_i cos_i - x_j sin_i,   y_j = x_j cos_j + x_i sin_j,
// cos and sin [N, D] contiguous, of x's type; float32 arithmetic. With
// `transpose` the adjoint (the backward, dx from dy):
//   dx_i = dy_i cos_i + dy_j sin_j,   dx_j = dy_j cos_j - dy_i sin_i.
cudaError_t rotary(RowType type, RowsView x, RowsView y, const void* cos, const void* sin, int B,
                   int H, int N, int D, bool transpose, cudaStream_t stream);

}  // namespace sparseflash::kernels
