// The shared memory of each attention kernel, in one place: the kernel carves
// its dynamic shared memory with these offsets and its launcher asks for
// kBytes, so the two cannot disagree; each kernel also checks, on entry, that
// the launch gave it exactly kBytes (expect_dynamic_smem: a trap otherwise).
// Offsets count elements of the kernel's T from the (aligned) base.
#pragma once

#include <cstddef>
#include <cstdint>

#include "attention/kernels/common.cuh"

namespace sparseflash::kernels::detail {

constexpr int kFwdWarps = 8;    // forward_kernel: 8 warps of 16 query rows
constexpr int kWgFwdWarps = 8;  // forward_kernel_wgmma: two warpgroups
constexpr int kDqWarps = 4;     // dq_kernel

// Shared-memory ints of a KeyPipeline: positions, buckets, source rows ahead.
constexpr int kKeyPipelineInts = 6 * kRows;
// Shared-memory ints of a QueryTileStream's metadata.
constexpr int kQueryStreamInts = 2 * 6 * kRows;

// A KeyPipeline's tiles: K0 V0 K1 V1, [kRows x D] each; its ints follow.
template <int D>
constexpr int kKeyPipelineElems = 4 * kRows * D;

// Slack before the wgmma kernels' panels, which start on a 1024-byte boundary
// (the 128B swizzle reads absolute address bits).
constexpr size_t kPanelAlignSlack = 1024;

// forward_kernel<T, D, kWarps>: Q [kBR x D] (SmemTile), then the key pipeline.
template <typename T, int D, int kWarps>
struct ForwardSmem {
  static constexpr int kBR = kWarps * 16;
  static constexpr int kKV = kBR * D;
  static constexpr size_t kBytes =
      (kKV + kKeyPipelineElems<D>) * sizeof(T) + kKeyPipelineInts * sizeof(int);
};

// forward_kernel_wgmma<D>: the same in 128B-swizzled panels, bf16.
template <int D>
struct ForwardSm90Smem {
  static constexpr int kBR = kWgFwdWarps * 16;
  static constexpr int kKV = kBR * D;
  static constexpr size_t kBytes = kPanelAlignSlack +
                                   (kKV + kKeyPipelineElems<D>) * sizeof(__nv_bfloat16) +
                                   kKeyPipelineInts * sizeof(int);
};

// dq_kernel<T, D, kWarps>: Q and dO [kBR x D] each, then the key pipeline.
template <typename T, int D, int kWarps>
struct DqSmem {
  static constexpr int kBR = kWarps * 16;
  static constexpr int kDO = kBR * D;
  static constexpr int kKV = 2 * kBR * D;
  static constexpr size_t kBytes =
      (kKV + kKeyPipelineElems<D>) * sizeof(T) + kKeyPipelineInts * sizeof(int);
};

// dkdv_kernel<T, D, kAtomicDq>: K and V [kBwdKeys x D], Q0 dO0 Q1 dO1 [kRows x D]
// each, dS^T [kBwdKeys x kRows] (kAtomicDq only), then the query stream's ints
// and one flag per warp.
template <typename T, int D, bool kAtomicDq>
struct DkdvSmem {
  static constexpr int kV = kBwdKeys * D;
  static constexpr int kQdo = 2 * kBwdKeys * D;
  static constexpr int kDs = kQdo + 4 * kRows * D;
  static constexpr int kMeta = kDs + (kAtomicDq ? kBwdKeys * kRows : 0);
  static constexpr int kMetaInts = kQueryStreamInts + kBwdWarps;
  static constexpr size_t kBytes = kMeta * sizeof(T) + kMetaInts * sizeof(int);
};

// dkdv_kernel_wgmma<D, kAtomicDq>, bf16 panels: K, V [kBwdKeys x D]; Q/dO in
// kQdoBufs buffers of [kRows x D] each (three when dQ is deferred: D = 64 with
// the atomic dQ); two dS^T buffers [kBwdKeys x kRows]; then the query stream's
// ints, per dS^T buffer and warpgroup a flag ([2][2]), a reduction area
// ([2][5]) and per dS^T buffer the query tile's original rows ([2][kRows]).
template <int D, bool kAtomicDq>
struct DkdvSm90Smem {
  static constexpr bool kDeferDq = kAtomicDq && D == 64;
  static constexpr int kQdoBufs = kDeferDq ? 3 : 2;
  static constexpr int kV = kBwdKeys * D;
  static constexpr int kQdo = 2 * kBwdKeys * D;
  static constexpr int kDs = kQdo + 2 * kQdoBufs * kRows * D;
  static constexpr int kMeta = kDs + 2 * kBwdKeys * kRows;
  static constexpr int kWgActiveInt = kQueryStreamInts;   // [2][2] flags
  static constexpr int kDqOrigInt = kWgActiveInt + 4 + 10;  // after the reduction area
  static constexpr int kMetaInts = kDqOrigInt + 2 * kRows;
  static constexpr size_t kBytes =
      kPanelAlignSlack + kMeta * sizeof(__nv_bfloat16) + kMetaInts * sizeof(int);
};

// Traps unless the launch gave this kernel exactly `bytes` of dynamic shared
// memory: a launcher and its kernel that disagree fail loudly, not by
// writing past the end.
__device__ __forceinline__ void expect_dynamic_smem(size_t bytes) {
  uint32_t have;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
  if (have != bytes) __trap();
}

}  // namespace sparseflash::kernels::detail
