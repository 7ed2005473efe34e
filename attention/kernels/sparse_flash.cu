// Sparse causal flash attention kernels (FlashAttention-2 style, mma.sync):
// packing (bucket sort, tile ranges), forward, and the backward (dK/dV per
// block of keys; dQ by fp32 atomics from the same pass, or deterministically
// by a second pass per query block). See sparse_flash.h for semantics.
//
// Reading order: packing kernels, the tile loop shared by all passes
// (masking, skipping), forward, backward (delta, dK/dV, dQ), launchers.
// On sm_90 the bf16 forward runs on warpgroup MMA (forward_kernel_wgmma).
#include "attention/kernels/sparse_flash.h"

#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "attention/kernels/mma.cuh"
#include "attention/kernels/wgmma.cuh"

namespace sparseflash::kernels {

namespace {

constexpr int kRows = kTileRows;
constexpr int kBwdWarps = 8;                // dK/dV blocks: 8 warps,
constexpr int kBwdKeys = kBwdWarps * 16;    // 16 keys each
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

// One warp per tile of kRows packed rows (lanes hold rows lane and lane + 32):
// bucket min/max over every row, position min/max over the rows that are not
// dropped (bucket < dead_bucket).
constexpr int kTileRangeThreads = 256;

__global__ void __launch_bounds__(kTileRangeThreads)
    tile_ranges_kernel(const int* perm, const int* bucket, int rows, int n, int offset,
                       int dead_bucket, TileRange* tiles) {
  const int nt = num_tiles(n);
  const int64_t tile_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (tile_id >= static_cast<int64_t>(rows) * nt) return;  // whole warps
  const int row = static_cast<int>(tile_id / nt), tile = static_cast<int>(tile_id % nt);
  const int64_t base = static_cast<int64_t>(row) * n;
  TileRange r{INT_MAX, INT_MIN, INT_MAX, INT_MIN};
#pragma unroll
  for (int j = 0; j < kRows / 32; ++j) {
    const int i = tile * kRows + lane + 32 * j;
    if (i >= n) continue;
    const int b = bucket ? bucket[base + i] : 0;
    r.x = min(r.x, b);
    r.y = max(r.y, b);
    if (b < dead_bucket) {
      const int pos = (perm ? perm[base + i] : i) + offset;
      r.z = min(r.z, pos);
      r.w = max(r.w, pos);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    r.x = min(r.x, __shfl_xor_sync(0xffffffffu, r.x, off));
    r.y = max(r.y, __shfl_xor_sync(0xffffffffu, r.y, off));
    r.z = min(r.z, __shfl_xor_sync(0xffffffffu, r.z, off));
    r.w = max(r.w, __shfl_xor_sync(0xffffffffu, r.w, off));
  }
  if (lane == 0) tiles[tile_id] = r;
}

// Counting sort of bucket ids in [0, nseg), nseg = 2^bits <= 256, per (batch,
// head) sequence of n rows, in chunks of kSortChunk rows (one block each):
//   bucket_count_kernel    counts of each id per chunk: hist[seq][id][chunk];
//   bucket_scatter_kernel  per chunk: each id's first output row (ids before
//                          it over the sequence, plus this id in earlier
//                          chunks), then each row's rank among the rows of
//                          its id before it in the chunk (warp match + per-warp
//                          counts), so the order inside an id is kept (stable).
// Two small launches instead of a radix sort's several passes; the id totals
// are the segment offsets the kernels' bucket-aligned row blocks read.
constexpr int kSortThreads = 256, kSortChunk = 1024, kSortWarps = kSortThreads / 32;
constexpr int kSortRowsPerWarp = kSortChunk / kSortWarps, kSortRounds = kSortRowsPerWarp / 32;
constexpr int kMaxSegments = 1 << kMaxSegmentBits;
static_assert(kMaxSegments <= kSortThreads, "one thread per bucket id in the scans");

// Row i's id: dropped (keep given and false), else its bucket_in id (0 without).
struct SortIds {
  const int* bucket;  // nullptr: 0
  const bool* keep;   // nullptr: every row kept
  int dropped;
  __device__ __forceinline__ int operator()(int64_t i) const {
    if (keep != nullptr && !keep[i]) return dropped;
    return bucket != nullptr ? bucket[i] : 0;
  }
};

__global__ void __launch_bounds__(kSortThreads)
    bucket_count_kernel(SortIds ids, int n, int nseg, int chunks, int* hist) {
  __shared__ int count[kMaxSegments];
  const int64_t seq = blockIdx.y;
  const int chunk = blockIdx.x;
  for (int i = threadIdx.x; i < nseg; i += kSortThreads) count[i] = 0;
  __syncthreads();
  for (int i = chunk * kSortChunk + threadIdx.x; i < min(n, (chunk + 1) * kSortChunk);
       i += kSortThreads)
    atomicAdd(&count[ids(seq * n + i) & (nseg - 1)], 1);
  __syncthreads();
  for (int i = threadIdx.x; i < nseg; i += kSortThreads)
    hist[(seq * nseg + i) * chunks + chunk] = count[i];
}

__global__ void __launch_bounds__(kSortThreads)
    bucket_scatter_kernel(SortIds ids, int n, int nseg, int chunks, const int* hist,
                          int* perm_out, int* bucket_out, int* segments_out) {
  using Scan = cub::BlockScan<int, kSortThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int warp_next[kSortWarps][kMaxSegments];  // per warp and id: next output row
  const int64_t seq = blockIdx.y;
  const int chunk = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // This chunk's first output row of each id: a walk over the id's counts in
  // every chunk, so the sort's set-up grows as chunks^2 per sequence (16^2 at
  // N = 16k; at N = 512k with 16 ids about 16 MB of L2 reads per sequence).
  // todo: a scan kernel over the counts if sequences grow past that.
  int total = 0, before = 0;
  if (tid < nseg) {
    const int* h = hist + (seq * nseg + tid) * chunks;
    for (int c = 0; c < chunks; ++c) {
      const int v = h[c];
      total += v;
      before += c < chunk ? v : 0;
    }
  }
  int start = 0;
  Scan(scan_storage).ExclusiveSum(total, start);
  if (chunk == 0 && segments_out != nullptr) {
    if (tid < nseg) segments_out[seq * (nseg + 1) + tid] = start;
    if (tid == 0) segments_out[seq * (nseg + 1) + nseg] = n;  // nseg may be kSortThreads
  }

  // The chunk's rows, warp w taking kSortRowsPerWarp consecutive ones.
  const int first = chunk * kSortChunk + warp * kSortRowsPerWarp;
  int id[kSortRounds], raw[kSortRounds];
  unsigned peers[kSortRounds];
  for (int i = tid; i < kSortWarps * kMaxSegments; i += kSortThreads) (&warp_next[0][0])[i] = 0;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kSortRounds; ++r) {
    const int i = first + 32 * r + lane;
    raw[r] = i < n ? ids(seq * n + i) : 0;
    // Rows past n get ids no other lane has (-1 - lane): alone in their match.
    id[r] = i < n ? raw[r] & (nseg - 1) : -1 - lane;
    peers[r] = __match_any_sync(0xffffffffu, id[r]);
    if (i < n && lane == __ffs(peers[r]) - 1) warp_next[warp][id[r]] += __popc(peers[r]);
    __syncwarp();  // the next round's leader of an id may be another lane
  }
  __syncthreads();
  // Counts of the warps before -> each warp's first output row per id.
  if (tid < nseg) {
    int next = start + before;
#pragma unroll
    for (int w = 0; w < kSortWarps; ++w) {
      const int c = warp_next[w][tid];
      warp_next[w][tid] = next;
      next += c;
    }
  }
  __syncthreads();
  const unsigned below = (1u << lane) - 1;
#pragma unroll
  for (int r = 0; r < kSortRounds; ++r) {
    const int i = first + 32 * r + lane;
    if (i < n) {
      const int64_t dst = seq * n + warp_next[warp][id[r]] + __popc(peers[r] & below);
      perm_out[dst] = i;
      bucket_out[dst] = raw[r];
    }
    __syncwarp();
    if (i < n && lane == __ffs(peers[r]) - 1) warp_next[warp][id[r]] += __popc(peers[r]);
    __syncwarp();
  }
}

// One thread per row. The block's kLshThreads rows are first copied into
// shared memory with coalesced 16-byte loads (all in flight at once), rows
// padded by 16 bytes so that the threads' 16-byte reads of their own rows hit
// distinct banks. Each row is then projected on the rotation columns, staged
// in shared memory as [D][half rounded up to 8] (zero columns past half) and
// read as 16-byte broadcasts, 8 columns per group: the projection's
// shared-memory loads were one 4-byte load per multiply-add before, which
// bounded the kernel (80 us per side at B*N = 65,536, 12 heads, D = 64, nb 16).
constexpr int kLshThreads = kLshCapRows, kLshGroup = 8;

__host__ __device__ inline int lsh_padded_half(int half) {
  return (half + kLshGroup - 1) / kLshGroup * kLshGroup;
}

// Shared memory of lsh_kernel: the rotations, then the padded rows.
inline size_t lsh_smem_bytes(int D, int half, int elem_bytes) {
  return static_cast<size_t>(D) * lsh_padded_half(half) * sizeof(float) +
         static_cast<size_t>(kLshThreads) * (D * elem_bytes + 16);
}

// A float's bits as an unsigned key with the same order, -0 and +0 one key
// (on the bits, so no compiler flag can change it). Keys are >= 1: 0 marks a
// full bucket, below every score, NaN included (a NaN with every bit set
// would map to 0; it takes 1, the lowest key). NaN scores get some bucket
// with room, not necessarily capped_argmax's.
__device__ __forceinline__ unsigned lsh_order_key(float v) {
  unsigned u = __float_as_uint(v);
  if ((u << 1) == 0) u = 0;  // -0 -> +0
  const unsigned key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return max(key, 1u);
}

constexpr int kCapWarps = 4;   // chains per block of lsh_capped_kernel
constexpr int kCapChunk = 32;  // rows whose scores a lane loads at once

// The capped assignment (lsh_bucket_ids with cap > 0): one warp per chain, a
// block of kLshCapRows rows of one (b, h), taken in order; each row goes to
// its best-scoring bucket that holds fewer than cap rows of the block so far.
// Lane l holds buckets l (score +p) and half + l (score -p) and their counts;
// per row one max-reduction over the lanes' best candidates and two ballots
// pick the winner, ties to the lower bucket (every +p bucket before every -p
// one, then the lower lane), as capped_argmax (attention/reference.cc) does.
// scores: [B * H][N][half] float32, the centred projections from lsh_kernel.
__global__ void __launch_bounds__(kCapWarps * 32)
    lsh_capped_kernel(const float* scores, int BH, int N, int half, int cap, int64_t* out) {
  const int lane = threadIdx.x % 32;
  const int blocks = (N + kLshCapRows - 1) / kLshCapRows;
  const int64_t chain = static_cast<int64_t>(blockIdx.x) * kCapWarps + threadIdx.x / 32;
  if (chain >= static_cast<int64_t>(BH) * blocks) return;
  const int64_t bh = chain / blocks;
  const int n0 = static_cast<int>(chain % blocks) * kLshCapRows;
  const int rows = min(kLshCapRows, N - n0);
  const float* s = scores + (bh * N + n0) * half;
  int64_t* o = out + bh * N + n0;
  int count_pos = 0, count_neg = 0;
  for (int c0 = 0; c0 < rows; c0 += kCapChunk) {
    // The chunk's scores first, all loads in flight at once.
    float p[kCapChunk];
#pragma unroll
    for (int i = 0; i < kCapChunk; ++i)
      p[i] = (lane < half && c0 + i < rows) ? s[(c0 + i) * half + lane] : 0.f;
    int64_t mine = 0;  // the bucket of row c0 + lane
#pragma unroll
    for (int i = 0; i < kCapChunk; ++i) {
      if (c0 + i >= rows) break;
      const unsigned kp = (lane < half && count_pos < cap) ? lsh_order_key(p[i]) : 0u;
      const unsigned kn = (lane < half && count_neg < cap) ? lsh_order_key(-p[i]) : 0u;
      const bool take_neg = kn > kp;  // equal: +p, the lower bucket
      const unsigned k = take_neg ? kn : kp;
      const unsigned best = __reduce_max_sync(0xffffffffu, k);
      const unsigned pos_win = __ballot_sync(0xffffffffu, k == best && !take_neg);
      const unsigned neg_win = __ballot_sync(0xffffffffu, k == best && take_neg);
      int id;
      if (pos_win != 0) {
        const int l = __ffs(pos_win) - 1;
        id = l;
        if (lane == l) ++count_pos;
      } else {
        const int l = __ffs(neg_win) - 1;
        id = half + l;
        if (lane == l) ++count_neg;
      }
      if (lane == i) mine = id;
    }
    if (c0 + lane < rows) o[c0 + lane] = mine;
  }
}

template <typename T>
__global__ void __launch_bounds__(kLshThreads)
    lsh_kernel(const T* x, Layout layout, int H, int N, int D, const float* rotations, int Hr,
               int half, const float* offsets, int offset_block, float* scores, int64_t* out) {
  extern __shared__ __align__(16) float sR[];  // [D][hp], then [kLshThreads][D + 8] of T
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hr = h / (H / Hr);
  const int hp = lsh_padded_half(half);
  const float* R = rotations + static_cast<int64_t>(hr) * D * half;
  for (int i = threadIdx.x; i < D * hp; i += blockDim.x) {
    const int d = i / hp, j = i % hp;
    sR[i] = j < half ? R[d * half + j] : 0.f;
  }
  const int row_elems = D + 8;  // 16 bytes of padding
  T* sX = reinterpret_cast<T*>(sR + D * hp);
  const int n0 = blockIdx.x * kLshThreads, chunks = D / 8;
  const T* head = x + b * layout.b + h * layout.h;
  for (int i = threadIdx.x; i < kLshThreads * chunks; i += blockDim.x) {
    const int r = i / chunks, c = i % chunks;
    if (n0 + r < N)
      *reinterpret_cast<uint4*>(sX + r * row_elems + c * 8) =
          *reinterpret_cast<const uint4*>(head + (n0 + r) * layout.n + c * 8);
  }
  __syncthreads();
  const int n = n0 + threadIdx.x;
  float best = -INFINITY, best_neg_val = -INFINITY;
  int best_pos = 0, best_neg = 0;
  if (n < N) {
    const T* row = sX + threadIdx.x * row_elems;
    // The projection of what is subtracted from this row (its block's offsets).
    const float* off =
        offsets ? offsets + (static_cast<int64_t>(bh) * ((N + offset_block - 1) / offset_block) +
                             n / offset_block) * half
                : nullptr;
    for (int j0 = 0; j0 < half; j0 += kLshGroup) {
      float acc[kLshGroup];
#pragma unroll
      for (int j = 0; j < kLshGroup; ++j) acc[j] = 0.f;
      for (int d0 = 0; d0 < D; d0 += 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + d0);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float xv = Pack2<T>::to_float(e[i]);
          const float4* r = reinterpret_cast<const float4*>(sR + (d0 + i) * hp + j0);
          const float4 lo = r[0], hi = r[1];
          acc[0] = fmaf(xv, lo.x, acc[0]);
          acc[1] = fmaf(xv, lo.y, acc[1]);
          acc[2] = fmaf(xv, lo.z, acc[2]);
          acc[3] = fmaf(xv, lo.w, acc[3]);
          acc[4] = fmaf(xv, hi.x, acc[4]);
          acc[5] = fmaf(xv, hi.y, acc[5]);
          acc[6] = fmaf(xv, hi.z, acc[6]);
          acc[7] = fmaf(xv, hi.w, acc[7]);
        }
      }
      // argmax over [p, -p]: all +p columns come first, then the -p ones.
#pragma unroll
      for (int j = 0; j < kLshGroup; ++j) {
        if (j0 + j >= half) break;
        if (off) acc[j] -= off[j0 + j];
        if (scores) scores[(static_cast<int64_t>(bh) * N + n) * half + j0 + j] = acc[j];
        if (acc[j] > best) best = acc[j], best_pos = j0 + j;
        if (-acc[j] > best_neg_val) best_neg_val = -acc[j], best_neg = j0 + j;
      }
    }
  }
  // With scores (a bucket cap), lsh_capped_kernel assigns the rows.
  if (n < N && !scores)
    out[static_cast<int64_t>(bh) * N + n] = best_neg_val > best ? half + best_neg : best_pos;
}

