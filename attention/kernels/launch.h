// The launchers of the attention kernels, declared for dispatch.cu. Each is
// defined next to its kernel (fwd_kernel.cuh, ...) and explicitly
// instantiated in one generated .cu per instantiation (attention/CMakeLists.txt),
// so that the kernels compile in parallel. T is __nv_bfloat16 or __half, D 64
// or 128. Internal to attention/kernels/.
#pragma once

#include <cuda_runtime.h>

#include "attention/kernels/sparse_flash.h"

namespace sparseflash::kernels::detail {

// The forward on mma.sync; on wgmma (bf16, sm_90a).
template <typename T, int D>
cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream);
template <int D>
cudaError_t launch_forward_sm90(const ForwardParams& p, cudaStream_t stream);

// The backward's passes, in order: delta (and dq_accum zeroed), dK/dV (with
// the atomic dQ when p.dq_accum is set), then dQ: the finalize of dq_accum,
// or the deterministic pass.
template <typename T, int D>
cudaError_t launch_delta(const BackwardParams& p, cudaStream_t stream);
template <typename T, int D, bool kAtomicDq>
cudaError_t launch_dkdv(const BackwardParams& p, cudaStream_t stream);
template <int D, bool kAtomicDq>
cudaError_t launch_dkdv_sm90(const BackwardParams& p, cudaStream_t stream);
template <typename T, int D>
cudaError_t launch_dq_finalize(const BackwardParams& p, cudaStream_t stream);
template <typename T, int D>
cudaError_t launch_dq(const BackwardParams& p, cudaStream_t stream);

// One output of zero_dead_rows: data (nullptr: none) in a [B, heads, n, D] layout.
struct DeadRowsOut {
  void* data;
  Layout layout;
};
// The outputs of one side's dropped rows (bwd_common.cuh).
template <int D>
cudaError_t launch_zero_dead_rows(const Packing& pk, int seqs, int heads, int n, DeadRowsOut out0,
                                  DeadRowsOut out1, float* lse, cudaStream_t stream);

}  // namespace sparseflash::kernels::detail
