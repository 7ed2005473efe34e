// Fused model kernels: cross-entropy rows with the gradient in place,
// unit-norm rows, residual add + LayerNorm / RMSNorm, SwiGLU and rotary
// positions. All are memory-bound; they exist so that the step never
// materialises float32 copies of the logits or of the keys, and reads each
// activation once where ATen ops would read it several times.
#include "model/kernels/fused.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/kernels/convert.cuh"

namespace sparseflash::kernels {

namespace {

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

// Pairs of elements per lane, the row held in registers: D = 64 * kIters.
template <typename T>
struct Pair;
template <>
struct Pair<float> {
  using type = float2;
  static __device__ float2 to_float2(float2 v) { return v; }
  static __device__ float2 from_float2(float2 v) { return v; }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
  static __device__ __nv_bfloat162 from_float2(float2 v) { return __float22bfloat162_rn(v); }
};
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ float2 to_float2(__half2 v) { return __half22float2(v); }
  static __device__ __half2 from_float2(float2 v) { return __float22half2_rn(v); }
};

template <typename T, int kIters>
__global__ void __launch_bounds__(kNormWarps * 32)
    unit_norm_forward_pairs_kernel(RowsView x, RowsView y, int64_t rows, int H, int N, float eps) {
  using P = Pair<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const auto* xr = reinterpret_cast<const typename P::type*>(row_ptr<T>(x, row, H, N));
  auto* yr = reinterpret_cast<typename P::type*>(row_ptr<T>(y, row, H, N));
  float2 v[kIters];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kIters; ++j) {
    v[j] = P::to_float2(xr[lane + 32 * j]);
    ss += v[j].x * v[j].x + v[j].y * v[j].y;
  }
  const float inv = 1.f / fmaxf(sqrtf(warp_sum(ss)), eps);
#pragma unroll
  for (int j = 0; j < kIters; ++j) yr[lane + 32 * j] = P::from_float2({v[j].x * inv, v[j].y * inv});
}

