// The local part of attention with sinks and a local window (local_band.h):
// forward with the merge into part A, and the two backward passes.
#include "attention/kernels/local_band.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <string>

#include "attention/kernels/convert.cuh"
#include "attention/kernels/refusal.h"

namespace sparseflash::kernels {

namespace {

constexpr int kRows = 64;     // queries per block (forward, dQ pass): local_query_blocks
constexpr int kChunk = 64;    // key slots per chunk; keys per block of the dK/dV pass
constexpr int kThreads = 256;
constexpr int kRowsPerWarp = 8;  // kRows / (kThreads / 32)
constexpr unsigned kFull = 0xffffffffu;

// Shared-memory row stride in floats: a multiple of 4 (float4 reads) whose
// word offset moves 4 banks per row, so a warp reading one row per lane with
// float4 loads hits every bank once per quarter-warp.
template <int D>
__host__ __device__ constexpr int row_stride() {
  return D + 4;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(kFull, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(kFull, x, off);
  return x;
}

template <int D>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma unroll
  for (int d = 0; d < D; d += 4) {
    const float4 x = *reinterpret_cast<const float4*>(a + d);
    const float4 y = *reinterpret_cast<const float4*>(b + d);
    s0 = fmaf(x.x, y.x, s0);
    s1 = fmaf(x.y, y.y, s1);
    s2 = fmaf(x.z, y.z, s2);
    s3 = fmaf(x.w, y.w, s3);
  }
  return (s0 + s1) + (s2 + s3);
}

// Register tiling: a warp owns kRowsPerWarp rows (queries, or keys in the dK/dV
// pass) and lane owns the two slots lane and lane + 32 of a chunk. One float4
// step over d reads the lane's two slot rows once and each owned row once (a
// broadcast), for 8 FMAs per owned row: a fifth of the shared-memory traffic of
// one dot product per (row, slot) pair, which made these kernels bound by
// shared-memory bandwidth (1.7 ms forward per layer at N = 32k on an H100).
// x[i][0..1] = <own[i], slot lane>, <own[i], slot lane + 32>; own rows at
// own_base + i * S, slot rows at slot_base + j * S.
template <int D>
__device__ __forceinline__ void tile_dots(const float* own_base, const float* slot_base, int lane,
                                          float (&x)[kRowsPerWarp][2]) {
  constexpr int S = row_stride<D>();
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) x[i][0] = x[i][1] = 0.f;
#pragma unroll 4
  for (int d = 0; d < D; d += 4) {
    const float4 a = *reinterpret_cast<const float4*>(slot_base + lane * S + d);
    const float4 b = *reinterpret_cast<const float4*>(slot_base + (lane + 32) * S + d);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float4 o = *reinterpret_cast<const float4*>(own_base + i * S + d);
      x[i][0] = fmaf(o.x, a.x, fmaf(o.y, a.y, fmaf(o.z, a.z, fmaf(o.w, a.w, x[i][0]))));
      x[i][1] = fmaf(o.x, b.x, fmaf(o.y, b.y, fmaf(o.z, b.z, fmaf(o.w, b.w, x[i][1]))));
    }
  }
}

// A warp's [64 slots][kRowsPerWarp] scratch of per-(slot, row) weights, read
// back as two float4 broadcasts per slot: w[j][i] for the warp's row i.
__device__ __forceinline__ void store_weights(float* w, int lane,
                                              const float (&x)[kRowsPerWarp][2]) {
  static_assert(kRowsPerWarp == 8, "two float4 per slot");
  float4* a = reinterpret_cast<float4*>(w + lane * kRowsPerWarp);
  float4* b = reinterpret_cast<float4*>(w + (lane + 32) * kRowsPerWarp);
  a[0] = make_float4(x[0][0], x[1][0], x[2][0], x[3][0]);
  a[1] = make_float4(x[4][0], x[5][0], x[6][0], x[7][0]);
  b[0] = make_float4(x[0][1], x[1][1], x[2][1], x[3][1]);
  b[1] = make_float4(x[4][1], x[5][1], x[6][1], x[7][1]);
}

// acc[i][cc] += sum over slots j in [lo, hi) of w[j][i] * rows[j * S + lane + 32 cc].
template <int D>
__device__ __forceinline__ void tile_accumulate(const float* w, const float* rows, int lo, int hi,
                                                int lane, float (&acc)[kRowsPerWarp][D / 32]) {
  constexpr int S = row_stride<D>();
  constexpr int C = D / 32;
#pragma unroll 2
  for (int j = lo; j < hi; ++j) {
    const float4 wa = *reinterpret_cast<const float4*>(w + j * kRowsPerWarp);
    const float4 wb = *reinterpret_cast<const float4*>(w + j * kRowsPerWarp + 4);
    const float wi[kRowsPerWarp] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
    for (int cc = 0; cc < C; ++cc) {
      const float r = rows[j * S + lane + 32 * cc];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) acc[i][cc] = fmaf(wi[i], r, acc[i][cc]);
    }
  }
}

