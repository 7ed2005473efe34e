// Sparse causal flash attention kernels (FlashAttention-2 style, mma.sync):
// packing (bucket sort, tile ranges), forward, and a deterministic backward
// (dK/dV per key tile, dQ per query tile). See sparse_flash.h for semantics.
//
// Reading order: packing kernels, the tile loop shared by all passes
// (masking, skipping), forward, backward (delta, dK/dV, dQ), launchers.
// todo: cp.async double buffering, wgmma/TMA on sm_90a, a tighter key-tile
// range than "scan all tiles and skip", fp32-atomic dQ as a faster option.
#include "attention/kernels/sparse_flash.h"

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "attention/kernels/mma.cuh"

namespace sparseflash::kernels {

namespace {

constexpr int kThreads = 128;  // 4 warps, 16 rows each
constexpr int kRows = kTileRows;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kInvalidQueryBucket = -1;  // padding rows match nothing
constexpr int kInvalidKeyBucket = -2;

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

// ---------------------------------------------------------------------------
// packing

__global__ void fill_sort_inputs(int* iota, int* offsets, int rows, int n) {
  const int64_t total = static_cast<int64_t>(rows) * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x)
    iota[i] = static_cast<int>(i % n);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i <= rows; i += gridDim.x * blockDim.x)
    offsets[i] = i * n;
}

__global__ void tile_ranges_kernel(const int* perm, const int* bucket, int rows, int n,
                                   int offset, TileRange* tiles) {
  const int nt = num_tiles(n);
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * nt) return;
  const int row = idx / nt, tile = idx % nt;
  const int64_t base = static_cast<int64_t>(row) * n;
  TileRange r{INT_MAX, INT_MIN, INT_MAX, INT_MIN};
  for (int i = tile * kRows; i < min(n, (tile + 1) * kRows); ++i) {
    const int b = bucket ? bucket[base + i] : 0;
    const int pos = (perm ? perm[base + i] : i) + offset;
    r.x = min(r.x, b);
    r.y = max(r.y, b);
    r.z = min(r.z, pos);
    r.w = max(r.w, pos);
  }
  tiles[idx] = r;
}

// ---------------------------------------------------------------------------
// shared pieces of the passes

// Can a query tile and a key tile hold an allowed pair?
__device__ __forceinline__ bool tiles_meet(const TileRange& q, const TileRange& k) {
  return k.x <= q.y && k.y >= q.x && k.z <= q.w;
}

// Is every pair of the two (complete) tiles allowed? Then no mask is needed.
__device__ __forceinline__ bool tiles_all_allowed(const TileRange& q, const TileRange& k) {
  return q.x == q.y && k.x == k.y && q.x == k.x && k.w <= q.z;
}

// Per-row metadata of a packed row: original index, position, bucket.
struct RowInfo {
  int orig, pos, bucket;
};

__device__ __forceinline__ RowInfo row_info(const Packing& pk, int64_t row_base, int packed, int n,
                                            int offset, int invalid_bucket) {
  if (packed >= n) return {0, invalid_bucket == kInvalidKeyBucket ? INT_MAX : INT_MIN, invalid_bucket};
  const int orig = pk.perm ? pk.perm[row_base + packed] : packed;
  const int bucket = pk.bucket ? pk.bucket[row_base + packed] : 0;
  return {orig, orig + offset, bucket};
}

// S (16 x 64 per warp) = A_rows(16 x D, from fragments) * B_tile^T (64 rows x D in smem).
template <typename T, int D>
__device__ __forceinline__ void gemm_rows_tile_t(float (&s)[8][4], const uint32_t (&a)[D / 16][4],
                                                 SmemTile<T, D> b_tile, int lane) {
#pragma unroll
  for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nb2 = 0; nb2 < 4; ++nb2) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile.at(nb2 * 16 + (lane % 8) + (lane / 16) * 8, kk * 16 + ((lane / 8) % 2) * 8));
      mma_16816<T>(s[2 * nb2], a[kk], b[0], b[1]);
      mma_16816<T>(s[2 * nb2 + 1], a[kk], b[2], b[3]);
    }
  }
}