template <typename T, int kIters>
__global__ void __launch_bounds__(kNormWarps * 32)
    unit_norm_backward_pairs_kernel(RowsView x, RowsView dy, RowsView dx, int64_t rows, int H,
                                    int N, float eps) {
  using P = Pair<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const auto* xr = reinterpret_cast<const typename P::type*>(row_ptr<T>(x, row, H, N));
  const auto* dyr = reinterpret_cast<const typename P::type*>(row_ptr<T>(dy, row, H, N));
  auto* dxr = reinterpret_cast<typename P::type*>(row_ptr<T>(dx, row, H, N));
  float2 a[kIters], g[kIters];
  float ss = 0.f, dot = 0.f;
#pragma unroll
  for (int j = 0; j < kIters; ++j) {
    a[j] = P::to_float2(xr[lane + 32 * j]);
    g[j] = P::to_float2(dyr[lane + 32 * j]);
    ss += a[j].x * a[j].x + a[j].y * a[j].y;
    dot += a[j].x * g[j].x + a[j].y * g[j].y;
  }
  const float norm = sqrtf(warp_sum(ss));
  dot = warp_sum(dot);
  const bool clamped = !(norm > eps);
  const float inv = clamped ? 1.f / eps : 1.f / norm, coef = clamped ? 0.f : dot * inv * inv * inv;
#pragma unroll
  for (int j = 0; j < kIters; ++j)
    dxr[lane + 32 * j] = P::from_float2({g[j].x * inv - a[j].x * coef, g[j].y * inv - a[j].y * coef});
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

// ---------------------------------------------------------------------------
// residual add + LayerNorm or RMSNorm: one warp per row, the row in registers

struct alignas(8) Half4 {
  __half2 a, b;
};
struct alignas(8) Bf164 {
  __nv_bfloat162 a, b;
};

__device__ __forceinline__ float4 load4(const float* p, int64_t i) {
  return reinterpret_cast<const float4*>(p)[i];
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p, int64_t i) {
  const Bf164 v = reinterpret_cast<const Bf164*>(p)[i];
  const float2 a = __bfloat1622float2(v.a), b = __bfloat1622float2(v.b);
  return {a.x, a.y, b.x, b.y};
}
__device__ __forceinline__ float4 load4(const __half* p, int64_t i) {
  const Half4 v = reinterpret_cast<const Half4*>(p)[i];
  const float2 a = __half22float2(v.a), b = __half22float2(v.b);
  return {a.x, a.y, b.x, b.y};
}
__device__ __forceinline__ void store4(float* p, int64_t i, float4 v) {
  reinterpret_cast<float4*>(p)[i] = v;
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, int64_t i, float4 v) {
  reinterpret_cast<Bf164*>(p)[i] = {__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
}
__device__ __forceinline__ void store4(__half* p, int64_t i, float4 v) {
  reinterpret_cast<Half4*>(p)[i] = {__floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w)};
}

constexpr int kLnWarps = 8;

// kChunks float4 per lane: a row of up to 128 kChunks values.
template <int kChunks, typename Y, typename O>
__global__ void __launch_bounds__(kLnWarps * 32)
    add_layer_norm_forward_kernel(AddLayerNormParams p) {
  const int row = blockIdx.x * kLnWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= p.rows) return;
  const int n4 = p.width / 4;
  const int64_t base = static_cast<int64_t>(row) * n4;
  float4 v[kChunks];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int i = lane + 32 * j;
    if (i < n4) {
      v[j] = load4(p.x, base + i);
      if (p.y) {
        const float4 y = load4(static_cast<const Y*>(p.y), base + i);
        v[j].x += y.x, v[j].y += y.y, v[j].z += y.z, v[j].w += y.w;
      }
      store4(p.h, base + i, v[j]);
      sum += v[j].x + v[j].y + v[j].z + v[j].w;
    }
  }
  // (every lane takes the same branch: p.rms is uniform)
  const float mean = p.rms ? 0.f : warp_sum(sum) / p.width;
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    if (lane + 32 * j < n4) {
      const float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, d = v[j].w - mean;
      sq += a * a + b * b + c * c + d * d;
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / p.width + p.eps);
  if (lane == 0) p.mean[row] = mean, p.rstd[row] = rstd;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int i = lane + 32 * j;
    if (i < n4) {
      const float4 w = load4(p.weight, i);
      float4 b = {0.f, 0.f, 0.f, 0.f};
      if (p.bias) b = load4(p.bias, i);
      const float4 o = {(v[j].x - mean) * rstd * w.x + b.x, (v[j].y - mean) * rstd * w.y + b.y,
                        (v[j].z - mean) * rstd * w.z + b.z, (v[j].w - mean) * rstd * w.w + b.w};
      store4(static_cast<O*>(p.out), base + i, o);
    }
  }
}

constexpr int kLnBackwardBlocks = 264;  // about two per SM: the partial sums stay few

