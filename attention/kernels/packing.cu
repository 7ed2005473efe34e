// Packing: the bucket sort of rows (a counting sort for ids of up to
// kMaxSegmentBits bits, CUB's segmented radix sort beyond) and the tile ranges
// (bucket and position bounds of each 64-row tile) that the passes search.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "attention/kernels/common.cuh"

namespace sparseflash::kernels {

using namespace detail;  // NOLINT: this file's kernels are the detail's

namespace {

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

}  // namespace

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
  clear_refusal();
  const char* const fn = "pack_by_bucket: ";  // a std::string only when refusing
  if (rows <= 0 || n <= 0)
    return refuse(std::string(fn) + arg("rows", rows) + ", " + arg("n", n) + ": both must be positive");
  if (sort_bits < 0 || sort_bits > 30) return refuse(std::string(fn) + arg("sort_bits", sort_bits) + ", expected 0..30");
  if (segments_out != nullptr && sort_bits > kMaxSegmentBits)
    return refuse(std::string(fn) + "segments_out needs sort_bits <= " + std::to_string(kMaxSegmentBits) + ", got " +
                  std::to_string(sort_bits));
  if (const size_t need = pack_workspace_bytes(rows, n, sort_bits); workspace_bytes < need)
    return refuse(std::string(fn) + arg("workspace_bytes", workspace_bytes) + ", needs " + std::to_string(need) +
                  " (pack_workspace_bytes)");
  if (bucket_in == nullptr && keep == nullptr) return refuse(std::string(fn) + "neither bucket_in nor keep given");
  if (keep != nullptr && sort_bits > kMaxSegmentBits)
    return refuse(std::string(fn) + "keep needs sort_bits <= " + std::to_string(kMaxSegmentBits) + ", got " +
                  std::to_string(sort_bits));
  if (keep != nullptr && (dropped_bucket < 0 || dropped_bucket >= (1 << sort_bits)))
    return refuse(std::string(fn) + arg("dropped_bucket", dropped_bucket) + ", outside [0, 2^sort_bits = " +
                  std::to_string(1 << sort_bits) + ")");
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

cudaError_t compute_tile_ranges(const int* perm, const int* bucket, int rows, int n,
                                int position_offset, int dead_bucket, TileRange* tiles,
                                cudaStream_t stream) {
  clear_refusal();
  if (rows <= 0 || n <= 0)
    return refuse("compute_tile_ranges: " + arg("rows", rows) + ", " + arg("n", n) +
                  ": both must be positive");
  const int64_t warps = static_cast<int64_t>(rows) * num_tiles(n);
  const int64_t blocks = (warps * 32 + kTileRangeThreads - 1) / kTileRangeThreads;
  tile_ranges_kernel<<<static_cast<unsigned>(blocks), kTileRangeThreads, 0, stream>>>(
      perm, bucket, rows, n, position_offset, dead_bucket, tiles);
  return cudaGetLastError();
}

}  // namespace sparseflash::kernels
