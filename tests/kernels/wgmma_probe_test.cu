// Torch-free probe of the Hopper wgmma building blocks in
// attention/kernels/wgmma.cuh: one warpgroup (128 threads) computes
// C[64 x N] = A[64 x K] B (fp32 accumulation, bf16 inputs) with K = 64 and 128
// (4 or 8 accumulating k16 steps) and N = 64 and 128, and C is compared with a
// float64 CPU product of the same bf16 values. What each case pins down:
//   SS, B K-major:  A and B both from 128B-swizzled smem descriptors, B stored
//                   [N x K] (C = A B^T, as S = Q K^T): descriptor fields, the
//                   swizzle, the k16 start-address step inside a panel and the
//                   step to the next panel (K = 128), the accumulator layout.
//   SS, B MN-major: B stored [K x N] (C = A B, as dV += P^T dO) read with
//                   imm-trans-b = 1: the MN-major SBO / LBO (LBO only at N = 128).
//   SS, N = 32:     B stored [K x 64] MN-major and either half of its columns
//                   read (the start 64 bytes into the atom for columns 32..63),
//                   as the D = 64 dK/dV kernel's dQ reads half of K per warpgroup.
//   RS:             A from registers in the documented A-fragment layout.
//   scale-a = -1:   the imm-scale immediate reaches the instruction.
//   no XOR on store (negative control): the same SS kernel storing A and B
//                   without the swizzle must NOT match; this proves that the
//                   descriptor's swizzle mode is applied by the hardware and that
//                   the check can fail.
// The accumulators start as NaN (the first k-step runs with scale-d = 0, which
// must ignore them) and C is filled with NaN bytes before each launch, so an
// element the kernel leaves alone fails. Inputs are fresh N(0, 1) values each
// run; the seed is printed with any failure.
//
// GPU cases need compute capability 9.0 (the sm_90a cubin) and skip otherwise;
// the layout and descriptor encoding tests run on the CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "attention/kernels/wgmma.cuh"

