// Fused model kernels: cross-entropy rows with the gradient in place, and
// unit-norm rows. Both are memory-bound; they exist so that the step never
// materialises float32 copies of the logits or of the keys.
#include "model/kernels/fused.h"

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sparseflash::kernels {

namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// ---------------------------------------------------------------------------
// cross-entropy rows

// Online softmax state: running max m and sum s of exp(x - m).
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ void accumulate(MaxSum& st, float x) {
  if (x > st.m) {
    st.s = st.s * __expf(st.m - x) + 1.f;
    st.m = x;
  } else {
    st.s += __expf(x - st.m);
  }
}

constexpr int kRowThreads = 512;

// One block per row: pass 1 reads the row once for max and sum (16-byte
// vectors where the row allows), pass 2 rewrites it as the scaled gradient.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_rows_kernel(T* logits, int64_t ld, int vocab, const int64_t* targets,
                              const float* grad_scale, bool write_grad, float* loss) {
  constexpr int kVec = 16 / sizeof(T);
  struct alignas(16) Vec { T v[kVec]; };
  __shared__ MaxSum warp_state[kRowThreads / 32];
  __shared__ float target_logit;
  T* row = logits + static_cast<int64_t>(blockIdx.x) * ld;
  const int64_t target = targets[blockIdx.x];
  const bool vectorised = reinterpret_cast<uintptr_t>(row) % 16 == 0;
  const int vec_end = vectorised ? vocab / kVec * kVec : 0;

  MaxSum st{-INFINITY, 0.f};
  for (int i = threadIdx.x * kVec; i < vec_end; i += kRowThreads * kVec) {
    const Vec v = *reinterpret_cast<const Vec*>(row + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) accumulate(st, to_float(v.v[j]));
  }
  for (int i = vec_end + threadIdx.x; i < vocab; i += kRowThreads) accumulate(st, to_float(row[i]));
  if (threadIdx.x == 0) target_logit = target >= 0 ? to_float(row[target]) : 0.f;

  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, st.m, offset),
                 __shfl_xor_sync(0xffffffffu, st.s, offset)};
    st = combine(st, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();  // also publishes target_logit before pass 2 overwrites it
  st = warp_state[0];
  for (int w = 1; w < kRowThreads / 32; ++w) st = combine(st, warp_state[w]);
  const float lse = st.m + __logf(st.s);
  if (threadIdx.x == 0) loss[blockIdx.x] = target >= 0 ? lse - target_logit : 0.f;
  if (!write_grad) return;

  const float scale = target >= 0 ? *grad_scale : 0.f;
  for (int i = threadIdx.x * kVec; i < vec_end; i += kRowThreads * kVec) {
    Vec v = *reinterpret_cast<const Vec*>(row + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float g = __expf(to_float(v.v[j]) - lse) * scale;
      if (i + j == target) g -= scale;
      v.v[j] = from_float<T>(g);
    }
    *reinterpret_cast<Vec*>(row + i) = v;
  }
  for (int i = vec_end + threadIdx.x; i < vocab; i += kRowThreads) {
    float g = __expf(to_float(row[i]) - lse) * scale;
    if (i == target) g -= scale;
    row[i] = from_float<T>(g);
  }
}

// ---------------------------------------------------------------------------
// unit-norm rows: one warp per row

constexpr int kNormWarps = 8;

template <typename T>
__device__ __forceinline__ T* row_ptr(const RowsView& v, int64_t row, int H, int N) {
  const int64_t n = row % N, h = (row / N) % H, b = row / (static_cast<int64_t>(N) * H);
  return static_cast<T*>(v.data) + b * v.sb + h * v.sh + n * v.sn;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32)
    unit_norm_forward_kernel(RowsView x, RowsView y, int64_t rows, int H, int N, int D, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* xr = row_ptr<T>(x, row, H, N);
  T* yr = row_ptr<T>(y, row, H, N);
  float ss = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float v = to_float(xr[d]);
    ss += v * v;
  }
  const float inv = 1.f / fmaxf(sqrtf(warp_sum(ss)), eps);
  for (int d = lane; d < D; d += 32) yr[d] = from_float<T>(to_float(xr[d]) * inv);
}

template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32)
    unit_norm_backward_kernel(RowsView x, RowsView dy, RowsView dx, int64_t rows, int H, int N,
                              int D, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* xr = row_ptr<T>(x, row, H, N);
  const T* dyr = row_ptr<T>(dy, row, H, N);
  T* dxr = row_ptr<T>(dx, row, H, N);
  float ss = 0.f, dot = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float a = to_float(xr[d]), g = to_float(dyr[d]);
    ss += a * a;
    dot += a * g;
  }
  ss = warp_sum(ss);
  dot = warp_sum(dot);
  const float norm = sqrtf(ss);
  if (norm > eps) {
    const float inv = 1.f / norm, coef = dot * inv * inv * inv;
    for (int d = lane; d < D; d += 32)
      dxr[d] = from_float<T>(to_float(dyr[d]) * inv - to_float(xr[d]) * coef);
  } else {
    for (int d = lane; d < D; d += 32) dxr[d] = from_float<T>(to_float(dyr[d]) / eps);
  }
}

template <typename F>
cudaError_t dispatch(RowType type, F&& launch) {
  switch (type) {
    case RowType::kF32: launch(float{}); break;
    case RowType::kBF16: launch(__nv_bfloat16{}); break;
    case RowType::kFP16: launch(__half{}); break;
  }
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// launchers

cudaError_t cross_entropy_rows(RowType type, void* logits, int64_t ld, int rows, int vocab,
                               const int64_t* targets, const float* grad_scale, bool write_grad,
                               float* loss, cudaStream_t stream) {
  if (rows < 0 || vocab <= 0 || ld < vocab || !logits || !targets || !loss ||
      (write_grad && !grad_scale))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch(type, [&](auto zero) {
    using T = decltype(zero);
    cross_entropy_rows_kernel<T><<<rows, kRowThreads, 0, stream>>>(
        static_cast<T*>(logits), ld, vocab, targets, grad_scale, write_grad, loss);
  });
}

cudaError_t unit_norm_rows_forward(RowType type, RowsView x, RowsView y, int B, int H, int N,
                                   int D, float eps, cudaStream_t stream) {
  if (B < 0 || H < 0 || N < 0 || D <= 0 || !(eps > 0)) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(B) * H * N;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kNormWarps - 1) / kNormWarps);
  return dispatch(type, [&](auto zero) {
    using T = decltype(zero);
    unit_norm_forward_kernel<T><<<blocks, kNormWarps * 32, 0, stream>>>(x, y, rows, H, N, D, eps);
  });
}

cudaError_t unit_norm_rows_backward(RowType type, RowsView x, RowsView dy, RowsView dx, int B,
                                    int H, int N, int D, float eps, cudaStream_t stream) {
  if (B < 0 || H < 0 || N < 0 || D <= 0 || !(eps > 0)) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(B) * H * N;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kNormWarps - 1) / kNormWarps);
  return dispatch(type, [&](auto zero) {
    using T = decltype(zero);
    unit_norm_backward_kernel<T>
        <<<blocks, kNormWarps * 32, 0, stream>>>(x, dy, dx, rows, H, N, D, eps);
  });
}

}  // namespace sparseflash::kernels