// ---------------------------------------------------------------------------
// shared pieces of the passes

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

// Shared-memory ints of a KeyPipeline: positions, buckets, source rows ahead.
constexpr int kKeyPipelineInts = 6 * kRows;

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
  int* sKpos = reinterpret_cast<int*>(kv + 4 * kRows * D);
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

// ---------------------------------------------------------------------------
// forward
//
// One block of kWarps warps (16 query rows each) per query block of
// kWarps * 16 packed rows (a union of consecutive 64-row tiles). Key tiles
// that meet it are found by a binary search over the key tile ranges plus a
// ballot over the candidates; K/V of the next meeting tile are loaded
// (cp.async, double buffer) while the current one is computed.

template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, D == 64 ? 2 : 1)
    forward_kernel(const __grid_constant__ ForwardParams p) {
  constexpr int kT = kWarps * 32, kBR = kWarps * 16;
  constexpr bool kQInRegs = D == 64;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  SmemTile<T, D> sQ{smem};
  T* kv = smem + kBR * D;  // K0 V0 K1 V1, then the key pipeline's ints

  const ForwardBlock<T> fb = forward_block<T, kBR>(p);
  if (!fb.exists || fb.dead) return;  // dropped rows: zero_dead_rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SwizzledLane<D> la = ldm_lane_a<D>(lane), lb = ldm_lane_b<D>(lane);

  load_rows_async<T, D, kT, kBR>(sQ, 0, fb.q, p.q_layout.n, fb.qperm, fb.q0, fb.q1);
  KeyPipeline<T, D, kT> pipe = start_key_pipeline<T, D, kT, kBR>(fb, p, kv, lane);

  RowInfo rows[2];
  bool valid[2];
  block_query_rows(fb, p, warp, lane, rows, valid);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;

  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kQInRegs ? D / 16 : 1][4];
  if constexpr (kQInRegs) load_a_fragments<T, D>(qf, sQ, warp * 16, la);

  while (pipe.kt >= 0) {
    pipe.wait_and_prefetch(lane);
    const SmemTile<T, D> sK = pipe.key_tile(), sV = pipe.value_tile();
    const int *kpos = pipe.pos(), *kbucket = pipe.bucket();
    const bool all_allowed = pipe.all_allowed;
    float s[8][4];
    if constexpr (kQInRegs)
      gemm_rows_tile_t<T, D>(s, qf, sK, lb);
    else
      gemm_smem_rows_tile_t<T, D>(s, sQ, warp * 16, sK, la, lb);

    softmax_tile<D>([&](int nb, int e) -> float& { return s[nb][e]; },
                    [&](int dn, int e) -> float& { return o[dn][e]; }, all_allowed, rows, kbucket,
                    kpos, m, l, scale_log2, lane);
    gemm_acc_tile<T, D>(o, s, sV, la);

    pipe.advance();
  }

  finish_rows<T, D>([&](int dn, int e) -> float& { return o[dn][e]; }, l, m, scale_log2, p, fb.b,
                    fb.h, fb.bh, rows, valid, lane);
}

// ---------------------------------------------------------------------------
// forward on Hopper (sm_90a, bf16): the same block, tile loop, masks and
// online softmax as forward_kernel, with the two products on warpgroup MMA.
// Two warpgroups of 4 warps own 64 query rows each (warp w: rows 16w..16w+15,
// as in forward_kernel). Q, K and V sit in shared memory as 128B-swizzled
// panels (wgmma.cuh):
//   S [64 x 64] = Q K^T   wgmma SS, Q and K K-major, D / 16 k-steps;
//   O [64 x D] += P V     wgmma RS, P packed to bf16 from the S accumulators
//                         (their layout is the A fragment's), V MN-major.
// The accumulators have the mma.sync m16n8 C layout per warp, so S[4 nb + e]
// is forward_kernel's s[nb][e] and O[4 dn + e] its o[dn][e].

constexpr int kWgFwdWarps = 8;  // two warpgroups

template <int D>
__global__ void __launch_bounds__(kWgFwdWarps * 32, D == 64 ? 2 : 1)
    forward_kernel_wgmma(const __grid_constant__ ForwardParams p) {
  using T = __nv_bfloat16;
  constexpr int kT = kWgFwdWarps * 32, kBR = kWgFwdWarps * 16;
  constexpr int kPanelBytes = kRows * 128;  // one [64 x 64] panel of a K or V tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Panels must start on 1024 bytes (the swizzle reads absolute address bits).
  T* smem = reinterpret_cast<T*>(smem_raw + ((1024 - wgmma::smem_addr(smem_raw) % 1024) % 1024));
  T* sQ = smem;            // [kBR x D] panels
  T* kv = sQ + kBR * D;    // K0 V0 K1 V1, [kRows x D] panels each, then the pipeline's ints

  const ForwardBlock<T> fb = forward_block<T, kBR>(p);
  if (!fb.exists || fb.dead) return;  // dropped rows: zero_dead_rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;

  KeyPipeline<T, D, kT, true> pipe = start_key_pipeline<T, D, kT, kBR, true>(fb, p, kv, lane);
  // Q only when a key tile meets the block (with dropping most blocks meet
  // none and just write zeros).
  if (pipe.kt >= 0)
    load_rows_async_sw128<T, D, kT, kBR>(sQ, fb.q, p.q_layout.n, fb.qperm, fb.q0, fb.q1);
  cp_async_commit();

  RowInfo rows[2];
  bool valid[2];
  block_query_rows(fb, p, warp, lane, rows, valid);

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  // This warpgroup's 64 rows of Q: panel pn at pn * kBR * 128 bytes, rows 64 wg on.
  const uint32_t q_addr = wgmma::smem_addr(sQ) + wg * 64 * 128;

  while (pipe.kt >= 0) {
    pipe.wait_and_prefetch(lane);  // also publishes Q on the first tile
    const uint32_t k_addr = wgmma::smem_addr(pipe.key_base());
    const uint32_t v_addr = wgmma::smem_addr(pipe.value_base());
    const int *kpos = pipe.pos(), *kbucket = pipe.bucket();
    const bool all_allowed = pipe.all_allowed;

    float s[32];
    wgmma::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t step = 32 * (ks % 4);  // k16 step inside its panel
      wgmma::mma_ss<64, 1, 1, 0, 0>(
          s, wgmma::desc_k_major_sw128(q_addr + (ks / 4) * kBR * 128 + step),
          wgmma::desc_k_major_sw128(k_addr + (ks / 4) * kPanelBytes + step), ks > 0);
    }
    wgmma::wgmma_commit();
    wgmma::wgmma_wait<0>();
    wgmma::fence_operands(s);

    softmax_tile<D>([&](int nb, int e) -> float& { return s[4 * nb + e]; },
                    [&](int dn, int e) -> float& { return o[4 * dn + e]; }, all_allowed, rows,
                    kbucket, kpos, m, l, scale_log2, lane);

    // O += P V: k-step j covers keys 16j..16j+15 (n-blocks 2j, 2j+1 of S).
    wgmma::wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t a[4] = {Pack2<T>::pack(s[8 * j + 0], s[8 * j + 1]),
                             Pack2<T>::pack(s[8 * j + 2], s[8 * j + 3]),
                             Pack2<T>::pack(s[8 * j + 4], s[8 * j + 5]),
                             Pack2<T>::pack(s[8 * j + 6], s[8 * j + 7])};
      wgmma::mma_rs<D, 1, 1, 1>(o, a, wgmma::desc_mn_major_sw128(v_addr + 2048 * j, kPanelBytes),
                                1);
    }
    wgmma::wgmma_commit();
    wgmma::wgmma_wait<0>();
    wgmma::fence_operands(o);

    pipe.advance();
  }

  finish_rows<T, D>([&](int dn, int e) -> float& { return o[4 * dn + e]; }, l, m, scale_log2, p,
                    fb.b, fb.h, fb.bh, rows, valid, lane);
}

// ---------------------------------------------------------------------------
// backward

