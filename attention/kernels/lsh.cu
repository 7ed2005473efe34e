// LSH bucket ids: the projection of each row on random rotations (centred on
// the earlier blocks' means when given offsets), argmax over [xR, -xR], and
// with a cap the in-order assignment of each block's rows to buckets with room.
#include "attention/kernels/common.cuh"

namespace sparseflash::kernels {

using namespace detail;  // NOLINT: this file's kernels are the detail's

namespace {

// One thread per row. The block's kLshThreads rows are first copied into
// shared memory with coalesced 16-byte loads (all in flight at once), rows
// padded by 16 bytes so that the threads' 16-byte reads of their own rows hit
// distinct banks. Each row is then projected on the rotation columns, staged
// in shared memory as [D][half rounded up to 8] (zero columns past half) and
// read as 16-byte broadcasts, 8 columns per group: the projection's
// shared-memory loads were one 4-byte load per multiply-add before, which
// bounded the kernel (80 us per side at B*N = 65,536, 12 heads, D = 64, nb 16).
constexpr int kLshThreads = kLshCapRows, kLshGroup = 8;

__host__ __device__ inline int lsh_padded_half(int half) {
  return (half + kLshGroup - 1) / kLshGroup * kLshGroup;
}

// Shared memory of lsh_kernel: the rotations, then the padded rows.
inline size_t lsh_smem_bytes(int D, int half, int elem_bytes) {
  return static_cast<size_t>(D) * lsh_padded_half(half) * sizeof(float) +
         static_cast<size_t>(kLshThreads) * (D * elem_bytes + 16);
}

// A float's bits as an unsigned key with the same order, -0 and +0 one key
// (on the bits, so no compiler flag can change it). Keys are >= 1: 0 marks a
// full bucket, below every score, NaN included (a NaN with every bit set
// would map to 0; it takes 1, the lowest key). NaN scores get some bucket
// with room, not necessarily capped_argmax's.
__device__ __forceinline__ unsigned lsh_order_key(float v) {
  unsigned u = __float_as_uint(v);
  if ((u << 1) == 0) u = 0;  // -0 -> +0
  const unsigned key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return max(key, 1u);
}

constexpr int kCapWarps = 4;   // chains per block of lsh_capped_kernel
constexpr int kCapChunk = 32;  // rows whose scores a lane loads at once

// The capped assignment (lsh_bucket_ids with cap > 0): one warp per chain, a
// block of kLshCapRows rows of one (b, h), taken in order; each row goes to
// its best-scoring bucket that holds fewer than cap rows of the block so far.
// Lane l holds buckets l (score +p) and half + l (score -p) and their counts;
// per row one max-reduction over the lanes' best candidates and two ballots
// pick the winner, ties to the lower bucket (every +p bucket before every -p
// one, then the lower lane), as capped_argmax (attention/reference.cc) does.
// scores: [B * H][N][half] float32, the centred projections from lsh_kernel.
__global__ void __launch_bounds__(kCapWarps * 32)
    lsh_capped_kernel(const float* scores, int BH, int N, int half, int cap, int64_t* out) {
  const int lane = threadIdx.x % 32;
  const int blocks = (N + kLshCapRows - 1) / kLshCapRows;
  const int64_t chain = static_cast<int64_t>(blockIdx.x) * kCapWarps + threadIdx.x / 32;
  if (chain >= static_cast<int64_t>(BH) * blocks) return;
  const int64_t bh = chain / blocks;
  const int n0 = static_cast<int>(chain % blocks) * kLshCapRows;
  const int rows = min(kLshCapRows, N - n0);
  const float* s = scores + (bh * N + n0) * half;
  int64_t* o = out + bh * N + n0;
  int count_pos = 0, count_neg = 0;
  for (int c0 = 0; c0 < rows; c0 += kCapChunk) {
    // The chunk's scores first, all loads in flight at once.
    float p[kCapChunk];
#pragma unroll
    for (int i = 0; i < kCapChunk; ++i)
      p[i] = (lane < half && c0 + i < rows) ? s[(c0 + i) * half + lane] : 0.f;
    int64_t mine = 0;  // the bucket of row c0 + lane
#pragma unroll
    for (int i = 0; i < kCapChunk; ++i) {
      if (c0 + i >= rows) break;
      const unsigned kp = (lane < half && count_pos < cap) ? lsh_order_key(p[i]) : 0u;
      const unsigned kn = (lane < half && count_neg < cap) ? lsh_order_key(-p[i]) : 0u;
      const bool take_neg = kn > kp;  // equal: +p, the lower bucket
      const unsigned k = take_neg ? kn : kp;
      const unsigned best = __reduce_max_sync(0xffffffffu, k);
      const unsigned pos_win = __ballot_sync(0xffffffffu, k == best && !take_neg);
      const unsigned neg_win = __ballot_sync(0xffffffffu, k == best && take_neg);
      int id;
      if (pos_win != 0) {
        const int l = __ffs(pos_win) - 1;
        id = l;
        if (lane == l) ++count_pos;
      } else {
        const int l = __ffs(neg_win) - 1;
        id = half + l;
        if (lane == l) ++count_neg;
      }
      if (lane == i) mine = id;
    }
    if (c0 + lane < rows) o[c0 + lane] = mine;
  }
}

template <typename T>
__global__ void __launch_bounds__(kLshThreads)
    lsh_kernel(const T* x, Layout layout, int H, int N, int D, const float* rotations, int Hr,
               int half, const float* offsets, int offset_block, float* scores, int64_t* out) {
  extern __shared__ __align__(16) float sR[];  // [D][hp], then [kLshThreads][D + 8] of T
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hr = h / (H / Hr);
  const int hp = lsh_padded_half(half);
  const float* R = rotations + static_cast<int64_t>(hr) * D * half;
  for (int i = threadIdx.x; i < D * hp; i += blockDim.x) {
    const int d = i / hp, j = i % hp;
    sR[i] = j < half ? R[d * half + j] : 0.f;
  }
  const int row_elems = D + 8;  // 16 bytes of padding
  T* sX = reinterpret_cast<T*>(sR + D * hp);
  const int n0 = blockIdx.x * kLshThreads, chunks = D / 8;
  const T* head = x + b * layout.b + h * layout.h;
  for (int i = threadIdx.x; i < kLshThreads * chunks; i += blockDim.x) {
    const int r = i / chunks, c = i % chunks;
    if (n0 + r < N)
      *reinterpret_cast<uint4*>(sX + r * row_elems + c * 8) =
          *reinterpret_cast<const uint4*>(head + (n0 + r) * layout.n + c * 8);
  }
  __syncthreads();
  const int n = n0 + threadIdx.x;
  float best = -INFINITY, best_neg_val = -INFINITY;
  int best_pos = 0, best_neg = 0;
  if (n < N) {
    const T* row = sX + threadIdx.x * row_elems;
    // The projection of what is subtracted from this row (its block's offsets).
    const float* off =
        offsets ? offsets + (static_cast<int64_t>(bh) * ((N + offset_block - 1) / offset_block) +
                             n / offset_block) * half
                : nullptr;
    for (int j0 = 0; j0 < half; j0 += kLshGroup) {
      float acc[kLshGroup];
#pragma unroll
      for (int j = 0; j < kLshGroup; ++j) acc[j] = 0.f;
      for (int d0 = 0; d0 < D; d0 += 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + d0);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float xv = Pack2<T>::to_float(e[i]);
          const float4* r = reinterpret_cast<const float4*>(sR + (d0 + i) * hp + j0);
          const float4 lo = r[0], hi = r[1];
          acc[0] = fmaf(xv, lo.x, acc[0]);
          acc[1] = fmaf(xv, lo.y, acc[1]);
          acc[2] = fmaf(xv, lo.z, acc[2]);
          acc[3] = fmaf(xv, lo.w, acc[3]);
          acc[4] = fmaf(xv, hi.x, acc[4]);
          acc[5] = fmaf(xv, hi.y, acc[5]);
          acc[6] = fmaf(xv, hi.z, acc[6]);
          acc[7] = fmaf(xv, hi.w, acc[7]);
        }
      }
      // argmax over [p, -p]: all +p columns come first, then the -p ones.
#pragma unroll
      for (int j = 0; j < kLshGroup; ++j) {
        if (j0 + j >= half) break;
        if (off) acc[j] -= off[j0 + j];
        if (scores) scores[(static_cast<int64_t>(bh) * N + n) * half + j0 + j] = acc[j];
        if (acc[j] > best) best = acc[j], best_pos = j0 + j;
        if (-acc[j] > best_neg_val) best_neg_val = -acc[j], best_neg = j0 + j;
      }
    }
  }
  // With scores (a bucket cap), lsh_capped_kernel assigns the rows.
  if (n < N && !scores)
    out[static_cast<int64_t>(bh) * N + n] = best_neg_val > best ? half + best_neg : best_pos;
}

}  // namespace

