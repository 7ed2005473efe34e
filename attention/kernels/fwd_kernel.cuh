// The forward pass on mma.sync (fp16, and bf16 off Hopper) and its launcher.
#pragma once

#include "attention/kernels/launch.h"
#include "attention/kernels/tile_loop.cuh"

namespace sparseflash::kernels::detail {

// The forward pass on mma.sync (fp16, and bf16 off Hopper):
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
  using Smem = ForwardSmem<T, D, kWarps>;
  expect_dynamic_smem(Smem::kBytes);
  T* kv = smem + Smem::kKV;  // K0 V0 K1 V1, then the key pipeline's ints

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

template <typename T, int D>
cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream) {
  using Smem = ForwardSmem<T, D, kFwdWarps>;
  const Grid grid = pass_grid(num_row_blocks(p.q_pack, p.Nq, Smem::kBR), p.B * p.H);
  ForwardParams q = p;
  q.heads_fastest = grid.heads_fastest;
  return launch_kernel(forward_kernel<T, D, kFwdWarps>, grid.dims, kFwdWarps * 32, Smem::kBytes, stream, q);
}

}  // namespace sparseflash::kernels::detail
