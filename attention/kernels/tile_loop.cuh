// What the forward, dK/dV and dQ passes share: the tile search (which tiles
// can meet), row blocks of packed rows, row metadata, the key pipeline that
// streams the key tiles a query block meets, and the forward-style block.
#pragma once

#include "attention/kernels/common.cuh"
#include "attention/kernels/traits.cuh"

namespace sparseflash::kernels::detail {


// Is every pair of the two (complete) tiles allowed? Then no mask is needed.
__device__ __forceinline__ bool tiles_all_allowed(const TileRange& q, const TileRange& k) {
  return q.x == q.y && k.x == k.y && q.x == k.x && k.w <= q.z;
}

// First index in [lo, hi) where pred holds (pred monotone: false ... true),
// else hi. Warp-cooperative 32-ary search: every lane gets the same answer.
template <typename Pred>
__device__ __forceinline__ int warp_lower_bound(int lo, int hi, Pred pred, int lane) {
  while (lo < hi) {
    const int n = hi - lo, step = (n + 31) / 32;
    const int idx = lo + lane * step;
    const unsigned m = __ballot_sync(0xffffffffu, idx < hi && pred(idx));
    if (m == 0) {
      lo += ((n - 1) / step) * step + 1;
      continue;
    }
    const int f = __ffs(m) - 1;
    if (f == 0) return lo;
    hi = lo + f * step;
    lo += (f - 1) * step + 1;
  }
  return hi;
}

struct IndexRange {
  int lo, hi;
};

// Buckets ascend in packed order, so tile bucket min/max ascend with the tile
// index: the key tiles that can meet a query range form [lo, hi). With the
// identity permutation positions ascend too, which bounds the causal end.
__device__ __forceinline__ IndexRange key_tile_range(const TileRange* kt, int nkt, TileRange q,
                                                     bool identity, int lane) {
  if (q.z > q.w) return {0, 0};  // no positions: dropped rows alone meet nothing
  const int lo = warp_lower_bound(0, nkt, [&](int i) { return __ldg(&kt[i].y) >= q.x; }, lane);
  int hi = warp_lower_bound(lo, nkt, [&](int i) { return __ldg(&kt[i].x) > q.y; }, lane);
  if (identity) hi = warp_lower_bound(lo, hi, [&](int i) { return __ldg(&kt[i].z) > q.w; }, lane);
  return {lo, hi};
}

// The query tiles that can meet a key tile.
__device__ __forceinline__ IndexRange query_tile_range(const TileRange* qt, int nqt, TileRange k,
                                                       bool identity, int lane) {
  int lo = warp_lower_bound(0, nqt, [&](int i) { return __ldg(&qt[i].y) >= k.x; }, lane);
  const int hi = warp_lower_bound(lo, nqt, [&](int i) { return __ldg(&qt[i].x) > k.y; }, lane);
  if (identity) lo = warp_lower_bound(lo, hi, [&](int i) { return __ldg(&qt[i].w) >= k.z; }, lane);
  return {lo, hi};
}

// Iterates the tiles in [base, hi) that meet `other`, 32 candidates per warp
// ballot; uniform across the block (every warp computes the same).
struct MeetIter {
  const TileRange* tiles;
  TileRange other;
  int base, hi;
  unsigned mask;
  bool iter_keys;  // tiles are key tiles (other is the query range), else query tiles

