// What the backward passes share: the dQ accumulation of the dK/dV blocks,
// the query-tile stream, delta, the dropped rows' outputs, the key block.
#pragma once

#include "attention/kernels/launch.h"
#include "attention/kernels/tile_loop.cuh"

namespace sparseflash::kernels::detail {

// dQ (kRows x D) += dS (kRows x kBwdKeys) K into dq_accum (fp32 atomics, one
// per element), on mma.sync from dS^T ([kBwdKeys x kRows] SmemTile) and K
// ([kBwdKeys x D] SmemTile): warp w takes query rows 16 (w % 4) .. +15 and
// columns (D / 2) (w / 4) .. +D/2 - 1, over the 16-key row groups whose bit is
// set in active_warps (bit kk: keys 16kk..16kk+15 met the query tile).
template <typename T, int D>
__device__ __forceinline__ void dq_atomic_mma_sync(SmemTile<T, kRows> sdS, SmemTile<T, D> sK,
                                                   unsigned active_warps, const int* sQorig,
                                                   float* dq_accum_head, int warp, int lane) {
  constexpr int kCols = D / 2;
  const SwizzledLane<D> la = ldm_lane_a<D>(lane);
  const SwizzledLane<kRows> ds_lb = ldm_lane_b<kRows>(lane);
  const int qr0 = (warp % 4) * 16, c0 = (warp / 4) * kCols;
  float dq[kCols / 8][4];
#pragma unroll
  for (int i = 0; i < kCols / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  // This lane's addresses for the keys of warp 0; warp kk's are 16 kk rows
  // on. A rolled loop over the active warps keeps them in registers (the
  // unrolled, skippable steps had them recomputed from the lane index in
  // every step).
  const uint32_t ds_addr = sdS.ldm(ds_lb, 0, qr0);
  uint32_t k_addr[kCols / 16];
#pragma unroll
  for (int dn2 = 0; dn2 < kCols / 16; ++dn2) k_addr[dn2] = sK.ldm(la, 0, c0 + dn2 * 16);
#pragma unroll 1
  for (unsigned m = active_warps; m != 0; m &= m - 1) {
    const int kk = __ffs(m) - 1;
    uint32_t a[4];
    ldmatrix_x4_trans(a, ds_addr + kk * 16 * sdS.kRowBytes);
#pragma unroll
    for (int dn2 = 0; dn2 < kCols / 16; ++dn2) {
      uint32_t bk[4];
      ldmatrix_x4_trans(bk, k_addr[dn2] + kk * 16 * sK.kRowBytes);
      mma_16816<T>(dq[2 * dn2], a, bk[0], bk[1]);
      mma_16816<T>(dq[2 * dn2 + 1], a, bk[2], bk[3]);
    }
  }
  if (active_warps == 0) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int orig = sQorig[qr0 + lane / 4 + 8 * i];
    if (orig < 0) continue;
    float* dst = dq_accum_head + static_cast<int64_t>(orig) * D + c0 + (lane % 4) * 2;
#pragma unroll
    for (int dn = 0; dn < kCols / 8; ++dn) atomic_add2(dst + dn * 8, dq[dn][2 * i], dq[dn][2 * i + 1]);
  }
}

// The dK/dV kernels' stream of (query head of the GQA group, query tile)
// pairs that meet a block of keys, with Q and dO of each pair loaded into one
// of two buffers (qdo: Q0 dO0 Q1 dO1, [kRows x D] each; kPanels: as wgmma
// panels, else SmemTile layout) and the pair's per-row metadata.
template <typename T, int D, int kT, bool kPanels, bool kLookAhead = true, int kQdoBufs = 2>
struct QueryTileStream {
  const BackwardParams& p;
  int b, hk, group, nqt;
  const TileRange* qtiles0;  // the group's first head's query tiles
  TileRange kr;              // the key block's range
  bool q_identity;
  T* qdo;
  // [2 buffers][pos, bucket, lse, delta, orig, rows ahead][kRows] (kQueryStreamInts):
  // lse is the forward's (natural log, -inf for rows with no key), orig -1 past Nq.
  int* meta;
  int g = 0;
  MeetIter it;

