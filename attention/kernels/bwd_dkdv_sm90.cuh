// dK/dV on Hopper (sm_90a, bf16) and its launcher.
#pragma once

#include "attention/kernels/bwd_common.cuh"

namespace sparseflash::kernels::detail {

// dK/dV on Hopper (sm_90a, bf16): dkdv_kernel's blocks of 128 keys and its
// loop over the query tiles that meet them, with every product on warpgroup
// MMA. Two warpgroups own 64 keys each (warp w: keys 16w..16w+15, as in
// dkdv_kernel); K, V, Q, dO and dS^T sit in shared memory as 128B-swizzled
// panels. Per query tile (64 queries):
//   S^T  [64 x 64] = K Q^T      SS, K and Q K-major;
//   dP^T [64 x 64] = V dO^T     SS, V and dO K-major;
//   P^T, dS^T = P^T (dP^T - delta) in registers (dkdv_kernel's code);
//   dV [64 x D] += P^T dO        RS, dO MN-major;
//   dK [64 x D] += dS^T Q        RS, Q MN-major;
//   dQ [64 x D] += dS K, from dS^T stored to shared memory, fp32 atomics as
//     in dkdv_kernel: at D = 128 on wgmma SS (dS^T and K MN-major), warpgroup
//     g taking columns 64g..64g+63; at D = 64 deferred to the next iteration,
//     wgmma SS m64n32k16, warpgroup g taking columns 32g..32g+31.
// A warpgroup whose keys cannot meet the query tile skips its products.

template <int D, bool kAtomicDq>
__global__ void __launch_bounds__(kBwdWarps * 32, 1)
    dkdv_kernel_wgmma(const __grid_constant__ BackwardParams p) {
  using T = __nv_bfloat16;
  const ForwardParams& f = p.fwd;
  constexpr int kT = kBwdWarps * 32;
  constexpr int kKPanel = kBwdKeys * 128;  // bytes of one 64-column panel of K, V, dS^T
  constexpr int kQPanel = kRows * 128;     // of Q, dO
  using Smem = DkdvSm90Smem<D, kAtomicDq>;
  expect_dynamic_smem(Smem::kBytes);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw + ((1024 - wgmma::smem_addr(smem_raw) % 1024) % 1024));
  T* sK = smem;                          // [kBwdKeys x D] panels
  T* sV = smem + Smem::kV;
  // D = 64: the dQ of query tile i runs in iteration i + 1, ahead of
  // that iteration's S^T / dP^T wgmma; its dS^T, flags and
  // original rows are double-buffered and published by the iteration's first
  // barrier, so the loop has one block barrier per tile instead of two. The
  // dV/dK wgmma of tile i are retired in iteration i + 1 too, once its S^T /
  // dP^T are issued; their Q/dO buffer is then still being read, so Q/dO have
  // three buffers.
  // That dQ is wgmma SS m64n32k16 over all 128 keys: warpgroup g takes
  // columns 32g..32g+31 (the half of K's panel 64 g bytes in), one atomic per
  // element. It is issued before the next tile's S^T / dP^T, so its atomics
  // run while those are computed.
  constexpr bool kDeferDq = Smem::kDeferDq;
  constexpr int kQdoBufs = Smem::kQdoBufs;
  T* qdo = smem + Smem::kQdo;  // Q0 dO0 Q1 dO1 (Q2 dO2), [kRows x D] panels each
  // dS^T [kBwdKeys x kRows], one panel each; two when dQ is deferred.
  T* sdS = smem + Smem::kDs;
  int* meta = reinterpret_cast<int*>(smem + Smem::kMeta);
  // meta: the query stream's kQueryStreamInts, then per dS^T buffer and
  // warpgroup 1 if its keys met the query tile ([2][2]), a reduction area
  // ([2][5]) and per dS^T buffer the query tile's original rows ([2][kRows]).
  int* wg_active = meta + Smem::kWgActiveInt;
  int* dq_orig = meta + Smem::kDqOrigInt;