// dQ (kRows x D) += dS (kRows x kBwdKeys) K into dq_accum (fp32 atomics, one
// per element), on mma.sync from dS^T ([kBwdKeys x kRows] SmemTile) and K
// ([kBwdKeys x D] SmemTile): warp w takes query rows 16 (w % 4) .. +15 and
// columns (D / 2) (w / 4) .. +D/2 - 1, over the 16-key row groups whose bit is
// set in active_warps (bit kk: keys 16kk..16kk+15 met the query tile).
template <typename T, int D>
__device__ __forceinline__ void dq_atomic_mma_sync(SmemTile<T, kRows> sdS, SmemTile<T, D> sK,
                                                   unsigned active_warps, const int* sQorig,
                                                   float* dq_accum_head, int warp, int lane) {
  constexpr int kCols = D / 2;
  const SwizzledLane<D> la = ldm_lane_a<D>(lane);
  const SwizzledLane<kRows> ds_lb = ldm_lane_b<kRows>(lane);
  const int qr0 = (warp % 4) * 16, c0 = (warp / 4) * kCols;
  float dq[kCols / 8][4];
#pragma unroll
  for (int i = 0; i < kCols / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  // This lane's addresses for the keys of warp 0; warp kk's are 16 kk rows
  // on. A rolled loop over the active warps keeps them in registers (the
  // unrolled, skippable steps had them recomputed from the lane index in
  // every step).
  const uint32_t ds_addr = sdS.ldm(ds_lb, 0, qr0);
  uint32_t k_addr[kCols / 16];
#pragma unroll
  for (int dn2 = 0; dn2 < kCols / 16; ++dn2) k_addr[dn2] = sK.ldm(la, 0, c0 + dn2 * 16);
#pragma unroll 1
  for (unsigned m = active_warps; m != 0; m &= m - 1) {
    const int kk = __ffs(m) - 1;
    uint32_t a[4];
    ldmatrix_x4_trans(a, ds_addr + kk * 16 * sdS.kRowBytes);
#pragma unroll
    for (int dn2 = 0; dn2 < kCols / 16; ++dn2) {
      uint32_t bk[4];
      ldmatrix_x4_trans(bk, k_addr[dn2] + kk * 16 * sK.kRowBytes);
      mma_16816<T>(dq[2 * dn2], a, bk[0], bk[1]);
      mma_16816<T>(dq[2 * dn2 + 1], a, bk[2], bk[3]);
    }
  }
  if (active_warps == 0) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int orig = sQorig[qr0 + lane / 4 + 8 * i];
    if (orig < 0) continue;
    float* dst = dq_accum_head + static_cast<int64_t>(orig) * D + c0 + (lane % 4) * 2;
#pragma unroll
    for (int dn = 0; dn < kCols / 8; ++dn) atomic_add2(dst + dn * 8, dq[dn][2 * i], dq[dn][2 * i + 1]);
  }
}

// The dK/dV kernels' stream of (query head of the GQA group, query tile)
// pairs that meet a block of keys, with Q and dO of each pair loaded into one
// of two buffers (qdo: Q0 dO0 Q1 dO1, [kRows x D] each; kPanels: as wgmma
// panels, else SmemTile layout) and the pair's per-row metadata.
// Shared-memory ints of a QueryTileStream's metadata.
constexpr int kQueryStreamInts = 2 * 6 * kRows;

template <typename T, int D, int kT, bool kPanels, bool kLookAhead = true, int kQdoBufs = 2>
struct QueryTileStream {
  const BackwardParams& p;
  int b, hk, group, nqt;
  const TileRange* qtiles0;  // the group's first head's query tiles
  TileRange kr;              // the key block's range
  bool q_identity;
  T* qdo;
  // [2 buffers][pos, bucket, lse, delta, orig, rows ahead][kRows] (kQueryStreamInts):
  // lse is the forward's (natural log, -inf for rows with no key), orig -1 past Nq.
  int* meta;
  int g = 0;
  MeetIter it;

  __device__ __forceinline__ void start_head(int gg, int lane) {
    const TileRange* qt = qtiles0 + static_cast<int64_t>(gg) * nqt;
    const IndexRange r = query_tile_range(qt, nqt, kr, q_identity, lane);
    it = MeetIter{qt, kr, r.lo, r.hi, 0u, false};
    it.fill(lane);
  }
  // Next (head, query tile) pair; false when done.
  __device__ __forceinline__ bool next(int& gg, int& qt, int lane) {
    while (true) {
      const int r = it.next(lane);
      if (r >= 0) {
        gg = g;
        qt = r;
        return true;
      }
      if (++g >= group) return false;
      start_head(g, lane);
    }
  }
  __device__ __forceinline__ const int* qperm_of(int gg) const {
    const ForwardParams& f = p.fwd;
    const int bh = b * f.H + hk * group + gg;
    return f.q_pack.perm ? f.q_pack.perm + static_cast<int64_t>(bh) * f.Nq : nullptr;
  }
  // Starts the copies of Q and dO of head gg's rows in g into Q/dO buffer qb.
  __device__ __forceinline__ void issue(int gg, const RowGather<D, kT, kRows>& g, int qb) const {
    const ForwardParams& f = p.fwd;
    const T* q = head_ptr<T>(f.q, f.q_layout, b, hk * group + gg);
    const T* dout = head_ptr<T>(p.dout, p.dout_layout, b, hk * group + gg);
    load_tile_gathered<T, D, kT, kRows, kPanels>(qdo + (2 * qb) * kRows * D, q, f.q_layout.n, g);
    load_tile_gathered<T, D, kT, kRows, kPanels>(qdo + (2 * qb + 1) * kRows * D, dout,
                                                 p.dout_layout.n, g);
  }
  // Row threadIdx.x of the pair (threads < kRows): its packed-row data.
  __device__ __forceinline__ RowInfo meta_row(int gg, int qt) const {
    const ForwardParams& f = p.fwd;
    const int64_t q_base = static_cast<int64_t>(b * f.H + hk * group + gg) * f.Nq;
    return row_info(f.q_pack, q_base, qt * kRows + threadIdx.x, f.Nq, f.Nk - f.Nq,
                    kInvalidQueryBucket);
  }
  // Row threadIdx.x's metadata into buffer bf (threads < kRows): position,
  // bucket and original row from qi, lse and delta by cp.async (in the pair's
  // copy group), so nothing waits on a load here.
  __device__ __forceinline__ void store_meta(int gg, int qt, const RowInfo& qi, int bf) const {
    const ForwardParams& f = p.fwd;
    const int64_t q_base = static_cast<int64_t>(b * f.H + hk * group + gg) * f.Nq;
    const bool in = qt * kRows + static_cast<int>(threadIdx.x) < f.Nq;
    int* m = meta + bf * 6 * kRows;
    m[threadIdx.x] = qi.pos;
    m[kRows + threadIdx.x] = qi.bucket;
    cp_async_4(m + 2 * kRows + threadIdx.x, f.lse + q_base + qi.orig, in);
    cp_async_4(m + 3 * kRows + threadIdx.x, p.delta + q_base + qi.orig, in);
    m[4 * kRows + threadIdx.x] = in ? qi.orig : -1;
  }
  __device__ __forceinline__ TileRange tile_of(int gg, int qt) const {
    return __ldg(&qtiles0[static_cast<int64_t>(gg) * nqt + qt]);
  }
  // The pair being computed (buffer bf) and the one being loaded (bf ^ 1):
  //   qs.begin(lane);
  //   while (qs.have) {
  //     cp_async_wait_all(); __syncthreads();
  //     qs.prefetch(lane);      // next pair into the other buffer
  //     ... qs.cur, qs.cg, qs.cqt, buffer qs.bf ...
  //     qs.advance();
  //   }
  // The pair after next is found one iteration ahead and its source rows and
  // packed-row data read then (loads in flight), so that neither the copies
  // nor the metadata loads wait on the permutation.
  bool have = false, nhave = false, ahave = false;
  int cg = 0, cqt = 0, ng = 0, nqt_ = 0, ag = 0, aqt = 0, bf = 0;
  // Q/dO buffers (kQdoBufs of them, cycled): the current pair's and the next's.
  // The metadata buffers are always two (bf).
  int qbuf = 0, nqbuf = 0;
  TileRange cur{0, -1, 0, -1}, ntile{0, -1, 0, -1};
  RowInfo arow{0, 0, 0};  // row threadIdx.x of pair (ag, aqt) (threads < kRows)

  // Its source rows, [kRows] in buffer b's metadata: written at advance(),
  // read by the next prefetch.
  __device__ __forceinline__ int* ahead_rows(int b) const { return meta + b * 6 * kRows + 5 * kRows; }
  __device__ __forceinline__ void look_ahead(int lane) {
    ahave = next(ag, aqt, lane);
    if (ahave && threadIdx.x < kRows) arow = meta_row(ag, aqt);
  }
  __device__ __forceinline__ void store_ahead(int b) const {
    if (!q_identity && threadIdx.x < kRows)
      ahead_rows(b)[threadIdx.x] =
          aqt * kRows + static_cast<int>(threadIdx.x) < p.fwd.Nq ? arow.orig : -1;
  }
  // Starts loading pair (gg, qt) into Q/dO buffer qb and metadata buffer mb,
  // reading the permutation now (the copies wait on it).
  __device__ __forceinline__ void load_pair_now(int gg, int qt, int qb, int mb) const {
    RowGather<D, kT, kRows> g;
    g.fetch(qperm_of(gg), qt * kRows, p.fwd.Nq);
    issue(gg, g, qb);
    if (threadIdx.x < kRows) store_meta(gg, qt, meta_row(gg, qt), mb);
  }
  // Finds the first pair and starts loading it (one cp.async group).
  __device__ __forceinline__ void begin(int lane) {
    start_head(0, lane);
    have = next(cg, cqt, lane);
    if (have) {
      load_pair_now(cg, cqt, 0, 0);
      cur = tile_of(cg, cqt);
      if constexpr (kLookAhead) {
        look_ahead(lane);
        if (ahave) store_ahead(1);
      }
    }
    cp_async_commit();
  }
  // Starts loading the next pair into the other buffer (one cp.async group).
  __device__ __forceinline__ void prefetch(int lane) {
    ntile = TileRange{0, -1, 0, -1};
    if constexpr (kLookAhead) {
      nhave = ahave;
      if (nhave) {
        ng = ag, nqt_ = aqt;
        RowGather<D, kT, kRows> g;
        if (q_identity)
          g.fetch(nullptr, nqt_ * kRows, p.fwd.Nq);  // nothing to wait for
        else
          g.from_rows(ahead_rows(bf ^ 1));
        nqbuf = qbuf + 1 == kQdoBufs ? 0 : qbuf + 1;
        issue(ng, g, nqbuf);
        ntile = tile_of(ng, nqt_);
        if (threadIdx.x < kRows) store_meta(ng, nqt_, arow, bf ^ 1);
        look_ahead(lane);
      }
    } else {
      nhave = next(ng, nqt_, lane);
      if (nhave) {
        nqbuf = qbuf + 1 == kQdoBufs ? 0 : qbuf + 1;
        load_pair_now(ng, nqt_, nqbuf, bf ^ 1);
        ntile = tile_of(ng, nqt_);
      }
    }
    cp_async_commit();
  }
  __device__ __forceinline__ void advance() {
    if (kLookAhead && ahave) store_ahead(bf);
    have = nhave;
    cur = ntile;
    cg = ng;
    cqt = nqt_;
    bf ^= 1;
    qbuf = nqbuf;
  }
  // Buffer bf's metadata.
  __device__ __forceinline__ const int* pos(int bf) const { return meta + bf * 6 * kRows; }
  __device__ __forceinline__ const int* bucket(int bf) const { return pos(bf) + kRows; }
  __device__ __forceinline__ const float* lse(int bf) const {
    return reinterpret_cast<const float*>(pos(bf) + 2 * kRows);
  }
  __device__ __forceinline__ const float* delta(int bf) const { return lse(bf) + kRows; }
  __device__ __forceinline__ const int* orig(int bf) const { return pos(bf) + 4 * kRows; }
};