// Warps stride over rows; each keeps its rows' weight and bias gradient sums
// in registers, the block adds its warps' sums in shared memory and writes
// one partial row.
template <int kChunks, typename Y, typename O>
__global__ void __launch_bounds__(kLnWarps * 32)
    add_layer_norm_backward_kernel(AddLayerNormParams p, AddLayerNormGrads g) {
  extern __shared__ float4 shared_sums[];  // [kLnWarps][2][n4]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n4 = p.width / 4;
  float4 dw[kChunks], db[kChunks];
#pragma unroll
  for (int j = 0; j < kChunks; ++j) dw[j] = db[j] = {0.f, 0.f, 0.f, 0.f};
  for (int row = blockIdx.x * kLnWarps + warp; row < p.rows; row += gridDim.x * kLnWarps) {
    const int64_t base = static_cast<int64_t>(row) * n4;
    const float mean = p.mean[row], rstd = p.rstd[row];
    float4 xhat[kChunks], gw[kChunks];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int i = lane + 32 * j;
      if (i < n4) {
        const float4 h = load4(p.h, base + i), d = load4(static_cast<const O*>(g.dout), base + i);
        const float4 w = load4(p.weight, i);
        xhat[j] = {(h.x - mean) * rstd, (h.y - mean) * rstd, (h.z - mean) * rstd,
                   (h.w - mean) * rstd};
        gw[j] = {d.x * w.x, d.y * w.y, d.z * w.z, d.w * w.w};
        sum_g += gw[j].x + gw[j].y + gw[j].z + gw[j].w;
        sum_gx += gw[j].x * xhat[j].x + gw[j].y * xhat[j].y + gw[j].z * xhat[j].z +
                  gw[j].w * xhat[j].w;
        dw[j].x += d.x * xhat[j].x, dw[j].y += d.y * xhat[j].y;
        dw[j].z += d.z * xhat[j].z, dw[j].w += d.w * xhat[j].w;
        db[j].x += d.x, db[j].y += d.y, db[j].z += d.z, db[j].w += d.w;
      }
    }
    const float a = p.rms ? 0.f : warp_sum(sum_g) / p.width, b = warp_sum(sum_gx) / p.width;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int i = lane + 32 * j;
      if (i < n4) {
        float4 r = {rstd * (gw[j].x - a - xhat[j].x * b), rstd * (gw[j].y - a - xhat[j].y * b),
                    rstd * (gw[j].z - a - xhat[j].z * b), rstd * (gw[j].w - a - xhat[j].w * b)};
        if (g.dh) {
          const float4 d = load4(g.dh, base + i);
          r.x += d.x, r.y += d.y, r.z += d.z, r.w += d.w;
        }
        store4(g.dx, base + i, r);
        if (g.dy) store4(static_cast<Y*>(g.dy), base + i, r);
      }
    }
  }
  float4* mine = shared_sums + static_cast<int64_t>(warp) * 2 * n4;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int i = lane + 32 * j;
    if (i < n4) mine[i] = dw[j], mine[n4 + i] = db[j];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * n4; i += kLnWarps * 32) {
    float4 t = shared_sums[i];
    for (int w = 1; w < kLnWarps; ++w) {
      const float4 u = shared_sums[static_cast<int64_t>(w) * 2 * n4 + i];
      t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
    }
    if (i < n4) store4(g.partial_dw + static_cast<int64_t>(blockIdx.x) * p.width, i, t);
    else if (g.partial_db) store4(g.partial_db + static_cast<int64_t>(blockIdx.x) * p.width, i - n4, t);
  }
}

// ---------------------------------------------------------------------------
// SwiGLU: grid-stride over elements, pairs where the pointers allow

constexpr int kElementwiseThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// d(silu(g) u) / dg = u s (1 + g (1 - s)), / du = g s.
__device__ __forceinline__ void swiglu_grads(float g, float u, float d, float& dg, float& du) {
  const float s = sigmoid(g);
  dg = d * u * s * (1.f + g * (1.f - s));
  du = d * g * s;
}

