// What every file of the sparse flash attention kernels shares: the tile and
// block constants, the launch helper, the grid order of the forward-style
// passes and two host checks. Internal to attention/kernels/ (namespace detail).
//
// The kernels, by stage (each header holds a stage's kernels and launcher;
// one generated .cu per instantiation compiles them, see CMakeLists.txt):
//   packing.cu          bucket sort, tile ranges
//   lsh.cu              LSH bucket ids (and the capped assignment)
//   tile_loop.cuh       what the passes share: tile search, row blocks, the key pipeline
//   traits.cuh          each kernel's shared-memory layout (kernel and launcher read it)
//   fwd_kernel.cuh      forward (mma.sync); fwd_kernel_sm90.cuh: forward on wgmma
//   bwd_common.cuh      delta, dropped rows, the query-tile stream of dK/dV
//   bwd_dkdv.cuh        dK/dV (mma.sync); bwd_dkdv_sm90.cuh: dK/dV on wgmma
//   bwd_dq.cuh          dQ: the deterministic pass and the atomic buffer's finalize
//   launch.h            the launchers' declarations; dispatch.cu: the public entry points
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "attention/kernels/mma.cuh"
#include "attention/kernels/options.h"
#include "attention/kernels/refusal.h"
#include "attention/kernels/sparse_flash.h"
#include "attention/kernels/wgmma.cuh"

namespace sparseflash::kernels::detail {

constexpr int kRows = kTileRows;
constexpr int kBwdWarps = 8;                // dK/dV blocks: 8 warps,
constexpr int kBwdKeys = kBwdWarps * 16;    // 16 keys each
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kInvalidQueryBucket = -1;  // padding rows match nothing
constexpr int kInvalidKeyBucket = -2;

inline size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

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

// The grid of a forward pass (forward, deterministic dQ) over `seqs`
// sequences of `blocks` row blocks: heads fastest (ForwardParams::
// heads_fastest; the heaviest row block of every head first, then the next: a
// shorter tail; H200, N = 16k, forward -3% hash 16, -10% drop 0.7), unless
// KernelOptions::grid_heads_fastest is off (SPARSEFLASH_GRID_ORDER=blocks) or the grid's y limit forbids.
// The dK/dV pass keeps row blocks fastest (no gain, and +1-3% in some cases:
// its blocks of one head share their query stream in L2), so its kernels read
// blockIdx directly.
struct Grid {
  dim3 dims;
  bool heads_fastest;
};
inline Grid pass_grid(int blocks, int seqs) {
  const bool heads = kernel_options().grid_heads_fastest && blocks <= 65535;  // grid y limit
  return heads ? Grid{dim3(seqs, blocks), true} : Grid{dim3(blocks, seqs), false};
}

// Whether a side has dropped rows that zero_dead_rows_kernel serves (bucket
// segments, and dead buckets among them): exactly when blocks can be dead.
inline bool has_dead_rows(const Packing& pk) {
  return pk.segments != nullptr && pk.perm != nullptr && pk.dead_bucket < pk.num_segments;
}

// Rows of 2-byte elements that take 16-byte loads and stores: base 16-byte
// aligned and every stride a multiple of 8 elements.
inline bool rows_aligned16(const void* data, const Layout& l) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && l.b % 8 == 0 && l.h % 8 == 0 &&
         l.n % 8 == 0;
}

}  // namespace sparseflash::kernels::detail