// Same, with A read from a smem tile (rows a_row0 .. a_row0 + 15).
template <typename T, int D>
__device__ __forceinline__ void gemm_smem_rows_tile_t(float (&s)[8][4], SmemTile<T, D> a_tile,
                                                      int a_row0, SmemTile<T, D> b_tile, int lane) {
#pragma unroll
  for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_tile.at(a_row0 + (lane % 8) + ((lane / 8) % 2) * 8, kk * 16 + (lane / 16) * 8));
#pragma unroll
    for (int nb2 = 0; nb2 < 4; ++nb2) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile.at(nb2 * 16 + (lane % 8) + (lane / 16) * 8, kk * 16 + ((lane / 8) % 2) * 8));
      mma_16816<T>(s[2 * nb2], a, b[0], b[1]);
      mma_16816<T>(s[2 * nb2 + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x D per warp) += P (16 x 64, accumulator layout) * B_tile (64 rows x D in smem).
template <typename T, int D>
__device__ __forceinline__ void gemm_acc_tile(float (&acc)[D / 8][4], const float (&p)[8][4],
                                              SmemTile<T, D> b_tile, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t a[4];
    a[0] = Pack2<T>::pack(p[2 * j][0], p[2 * j][1]);
    a[1] = Pack2<T>::pack(p[2 * j][2], p[2 * j][3]);
    a[2] = Pack2<T>::pack(p[2 * j + 1][0], p[2 * j + 1][1]);
    a[3] = Pack2<T>::pack(p[2 * j + 1][2], p[2 * j + 1][3]);
#pragma unroll
    for (int dn2 = 0; dn2 < D / 16; ++dn2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile.at(j * 16 + (lane % 8) + ((lane / 8) % 2) * 8, dn2 * 16 + (lane / 16) * 8));
      mma_16816<T>(acc[2 * dn2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dn2 + 1], a, b[2], b[3]);
    }
  }
}

template <typename T, int D>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[D / 16][4], SmemTile<T, D> tile,
                                                 int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(a[kk], tile.at(row0 + (lane % 8) + ((lane / 8) % 2) * 8, kk * 16 + (lane / 16) * 8));
}

// Writes a warp's 16 x D accumulator rows (times `scale`) to original rows.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], const float (&row_scale)[2],
                                           T* dst, int64_t row_stride, const RowInfo (&rows)[2],
                                           const bool (&valid)[2], int lane) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!valid[i]) continue;
    T* out = dst + rows[i].orig * row_stride;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int col = dn * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(out + col) =
          Pack2<T>::pack(acc[dn][2 * i] * row_scale[i], acc[dn][2 * i + 1] * row_scale[i]);
    }
  }
}

template <typename T>
__device__ __forceinline__ const T* head_ptr(const void* base, const Layout& l, int b, int h) {
  return static_cast<const T*>(base) + b * l.b + h * l.h;
}