// Forward: a = silu(gate) * up. Backward (kBackward): a = dgate, b = dup from dout.
template <typename T, bool kPairs, bool kBackward>
__global__ void __launch_bounds__(kElementwiseThreads)
    swiglu_kernel(const T* gate, const T* up, const T* dout, T* a, T* b, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (kPairs) {
    using P = Pair<T>;
    using V = typename P::type;
    for (; i < n / 2; i += stride) {
      const float2 g = P::to_float2(reinterpret_cast<const V*>(gate)[i]);
      const float2 u = P::to_float2(reinterpret_cast<const V*>(up)[i]);
      if constexpr (kBackward) {
        const float2 d = P::to_float2(reinterpret_cast<const V*>(dout)[i]);
        float2 dg, du;
        swiglu_grads(g.x, u.x, d.x, dg.x, du.x);
        swiglu_grads(g.y, u.y, d.y, dg.y, du.y);
        reinterpret_cast<V*>(a)[i] = P::from_float2(dg);
        reinterpret_cast<V*>(b)[i] = P::from_float2(du);
      } else {
        reinterpret_cast<V*>(a)[i] =
            P::from_float2({g.x * sigmoid(g.x) * u.x, g.y * sigmoid(g.y) * u.y});
      }
    }
  } else {
    for (; i < n; i += stride) {
      const float g = to_float(gate[i]), u = to_float(up[i]);
      if constexpr (kBackward) {
        float dg, du;
        swiglu_grads(g, u, to_float(dout[i]), dg, du);
        a[i] = from_float<T>(dg);
        b[i] = from_float<T>(du);
      } else {
        a[i] = from_float<T>(g * sigmoid(g) * u);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// rotary positions: one thread per pair of columns (i, i + D/2) of a row, or
// per two such pairs (i, i + 1) where the rows allow aligned element pairs

template <typename T, bool kTranspose, bool kPairs>
__global__ void __launch_bounds__(kElementwiseThreads)
    rotary_kernel(RowsView x, RowsView y, const T* cos, const T* sin, int64_t rows, int H, int N,
                  int D) {
  const int half = D / 2, per_row = kPairs ? half / 2 : half;
  const int64_t total = rows * per_row, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    const int64_t row = t / per_row;
    const int i = static_cast<int>(t % per_row) * (kPairs ? 2 : 1), j = i + half;
    const int64_t n = row % N;
    const T* xr = row_ptr<T>(x, row, H, N);
    T* yr = row_ptr<T>(y, row, H, N);
    const T* c = cos + n * D;
    const T* s = sin + n * D;
    // forward: y_i = x_i c_i - x_j s_i, y_j = x_j c_j + x_i s_j
    // adjoint: y_i = x_i c_i + x_j s_j, y_j = x_j c_j - x_i s_i
    auto rotate = [](float a, float b, float ci, float cj, float si, float sj, float& yi, float& yj) {
      if constexpr (kTranspose) {
        yi = a * ci + b * sj, yj = b * cj - a * si;
      } else {
        yi = a * ci - b * si, yj = b * cj + a * sj;
      }
    };
    if constexpr (kPairs) {
      using P = Pair<T>;
      using V = typename P::type;
      const float2 a = P::to_float2(*reinterpret_cast<const V*>(xr + i));
      const float2 b = P::to_float2(*reinterpret_cast<const V*>(xr + j));
      const float2 ci = P::to_float2(*reinterpret_cast<const V*>(c + i));
      const float2 cj = P::to_float2(*reinterpret_cast<const V*>(c + j));
      const float2 si = P::to_float2(*reinterpret_cast<const V*>(s + i));
      const float2 sj = P::to_float2(*reinterpret_cast<const V*>(s + j));
      float2 yi, yj;
      rotate(a.x, b.x, ci.x, cj.x, si.x, sj.x, yi.x, yj.x);
      rotate(a.y, b.y, ci.y, cj.y, si.y, sj.y, yi.y, yj.y);
      *reinterpret_cast<V*>(yr + i) = P::from_float2(yi);
      *reinterpret_cast<V*>(yr + j) = P::from_float2(yj);
    } else {
      float yi, yj;
      rotate(to_float(xr[i]), to_float(xr[j]), to_float(c[i]), to_float(c[j]), to_float(s[i]),
             to_float(s[j]), yi, yj);
      yr[i] = from_float<T>(yi);
      yr[j] = from_float<T>(yj);
    }
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

namespace {

// D / 64 when rows of D = 64, 128 or 256 elements can be read as aligned
// pairs (the pair kernels), else 0 (the element-wise kernels).
// Can every row of v be read as aligned element pairs? (Its start pair-aligned,
// every stride even.)
bool pair_rows(RowType type, const RowsView& v) {
  const uintptr_t pair = type == RowType::kF32 ? 8 : 4;
  return reinterpret_cast<uintptr_t>(v.data) % pair == 0 && v.sb % 2 == 0 && v.sh % 2 == 0 &&
         v.sn % 2 == 0;
}

int pair_iters(RowType type, const RowsView& a, const RowsView& b, int D) {
  if (D != 64 && D != 128 && D != 256) return 0;
  return pair_rows(type, a) && pair_rows(type, b) ? D / 64 : 0;
}

}  // namespace

cudaError_t unit_norm_rows_forward(RowType type, RowsView x, RowsView y, int B, int H, int N,
                                   int D, float eps, cudaStream_t stream) {
  if (B < 0 || H < 0 || N < 0 || D <= 0 || !(eps > 0)) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(B) * H * N;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kNormWarps - 1) / kNormWarps);
  const int iters = pair_iters(type, x, y, D);
  return dispatch(type, [&](auto zero) {
    using T = decltype(zero);
    switch (iters) {
      case 1: unit_norm_forward_pairs_kernel<T, 1><<<blocks, kNormWarps * 32, 0, stream>>>(x, y, rows, H, N, eps); break;
      case 2: unit_norm_forward_pairs_kernel<T, 2><<<blocks, kNormWarps * 32, 0, stream>>>(x, y, rows, H, N, eps); break;
      case 4: unit_norm_forward_pairs_kernel<T, 4><<<blocks, kNormWarps * 32, 0, stream>>>(x, y, rows, H, N, eps); break;
      default: unit_norm_forward_kernel<T><<<blocks, kNormWarps * 32, 0, stream>>>(x, y, rows, H, N, D, eps);
    }
  });
}

cudaError_t unit_norm_rows_backward(RowType type, RowsView x, RowsView dy, RowsView dx, int B,
                                    int H, int N, int D, float eps, cudaStream_t stream) {
  if (B < 0 || H < 0 || N < 0 || D <= 0 || !(eps > 0)) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(B) * H * N;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kNormWarps - 1) / kNormWarps);
  const int iters = std::min(pair_iters(type, x, dy, D), pair_iters(type, dx, dx, D));
  return dispatch(type, [&](auto zero) {
    using T = decltype(zero);
    switch (iters) {
      case 1: unit_norm_backward_pairs_kernel<T, 1><<<blocks, kNormWarps * 32, 0, stream>>>(x, dy, dx, rows, H, N, eps); break;
      case 2: unit_norm_backward_pairs_kernel<T, 2><<<blocks, kNormWarps * 32, 0, stream>>>(x, dy, dx, rows, H, N, eps); break;
      case 4: unit_norm_backward_pairs_kernel<T, 4><<<blocks, kNormWarps * 32, 0, stream>>>(x, dy, dx, rows, H, N, eps); break;
      default: unit_norm_backward_kernel<T><<<blocks, kNormWarps * 32, 0, stream>>>(x, dy, dx, rows, H, N, D, eps);
    }
  });
}

namespace {

// Calls launch(chunks constant, Y, O) for the width, y type and out type.
template <typename F>
cudaError_t dispatch_layer_norm(const AddLayerNormParams& p, F&& launch) {
  auto with_types = [&](auto chunks) {
    return dispatch(p.y_type, [&](auto y) {
      dispatch(p.out_type, [&](auto o) { launch(chunks, y, o); });
    });
  };
  const int chunks = (p.width / 4 + 31) / 32;
  switch (chunks) {
    case 1: return with_types(std::integral_constant<int, 1>{});
    case 2: return with_types(std::integral_constant<int, 2>{});
    case 3: return with_types(std::integral_constant<int, 3>{});
    case 4: return with_types(std::integral_constant<int, 4>{});
    case 5: case 6: return with_types(std::integral_constant<int, 6>{});
    case 7: case 8: return with_types(std::integral_constant<int, 8>{});
    case 9: case 10: case 11: case 12: return with_types(std::integral_constant<int, 12>{});
    default: return with_types(std::integral_constant<int, 16>{});
  }
}

bool valid(const AddLayerNormParams& p) {
  return p.rows >= 0 && p.width > 0 && p.width % 4 == 0 && p.width <= kMaxLayerNormWidth &&
         p.x && p.weight && p.h && p.out && p.mean && p.rstd && !(p.rms && p.bias);
}

}  // namespace

cudaError_t add_layer_norm_forward(const AddLayerNormParams& p, cudaStream_t stream) {
  if (!valid(p)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const unsigned blocks = (p.rows + kLnWarps - 1) / kLnWarps;
  return dispatch_layer_norm(p, [&](auto chunks, auto y, auto o) {
    add_layer_norm_forward_kernel<decltype(chunks)::value, decltype(y), decltype(o)>
        <<<blocks, kLnWarps * 32, 0, stream>>>(p);
  });
}

int add_layer_norm_backward_blocks(int rows) {
  return std::max(1, std::min(kLnBackwardBlocks, (rows + kLnWarps - 1) / kLnWarps));
}

cudaError_t add_layer_norm_backward(const AddLayerNormParams& p, const AddLayerNormGrads& g,
                                    cudaStream_t stream) {
  if (!valid(p) || !g.dout || !g.dx || !g.partial_dw || (p.bias && !g.partial_db))
    return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const int blocks = add_layer_norm_backward_blocks(p.rows);
  const size_t shared = sizeof(float) * kLnWarps * 2 * p.width;  // 128 KB at the widest
  return dispatch_layer_norm(p, [&](auto chunks, auto y, auto o) {
    auto kernel = add_layer_norm_backward_kernel<decltype(chunks)::value, decltype(y), decltype(o)>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(shared));
    kernel<<<blocks, kLnWarps * 32, shared, stream>>>(p, g);
  });
}

namespace {

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU
// several times over, no more.
unsigned elementwise_blocks(int64_t work) {
  const int64_t blocks = (work + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 132 * 32)));
}