  __device__ __forceinline__ void start_head(int gg, int lane) {
    const TileRange* qt = qtiles0 + static_cast<int64_t>(gg) * nqt;
    const IndexRange r = query_tile_range(qt, nqt, kr, q_identity, lane);
    it = MeetIter{qt, kr, r.lo, r.hi, 0u, false};
    it.fill(lane);
  }
  // Next (head, query tile) pair; false when done.
  __device__ __forceinline__ bool next(int& gg, int& qt, int lane) {
    while (true) {
      const int r = it.next(lane);
      if (r >= 0) {
        gg = g;
        qt = r;
        return true;
      }
      if (++g >= group) return false;
      start_head(g, lane);
    }
  }
  __device__ __forceinline__ const int* qperm_of(int gg) const {
    const ForwardParams& f = p.fwd;
    const int bh = b * f.H + hk * group + gg;
    return f.q_pack.perm ? f.q_pack.perm + static_cast<int64_t>(bh) * f.Nq : nullptr;
  }
  // Starts the copies of Q and dO of head gg's rows in g into Q/dO buffer qb.
  __device__ __forceinline__ void issue(int gg, const RowGather<D, kT, kRows>& g, int qb) const {
    const ForwardParams& f = p.fwd;
    const T* q = head_ptr<T>(f.q, f.q_layout, b, hk * group + gg);
    const T* dout = head_ptr<T>(p.dout, p.dout_layout, b, hk * group + gg);
    load_tile_gathered<T, D, kT, kRows, kPanels>(qdo + (2 * qb) * kRows * D, q, f.q_layout.n, g);
    load_tile_gathered<T, D, kT, kRows, kPanels>(qdo + (2 * qb + 1) * kRows * D, dout,
                                                 p.dout_layout.n, g);
  }
  // Row threadIdx.x of the pair (threads < kRows): its packed-row data.
  __device__ __forceinline__ RowInfo meta_row(int gg, int qt) const {
    const ForwardParams& f = p.fwd;
    const int64_t q_base = static_cast<int64_t>(b * f.H + hk * group + gg) * f.Nq;
    return row_info(f.q_pack, q_base, qt * kRows + threadIdx.x, f.Nq, f.Nk - f.Nq,
                    kInvalidQueryBucket);
  }
  // Row threadIdx.x's metadata into buffer bf (threads < kRows): position,
  // bucket and original row from qi, lse and delta by cp.async (in the pair's
  // copy group), so nothing waits on a load here.
  __device__ __forceinline__ void store_meta(int gg, int qt, const RowInfo& qi, int bf) const {
    const ForwardParams& f = p.fwd;
    const int64_t q_base = static_cast<int64_t>(b * f.H + hk * group + gg) * f.Nq;
    const bool in = qt * kRows + static_cast<int>(threadIdx.x) < f.Nq;
    int* m = meta + bf * 6 * kRows;
    m[threadIdx.x] = qi.pos;
    m[kRows + threadIdx.x] = qi.bucket;
    cp_async_4(m + 2 * kRows + threadIdx.x, f.lse + q_base + qi.orig, in);
    cp_async_4(m + 3 * kRows + threadIdx.x, p.delta + q_base + qi.orig, in);
    m[4 * kRows + threadIdx.x] = in ? qi.orig : -1;
  }
  __device__ __forceinline__ TileRange tile_of(int gg, int qt) const {
    return __ldg(&qtiles0[static_cast<int64_t>(gg) * nqt + qt]);
  }
  // The pair being computed (buffer bf) and the one being loaded (bf ^ 1):
  //   qs.begin(lane);
  //   while (qs.have) {
  //     cp_async_wait_all(); __syncthreads();
  //     qs.prefetch(lane);      // next pair into the other buffer
  //     ... qs.cur, qs.cg, qs.cqt, buffer qs.bf ...
  //     qs.advance();
  //   }
  // The pair after next is found one iteration ahead and its source rows and
  // packed-row data read then (loads in flight), so that neither the copies
  // nor the metadata loads wait on the permutation.
  bool have = false, nhave = false, ahave = false;
  int cg = 0, cqt = 0, ng = 0, nqt_ = 0, ag = 0, aqt = 0, bf = 0;
  // Q/dO buffers (kQdoBufs of them, cycled): the current pair's and the next's.
  // The metadata buffers are always two (bf).
  int qbuf = 0, nqbuf = 0;
  TileRange cur{0, -1, 0, -1}, ntile{0, -1, 0, -1};
  RowInfo arow{0, 0, 0};  // row threadIdx.x of pair (ag, aqt) (threads < kRows)