// ---------------------------------------------------------------------------
// forward

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const __grid_constant__ ForwardParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  SmemTile<T, D> sQ{smem}, sK{smem + kRows * D}, sV{smem + 2 * kRows * D};
  int* sKpos = reinterpret_cast<int*>(smem + 3 * kRows * D);
  int* sKbucket = sKpos + kRows;

  const int qt = blockIdx.x, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int hk = h / (p.H / p.Hkv), bhk = b * p.Hkv + hk;
  const int nqt = num_tiles(p.Nq), nkt = num_tiles(p.Nk);
  const int64_t q_base = static_cast<int64_t>(bh) * p.Nq, k_base = static_cast<int64_t>(bhk) * p.Nk;
  const TileRange qr = p.q_pack.tiles[bh * nqt + qt];
  const TileRange* ktiles = p.k_pack.tiles + static_cast<int64_t>(bhk) * nkt;
  const T* q = head_ptr<T>(p.q, p.q_layout, b, h);
  const T* k = head_ptr<T>(p.k, p.k_layout, b, hk);
  const T* v = head_ptr<T>(p.v, p.v_layout, b, hk);
  const int* qperm = p.q_pack.perm ? p.q_pack.perm + q_base : nullptr;
  const int* kperm = p.k_pack.perm ? p.k_pack.perm + k_base : nullptr;

  load_tile_async<T, D, kThreads>(sQ, q, p.q_layout.n, qperm, qt * kRows, p.Nq);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  RowInfo rows[2];
  bool valid[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = qt * kRows + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < p.Nq;
    rows[i] = row_info(p.q_pack, q_base, packed, p.Nq, p.Nk - p.Nq, kInvalidQueryBucket);
  }
  const bool q_tile_full = (qt + 1) * kRows <= p.Nq;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;

  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[D / 16][4];
  load_a_fragments<T, D>(qf, sQ, warp * 16, lane);

  for (int kt = 0; kt < nkt; ++kt) {
    const TileRange kr = ktiles[kt];
    if (!tiles_meet(qr, kr)) continue;
    const bool all_allowed =
        q_tile_full && (kt + 1) * kRows <= p.Nk && tiles_all_allowed(qr, kr);
    __syncthreads();  // everyone is done with the previous K/V tile
    load_tile_async<T, D, kThreads>(sK, k, p.k_layout.n, kperm, kt * kRows, p.Nk);
    load_tile_async<T, D, kThreads>(sV, v, p.v_layout.n, kperm, kt * kRows, p.Nk);
    cp_async_commit();
    if (threadIdx.x < kRows) {
      RowInfo kinfo = row_info(p.k_pack, k_base, kt * kRows + threadIdx.x, p.Nk, 0, kInvalidKeyBucket);
      sKpos[threadIdx.x] = kinfo.pos;
      sKbucket[threadIdx.x] = kinfo.bucket;
    }
    cp_async_wait_all();
    __syncthreads();

    float s[8][4];
    gemm_rows_tile_t<T, D>(s, qf, sK, lane);

    // Mask, then the online softmax in the log2 domain.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, col = nb * 8 + (lane % 4) * 2 + (e & 1);
        float x = s[nb][e] * scale_log2;
        if (!all_allowed &&
            !(rows[i].bucket == sKbucket[col] && rows[i].pos >= sKpos[col]))
          x = -INFINITY;
        s[nb][e] = x;
        tile_max[i] = fmaxf(tile_max[i], x);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 2));
      const float m_new = fmaxf(m[i], tile_max[i]);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // rows with nothing allowed yet
      const float correction = exp2f(m[i] - base);
      m[i] = m_new;
      l[i] *= correction;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][2 * i] *= correction;
        o[dn][2 * i + 1] *= correction;
      }
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        s[nb][2 * i] = exp2f(s[nb][2 * i] - base);
        s[nb][2 * i + 1] = exp2f(s[nb][2 * i + 1] - base);
        l[i] += s[nb][2 * i] + s[nb][2 * i + 1];
      }
    }
    gemm_acc_tile<T, D>(o, s, sV, lane);
  }

  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  }
  T* out = static_cast<T*>(p.out) + b * p.out_layout.b + h * p.out_layout.h;
  store_rows<T, D>(o, inv, out, p.out_layout.n, rows, valid, lane);
  if (lane % 4 == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (valid[i])
        p.lse[static_cast<int64_t>(bh) * p.Nq + rows[i].orig] =
            l[i] > 0.f ? (m[i] + log2f(l[i])) * kLn2 : -INFINITY;
  }
}

// ---------------------------------------------------------------------------
// backward

