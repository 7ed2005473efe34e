// dQ: the finalize of the atomic buffer (dq_accum) and the deterministic
// second pass, with their launchers.
#pragma once

#include "attention/kernels/bwd_common.cuh"

namespace sparseflash::kernels::detail {

// dq = scale * dq_accum, into the caller's layout (dq_accum is [B, H, Nq, D]),
// 8 elements per thread; one 16-byte store each when `vec` (dq and its strides
// 16-byte aligned).
template <typename T, int D>
__global__ void dq_finalize_kernel(const __grid_constant__ BackwardParams p, bool vec) {
  const ForwardParams& f = p.fwd;
  const int64_t chunk = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (chunk >= static_cast<int64_t>(f.B) * f.H * f.Nq * (D / 8)) return;
  const int64_t row = chunk / (D / 8);
  const int c = static_cast<int>(chunk % (D / 8)) * 8;
  const int i = row % f.Nq, bh = row / f.Nq, b = bh / f.H, h = bh % f.H;
  // Rows with no allowed key have dQ 0, and delta_kernel left their dq_accum alone.
  const bool live = f.lse[row] != -INFINITY;
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + row * D + c);
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4 x = live ? src[0] : zero, y = live ? src[1] : zero;
  T* dst = static_cast<T*>(p.dq) + b * p.dq_layout.b + h * p.dq_layout.h + i * p.dq_layout.n + c;
  if (vec) {
    uint4 out;
    out.x = Pack2<T>::pack(x.x * f.scale, x.y * f.scale);
    out.y = Pack2<T>::pack(x.z * f.scale, x.w * f.scale);
    out.z = Pack2<T>::pack(y.x * f.scale, y.y * f.scale);
    out.w = Pack2<T>::pack(y.z * f.scale, y.w * f.scale);
    *reinterpret_cast<uint4*>(dst) = out;
  } else {
    const float v[8] = {x.x, x.y, x.z, x.w, y.x, y.y, y.z, y.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = Pack2<T>::from_float(v[e] * f.scale);
  }
}

// dQ for one query block (kWarps * 16 rows): a second pass over the key tiles
// it meets, K/V double buffered.
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1)
    dq_kernel(const __grid_constant__ BackwardParams p) {
  const ForwardParams& f = p.fwd;
  constexpr int kT = kWarps * 32, kBR = kWarps * 16;
  constexpr bool kQInRegs = D == 64;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  using Smem = DqSmem<T, D, kWarps>;
  expect_dynamic_smem(Smem::kBytes);
  SmemTile<T, D> sQ{smem}, sdO{smem + Smem::kDO};
  T* kv = smem + Smem::kKV;  // K0 V0 K1 V1, then the key pipeline's ints

  const ForwardBlock<T> fb = forward_block<T, kBR>(f);
  if (!fb.exists) return;
  const int b = fb.b, h = fb.h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SwizzledLane<D> la = ldm_lane_a<D>(lane), lb = ldm_lane_b<D>(lane);

  load_rows_async<T, D, kT, kBR>(sQ, 0, fb.q, f.q_layout.n, fb.qperm, fb.q0, fb.q1);
  load_rows_async<T, D, kT, kBR>(sdO, 0, head_ptr<T>(p.dout, p.dout_layout, b, h),
                                 p.dout_layout.n, fb.qperm, fb.q0, fb.q1);
  KeyPipeline<T, D, kT> pipe = start_key_pipeline<T, D, kT, kBR>(fb, f, kv, lane);

  RowInfo rows[2];
  bool valid[2];
  block_query_rows(fb, f, warp, lane, rows, valid);
  float lse2[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float lse = valid[i] ? f.lse[fb.q_base + rows[i].orig] : -INFINITY;
    lse2[i] = lse == -INFINITY ? 0.f : lse * kLog2e;
    delta[i] = valid[i] ? p.delta[fb.q_base + rows[i].orig] : 0.f;
  }
  const float scale_log2 = f.scale * kLog2e;

  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kQInRegs ? D / 16 : 1][4], dof[kQInRegs ? D / 16 : 1][4];
  if constexpr (kQInRegs) {
    load_a_fragments<T, D>(qf, sQ, warp * 16, la);
    load_a_fragments<T, D>(dof, sdO, warp * 16, la);
  }
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  while (pipe.kt >= 0) {
    pipe.wait_and_prefetch(lane);
    const SmemTile<T, D> sK = pipe.key_tile(), sV = pipe.value_tile();
    const int *kpos = pipe.pos(), *kbucket = pipe.bucket();
    const bool all_allowed = pipe.all_allowed;
    float s[8][4], dp[8][4];
    if constexpr (kQInRegs) {
      gemm_rows_tile_t<T, D>(s, qf, sK, lb);    // S = Q K^T
      gemm_rows_tile_t<T, D>(dp, dof, sV, lb);  // dP = dO V^T
    } else {
      gemm_smem_rows_tile_t<T, D>(s, sQ, warp * 16, sK, la, lb);
      gemm_smem_rows_tile_t<T, D>(dp, sdO, warp * 16, sV, la, lb);
    }
    auto grad_scores = [&](auto masked) {  // dS = P * (dP - delta)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        const int col = nb * 8 + (lane % 4) * 2;
        ColumnPair kc;
        if constexpr (decltype(masked)::value) kc = column_pair(kbucket, kpos, col);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          float x = s[nb][e] * scale_log2 - lse2[i];
          if constexpr (decltype(masked)::value) {
            x = pair_allowed(rows[i].bucket, rows[i].pos, kc.b(e), kc.p(e)) ? x : -INFINITY;
          }
          s[nb][e] = fast_exp2(x) * (dp[nb][e] - delta[i]);
        }
      }
    };
    if (all_allowed)
      grad_scores(std::false_type{});
    else
      grad_scores(std::true_type{});
    gemm_acc_tile<T, D>(dq, s, sK, la);  // dQ += dS K

    pipe.advance();
  }
  const float scale[2] = {f.scale, f.scale};
  store_rows<T, D>(dq, scale, static_cast<T*>(p.dq) + b * p.dq_layout.b + h * p.dq_layout.h,
                   p.dq_layout.n, rows, valid, lane);
}

// dq = scale * dq_accum, after the atomic dK/dV pass.
template <typename T, int D>
cudaError_t launch_dq_finalize(const BackwardParams& p, cudaStream_t stream) {
  const ForwardParams& f = p.fwd;
  const int64_t chunks = static_cast<int64_t>(f.B) * f.H * f.Nq * (D / 8);
  const bool vec = rows_aligned16(p.dq, p.dq_layout);
  dq_finalize_kernel<T, D><<<static_cast<unsigned>((chunks + 255) / 256), 256, 0, stream>>>(p, vec);
  return cudaGetLastError();
}

// The deterministic dQ pass (no dq_accum).
template <typename T, int D>
cudaError_t launch_dq(const BackwardParams& p, cudaStream_t stream) {
  using Smem = DqSmem<T, D, kDqWarps>;
  const ForwardParams& f = p.fwd;
  const Grid grid = pass_grid(num_row_blocks(f.q_pack, f.Nq, Smem::kBR), f.B * f.H);
  BackwardParams pq = p;
  pq.fwd.heads_fastest = grid.heads_fastest;
  return launch_kernel(dq_kernel<T, D, kDqWarps>, grid.dims, kDqWarps * 32, Smem::kBytes, stream,
                       pq);
}

}  // namespace sparseflash::kernels::detail