namespace sparseflash::kernels::wgmma_test {
namespace {

namespace wg = ::sparseflash::kernels::wgmma;
using bf16 = __nv_bfloat16;

constexpr int kM = 64;         // rows of A and C: one warpgroup's m64
constexpr int kThreads = 128;  // one warpgroup

enum class BMajor { kK, kMN };  // B stored [N x K] (K-major) or [K x N] (MN-major)

// ---------------------------------------------------------------------------
// The kernel. kSwizzleStore = false stores the tiles without the XOR (rows and
// panels as usual) while the descriptors still say 128B swizzle: the negative
// control.

template <bool kSwizzleStore>
__device__ __forceinline__ int tile_index(int row, int col, int rows) {
  if constexpr (kSwizzleStore) {
    return wg::sw128_index(row, col, rows);
  } else {
    return (col / wg::kPanelCols) * rows * wg::kPanelCols + row * wg::kPanelCols +
           col % wg::kPanelCols;
  }
}

#if SF_WGMMA_ENABLED
__device__ __forceinline__ uint32_t pack_bf16(bf16 lo, bf16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
#endif

// The stored width of B: N, or 64 at N = 32 (the product reads columns
// kBCol..kBCol + 31 of it).
constexpr int stored_n(int n) { return n == 32 ? 64 : n; }

// a: [64 x K] row-major; b: [NB x K] (kK) or [K x NB] (kMN) row-major, NB =
// stored_n(N); c: [64 x N] = a times columns kBCol..kBCol + N - 1 of b.
template <int N, int K, bool kARegs, BMajor kB, bool kSwizzleStore, int kScaleA, int kBCol>
__global__ void __launch_bounds__(kThreads)
    probe_kernel(const bf16* __restrict__ a, const bf16* __restrict__ b, float* __restrict__ c) {
#if SF_WGMMA_ENABLED
  static_assert(K % 64 == 0 && (N == 32 || N == 64 || N == 128),
                "probe shapes: K in {64, 128}, N in {32, 64, 128}");
  static_assert(N != 32 || (kB == BMajor::kMN && !kARegs && (kBCol == 0 || kBCol == 32)),
                "N = 32: SS with B MN-major, columns 0..31 or 32..63 of a 64-wide panel");
  static_assert(N == 32 || kBCol == 0, "a column offset needs N = 32");
  constexpr int NB = stored_n(N);
  constexpr int kTransB = kB == BMajor::kMN ? 1 : 0;
  extern __shared__ uint8_t smem_raw[];
  // Panels must start on a 1024-byte boundary of the shared window (the
  // swizzle XOR uses absolute address bits); the launch adds 1024 bytes of slack.
  const uint32_t raw_addr = wg::smem_addr(smem_raw);
  bf16* sa = reinterpret_cast<bf16*>(smem_raw + ((1024 - raw_addr % 1024) % 1024));
  bf16* sb = sa + kM * K;
  const uint32_t sa_addr = wg::smem_addr(sa);
  const uint32_t sb_addr = wg::smem_addr(sb);

  const int tid = threadIdx.x;
  for (int i = tid; i < kM * K; i += kThreads)
    sa[tile_index<kSwizzleStore>(i / K, i % K, kM)] = a[i];
  for (int i = tid; i < NB * K; i += kThreads) {
    if constexpr (kB == BMajor::kK) {
      sb[tile_index<kSwizzleStore>(i / K, i % K, NB)] = b[i];  // rows n, columns k
    } else {
      sb[tile_index<kSwizzleStore>(i / NB, i % NB, K)] = b[i];  // rows k, columns n
    }
  }
  wg::fence_proxy_async_shared();
  __syncthreads();

  const int warp = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  // RS: every k-step's A fragment is in registers before the first wgmma, so one
  // wgmma_fence covers them all.
  uint32_t af[K / 16][4];
  if constexpr (kARegs) {
    const int r0 = 16 * warp + g;
#pragma unroll
    for (int s = 0; s < K / 16; ++s) {
      const int c0 = 16 * s + 2 * t;
      af[s][0] = pack_bf16(a[r0 * K + c0], a[r0 * K + c0 + 1]);
      af[s][1] = pack_bf16(a[(r0 + 8) * K + c0], a[(r0 + 8) * K + c0 + 1]);
      af[s][2] = pack_bf16(a[r0 * K + c0 + 8], a[r0 * K + c0 + 9]);
      af[s][3] = pack_bf16(a[(r0 + 8) * K + c0 + 8], a[(r0 + 8) * K + c0 + 9]);
    }
  }

  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i)
    d[i] = __int_as_float(0x7fc00000);  // NaN: scale-d = 0 must ignore it

  wg::wgmma_fence();
#pragma unroll
  for (int s = 0; s < K / 16; ++s) {
    uint64_t desc_b;
    if constexpr (kB == BMajor::kK) {
      // K-major: panel s / 4 (rows N x 128 bytes), 32 bytes per k16 step inside it.
      desc_b = wg::desc_k_major_sw128(sb_addr + (s / 4) * N * 128 + (s % 4) * 32);
    } else {
      // MN-major: 16 k-rows of 128 bytes per step; panels of 64 n are K * 128 bytes apart;
      // column kBCol starts 2 kBCol bytes into the row.
      desc_b = wg::desc_mn_major_sw128(sb_addr + s * 16 * 128 + 2 * kBCol, K * 128);
    }
    if constexpr (kARegs) {
      wg::mma_rs<N, kScaleA, 1, kTransB>(d, af[s], desc_b, s > 0);
    } else {
      const uint64_t desc_a = wg::desc_k_major_sw128(sa_addr + (s / 4) * kM * 128 + (s % 4) * 32);
      wg::mma_ss<N, kScaleA, 1, 0, kTransB>(d, desc_a, desc_b, s > 0);
    }
  }
  wg::wgmma_commit();
  wg::wgmma_wait<0>();
  wg::fence_operands(d);

  const int row = 16 * warp + g;
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    const int col = 8 * j + 2 * t;
    c[row * N + col] = d[4 * j + 0];
    c[row * N + col + 1] = d[4 * j + 1];
    c[(row + 8) * N + col] = d[4 * j + 2];
    c[(row + 8) * N + col + 1] = d[4 * j + 3];
  }
#else
  __trap();  // wgmma exists only in the sm_90a cubin; the host side skips other devices
#endif
}

// ---------------------------------------------------------------------------
// host side

void check_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr +
                             " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
#define SF_CUDA_CHECK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)

// Empty when the device can run the sm_90a cubin, else why not.
std::string why_no_sm90a() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return "no CUDA GPU";
  }
  cudaDeviceProp prop{};
  SF_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  if (prop.major != 9 || prop.minor != 0)
    return "wgmma needs compute capability 9.0 (sm_90a); device 0 (" + std::string(prop.name) +
           ") is " + std::to_string(prop.major) + "." + std::to_string(prop.minor);
  return "";
}