// P^T of one warp's keys (rows) against a query tile (columns), in place on
// the S^T accumulators s(nb, e) (the m16n8 C layout): exp2(S^T scale_log2 -
// lse log2(e)) with the forward's natural-log lse, masked pairs 0. A row with
// no allowed key (lse -inf) is masked in every pair, so its +inf never
// survives the mask, and an all-allowed tile has no such row.
template <typename SAt>
__device__ __forceinline__ void backward_probs(SAt s, bool all_allowed, const float* sLse,
                                               const int* sQbucket, const int* sQpos,
                                               const RowInfo (&rows)[2], float scale_log2,
                                               int lane) {
  auto probs = [&](auto masked) {
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      const int col = nb * 8 + (lane % 4) * 2;
      const float2 lse = *reinterpret_cast<const float2*>(sLse + col);
      const float lse2x = lse.x * kLog2e, lse2y = lse.y * kLog2e;
      ColumnPair qc;
      if constexpr (decltype(masked)::value) qc = column_pair(sQbucket, sQpos, col);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        float x = fmaf(s(nb, e), scale_log2, -((e & 1) ? lse2y : lse2x));
        if constexpr (decltype(masked)::value) {
          x = pair_allowed(qc.b(e), qc.p(e), rows[i].bucket, rows[i].pos) ? x : -INFINITY;
        }
        s(nb, e) = fast_exp2(x);
      }
    }
  };
  if (all_allowed)
    probs(std::false_type{});
  else
    probs(std::true_type{});
}

// delta = rowsum(dout * out), original order, D / 8 threads per row with 8
// elements each (16-byte loads when `vec`: out and dout 16-byte aligned, their
// strides multiples of 8). Rows with no allowed key (lse -inf; their output is
// 0) get delta 0 without being read. With atomic dQ it also zeroes the rows of
// dq_accum that dQ will be read from (dq_finalize_kernel writes 0 for the rest).
template <typename T, int D>
__global__ void delta_kernel(const __grid_constant__ BackwardParams p, bool vec) {
  constexpr int kPerRow = D / 8;
  const ForwardParams& f = p.fwd;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / kPerRow) + threadIdx.x / kPerRow;
  const int c = (threadIdx.x % kPerRow) * 8;
  if (row >= static_cast<int64_t>(f.B) * f.H * f.Nq) return;  // whole rows: kPerRow divides 32
  const bool live = f.lse[row] != -INFINITY;
  float sum = 0.f;
  if (live) {
    const int i = row % f.Nq, bh = row / f.Nq, b = bh / f.H, h = bh % f.H;
    const T* o = head_ptr<T>(f.out, f.out_layout, b, h) + i * f.out_layout.n + c;
    const T* d = head_ptr<T>(p.dout, p.dout_layout, b, h) + i * p.dout_layout.n + c;
    if (vec) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o), dv = *reinterpret_cast<const uint4*>(d);
      const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 a = Pack2<T>::unpack(ow[e]), g = Pack2<T>::unpack(dw[e]);
        sum = fmaf(a.x, g.x, fmaf(a.y, g.y, sum));
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += Pack2<T>::to_float(o[e]) * Pack2<T>::to_float(d[e]);
    }
    if (p.dq_accum != nullptr) {
      float4* z = reinterpret_cast<float4*>(p.dq_accum + row * D + c);
      z[0] = z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int off = kPerRow / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
  if (c == 0) p.delta[row] = sum;
}

// Dropped rows (bucket dead_bucket or more: packed rows segments[dead_bucket]
// on) of one side: their rows of up to two [B, heads, n, D] outputs are set to
// 0 and, given lse ([B * heads, n]), their log-sum-exp to -inf. This is what the
// forward and dK/dV blocks of such rows would write; done here at full
// occupancy, those blocks exit at once (ForwardBlock::dead, KeyBlock::dead).
// D / 8 threads per row, 8 elements each (16-byte stores when `vec`).
struct DeadRowsOut {
  void* data;  // nullptr: none
  Layout layout;
};

template <int D>
__global__ void __launch_bounds__(256)
    zero_dead_rows_kernel(const __grid_constant__ Packing pk, int seqs, int heads, int n,
                          DeadRowsOut out0, DeadRowsOut out1, float* lse, bool vec) {
  constexpr int kPerRow = D / 8, kRowsPerBlock = 256 / kPerRow;
  const int c = (threadIdx.x % kPerRow) * 8;
  // Sequences step by gridDim.y (at most 65535).
  for (int seq = blockIdx.y; seq < seqs; seq += gridDim.y) {
    const int first = __ldg(pk.segments + static_cast<int64_t>(seq) * (pk.num_segments + 1) +
                            pk.dead_bucket);
    const int r = first + blockIdx.x * kRowsPerBlock + static_cast<int>(threadIdx.x) / kPerRow;
    if (r >= n) continue;
    const int orig = __ldg(pk.perm + static_cast<int64_t>(seq) * n + r);
    const int b = seq / heads, h = seq % heads;
    auto zero = [&](const DeadRowsOut& o) {
      if (o.data == nullptr) return;
      uint16_t* dst = static_cast<uint16_t*>(o.data) + b * o.layout.b + h * o.layout.h +
                      static_cast<int64_t>(orig) * o.layout.n + c;
      if (vec) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = 0;
      }
    };
    zero(out0);
    zero(out1);
    if (lse != nullptr && c == 0) lse[static_cast<int64_t>(seq) * n + orig] = -INFINITY;
  }
}

// Whether a side has dropped rows that zero_dead_rows_kernel serves (bucket
// segments, and dead buckets among them): exactly when blocks can be dead.
bool has_dead_rows(const Packing& pk) {
  return pk.segments != nullptr && pk.perm != nullptr && pk.dead_bucket < pk.num_segments;
}

// Rows of 2-byte elements that take 16-byte loads and stores: base 16-byte
// aligned and every stride a multiple of 8 elements.
bool rows_aligned16(const void* data, const Layout& l) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && l.b % 8 == 0 && l.h % 8 == 0 &&
         l.n % 8 == 0;
}

template <int D>
cudaError_t zero_dead_rows(const Packing& pk, int seqs, int heads, int n, DeadRowsOut out0,
                           DeadRowsOut out1, float* lse, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 256 / (D / 8);
  const bool vec = (out0.data == nullptr || rows_aligned16(out0.data, out0.layout)) &&
                   (out1.data == nullptr || rows_aligned16(out1.data, out1.layout));
  const dim3 grid((n + kRowsPerBlock - 1) / kRowsPerBlock, std::min(seqs, 65535));
  zero_dead_rows_kernel<D><<<grid, 256, 0, stream>>>(pk, seqs, heads, n, out0, out1, lse, vec);
  return cudaGetLastError();
}

// The dK/dV kernels' block of keys: row block blockIdx.x of KV sequence bhk
// (blockIdx.y: this pass runs row blocks fastest, see pass_grid), packed keys
// [k0, k1), and their range.
struct KeyBlock {
  bool exists;
  bool dead;  // a block of dropped keys (has_dead_rows: zeroed apart)
  int k0, k1;
  TileRange range;
};

__device__ __forceinline__ KeyBlock key_block(const ForwardParams& f, int bhk, int64_t k_base,
                                              int nkt) {
  const RowBlock rb = row_block<kBwdKeys>(f.k_pack, bhk, f.Nk, blockIdx.x, threadIdx.x % 32);
  KeyBlock kb{rb.exists, rb.exists && rb.segment >= f.k_pack.dead_bucket, rb.r0, rb.r1,
              TileRange{0, -1, INT_MAX, INT_MIN}};
  if (rb.exists)
    kb.range = row_block_range<kBwdKeys>(f.k_pack, f.k_pack.tiles + static_cast<int64_t>(bhk) * nkt,
                                         nkt, k_base, rb, 0);
  return kb;
}

// dK, dV for a block of kBwdKeys packed keys, 16 per warp: loops over the
// query heads of its group and the query tiles that can meet the block
// (binary search + ballot), Q and dO double buffered. A warp whose 16 keys
// cannot meet a query tile skips it. At D = 64, K and V stay in registers and
// the four products run in two interleaved pairs (S^T with dP^T, dV with dK);
// at D = 128 they come from shared memory and dP^T is done 32 columns at a time.
//
// kAtomicDq: dS of each query tile is also staged in shared memory and the
// block adds dQ += dS K into an fp32 buffer with atomics (one pass, the
// default). Otherwise dq_kernel computes dQ in a second, deterministic pass.
template <typename T, int D, bool kAtomicDq>
__global__ void __launch_bounds__(kBwdWarps * 32, 1)
    dkdv_kernel(const __grid_constant__ BackwardParams p) {
  const ForwardParams& f = p.fwd;
  constexpr int kT = kBwdWarps * 32;
  constexpr bool kKVInRegs = D == 64;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  SmemTile<T, D> sK{smem}, sV{smem + kBwdKeys * D};
  T* qdo = smem + 2 * kBwdKeys * D;  // Q0 dO0 Q1 dO1, kRows rows each
  // dS^T of the current query tile, [key][query] (kAtomicDq only).
  SmemTile<T, kRows> sdS{qdo + 4 * kRows * D};
  int* meta = reinterpret_cast<int*>(qdo + 4 * kRows * D + (kAtomicDq ? kBwdKeys * kRows : 0));
  // meta: the query stream's kQueryStreamInts, then per warp 1 << warp if
  // its keys met the query tile, else 0.
  int* warp_active = meta + kQueryStreamInts;

  const int bhk = blockIdx.y, b = bhk / f.Hkv, hk = bhk % f.Hkv;
  const int group = f.H / f.Hkv, nqt = num_tiles(f.Nq), nkt = num_tiles(f.Nk);
  const int64_t k_base = static_cast<int64_t>(bhk) * f.Nk;
  const KeyBlock kblk = key_block(f, bhk, k_base, nkt);
  if (!kblk.exists || kblk.dead) return;  // dropped keys: zero_dead_rows
  const int k0 = kblk.k0, k1 = kblk.k1;
  const TileRange kr = kblk.range;
  const int* kperm = f.k_pack.perm ? f.k_pack.perm + k_base : nullptr;
  load_rows_async<T, D, kT, kBwdKeys>(sK, 0, head_ptr<T>(f.k, f.k_layout, b, hk), f.k_layout.n,
                                      kperm, k0, k1);
  load_rows_async<T, D, kT, kBwdKeys>(sV, 0, head_ptr<T>(f.v, f.v_layout, b, hk), f.v_layout.n,
                                      kperm, k0, k1);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SwizzledLane<D> la = ldm_lane_a<D>(lane), lb = ldm_lane_b<D>(lane);
  // dS^T tile (kRows columns): stores of accumulator pairs, B-pattern loads.
  const SwizzledLane<kRows> ds_acc = acc_lane<kRows>(lane);
  QueryTileStream<T, D, kT, false, D == 64> qs{
      p, b, hk, group, nqt, f.q_pack.tiles + static_cast<int64_t>(b * f.H + hk * group) * nqt, kr,
      f.q_pack.perm == nullptr, qdo, meta};
  qs.begin(lane);

  // This warp's 16 keys, and their bucket and position ranges (for skipping).
  RowInfo rows[2];
  bool valid[2];
  int wb_lo = INT_MAX, wb_hi = INT_MIN, wpos_lo = INT_MAX;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = k0 + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < k1;
    rows[i] = row_info(f.k_pack, k_base, packed, k1, 0, kInvalidKeyBucket);
    if (valid[i]) {
      wb_lo = min(wb_lo, rows[i].bucket);
      wb_hi = max(wb_hi, rows[i].bucket);
      wpos_lo = min(wpos_lo, rows[i].pos);
    }
  }