// rows rows of one (batch, head) sequence into shared memory as float, row r
// taken from sequence row index[r] (zeros where index[r] < 0).
template <int D, typename T>
__device__ void load_rows(float* dst, const T* base, int64_t row_stride_elems, const int* index,
                          int rows) {
  constexpr int S = row_stride<D>();
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    const int row = index[r];
    dst[r * S + d] = row >= 0 ? to_float(base[row * row_stride_elems + d]) : 0.f;
  }
}

// The slots of query block blk: sink chunks first (slot t of sink chunk c is
// key c * kChunk + t), then window chunks over the key positions
// [p0 - window + 1, p0 + kRows - 1].
struct Slots {
  int p0;            // position of the block's first query
  int sink_chunks;
  int window_slots;  // kRows + window - 1, or 0 without a window
  int chunks;
};

__device__ __forceinline__ Slots slots_of(const LocalParams& p, int blk) {
  Slots s;
  s.p0 = blk * kRows + (p.Nk - p.Nq);
  s.sink_chunks = (p.sinks + kChunk - 1) / kChunk;
  s.window_slots = p.window > 0 ? kRows + p.window - 1 : 0;
  s.chunks = s.sink_chunks + (s.window_slots + kChunk - 1) / kChunk;
  return s;
}

// The key position slot t of chunk c holds, or -1. Window slots leave the
// sinks to the sink slots, so no key sits in two slots of one block.
__device__ __forceinline__ int slot_key(const LocalParams& p, const Slots& s, int c, int t) {
  if (c < s.sink_chunks) {
    const int kp = c * kChunk + t;
    return kp < p.sinks ? kp : -1;
  }
  const int w = (c - s.sink_chunks) * kChunk + t;
  if (w >= s.window_slots) return -1;
  const int kp = s.p0 - p.window + 1 + w;
  return kp >= p.sinks && kp < p.Nk ? kp : -1;
}

// The slots of chunk c that query row r of the block can use, [lo, hi)
// (warp-uniform loop bounds): a sink chunk's slots, or the row's window
// [r, r + window - 1] in window-slot coordinates.
struct SlotRange {
  int lo, hi;
};
__device__ __forceinline__ SlotRange row_slots(const LocalParams& p, const Slots& s, int c, int r) {
  if (c < s.sink_chunks) return {0, min(kChunk, p.sinks - c * kChunk)};
  const int w0 = (c - s.sink_chunks) * kChunk;
  return {max(0, r - w0), min(min(kChunk, s.window_slots - w0), r + p.window - w0)};
}

// Is (query at qpos, key at kpos) a pair of part B? qpos < 0 or kpos < 0: no
// query or key there.
__device__ __forceinline__ bool local_pair(const LocalParams& p, int qpos, int qbucket,
                                           bool qkeep, int kpos, int kbucket, bool kkeep,
                                           bool sink_slot) {
  if (kpos < 0 || qpos < 0 || kpos > qpos) return false;
  if (!sink_slot && qpos - kpos >= p.window) return false;
  if (p.q_bucket == nullptr && p.q_keep == nullptr) return true;  // no constraint: A holds nothing
  bool in_a = true;
  if (p.q_bucket != nullptr) in_a = qbucket == kbucket;
  if (p.q_keep != nullptr) in_a = in_a && qkeep && kkeep;
  return !in_a;
}

// Bucket and keep flag of row `row` of a side (0 and 1 when absent).
__device__ __forceinline__ int bucket_at(const int* bucket, int64_t seq, int n, int row) {
  return bucket != nullptr && row >= 0 ? bucket[seq * n + row] : 0;
}
__device__ __forceinline__ bool keep_at(const uint8_t* keep, int64_t seq, int n, int row) {
  return keep == nullptr || (row >= 0 && keep[seq * n + row] != 0);
}