  // Its source rows, [kRows] in buffer b's metadata: written at advance(),
  // read by the next prefetch.
  __device__ __forceinline__ int* ahead_rows(int b) const { return meta + b * 6 * kRows + 5 * kRows; }
  __device__ __forceinline__ void look_ahead(int lane) {
    ahave = next(ag, aqt, lane);
    if (ahave && threadIdx.x < kRows) arow = meta_row(ag, aqt);
  }
  __device__ __forceinline__ void store_ahead(int b) const {
    if (!q_identity && threadIdx.x < kRows)
      ahead_rows(b)[threadIdx.x] =
          aqt * kRows + static_cast<int>(threadIdx.x) < p.fwd.Nq ? arow.orig : -1;
  }
  // Starts loading pair (gg, qt) into Q/dO buffer qb and metadata buffer mb,
  // reading the permutation now (the copies wait on it).
  __device__ __forceinline__ void load_pair_now(int gg, int qt, int qb, int mb) const {
    RowGather<D, kT, kRows> g;
    g.fetch(qperm_of(gg), qt * kRows, p.fwd.Nq);
    issue(gg, g, qb);
    if (threadIdx.x < kRows) store_meta(gg, qt, meta_row(gg, qt), mb);
  }
  // Finds the first pair and starts loading it (one cp.async group).
  __device__ __forceinline__ void begin(int lane) {
    start_head(0, lane);
    have = next(cg, cqt, lane);
    if (have) {
      load_pair_now(cg, cqt, 0, 0);
      cur = tile_of(cg, cqt);
      if constexpr (kLookAhead) {
        look_ahead(lane);
        if (ahave) store_ahead(1);
      }
    }
    cp_async_commit();
  }
  // Starts loading the next pair into the other buffer (one cp.async group).
  __device__ __forceinline__ void prefetch(int lane) {
    ntile = TileRange{0, -1, 0, -1};
    if constexpr (kLookAhead) {
      nhave = ahave;
      if (nhave) {
        ng = ag, nqt_ = aqt;
        RowGather<D, kT, kRows> g;
        if (q_identity)
          g.fetch(nullptr, nqt_ * kRows, p.fwd.Nq);  // nothing to wait for
        else
          g.from_rows(ahead_rows(bf ^ 1));
        nqbuf = qbuf + 1 == kQdoBufs ? 0 : qbuf + 1;
        issue(ng, g, nqbuf);
        ntile = tile_of(ng, nqt_);
        if (threadIdx.x < kRows) store_meta(ng, nqt_, arow, bf ^ 1);
        look_ahead(lane);
      }
    } else {
      nhave = next(ng, nqt_, lane);
      if (nhave) {
        nqbuf = qbuf + 1 == kQdoBufs ? 0 : qbuf + 1;
        load_pair_now(ng, nqt_, nqbuf, bf ^ 1);
        ntile = tile_of(ng, nqt_);
      }
    }
    cp_async_commit();
  }
  __device__ __forceinline__ void advance() {
    if (kLookAhead && ahave) store_ahead(bf);
    have = nhave;
    cur = ntile;
    cg = ng;
    cqt = nqt_;
    bf ^= 1;
    qbuf = nqbuf;
  }
  // Buffer bf's metadata.
  __device__ __forceinline__ const int* pos(int bf) const { return meta + bf * 6 * kRows; }
  __device__ __forceinline__ const int* bucket(int bf) const { return pos(bf) + kRows; }
  __device__ __forceinline__ const float* lse(int bf) const {
    return reinterpret_cast<const float*>(pos(bf) + 2 * kRows);
  }
  __device__ __forceinline__ const float* delta(int bf) const { return lse(bf) + kRows; }
  __device__ __forceinline__ const int* orig(int bf) const { return pos(bf) + 4 * kRows; }
};

// P^T of one warp's keys (rows) against a query tile (columns), in place on
// the S^T accumulators s(nb, e) (the m16n8 C layout): exp2(S^T scale_log2 -
// lse log2(e)) with the forward's natural-log lse, masked pairs 0. A row with
// no allowed key (lse -inf) is masked in every pair, so its +inf never
// survives the mask, and an all-allowed tile has no such row.
template <typename SAt>
__device__ __forceinline__ void backward_probs(SAt s, bool all_allowed, const float* sLse,
                                               const int* sQbucket, const int* sQpos,
                                               const RowInfo (&rows)[2], float scale_log2,
                                               int lane) {
  auto probs = [&](auto masked) {
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      const int col = nb * 8 + (lane % 4) * 2;
      const float2 lse = *reinterpret_cast<const float2*>(sLse + col);
      const float lse2x = lse.x * kLog2e, lse2y = lse.y * kLog2e;
      ColumnPair qc;
      if constexpr (decltype(masked)::value) qc = column_pair(sQbucket, sQpos, col);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        float x = fmaf(s(nb, e), scale_log2, -((e & 1) ? lse2y : lse2x));
        if constexpr (decltype(masked)::value) {
          x = pair_allowed(qc.b(e), qc.p(e), rows[i].bucket, rows[i].pos) ? x : -INFINITY;
        }
        s(nb, e) = fast_exp2(x);
      }
    }
  };
  if (all_allowed)
    probs(std::false_type{});
  else
    probs(std::true_type{});
}

