// The backward's small kernels (delta, the dQ finalize, the dropped rows'
// outputs), instantiated together: each compiles in a moment.
#include "attention/kernels/bwd_common.cuh"
#include "attention/kernels/bwd_dq.cuh"

namespace sparseflash::kernels::detail {

template cudaError_t launch_delta<__nv_bfloat16, 64>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_delta<__nv_bfloat16, 128>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_delta<__half, 64>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_delta<__half, 128>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_dq_finalize<__nv_bfloat16, 64>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_dq_finalize<__nv_bfloat16, 128>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_dq_finalize<__half, 64>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_dq_finalize<__half, 128>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_zero_dead_rows<64>(const Packing&, int, int, int, DeadRowsOut,
                                               DeadRowsOut, float*, cudaStream_t);
template cudaError_t launch_zero_dead_rows<128>(const Packing&, int, int, int, DeadRowsOut,
                                                DeadRowsOut, float*, cudaStream_t);

}  // namespace sparseflash::kernels::detail
