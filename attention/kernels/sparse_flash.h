// Sparse causal flash attention on the GPU: the torch-free interface.
//
// One kernel family serves dense, hash and query/key-dropping attention. Each
// (batch, head) row sequence is visited in a *packed order* given by a
// permutation: packed row i is original row perm[i]. Rows carry an integer
// bucket; in packed order buckets ascend (time order kept inside a bucket).
// Query i may attend to key j when
//     pos_q(i) >= pos_k(j)   and   bucket_q(i) == bucket_k(j)
// with pos_q = original index + (Nk - Nq) and pos_k = original index.
//   dense: perm = identity, all buckets 0 (pass nullptr for both; dropped
//          rows, Packing::dead_bucket, need a permutation);
//   hash:  buckets = LSH ids, perm = stable sort by bucket;
//   drop:  bucket 0 for kept rows, kDroppedQueryBucket / kDroppedKeyBucket for
//          dropped ones (never equal, sorted last): dropped queries output 0.
// The kernels gather rows through the permutation and scatter results back,
// so inputs and outputs stay in the caller's layout ([B, H, N, D] with any
// strides, last dimension contiguous). Tiles of 64 packed rows carry
// (bucket min/max, position min/max); a pair of tiles that cannot hold an
// allowed pair is skipped.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define SPARSEFLASH_HOST_DEVICE __host__ __device__
#else
#define SPARSEFLASH_HOST_DEVICE
#endif