// delta = rowsum(dout * out), one warp per row, original order.
template <typename T, int D>
__global__ void delta_kernel(const __grid_constant__ BackwardParams p) {
  const ForwardParams& f = p.fwd;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(f.B) * f.H * f.Nq) return;
  const int i = row % f.Nq, bh = row / f.Nq, b = bh / f.H, h = bh % f.H;
  const T* o = head_ptr<T>(f.out, f.out_layout, b, h) + i * f.out_layout.n;
  const T* d = head_ptr<T>(p.dout, p.dout_layout, b, h) + i * p.dout_layout.n;
  float sum = 0.f;
  for (int c = lane; c < D; c += 32) sum += Pack2<T>::to_float(o[c]) * Pack2<T>::to_float(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
  if (lane == 0) p.delta[row] = sum;
}

// dK, dV for one key tile: loops over the query heads of its group and the
// query tiles that can see it.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const __grid_constant__ BackwardParams p) {
  const ForwardParams& f = p.fwd;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  SmemTile<T, D> sK{smem}, sV{smem + kRows * D}, sQ{smem + 2 * kRows * D},
      sdO{smem + 3 * kRows * D};
  int* sQpos = reinterpret_cast<int*>(smem + 4 * kRows * D);
  int* sQbucket = sQpos + kRows;
  float* sLse = reinterpret_cast<float*>(sQbucket + kRows);
  float* sDelta = sLse + kRows;

  const int kt = blockIdx.x, bhk = blockIdx.y, b = bhk / f.Hkv, hk = bhk % f.Hkv;
  const int group = f.H / f.Hkv, nqt = num_tiles(f.Nq), nkt = num_tiles(f.Nk);
  const int64_t k_base = static_cast<int64_t>(bhk) * f.Nk;
  const TileRange kr = f.k_pack.tiles[bhk * nkt + kt];
  const int* kperm = f.k_pack.perm ? f.k_pack.perm + k_base : nullptr;
  load_tile_async<T, D, kThreads>(sK, head_ptr<T>(f.k, f.k_layout, b, hk), f.k_layout.n, kperm,
                                  kt * kRows, f.Nk);
  load_tile_async<T, D, kThreads>(sV, head_ptr<T>(f.v, f.v_layout, b, hk), f.v_layout.n, kperm,
                                  kt * kRows, f.Nk);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  RowInfo rows[2];
  bool valid[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = kt * kRows + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < f.Nk;
    rows[i] = row_info(f.k_pack, k_base, packed, f.Nk, 0, kInvalidKeyBucket);
  }
  const bool k_tile_full = (kt + 1) * kRows <= f.Nk;
  const float scale_log2 = f.scale * kLog2e;

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g, bh = b * f.H + h;
    const int64_t q_base = static_cast<int64_t>(bh) * f.Nq;
    const TileRange* qtiles = f.q_pack.tiles + static_cast<int64_t>(bh) * nqt;
    const int* qperm = f.q_pack.perm ? f.q_pack.perm + q_base : nullptr;
    const T* q = head_ptr<T>(f.q, f.q_layout, b, h);
    const T* dout = head_ptr<T>(p.dout, p.dout_layout, b, h);
    for (int qt = 0; qt < nqt; ++qt) {
      const TileRange qr = qtiles[qt];
      if (!tiles_meet(qr, kr)) continue;
      const bool all_allowed =
          k_tile_full && (qt + 1) * kRows <= f.Nq && tiles_all_allowed(qr, kr);
      __syncthreads();
      load_tile_async<T, D, kThreads>(sQ, q, f.q_layout.n, qperm, qt * kRows, f.Nq);
      load_tile_async<T, D, kThreads>(sdO, dout, p.dout_layout.n, qperm, qt * kRows, f.Nq);
      cp_async_commit();
      if (threadIdx.x < kRows) {
        RowInfo qinfo = row_info(f.q_pack, q_base, qt * kRows + threadIdx.x, f.Nq, f.Nk - f.Nq,
                                 kInvalidQueryBucket);
        const bool in = qt * kRows + static_cast<int>(threadIdx.x) < f.Nq;
        const float lse = in ? f.lse[q_base + qinfo.orig] : -INFINITY;
        sQpos[threadIdx.x] = qinfo.pos;
        sQbucket[threadIdx.x] = qinfo.bucket;
        sLse[threadIdx.x] = lse == -INFINITY ? 0.f : lse * kLog2e;
        sDelta[threadIdx.x] = in ? p.delta[q_base + qinfo.orig] : 0.f;
      }
      cp_async_wait_all();
      __syncthreads();

      // S^T = K Q^T: keys are this warp's rows, queries the columns.
      float s[8][4];
      gemm_smem_rows_tile_t<T, D>(s, sK, warp * 16, sQ, lane);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1, col = nb * 8 + (lane % 4) * 2 + (e & 1);
          const bool ok = all_allowed ||
                          (rows[i].bucket == sQbucket[col] && sQpos[col] >= rows[i].pos);
          s[nb][e] = ok ? exp2f(s[nb][e] * scale_log2 - sLse[col]) : 0.f;  // P^T
        }
      gemm_acc_tile<T, D>(dv, s, sdO, lane);  // dV += P^T dO

      float dp[8][4];  // dP^T = V dO^T
      gemm_smem_rows_tile_t<T, D>(dp, sV, warp * 16, sdO, lane);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nb * 8 + (lane % 4) * 2 + (e & 1);
          s[nb][e] *= dp[nb][e] - sDelta[col];  // dS^T
        }
      gemm_acc_tile<T, D>(dk, s, sQ, lane);  // dK += dS^T Q
    }
  }
  const float one[2] = {1.f, 1.f}, scale[2] = {f.scale, f.scale};
  store_rows<T, D>(dk, scale,
                   static_cast<T*>(p.dk) + b * p.dk_layout.b + hk * p.dk_layout.h,
                   p.dk_layout.n, rows, valid, lane);
  store_rows<T, D>(dv, one, static_cast<T*>(p.dv) + b * p.dv_layout.b + hk * p.dv_layout.h,
                   p.dv_layout.n, rows, valid, lane);
}