  __device__ __forceinline__ void fill(int lane) {
    mask = 0;
    while (base < hi) {
      const int idx = base + lane;
      bool m = false;
      if (idx < hi) {
        const TileRange t = __ldg(&tiles[idx]);
        m = iter_keys ? tiles_meet(other, t) : tiles_meet(t, other);
      }
      mask = __ballot_sync(0xffffffffu, m);
      if (mask) return;
      base += 32;
    }
  }
  // Next meeting tile, or -1.
  __device__ __forceinline__ int next(int lane) {
    if (!mask) return -1;
    const int r = base + __ffs(mask) - 1;
    mask &= mask - 1;
    if (!mask) {
      base += 32;
      fill(lane);
    }
    return r;
  }
};

// 2^x in one MUFU instruction (flushes denormal results to 0; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Is the pair (query row: bucket qb, position qp; key: kb, kp) allowed?
// Bitwise, so that it compiles to predicates rather than branches.
__device__ __forceinline__ bool pair_allowed(int qb, int qp, int kb, int kp) {
  return (qb == kb) & (qp >= kp);
}

// Bucket and position of the two adjacent columns (col, col + 1) that an mma
// accumulator fragment holds, read once from a tile's row metadata in shared
// memory; b(e) and p(e) pick the column of fragment element e.
struct ColumnPair {
  int2 bucket{0, 0}, pos{0, 0};
  __device__ __forceinline__ int b(int e) const { return (e & 1) ? bucket.y : bucket.x; }
  __device__ __forceinline__ int p(int e) const { return (e & 1) ? pos.y : pos.x; }
};

__device__ __forceinline__ ColumnPair column_pair(const int* bucket, const int* pos, int col) {
  return {*reinterpret_cast<const int2*>(bucket + col), *reinterpret_cast<const int2*>(pos + col)};
}

// dst[0] += x, dst[1] += y (dst 8-byte aligned); one vector atomic on sm_90.
__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
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

// The union of the tile ranges of a block of kBR packed rows starting at r0
// (queries or keys).
template <int kBR>
__device__ __forceinline__ TileRange block_range(const TileRange* tiles, int nt, int r0) {
  TileRange qr = tiles[r0 / kRows];
#pragma unroll
  for (int t = 1; t < kBR / kRows; ++t)
    if (r0 / kRows + t < nt) qr = tile_union(qr, tiles[r0 / kRows + t]);
  return qr;
}

// The packed rows [r0, r1) of row block idx of one (batch, head) sequence
// (seq) of n rows: fixed blocks of kBR rows, or, with segments, kBR-row blocks
// from each bucket's first row on, so that no block holds two buckets;
// segment is then the bucket (-1 for fixed blocks). exists is false past the
// last block (the grid is num_row_blocks, an upper bound). Warp-uniform: a
// warp-wide scan over the segments' block counts.
struct RowBlock {
  int r0, r1, segment;
  bool exists;
};

template <int kBR>
__device__ __forceinline__ RowBlock row_block(const Packing& pk, int64_t seq, int n, int idx,
                                              int lane) {
  if (pk.segments == nullptr) {
    const int r0 = idx * kBR;
    return {r0, min(n, r0 + kBR), -1, r0 < n};
  }
  const int* seg = pk.segments + seq * (pk.num_segments + 1);
  int passed = 0;  // blocks of the segments before this group of 32
  for (int s0 = 0; s0 < pk.num_segments; s0 += 32) {
    const int s = s0 + lane;
    int lo = 0, hi = 0;
    if (s < pk.num_segments) {
      lo = __ldg(seg + s);
      hi = __ldg(seg + s + 1);
    }
    const int blocks = (hi - lo + kBR - 1) / kBR;
    int incl = blocks;  // inclusive scan over the lanes
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int t = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += t;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, passed + incl > idx);
    if (hit) {
      const int l = __ffs(hit) - 1;
      const int first_block = passed + __shfl_sync(0xffffffffu, incl - blocks, l);
      const int r0 = __shfl_sync(0xffffffffu, lo, l) + (idx - first_block) * kBR;
      return {r0, min(__shfl_sync(0xffffffffu, hi, l), r0 + kBR), s0 + l, true};
    }
    passed += __shfl_sync(0xffffffffu, incl, 31);
  }
  return {0, 0, -1, false};
}

// The bucket and position ranges of a row block (as a tile range): the union
// of its tiles' ranges for fixed blocks; exact for a segment's block (one
// bucket, rows in time order: positions from its first and last rows; none
// for dropped rows).
template <int kBR>
__device__ __forceinline__ TileRange row_block_range(const Packing& pk, const TileRange* tiles,
                                                     int nt, int64_t row_base, const RowBlock& rb,
                                                     int offset) {
  if (rb.segment < 0) return block_range<kBR>(tiles, nt, rb.r0);
  const int s = rb.segment;
  if (s >= pk.dead_bucket) return {s, s, INT_MAX, INT_MIN};
  return {s, s, __ldg(pk.perm + row_base + rb.r0) + offset,
          __ldg(pk.perm + row_base + rb.r1 - 1) + offset};
}

// Loads kNumRows packed rows (first .. first + kNumRows - 1) into a
// [kNumRows x D] tile stored as 128B-swizzled panels (wgmma::sw128_index; the
// base 1024-byte aligned); rows at or past n are zero-filled.
template <typename T, int D, int kThreads, int kNumRows>
__device__ __forceinline__ void load_rows_async_sw128(T* base, const T* src, int64_t row_stride,
                                                      const int* perm, int first, int n) {
  load_rows_async_to<T, D, kThreads, kNumRows>(
      [&](int r, int c) { return base + wgmma::sw128_index(r, c * 8, kNumRows); }, src, row_stride,
      perm, first, n);
}