namespace sparseflash::kernels {

enum class DType { kBF16, kFP16 };

inline constexpr int kTileRows = 64;
inline constexpr int kDroppedQueryBucket = 1 << 29;
inline constexpr int kDroppedKeyBucket = (1 << 29) + 1;

// Per-tile ranges: x = bucket min, y = bucket max, z = position min, w = position max.
using TileRange = int4;

SPARSEFLASH_HOST_DEVICE inline int num_tiles(int n) { return (n + kTileRows - 1) / kTileRows; }

// Can a query tile (or block) and a key tile (or block) hold an allowed pair?
// The kernels skip the pairs where not.
SPARSEFLASH_HOST_DEVICE inline bool tiles_meet(const TileRange& q, const TileRange& k) {
  return k.x <= q.y && k.y >= q.x && k.z <= q.w;
}

// The union of two tile ranges.
SPARSEFLASH_HOST_DEVICE inline TileRange tile_union(const TileRange& a, const TileRange& b) {
  return {a.x < b.x ? a.x : b.x, a.y > b.y ? a.y : b.y, a.z < b.z ? a.z : b.z,
          a.w > b.w ? a.w : b.w};
}

// Strides in elements for a [B, H, N, D] view; D is contiguous.
struct Layout {
  int64_t b = 0, h = 0, n = 0;
};

// Packing of one side (queries, or keys and values).
struct Packing {
  const int* perm = nullptr;    // [B * heads, N] packed -> original row; nullptr = identity
  const int* bucket = nullptr;  // [B * heads, N] in packed order, ascending; nullptr = all 0
  const TileRange* tiles = nullptr;  // [B * heads, num_tiles(N)], from compute_tile_ranges
  // Optional [B * heads, num_segments + 1], from pack_by_bucket: segments[s] is
  // the first packed row of bucket s (segments[num_segments] = N). Given, the
  // kernels' row blocks on this side start at every bucket's first row, so
  // that no block holds two buckets (a bucket of c rows takes ceil(c / rows per
  // block) blocks); nullptr: fixed blocks of consecutive rows.
  const int* segments = nullptr;
  int num_segments = 0;
  // Rows whose bucket is dead_bucket or more are dropped: they match nothing
  // (their buckets must differ from every bucket of the other side) and are
  // left out of the tile ranges' positions (compute_tile_ranges), so tiles of
  // dropped rows meet no tile.
  int dead_bucket = INT_MAX;
};

// Upper bound on the row blocks of kernel blocks of `rows_per_block` packed
// rows over one (batch, head) sequence of n rows (the grid size); blocks past
// the real count exit at once.
SPARSEFLASH_HOST_DEVICE inline int num_row_blocks(const Packing& pk, int n, int rows_per_block) {
  const int fixed = (n + rows_per_block - 1) / rows_per_block;
  if (pk.segments == nullptr) return fixed;
  return fixed + (pk.num_segments < n ? pk.num_segments : n);
}

struct ForwardParams {
  DType dtype = DType::kBF16;
  int B = 0, H = 0, Hkv = 0, Nq = 0, Nk = 0, D = 0;  // D in {64, 128}; H % Hkv == 0
  float scale = 0;                                   // softmax scale, usually 1/sqrt(D)
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  Layout q_layout, k_layout, v_layout;
  void* out = nullptr;  // same shape as q
  Layout out_layout;
  float* lse = nullptr;  // [B, H, Nq] contiguous, original order; -inf where no key is allowed
  Packing q_pack, k_pack;
  // Set by the launchers, not the caller: the forward passes' grid x runs
  // over the (batch, head) sequences and y over row blocks (block j of every
  // head before block j + 1 of any), instead of x over row blocks.
  bool heads_fastest = false;
};

struct BackwardParams {
  ForwardParams fwd;  // inputs, output and lse of the forward
  const void* dout = nullptr;
  Layout dout_layout;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  Layout dq_layout, dk_layout, dv_layout;
  float* delta = nullptr;  // workspace [B, H, Nq]: rowsum(dout * out)
  // Optional fp32 workspace [B, H, Nq, D] (contiguous, 16-byte aligned). Given:
  // dQ is accumulated with atomics by the dK/dV pass (one pass, fastest; the
  // order of the additions varies, so dq is not bit-reproducible). nullptr: dQ
  // by a second pass per query block, bit-identical run to run.
  float* dq_accum = nullptr;
};

// Angular LSH bucket ids: bucket = argmax([x R, -x R]) (first maximum wins,
// as torch.argmax) for every row of x ([B, H, N, D] with `layout`, D contiguous,
// any D <= 256 that is a multiple of 8), with R = rotations[h / (H / Hr)]
// ([Hr, D, half] float32, contiguous; nb = 2 * half buckets). Projections are
// accumulated in float32. out: int64 [B, H, N] contiguous, original order.
// With offsets ([B * H][ceil(N / offset_block)][half] float32, contiguous),
// row n of (b, h) hashes x R - offsets[b H + h][n / offset_block]: the
// projection of a vector subtracted from every row of a block of
// offset_block rows (the LSH centring), without a centred copy of x.
// With 0 < cap <= kLshCapRows (needs 2 * half <= 64 and cap * 2 * half >=
// kLshCapRows; needs sm_80+ for the warp reductions), the
// rows of each block of kLshCapRows consecutive rows (of one b, h) are taken
// in order, each to its best-scoring bucket that holds fewer than cap rows of
// the block so far (the first of equal scores): no bucket gets more than cap
// rows of a block, and a row's bucket depends only on the rows before it.
// It then needs `scores`, B * H * N * half floats of device workspace (the
// projections go there, and a second kernel assigns the rows, one warp per
// block of rows).
constexpr int kLshCapRows = 128;
cudaError_t lsh_bucket_ids(DType dtype, const void* x, Layout layout, int B, int H, int N, int D,
                           const float* rotations, int Hr, int half, int64_t* out,
                           cudaStream_t stream, const float* offsets = nullptr,
                           int offset_block = 0, int cap = 0, float* scores = nullptr);
// Whether lsh_bucket_ids serves head dim D with `half` rotation columns on a
// device that allows a block block_smem_limit bytes of shared memory (its
// rotations, at most 96 KB, and staged rows); it refuses other shapes.
bool lsh_shape_fits(int D, int half, size_t block_smem_limit);

// Bits a radix sort must look at for bucket ids in [0, num_buckets) plus the
// drop sentinels.
int bucket_sort_bits(bool with_drop_sentinels, int num_buckets);

// Bucket ids of up to kMaxSegmentBits bits are sorted by a counting sort,
// which also gives each bucket's segment of packed rows (Packing::segments,
// num_segments = 1 << sort_bits); wider ids by a CUB segmented radix sort.
inline constexpr int kMaxSegmentBits = 8;
inline int num_segments_for(int sort_bits) {
  return sort_bits <= kMaxSegmentBits ? 1 << sort_bits : 0;
}

// Stable sort of each (batch, head) row sequence by bucket: bucket_in is in
// original order [rows, n], every id in [0, 2^sort_bits); writes perm and the
// sorted buckets, and, when segments_out is given (it must be nullptr for
// sort_bits > kMaxSegmentBits), the segment offsets [rows, 2^sort_bits + 1].
// Workspace from pack_workspace_bytes.
// Dropping without a bucket-id pass: with keep ([rows, n] in original order),
// a row whose keep is false takes the id dropped_bucket and the others their
// bucket_in id (0 when bucket_in is nullptr), as if those ids had been
// written first. keep needs sort_bits <= kMaxSegmentBits (the counting sort)
// and dropped_bucket in [0, 2^sort_bits).
size_t pack_workspace_bytes(int rows, int n, int sort_bits);
cudaError_t pack_by_bucket(const int* bucket_in, int rows, int n, int sort_bits, int* perm_out,
                           int* bucket_out, int* segments_out, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream,
                           const bool* keep = nullptr, int dropped_bucket = 0);

// Tile ranges of packed rows; position offset is added to original indices
// (Nk - Nq for queries, 0 for keys). Rows with bucket >= dead_bucket (dropped
// rows; INT_MAX: none) count for the bucket range but not for the positions;
// a tile of dropped rows alone gets positions (INT_MAX, INT_MIN).
cudaError_t compute_tile_ranges(const int* perm, const int* bucket, int rows, int n,
                                int position_offset, int dead_bucket, TileRange* tiles,
                                cudaStream_t stream);

cudaError_t attention_forward(const ForwardParams& p, cudaStream_t stream);
// Whether attention_forward runs the Hopper warpgroup-MMA kernel for this
// dtype on the current device: bf16 on compute capability 9.0, unless
// KernelOptions::wgmma_forward is off (options.h; SPARSEFLASH_NO_WGMMA) (then the mma.sync kernel,
// which serves fp16 and other GPUs, runs everywhere).
bool forward_uses_wgmma(DType dtype);
// The same for the dK/dV pass of attention_backward (also off with
// KernelOptions::wgmma_backward; SPARSEFLASH_NO_WGMMA_BWD).
bool backward_uses_wgmma(DType dtype);
// dK/dV per block of keys; dQ by atomics into dq_accum or, without it, by a
// deterministic second pass over key tiles.
cudaError_t attention_backward(const BackwardParams& p, cudaStream_t stream);

// Why the last call of an entry point above (or of local_band.h's) on this
// thread returned cudaErrorInvalidValue for its arguments: the function, the
// argument and its value, e.g. "attention_forward: D = 96, expected 64 or 128".
// Empty when that call did not refuse its arguments.
const char* last_refusal();

}  // namespace sparseflash::kernels