// Loads the slot table of chunk c (positions, buckets, keep flags) and the
// chunk's keys and values.
template <int D, typename T>
__device__ void load_chunk(const LocalParams& p, const Slots& sl, int c, int64_t kseq,
                           const T* k, const T* v, float* Ks, float* Vs, int* kpos_s,
                           int* kbucket_s, int* kkeep_s) {
  if (threadIdx.x < kChunk) {
    const int kp = slot_key(p, sl, c, threadIdx.x);
    kpos_s[threadIdx.x] = kp;
    kbucket_s[threadIdx.x] = bucket_at(p.k_bucket, kseq, p.Nk, kp);
    kkeep_s[threadIdx.x] = keep_at(p.k_keep, kseq, p.Nk, kp);
  }
  __syncthreads();
  load_rows<D>(Ks, k, p.k_layout.n, kpos_s, kChunk);
  load_rows<D>(Vs, v, p.v_layout.n, kpos_s, kChunk);
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Forward: online softmax over the block's slots, then the merge with part A.

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) local_forward_kernel(const LocalForwardParams fp) {
  const LocalParams& p = fp.p;
  constexpr int S = row_stride<D>();
  constexpr int C = D / 32;  // output columns per lane: lane + 32 * cc
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qseq = int64_t(b) * p.H + h, kseq = int64_t(b) * p.Hkv + hk;
  const int offset = p.Nk - p.Nq;

  extern __shared__ float4 smem_f4[];
  float* Qs = reinterpret_cast<float*>(smem_f4);
  float* Ks = Qs + kRows * S;
  float* Vs = Ks + kChunk * S;
  int* kpos_s = reinterpret_cast<int*>(Vs + kChunk * S);
  int* kbucket_s = kpos_s + kChunk;
  int* kkeep_s = kbucket_s + kChunk;
  __shared__ int qidx_s[kRows];

  const Slots sl = slots_of(p, blk);
  const int q0 = blk * kRows;
  const T* q = static_cast<const T*>(p.q) + b * p.q_layout.b + h * p.q_layout.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_layout.b + hk * p.k_layout.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_layout.b + hk * p.v_layout.h;
  for (int i = threadIdx.x; i < kRows; i += kThreads) qidx_s[i] = q0 + i < p.Nq ? q0 + i : -1;
  __syncthreads();
  load_rows<D>(Qs, q, p.q_layout.n, qidx_s, kRows);

  int qpos[kRowsPerWarp], qbucket[kRowsPerWarp];
  bool qkeep[kRowsPerWarp];
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][C];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int qi = qidx_s[warp * kRowsPerWarp + i];
    qpos[i] = qi >= 0 ? qi + offset : -1;
    qbucket[i] = bucket_at(p.q_bucket, qseq, p.Nq, qi);
    qkeep[i] = keep_at(p.q_keep, qseq, p.Nq, qi);
    m[i] = -INFINITY;
    l[i] = 0;
#pragma unroll
    for (int cc = 0; cc < C; ++cc) acc[i][cc] = 0;
  }

  float* Ws = reinterpret_cast<float*>(kkeep_s + kChunk) + warp * kChunk * kRowsPerWarp;
  const int r0 = warp * kRowsPerWarp;
  for (int c = 0; c < sl.chunks; ++c) {
    const bool sink = c < sl.sink_chunks;
    __syncthreads();  // the previous chunk is read
    load_chunk<D>(p, sl, c, kseq, k, v, Ks, Vs, kpos_s, kbucket_s, kkeep_s);
    const int kp0 = kpos_s[lane], kp1 = kpos_s[lane + 32];
    const int kb0 = kbucket_s[lane], kb1 = kbucket_s[lane + 32];
    const bool kk0 = kkeep_s[lane], kk1 = kkeep_s[lane + 32];
    bool ok[kRowsPerWarp][2];
    bool any = false;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      ok[i][0] = local_pair(p, qpos[i], qbucket[i], qkeep[i], kp0, kb0, kk0, sink);
      ok[i][1] = local_pair(p, qpos[i], qbucket[i], qkeep[i], kp1, kb1, kk1, sink);
      any = any || ok[i][0] || ok[i][1];
    }
    if (!__any_sync(kFull, any)) continue;
    float x[kRowsPerWarp][2];
    tile_dots<D>(Qs + r0 * S, Ks, lane, x);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float s0 = ok[i][0] ? x[i][0] * p.scale : -INFINITY;
      const float s1 = ok[i][1] ? x[i][1] * p.scale : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(fmaxf(s0, s1)));
      // Rows with no pair yet keep m = -inf and weights 0.
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float correction = __expf(m[i] - base);  // 0 while m is -inf
      x[i][0] = ok[i][0] ? __expf(s0 - base) : 0.f;
      x[i][1] = ok[i][1] ? __expf(s1 - base) : 0.f;
      l[i] = l[i] * correction + warp_sum(x[i][0] + x[i][1]);
      m[i] = m_new;