// The same from rows read ahead (RowGather).
template <typename T, int D, int kThreads, int kNumRows>
__device__ __forceinline__ void load_rows_gathered_sw128(T* base, const T* src, int64_t row_stride,
                                                         const RowGather<D, kThreads, kNumRows>& g) {
  load_rows_gathered_to<T, D, kThreads, kNumRows>(
      [&](int r, int c) { return base + wgmma::sw128_index(r, c * 8, kNumRows); }, src, row_stride,
      g);
}

// Copies the rows of g into one [kNumRows x D] buffer: wgmma panels when
// kPanels, else the SmemTile layout.
template <typename T, int D, int kThreads, int kNumRows, bool kPanels>
__device__ __forceinline__ void load_tile_gathered(T* base, const T* src, int64_t row_stride,
                                                   const RowGather<D, kThreads, kNumRows>& g) {
  if constexpr (kPanels)
    load_rows_gathered_sw128<T, D, kThreads, kNumRows>(base, src, row_stride, g);
  else
    load_rows_gathered_to<T, D, kThreads, kNumRows>(
        [&](int r, int c) { return SmemTile<T, D>{base}.at(r, c * 8); }, src, row_stride, g);
}

// The key tiles a query block meets, streamed through two shared-memory
// buffers (K0 V0 K1 V1, plus each row's position and bucket). The forward and
// dQ passes both run:
//   pipe.start(lane);
//   while (pipe.kt >= 0) {
//     pipe.wait_and_prefetch(lane);   // tile kt is in; tile kt+1 is on its way
//     ... key_tile(), value_tile(), pos(), bucket(), all_allowed ...
//     pipe.advance();
//   }
// The source rows of the tile after next are read one iteration ahead
// (RowGather), so the copies never wait on the permutation.
// kPanels: tiles in the 128B-swizzled panel layout that wgmma descriptors
// read (and a proxy fence before the barrier that publishes them), instead of
// the ldmatrix layout of SmemTile.
template <typename T, int D, int kT, bool kPanels = false>
struct KeyPipeline {
  const TileRange* ktiles;
  TileRange qr;
  MeetIter it;
  const T *k, *v;
  int64_t k_stride, v_stride;
  const int* kperm;
  const Packing* k_pack;
  int64_t k_base;
  int Nk;
  T* kv;
  int *sKpos, *sKbucket;  // [2][kRows] each, then sAhead [2][kRows] (kKeyPipelineInts in all)
  bool q_block_full;
  // state
  int kt = -1, buf = 0, next_kt = -1, ahead_kt = -1;
  bool all_allowed = false, next_all = false;
  RowInfo next_info{0, 0, 0};
  RowInfo ahead_info{0, 0, 0};  // row threadIdx.x of tile ahead_kt (threads < kRows)