// delta = rowsum(dout * out), original order, D / 8 threads per row with 8
// elements each (16-byte loads when `vec`: out and dout 16-byte aligned, their
// strides multiples of 8). Rows with no allowed key (lse -inf; their output is
// 0) get delta 0 without being read. With atomic dQ it also zeroes the rows of
// dq_accum that dQ will be read from (dq_finalize_kernel writes 0 for the rest).
template <typename T, int D>
__global__ void delta_kernel(const __grid_constant__ BackwardParams p, bool vec) {
  constexpr int kPerRow = D / 8;
  const ForwardParams& f = p.fwd;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / kPerRow) + threadIdx.x / kPerRow;
  const int c = (threadIdx.x % kPerRow) * 8;
  if (row >= static_cast<int64_t>(f.B) * f.H * f.Nq) return;  // whole rows: kPerRow divides 32
  const bool live = f.lse[row] != -INFINITY;
  float sum = 0.f;
  if (live) {
    const int i = row % f.Nq, bh = row / f.Nq, b = bh / f.H, h = bh % f.H;
    const T* o = head_ptr<T>(f.out, f.out_layout, b, h) + i * f.out_layout.n + c;
    const T* d = head_ptr<T>(p.dout, p.dout_layout, b, h) + i * p.dout_layout.n + c;
    if (vec) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o), dv = *reinterpret_cast<const uint4*>(d);
      const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 a = Pack2<T>::unpack(ow[e]), g = Pack2<T>::unpack(dw[e]);
        sum = fmaf(a.x, g.x, fmaf(a.y, g.y, sum));
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += Pack2<T>::to_float(o[e]) * Pack2<T>::to_float(d[e]);
    }
    if (p.dq_accum != nullptr) {
      float4* z = reinterpret_cast<float4*>(p.dq_accum + row * D + c);
      z[0] = z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int off = kPerRow / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
  if (c == 0) p.delta[row] = sum;
}

// Dropped rows (bucket dead_bucket or more: packed rows segments[dead_bucket]
// on) of one side: their rows of up to two [B, heads, n, D] outputs are set to
// 0 and, given lse ([B * heads, n]), their log-sum-exp to -inf. This is what the
// forward and dK/dV blocks of such rows would write; done here at full
// occupancy, those blocks exit at once (ForwardBlock::dead, KeyBlock::dead).
// D / 8 threads per row, 8 elements each (16-byte stores when `vec`).
// (DeadRowsOut: launch.h.)