#define SKIP_WITHOUT_SM90A()                \
  do {                                      \
    const std::string why = why_no_sm90a(); \
    if (!why.empty()) GTEST_SKIP() << why;  \
  } while (0)

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    SF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(p_); }
  T* get() const { return p_; }
  void upload(const std::vector<T>& h) {
    SF_CUDA_CHECK(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    SF_CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  size_t n_;
  T* p_ = nullptr;
};

struct Inputs {
  uint32_t seed;
  std::vector<bf16> a, b;     // as uploaded
  std::vector<float> af, bf;  // the same values as floats
};

Inputs random_inputs(int n, int k) {
  Inputs in;
  in.seed = std::random_device{}();
  std::mt19937 gen(in.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](std::vector<bf16>& v, std::vector<float>& f, size_t count) {
    for (size_t i = 0; i < count; ++i) {
      float x = normal(gen);
      if (x == 0.0f) x = 0.5f;  // never zeros
      v.push_back(__float2bfloat16(x));
      f.push_back(__bfloat162float(v.back()));
    }
  };
  fill(in.a, in.af, static_cast<size_t>(kM) * k);
  fill(in.b, in.bf, static_cast<size_t>(n) * k);
  return in;
}

// ref[i][j] = scale_a * sum_k A[i][k] * B(k, j) in float64, B as the kernel reads it.
std::vector<double> reference(const Inputs& in, int n, int k, BMajor bm, int scale_a) {
  std::vector<double> ref(static_cast<size_t>(kM) * n);
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0.0;
      for (int kk = 0; kk < k; ++kk) {
        const double bv = bm == BMajor::kK ? in.bf[static_cast<size_t>(j) * k + kk]
                                           : in.bf[static_cast<size_t>(kk) * n + j];
        s += static_cast<double>(in.af[static_cast<size_t>(i) * k + kk]) * bv;
      }
      ref[static_cast<size_t>(i) * n + j] = scale_a * s;
    }
  return ref;
}

double tolerance(double ref) { return 1e-3 * (1.0 + std::fabs(ref)); }

struct Outcome {
  uint32_t seed = 0;
  int bad = 0;  // elements outside tolerance (NaN counts)
  int total = 0;
  double max_err = 0.0;
  std::string first_bad;      // "C(i, j) = got, want ref"
  double ref_abs_mean = 0.0;  // the reference is far from zero
};

template <int N, int K, bool kARegs, BMajor kB, bool kSwizzleStore = true, int kScaleA = 1,
          int kBCol = 0>