  // The source rows of the tile after next, [2][kRows] by buffer parity:
  // written at advance(), read by the next wait_and_prefetch.
  __device__ __forceinline__ int* ahead_rows(int b) const { return sKbucket + (2 + b) * kRows; }
  __device__ __forceinline__ void issue(const RowGather<D, kT, kRows>& g, int b) {
    load_tile_gathered<T, D, kT, kRows, kPanels>(kv + (2 * b) * kRows * D, k, k_stride, g);
    load_tile_gathered<T, D, kT, kRows, kPanels>(kv + (2 * b + 1) * kRows * D, v, v_stride, g);
  }
  __device__ __forceinline__ bool all_allowed_for(int tile) const {
    return q_block_full && (tile + 1) * kRows <= Nk && tiles_all_allowed(qr, __ldg(&ktiles[tile]));
  }
  __device__ __forceinline__ RowInfo key_row(int tile) const {
    return row_info(*k_pack, k_base, tile * kRows + threadIdx.x, Nk, 0, kInvalidKeyBucket);
  }
  // Finds the next meeting tile and reads its rows' data (loads in flight).
  __device__ __forceinline__ void look_ahead(int lane) {
    ahead_kt = it.next(lane);
    if (ahead_kt >= 0 && threadIdx.x < kRows) ahead_info = key_row(ahead_kt);
  }
  __device__ __forceinline__ void store_ahead(int b) const {
    if (kperm && threadIdx.x < kRows)
      ahead_rows(b)[threadIdx.x] = ahead_kt * kRows + static_cast<int>(threadIdx.x) < Nk ? ahead_info.orig : -1;
  }
  // Finds the first tile and starts loading it (one cp.async group).
  __device__ __forceinline__ void start(int lane) {
    it.fill(lane);
    kt = it.next(lane);
    if (kt >= 0) {
      RowGather<D, kT, kRows> g;
      g.fetch(kperm, kt * kRows, Nk);
      issue(g, 0);
      all_allowed = all_allowed_for(kt);
      if (threadIdx.x < kRows) {
        const RowInfo ki = key_row(kt);
        sKpos[threadIdx.x] = ki.pos;
        sKbucket[threadIdx.x] = ki.bucket;
      }
      look_ahead(lane);
      if (ahead_kt >= 0) store_ahead(1);
    }
    cp_async_commit();
  }
  // Waits for tile kt and starts loading the next one into the other buffer.
  __device__ __forceinline__ void wait_and_prefetch(int lane) {
    cp_async_wait_all();
    if constexpr (kPanels) wgmma::fence_proxy_async_shared();  // visible to wgmma
    __syncthreads();  // tile kt landed; everyone is done with the other buffer
    next_kt = ahead_kt;
    next_all = false;
    if (next_kt >= 0) {
      RowGather<D, kT, kRows> g;
      if (kperm)
        g.from_rows(ahead_rows(buf ^ 1));
      else
        g.fetch(nullptr, next_kt * kRows, Nk);  // identity: nothing to wait for
      issue(g, buf ^ 1);
      next_all = all_allowed_for(next_kt);
      next_info = ahead_info;
      look_ahead(lane);
    }
    cp_async_commit();
  }
  __device__ __forceinline__ T* key_base() const { return kv + (2 * buf) * kRows * D; }
  __device__ __forceinline__ T* value_base() const { return kv + (2 * buf + 1) * kRows * D; }
  __device__ __forceinline__ SmemTile<T, D> key_tile() const { return {kv + (2 * buf) * kRows * D}; }
  __device__ __forceinline__ SmemTile<T, D> value_tile() const {
    return {kv + (2 * buf + 1) * kRows * D};
  }
  __device__ __forceinline__ const int* pos() const { return sKpos + buf * kRows; }
  __device__ __forceinline__ const int* bucket() const { return sKbucket + buf * kRows; }
  // After the compute on tile kt: publishes the next tile's row data, moves on.
  __device__ __forceinline__ void advance() {
    if (next_kt >= 0 && threadIdx.x < kRows) {
      sKpos[(buf ^ 1) * kRows + threadIdx.x] = next_info.pos;
      sKbucket[(buf ^ 1) * kRows + threadIdx.x] = next_info.bucket;
    }
    if (ahead_kt >= 0) store_ahead(buf);
    kt = next_kt;
    all_allowed = next_all;
    buf ^= 1;
  }
};

// S (16 x 64 per warp) = A_rows(16 x D, from fragments) * B_tile^T (64 rows x D in smem).
template <typename T, int D>
__device__ __forceinline__ void gemm_rows_tile_t(float (&s)[8][4], const uint32_t (&a)[D / 16][4],
                                                 SmemTile<T, D> b_tile, SwizzledLane<D> lb) {
#pragma unroll
  for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nb2 = 0; nb2 < 4; ++nb2) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile.ldm(lb, nb2 * 16, kk * 16));
      mma_16816<T>(s[2 * nb2], a[kk], b[0], b[1]);
      mma_16816<T>(s[2 * nb2 + 1], a[kk], b[2], b[3]);
    }
  }
}

// Same, with A read from a smem tile (rows a_row0 .. a_row0 + 15).
template <typename T, int D>
__device__ __forceinline__ void gemm_smem_rows_tile_t(float (&s)[8][4], SmemTile<T, D> a_tile,
                                                      int a_row0, SmemTile<T, D> b_tile,
                                                      SwizzledLane<D> la, SwizzledLane<D> lb) {
#pragma unroll
  for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_tile.ldm(la, a_row0, kk * 16));
#pragma unroll
    for (int nb2 = 0; nb2 < 4; ++nb2) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile.ldm(lb, nb2 * 16, kk * 16));
      mma_16816<T>(s[2 * nb2], a, b[0], b[1]);
      mma_16816<T>(s[2 * nb2 + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x D per warp) += P (16 x 64, accumulator layout) * B_tile (64 rows x D in smem).
template <typename T, int D>
__device__ __forceinline__ void gemm_acc_tile(float (&acc)[D / 8][4], const float (&p)[8][4],
                                              SmemTile<T, D> b_tile, SwizzledLane<D> la) {
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
      ldmatrix_x4_trans(b, b_tile.ldm(la, j * 16, dn2 * 16));
      mma_16816<T>(acc[2 * dn2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dn2 + 1], a, b[2], b[3]);
    }
  }
}

