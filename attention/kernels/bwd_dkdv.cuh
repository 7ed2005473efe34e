// dK/dV on mma.sync (fp16, and bf16 off Hopper) and its launcher.
#pragma once

#include "attention/kernels/bwd_common.cuh"

namespace sparseflash::kernels::detail {

// dK, dV for a block of kBwdKeys packed keys, 16 per warp: loops over the
// query heads of its group and the query tiles that can meet the block
// (binary search + ballot), Q and dO double buffered. A warp whose 16 keys
// cannot meet a query tile skips it. At D = 64, K and V stay in registers and
// the four products run in two interleaved pairs (S^T with dP^T, dV with dK);
// at D = 128 they come from shared memory and dP^T is done 32 columns at a time.
//
// kAtomicDq: dS of each query tile is also staged in shared memory and the
// block adds dQ += dS K into an fp32 buffer with atomics (one pass, the
// default). Otherwise dq_kernel computes dQ in a second, deterministic pass.
template <typename T, int D, bool kAtomicDq>
__global__ void __launch_bounds__(kBwdWarps * 32, 1)
    dkdv_kernel(const __grid_constant__ BackwardParams p) {
  const ForwardParams& f = p.fwd;
  constexpr int kT = kBwdWarps * 32;
  constexpr bool kKVInRegs = D == 64;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  using Smem = DkdvSmem<T, D, kAtomicDq>;
  expect_dynamic_smem(Smem::kBytes);
  SmemTile<T, D> sK{smem}, sV{smem + Smem::kV};
  T* qdo = smem + Smem::kQdo;  // Q0 dO0 Q1 dO1, kRows rows each
  // dS^T of the current query tile, [key][query] (kAtomicDq only).
  SmemTile<T, kRows> sdS{smem + Smem::kDs};
  int* meta = reinterpret_cast<int*>(smem + Smem::kMeta);
  // meta: the query stream's kQueryStreamInts, then per warp 1 << warp if
  // its keys met the query tile, else 0.
  int* warp_active = meta + kQueryStreamInts;

  const int bhk = blockIdx.y, b = bhk / f.Hkv, hk = bhk % f.Hkv;
  const int group = f.H / f.Hkv, nqt = num_tiles(f.Nq), nkt = num_tiles(f.Nk);
  const int64_t k_base = static_cast<int64_t>(bhk) * f.Nk;
  const KeyBlock kblk = key_block(f, bhk, k_base, nkt);
  if (!kblk.exists || kblk.dead) return;  // dropped keys: zero_dead_rows
  const int k0 = kblk.k0, k1 = kblk.k1;
  const TileRange kr = kblk.range;
  const int* kperm = f.k_pack.perm ? f.k_pack.perm + k_base : nullptr;
  load_rows_async<T, D, kT, kBwdKeys>(sK, 0, head_ptr<T>(f.k, f.k_layout, b, hk), f.k_layout.n,
                                      kperm, k0, k1);
  load_rows_async<T, D, kT, kBwdKeys>(sV, 0, head_ptr<T>(f.v, f.v_layout, b, hk), f.v_layout.n,
                                      kperm, k0, k1);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SwizzledLane<D> la = ldm_lane_a<D>(lane), lb = ldm_lane_b<D>(lane);
  // dS^T tile (kRows columns): stores of accumulator pairs, B-pattern loads.
  const SwizzledLane<kRows> ds_acc = acc_lane<kRows>(lane);
  QueryTileStream<T, D, kT, false, D == 64> qs{
      p, b, hk, group, nqt, f.q_pack.tiles + static_cast<int64_t>(b * f.H + hk * group) * nqt, kr,
      f.q_pack.perm == nullptr, qdo, meta};
  qs.begin(lane);

  // This warp's 16 keys, and their bucket and position ranges (for skipping).
  RowInfo rows[2];
  bool valid[2];
  int wb_lo = INT_MAX, wb_hi = INT_MIN, wpos_lo = INT_MAX;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = k0 + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < k1;
    rows[i] = row_info(f.k_pack, k_base, packed, k1, 0, kInvalidKeyBucket);
    if (valid[i]) {
      wb_lo = min(wb_lo, rows[i].bucket);
      wb_hi = max(wb_hi, rows[i].bucket);
      wpos_lo = min(wpos_lo, rows[i].pos);
    }
  }
#pragma unroll
  for (int off = 4; off < 32; off *= 2) {  // lanes with the same lane % 4 hold the same rows
    wb_lo = min(wb_lo, __shfl_xor_sync(0xffffffffu, wb_lo, off));
    wb_hi = max(wb_hi, __shfl_xor_sync(0xffffffffu, wb_hi, off));
    wpos_lo = min(wpos_lo, __shfl_xor_sync(0xffffffffu, wpos_lo, off));
  }
  // Every pair of this warp's keys with a complete query tile q is allowed.
  const int wpos_hi_full = [&] {
    int hi = valid[0] && valid[1] ? max(rows[0].pos, rows[1].pos) : INT_MAX;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    return hi;
  }();
  const float scale_log2 = f.scale * kLog2e;

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  cp_async_wait_all();
  __syncthreads();
  uint32_t kf[kKVInRegs ? D / 16 : 1][4], vf[kKVInRegs ? D / 16 : 1][4];
  if constexpr (kKVInRegs) {
    load_a_fragments<T, D>(kf, sK, warp * 16, la);
    load_a_fragments<T, D>(vf, sV, warp * 16, la);
  }

