// The forward pass on Hopper (sm_90a, bf16) and its launcher:
#pragma once

#include "attention/kernels/launch.h"
#include "attention/kernels/tile_loop.cuh"

namespace sparseflash::kernels::detail {

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

template <int D>
__global__ void __launch_bounds__(kWgFwdWarps * 32, D == 64 ? 2 : 1)
    forward_kernel_wgmma(const __grid_constant__ ForwardParams p) {
  using T = __nv_bfloat16;
  constexpr int kT = kWgFwdWarps * 32, kBR = kWgFwdWarps * 16;
  constexpr int kPanelBytes = kRows * 128;  // one [64 x 64] panel of a K or V tile
  using Smem = ForwardSm90Smem<D>;
  expect_dynamic_smem(Smem::kBytes);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Panels must start on 1024 bytes (the swizzle reads absolute address bits).
  T* smem = reinterpret_cast<T*>(smem_raw + ((1024 - wgmma::smem_addr(smem_raw) % 1024) % 1024));
  T* sQ = smem;            // [kBR x D] panels
  T* kv = sQ + Smem::kKV;  // K0 V0 K1 V1, [kRows x D] panels each, then the pipeline's ints

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

template <int D>
cudaError_t launch_forward_sm90(const ForwardParams& p, cudaStream_t stream) {
  using Smem = ForwardSm90Smem<D>;
  const Grid grid = pass_grid(num_row_blocks(p.q_pack, p.Nq, Smem::kBR), p.B * p.H);
  ForwardParams q = p;
  q.heads_fastest = grid.heads_fastest;
  return launch_kernel(forward_kernel_wgmma<D>, grid.dims, kWgFwdWarps * 32, Smem::kBytes, stream, q);
}

}  // namespace sparseflash::kernels::detail