template <typename T, int D>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[D / 16][4], SmemTile<T, D> tile,
                                                 int row0, SwizzledLane<D> la) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(a[kk], tile.ldm(la, row0, kk * 16));
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

// The forward kernels' per-tile softmax on one warp's accumulator fragments
// (both kernels keep them in the mma.sync m16n8 C layout): s(nb, e) is score
// element e of key columns 8nb..8nb+7, o(dn, e) output element e of columns
// 8dn..8dn+7. Masks the scores (unless all_allowed), then runs the online
// softmax in the log2 domain: maxima on the raw scores (m is raw too), the
// scale joined in the exponent's fused multiply-add; s becomes P.
template <int D, typename SAt, typename OAt>
__device__ __forceinline__ void softmax_tile(SAt s, OAt o, bool all_allowed, const RowInfo (&rows)[2],
                                             const int* kbucket, const int* kpos, float (&m)[2],
                                             float (&l)[2], float scale_log2, int lane) {
  float tile_max[2] = {-INFINITY, -INFINITY};
  // Two copies of the loop (with and without the mask) keep the per-element
  // work free of branches.
  auto mask_and_max = [&](auto masked) {
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      const int col = nb * 8 + (lane % 4) * 2;
      ColumnPair kc;
      if constexpr (decltype(masked)::value) kc = column_pair(kbucket, kpos, col);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        float x = s(nb, e);
        if constexpr (decltype(masked)::value) {
          x = pair_allowed(rows[i].bucket, rows[i].pos, kc.b(e), kc.p(e)) ? x : -INFINITY;
          s(nb, e) = x;
        }
        tile_max[i] = fmaxf(tile_max[i], x);
      }
    }
  };
  if (all_allowed)
    mask_and_max(std::false_type{});
  else
    mask_and_max(std::true_type{});
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 1));
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 2));
    const float m_new = fmaxf(m[i], tile_max[i]);
    // log2-domain offset; 0 for rows with nothing allowed yet (all -inf)
    const float base = m_new == -INFINITY ? 0.f : m_new * scale_log2;
    const float correction = fast_exp2(m[i] * scale_log2 - base);
    m[i] = m_new;
    l[i] *= correction;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o(dn, 2 * i) *= correction;
      o(dn, 2 * i + 1) *= correction;
    }
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      s(nb, 2 * i) = fast_exp2(fmaf(s(nb, 2 * i), scale_log2, -base));
      s(nb, 2 * i + 1) = fast_exp2(fmaf(s(nb, 2 * i + 1), scale_log2, -base));
      l[i] += s(nb, 2 * i) + s(nb, 2 * i + 1);
    }
  }
}

// The forward kernels' epilogue: O / l to the rows' original places, and the
// log-sum-exp (natural log; -inf for rows with no allowed key).
template <typename T, int D, typename OAt>
__device__ __forceinline__ void finish_rows(OAt o, float (&l)[2], const float (&m)[2],
                                            float scale_log2, const ForwardParams& p, int b, int h,
                                            int bh, const RowInfo (&rows)[2], const bool (&valid)[2],
                                            int lane) {
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  }
  T* out = static_cast<T*>(p.out) + b * p.out_layout.b + h * p.out_layout.h;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!valid[i]) continue;
    T* dst = out + rows[i].orig * p.out_layout.n;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int col = dn * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(dst + col) =
          Pack2<T>::pack(o(dn, 2 * i) * inv[i], o(dn, 2 * i + 1) * inv[i]);
    }
  }
  if (lane % 4 == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (valid[i])
        p.lse[static_cast<int64_t>(bh) * p.Nq + rows[i].orig] =
            l[i] > 0.f ? (m[i] * scale_log2 + log2f(l[i])) * kLn2 : -INFINITY;
  }
}

// The grid: (row block, sequence) or, with heads_fastest, (sequence, row
// block).
struct GridPos {
  int seq, block, blocks;
};
__device__ __forceinline__ GridPos grid_pos(bool heads_fastest) {
  return heads_fastest ? GridPos{static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y),
                                 static_cast<int>(gridDim.y)}
                       : GridPos{static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.x),
                                 static_cast<int>(gridDim.x)};
}

