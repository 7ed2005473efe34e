// The attention kernels' public entry points (sparse_flash.h): argument
// checks, the choice of kernel (wgmma on sm_90a for bf16, mma.sync otherwise),
// and the order of the backward's passes. The kernels and their launchers are
// in the stage headers (common.cuh lists them).
#include <string>
#include <type_traits>

#include "attention/kernels/common.cuh"
#include "attention/kernels/launch.h"

namespace sparseflash::kernels {

using namespace detail;  // NOLINT: the launchers are the detail's

namespace {

// The wgmma forward runs for bf16 on compute capability 9.0 (the sm_90a
// build), unless KernelOptions::wgmma_forward is off (comparisons).
bool wgmma_forward_enabled(DType dtype) {
  if (dtype != DType::kBF16 || !kernel_options().wgmma_forward) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

// The wgmma dK/dV kernel: as the forward, and KernelOptions::wgmma_backward
// turns off the backward one alone.
bool wgmma_backward_enabled(DType dtype) {
  return kernel_options().wgmma_backward && wgmma_forward_enabled(dtype);
}

// Segments need buckets and a permutation, and every bucket id below
// num_segments (they index them).
// The identity permutation's tile searches assume positions that ascend over
// the tiles, which tiles of dropped rows alone (no positions) break: dropped
// rows need a permutation.
// Why a side's packing is refused ("" when it is fine).
std::string packing_problem(const Packing& pk, const char* side) {
  const std::string s = std::string(side) + "_pack";
  if (!pk.tiles) return s + ".tiles is missing";
  if (pk.segments != nullptr && !(pk.perm && pk.bucket))
    return s + ".segments needs perm and bucket";
  if (pk.segments != nullptr && !(pk.num_segments > 0 && pk.num_segments <= (1 << 30)))
    return s + "." + arg("num_segments", pk.num_segments) + ", expected 1..2^30";
  if (pk.perm == nullptr && pk.dead_bucket != INT_MAX)
    return s + "." + arg("dead_bucket", pk.dead_bucket) + " (dropped rows) needs a permutation";
  if (pk.dead_bucket < 0) return s + "." + arg("dead_bucket", pk.dead_bucket) + ", must be >= 0";
  return "";
}

// Why the shapes are refused ("" when they are fine).
std::string shape_problem(const ForwardParams& p) {
  if (p.B <= 0 || p.H <= 0 || p.Hkv <= 0 || p.Nq <= 0)
    return arg("B", p.B) + ", " + arg("H", p.H) + ", " + arg("Hkv", p.Hkv) + ", " + arg("Nq", p.Nq) +
           ": all must be positive";
  if (p.H % p.Hkv != 0) return arg("Hkv", p.Hkv) + " does not divide " + arg("H", p.H);
  if (p.Nk < p.Nq) return arg("Nk", p.Nk) + " is below " + arg("Nq", p.Nq);
  if (p.D != 64 && p.D != 128) return arg("D", p.D) + ", expected 64 or 128";
  if (std::string q = packing_problem(p.q_pack, "q"); !q.empty()) return q;
  return packing_problem(p.k_pack, "k");
}

// The backward's passes for one dtype and head size (launch.h).
template <typename T, int D>
cudaError_t backward_typed(const BackwardParams& p, cudaStream_t stream) {
  const ForwardParams& f = p.fwd;
  if (cudaError_t e = launch_delta<T, D>(p, stream); e != cudaSuccess) return e;
  if (has_dead_rows(f.k_pack)) {
    const cudaError_t e = launch_zero_dead_rows<D>(f.k_pack, f.B * f.Hkv, f.Hkv, f.Nk,
                                                   {p.dk, p.dk_layout}, {p.dv, p.dv_layout},
                                                   nullptr, stream);
    if (e != cudaSuccess) return e;
  }
  const bool wgmma_bwd = std::is_same_v<T, __nv_bfloat16> && wgmma_backward_enabled(f.dtype);
  if (p.dq_accum != nullptr) {
    // dq_accum was zeroed by delta_kernel (the rows that dQ reaches).
    const cudaError_t e = wgmma_bwd ? launch_dkdv_sm90<D, true>(p, stream)
                                    : launch_dkdv<T, D, true>(p, stream);
    if (e != cudaSuccess) return e;
    return launch_dq_finalize<T, D>(p, stream);
  }
  const cudaError_t e = wgmma_bwd ? launch_dkdv_sm90<D, false>(p, stream)
                                  : launch_dkdv<T, D, false>(p, stream);
  if (e != cudaSuccess) return e;
  return launch_dq<T, D>(p, stream);
}

}  // namespace

bool forward_uses_wgmma(DType dtype) { return wgmma_forward_enabled(dtype); }
bool backward_uses_wgmma(DType dtype) { return wgmma_backward_enabled(dtype); }

cudaError_t attention_forward(const ForwardParams& p, cudaStream_t stream) {
  clear_refusal();
  if (std::string why = shape_problem(p); !why.empty()) return refuse("attention_forward: " + why);
  if (has_dead_rows(p.q_pack)) {
    const DeadRowsOut o{p.out, p.out_layout};
    const cudaError_t e =
        p.D == 64
            ? launch_zero_dead_rows<64>(p.q_pack, p.B * p.H, p.H, p.Nq, o, {}, p.lse, stream)
            : launch_zero_dead_rows<128>(p.q_pack, p.B * p.H, p.H, p.Nq, o, {}, p.lse, stream);
    if (e != cudaSuccess) return e;
  }
  if (wgmma_forward_enabled(p.dtype))
    return p.D == 64 ? launch_forward_sm90<64>(p, stream) : launch_forward_sm90<128>(p, stream);
  if (p.dtype == DType::kBF16)
    return p.D == 64 ? launch_forward<__nv_bfloat16, 64>(p, stream)
                     : launch_forward<__nv_bfloat16, 128>(p, stream);
  return p.D == 64 ? launch_forward<__half, 64>(p, stream) : launch_forward<__half, 128>(p, stream);
}

cudaError_t attention_backward(const BackwardParams& p, cudaStream_t stream) {
  clear_refusal();
  if (std::string why = shape_problem(p.fwd); !why.empty()) return refuse("attention_backward: " + why);
  if (!p.delta) return refuse("attention_backward: the delta buffer is missing");
  if (p.dq_accum && reinterpret_cast<uintptr_t>(p.dq_accum) % 16 != 0)
    return refuse("attention_backward: dq_accum must be 16-byte aligned");
  if (p.fwd.dtype == DType::kBF16)
    return p.fwd.D == 64 ? backward_typed<__nv_bfloat16, 64>(p, stream)
                         : backward_typed<__nv_bfloat16, 128>(p, stream);
  return p.fwd.D == 64 ? backward_typed<__half, 64>(p, stream)
                       : backward_typed<__half, 128>(p, stream);
}

}  // namespace sparseflash::kernels