bool aligned_pairs(RowType type, std::initializer_list<const void*> pointers) {
  const uintptr_t pair = type == RowType::kF32 ? 8 : 4;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % pair != 0) return false;
  return true;
}

// The forward (dout == nullptr: a = out) or the backward (a = dgate, b = dup).
cudaError_t swiglu_launch(RowType type, const void* gate, const void* up, const void* dout, void* a,
                          void* b, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool pairs = n % 2 == 0 && aligned_pairs(type, {gate, up, dout, a, b});
  const unsigned blocks = elementwise_blocks(pairs ? n / 2 : n);
  return dispatch(type, [&](auto zero) {
    using T = decltype(zero);
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kElementwiseThreads, 0, stream>>>(
          static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<const T*>(dout),
          static_cast<T*>(a), static_cast<T*>(b), n);
    };
    if (dout != nullptr)
      pairs ? launch(swiglu_kernel<T, true, true>) : launch(swiglu_kernel<T, false, true>);
    else
      pairs ? launch(swiglu_kernel<T, true, false>) : launch(swiglu_kernel<T, false, false>);
  });
}

}  // namespace

cudaError_t swiglu_forward(RowType type, const void* gate, const void* up, void* out, int64_t n,
                           cudaStream_t stream) {
  if (n < 0 || (n > 0 && (!gate || !up || !out))) return cudaErrorInvalidValue;
  return swiglu_launch(type, gate, up, nullptr, out, nullptr, n, stream);
}