#pragma unroll
      for (int cc = 0; cc < C; ++cc) acc[i][cc] *= correction;
    }
    store_weights(Ws, lane, x);
    __syncwarp();
    // The slots any of the warp's rows can use (lo grows, hi grows with the row).
    const int lo = row_slots(p, sl, c, r0).lo;
    const int hi = row_slots(p, sl, c, r0 + kRowsPerWarp - 1).hi;
    tile_accumulate<D>(Ws, Vs, lo, hi, lane, acc);
    __syncwarp();  // Ws is read before the next chunk's weights
  }

  // out = (out_a e^(lse_a - M) + acc e^(m - M)) / (e^(lse_a - M) + l e^(m - M)).
  const T* out_a = static_cast<const T*>(fp.out_a) + b * fp.out_a_layout.b + h * fp.out_a_layout.h;
  T* out = static_cast<T*>(fp.out) + b * fp.out_layout.b + h * fp.out_layout.h;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int qi = qidx_s[warp * kRowsPerWarp + i];
    if (qi < 0) continue;
    const float lse_a = fp.lse_a[qseq * p.Nq + qi];
    const float lse_b = l[i] > 0 ? m[i] + logf(l[i]) : -INFINITY;
    const float M = fmaxf(lse_a, lse_b);
    float wa = 0, wb = 0, denom = 0;
    if (M != -INFINITY) {
      wa = expf(lse_a - M);
      wb = l[i] > 0 ? expf(m[i] - M) : 0.f;
      denom = wa + l[i] * wb;
    }
#pragma unroll
    for (int cc = 0; cc < C; ++cc) {
      const int d = lane + 32 * cc;
      float o = 0;
      if (denom > 0) o = (to_float(out_a[qi * fp.out_a_layout.n + d]) * wa + acc[i][cc] * wb) / denom;
      out[qi * fp.out_layout.n + d] = from_float<T>(o);
    }
    if (lane == 0) fp.lse[qseq * p.Nq + qi] = denom > 0 ? M + logf(denom) : -INFINITY;
  }
}

// ---------------------------------------------------------------------------
// Backward, pass 1 (per query block): delta = rowsum(dO * O), dQ over the
// block's slots, and the sink keys' dK, dV summed over the block's rows and
// added with atomics.

