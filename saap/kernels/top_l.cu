// Top-l selection by radix select: one CTA per row. Scores map to unsigned
// keys whose order is the scores' order; four passes over the row, 8 bits
// each from the top, narrow down the exact key of the l-th largest score (a
// shared-memory histogram per pass; warp 0 finds the bin holding the l-th).
// A last pass writes, in id order, every id whose key is above that
// threshold and the first ones equal to it (block-wide ballot counts keep
// the order without atomics on the output).
#include "saap/kernels/top_l.h"

#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

namespace sparseflash::saap::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename S>
__device__ __forceinline__ float score_at(const S* x, int j);
template <>
__device__ __forceinline__ float score_at<float>(const float* x, int j) {
  return __ldg(x + j);
}
template <>
__device__ __forceinline__ float score_at<__nv_bfloat16>(const __nv_bfloat16* x, int j) {
  return __bfloat162float(x[j]);
}

// Larger score -> larger key (negative floats: all bits flipped).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Threads before this one (in thread order) with `flag` set, and the CTA's
// total. Every thread of the CTA must call it.
__device__ int count_before(bool flag, int* total, int* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) s_warp[warp] = __popc(ballot);
  __syncthreads();
  int before = __popc(ballot & ((1u << lane) - 1u)), sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += s_warp[w];
    sum += s_warp[w];
  }
  __syncthreads();  // s_warp is reused by the next call
  *total = sum;
  return before;
}

template <typename S>
__global__ void __launch_bounds__(kThreads) top_l_kernel(const __grid_constant__ TopLParams p) {
  __shared__ int hist[256];
  __shared__ int s_warp[kWarps];
  __shared__ int s_digit, s_above;
  const int C = p.num_partitions;
  const int row = blockIdx.x, o = row / p.inner, i = row % p.inner;
  const S* x = static_cast<const S*>(p.scores) + static_cast<int64_t>(row) * C;
  int32_t* out = p.out + (p.transpose ? static_cast<int64_t>(i) * p.outer + o : row) * static_cast<int64_t>(p.top_l);

  uint32_t prefix = 0, mask = 0;
  int remaining = p.top_l;  // still to choose among the keys that match prefix on mask
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int t = threadIdx.x; t < 256; t += kThreads) hist[t] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < C; j += kThreads) {
      const uint32_t k = order_key(score_at(x, j));
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane t owns bins 255 - 8t down to 248 - 8t: counts from the top.
      const int lane = threadIdx.x;
      int c[8], sum = 0;
#pragma unroll
      for (int q = 0; q < 8; ++q) sum += (c[q] = hist[255 - 8 * lane - q]);
      int incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      int cum = incl - sum;
      if (cum < remaining && remaining <= incl) {
        for (int q = 0; q < 8; ++q) {
          if (cum + c[q] >= remaining) {
            s_digit = 255 - 8 * lane - q;
            s_above = cum;
            break;
          }
          cum += c[q];
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(s_digit) << shift;
    mask |= 255u << shift;
    remaining -= s_above;
    __syncthreads();  // s_digit / s_above are written again next pass
  }

  // prefix is now the l-th largest key: take every key above it and the
  // first `remaining` keys equal to it.
  int ties_seen = 0, written = 0;
  for (int base = 0; base < C; base += kThreads) {
    const int j = base + threadIdx.x;
    const uint32_t k = j < C ? order_key(score_at(x, j)) : 0u;
    const bool above = j < C && k > prefix, tie = j < C && k == prefix;
    int ties = 0, taken = 0;
    const int tie_rank = count_before(tie, &ties, s_warp);
    const bool take = above || (tie && ties_seen + tie_rank < remaining);
    const int rank = count_before(take, &taken, s_warp);
    if (take) out[written + rank] = j;
    ties_seen += ties;
    written += taken;
  }
}

[[noreturn]] void invalid(const std::string& field, const std::string& what) {
  throw std::invalid_argument("launch_top_l: TopLParams." + field + " " + what);
}

}  // namespace

void launch_top_l(const TopLParams& p) {
  if (p.dtype != ScoreType::kFloat32 && p.dtype != ScoreType::kBF16) invalid("dtype", "is not kFloat32 or kBF16");
  if (p.outer <= 0) invalid("outer", "must be positive, got " + std::to_string(p.outer));
  if (p.inner <= 0) invalid("inner", "must be positive, got " + std::to_string(p.inner));
  if (static_cast<int64_t>(p.outer) * p.inner > 0x7fffffff)
    invalid("outer", "* inner must be below 2^31 (one CTA per row)");
  if (p.num_partitions <= 0) invalid("num_partitions", "must be positive, got " + std::to_string(p.num_partitions));
  if (p.top_l < 1 || p.top_l > p.num_partitions)
    invalid("top_l", "must be in [1, num_partitions = " + std::to_string(p.num_partitions) + "], got " +
                         std::to_string(p.top_l));
  if (p.scores == nullptr) invalid("scores", "is null");
  const size_t elem = p.dtype == ScoreType::kFloat32 ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(p.scores) % elem != 0) invalid("scores", "is not aligned to its element size");
  if (p.out == nullptr) invalid("out", "is null");
  if (reinterpret_cast<uintptr_t>(p.out) % alignof(int32_t) != 0) invalid("out", "is not 4-byte aligned");
  const unsigned rows = static_cast<unsigned>(p.outer) * static_cast<unsigned>(p.inner);
  if (p.dtype == ScoreType::kFloat32) top_l_kernel<float><<<rows, kThreads, 0, p.stream>>>(p);
  else top_l_kernel<__nv_bfloat16><<<rows, kThreads, 0, p.stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("launch_top_l: kernel launch failed: ") + cudaGetErrorString(e));
}

}  // namespace sparseflash::saap::kernels