  while (qs.have) {
    cp_async_wait_all();
    __syncthreads();  // tile in; the other buffers, sdS and the flags are free again
    qs.prefetch(lane);
    const int bf = qs.bf, cg = qs.cg, cqt = qs.cqt;
    const TileRange cur = qs.cur;

    const SmemTile<T, D> sQ{qdo + (2 * qs.qbuf) * kRows * D}, sdO{qdo + (2 * qs.qbuf + 1) * kRows * D};
    const int *sQpos = qs.pos(bf), *sQbucket = qs.bucket(bf), *sQorig = qs.orig(bf);
    const float *sLse = qs.lse(bf), *sDelta = qs.delta(bf);

    const bool active = wb_lo <= cur.y && wb_hi >= cur.x && wpos_lo <= cur.w;
    const bool all_allowed = cur.x == cur.y && wb_lo == wb_hi && wb_lo == cur.x &&
                             wpos_hi_full <= cur.z && (cqt + 1) * kRows <= f.Nq;
    if (active) {
      float s[8][4];
      auto apply_probs = [&] {  // P^T; masked pairs get exp2(-inf) = 0
        backward_probs([&](int nb, int e) -> float& { return s[nb][e]; }, all_allowed, sLse,
                       sQbucket, sQpos, rows, scale_log2, lane);
      };
      if constexpr (kKVInRegs) {
        // S^T = K Q^T and dP^T = V dO^T side by side: 16 independent
        // accumulators hide the mma latency.
        float dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
          for (int nb2 = 0; nb2 < 4; ++nb2) {
            uint32_t bq[4], bo[4];
            ldmatrix_x4(bq, sQ.ldm(lb, nb2 * 16, kk * 16));
            ldmatrix_x4(bo, sdO.ldm(lb, nb2 * 16, kk * 16));
            mma_16816<T>(s[2 * nb2], kf[kk], bq[0], bq[1]);
            mma_16816<T>(dp[2 * nb2], vf[kk], bo[0], bo[1]);
            mma_16816<T>(s[2 * nb2 + 1], kf[kk], bq[2], bq[3]);
            mma_16816<T>(dp[2 * nb2 + 1], vf[kk], bo[2], bo[3]);
          }
        }
        apply_probs();
        // P^T and dS^T = P^T * (dP^T - delta) as bf16/fp16 A fragments.
        uint32_t pf[4][4], dsf[4][4];
#pragma unroll
        for (int hb = 0; hb < 8; ++hb) {
          const float2 delta = *reinterpret_cast<const float2*>(sDelta + hb * 8 + (lane % 4) * 2);
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[hb][e] = s[hb][e] * (dp[hb][e] - ((e & 1) ? delta.y : delta.x));
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          pf[j][0] = Pack2<T>::pack(s[2 * j][0], s[2 * j][1]);
          pf[j][1] = Pack2<T>::pack(s[2 * j][2], s[2 * j][3]);
          pf[j][2] = Pack2<T>::pack(s[2 * j + 1][0], s[2 * j + 1][1]);
          pf[j][3] = Pack2<T>::pack(s[2 * j + 1][2], s[2 * j + 1][3]);
          dsf[j][0] = Pack2<T>::pack(dp[2 * j][0], dp[2 * j][1]);
          dsf[j][1] = Pack2<T>::pack(dp[2 * j][2], dp[2 * j][3]);
          dsf[j][2] = Pack2<T>::pack(dp[2 * j + 1][0], dp[2 * j + 1][1]);
          dsf[j][3] = Pack2<T>::pack(dp[2 * j + 1][2], dp[2 * j + 1][3]);
          if constexpr (kAtomicDq) {  // dS^T rows of this warp's keys, for dQ below
            *sdS.pair(ds_acc, warp * 16, j * 16) = dsf[j][0];
            *sdS.pair(ds_acc, warp * 16 + 8, j * 16) = dsf[j][1];
            *sdS.pair(ds_acc, warp * 16, j * 16 + 8) = dsf[j][2];
            *sdS.pair(ds_acc, warp * 16 + 8, j * 16 + 8) = dsf[j][3];
          }
        }
        // dV += P^T dO and dK += dS^T Q side by side.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int dn2 = 0; dn2 < D / 16; ++dn2) {
            uint32_t bo[4], bq[4];
            ldmatrix_x4_trans(bo, sdO.ldm(la, j * 16, dn2 * 16));
            ldmatrix_x4_trans(bq, sQ.ldm(la, j * 16, dn2 * 16));
            mma_16816<T>(dv[2 * dn2], pf[j], bo[0], bo[1]);
            mma_16816<T>(dk[2 * dn2], dsf[j], bq[0], bq[1]);
            mma_16816<T>(dv[2 * dn2 + 1], pf[j], bo[2], bo[3]);
            mma_16816<T>(dk[2 * dn2 + 1], dsf[j], bq[2], bq[3]);
          }
        }
      } else {
        // S^T = K Q^T: keys are this warp's rows, queries the columns.
        gemm_smem_rows_tile_t<T, D>(s, sK, warp * 16, sQ, la, lb);
        apply_probs();
        gemm_acc_tile<T, D>(dv, s, sdO, la);  // dV += P^T dO

        // dS^T = P^T * (V dO^T - delta), dK += dS^T Q, 32 query columns at a
        // time (dK, dV, P^T and dP^T all in registers at D = 128 would spill).
        constexpr int kJ = 2;
#pragma unroll
        for (int j0 = 0; j0 < 4; j0 += kJ) {
          float dp[2 * kJ][4];
#pragma unroll
          for (int i = 0; i < 2 * kJ; ++i) dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            ldmatrix_x4(a, sV.ldm(la, warp * 16, kk * 16));
#pragma unroll
            for (int jj = 0; jj < kJ; ++jj) {
              uint32_t bb[4];
              ldmatrix_x4(bb, sdO.ldm(lb, (j0 + jj) * 16, kk * 16));
              mma_16816<T>(dp[2 * jj], a, bb[0], bb[1]);
              mma_16816<T>(dp[2 * jj + 1], a, bb[2], bb[3]);
            }
          }
#pragma unroll
          for (int hb = 0; hb < 2 * kJ; ++hb) {
            const float2 delta = *reinterpret_cast<const float2*>(sDelta + (2 * j0 + hb) * 8 + (lane % 4) * 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) s[2 * j0 + hb][e] *= dp[hb][e] - ((e & 1) ? delta.y : delta.x);
          }
#pragma unroll
          for (int jj = 0; jj < kJ; ++jj) {
            const int j = j0 + jj;
            uint32_t a[4];
            a[0] = Pack2<T>::pack(s[2 * j][0], s[2 * j][1]);
            a[1] = Pack2<T>::pack(s[2 * j][2], s[2 * j][3]);
            a[2] = Pack2<T>::pack(s[2 * j + 1][0], s[2 * j + 1][1]);
            a[3] = Pack2<T>::pack(s[2 * j + 1][2], s[2 * j + 1][3]);
            if constexpr (kAtomicDq) {  // dS^T rows of this warp's keys, for dQ below
              *sdS.pair(ds_acc, warp * 16, j * 16) = a[0];
              *sdS.pair(ds_acc, warp * 16 + 8, j * 16) = a[1];
              *sdS.pair(ds_acc, warp * 16, j * 16 + 8) = a[2];
              *sdS.pair(ds_acc, warp * 16 + 8, j * 16 + 8) = a[3];
            }
#pragma unroll
            for (int dn2 = 0; dn2 < D / 16; ++dn2) {
              uint32_t bq[4];
              ldmatrix_x4_trans(bq, sQ.ldm(la, j * 16, dn2 * 16));
              mma_16816<T>(dk[2 * dn2], a, bq[0], bq[1]);
              mma_16816<T>(dk[2 * dn2 + 1], a, bq[2], bq[3]);
            }
          }
        }
      }
    }

    if constexpr (kAtomicDq) {
      // dQ (kRows x D) += dS (kRows x kBwdKeys) K: warp w takes query rows
      // 16 (w % 4) .. +15 and columns (D / 2) (w / 4) .. +D/2 - 1, and skips
      // the keys of warps that had nothing to do.
      if (lane == 0) warp_active[warp] = active ? 1 << warp : 0;
      __syncthreads();
      unsigned active_warps = 0;  // bit kk: warp kk's keys met the query tile
#pragma unroll
      for (int kk = 0; kk < kBwdWarps; ++kk) active_warps |= warp_active[kk];
      const int bh = b * f.H + hk * group + cg;
      dq_atomic_mma_sync<T, D>(sdS, sK, active_warps, sQorig,
                               p.dq_accum + static_cast<int64_t>(bh) * f.Nq * D, warp, lane);
    }

    qs.advance();
  }
  const float one[2] = {1.f, 1.f}, scale[2] = {f.scale, f.scale};
  store_rows<T, D>(dk, scale,
                   static_cast<T*>(p.dk) + b * p.dk_layout.b + hk * p.dk_layout.h,
                   p.dk_layout.n, rows, valid, lane);
  store_rows<T, D>(dv, one, static_cast<T*>(p.dv) + b * p.dv_layout.b + hk * p.dv_layout.h,
                   p.dv_layout.n, rows, valid, lane);
}

// Row blocks fastest: the dK/dV kernels read blockIdx directly (pass_grid).
template <typename T, int D, bool kAtomicDq>
cudaError_t launch_dkdv(const BackwardParams& p, cudaStream_t stream) {
  const ForwardParams& f = p.fwd;
  const dim3 grid(num_row_blocks(f.k_pack, f.Nk, kBwdKeys), f.B * f.Hkv);
  return launch_kernel(dkdv_kernel<T, D, kAtomicDq>, grid, kBwdWarps * 32,
                       DkdvSmem<T, D, kAtomicDq>::kBytes, stream, p);
}

}  // namespace sparseflash::kernels::detail