cudaError_t swiglu_backward(RowType type, const void* gate, const void* up, const void* dout,
                            void* dgate, void* dup, int64_t n, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (!gate || !up || !dout || !dgate || !dup))) return cudaErrorInvalidValue;
  return swiglu_launch(type, gate, up, dout, dgate, dup, n, stream);
}

cudaError_t rotary(RowType type, RowsView x, RowsView y, const void* cos, const void* sin, int B,
                   int H, int N, int D, bool transpose, cudaStream_t stream) {
  if (B < 0 || H < 0 || N < 0 || D <= 0 || D % 2 != 0) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(B) * H * N;
  if (rows == 0) return cudaSuccess;
  if (!x.data || !y.data || !cos || !sin) return cudaErrorInvalidValue;
  // Element pairs (i, i + 1) need an even half and pair-aligned rows and tables.
  const bool pairs = (D / 2) % 2 == 0 && pair_rows(type, x) && pair_rows(type, y) &&
                     aligned_pairs(type, {cos, sin});
  const unsigned blocks = elementwise_blocks(rows * (pairs ? D / 4 : D / 2));
  return dispatch(type, [&](auto zero) {
    using T = decltype(zero);
    auto c = static_cast<const T*>(cos);
    auto s = static_cast<const T*>(sin);
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kElementwiseThreads, 0, stream>>>(x, y, c, s, rows, H, N, D);
    };
    if (transpose)
      pairs ? launch(rotary_kernel<T, true, true>) : launch(rotary_kernel<T, true, false>);
    else
      pairs ? launch(rotary_kernel<T, false, true>) : launch(rotary_kernel<T, false, false>);
  });
}

}  // namespace sparseflash::kernels