#pragma unroll
  for (int off = 4; off < 32; off *= 2) {  // lanes with the same lane % 4 hold the same rows
    wb_lo = min(wb_lo, __shfl_xor_sync(0xffffffffu, wb_lo, off));
    wb_hi = max(wb_hi, __shfl_xor_sync(0xffffffffu, wb_hi, off));
    wpos_lo = min(wpos_lo, __shfl_xor_sync(0xffffffffu, wpos_lo, off));
  }
  // Every pair of this warp's keys with a complete query tile q is allowed.
  const int wpos_hi_full = [&] {
    int hi = valid[0] && valid[1] ? max(rows[0].pos, rows[1].pos) : INT_MAX;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    return hi;
  }();
  const float scale_log2 = f.scale * kLog2e;

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  cp_async_wait_all();
  __syncthreads();
  uint32_t kf[kKVInRegs ? D / 16 : 1][4], vf[kKVInRegs ? D / 16 : 1][4];
  if constexpr (kKVInRegs) {
    load_a_fragments<T, D>(kf, sK, warp * 16, la);
    load_a_fragments<T, D>(vf, sV, warp * 16, la);
  }

  while (qs.have) {
    cp_async_wait_all();
    __syncthreads();  // tile in; the other buffers, sdS and the flags are free again
    qs.prefetch(lane);
    const int bf = qs.bf, cg = qs.cg, cqt = qs.cqt;
    const TileRange cur = qs.cur;

    const SmemTile<T, D> sQ{qdo + (2 * qs.qbuf) * kRows * D}, sdO{qdo + (2 * qs.qbuf + 1) * kRows * D};
    const int *sQpos = qs.pos(bf), *sQbucket = qs.bucket(bf), *sQorig = qs.orig(bf);
    const float *sLse = qs.lse(bf), *sDelta = qs.delta(bf);

    const bool active = wb_lo <= cur.y && wb_hi >= cur.x && wpos_lo <= cur.w;
    const bool all_allowed = cur.x == cur.y && wb_lo == wb_hi && wb_lo == cur.x &&
                             wpos_hi_full <= cur.z && (cqt + 1) * kRows <= f.Nq;
    if (active) {
      float s[8][4];
      auto apply_probs = [&] {  // P^T; masked pairs get exp2(-inf) = 0
        backward_probs([&](int nb, int e) -> float& { return s[nb][e]; }, all_allowed, sLse,
                       sQbucket, sQpos, rows, scale_log2, lane);
      };
      if constexpr (kKVInRegs) {
        // S^T = K Q^T and dP^T = V dO^T side by side: 16 independent
        // accumulators hide the mma latency.
        float dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
          for (int nb2 = 0; nb2 < 4; ++nb2) {
            uint32_t bq[4], bo[4];
            ldmatrix_x4(bq, sQ.ldm(lb, nb2 * 16, kk * 16));
            ldmatrix_x4(bo, sdO.ldm(lb, nb2 * 16, kk * 16));
            mma_16816<T>(s[2 * nb2], kf[kk], bq[0], bq[1]);
            mma_16816<T>(dp[2 * nb2], vf[kk], bo[0], bo[1]);
            mma_16816<T>(s[2 * nb2 + 1], kf[kk], bq[2], bq[3]);
            mma_16816<T>(dp[2 * nb2 + 1], vf[kk], bo[2], bo[3]);
          }
        }
        apply_probs();
        // P^T and dS^T = P^T * (dP^T - delta) as bf16/fp16 A fragments.
        uint32_t pf[4][4], dsf[4][4];
#pragma unroll
        for (int hb = 0; hb < 8; ++hb) {
          const float2 delta = *reinterpret_cast<const float2*>(sDelta + hb * 8 + (lane % 4) * 2);
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[hb][e] = s[hb][e] * (dp[hb][e] - ((e & 1) ? delta.y : delta.x));
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          pf[j][0] = Pack2<T>::pack(s[2 * j][0], s[2 * j][1]);
          pf[j][1] = Pack2<T>::pack(s[2 * j][2], s[2 * j][3]);
          pf[j][2] = Pack2<T>::pack(s[2 * j + 1][0], s[2 * j + 1][1]);
          pf[j][3] = Pack2<T>::pack(s[2 * j + 1][2], s[2 * j + 1][3]);
          dsf[j][0] = Pack2<T>::pack(dp[2 * j][0], dp[2 * j][1]);
          dsf[j][1] = Pack2<T>::pack(dp[2 * j][2], dp[2 * j][3]);
          dsf[j][2] = Pack2<T>::pack(dp[2 * j + 1][0], dp[2 * j + 1][1]);
          dsf[j][3] = Pack2<T>::pack(dp[2 * j + 1][2], dp[2 * j + 1][3]);
          if constexpr (kAtomicDq) {  // dS^T rows of this warp's keys, for dQ below
            *sdS.pair(ds_acc, warp * 16, j * 16) = dsf[j][0];
            *sdS.pair(ds_acc, warp * 16 + 8, j * 16) = dsf[j][1];
            *sdS.pair(ds_acc, warp * 16, j * 16 + 8) = dsf[j][2];
            *sdS.pair(ds_acc, warp * 16 + 8, j * 16 + 8) = dsf[j][3];
          }
        }
        // dV += P^T dO and dK += dS^T Q side by side.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int dn2 = 0; dn2 < D / 16; ++dn2) {
            uint32_t bo[4], bq[4];
            ldmatrix_x4_trans(bo, sdO.ldm(la, j * 16, dn2 * 16));
            ldmatrix_x4_trans(bq, sQ.ldm(la, j * 16, dn2 * 16));
            mma_16816<T>(dv[2 * dn2], pf[j], bo[0], bo[1]);
            mma_16816<T>(dk[2 * dn2], dsf[j], bq[0], bq[1]);
            mma_16816<T>(dv[2 * dn2 + 1], pf[j], bo[2], bo[3]);
            mma_16816<T>(dk[2 * dn2 + 1], dsf[j], bq[2], bq[3]);
          }
        }
      } else {
        // S^T = K Q^T: keys are this warp's rows, queries the columns.
        gemm_smem_rows_tile_t<T, D>(s, sK, warp * 16, sQ, la, lb);
        apply_probs();
        gemm_acc_tile<T, D>(dv, s, sdO, la);  // dV += P^T dO

        // dS^T = P^T * (V dO^T - delta), dK += dS^T Q, 32 query columns at a
        // time (dK, dV, P^T and dP^T all in registers at D = 128 would spill).
        constexpr int kJ = 2;
#pragma unroll
        for (int j0 = 0; j0 < 4; j0 += kJ) {
          float dp[2 * kJ][4];
#pragma unroll
          for (int i = 0; i < 2 * kJ; ++i) dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            ldmatrix_x4(a, sV.ldm(la, warp * 16, kk * 16));
#pragma unroll
            for (int jj = 0; jj < kJ; ++jj) {
              uint32_t bb[4];
              ldmatrix_x4(bb, sdO.ldm(lb, (j0 + jj) * 16, kk * 16));
              mma_16816<T>(dp[2 * jj], a, bb[0], bb[1]);
              mma_16816<T>(dp[2 * jj + 1], a, bb[2], bb[3]);
            }
          }
#pragma unroll
          for (int hb = 0; hb < 2 * kJ; ++hb) {
            const float2 delta = *reinterpret_cast<const float2*>(sDelta + (2 * j0 + hb) * 8 + (lane % 4) * 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) s[2 * j0 + hb][e] *= dp[hb][e] - ((e & 1) ? delta.y : delta.x);
          }
#pragma unroll
          for (int jj = 0; jj < kJ; ++jj) {
            const int j = j0 + jj;
            uint32_t a[4];
            a[0] = Pack2<T>::pack(s[2 * j][0], s[2 * j][1]);
            a[1] = Pack2<T>::pack(s[2 * j][2], s[2 * j][3]);
            a[2] = Pack2<T>::pack(s[2 * j + 1][0], s[2 * j + 1][1]);
            a[3] = Pack2<T>::pack(s[2 * j + 1][2], s[2 * j + 1][3]);
            if constexpr (kAtomicDq) {  // dS^T rows of this warp's keys, for dQ below
              *sdS.pair(ds_acc, warp * 16, j * 16) = a[0];
              *sdS.pair(ds_acc, warp * 16 + 8, j * 16) = a[1];
              *sdS.pair(ds_acc, warp * 16, j * 16 + 8) = a[2];
              *sdS.pair(ds_acc, warp * 16 + 8, j * 16 + 8) = a[3];
            }
#pragma unroll
            for (int dn2 = 0; dn2 < D / 16; ++dn2) {
              uint32_t bq[4];
              ldmatrix_x4_trans(bq, sQ.ldm(la, j * 16, dn2 * 16));
              mma_16816<T>(dk[2 * dn2], a, bq[0], bq[1]);
              mma_16816<T>(dk[2 * dn2 + 1], a, bq[2], bq[3]);
            }
          }
        }
      }
    }

    if constexpr (kAtomicDq) {
      // dQ (kRows x D) += dS (kRows x kBwdKeys) K: warp w takes query rows
      // 16 (w % 4) .. +15 and columns (D / 2) (w / 4) .. +D/2 - 1, and skips
      // the keys of warps that had nothing to do.
      if (lane == 0) warp_active[warp] = active ? 1 << warp : 0;
      __syncthreads();
      unsigned active_warps = 0;  // bit kk: warp kk's keys met the query tile
#pragma unroll
      for (int kk = 0; kk < kBwdWarps; ++kk) active_warps |= warp_active[kk];
      const int bh = b * f.H + hk * group + cg;
      dq_atomic_mma_sync<T, D>(sdS, sK, active_warps, sQorig,
                               p.dq_accum + static_cast<int64_t>(bh) * f.Nq * D, warp, lane);
    }

    qs.advance();
  }
  const float one[2] = {1.f, 1.f}, scale[2] = {f.scale, f.scale};
  store_rows<T, D>(dk, scale,
                   static_cast<T*>(p.dk) + b * p.dk_layout.b + hk * p.dk_layout.h,
                   p.dk_layout.n, rows, valid, lane);
  store_rows<T, D>(dv, one, static_cast<T*>(p.dv) + b * p.dv_layout.b + hk * p.dv_layout.h,
                   p.dv_layout.n, rows, valid, lane);
}

// ---------------------------------------------------------------------------
// dK/dV on Hopper (sm_90a, bf16): dkdv_kernel's blocks of 128 keys and its
// loop over the query tiles that meet them, with every product on warpgroup
// MMA. Two warpgroups own 64 keys each (warp w: keys 16w..16w+15, as in
// dkdv_kernel); K, V, Q, dO and dS^T sit in shared memory as 128B-swizzled
// panels. Per query tile (64 queries):
//   S^T  [64 x 64] = K Q^T      SS, K and Q K-major;
//   dP^T [64 x 64] = V dO^T     SS, V and dO K-major;
//   P^T, dS^T = P^T (dP^T - delta) in registers (dkdv_kernel's code);
//   dV [64 x D] += P^T dO        RS, dO MN-major;
//   dK [64 x D] += dS^T Q        RS, Q MN-major;
//   dQ [64 x D] += dS K, from dS^T stored to shared memory, fp32 atomics as
//     in dkdv_kernel: at D = 128 on wgmma SS (dS^T and K MN-major), warpgroup
//     g taking columns 64g..64g+63; at D = 64 deferred to the next iteration,
//     wgmma SS m64n32k16, warpgroup g taking columns 32g..32g+31.
// A warpgroup whose keys cannot meet the query tile skips its products.