Outcome run_probe() {
  constexpr int NB = stored_n(N);
  const Inputs in = random_inputs(NB, K);
  DeviceBuffer<bf16> a(in.a.size()), b(in.b.size());
  DeviceBuffer<float> c(static_cast<size_t>(kM) * N);
  a.upload(in.a);
  b.upload(in.b);
  SF_CUDA_CHECK(cudaMemset(c.get(), 0xFF, static_cast<size_t>(kM) * N * sizeof(float)));  // NaN

  auto kernel = probe_kernel<N, K, kARegs, kB, kSwizzleStore, kScaleA, kBCol>;
  const int smem = (kM * K + NB * K) * static_cast<int>(sizeof(bf16)) + 1024;
  SF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<1, kThreads, smem>>>(a.get(), b.get(), c.get());
  SF_CUDA_CHECK(cudaGetLastError());
  SF_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = c.download();
  const std::vector<double> full = reference(in, NB, K, kB, kScaleA);  // [64 x NB]
  std::vector<double> ref(static_cast<size_t>(kM) * N);
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < N; ++j)
      ref[static_cast<size_t>(i) * N + j] = full[static_cast<size_t>(i) * NB + j + kBCol];

  Outcome o;
  o.seed = in.seed;
  o.total = kM * N;
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < N; ++j) {
      const size_t at = static_cast<size_t>(i) * N + j;
      const double err = std::fabs(static_cast<double>(got[at]) - ref[at]);
      o.ref_abs_mean += std::fabs(ref[at]) / o.total;
      const bool ok = std::isfinite(got[at]) && err <= tolerance(ref[at]);
      if (!ok) {
        if (o.bad == 0)
          o.first_bad = "C(" + std::to_string(i) + ", " + std::to_string(j) +
                        ") = " + std::to_string(got[at]) + ", want " + std::to_string(ref[at]);
        ++o.bad;
      }
      if (std::isfinite(got[at]))
        o.max_err = std::max(o.max_err, err);
      else
        o.max_err = std::numeric_limits<double>::infinity();
    }
  return o;
}

#define EXPECT_PROBE_MATCHES(...)                                                          \
  do {                                                                                     \
    SKIP_WITHOUT_SM90A();                                                                  \
    const Outcome o = run_probe<__VA_ARGS__>();                                            \
    SCOPED_TRACE("seed " + std::to_string(o.seed));                                        \
    EXPECT_GT(o.ref_abs_mean, 1.0) << "the reference should be far from zero";             \
    EXPECT_EQ(o.bad, 0) << o.bad << " of " << o.total                                      \
                        << " elements outside 1e-3 (1 + |ref|); first: " << o.first_bad    \
                        << "; max |err| " << o.max_err;                                    \
    if (std::getenv("SF_KERNEL_TEST_VERBOSE"))                                             \
      std::printf("  seed %u: max |err| %.3g over %d elements, mean |ref| %.3g\n", o.seed, \
                  o.max_err, o.total, o.ref_abs_mean);                                     \
  } while (0)

// ---------------------------------------------------------------------------
// CPU: the layout and the descriptor encoding.

TEST(WgmmaLayout, Sw128IndexIsAPermutationThatStaysInsideItsAtom) {
  for (int rows : {8, 64, 128})
    for (int cols : {64, 128}) {
      std::vector<int> seen(static_cast<size_t>(rows) * cols, 0);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const int idx = wg::sw128_index(r, c, rows);
          ASSERT_GE(idx, 0);
          ASSERT_LT(idx, rows * cols);
          ++seen[idx];
          // Same panel, same row (128 bytes), same element inside the chunk,
          // chunk = (c % 64 / 8) ^ (r % 8).
          EXPECT_EQ(idx / (rows * 64), c / 64);
          EXPECT_EQ(idx % (rows * 64) / 64, r);
          EXPECT_EQ(idx % 8, c % 8);
          EXPECT_EQ(idx % 64 / 8, ((c % 64) / 8) ^ (r % 8));
        }
      for (size_t i = 0; i < seen.size(); ++i)
        ASSERT_EQ(seen[i], 1) << "rows " << rows << ", cols " << cols;
    }
}

TEST(WgmmaLayout, DescriptorFieldsSitWhereThePtxIsaPutsThem) {
  std::mt19937 gen(std::random_device{}());
  for (int trial = 0; trial < 100; ++trial) {
    const uint32_t addr = (gen() % (1u << 14)) << 4;  // 16-byte aligned, < 256 KiB
    const uint32_t lbo = (gen() % (1u << 14)) << 4, sbo = (gen() % (1u << 14)) << 4;
    const uint64_t d = wg::make_desc(addr, lbo, sbo, wg::kSwizzle128B);
    EXPECT_EQ(d & 0x3FFF, addr >> 4);
    EXPECT_EQ((d >> 16) & 0x3FFF, lbo >> 4);
    EXPECT_EQ((d >> 32) & 0x3FFF, sbo >> 4);
    EXPECT_EQ(d >> 62, 1u);
    // reserved bits 14-15, 30-31, 46-61 (base offset 49-51 included) are zero
    EXPECT_EQ(d & ((0x3ull << 14) | (0x3ull << 30) | (0xFFFFull << 46)), 0u);
  }
  const uint64_t k = wg::desc_k_major_sw128(0x2400);
  EXPECT_EQ(k & 0x3FFF, 0x240u);
  EXPECT_EQ((k >> 16) & 0x3FFF, 1u);   // LBO unused for swizzled K-major: 16 bytes
  EXPECT_EQ((k >> 32) & 0x3FFF, 64u);  // SBO 1024 bytes: next 8 rows
  const uint64_t mn = wg::desc_mn_major_sw128(0x2400, 128 * 128);
  EXPECT_EQ((mn >> 16) & 0x3FFF, 1024u);  // LBO = the panel (64 MN columns) size, 16 KiB
  EXPECT_EQ((mn >> 32) & 0x3FFF, 64u);
}