// What a forward block works on: query block g.block (counted from the end:
// long causal rows first) of (batch, head) g.seq, kBR packed rows.
template <typename T>
struct ForwardBlock {
  bool exists;                // false: past the last row block, nothing to do
  bool dead;                  // a block of dropped rows (has_dead_rows: zeroed apart)
  int bh, b, h, hk, bhk, q0, q1, nkt;  // packed query rows [q0, q1)
  int64_t q_base, k_base;
  TileRange qr;               // the union of the block's query tile ranges
  const TileRange* ktiles;    // the KV head's key tiles
  const T *q, *k, *v;         // this head's Q, K, V
  const int *qperm, *kperm;   // nullptr: identity
};

template <typename T, int kBR>
__device__ __forceinline__ ForwardBlock<T> forward_block(const ForwardParams& p) {
  ForwardBlock<T> f;
  const GridPos g = grid_pos(p.heads_fastest);
  f.bh = g.seq;
  const int qb = g.blocks - 1 - g.block;
  const RowBlock rb = row_block<kBR>(p.q_pack, f.bh, p.Nq, qb, threadIdx.x % 32);
  f.exists = rb.exists;
  f.dead = rb.exists && rb.segment >= p.q_pack.dead_bucket;
  f.b = f.bh / p.H;
  f.h = f.bh % p.H;
  f.hk = f.h / (p.H / p.Hkv);
  f.bhk = f.b * p.Hkv + f.hk;
  const int nqt = num_tiles(p.Nq);
  f.nkt = num_tiles(p.Nk);
  f.q_base = static_cast<int64_t>(f.bh) * p.Nq;
  f.k_base = static_cast<int64_t>(f.bhk) * p.Nk;
  f.q0 = rb.r0;
  f.q1 = rb.r1;
  if (f.exists)
    f.qr = row_block_range<kBR>(p.q_pack, p.q_pack.tiles + static_cast<int64_t>(f.bh) * nqt, nqt,
                                f.q_base, rb, p.Nk - p.Nq);
  f.ktiles = p.k_pack.tiles + static_cast<int64_t>(f.bhk) * f.nkt;
  f.q = head_ptr<T>(p.q, p.q_layout, f.b, f.h);
  f.k = head_ptr<T>(p.k, p.k_layout, f.b, f.hk);
  f.v = head_ptr<T>(p.v, p.v_layout, f.b, f.hk);
  f.qperm = p.q_pack.perm ? p.q_pack.perm + f.q_base : nullptr;
  f.kperm = p.k_pack.perm ? p.k_pack.perm + f.k_base : nullptr;
  return f;
}

// The key pipeline of a forward or dQ block over the key tiles that meet it
// (kv: K0 V0 K1 V1, then kKeyPipelineInts ints), started: the first tile is on
// its way.
template <typename T, int D, int kT, int kBR, bool kPanels = false>
__device__ __forceinline__ KeyPipeline<T, D, kT, kPanels> start_key_pipeline(
    const ForwardBlock<T>& fb, const ForwardParams& p, T* kv, int lane) {
  int* sKpos = reinterpret_cast<int*>(kv + kKeyPipelineElems<D>);
  const IndexRange range = key_tile_range(fb.ktiles, fb.nkt, fb.qr, fb.kperm == nullptr, lane);
  KeyPipeline<T, D, kT, kPanels> pipe{
      fb.ktiles, fb.qr, MeetIter{fb.ktiles, fb.qr, range.lo, range.hi, 0u, true}, fb.k, fb.v,
      p.k_layout.n, p.v_layout.n, fb.kperm, &p.k_pack, fb.k_base, p.Nk, kv, sKpos,
      sKpos + 2 * kRows, fb.q0 + kBR <= fb.q1};
  pipe.start(lane);
  return pipe;
}

// This thread's two query rows of the block (warp w: rows 16w..16w+15; lane
// l: rows l / 4 and l / 4 + 8) and whether they exist.
template <typename T>
__device__ __forceinline__ void block_query_rows(const ForwardBlock<T>& fb, const ForwardParams& p,
                                                 int warp, int lane, RowInfo (&rows)[2],
                                                 bool (&valid)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = fb.q0 + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < fb.q1;
    rows[i] = row_info(p.q_pack, fb.q_base, packed, fb.q1, p.Nk - p.Nq, kInvalidQueryBucket);
  }
}

}  // namespace sparseflash::kernels::detail