template <int D, bool kAtomicDq>
__global__ void __launch_bounds__(kBwdWarps * 32, 1)
    dkdv_kernel_wgmma(const __grid_constant__ BackwardParams p) {
  using T = __nv_bfloat16;
  const ForwardParams& f = p.fwd;
  constexpr int kT = kBwdWarps * 32;
  constexpr int kKPanel = kBwdKeys * 128;  // bytes of one 64-column panel of K, V, dS^T
  constexpr int kQPanel = kRows * 128;     // of Q, dO
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw + ((1024 - wgmma::smem_addr(smem_raw) % 1024) % 1024));
  T* sK = smem;                          // [kBwdKeys x D] panels
  T* sV = sK + kBwdKeys * D;
  // D = 64: the dQ of query tile i runs in iteration i + 1, ahead of
  // that iteration's S^T / dP^T wgmma; its dS^T, flags and
  // original rows are double-buffered and published by the iteration's first
  // barrier, so the loop has one block barrier per tile instead of two. The
  // dV/dK wgmma of tile i are retired in iteration i + 1 too, once its S^T /
  // dP^T are issued; their Q/dO buffer is then still being read, so Q/dO have
  // three buffers.
  // That dQ is wgmma SS m64n32k16 over all 128 keys: warpgroup g takes
  // columns 32g..32g+31 (the half of K's panel 64 g bytes in), one atomic per
  // element. It is issued before the next tile's S^T / dP^T, so its atomics
  // run while those are computed.
  constexpr bool kDeferDq = kAtomicDq && D == 64;
  constexpr int kQdoBufs = kDeferDq ? 3 : 2;
  T* qdo = sV + kBwdKeys * D;  // Q0 dO0 Q1 dO1 (Q2 dO2), [kRows x D] panels each
  // dS^T [kBwdKeys x kRows], one panel each; two when dQ is deferred.
  T* sdS = qdo + 2 * kQdoBufs * kRows * D;
  int* meta = reinterpret_cast<int*>(sdS + 2 * kBwdKeys * kRows);
  // meta: the query stream's kQueryStreamInts, then per dS^T buffer and
  // warpgroup 1 if its keys met the query tile ([2][2]), a reduction area
  // ([2][5]) and per dS^T buffer the query tile's original rows ([2][kRows]).
  int* wg_active = meta + kQueryStreamInts;
  int* dq_orig = wg_active + 4 + 10;

  const int bhk = blockIdx.y, b = bhk / f.Hkv, hk = bhk % f.Hkv;
  const int group = f.H / f.Hkv, nqt = num_tiles(f.Nq), nkt = num_tiles(f.Nk);
  const int64_t k_base = static_cast<int64_t>(bhk) * f.Nk;
  const KeyBlock kblk = key_block(f, bhk, k_base, nkt);
  if (!kblk.exists || kblk.dead) return;  // dropped keys: zero_dead_rows
  const int k0 = kblk.k0, k1 = kblk.k1;
  const TileRange kr = kblk.range;
  const int* kperm = f.k_pack.perm ? f.k_pack.perm + k_base : nullptr;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  // At D = 128 the look-ahead's registers would spill in the loop.
  QueryTileStream<T, D, kT, true, D == 64, kQdoBufs> qs{
      p, b, hk, group, nqt, f.q_pack.tiles + static_cast<int64_t>(b * f.H + hk * group) * nqt, kr,
      f.q_pack.perm == nullptr, qdo, meta};
  qs.begin(lane);
  // K and V only when a query tile meets the block (with dropping most blocks
  // meet none and just write zeros).
  if (qs.have) {
    load_rows_async_sw128<T, D, kT, kBwdKeys>(sK, head_ptr<T>(f.k, f.k_layout, b, hk),
                                              f.k_layout.n, kperm, k0, k1);
    load_rows_async_sw128<T, D, kT, kBwdKeys>(sV, head_ptr<T>(f.v, f.v_layout, b, hk),
                                              f.v_layout.n, kperm, k0, k1);
  }
  cp_async_commit();

  // This thread's two keys, and the bucket and position ranges of the
  // warpgroup's 64 keys (for skipping).
  RowInfo rows[2];
  bool valid[2];
  int wb_lo = INT_MAX, wb_hi = INT_MIN, wpos_lo = INT_MAX, wpos_hi = INT_MIN;
  bool all_valid = true;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = k0 + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < k1;
    rows[i] = row_info(f.k_pack, k_base, packed, k1, 0, kInvalidKeyBucket);
    if (valid[i]) {
      wb_lo = min(wb_lo, rows[i].bucket);
      wb_hi = max(wb_hi, rows[i].bucket);
      wpos_lo = min(wpos_lo, rows[i].pos);
      wpos_hi = max(wpos_hi, rows[i].pos);
    } else {
      all_valid = false;
    }
  }
  {
    // Reduce over the warpgroup through shared memory (reusing wg_active's
    // neighbours would race; a small dedicated area follows it).
    int* red = wg_active + 4;  // [2 warpgroups][5]
    if (threadIdx.x < 10) red[threadIdx.x] = (threadIdx.x % 5 == 0 || threadIdx.x % 5 == 2)
                                                 ? INT_MAX
                                                 : (threadIdx.x % 5 == 4 ? 1 : INT_MIN);
    __syncthreads();
    atomicMin(&red[wg * 5 + 0], wb_lo);
    atomicMax(&red[wg * 5 + 1], wb_hi);
    atomicMin(&red[wg * 5 + 2], wpos_lo);
    atomicMax(&red[wg * 5 + 3], wpos_hi);
    if (!all_valid) atomicAnd(&red[wg * 5 + 4], 0);
    __syncthreads();
    wb_lo = red[wg * 5 + 0];
    wb_hi = red[wg * 5 + 1];
    wpos_lo = red[wg * 5 + 2];
    wpos_hi = red[wg * 5 + 3];
    all_valid = red[wg * 5 + 4] != 0;
  }
  // Every pair of this warpgroup's keys with a complete query tile q is allowed.
  const int wpos_hi_full = all_valid ? wpos_hi : INT_MAX;
  const float scale_log2 = f.scale * kLog2e;

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  const uint32_t k_addr = wgmma::smem_addr(sK), v_addr = wgmma::smem_addr(sV);
  const uint32_t ds_addr = wgmma::smem_addr(sdS);

  uint32_t pf[4][4], dsf[4][4];  // P^T and dS^T as wgmma A fragments
  int dsb = 0;              // this tile's dS^T buffer (kDeferDq)
  bool dq_pending = false;  // the previous tile's dQ is still to do
  int dq_cg = 0;            // its query head in the group
  // kDeferDq: dQ = dS K of the tile whose dS^T is in buffer db, this
  // warpgroup's 32 columns over all 128 keys (an idle warpgroup's dS^T rows
  // are zeros); dS^T (A) and K (B) MN-major. One commit group.
  auto issue_dq = [&](float (&dq)[16], int db) {
    const uint32_t a0 = ds_addr + db * (kBwdKeys * kRows * 2);
    wgmma::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBwdKeys / 16; ++ks)
      wgmma::mma_ss<32, 1, 1, 1, 1>(
          dq, wgmma::desc_mn_major_sw128(a0 + 2048 * ks, kKPanel),
          wgmma::desc_mn_major_sw128(k_addr + 64 * wg + 2048 * ks, kKPanel), ks > 0);
    wgmma::wgmma_commit();
  };
  // ... and its atomics into dq_accum (query head gg of the group), once retired.
  auto add_dq = [&](const float (&dq)[16], int db, int gg) {
    const int* fl = wg_active + 2 * db;
    if (!fl[0] && !fl[1]) return;  // no key of the block met the tile
    const int bh = b * f.H + hk * group + gg;
    float* head = p.dq_accum + static_cast<int64_t>(bh) * f.Nq * D;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int orig = dq_orig[db * kRows + (warp % 4) * 16 + lane / 4 + 8 * i];
      if (orig < 0) continue;
      float* dst = head + static_cast<int64_t>(orig) * D + 32 * wg + (lane % 4) * 2;
#pragma unroll
      for (int j = 0; j < 4; ++j) atomic_add2(dst + 8 * j, dq[4 * j + 2 * i], dq[4 * j + 2 * i + 1]);
    }
  };

  while (qs.have) {
    cp_async_wait_all();
    wgmma::fence_proxy_async_shared();
    __syncthreads();  // tile in; the other buffers, sdS and the flags are free again
    qs.prefetch(lane);
    const int bf = qs.bf, cg = qs.cg, cqt = qs.cqt;
    const TileRange cur = qs.cur;

    const uint32_t q_addr = wgmma::smem_addr(qdo + (2 * qs.qbuf) * kRows * D);
    const uint32_t do_addr = wgmma::smem_addr(qdo + (2 * qs.qbuf + 1) * kRows * D);
    const int *sQpos = qs.pos(bf), *sQbucket = qs.bucket(bf), *sQorig = qs.orig(bf);
    const float *sLse = qs.lse(bf), *sDelta = qs.delta(bf);

    const bool active = wb_lo <= cur.y && wb_hi >= cur.x && wpos_lo <= cur.w;
    const bool all_allowed = cur.x == cur.y && wb_lo == wb_hi && wb_lo == cur.x &&
                             wpos_hi_full <= cur.z && (cqt + 1) * kRows <= f.Nq;
    // With dQ deferred, S^T and dP^T are issued whether or not this
    // warpgroup's keys meet the tile (a branch around wgmma that overlaps the
    // dQ code makes ptxas serialize every wgmma); an idle warpgroup discards them.
    const bool issue_sdp = kDeferDq || active;
    float s[32], dp[32];
    // kDeferDq: the previous tile's dQ first (on the first tile its result is
    // dropped), so that its atomics overlap S^T / dP^T.
    float dq[kDeferDq ? 16 : 1];
    if constexpr (kDeferDq) issue_dq(dq, dsb ^ 1);
    if (issue_sdp) {
      wgmma::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const uint32_t a_off = (ks / 4) * kKPanel + wg * 64 * 128 + 32 * (ks % 4);
        const uint32_t b_off = (ks / 4) * kQPanel + 32 * (ks % 4);
        wgmma::mma_ss<64, 1, 1, 0, 0>(s, wgmma::desc_k_major_sw128(k_addr + a_off),
                                      wgmma::desc_k_major_sw128(q_addr + b_off), ks > 0);
        wgmma::mma_ss<64, 1, 1, 0, 0>(dp, wgmma::desc_k_major_sw128(v_addr + a_off),
                                      wgmma::desc_k_major_sw128(do_addr + b_off), ks > 0);
      }
      wgmma::wgmma_commit();
    }
    if constexpr (kDeferDq) {
      // The previous tile's dV/dK and dQ (the older groups) are done; pf and
      // dsf are free. Its dQ atomics while S^T and dP^T are computed.
      wgmma::wgmma_wait<1>();
      wgmma::fence_operands(dk);
      wgmma::fence_operands(dv);
      wgmma::fence_operands(pf);
      wgmma::fence_operands(dsf);
      wgmma::fence_operands(dq);
      if (dq_pending) add_dq(dq, dsb ^ 1, dq_cg);
    }
    if (issue_sdp) {
      wgmma::wgmma_wait<0>();
      wgmma::fence_operands(s);
      wgmma::fence_operands(dp);
    }
    if (active) {
      // P^T; masked pairs get exp2(-inf) = 0
      backward_probs([&](int nb, int e) -> float& { return s[4 * nb + e]; }, all_allowed, sLse,
                     sQbucket, sQpos, rows, scale_log2, lane);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        const float2 delta = *reinterpret_cast<const float2*>(sDelta + nb * 8 + (lane % 4) * 2);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          dp[4 * nb + e] = s[4 * nb + e] * (dp[4 * nb + e] - ((e & 1) ? delta.y : delta.x));
      }
    } else if constexpr (kDeferDq) {
      // An idle warpgroup adds zeros (its wgmma are not skipped: see above).
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = dp[i] = 0.f;
    }
    if (kDeferDq || active) {
      // P^T and dS^T as A fragments; dS^T also to shared memory for dQ.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          pf[j][r] = Pack2<T>::pack(s[8 * j + 2 * r], s[8 * j + 2 * r + 1]);
          dsf[j][r] = Pack2<T>::pack(dp[8 * j + 2 * r], dp[8 * j + 2 * r + 1]);
        }
        if constexpr (kAtomicDq) {
          const int key = warp * 16 + lane / 4, q = j * 16 + (lane % 4) * 2;
          uint32_t* base = reinterpret_cast<uint32_t*>(sdS + (kDeferDq ? dsb * kBwdKeys * kRows : 0));
          base[wgmma::sw128_index(key, q, kBwdKeys) / 2] = dsf[j][0];
          base[wgmma::sw128_index(key + 8, q, kBwdKeys) / 2] = dsf[j][1];
          base[wgmma::sw128_index(key, q + 8, kBwdKeys) / 2] = dsf[j][2];
          base[wgmma::sw128_index(key + 8, q + 8, kBwdKeys) / 2] = dsf[j][3];
        }
      }
      wgmma::wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wgmma::mma_rs<D, 1, 1, 1>(dv, pf[j], wgmma::desc_mn_major_sw128(do_addr + 2048 * j, kQPanel),
                                  1);
        wgmma::mma_rs<D, 1, 1, 1>(dk, dsf[j], wgmma::desc_mn_major_sw128(q_addr + 2048 * j, kQPanel),
                                  1);
      }
      wgmma::wgmma_commit();
      if constexpr (!kDeferDq) {
        // Retire them here (pf and dsf are read asynchronously).
        wgmma::wgmma_wait<0>();
        wgmma::fence_operands(dk);
        wgmma::fence_operands(dv);
      }
    }

    if constexpr (kDeferDq) {
      // This tile's dQ runs next iteration (or after the loop), after the barrier.
      if (threadIdx.x % 128 == 0) wg_active[2 * dsb + wg] = active ? 1 : 0;
      if (threadIdx.x < kRows) dq_orig[dsb * kRows + threadIdx.x] = sQorig[threadIdx.x];
      dq_pending = true;
      dq_cg = cg;
      dsb ^= 1;
    } else if constexpr (kAtomicDq) {
      if (threadIdx.x % 128 == 0) wg_active[wg] = active ? 1 : 0;
      wgmma::fence_proxy_async_shared();  // the dS^T stores, for wgmma
      __syncthreads();
      const bool act0 = wg_active[0] != 0, act1 = wg_active[1] != 0;
      // D = 128: warpgroup g takes columns 64 g .. 64 g + 63 over the keys of
      // the active warpgroups, on wgmma (dS^T and K MN-major).
      {
        if (act0 || act1) {
          float dq[32];
          wgmma::wgmma_fence();
          int first = 1;
#pragma unroll
          for (int ks = 0; ks < kBwdKeys / 16; ++ks) {
            if (!(ks < 4 ? act0 : act1)) continue;  // keys of an idle warpgroup
            wgmma::mma_ss<64, 1, 1, 1, 1>(
                dq, wgmma::desc_mn_major_sw128(ds_addr + 2048 * ks, kKPanel),
                wgmma::desc_mn_major_sw128(k_addr + wg * kKPanel + 2048 * ks, kKPanel), !first);
            first = 0;
          }
          wgmma::wgmma_commit();
          wgmma::wgmma_wait<0>();
          wgmma::fence_operands(dq);
          const int bh = b * f.H + hk * group + cg;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int orig = sQorig[(warp % 4) * 16 + lane / 4 + 8 * i];
            if (orig < 0) continue;
            float* dst = p.dq_accum + (static_cast<int64_t>(bh) * f.Nq + orig) * D + wg * 64 +
                         (lane % 4) * 2;
#pragma unroll
            for (int dn = 0; dn < 8; ++dn)
              atomic_add2(dst + dn * 8, dq[4 * dn + 2 * i], dq[4 * dn + 2 * i + 1]);
          }
        }
      }
    }

    qs.advance();
  }
  if constexpr (kDeferDq) {
    wgmma::wgmma_wait<0>();  // the last tile's dV/dK
    wgmma::fence_operands(dk);
    wgmma::fence_operands(dv);
    if (dq_pending) {
      wgmma::fence_proxy_async_shared();  // the dS^T stores, for wgmma
      __syncthreads();  // the last tile's dS^T, flags and rows
      float dq[16];
      issue_dq(dq, dsb ^ 1);
      wgmma::wgmma_wait<0>();
      wgmma::fence_operands(dq);
      add_dq(dq, dsb ^ 1, dq_cg);
    }
  }
  cp_async_wait_all();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!valid[i]) continue;
    T* dkd = static_cast<T*>(p.dk) + b * p.dk_layout.b + hk * p.dk_layout.h + rows[i].orig * p.dk_layout.n;
    T* dvd = static_cast<T*>(p.dv) + b * p.dv_layout.b + hk * p.dv_layout.h + rows[i].orig * p.dv_layout.n;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int col = dn * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(dkd + col) =
          Pack2<T>::pack(dk[4 * dn + 2 * i] * f.scale, dk[4 * dn + 2 * i + 1] * f.scale);
      *reinterpret_cast<uint32_t*>(dvd + col) = Pack2<T>::pack(dv[4 * dn + 2 * i], dv[4 * dn + 2 * i + 1]);
    }
  }
}