// ---------------------------------------------------------------------------
// GPU: one warpgroup against the CPU reference.

TEST(WgmmaProbe, SsBKMajorN64K64) { EXPECT_PROBE_MATCHES(64, 64, false, BMajor::kK); }
TEST(WgmmaProbe, SsBKMajorN64K128) { EXPECT_PROBE_MATCHES(64, 128, false, BMajor::kK); }
TEST(WgmmaProbe, SsBKMajorN128K128) { EXPECT_PROBE_MATCHES(128, 128, false, BMajor::kK); }
TEST(WgmmaProbe, SsBMnMajorN64K64) { EXPECT_PROBE_MATCHES(64, 64, false, BMajor::kMN); }
TEST(WgmmaProbe, SsBMnMajorN64K128) { EXPECT_PROBE_MATCHES(64, 128, false, BMajor::kMN); }
TEST(WgmmaProbe, SsBMnMajorN128K128) { EXPECT_PROBE_MATCHES(128, 128, false, BMajor::kMN); }
TEST(WgmmaProbe, RsBKMajorN64K64) { EXPECT_PROBE_MATCHES(64, 64, true, BMajor::kK); }
TEST(WgmmaProbe, RsBKMajorN64K128) { EXPECT_PROBE_MATCHES(64, 128, true, BMajor::kK); }
TEST(WgmmaProbe, RsBKMajorN128K128) { EXPECT_PROBE_MATCHES(128, 128, true, BMajor::kK); }
// A from registers, B MN-major: the shape of dV += P^T dO.
TEST(WgmmaProbe, RsBMnMajorN64K128) { EXPECT_PROBE_MATCHES(64, 128, true, BMajor::kMN); }
// N = 32 from either half of a 64-wide MN-major panel: the dQ of the D = 64
// dK/dV kernel (dQ = dS K, warpgroup g taking columns 32g..32g+31 of K).
TEST(WgmmaProbe, SsBMnMajorN32K128LowHalf) {
  EXPECT_PROBE_MATCHES(32, 128, false, BMajor::kMN, true, 1, 0);
}
TEST(WgmmaProbe, SsBMnMajorN32K128HighHalf) {
  EXPECT_PROBE_MATCHES(32, 128, false, BMajor::kMN, true, 1, 32);
}
TEST(WgmmaProbe, NegatedScaleAGivesMinusAB) {
  EXPECT_PROBE_MATCHES(64, 128, false, BMajor::kK, true, -1);
}

// Stored without the XOR but described as 128B-swizzled: only elements whose
// row and column agree mod 8 see the same chunk permutation in A and B (so
// their sums are merely reordered); about 7 in 8 must be wrong.
TEST(WgmmaProbe, UnswizzledStoreDoesNotMatch) {
  SKIP_WITHOUT_SM90A();
  const Outcome o = run_probe<64, 64, false, BMajor::kK, false>();
  SCOPED_TRACE("seed " + std::to_string(o.seed));
  EXPECT_GT(o.bad, o.total / 2)
      << "a tile stored without the swizzle XOR matched the reference in " << (o.total - o.bad)
      << " of " << o.total << " elements: the descriptor's 128B swizzle mode seems not applied";
}

}  // namespace
}  // namespace sparseflash::kernels::wgmma_test