  const int bhk = blockIdx.y, b = bhk / f.Hkv, hk = bhk % f.Hkv;
  const int group = f.H / f.Hkv, nqt = num_tiles(f.Nq), nkt = num_tiles(f.Nk);
  const int64_t k_base = static_cast<int64_t>(bhk) * f.Nk;
  const KeyBlock kblk = key_block(f, bhk, k_base, nkt);
  if (!kblk.exists || kblk.dead) return;  // dropped keys: zero_dead_rows
  const int k0 = kblk.k0, k1 = kblk.k1;
  const TileRange kr = kblk.range;
  const int* kperm = f.k_pack.perm ? f.k_pack.perm + k_base : nullptr;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  // At D = 128 the look-ahead's registers would spill in the loop.
  QueryTileStream<T, D, kT, true, D == 64, kQdoBufs> qs{
      p, b, hk, group, nqt, f.q_pack.tiles + static_cast<int64_t>(b * f.H + hk * group) * nqt, kr,
      f.q_pack.perm == nullptr, qdo, meta};
  qs.begin(lane);
  // K and V only when a query tile meets the block (with dropping most blocks
  // meet none and just write zeros).
  if (qs.have) {
    load_rows_async_sw128<T, D, kT, kBwdKeys>(sK, head_ptr<T>(f.k, f.k_layout, b, hk),
                                              f.k_layout.n, kperm, k0, k1);
    load_rows_async_sw128<T, D, kT, kBwdKeys>(sV, head_ptr<T>(f.v, f.v_layout, b, hk),
                                              f.v_layout.n, kperm, k0, k1);
  }
  cp_async_commit();