template <int D>
__global__ void __launch_bounds__(256)
    zero_dead_rows_kernel(const __grid_constant__ Packing pk, int seqs, int heads, int n,
                          DeadRowsOut out0, DeadRowsOut out1, float* lse, bool vec) {
  constexpr int kPerRow = D / 8, kRowsPerBlock = 256 / kPerRow;
  const int c = (threadIdx.x % kPerRow) * 8;
  // Sequences step by gridDim.y (at most 65535).
  for (int seq = blockIdx.y; seq < seqs; seq += gridDim.y) {
    const int first = __ldg(pk.segments + static_cast<int64_t>(seq) * (pk.num_segments + 1) +
                            pk.dead_bucket);
    const int r = first + blockIdx.x * kRowsPerBlock + static_cast<int>(threadIdx.x) / kPerRow;
    if (r >= n) continue;
    const int orig = __ldg(pk.perm + static_cast<int64_t>(seq) * n + r);
    const int b = seq / heads, h = seq % heads;
    auto zero = [&](const DeadRowsOut& o) {
      if (o.data == nullptr) return;
      uint16_t* dst = static_cast<uint16_t*>(o.data) + b * o.layout.b + h * o.layout.h +
                      static_cast<int64_t>(orig) * o.layout.n + c;
      if (vec) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = 0;
      }
    };
    zero(out0);
    zero(out1);
    if (lse != nullptr && c == 0) lse[static_cast<int64_t>(seq) * n + orig] = -INFINITY;
  }
}

template <int D>
cudaError_t launch_zero_dead_rows(const Packing& pk, int seqs, int heads, int n, DeadRowsOut out0,
                           DeadRowsOut out1, float* lse, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 256 / (D / 8);
  const bool vec = (out0.data == nullptr || rows_aligned16(out0.data, out0.layout)) &&
                   (out1.data == nullptr || rows_aligned16(out1.data, out1.layout));
  const dim3 grid((n + kRowsPerBlock - 1) / kRowsPerBlock, std::min(seqs, 65535));
  zero_dead_rows_kernel<D><<<grid, 256, 0, stream>>>(pk, seqs, heads, n, out0, out1, lse, vec);
  return cudaGetLastError();
}

// The dK/dV kernels' block of keys: row block blockIdx.x of KV sequence bhk
// (blockIdx.y: this pass runs row blocks fastest, see pass_grid), packed keys
// [k0, k1), and their range.
struct KeyBlock {
  bool exists;
  bool dead;  // a block of dropped keys (has_dead_rows: zeroed apart)
  int k0, k1;
  TileRange range;
};

__device__ __forceinline__ KeyBlock key_block(const ForwardParams& f, int bhk, int64_t k_base,
                                              int nkt) {
  const RowBlock rb = row_block<kBwdKeys>(f.k_pack, bhk, f.Nk, blockIdx.x, threadIdx.x % 32);
  KeyBlock kb{rb.exists, rb.exists && rb.segment >= f.k_pack.dead_bucket, rb.r0, rb.r1,
              TileRange{0, -1, INT_MAX, INT_MIN}};
  if (rb.exists)
    kb.range = row_block_range<kBwdKeys>(f.k_pack, f.k_pack.tiles + static_cast<int64_t>(bhk) * nkt,
                                         nkt, k_base, rb, 0);
  return kb;
}

// delta = rowsum(dO * O) per query row (delta_kernel; it also zeroes the rows
// of dq_accum that dQ reaches).
template <typename T, int D>
cudaError_t launch_delta(const BackwardParams& p, cudaStream_t stream) {
  const ForwardParams& f = p.fwd;
  const int64_t rows = static_cast<int64_t>(f.B) * f.H * f.Nq;
  const bool delta_vec =
      rows_aligned16(f.out, f.out_layout) && rows_aligned16(p.dout, p.dout_layout);
  constexpr int kDeltaRows = 256 / (D / 8);
  delta_kernel<T, D><<<static_cast<unsigned>((rows + kDeltaRows - 1) / kDeltaRows), 256, 0, stream>>>(
      p, delta_vec);
  return cudaGetLastError();
}

}  // namespace sparseflash::kernels::detail