// dq = scale * dq_accum, into the caller's layout (dq_accum is [B, H, Nq, D]),
// 8 elements per thread; one 16-byte store each when `vec` (dq and its strides
// 16-byte aligned).
template <typename T, int D>
__global__ void dq_finalize_kernel(const __grid_constant__ BackwardParams p, bool vec) {
  const ForwardParams& f = p.fwd;
  const int64_t chunk = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (chunk >= static_cast<int64_t>(f.B) * f.H * f.Nq * (D / 8)) return;
  const int64_t row = chunk / (D / 8);
  const int c = static_cast<int>(chunk % (D / 8)) * 8;
  const int i = row % f.Nq, bh = row / f.Nq, b = bh / f.H, h = bh % f.H;
  // Rows with no allowed key have dQ 0, and delta_kernel left their dq_accum alone.
  const bool live = f.lse[row] != -INFINITY;
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + row * D + c);
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4 x = live ? src[0] : zero, y = live ? src[1] : zero;
  T* dst = static_cast<T*>(p.dq) + b * p.dq_layout.b + h * p.dq_layout.h + i * p.dq_layout.n + c;
  if (vec) {
    uint4 out;
    out.x = Pack2<T>::pack(x.x * f.scale, x.y * f.scale);
    out.y = Pack2<T>::pack(x.z * f.scale, x.w * f.scale);
    out.z = Pack2<T>::pack(y.x * f.scale, y.y * f.scale);
    out.w = Pack2<T>::pack(y.z * f.scale, y.w * f.scale);
    *reinterpret_cast<uint4*>(dst) = out;
  } else {
    const float v[8] = {x.x, x.y, x.z, x.w, y.x, y.y, y.z, y.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = Pack2<T>::from_float(v[e] * f.scale);
  }
}

// dQ for one query block (kWarps * 16 rows): a second pass over the key tiles
// it meets, K/V double buffered.
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1)
    dq_kernel(const __grid_constant__ BackwardParams p) {
  const ForwardParams& f = p.fwd;
  constexpr int kT = kWarps * 32, kBR = kWarps * 16;
  constexpr bool kQInRegs = D == 64;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  SmemTile<T, D> sQ{smem}, sdO{smem + kBR * D};
  T* kv = smem + 2 * kBR * D;  // K0 V0 K1 V1, then the key pipeline's ints

  const ForwardBlock<T> fb = forward_block<T, kBR>(f);
  if (!fb.exists) return;
  const int b = fb.b, h = fb.h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SwizzledLane<D> la = ldm_lane_a<D>(lane), lb = ldm_lane_b<D>(lane);

  load_rows_async<T, D, kT, kBR>(sQ, 0, fb.q, f.q_layout.n, fb.qperm, fb.q0, fb.q1);
  load_rows_async<T, D, kT, kBR>(sdO, 0, head_ptr<T>(p.dout, p.dout_layout, b, h),
                                 p.dout_layout.n, fb.qperm, fb.q0, fb.q1);
  KeyPipeline<T, D, kT> pipe = start_key_pipeline<T, D, kT, kBR>(fb, f, kv, lane);

  RowInfo rows[2];
  bool valid[2];
  block_query_rows(fb, f, warp, lane, rows, valid);
  float lse2[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float lse = valid[i] ? f.lse[fb.q_base + rows[i].orig] : -INFINITY;
    lse2[i] = lse == -INFINITY ? 0.f : lse * kLog2e;
    delta[i] = valid[i] ? p.delta[fb.q_base + rows[i].orig] : 0.f;
  }
  const float scale_log2 = f.scale * kLog2e;

  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kQInRegs ? D / 16 : 1][4], dof[kQInRegs ? D / 16 : 1][4];
  if constexpr (kQInRegs) {
    load_a_fragments<T, D>(qf, sQ, warp * 16, la);
    load_a_fragments<T, D>(dof, sdO, warp * 16, la);
  }
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  while (pipe.kt >= 0) {
    pipe.wait_and_prefetch(lane);
    const SmemTile<T, D> sK = pipe.key_tile(), sV = pipe.value_tile();
    const int *kpos = pipe.pos(), *kbucket = pipe.bucket();
    const bool all_allowed = pipe.all_allowed;
    float s[8][4], dp[8][4];
    if constexpr (kQInRegs) {
      gemm_rows_tile_t<T, D>(s, qf, sK, lb);    // S = Q K^T
      gemm_rows_tile_t<T, D>(dp, dof, sV, lb);  // dP = dO V^T
    } else {
      gemm_smem_rows_tile_t<T, D>(s, sQ, warp * 16, sK, la, lb);
      gemm_smem_rows_tile_t<T, D>(dp, sdO, warp * 16, sV, la, lb);
    }
    auto grad_scores = [&](auto masked) {  // dS = P * (dP - delta)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        const int col = nb * 8 + (lane % 4) * 2;
        ColumnPair kc;
        if constexpr (decltype(masked)::value) kc = column_pair(kbucket, kpos, col);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          float x = s[nb][e] * scale_log2 - lse2[i];
          if constexpr (decltype(masked)::value) {
            x = pair_allowed(rows[i].bucket, rows[i].pos, kc.b(e), kc.p(e)) ? x : -INFINITY;
          }
          s[nb][e] = fast_exp2(x) * (dp[nb][e] - delta[i]);
        }
      }
    };
    if (all_allowed)
      grad_scores(std::false_type{});
    else
      grad_scores(std::true_type{});
    gemm_acc_tile<T, D>(dq, s, sK, la);  // dQ += dS K

    pipe.advance();
  }
  const float scale[2] = {f.scale, f.scale};
  store_rows<T, D>(dq, scale, static_cast<T*>(p.dq) + b * p.dq_layout.b + h * p.dq_layout.h,
                   p.dq_layout.n, rows, valid, lane);
}

// ---------------------------------------------------------------------------
// launchers

constexpr int kFwdWarps = 8, kDqWarps = 4;