// dQ for one query tile: a second pass over the key tiles it meets.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const __grid_constant__ BackwardParams p) {
  const ForwardParams& f = p.fwd;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  SmemTile<T, D> sQ{smem}, sdO{smem + kRows * D}, sK{smem + 2 * kRows * D},
      sV{smem + 3 * kRows * D};
  int* sKpos = reinterpret_cast<int*>(smem + 4 * kRows * D);
  int* sKbucket = sKpos + kRows;

  const int qt = blockIdx.x, bh = blockIdx.y, b = bh / f.H, h = bh % f.H;
  const int hk = h / (f.H / f.Hkv), bhk = b * f.Hkv + hk;
  const int nqt = num_tiles(f.Nq), nkt = num_tiles(f.Nk);
  const int64_t q_base = static_cast<int64_t>(bh) * f.Nq, k_base = static_cast<int64_t>(bhk) * f.Nk;
  const TileRange qr = f.q_pack.tiles[bh * nqt + qt];
  const TileRange* ktiles = f.k_pack.tiles + static_cast<int64_t>(bhk) * nkt;
  const int* qperm = f.q_pack.perm ? f.q_pack.perm + q_base : nullptr;
  const int* kperm = f.k_pack.perm ? f.k_pack.perm + k_base : nullptr;
  const T* k = head_ptr<T>(f.k, f.k_layout, b, hk);
  const T* v = head_ptr<T>(f.v, f.v_layout, b, hk);

  load_tile_async<T, D, kThreads>(sQ, head_ptr<T>(f.q, f.q_layout, b, h), f.q_layout.n, qperm,
                                  qt * kRows, f.Nq);
  load_tile_async<T, D, kThreads>(sdO, head_ptr<T>(p.dout, p.dout_layout, b, h), p.dout_layout.n,
                                  qperm, qt * kRows, f.Nq);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  RowInfo rows[2];
  bool valid[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = qt * kRows + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < f.Nq;
    rows[i] = row_info(f.q_pack, q_base, packed, f.Nq, f.Nk - f.Nq, kInvalidQueryBucket);
    const float lse = valid[i] ? f.lse[q_base + rows[i].orig] : -INFINITY;
    lse2[i] = lse == -INFINITY ? 0.f : lse * kLog2e;
    delta[i] = valid[i] ? p.delta[q_base + rows[i].orig] : 0.f;
  }
  const bool q_tile_full = (qt + 1) * kRows <= f.Nq;
  const float scale_log2 = f.scale * kLog2e;

  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[D / 16][4], dof[D / 16][4];
  load_a_fragments<T, D>(qf, sQ, warp * 16, lane);
  load_a_fragments<T, D>(dof, sdO, warp * 16, lane);
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int kt = 0; kt < nkt; ++kt) {
    const TileRange kr = ktiles[kt];
    if (!tiles_meet(qr, kr)) continue;
    const bool all_allowed = q_tile_full && (kt + 1) * kRows <= f.Nk && tiles_all_allowed(qr, kr);
    __syncthreads();
    load_tile_async<T, D, kThreads>(sK, k, f.k_layout.n, kperm, kt * kRows, f.Nk);
    load_tile_async<T, D, kThreads>(sV, v, f.v_layout.n, kperm, kt * kRows, f.Nk);
    cp_async_commit();
    if (threadIdx.x < kRows) {
      RowInfo kinfo = row_info(f.k_pack, k_base, kt * kRows + threadIdx.x, f.Nk, 0, kInvalidKeyBucket);
      sKpos[threadIdx.x] = kinfo.pos;
      sKbucket[threadIdx.x] = kinfo.bucket;
    }
    cp_async_wait_all();
    __syncthreads();

    float s[8][4], dp[8][4];
    gemm_rows_tile_t<T, D>(s, qf, sK, lane);   // S = Q K^T
    gemm_rows_tile_t<T, D>(dp, dof, sV, lane);  // dP = dO V^T
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, col = nb * 8 + (lane % 4) * 2 + (e & 1);
        const bool ok = all_allowed ||
                        (rows[i].bucket == sKbucket[col] && rows[i].pos >= sKpos[col]);
        const float prob = ok ? exp2f(s[nb][e] * scale_log2 - lse2[i]) : 0.f;
        s[nb][e] = prob * (dp[nb][e] - delta[i]);  // dS
      }
    gemm_acc_tile<T, D>(dq, s, sK, lane);  // dQ += dS K
  }
  const float scale[2] = {f.scale, f.scale};
  store_rows<T, D>(dq, scale, static_cast<T*>(p.dq) + b * p.dq_layout.b + h * p.dq_layout.h,
                   p.dq_layout.n, rows, valid, lane);
}