bool lsh_shape_fits(int D, int half, size_t block_smem_limit) {
  return D > 0 && half > 0 &&
         static_cast<size_t>(D) * lsh_padded_half(half) * sizeof(float) <= 96 * 1024 &&
         lsh_smem_bytes(D, half, 2) <= block_smem_limit;
}

cudaError_t lsh_bucket_ids(DType dtype, const void* x, Layout layout, int B, int H, int N, int D,
                           const float* rotations, int Hr, int half, int64_t* out,
                           cudaStream_t stream, const float* offsets, int offset_block,
                           int cap, float* scores) {
  clear_refusal();
  const char* const fn = "lsh_bucket_ids: ";  // a std::string only when refusing
  // Shape errors before the device is asked anything.
  if (B <= 0 || H <= 0 || N <= 0 || Hr <= 0 || half <= 0)
    return refuse(std::string(fn) + arg("B", B) + ", " + arg("H", H) + ", " + arg("N", N) + ", " + arg("Hr", Hr) +
                  ", " + arg("half", half) + ": all must be positive");
  if (H % Hr != 0) return refuse(std::string(fn) + arg("Hr", Hr) + " does not divide " + arg("H", H));
  if (D <= 0 || D % 8 != 0 || D > 256) return refuse(std::string(fn) + arg("D", D) + ", expected a multiple of 8 in 8..256");
  if (!rows_aligned16(x, layout))
    return refuse(std::string(fn) + "x and its strides (" + arg("b", layout.b) + ", " + arg("h", layout.h) + ", " +
                  arg("n", layout.n) + ") must be 16-byte aligned");
  if (offsets && offset_block <= 0) return refuse(std::string(fn) + arg("offset_block", offset_block) + " with offsets");
  if (!lsh_shape_fits(D, half, SIZE_MAX))
    return refuse(std::string(fn) + arg("D", D) + " x " + arg("half", half) + ": the rotations exceed 96 KB");
  if (cap < 0 || cap > kLshCapRows)
    return refuse(std::string(fn) + arg("cap", cap) + ", expected 0..." + std::to_string(kLshCapRows));
  if (cap > 0 && half > 32) return refuse(std::string(fn) + "cap needs half <= 32, got " + std::to_string(half));
  if (cap > 0 && cap * 2 * half < kLshCapRows)
    return refuse(std::string(fn) + arg("cap", cap) + " x 2 x " + arg("half", half) + " buckets hold fewer than " +
                  std::to_string(kLshCapRows) + " rows");
  if (cap > 0 && !scores) return refuse(std::string(fn) + "cap needs the scores workspace");
  if (cap == 0) scores = nullptr;
  int device = 0, optin = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      e != cudaSuccess)
    return e;
  if (!lsh_shape_fits(D, half, static_cast<size_t>(optin)))
    return refuse(std::string(fn) + arg("D", D) + ", " + arg("half", half) + ": needs " +
                  std::to_string(lsh_smem_bytes(D, half, 2)) + " bytes of shared memory, the device " +
                  std::to_string(optin));
  const size_t smem = lsh_smem_bytes(D, half, 2);
  const dim3 grid((N + kLshThreads - 1) / kLshThreads, B * H);
  const cudaError_t e =
      dtype == DType::kBF16
          ? launch_kernel(lsh_kernel<__nv_bfloat16>, grid, kLshThreads, smem, stream,
                          static_cast<const __nv_bfloat16*>(x), layout, H, N, D, rotations, Hr,
                          half, offsets, offset_block, scores, out)
          : launch_kernel(lsh_kernel<__half>, grid, kLshThreads, smem, stream,
                          static_cast<const __half*>(x), layout, H, N, D, rotations, Hr, half,
                          offsets, offset_block, scores, out);
  if (e != cudaSuccess || cap == 0) return e;
  const int64_t chains = static_cast<int64_t>(B) * H * ((N + kLshCapRows - 1) / kLshCapRows);
  const auto cap_blocks = static_cast<unsigned>((chains + kCapWarps - 1) / kCapWarps);
  lsh_capped_kernel<<<cap_blocks, kCapWarps * 32, 0, stream>>>(scores, B * H, N, half, cap, out);
  return cudaGetLastError();
}

}  // namespace sparseflash::kernels