template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                          const Args&... args) {
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// The wgmma forward runs for bf16 on compute capability 9.0 (the sm_90a
// build), unless SPARSEFLASH_NO_WGMMA is set (comparisons).
bool wgmma_forward_enabled(DType dtype) {
  static const bool disabled = std::getenv("SPARSEFLASH_NO_WGMMA") != nullptr;
  if (dtype != DType::kBF16 || disabled) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

// The wgmma dK/dV kernel: as the forward, and SPARSEFLASH_NO_WGMMA_BWD turns
// off the backward one alone.
bool wgmma_backward_enabled(DType dtype) {
  static const bool disabled = std::getenv("SPARSEFLASH_NO_WGMMA_BWD") != nullptr;
  return !disabled && wgmma_forward_enabled(dtype);
}

// The grid of a forward pass (forward, deterministic dQ) over `seqs`
// sequences of `blocks` row blocks: heads fastest (ForwardParams::
// heads_fastest; the heaviest row block of every head first, then the next: a
// shorter tail; H200, N = 16k, forward -3% hash 16, -10% drop 0.7), unless
// SPARSEFLASH_GRID_ORDER=blocks (comparisons) or the grid's y limit forbids.
// The dK/dV pass keeps row blocks fastest (no gain, and +1-3% in some cases:
// its blocks of one head share their query stream in L2), so its kernels read
// blockIdx directly.
struct Grid {
  dim3 dims;
  bool heads_fastest;
};
Grid pass_grid(int blocks, int seqs) {
  static const char* order = std::getenv("SPARSEFLASH_GRID_ORDER");
  const bool heads = !(order != nullptr && std::string(order) == "blocks") &&
                     blocks <= 65535;  // grid y limit
  return heads ? Grid{dim3(seqs, blocks), true} : Grid{dim3(blocks, seqs), false};
}

template <int D>
cudaError_t forward_wgmma(const ForwardParams& p, cudaStream_t stream) {
  constexpr int kBR = kWgFwdWarps * 16;
  const size_t smem =
      1024 + (kBR + 4 * kRows) * D * sizeof(__nv_bfloat16) + kKeyPipelineInts * sizeof(int);
  const Grid grid = pass_grid(num_row_blocks(p.q_pack, p.Nq, kBR), p.B * p.H);
  ForwardParams q = p;
  q.heads_fastest = grid.heads_fastest;
  return launch_kernel(forward_kernel_wgmma<D>, grid.dims, kWgFwdWarps * 32, smem, stream, q);
}

template <typename T, int D>
cudaError_t forward_typed(const ForwardParams& p, cudaStream_t stream) {
  constexpr int kBR = kFwdWarps * 16;
  const size_t smem = (kBR + 4 * kRows) * D * sizeof(T) + kKeyPipelineInts * sizeof(int);
  const Grid grid = pass_grid(num_row_blocks(p.q_pack, p.Nq, kBR), p.B * p.H);
  ForwardParams q = p;
  q.heads_fastest = grid.heads_fastest;
  return launch_kernel(forward_kernel<T, D, kFwdWarps>, grid.dims, kFwdWarps * 32, smem, stream, q);
}

template <typename T, int D>
cudaError_t backward_typed(const BackwardParams& p, cudaStream_t stream) {
  const ForwardParams& f = p.fwd;
  const int64_t rows = static_cast<int64_t>(f.B) * f.H * f.Nq;
  const bool delta_vec =
      rows_aligned16(f.out, f.out_layout) && rows_aligned16(p.dout, p.dout_layout);
  constexpr int kDeltaRows = 256 / (D / 8);
  delta_kernel<T, D><<<static_cast<unsigned>((rows + kDeltaRows - 1) / kDeltaRows), 256, 0, stream>>>(
      p, delta_vec);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (has_dead_rows(f.k_pack)) {
    const cudaError_t e = zero_dead_rows<D>(f.k_pack, f.B * f.Hkv, f.Hkv, f.Nk,
                                            {p.dk, p.dk_layout}, {p.dv, p.dv_layout}, nullptr,
                                            stream);
    if (e != cudaSuccess) return e;
  }
  const bool atomic_dq = p.dq_accum != nullptr;
  const size_t smem_kv =
      (2 * kBwdKeys * D + 4 * kRows * D + (atomic_dq ? kBwdKeys * kRows : 0)) * sizeof(T) +
      (kQueryStreamInts + kBwdWarps) * sizeof(int);
  // The wgmma dK/dV kernel: panels 1024-byte aligned (slack), dS^T always
  // present, flags and the warpgroup reduction after the metadata.
  const size_t smem_kv_wgmma =
      1024 + (2 * kBwdKeys * D + (D == 64 ? 6 : 4) * kRows * D + 2 * kBwdKeys * kRows) * sizeof(T) +
      (kQueryStreamInts + 4 + 10 + 2 * kRows) * sizeof(int);
  const bool wgmma_bwd = std::is_same_v<T, __nv_bfloat16> && wgmma_backward_enabled(f.dtype);
  // Row blocks fastest: the dK/dV kernels read blockIdx directly (pass_grid).
  const dim3 grid_kv(num_row_blocks(f.k_pack, f.Nk, kBwdKeys), f.B * f.Hkv);
  if (atomic_dq) {
    // dq_accum was zeroed by delta_kernel (the rows that dQ reaches).
    cudaError_t e = wgmma_bwd ? launch_kernel(dkdv_kernel_wgmma<D, true>, grid_kv,
                                              kBwdWarps * 32, smem_kv_wgmma, stream, p)
                              : launch_kernel(dkdv_kernel<T, D, true>, grid_kv,
                                              kBwdWarps * 32, smem_kv, stream, p);
    if (e != cudaSuccess) return e;
    const int64_t chunks = rows * (D / 8);
    const bool vec = rows_aligned16(p.dq, p.dq_layout);
    dq_finalize_kernel<T, D>
        <<<static_cast<unsigned>((chunks + 255) / 256), 256, 0, stream>>>(p, vec);
    return cudaGetLastError();
  }
  if (cudaError_t e = wgmma_bwd ? launch_kernel(dkdv_kernel_wgmma<D, false>, grid_kv,
                                                kBwdWarps * 32, smem_kv_wgmma, stream, p)
                                : launch_kernel(dkdv_kernel<T, D, false>, grid_kv,
                                                kBwdWarps * 32, smem_kv, stream, p);
      e != cudaSuccess)
    return e;
  constexpr int kBR = kDqWarps * 16;
  const size_t smem_q = (2 * kBR + 4 * kRows) * D * sizeof(T) + kKeyPipelineInts * sizeof(int);
  const Grid grid_q = pass_grid(num_row_blocks(f.q_pack, f.Nq, kBR), f.B * f.H);
  BackwardParams pq = p;
  pq.fwd.heads_fastest = grid_q.heads_fastest;
  return launch_kernel(dq_kernel<T, D, kDqWarps>, grid_q.dims, kDqWarps * 32, smem_q, stream, pq);
}

// Segments need buckets and a permutation, and every bucket id below
// num_segments (they index them).
// The identity permutation's tile searches assume positions that ascend over
// the tiles, which tiles of dropped rows alone (no positions) break: dropped
// rows need a permutation.
bool valid_packing(const Packing& pk) {
  return pk.tiles &&
         (pk.segments == nullptr ||
          (pk.perm && pk.bucket && pk.num_segments > 0 && pk.num_segments <= (1 << 30))) &&
         (pk.perm != nullptr || pk.dead_bucket == INT_MAX) && pk.dead_bucket >= 0;
}

bool valid_shape(const ForwardParams& p) {
  return p.B > 0 && p.H > 0 && p.Hkv > 0 && p.H % p.Hkv == 0 && p.Nq > 0 && p.Nk >= p.Nq &&
         (p.D == 64 || p.D == 128) && valid_packing(p.q_pack) && valid_packing(p.k_pack);
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

size_t pack_workspace_bytes(int rows, int n, int sort_bits) {
  const int64_t items = static_cast<int64_t>(rows) * n;
  if (sort_bits <= kMaxSegmentBits) {
    const int64_t chunks = (n + kSortChunk - 1) / kSortChunk;
    return align_up(static_cast<size_t>(rows) * (size_t{1} << sort_bits) * chunks * sizeof(int));
  }
  size_t cub_bytes = 0;
  cub::DeviceSegmentedRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const int*>(nullptr),
                                           static_cast<int*>(nullptr),
                                           static_cast<const int*>(nullptr),
                                           static_cast<int*>(nullptr), items, rows,
                                           static_cast<const int*>(nullptr),
                                           static_cast<const int*>(nullptr), 0, 30);
  return align_up(items * sizeof(int)) + align_up((rows + 1) * sizeof(int)) + align_up(cub_bytes);
}

cudaError_t pack_by_bucket(const int* bucket_in, int rows, int n, int sort_bits, int* perm_out,
                           int* bucket_out, int* segments_out, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream, const bool* keep,
                           int dropped_bucket) {
  if (rows <= 0 || n <= 0 || sort_bits < 0 || sort_bits > 30 ||
      (segments_out != nullptr && sort_bits > kMaxSegmentBits) ||
      workspace_bytes < pack_workspace_bytes(rows, n, sort_bits) ||
      (bucket_in == nullptr && keep == nullptr) ||
      (keep != nullptr && (sort_bits > kMaxSegmentBits || dropped_bucket < 0 ||
                           dropped_bucket >= (1 << sort_bits))))
    return cudaErrorInvalidValue;
  const int64_t items = static_cast<int64_t>(rows) * n;
  if (sort_bits <= kMaxSegmentBits) {
    const int nseg = 1 << sort_bits, chunks = (n + kSortChunk - 1) / kSortChunk;
    int* hist = static_cast<int*>(workspace);
    const dim3 grid(chunks, rows);
    const SortIds ids{bucket_in, keep, dropped_bucket};
    bucket_count_kernel<<<grid, kSortThreads, 0, stream>>>(ids, n, nseg, chunks, hist);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    bucket_scatter_kernel<<<grid, kSortThreads, 0, stream>>>(ids, n, nseg, chunks, hist,
                                                             perm_out, bucket_out, segments_out);
    return cudaGetLastError();
  }
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

bool lsh_shape_fits(int D, int half, size_t block_smem_limit) {
  return D > 0 && half > 0 &&
         static_cast<size_t>(D) * lsh_padded_half(half) * sizeof(float) <= 96 * 1024 &&
         lsh_smem_bytes(D, half, 2) <= block_smem_limit;
}

cudaError_t lsh_bucket_ids(DType dtype, const void* x, Layout layout, int B, int H, int N, int D,
                           const float* rotations, int Hr, int half, int64_t* out,
                           cudaStream_t stream, const float* offsets, int offset_block,
                           int cap, float* scores) {
  if (B <= 0 || H <= 0 || N <= 0 || Hr <= 0 || H % Hr != 0 || half <= 0 || D <= 0 || D % 8 != 0 ||
      D > 256 || !rows_aligned16(x, layout) || (offsets && offset_block <= 0) ||
      !lsh_shape_fits(D, half, SIZE_MAX) ||  // shape errors before the device
      cap < 0 || cap > kLshCapRows ||
      (cap > 0 && (half > 32 || cap * 2 * half < kLshCapRows || !scores)))
    return cudaErrorInvalidValue;
  if (cap == 0) scores = nullptr;
  int device = 0, optin = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      e != cudaSuccess)
    return e;
  if (!lsh_shape_fits(D, half, static_cast<size_t>(optin))) return cudaErrorInvalidValue;
  const size_t smem = lsh_smem_bytes(D, half, 2);
  const dim3 grid((N + kLshThreads - 1) / kLshThreads, B * H);
  const cudaError_t e =
      dtype == DType::kBF16
          ? launch_kernel(lsh_kernel<__nv_bfloat16>, grid, kLshThreads, smem, stream,
                          static_cast<const __nv_bfloat16*>(x), layout, H, N, D, rotations, Hr,
                          half, offsets, offset_block, scores, out)
          : launch_kernel(lsh_kernel<__half>, grid, kLshThreads, smem, stream,
                          static_cast<const __half*>(x), layout, H, N, D, rotations, Hr, half,
                          offsets, offset_block, scores, out);
  if (e != cudaSuccess || cap == 0) return e;
  const int64_t chains = static_cast<int64_t>(B) * H * ((N + kLshCapRows - 1) / kLshCapRows);
  const auto cap_blocks = static_cast<unsigned>((chains + kCapWarps - 1) / kCapWarps);
  lsh_capped_kernel<<<cap_blocks, kCapWarps * 32, 0, stream>>>(scores, B * H, N, half, cap, out);
  return cudaGetLastError();
}

cudaError_t compute_tile_ranges(const int* perm, const int* bucket, int rows, int n,
                                int position_offset, int dead_bucket, TileRange* tiles,
                                cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return cudaErrorInvalidValue;
  const int64_t warps = static_cast<int64_t>(rows) * num_tiles(n);
  const int64_t blocks = (warps * 32 + kTileRangeThreads - 1) / kTileRangeThreads;
  tile_ranges_kernel<<<static_cast<unsigned>(blocks), kTileRangeThreads, 0, stream>>>(
      perm, bucket, rows, n, position_offset, dead_bucket, tiles);
  return cudaGetLastError();
}

bool forward_uses_wgmma(DType dtype) { return wgmma_forward_enabled(dtype); }
bool backward_uses_wgmma(DType dtype) { return wgmma_backward_enabled(dtype); }

cudaError_t attention_forward(const ForwardParams& p, cudaStream_t stream) {
  if (!valid_shape(p)) return cudaErrorInvalidValue;
  if (has_dead_rows(p.q_pack)) {
    const DeadRowsOut o{p.out, p.out_layout};
    const cudaError_t e =
        p.D == 64 ? zero_dead_rows<64>(p.q_pack, p.B * p.H, p.H, p.Nq, o, {}, p.lse, stream)
                  : zero_dead_rows<128>(p.q_pack, p.B * p.H, p.H, p.Nq, o, {}, p.lse, stream);
    if (e != cudaSuccess) return e;
  }
  if (wgmma_forward_enabled(p.dtype))
    return p.D == 64 ? forward_wgmma<64>(p, stream) : forward_wgmma<128>(p, stream);
  if (p.dtype == DType::kBF16)
    return p.D == 64 ? forward_typed<__nv_bfloat16, 64>(p, stream)
                     : forward_typed<__nv_bfloat16, 128>(p, stream);
  return p.D == 64 ? forward_typed<__half, 64>(p, stream) : forward_typed<__half, 128>(p, stream);
}

cudaError_t attention_backward(const BackwardParams& p, cudaStream_t stream) {
  if (!valid_shape(p.fwd) || !p.delta) return cudaErrorInvalidValue;
  if (p.dq_accum && reinterpret_cast<uintptr_t>(p.dq_accum) % 16 != 0) return cudaErrorInvalidValue;
  if (p.fwd.dtype == DType::kBF16)
    return p.fwd.D == 64 ? backward_typed<__nv_bfloat16, 64>(p, stream)
                         : backward_typed<__nv_bfloat16, 128>(p, stream);
  return p.fwd.D == 64 ? backward_typed<__half, 64>(p, stream)
                       : backward_typed<__half, 128>(p, stream);
}

}  // namespace sparseflash::kernels