  // This thread's two keys, and the bucket and position ranges of the
  // warpgroup's 64 keys (for skipping).
  RowInfo rows[2];
  bool valid[2];
  int wb_lo = INT_MAX, wb_hi = INT_MIN, wpos_lo = INT_MAX, wpos_hi = INT_MIN;
  bool all_valid = true;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int packed = k0 + warp * 16 + lane / 4 + 8 * i;
    valid[i] = packed < k1;
    rows[i] = row_info(f.k_pack, k_base, packed, k1, 0, kInvalidKeyBucket);
    if (valid[i]) {
      wb_lo = min(wb_lo, rows[i].bucket);
      wb_hi = max(wb_hi, rows[i].bucket);
      wpos_lo = min(wpos_lo, rows[i].pos);
      wpos_hi = max(wpos_hi, rows[i].pos);
    } else {
      all_valid = false;
    }
  }
  {
    // Reduce over the warpgroup through shared memory (reusing wg_active's
    // neighbours would race; a small dedicated area follows it).
    int* red = wg_active + 4;  // [2 warpgroups][5]
    if (threadIdx.x < 10) red[threadIdx.x] = (threadIdx.x % 5 == 0 || threadIdx.x % 5 == 2)
                                                 ? INT_MAX
                                                 : (threadIdx.x % 5 == 4 ? 1 : INT_MIN);
    __syncthreads();
    atomicMin(&red[wg * 5 + 0], wb_lo);
    atomicMax(&red[wg * 5 + 1], wb_hi);
    atomicMin(&red[wg * 5 + 2], wpos_lo);
    atomicMax(&red[wg * 5 + 3], wpos_hi);
    if (!all_valid) atomicAnd(&red[wg * 5 + 4], 0);
    __syncthreads();
    wb_lo = red[wg * 5 + 0];
    wb_hi = red[wg * 5 + 1];
    wpos_lo = red[wg * 5 + 2];
    wpos_hi = red[wg * 5 + 3];
    all_valid = red[wg * 5 + 4] != 0;
  }
  // Every pair of this warpgroup's keys with a complete query tile q is allowed.
  const int wpos_hi_full = all_valid ? wpos_hi : INT_MAX;
  const float scale_log2 = f.scale * kLog2e;

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  const uint32_t k_addr = wgmma::smem_addr(sK), v_addr = wgmma::smem_addr(sV);
  const uint32_t ds_addr = wgmma::smem_addr(sdS);

  uint32_t pf[4][4], dsf[4][4];  // P^T and dS^T as wgmma A fragments
  int dsb = 0;              // this tile's dS^T buffer (kDeferDq)
  bool dq_pending = false;  // the previous tile's dQ is still to do
  int dq_cg = 0;            // its query head in the group
  // kDeferDq: dQ = dS K of the tile whose dS^T is in buffer db, this
  // warpgroup's 32 columns over all 128 keys (an idle warpgroup's dS^T rows
  // are zeros); dS^T (A) and K (B) MN-major. One commit group.
  auto issue_dq = [&](float (&dq)[16], int db) {
    const uint32_t a0 = ds_addr + db * (kBwdKeys * kRows * 2);
    wgmma::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBwdKeys / 16; ++ks)
      wgmma::mma_ss<32, 1, 1, 1, 1>(
          dq, wgmma::desc_mn_major_sw128(a0 + 2048 * ks, kKPanel),
          wgmma::desc_mn_major_sw128(k_addr + 64 * wg + 2048 * ks, kKPanel), ks > 0);
    wgmma::wgmma_commit();
  };
  // ... and its atomics into dq_accum (query head gg of the group), once retired.
  auto add_dq = [&](const float (&dq)[16], int db, int gg) {
    const int* fl = wg_active + 2 * db;
    if (!fl[0] && !fl[1]) return;  // no key of the block met the tile
    const int bh = b * f.H + hk * group + gg;
    float* head = p.dq_accum + static_cast<int64_t>(bh) * f.Nq * D;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int orig = dq_orig[db * kRows + (warp % 4) * 16 + lane / 4 + 8 * i];
      if (orig < 0) continue;
      float* dst = head + static_cast<int64_t>(orig) * D + 32 * wg + (lane % 4) * 2;
#pragma unroll
      for (int j = 0; j < 4; ++j) atomic_add2(dst + 8 * j, dq[4 * j + 2 * i], dq[4 * j + 2 * i + 1]);
    }
  };

  while (qs.have) {
    cp_async_wait_all();
    wgmma::fence_proxy_async_shared();
    __syncthreads();  // tile in; the other buffers, sdS and the flags are free again
    qs.prefetch(lane);
    const int bf = qs.bf, cg = qs.cg, cqt = qs.cqt;
    const TileRange cur = qs.cur;

    const uint32_t q_addr = wgmma::smem_addr(qdo + (2 * qs.qbuf) * kRows * D);
    const uint32_t do_addr = wgmma::smem_addr(qdo + (2 * qs.qbuf + 1) * kRows * D);
    const int *sQpos = qs.pos(bf), *sQbucket = qs.bucket(bf), *sQorig = qs.orig(bf);
    const float *sLse = qs.lse(bf), *sDelta = qs.delta(bf);

    const bool active = wb_lo <= cur.y && wb_hi >= cur.x && wpos_lo <= cur.w;
    const bool all_allowed = cur.x == cur.y && wb_lo == wb_hi && wb_lo == cur.x &&
                             wpos_hi_full <= cur.z && (cqt + 1) * kRows <= f.Nq;
    // With dQ deferred, S^T and dP^T are issued whether or not this
    // warpgroup's keys meet the tile (a branch around wgmma that overlaps the
    // dQ code makes ptxas serialize every wgmma); an idle warpgroup discards them.
    const bool issue_sdp = kDeferDq || active;
    float s[32], dp[32];
    // kDeferDq: the previous tile's dQ first (on the first tile its result is
    // dropped), so that its atomics overlap S^T / dP^T.
    float dq[kDeferDq ? 16 : 1];
    if constexpr (kDeferDq) issue_dq(dq, dsb ^ 1);
    if (issue_sdp) {
      wgmma::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const uint32_t a_off = (ks / 4) * kKPanel + wg * 64 * 128 + 32 * (ks % 4);
        const uint32_t b_off = (ks / 4) * kQPanel + 32 * (ks % 4);
        wgmma::mma_ss<64, 1, 1, 0, 0>(s, wgmma::desc_k_major_sw128(k_addr + a_off),
                                      wgmma::desc_k_major_sw128(q_addr + b_off), ks > 0);
        wgmma::mma_ss<64, 1, 1, 0, 0>(dp, wgmma::desc_k_major_sw128(v_addr + a_off),
                                      wgmma::desc_k_major_sw128(do_addr + b_off), ks > 0);
      }
      wgmma::wgmma_commit();
    }
    if constexpr (kDeferDq) {
      // The previous tile's dV/dK and dQ (the older groups) are done; pf and
      // dsf are free. Its dQ atomics while S^T and dP^T are computed.
      wgmma::wgmma_wait<1>();
      wgmma::fence_operands(dk);
      wgmma::fence_operands(dv);
      wgmma::fence_operands(pf);
      wgmma::fence_operands(dsf);
      wgmma::fence_operands(dq);
      if (dq_pending) add_dq(dq, dsb ^ 1, dq_cg);
    }
    if (issue_sdp) {
      wgmma::wgmma_wait<0>();
      wgmma::fence_operands(s);
      wgmma::fence_operands(dp);
    }
    if (active) {
      // P^T; masked pairs get exp2(-inf) = 0
      backward_probs([&](int nb, int e) -> float& { return s[4 * nb + e]; }, all_allowed, sLse,
                     sQbucket, sQpos, rows, scale_log2, lane);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        const float2 delta = *reinterpret_cast<const float2*>(sDelta + nb * 8 + (lane % 4) * 2);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          dp[4 * nb + e] = s[4 * nb + e] * (dp[4 * nb + e] - ((e & 1) ? delta.y : delta.x));
      }
    } else if constexpr (kDeferDq) {
      // An idle warpgroup adds zeros (its wgmma are not skipped: see above).
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = dp[i] = 0.f;
    }
    if (kDeferDq || active) {
      // P^T and dS^T as A fragments; dS^T also to shared memory for dQ.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          pf[j][r] = Pack2<T>::pack(s[8 * j + 2 * r], s[8 * j + 2 * r + 1]);
          dsf[j][r] = Pack2<T>::pack(dp[8 * j + 2 * r], dp[8 * j + 2 * r + 1]);
        }
        if constexpr (kAtomicDq) {
          const int key = warp * 16 + lane / 4, q = j * 16 + (lane % 4) * 2;
          uint32_t* base = reinterpret_cast<uint32_t*>(sdS + (kDeferDq ? dsb * kBwdKeys * kRows : 0));
          base[wgmma::sw128_index(key, q, kBwdKeys) / 2] = dsf[j][0];
          base[wgmma::sw128_index(key + 8, q, kBwdKeys) / 2] = dsf[j][1];
          base[wgmma::sw128_index(key, q + 8, kBwdKeys) / 2] = dsf[j][2];
          base[wgmma::sw128_index(key + 8, q + 8, kBwdKeys) / 2] = dsf[j][3];
        }
      }
      wgmma::wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wgmma::mma_rs<D, 1, 1, 1>(dv, pf[j], wgmma::desc_mn_major_sw128(do_addr + 2048 * j, kQPanel),
                                  1);
        wgmma::mma_rs<D, 1, 1, 1>(dk, dsf[j], wgmma::desc_mn_major_sw128(q_addr + 2048 * j, kQPanel),
                                  1);
      }
      wgmma::wgmma_commit();
      if constexpr (!kDeferDq) {
        // Retire them here (pf and dsf are read asynchronously).
        wgmma::wgmma_wait<0>();
        wgmma::fence_operands(dk);
        wgmma::fence_operands(dv);
      }
    }

    if constexpr (kDeferDq) {
      // This tile's dQ runs next iteration (or after the loop), after the barrier.
      if (threadIdx.x % 128 == 0) wg_active[2 * dsb + wg] = active ? 1 : 0;
      if (threadIdx.x < kRows) dq_orig[dsb * kRows + threadIdx.x] = sQorig[threadIdx.x];
      dq_pending = true;
      dq_cg = cg;
      dsb ^= 1;
    } else if constexpr (kAtomicDq) {
      if (threadIdx.x % 128 == 0) wg_active[wg] = active ? 1 : 0;
      wgmma::fence_proxy_async_shared();  // the dS^T stores, for wgmma
      __syncthreads();
      const bool act0 = wg_active[0] != 0, act1 = wg_active[1] != 0;
      // D = 128: warpgroup g takes columns 64 g .. 64 g + 63 over the keys of
      // the active warpgroups, on wgmma (dS^T and K MN-major).
      {
        if (act0 || act1) {
          float dq[32];
          wgmma::wgmma_fence();
          int first = 1;
#pragma unroll
          for (int ks = 0; ks < kBwdKeys / 16; ++ks) {
            if (!(ks < 4 ? act0 : act1)) continue;  // keys of an idle warpgroup
            wgmma::mma_ss<64, 1, 1, 1, 1>(
                dq, wgmma::desc_mn_major_sw128(ds_addr + 2048 * ks, kKPanel),
                wgmma::desc_mn_major_sw128(k_addr + wg * kKPanel + 2048 * ks, kKPanel), !first);
            first = 0;
          }
          wgmma::wgmma_commit();
          wgmma::wgmma_wait<0>();
          wgmma::fence_operands(dq);
          const int bh = b * f.H + hk * group + cg;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int orig = sQorig[(warp % 4) * 16 + lane / 4 + 8 * i];
            if (orig < 0) continue;
            float* dst = p.dq_accum + (static_cast<int64_t>(bh) * f.Nq + orig) * D + wg * 64 +
                         (lane % 4) * 2;
#pragma unroll
            for (int dn = 0; dn < 8; ++dn)
              atomic_add2(dst + dn * 8, dq[4 * dn + 2 * i], dq[4 * dn + 2 * i + 1]);
          }
        }
      }
    }

    qs.advance();
  }
  if constexpr (kDeferDq) {
    wgmma::wgmma_wait<0>();  // the last tile's dV/dK
    wgmma::fence_operands(dk);
    wgmma::fence_operands(dv);
    if (dq_pending) {
      wgmma::fence_proxy_async_shared();  // the dS^T stores, for wgmma
      __syncthreads();  // the last tile's dS^T, flags and rows
      float dq[16];
      issue_dq(dq, dsb ^ 1);
      wgmma::wgmma_wait<0>();
      wgmma::fence_operands(dq);
      add_dq(dq, dsb ^ 1, dq_cg);
    }
  }
  cp_async_wait_all();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!valid[i]) continue;
    T* dkd = static_cast<T*>(p.dk) + b * p.dk_layout.b + hk * p.dk_layout.h + rows[i].orig * p.dk_layout.n;
    T* dvd = static_cast<T*>(p.dv) + b * p.dv_layout.b + hk * p.dv_layout.h + rows[i].orig * p.dv_layout.n;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int col = dn * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(dkd + col) =
          Pack2<T>::pack(dk[4 * dn + 2 * i] * f.scale, dk[4 * dn + 2 * i + 1] * f.scale);
      *reinterpret_cast<uint32_t*>(dvd + col) = Pack2<T>::pack(dv[4 * dn + 2 * i], dv[4 * dn + 2 * i + 1]);
    }
  }
}

template <int D, bool kAtomicDq>
cudaError_t launch_dkdv_sm90(const BackwardParams& p, cudaStream_t stream) {
  const ForwardParams& f = p.fwd;
  const dim3 grid(num_row_blocks(f.k_pack, f.Nk, kBwdKeys), f.B * f.Hkv);
  return launch_kernel(dkdv_kernel_wgmma<D, kAtomicDq>, grid, kBwdWarps * 32,
                       DkdvSm90Smem<D, kAtomicDq>::kBytes, stream, p);
}

}  // namespace sparseflash::kernels::detail