// ---------------------------------------------------------------------------
// launchers

template <typename P, typename Kernel>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                          const P& params) {
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, threads, smem, stream>>>(params);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t forward_typed(const ForwardParams& p, cudaStream_t stream) {
  const size_t smem = 3 * kRows * D * sizeof(T) + 2 * kRows * sizeof(int);
  dim3 grid(num_tiles(p.Nq), p.B * p.H);
  return launch_kernel(forward_kernel<T, D>, grid, kThreads, smem, stream, p);
}

template <typename T, int D>
cudaError_t backward_typed(const BackwardParams& p, cudaStream_t stream) {
  const ForwardParams& f = p.fwd;
  const int64_t rows = static_cast<int64_t>(f.B) * f.H * f.Nq;
  delta_kernel<T, D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const size_t smem = 4 * kRows * D * sizeof(T) + 4 * kRows * sizeof(int);
  if (cudaError_t e = launch_kernel(dkdv_kernel<T, D>, dim3(num_tiles(f.Nk), f.B * f.Hkv),
                                    kThreads, smem, stream, p);
      e != cudaSuccess)
    return e;
  return launch_kernel(dq_kernel<T, D>, dim3(num_tiles(f.Nq), f.B * f.H), kThreads, smem, stream,
                       p);
}

bool valid_shape(const ForwardParams& p) {
  return p.B > 0 && p.H > 0 && p.Hkv > 0 && p.H % p.Hkv == 0 && p.Nq > 0 && p.Nk >= p.Nq &&
         (p.D == 64 || p.D == 128) && p.q_pack.tiles && p.k_pack.tiles;
}

}  // namespace