template <int D, typename T>
// D = 64: two blocks per SM (smem 103 KB each; registers capped at 128).
__global__ void __launch_bounds__(kThreads, D == 64 ? 2 : 1)
    local_backward_dq_kernel(const LocalBackwardParams bp) {
  const LocalParams& p = bp.p;
  constexpr int S = row_stride<D>();
  constexpr int C = D / 32;
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qseq = int64_t(b) * p.H + h, kseq = int64_t(b) * p.Hkv + hk;
  const int offset = p.Nk - p.Nq;

  extern __shared__ float4 smem_f4[];
  float* Qs = reinterpret_cast<float*>(smem_f4);
  float* dOs = Qs + kRows * S;
  float* Ks = dOs + kRows * S;
  float* Vs = Ks + kChunk * S;
  int* kpos_s = reinterpret_cast<int*>(Vs + kChunk * S);
  int* kbucket_s = kpos_s + kChunk;
  int* kkeep_s = kbucket_s + kChunk;
  __shared__ int qidx_s[kRows];

  const Slots sl = slots_of(p, blk);
  const int q0 = blk * kRows;
  const T* q = static_cast<const T*>(p.q) + b * p.q_layout.b + h * p.q_layout.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_layout.b + hk * p.k_layout.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_layout.b + hk * p.v_layout.h;
  const T* dout = static_cast<const T*>(bp.dout) + b * bp.dout_layout.b + h * bp.dout_layout.h;
  const T* out = static_cast<const T*>(bp.out) + b * bp.out_layout.b + h * bp.out_layout.h;
  for (int i = threadIdx.x; i < kRows; i += kThreads) qidx_s[i] = q0 + i < p.Nq ? q0 + i : -1;
  __syncthreads();
  load_rows<D>(Qs, q, p.q_layout.n, qidx_s, kRows);
  load_rows<D>(dOs, dout, bp.dout_layout.n, qidx_s, kRows);
  __syncthreads();

  int qpos[kRowsPerWarp], qbucket[kRowsPerWarp];
  bool qkeep[kRowsPerWarp];
  float lse[kRowsPerWarp], delta[kRowsPerWarp], dq[kRowsPerWarp][C];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    const int qi = qidx_s[r];
    qpos[i] = qi >= 0 ? qi + offset : -1;
    qbucket[i] = bucket_at(p.q_bucket, qseq, p.Nq, qi);
    qkeep[i] = keep_at(p.q_keep, qseq, p.Nq, qi);
    lse[i] = qi >= 0 ? bp.lse[qseq * p.Nq + qi] : 0.f;
    float part = 0;
    if (qi >= 0) {
#pragma unroll
      for (int cc = 0; cc < C; ++cc) {
        const int d = lane + 32 * cc;
        part += dOs[r * S + d] * to_float(out[qi * bp.out_layout.n + d]);
      }
    }
    delta[i] = warp_sum(part);
    if (qi >= 0 && lane == 0) bp.delta[qseq * p.Nq + qi] = delta[i];
#pragma unroll
    for (int cc = 0; cc < C; ++cc) dq[i][cc] = 0;
  }

  // Per warp: dS, then P (sink chunks), as [slot][the warp's 8 rows].
  float* const Wall = reinterpret_cast<float*>(kkeep_s + kChunk);
  constexpr int kWarpWeights = 2 * kChunk * kRowsPerWarp;
  float* Ws = Wall + warp * kWarpWeights;
  float* Wp = Ws + kChunk * kRowsPerWarp;
  const int r0 = warp * kRowsPerWarp;
  for (int c = 0; c < sl.chunks; ++c) {
    const bool sink = c < sl.sink_chunks;
    __syncthreads();  // the previous chunk's weights are read
    load_chunk<D>(p, sl, c, kseq, k, v, Ks, Vs, kpos_s, kbucket_s, kkeep_s);
    const int kp0 = kpos_s[lane], kp1 = kpos_s[lane + 32];
    const int kb0 = kbucket_s[lane], kb1 = kbucket_s[lane + 32];
    const bool kk0 = kkeep_s[lane], kk1 = kkeep_s[lane + 32];
    bool ok[kRowsPerWarp][2];
    bool any = false;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      ok[i][0] = local_pair(p, qpos[i], qbucket[i], qkeep[i], kp0, kb0, kk0, sink);
      ok[i][1] = local_pair(p, qpos[i], qbucket[i], qkeep[i], kp1, kb1, kk1, sink);
      any = any || ok[i][0] || ok[i][1];
    }
    float pr[kRowsPerWarp][2], ds[kRowsPerWarp][2];
    const bool active = __any_sync(kFull, any);
    if (active) {
      tile_dots<D>(Qs + r0 * S, Ks, lane, pr);   // Q K^T
      tile_dots<D>(dOs + r0 * S, Vs, lane, ds);  // dO V^T
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          pr[i][t] = ok[i][t] ? __expf(pr[i][t] * p.scale - lse[i]) : 0.f;
          ds[i][t] = ok[i][t] ? pr[i][t] * (ds[i][t] - delta[i]) * p.scale : 0.f;
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) pr[i][0] = pr[i][1] = ds[i][0] = ds[i][1] = 0.f;
    }
    if (active || sink) {
      store_weights(Ws, lane, ds);
      if (sink) store_weights(Wp, lane, pr);
      __syncwarp();
    }
    if (active) {
      const int lo = row_slots(p, sl, c, r0).lo;
      const int hi = row_slots(p, sl, c, r0 + kRowsPerWarp - 1).hi;
      tile_accumulate<D>(Ws, Ks, lo, hi, lane, dq);  // dQ += dS K
    }
    if (sink) {
      __syncthreads();
      // dK[j] = sum_r dS[r][j] Q[r], dV[j] = sum_r P[r][j] dO[r] (row r is row
      // r % 8 of warp r / 8's weights); a warp shares j, so the weight reads
      // are broadcasts.
      for (int idx = threadIdx.x; idx < kChunk * D; idx += kThreads) {
        const int j = idx / D, d = idx % D;
        const int kp = kpos_s[j];
        if (kp < 0) continue;
        float gk = 0, gv = 0;
#pragma unroll 8
        for (int r = 0; r < kRows; ++r) {
          const float* w = Wall + (r / kRowsPerWarp) * kWarpWeights + j * kRowsPerWarp + r % kRowsPerWarp;
          gk = fmaf(w[0], Qs[r * S + d], gk);
          gv = fmaf(w[kChunk * kRowsPerWarp], dOs[r * S + d], gv);
        }
        if (bp.sink_dk != nullptr) {
          const int64_t at = ((qseq * gridDim.x + blk) * p.sinks + kp) * D + d;
          bp.sink_dk[at] = gk;
          bp.sink_dv[at] = gv;
        } else {
          const int64_t at = (kseq * p.Nk + kp) * D + d;
          if (gk != 0) atomicAdd(bp.dk + at, gk);
          if (gv != 0) atomicAdd(bp.dv + at, gv);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int qi = qidx_s[warp * kRowsPerWarp + i];
    if (qi < 0) continue;
#pragma unroll
    for (int cc = 0; cc < C; ++cc) bp.dq[(qseq * p.Nq + qi) * D + lane + 32 * cc] = dq[i][cc];
  }
}

// ---------------------------------------------------------------------------
// Backward, pass 2 (per block of kChunk window keys, all query heads of its
// key head): dK, dV of keys at positions >= sinks from the queries up to
// window - 1 positions after them. Each key is written by one block.

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) local_backward_dkdv_kernel(const LocalBackwardParams bp) {
  const LocalParams& p = bp.p;
  constexpr int S = row_stride<D>();
  constexpr int C = D / 32;
  const int kblk = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int G = p.H / p.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t kseq = int64_t(b) * p.Hkv + hk;
  const int offset = p.Nk - p.Nq;

  extern __shared__ float4 smem_f4[];
  float* Ks = reinterpret_cast<float*>(smem_f4);
  float* Vs = Ks + kChunk * S;
  float* Qs = Vs + kChunk * S;
  float* dOs = Qs + kRows * S;
  __shared__ int kidx_s[kChunk], qidx_s[kRows], qbucket_s[kRows], qkeep_s[kRows];
  __shared__ float lse_s[kRows], delta_s[kRows];

  const int k0 = kblk * kChunk;
  const T* k = static_cast<const T*>(p.k) + b * p.k_layout.b + hk * p.k_layout.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_layout.b + hk * p.v_layout.h;
  for (int i = threadIdx.x; i < kChunk; i += kThreads) {
    const int kp = k0 + i;
    kidx_s[i] = kp >= p.sinks && kp < p.Nk ? kp : -1;
  }
  __syncthreads();
  load_rows<D>(Ks, k, p.k_layout.n, kidx_s, kChunk);
  load_rows<D>(Vs, v, p.v_layout.n, kidx_s, kChunk);

  int kpos[kRowsPerWarp], kbucket[kRowsPerWarp];
  bool kkeep[kRowsPerWarp];
  float dk[kRowsPerWarp][C], dv[kRowsPerWarp][C];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    kpos[i] = kidx_s[warp * kRowsPerWarp + i];
    kbucket[i] = bucket_at(p.k_bucket, kseq, p.Nk, kpos[i]);
    kkeep[i] = keep_at(p.k_keep, kseq, p.Nk, kpos[i]);
#pragma unroll
    for (int cc = 0; cc < C; ++cc) dk[i][cc] = dv[i][cc] = 0;
  }

  float* Wp = dOs + kRows * S + warp * 2 * kRows * kRowsPerWarp;  // [64 queries][8 keys]
  float* Wd = Wp + kRows * kRowsPerWarp;
  const int c0 = warp * kRowsPerWarp;  // the warp's first key of the block
  // The queries that can see these keys through the window.
  const int qpos_lo = max(max(k0, offset), p.sinks);
  const int qpos_hi = min(k0 + kChunk - 1 + p.window - 1, p.Nk - 1);
  for (int g = 0; g < G; ++g) {
    const int h = hk * G + g;
    const int64_t qseq = int64_t(b) * p.H + h;
    const T* q = static_cast<const T*>(p.q) + b * p.q_layout.b + h * p.q_layout.h;
    const T* dout = static_cast<const T*>(bp.dout) + b * bp.dout_layout.b + h * bp.dout_layout.h;
    for (int first = qpos_lo; first <= qpos_hi; first += kRows) {
      __syncthreads();  // the previous queries are read
      if (threadIdx.x < kRows) {
        const int qp = first + threadIdx.x;
        const int qi = qp <= qpos_hi ? qp - offset : -1;
        qidx_s[threadIdx.x] = qi;
        qbucket_s[threadIdx.x] = bucket_at(p.q_bucket, qseq, p.Nq, qi);
        qkeep_s[threadIdx.x] = keep_at(p.q_keep, qseq, p.Nq, qi);
        lse_s[threadIdx.x] = qi >= 0 ? bp.lse[qseq * p.Nq + qi] : 0.f;
        delta_s[threadIdx.x] = qi >= 0 ? bp.delta[qseq * p.Nq + qi] : 0.f;
      }
      __syncthreads();
      load_rows<D>(Qs, q, p.q_layout.n, qidx_s, kRows);
      load_rows<D>(dOs, dout, bp.dout_layout.n, qidx_s, kRows);
      __syncthreads();
      const int qi0 = qidx_s[lane], qi1 = qidx_s[lane + 32];
      const int qp0 = qi0 >= 0 ? qi0 + offset : -1, qp1 = qi1 >= 0 ? qi1 + offset : -1;
      const int qb0 = qbucket_s[lane], qb1 = qbucket_s[lane + 32];
      const bool qk0 = qkeep_s[lane], qk1 = qkeep_s[lane + 32];
      bool ok[kRowsPerWarp][2];
      bool any = false;
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        ok[i][0] = local_pair(p, qp0, qb0, qk0, kpos[i], kbucket[i], kkeep[i], false);
        ok[i][1] = local_pair(p, qp1, qb1, qk1, kpos[i], kbucket[i], kkeep[i], false);
        any = any || ok[i][0] || ok[i][1];
      }
      if (!__any_sync(kFull, any)) continue;
      // Here the warp's rows are keys and the slots are the 64 queries.
      float pr[kRowsPerWarp][2], ds[kRowsPerWarp][2];
      tile_dots<D>(Ks + c0 * S, Qs, lane, pr);   // (Q K^T)^T
      tile_dots<D>(Vs + c0 * S, dOs, lane, ds);  // (dO V^T)^T
      const float lse0 = lse_s[lane], lse1 = lse_s[lane + 32];
      const float delta0 = delta_s[lane], delta1 = delta_s[lane + 32];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        pr[i][0] = ok[i][0] ? __expf(pr[i][0] * p.scale - lse0) : 0.f;
        pr[i][1] = ok[i][1] ? __expf(pr[i][1] * p.scale - lse1) : 0.f;
        ds[i][0] = ok[i][0] ? pr[i][0] * (ds[i][0] - delta0) * p.scale : 0.f;
        ds[i][1] = ok[i][1] ? pr[i][1] * (ds[i][1] - delta1) * p.scale : 0.f;
      }
      store_weights(Wp, lane, pr);
      store_weights(Wd, lane, ds);
      __syncwarp();
      // The queries that see one of the warp's keys: positions [kpos, kpos + window - 1]
      // of its first to its last key.
      const int lo = max(0, k0 + c0 - first);
      const int hi = min(kRows, k0 + c0 + kRowsPerWarp - 1 - first + p.window);
      tile_accumulate<D>(Wp, dOs, lo, hi, lane, dv);  // dV += P^T dO
      tile_accumulate<D>(Wd, Qs, lo, hi, lane, dk);   // dK += dS^T Q
      __syncwarp();
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    if (kpos[i] < 0) continue;
#pragma unroll
    for (int cc = 0; cc < C; ++cc) {
      const int64_t at = (kseq * p.Nk + kpos[i]) * D + lane + 32 * cc;
      bp.dk[at] = dk[i][cc];
      bp.dv[at] = dv[i][cc];
    }
  }
}

