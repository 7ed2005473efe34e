// Element conversions between float and the 16-bit types the kernels store
// (bf16, fp16), round to nearest even; float to float is the identity. The one
// copy for every kernel file: the attention kernels (Pack2 in mma.cuh,
// local_band.cu), the fused model ops (model/kernels/fused.cu) and SAAP's
// decode kernel (saap/kernels/decode.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sparseflash::kernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

}  // namespace sparseflash::kernels