// ---------------------------------------------------------------------------
// public entry points

int bucket_sort_bits(bool with_drop_sentinels, int num_buckets) {
  if (with_drop_sentinels) return 30;  // sentinels are 2^29 and 2^29 + 1
  int bits = 1;
  while ((1 << bits) < num_buckets) ++bits;
  return bits;
}

size_t pack_workspace_bytes(int rows, int n) {
  size_t cub_bytes = 0;
  const int64_t items = static_cast<int64_t>(rows) * n;
  cub::DeviceSegmentedRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const int*>(nullptr),
                                           static_cast<int*>(nullptr),
                                           static_cast<const int*>(nullptr),
                                           static_cast<int*>(nullptr), items, rows,
                                           static_cast<const int*>(nullptr),
                                           static_cast<const int*>(nullptr), 0, 30);
  return align_up(items * sizeof(int)) + align_up((rows + 1) * sizeof(int)) + align_up(cub_bytes);
}

cudaError_t pack_by_bucket(const int* bucket_in, int rows, int n, int sort_bits, int* perm_out,
                           int* bucket_out, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(rows) * n;
  char* ws = static_cast<char*>(workspace);
  int* iota = reinterpret_cast<int*>(ws);
  int* offsets = reinterpret_cast<int*>(ws + align_up(items * sizeof(int)));
  void* cub_ws = ws + align_up(items * sizeof(int)) + align_up((rows + 1) * sizeof(int));
  size_t cub_bytes = workspace_bytes - (static_cast<char*>(cub_ws) - ws);
  const int blocks = static_cast<int>(std::min<int64_t>((items + 255) / 256, 4096));
  fill_sort_inputs<<<blocks, 256, 0, stream>>>(iota, offsets, rows, n);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  // Radix sort is stable: time order is kept inside each bucket.
  return cub::DeviceSegmentedRadixSort::SortPairs(cub_ws, cub_bytes, bucket_in, bucket_out, iota,
                                                  perm_out, items, rows, offsets, offsets + 1, 0,
                                                  sort_bits, stream);
}

cudaError_t compute_tile_ranges(const int* perm, const int* bucket, int rows, int n,
                                int position_offset, TileRange* tiles, cudaStream_t stream) {
  const int total = rows * num_tiles(n);
  tile_ranges_kernel<<<(total + 127) / 128, 128, 0, stream>>>(perm, bucket, rows, n,
                                                              position_offset, tiles);
  return cudaGetLastError();
}

cudaError_t attention_forward(const ForwardParams& p, cudaStream_t stream) {
  if (!valid_shape(p)) return cudaErrorInvalidValue;
  if (p.dtype == DType::kBF16)
    return p.D == 64 ? forward_typed<__nv_bfloat16, 64>(p, stream)
                     : forward_typed<__nv_bfloat16, 128>(p, stream);
  return p.D == 64 ? forward_typed<__half, 64>(p, stream) : forward_typed<__half, 128>(p, stream);
}

cudaError_t attention_backward(const BackwardParams& p, cudaStream_t stream) {
  if (!valid_shape(p.fwd) || !p.delta) return cudaErrorInvalidValue;
  if (p.fwd.dtype == DType::kBF16)
    return p.fwd.D == 64 ? backward_typed<__nv_bfloat16, 64>(p, stream)
                         : backward_typed<__nv_bfloat16, 128>(p, stream);
  return p.fwd.D == 64 ? backward_typed<__half, 64>(p, stream)
                       : backward_typed<__half, 128>(p, stream);
}

}  // namespace sparseflash::kernels