// ---------------------------------------------------------------------------
// Launchers.

// Why the parameters are refused ("" when they are fine).
std::string problem(const LocalParams& p) {
  if (!local_head_dim_supported(p.D)) return detail::arg("D", p.D) + ", expected 64 or 128";
  if (p.B <= 0 || p.H <= 0 || p.Hkv <= 0 || p.B > 65535 || p.H > 65535)
    return detail::arg("B", p.B) + ", " + detail::arg("H", p.H) + ", " + detail::arg("Hkv", p.Hkv) +
           ": each must be in 1..65535";
  if (p.H % p.Hkv != 0) return detail::arg("Hkv", p.Hkv) + " does not divide " + detail::arg("H", p.H);
  if (p.Nq < 0 || p.Nq > p.Nk)
    return detail::arg("Nq", p.Nq) + ", expected 0.." + std::to_string(p.Nk) + " (Nk)";
  if (p.sinks < 0 || p.sinks > p.Nk)
    return detail::arg("sinks", p.sinks) + ", expected 0.." + std::to_string(p.Nk) + " (Nk)";
  if (p.window < 0) return detail::arg("window", p.window) + ", must be >= 0";
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr) return "q, k or v is missing";
  if ((p.q_bucket == nullptr) != (p.k_bucket == nullptr))
    return "q_bucket and k_bucket: give both or neither";
  if ((p.q_keep == nullptr) != (p.k_keep == nullptr)) return "q_keep and k_keep: give both or neither";
  return "";
}

template <int D>
constexpr size_t forward_smem() {
  return (kRows + 2 * kChunk) * row_stride<D>() * sizeof(float) + 3 * kChunk * sizeof(int) +
         kRows * kChunk * sizeof(float);  // the warps' weights (tile_accumulate)
}
template <int D>
constexpr size_t dq_smem() {
  return ((2 * kRows + 2 * kChunk) * row_stride<D>() + 2 * kRows * kChunk) * sizeof(float) +
         3 * kChunk * sizeof(int);  // 2 kRows kChunk: the warps' dS and P weights
}
template <int D>
constexpr size_t dkdv_smem() {
  return ((2 * kRows + 2 * kChunk) * row_stride<D>() + 2 * kRows * kChunk) * sizeof(float);
}

template <typename Params>
cudaError_t run(void (*kernel)(const Params), dim3 grid, size_t smem, const Params& params,
                cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  kernel<<<grid, kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

template <int D, typename T>
cudaError_t forward_for(const LocalForwardParams& fp, cudaStream_t stream) {
  const LocalParams& p = fp.p;
  dim3 grid((p.Nq + kRows - 1) / kRows, p.H, p.B);
  return run(local_forward_kernel<D, T>, grid, forward_smem<D>(), fp, stream);
}

template <int D, typename T>
cudaError_t backward_for(const LocalBackwardParams& bp, cudaStream_t stream) {
  const LocalParams& p = bp.p;
  const size_t row_bytes = size_t(D) * sizeof(float);
  const size_t seq_bytes = size_t(p.Nk) * row_bytes;
  // dK, dV: the sink rows are sums of atomics (zero them); without a window
  // no pass writes the other rows (zero all).
  const size_t zero_rows = p.window > 0 ? p.sinks : p.Nk;
  if (zero_rows > 0) {
    for (float* g : {bp.dk, bp.dv}) {
      cudaError_t e = cudaMemset2DAsync(g, seq_bytes, 0, zero_rows * row_bytes,
                                        size_t(p.B) * p.Hkv, stream);
      if (e != cudaSuccess) return e;
    }
  }
  dim3 grid((p.Nq + kRows - 1) / kRows, p.H, p.B);
  cudaError_t e = run(local_backward_dq_kernel<D, T>, grid, dq_smem<D>(), bp, stream);
  if (e != cudaSuccess || p.window == 0) return e;
  dim3 kgrid((p.Nk + kChunk - 1) / kChunk, p.Hkv, p.B);
  return run(local_backward_dkdv_kernel<D, T>, kgrid, dkdv_smem<D>(), bp, stream);
}

}  // namespace

bool local_head_dim_supported(int D) { return D == 64 || D == 128; }

cudaError_t local_forward(const LocalForwardParams& fp, cudaStream_t stream) {
  detail::clear_refusal();
  if (std::string why = problem(fp.p); !why.empty()) return detail::refuse("local_forward: " + why);
  if (fp.out_a == nullptr || fp.lse_a == nullptr || fp.out == nullptr || fp.lse == nullptr)
    return detail::refuse("local_forward: out_a, lse_a, out or lse is missing");
  if (fp.p.Nq == 0) return cudaSuccess;
  const bool bf16 = fp.p.dtype == DType::kBF16;
  if (fp.p.D == 64)
    return bf16 ? forward_for<64, __nv_bfloat16>(fp, stream) : forward_for<64, __half>(fp, stream);
  return bf16 ? forward_for<128, __nv_bfloat16>(fp, stream) : forward_for<128, __half>(fp, stream);
}

cudaError_t local_backward(const LocalBackwardParams& bp, cudaStream_t stream) {
  detail::clear_refusal();
  if (std::string why = problem(bp.p); !why.empty()) return detail::refuse("local_backward: " + why);
  if (bp.out == nullptr || bp.lse == nullptr || bp.dout == nullptr || bp.delta == nullptr ||
      bp.dq == nullptr || bp.dk == nullptr || bp.dv == nullptr)
    return detail::refuse("local_backward: out, lse, dout, delta, dq, dk or dv is missing");
  if ((bp.sink_dk == nullptr) != (bp.sink_dv == nullptr))
    return detail::refuse("local_backward: sink_dk and sink_dv: give both or neither");
  const bool bf16 = bp.p.dtype == DType::kBF16;
  if (bp.p.Nq == 0) {
    // No query: every key gradient is zero.
    const size_t bytes = size_t(bp.p.B) * bp.p.Hkv * bp.p.Nk * bp.p.D * sizeof(float);
    cudaError_t e = cudaMemsetAsync(bp.dk, 0, bytes, stream);
    return e != cudaSuccess ? e : cudaMemsetAsync(bp.dv, 0, bytes, stream);
  }
  if (bp.p.D == 64)
    return bf16 ? backward_for<64, __nv_bfloat16>(bp, stream) : backward_for<64, __half>(bp, stream);
  return bf16 ? backward_for<128, __nv_bfloat16>(bp, stream)
              : backward_for<128, __half>(bp, stream);
}

}  // namespace sparseflash::kernels
