// Torch-free tests of the sparse flash attention kernels
// (attention/kernels/sparse_flash.h) against a float64 CPU reference
// (tests/kernels/cpu_reference.h). GPU tests skip themselves without a GPU;
// the CpuReference.* tests always run.
//
// Build (tests/CMakeLists.txt, after sf_kernels exists):
//
//   if(SPARSEFLASH_WITH_CUDA)
//     find_package(CUDAToolkit REQUIRED)
//     add_executable(sparse_flash_test kernels/sparse_flash_test.cu kernels/cpu_reference.cc)
//     set_target_properties(sparse_flash_test PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
//     target_include_directories(sparse_flash_test PRIVATE ${PROJECT_SOURCE_DIR})
//     target_link_libraries(sparse_flash_test PRIVATE sf_kernels GTest::gtest_main CUDA::cudart)
//     gtest_discover_tests(sparse_flash_test DISCOVERY_TIMEOUT 120 PROPERTIES TIMEOUT 600)
//   endif()
//
// What the GPU tests require of the kernels beyond matching the reference:
//   * every output is written: out, lse, dq, dk, dv and the delta workspace
//     are filled with 0xFF bytes (NaN) before each call, so an element the
//     kernels leave alone shows up as non-finite;
//   * rows with no allowed key have out and dq exactly 0 and lse exactly -inf;
//     keys no query may attend to have dk and dv exactly 0;
//   * pack_by_bucket is a stable sort by bucket, and compute_tile_ranges gives
//     the exact bucket/position min and max of each 64-row tile;
//   * every backward runs twice, dQ by atomics and by the deterministic pass;
//     the deterministic backward is bit-for-bit reproducible.
// SF_KERNEL_TEST_VERBOSE=1 prints the measured max errors of passing checks too.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "attention/kernels/mma.cuh"
#include "attention/kernels/options.h"
#include "attention/kernels/sparse_flash.h"
#include "tests/kernels/cpu_reference.h"

namespace sparseflash::kernels_test {
namespace {

namespace sfk = ::sparseflash::kernels;
using sfk::DType;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------
// Tolerances (inputs are N(0, 1), so outputs and gradients are of order 1).

double out_tol(DType t) { return t == DType::kBF16 ? 2e-2 : 5e-3; }  // max abs error
constexpr double kLseTol = 1e-2;                                      // max abs error
// Gradients: max abs error <= grad_tol * max(1, max |reference|).
double grad_tol(DType t) { return t == DType::kBF16 ? 3e-2 : 1e-2; }

// ---------------------------------------------------------------------------
// CUDA plumbing.

void check_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr +
                             " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}
#define SF_CUDA_CHECK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)

bool have_gpu() {
  static const bool has = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the error
      return false;
    }
    return n > 0;
  }();
  return has;
}

#define SF_SKIP_WITHOUT_GPU()                      \
  do {                                             \
    if (!have_gpu()) GTEST_SKIP() << "no CUDA GPU"; \
  } while (0)

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    SF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(n, 1) * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(o.n_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFree(p_);
      p_ = std::exchange(o.p_, nullptr);
      n_ = o.n_;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return p_; }  // nullptr when never allocated
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

  // Synchronous with respect to the host and to every stream.
  void upload(const std::vector<T>& h) {
    if (h.size() != n_) throw std::runtime_error("DeviceBuffer::upload: size mismatch");
    SF_CUDA_CHECK(cudaMemcpy(p_, h.data(), bytes(), cudaMemcpyHostToDevice));
    SF_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    SF_CUDA_CHECK(cudaDeviceSynchronize());
    SF_CUDA_CHECK(cudaMemcpy(h.data(), p_, bytes(), cudaMemcpyDeviceToHost));
    return h;
  }
  // 0xFF bytes: NaN for bf16, fp16 and fp32; -1 for int.
  void poison(cudaStream_t stream) {
    SF_CUDA_CHECK(cudaMemsetAsync(p_, 0xFF, bytes(), stream));
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

class Stream {
 public:
  Stream() { SF_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  // Waits for the stream and surfaces launch and execution errors.
  void sync(const char* what) const {
    check_cuda(cudaStreamSynchronize(s_), what, __FILE__, __LINE__);
    check_cuda(cudaGetLastError(), what, __FILE__, __LINE__);
  }

 private:
  cudaStream_t s_ = nullptr;
};

// ---------------------------------------------------------------------------
// bf16 / fp16 on the host.

uint16_t to_bits(DType t, float x) {
  if (t == DType::kBF16) {
    __nv_bfloat16_raw r = __float2bfloat16_rn(x);
    return r.x;
  }
  __half_raw r = __float2half_rn(x);
  return r.x;
}

float from_bits(DType t, uint16_t bits) {
  if (t == DType::kBF16) {
    __nv_bfloat16_raw r;
    r.x = bits;
    return __bfloat162float(__nv_bfloat16(r));
  }
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}

float round_to(DType t, float x) { return from_bits(t, to_bits(t, x)); }

const char* dtype_name(DType t) { return t == DType::kBF16 ? "bf16" : "fp16"; }

// ---------------------------------------------------------------------------
// Problems.

// kDrop: dropped rows get the sentinel buckets (30-bit radix sort, fixed row
// blocks); kDropSmall: buckets 1 (dropped queries) and 2 (dropped keys), as
// attention/flash.cc packs them (counting sort, bucket-aligned row blocks).
enum class Mode { kDense, kZeroBuckets, kHash2, kHash16, kDrop, kDropSmall };

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kDense: return "dense";
    case Mode::kZeroBuckets: return "zerobuckets";
    case Mode::kHash2: return "hash2";
    case Mode::kHash16: return "hash16";
    case Mode::kDrop: return "drop";
    case Mode::kDropSmall: return "dropsmall";
  }
  return "?";
}

struct Shape {
  int B, H, Hkv, Nq, Nk;
};

struct RunOptions {
  bool packed = true;  // false: nullptr perm and bucket (dense)
  bool drop = false;   // bucket_sort_bits(drop, num_buckets)
  int num_buckets = 1;
  int dead_bucket = INT_MAX;  // Packing::dead_bucket of both sides
  bool segments = true;  // pass the segments the counting sort gives (sort bits <= 8)
  bool bnhd = false;   // [B, N, heads, D] memory (strided views) instead of contiguous [B, heads, N, D]
  int backward_runs = 1;  // per dQ mode (atomic, then deterministic)
};

RunOptions options_for(Mode m) {
  RunOptions o;
  switch (m) {
    case Mode::kDense: o.packed = false; break;
    case Mode::kZeroBuckets: break;
    case Mode::kHash2: o.num_buckets = 2; break;
    case Mode::kHash16: o.num_buckets = 16; break;
    case Mode::kDrop:
      o.drop = true;
      o.dead_bucket = sfk::kDroppedQueryBucket;
      break;
    case Mode::kDropSmall:
      o.num_buckets = 3;
      o.dead_bucket = 1;
      break;
  }
  return o;
}

// Random N(0, 1) inputs rounded to the dtype, and buckets in original order.
RefProblem make_problem(const Shape& s, int D, DType dtype, Mode mode, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  RefProblem p;
  p.B = s.B;
  p.H = s.H;
  p.Hkv = s.Hkv;
  p.Nq = s.Nq;
  p.Nk = s.Nk;
  p.D = D;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  const size_t nq = size_t(s.B) * s.H * s.Nq, nk = size_t(s.B) * s.Hkv * s.Nk;
  auto fill = [&](std::vector<float>& x, size_t n) {
    x.resize(n);
    for (float& e : x) e = round_to(dtype, normal(gen));
  };
  fill(p.q, nq * D);
  fill(p.k, nk * D);
  fill(p.v, nk * D);
  fill(p.dout, nq * D);
  switch (mode) {
    case Mode::kDense: break;  // empty = all 0
    case Mode::kZeroBuckets:
      p.q_bucket.assign(nq, 0);
      p.k_bucket.assign(nk, 0);
      break;
    case Mode::kHash2:
    case Mode::kHash16: {
      std::uniform_int_distribution<int> bucket(0, options_for(mode).num_buckets - 1);
      p.q_bucket.resize(nq);
      p.k_bucket.resize(nk);
      for (int& b : p.q_bucket) b = bucket(gen);
      for (int& b : p.k_bucket) b = bucket(gen);
      break;
    }
    case Mode::kDrop:
    case Mode::kDropSmall: {
      const bool small = mode == Mode::kDropSmall;
      std::bernoulli_distribution keep(0.5);
      p.q_bucket.resize(nq);
      p.k_bucket.resize(nk);
      for (int& b : p.q_bucket) b = keep(gen) ? 0 : small ? 1 : sfk::kDroppedQueryBucket;
      for (int& b : p.k_bucket) b = keep(gen) ? 0 : small ? 2 : sfk::kDroppedKeyBucket;
      break;
    }
  }
  return p;
}

// ---------------------------------------------------------------------------
// Layouts.

sfk::Layout make_layout(int heads, int n, int D, bool bnhd) {
  sfk::Layout l;
  if (bnhd) {
    l.b = int64_t(n) * heads * D;
    l.h = D;
    l.n = int64_t(heads) * D;
  } else {
    l.b = int64_t(heads) * n * D;
    l.h = int64_t(n) * D;
    l.n = D;
  }
  return l;
}

// Host [B, heads, n, D] contiguous floats -> dtype bits at the layout's offsets.
std::vector<uint16_t> to_device_order(const std::vector<float>& x, DType t, int B, int heads,
                                      int n, int D, const sfk::Layout& l) {
  std::vector<uint16_t> y(x.size());
  size_t src = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < n; ++i) {
        const size_t dst = size_t(b * l.b + h * l.h + i * l.n);
        for (int d = 0; d < D; ++d) y[dst + d] = to_bits(t, x[src++]);
      }
  return y;
}

std::vector<float> from_device_order(const std::vector<uint16_t>& y, DType t, int B, int heads,
                                     int n, int D, const sfk::Layout& l) {
  std::vector<float> x(y.size());
  size_t dst = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < n; ++i) {
        const size_t src = size_t(b * l.b + h * l.h + i * l.n);
        for (int d = 0; d < D; ++d) x[dst++] = from_bits(t, y[src + d]);
      }
  return x;
}

// ---------------------------------------------------------------------------
// Packing and tile ranges.

struct PackedSide {
  DeviceBuffer<int> perm, bucket, segments;  // unallocated (nullptr) on the dense path
  DeviceBuffer<sfk::TileRange> tiles;
  std::vector<int> perm_h, bucket_h, segments_h;  // empty on the dense path
  std::vector<sfk::TileRange> tiles_h;
  int num_segments = 0, dead_bucket = INT_MAX;
  sfk::Packing packing() const {
    sfk::Packing pk;
    pk.perm = perm.get();
    pk.bucket = bucket.get();
    pk.tiles = tiles.get();
    pk.segments = segments.get();
    pk.num_segments = num_segments;
    pk.dead_bucket = dead_bucket;
    return pk;
  }
};

// bucket_in == nullptr: the dense path (nullptr perm and bucket). With
// with_segments and sort_bits <= kMaxSegmentBits the sort also writes the
// bucket segments (poisoned first, like every output).
// keep (0 or 1 per row, original order): pack_by_bucket applies the mask
// itself, dropped rows taking id `dropped`; bucket_in may then be nullptr
// (kept rows id 0).
PackedSide pack_side(const std::vector<int>* bucket_in, int rows, int n, int sort_bits,
                     int position_offset, const Stream& stream, int dead_bucket = INT_MAX,
                     bool with_segments = true, const std::vector<uint8_t>* keep = nullptr,
                     int dropped = 0) {
  PackedSide s;
  s.dead_bucket = dead_bucket;
  if (bucket_in || keep) {
    DeviceBuffer<int> in(bucket_in ? size_t(rows) * n : 0);
    if (bucket_in) in.upload(*bucket_in);
    DeviceBuffer<uint8_t> keep_d(keep ? size_t(rows) * n : 0);
    if (keep) keep_d.upload(*keep);
    s.perm = DeviceBuffer<int>(size_t(rows) * n);
    s.bucket = DeviceBuffer<int>(size_t(rows) * n);
    s.perm.poison(stream.get());
    s.bucket.poison(stream.get());
    if (with_segments && sfk::num_segments_for(sort_bits) > 0) {
      s.num_segments = sfk::num_segments_for(sort_bits);
      s.segments = DeviceBuffer<int>(size_t(rows) * (s.num_segments + 1));
      s.segments.poison(stream.get());
    }
    const size_t ws_bytes = sfk::pack_workspace_bytes(rows, n, sort_bits);
    DeviceBuffer<unsigned char> ws(ws_bytes);
    SF_CUDA_CHECK(sfk::pack_by_bucket(
        bucket_in ? in.get() : nullptr, rows, n, sort_bits, s.perm.get(), s.bucket.get(),
        s.segments.get(), ws.get(), ws_bytes, stream.get(),
        keep ? reinterpret_cast<const bool*>(keep_d.get()) : nullptr, dropped));
    stream.sync("pack_by_bucket");
    s.perm_h = s.perm.download();
    s.bucket_h = s.bucket.download();
    if (s.num_segments > 0) s.segments_h = s.segments.download();
  }
  s.tiles = DeviceBuffer<sfk::TileRange>(size_t(rows) * sfk::num_tiles(n));
  s.tiles.poison(stream.get());
  SF_CUDA_CHECK(sfk::compute_tile_ranges(s.perm.get(), s.bucket.get(), rows, n, position_offset,
                                         dead_bucket, s.tiles.get(), stream.get()));
  stream.sync("compute_tile_ranges");
  s.tiles_h = s.tiles.download();
  return s;
}

// segments[r][b] is the first packed row of bucket b or more (so bucket b's
// rows are [segments[r][b], segments[r][b + 1])), segments[r][nseg] = n.
::testing::AssertionResult verify_segments(const char* side, const std::vector<int>& sorted,
                                           const std::vector<int>& segments, int rows, int n,
                                           int nseg) {
  if (segments.size() != size_t(rows) * (nseg + 1)) {
    return ::testing::AssertionFailure() << side << ": " << segments.size()
                                         << " segment offsets, expected " << rows * (nseg + 1);
  }
  for (int r = 0; r < rows; ++r) {
    const int* sr = &sorted[size_t(r) * n];
    for (int b = 0; b <= nseg; ++b) {
      const int want = b == nseg ? n : int(std::lower_bound(sr, sr + n, b) - sr);
      const int got = segments[size_t(r) * (nseg + 1) + b];
      if (got != want) {
        return ::testing::AssertionFailure() << side << " row " << r << ": segment " << b
                                             << " starts at " << got << ", expected " << want;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// perm is a permutation of 0..n-1 per row; sorted == bucket_in gathered
// through perm; buckets ascend; equal buckets keep original order.
::testing::AssertionResult verify_packing(const char* side, const std::vector<int>& bucket_in,
                                          const std::vector<int>& perm,
                                          const std::vector<int>& sorted, int rows, int n) {
  const size_t total = size_t(rows) * n;
  if (bucket_in.size() != total || perm.size() != total || sorted.size() != total) {
    return ::testing::AssertionFailure() << side << ": size mismatch";
  }
  std::vector<char> seen(n);
  for (int r = 0; r < rows; ++r) {
    const int* pr = &perm[size_t(r) * n];
    const int* sr = &sorted[size_t(r) * n];
    const int* br = &bucket_in[size_t(r) * n];
    std::fill(seen.begin(), seen.end(), 0);
    for (int i = 0; i < n; ++i) {
      if (pr[i] < 0 || pr[i] >= n) {
        return ::testing::AssertionFailure() << side << " row " << r << ": perm[" << i
                                             << "] = " << pr[i] << " is outside [0, " << n << ")";
      }
      if (seen[pr[i]]) {
        return ::testing::AssertionFailure() << side << " row " << r << ": perm[" << i
                                             << "] = " << pr[i] << " appears twice";
      }
      seen[pr[i]] = 1;
    }
    for (int i = 0; i < n; ++i) {
      if (sr[i] != br[pr[i]]) {
        return ::testing::AssertionFailure()
               << side << " row " << r << ": sorted bucket[" << i << "] = " << sr[i]
               << " but the original bucket of row perm[" << i << "] = " << pr[i] << " is "
               << br[pr[i]];
      }
      if (i > 0 && sr[i] < sr[i - 1]) {
        return ::testing::AssertionFailure() << side << " row " << r << ": buckets descend at "
                                             << i << " (" << sr[i - 1] << " then " << sr[i] << ")";
      }
      if (i > 0 && sr[i] == sr[i - 1] && pr[i] < pr[i - 1]) {
        return ::testing::AssertionFailure()
               << side << " row " << r << ": not stable inside bucket " << sr[i] << " at " << i
               << " (original " << pr[i - 1] << " then " << pr[i] << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Exact (bucket min, bucket max, position min, position max) of each tile of
// 64 packed rows, positions over the rows with a bucket below dead_bucket
// only. perm empty = identity, sorted empty = all 0.
::testing::AssertionResult verify_tiles(const char* side, const std::vector<int>& perm,
                                        const std::vector<int>& sorted,
                                        const std::vector<sfk::TileRange>& tiles, int rows, int n,
                                        int position_offset, int dead_bucket = INT_MAX) {
  const int nt = sfk::num_tiles(n);
  if (tiles.size() != size_t(rows) * nt) {
    return ::testing::AssertionFailure() << side << ": tile count mismatch";
  }
  for (int r = 0; r < rows; ++r) {
    for (int t = 0; t < nt; ++t) {
      int bmin = std::numeric_limits<int>::max(), bmax = std::numeric_limits<int>::min();
      int pmin = std::numeric_limits<int>::max(), pmax = std::numeric_limits<int>::min();
      for (int i = t * sfk::kTileRows; i < std::min(n, (t + 1) * sfk::kTileRows); ++i) {
        const size_t at = size_t(r) * n + i;
        const int b = sorted.empty() ? 0 : sorted[at];
        const int pos = (perm.empty() ? i : perm[at]) + position_offset;
        bmin = std::min(bmin, b);
        bmax = std::max(bmax, b);
        if (b >= dead_bucket) continue;
        pmin = std::min(pmin, pos);
        pmax = std::max(pmax, pos);
      }
      const sfk::TileRange& got = tiles[size_t(r) * nt + t];
      if (got.x != bmin || got.y != bmax || got.z != pmin || got.w != pmax) {
        return ::testing::AssertionFailure()
               << side << " row " << r << " tile " << t << ": got (bucket " << got.x << ".."
               << got.y << ", position " << got.z << ".." << got.w << "), expected (bucket "
               << bmin << ".." << bmax << ", position " << pmin << ".." << pmax << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------
// Running the kernels.

// One backward run: dQ by atomics (dq_accum given) or by the deterministic pass.
struct Grads {
  bool atomic_dq;
  std::vector<float> dq, dk, dv;  // reference layout
  std::vector<uint16_t> dq_raw, dk_raw, dv_raw;  // dtype bits as copied from the device
};

struct KernelResult {
  std::vector<float> out, lse;  // reference layout ([B, heads, N, D], [B, H, Nq])
  std::vector<Grads> runs;      // backward_runs atomic runs, then as many deterministic ones
};

const char* dq_mode_name(bool atomic_dq) { return atomic_dq ? "atomic dQ" : "deterministic dQ"; }

KernelResult run_kernels(const RefProblem& p, DType dtype, const RunOptions& opt) {
  const int B = p.B, H = p.H, Hkv = p.Hkv, Nq = p.Nq, Nk = p.Nk, D = p.D;
  const int q_rows = B * H, k_rows = B * Hkv;
  const size_t q_elems = size_t(q_rows) * Nq * D, k_elems = size_t(k_rows) * Nk * D;
  Stream stream;

  const sfk::Layout ql = make_layout(H, Nq, D, opt.bnhd), kl = make_layout(Hkv, Nk, D, opt.bnhd);
  DeviceBuffer<uint16_t> q(q_elems), k(k_elems), v(k_elems), dout(q_elems), out(q_elems);
  DeviceBuffer<uint16_t> dq(q_elems), dk(k_elems), dv(k_elems);
  DeviceBuffer<float> lse(size_t(q_rows) * Nq), delta(size_t(q_rows) * Nq), dq_accum(q_elems);
  q.upload(to_device_order(p.q, dtype, B, H, Nq, D, ql));
  k.upload(to_device_order(p.k, dtype, B, Hkv, Nk, D, kl));
  v.upload(to_device_order(p.v, dtype, B, Hkv, Nk, D, kl));
  dout.upload(to_device_order(p.dout, dtype, B, H, Nq, D, ql));

  // Packing: per-(b, h) bucket ids in original order.
  std::vector<int> qb, kb;
  const std::vector<int>* qb_in = nullptr;
  const std::vector<int>* kb_in = nullptr;
  int sort_bits = 0;
  if (opt.packed) {
    qb = p.q_bucket.empty() ? std::vector<int>(size_t(q_rows) * Nq, 0) : p.q_bucket;
    kb = p.k_bucket.empty() ? std::vector<int>(size_t(k_rows) * Nk, 0) : p.k_bucket;
    qb_in = &qb;
    kb_in = &kb;
    sort_bits = sfk::bucket_sort_bits(opt.drop, opt.num_buckets);
  }
  PackedSide qs = pack_side(qb_in, q_rows, Nq, sort_bits, Nk - Nq, stream, opt.dead_bucket,
                            opt.segments);
  PackedSide ks = pack_side(kb_in, k_rows, Nk, sort_bits, 0, stream, opt.dead_bucket, opt.segments);
  if (opt.packed) {
    EXPECT_TRUE(verify_packing("queries", qb, qs.perm_h, qs.bucket_h, q_rows, Nq));
    EXPECT_TRUE(verify_packing("keys", kb, ks.perm_h, ks.bucket_h, k_rows, Nk));
    if (qs.num_segments > 0) {
      EXPECT_TRUE(verify_segments("queries", qs.bucket_h, qs.segments_h, q_rows, Nq, qs.num_segments));
      EXPECT_TRUE(verify_segments("keys", ks.bucket_h, ks.segments_h, k_rows, Nk, ks.num_segments));
    }
  }
  EXPECT_TRUE(verify_tiles("query tiles", qs.perm_h, qs.bucket_h, qs.tiles_h, q_rows, Nq, Nk - Nq,
                           opt.dead_bucket));
  EXPECT_TRUE(verify_tiles("key tiles", ks.perm_h, ks.bucket_h, ks.tiles_h, k_rows, Nk, 0,
                           opt.dead_bucket));

  sfk::ForwardParams f;
  f.dtype = dtype;
  f.B = B;
  f.H = H;
  f.Hkv = Hkv;
  f.Nq = Nq;
  f.Nk = Nk;
  f.D = D;
  f.scale = p.scale;
  f.q = q.get();
  f.k = k.get();
  f.v = v.get();
  f.q_layout = ql;
  f.k_layout = kl;
  f.v_layout = kl;
  f.out = out.get();
  f.out_layout = ql;
  f.lse = lse.get();
  f.q_pack = qs.packing();
  f.k_pack = ks.packing();

  out.poison(stream.get());
  lse.poison(stream.get());
  SF_CUDA_CHECK(sfk::attention_forward(f, stream.get()));
  stream.sync("attention_forward");

  sfk::BackwardParams bp;
  bp.fwd = f;
  bp.dout = dout.get();
  bp.dout_layout = ql;
  bp.dq = dq.get();
  bp.dk = dk.get();
  bp.dv = dv.get();
  bp.dq_layout = ql;
  bp.dk_layout = kl;
  bp.dv_layout = kl;
  bp.delta = delta.get();

  KernelResult r;
  for (bool atomic_dq : {true, false}) {
    bp.dq_accum = atomic_dq ? dq_accum.get() : nullptr;
    for (int run = 0; run < opt.backward_runs; ++run) {
      dq.poison(stream.get());
      dk.poison(stream.get());
      dv.poison(stream.get());
      delta.poison(stream.get());
      dq_accum.poison(stream.get());  // the backward must clear it itself
      SF_CUDA_CHECK(sfk::attention_backward(bp, stream.get()));
      stream.sync("attention_backward");
      Grads g;
      g.atomic_dq = atomic_dq;
      g.dq_raw = dq.download();
      g.dk_raw = dk.download();
      g.dv_raw = dv.download();
      g.dq = from_device_order(g.dq_raw, dtype, B, H, Nq, D, ql);
      g.dk = from_device_order(g.dk_raw, dtype, B, Hkv, Nk, D, kl);
      g.dv = from_device_order(g.dv_raw, dtype, B, Hkv, Nk, D, kl);
      r.runs.push_back(std::move(g));
    }
  }
  r.out = from_device_order(out.download(), dtype, B, H, Nq, D, ql);
  r.lse = lse.download();
  return r;
}

// ---------------------------------------------------------------------------
// Comparisons.

// SF_KERNEL_TEST_VERBOSE=1 prints every measured max error, not just failing ones.
bool verbose() {
  static const bool v = [] {
    const char* e = std::getenv("SF_KERNEL_TEST_VERBOSE");
    return e != nullptr && *e != '\0' && std::strcmp(e, "0") != 0;
  }();
  return v;
}

struct Dims {
  int B, heads, n, D;
};

std::string where(size_t idx, const Dims& dims) {
  std::ostringstream s;
  const size_t d = idx % dims.D;
  idx /= dims.D;
  const size_t i = idx % dims.n;
  idx /= dims.n;
  const size_t h = idx % dims.heads;
  const size_t b = idx / dims.heads;
  s << "(b=" << b << ", h=" << h << ", n=" << i;
  if (dims.D > 1) s << ", d=" << d;
  s << ")";
  return s.str();
}

// max |got - ref| <= tol (times max(1, max |ref|) when relative); all finite.
::testing::AssertionResult check_close(const char* name, const std::vector<float>& got,
                                       const std::vector<double>& ref, const Dims& dims,
                                       double tol, bool relative) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << name << ": " << got.size() << " elements, reference has " << ref.size();
  }
  double max_ref = 0, max_err = 0;
  size_t worst = 0, nonfinite = 0, first_nonfinite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_ref = std::max(max_ref, std::abs(ref[i]));
    if (!std::isfinite(got[i])) {
      if (nonfinite++ == 0) first_nonfinite = i;
      continue;
    }
    const double err = std::abs(double(got[i]) - ref[i]);
    if (err > max_err) {
      max_err = err;
      worst = i;
    }
  }
  const double limit = relative ? tol * std::max(1.0, max_ref) : tol;
  if (verbose()) {
    std::printf("  %-4s max |err| %.3g (limit %.3g, max |ref| %.3g, non-finite %zu)\n", name,
                max_err, limit, max_ref, nonfinite);
  }
  if (nonfinite == 0 && max_err <= limit) return ::testing::AssertionSuccess();
  auto f = ::testing::AssertionFailure();
  f << name << ": max |err| = " << max_err;
  if (!ref.empty()) {
    f << " at " << where(worst, dims) << " (got " << got[worst] << ", reference " << ref[worst]
      << ")";
  }
  f << ", max |reference| = " << max_ref << ", limit " << limit;
  if (nonfinite > 0) {
    f << "; " << nonfinite << " non-finite values, first " << got[first_nonfinite] << " at "
      << where(first_nonfinite, dims);
  }
  return f;
}

// -inf exactly where the reference is -inf; elsewhere finite and within tol.
::testing::AssertionResult check_lse(const std::vector<float>& got, const std::vector<double>& ref,
                                     const Dims& dims) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << "lse: size mismatch";
  double max_err = 0;
  size_t worst = 0, bad = 0, first_bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      if (!(std::isinf(got[i]) && got[i] < 0)) {
        if (bad++ == 0) first_bad = i;
      }
    } else if (!std::isfinite(got[i])) {
      if (bad++ == 0) first_bad = i;
    } else {
      const double err = std::abs(double(got[i]) - ref[i]);
      if (err > max_err) {
        max_err = err;
        worst = i;
      }
    }
  }
  if (verbose()) {
    std::printf("  lse  max |err| %.3g (limit %.3g, -inf/non-finite mismatches %zu)\n", max_err,
                kLseTol, bad);
  }
  if (bad == 0 && max_err <= kLseTol) return ::testing::AssertionSuccess();
  auto f = ::testing::AssertionFailure();
  f << "lse: max |err| over finite rows = " << max_err;
  if (!ref.empty()) {
    f << " at " << where(worst, dims) << " (got " << got[worst] << ", reference " << ref[worst]
      << ")";
  }
  f << ", limit " << kLseTol;
  if (bad > 0) {
    f << "; " << bad << " rows disagree on -inf / non-finite, first " << where(first_bad, dims)
      << ": got " << got[first_bad] << ", reference " << ref[first_bad];
  }
  return f;
}

// Every element of the flagged rows (of D elements) is exactly 0.
::testing::AssertionResult check_zero_rows(const char* name, const std::vector<float>& got,
                                           const std::vector<char>& row_flag, const Dims& dims) {
  size_t bad_rows = 0, first = 0;
  for (size_t r = 0; r < row_flag.size(); ++r) {
    if (!row_flag[r]) continue;
    for (int d = 0; d < dims.D; ++d) {
      if (got[r * dims.D + d] != 0.f) {
        if (bad_rows++ == 0) first = r * dims.D + d;
        break;
      }
    }
  }
  if (bad_rows == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << name << ": " << bad_rows << " rows without any allowed pair are not exactly 0, first "
         << where(first, dims) << " = " << got[first];
}

void check_against_reference(const RefProblem& p, const RefResult& ref, const KernelResult& got,
                             DType dtype) {
  const Dims qd{p.B, p.H, p.Nq, p.D}, kd{p.B, p.Hkv, p.Nk, p.D}, ld{p.B, p.H, p.Nq, 1};
  EXPECT_TRUE(check_close("out", got.out, ref.out, qd, out_tol(dtype), false));
  EXPECT_TRUE(check_lse(got.lse, ref.lse, ld));
  for (const Grads& g : got.runs) {
    SCOPED_TRACE(dq_mode_name(g.atomic_dq));
    EXPECT_TRUE(check_close("dq", g.dq, ref.dq, qd, grad_tol(dtype), true));
    EXPECT_TRUE(check_close("dk", g.dk, ref.dk, kd, grad_tol(dtype), true));
    EXPECT_TRUE(check_close("dv", g.dv, ref.dv, kd, grad_tol(dtype), true));
  }

  // Query rows with no allowed key, key rows no query attends to.
  std::vector<char> q_empty(ref.lse.size());
  for (size_t r = 0; r < ref.lse.size(); ++r) q_empty[r] = std::isinf(ref.lse[r]);
  std::vector<char> k_empty(ref.dv.size() / p.D);
  for (size_t r = 0; r < k_empty.size(); ++r) {
    bool zero = true;
    for (int d = 0; d < p.D && zero; ++d) {
      zero = ref.dv[r * p.D + d] == 0 && ref.dk[r * p.D + d] == 0;
    }
    k_empty[r] = zero;
  }
  EXPECT_TRUE(check_zero_rows("out", got.out, q_empty, qd));
  for (const Grads& g : got.runs) {
    SCOPED_TRACE(dq_mode_name(g.atomic_dq));
    EXPECT_TRUE(check_zero_rows("dq", g.dq, q_empty, qd));
    EXPECT_TRUE(check_zero_rows("dk", g.dk, k_empty, kd));
    EXPECT_TRUE(check_zero_rows("dv", g.dv, k_empty, kd));
  }
}

// ===========================================================================
// CPU reference: hand-computed cases and finite differences (no GPU needed).

RefProblem tiny(int Nq, int Nk, float scale, std::vector<float> q, std::vector<float> k,
                std::vector<float> v, std::vector<float> dout) {
  RefProblem p;
  p.B = p.H = p.Hkv = 1;
  p.Nq = Nq;
  p.Nk = Nk;
  p.D = 1;
  p.scale = scale;
  p.q = std::move(q);
  p.k = std::move(k);
  p.v = std::move(v);
  p.dout = std::move(dout);
  return p;
}

// N = 2, D = 1: q = [1, 2], k = [0.5, 1], v = [3, -1], dout = [1, 0.5], scale 1.
// Row 0 sees key 0 only: out 3, lse 0.5, dS = 1 * (3 - 3) = 0.
// Row 1: scores (1, 2), P = (1, e) / (1 + e), lse = 1 + log(1 + e),
// out = 3 P0 - P1; dP = (1.5, -0.5), delta = out / 2, dS = (2 P0 P1, -2 P0 P1);
// dq1 = 0.5 dS0 + dS1 = -P0 P1; dk = (2 dS0, 2 dS1) = (4 P0 P1, -4 P0 P1);
// dv = (1 + P0 / 2, P1 / 2).
// With scale 2 and q = [0.5, 1] the scores, P, out, lse and dk are the same
// and dq doubles.
TEST(CpuReference, HandComputedTwoByOne) {
  const double P0P1 = 0.19661193324148185;
  for (float scale : {1.f, 2.f}) {
    SCOPED_TRACE(scale);
    const RefProblem p = tiny(2, 2, scale, {1.f / scale, 2.f / scale}, {0.5f, 1.f}, {3.f, -1.f},
                              {1.f, 0.5f});
    const RefResult r = reference_attention(p);
    ASSERT_EQ(r.out.size(), 2u);
    ASSERT_EQ(r.lse.size(), 2u);
    EXPECT_NEAR(r.out[0], 3.0, 1e-12);
    EXPECT_NEAR(r.out[1], 0.07576568547998042, 1e-12);
    EXPECT_NEAR(r.lse[0], 0.5, 1e-12);
    EXPECT_NEAR(r.lse[1], 2.3132616875182226, 1e-12);
    EXPECT_NEAR(r.dq[0], 0.0, 1e-12);
    EXPECT_NEAR(r.dq[1], -P0P1 * scale, 1e-12);
    EXPECT_NEAR(r.dk[0], 4 * P0P1, 1e-12);
    EXPECT_NEAR(r.dk[1], -4 * P0P1, 1e-12);
    EXPECT_NEAR(r.dv[0], 1.1344707106849976, 1e-12);
    EXPECT_NEAR(r.dv[1], 0.36552928931500245, 1e-12);
  }
}

// Nq = 1 < Nk = 3: query 0 sits at position 2 and may see keys 0..2, but the
// buckets (q 1; k 1, 0, 1) exclude key 1. Scores (0, -, log 3): P = (1/4, 0, 3/4),
// out = 1/4 + 15/4 = 4, lse = log 4, delta = 4, dS = (-3/4, 0, 3/4),
// dq = 3/4 log 3, dk = dS * q, dv = P * dout.
TEST(CpuReference, BucketsAndPositionOffset) {
  RefProblem p = tiny(1, 3, 1.f, {1.f}, {0.f, 100.f, float(std::log(3.0))}, {1.f, 1000.f, 5.f},
                      {1.f});
  p.q_bucket = {1};
  p.k_bucket = {1, 0, 1};
  const RefResult r = reference_attention(p);
  const double log3 = double(float(std::log(3.0)));
  EXPECT_NEAR(r.out[0], 4.0, 1e-6);
  EXPECT_NEAR(r.lse[0], std::log(4.0), 1e-6);
  EXPECT_NEAR(r.dq[0], 0.75 * log3, 1e-6);
  EXPECT_NEAR(r.dk[0], -0.75, 1e-6);
  EXPECT_EQ(r.dk[1], 0.0);
  EXPECT_NEAR(r.dk[2], 0.75, 1e-6);
  EXPECT_NEAR(r.dv[0], 0.25, 1e-6);
  EXPECT_EQ(r.dv[1], 0.0);
  EXPECT_NEAR(r.dv[2], 0.75, 1e-6);
}

// Nq = 2, Nk = 3: query 0 is at position 1 and must not see key 2 (score 100);
// query 1 has a bucket no key has: out 0, lse -inf, no gradient.
TEST(CpuReference, CausalOffsetAndEmptyRow) {
  RefProblem p = tiny(2, 3, 1.f, {1.f, 1.f}, {0.f, 0.f, 100.f}, {1.f, 3.f, 1000.f}, {1.f, 1.f});
  p.q_bucket = {0, 5};
  p.k_bucket = {0, 0, 0};
  const RefResult r = reference_attention(p);
  EXPECT_NEAR(r.out[0], 2.0, 1e-12);
  EXPECT_NEAR(r.lse[0], std::log(2.0), 1e-12);
  EXPECT_EQ(r.out[1], 0.0);
  EXPECT_EQ(r.lse[1], -kInf);
  EXPECT_EQ(r.dq[1], 0.0);
  EXPECT_EQ(r.dk[2], 0.0);
  EXPECT_EQ(r.dv[2], 0.0);
  // Row 0: P = (1/2, 1/2), dP = (1, 3), delta = 2, dS = (-1/2, 1/2).
  EXPECT_NEAR(r.dq[0], 0.0, 1e-12);  // dS . k = 0
  EXPECT_NEAR(r.dk[0], -0.5, 1e-12);
  EXPECT_NEAR(r.dk[1], 0.5, 1e-12);
  EXPECT_NEAR(r.dv[0], 0.5, 1e-12);
  EXPECT_NEAR(r.dv[1], 0.5, 1e-12);
}

// Grouped heads: head h of a 4-head / 2-kv-head problem equals the
// single-head problem with kv head h / 2; dk, dv sum over the group.
TEST(CpuReference, GroupedHeadsMatchSingleHeadProblems) {
  const Shape s{1, 4, 2, 5, 7};
  const int D = 3;
  RefProblem p = make_problem(s, D, DType::kBF16, Mode::kHash2, 11);
  const RefResult r = reference_attention(p);
  std::vector<double> dk(r.dk.size(), 0.0), dv(r.dv.size(), 0.0);
  for (int h = 0; h < s.H; ++h) {
    const int hk = h / (s.H / s.Hkv);
    RefProblem one;
    one.B = one.H = one.Hkv = 1;
    one.Nq = s.Nq;
    one.Nk = s.Nk;
    one.D = D;
    one.scale = p.scale;
    const size_t qo = size_t(h) * s.Nq * D, ko = size_t(hk) * s.Nk * D;
    one.q.assign(p.q.begin() + qo, p.q.begin() + qo + s.Nq * D);
    one.dout.assign(p.dout.begin() + qo, p.dout.begin() + qo + s.Nq * D);
    one.k.assign(p.k.begin() + ko, p.k.begin() + ko + s.Nk * D);
    one.v.assign(p.v.begin() + ko, p.v.begin() + ko + s.Nk * D);
    one.q_bucket.assign(p.q_bucket.begin() + h * s.Nq, p.q_bucket.begin() + (h + 1) * s.Nq);
    one.k_bucket.assign(p.k_bucket.begin() + hk * s.Nk, p.k_bucket.begin() + (hk + 1) * s.Nk);
    const RefResult o = reference_attention(one);
    for (int i = 0; i < s.Nq; ++i) {
      EXPECT_EQ(r.lse[h * s.Nq + i], o.lse[i]);
      for (int d = 0; d < D; ++d) {
        EXPECT_EQ(r.out[qo + i * D + d], o.out[i * D + d]);
        EXPECT_EQ(r.dq[qo + i * D + d], o.dq[i * D + d]);
      }
    }
    for (size_t i = 0; i < o.dk.size(); ++i) {
      dk[ko + i] += o.dk[i];
      dv[ko + i] += o.dv[i];
    }
  }
  for (size_t i = 0; i < dk.size(); ++i) {
    EXPECT_NEAR(r.dk[i], dk[i], 1e-12);
    EXPECT_NEAR(r.dv[i], dv[i], 1e-12);
  }
}

// Gradients of L = sum(out * dout) by central differences.
TEST(CpuReference, GradientsMatchFiniteDifferences) {
  const Shape s{1, 2, 1, 6, 8};
  RefProblem p = make_problem(s, 3, DType::kBF16, Mode::kHash2, 5);
  const RefResult r = reference_attention(p);
  auto loss = [&](const RefProblem& x) {
    const RefResult o = reference_attention(x);
    double l = 0;
    for (size_t i = 0; i < o.out.size(); ++i) l += o.out[i] * x.dout[i];
    return l;
  };
  using Field = std::vector<float> RefProblem::*;
  struct Target {
    const char* name;
    Field field;
    const std::vector<double>* grad;
  };
  for (const Target& t : {Target{"q", &RefProblem::q, &r.dq}, Target{"k", &RefProblem::k, &r.dk},
                          Target{"v", &RefProblem::v, &r.dv}}) {
    for (size_t i = 0; i < (p.*t.field).size(); ++i) {
      RefProblem plus = p, minus = p;
      const float x = (p.*t.field)[i];
      (plus.*t.field)[i] = x + 1e-3f;
      (minus.*t.field)[i] = x - 1e-3f;
      const double h = double((plus.*t.field)[i]) - double((minus.*t.field)[i]);
      const double fd = (loss(plus) - loss(minus)) / h;
      EXPECT_NEAR((*t.grad)[i], fd, 1e-5) << "d" << t.name << "[" << i << "]";
    }
  }
}

// ===========================================================================
// GPU: kernels against the reference.

struct Case {
  Mode mode;
  DType dtype;
  int D;
  Shape shape;
};

std::vector<Case> all_cases() {
  const Shape shapes[] = {
      {1, 2, 2, 1, 1},        // single row
      {2, 3, 3, 127, 127},    // partial tiles, several batches
      {1, 4, 2, 1000, 1000},  // GQA
      {1, 2, 1, 64, 200},     // MQA, Nq < Nk
      {1, 1, 1, 4097, 4097},  // long: D = 64, dense and hash16 only
  };
  std::vector<Case> cases;
  for (Mode mode : {Mode::kDense, Mode::kZeroBuckets, Mode::kHash2, Mode::kHash16, Mode::kDrop,
                    Mode::kDropSmall}) {
    for (DType dtype : {DType::kBF16, DType::kFP16}) {
      for (int D : {64, 128}) {
        for (const Shape& s : shapes) {
          if (s.Nq > 2048 && !(D == 64 && (mode == Mode::kDense || mode == Mode::kHash16))) {
            continue;
          }
          cases.push_back({mode, dtype, D, s});
        }
      }
    }
  }
  return cases;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  std::ostringstream s;
  s << mode_name(c.mode) << "_" << dtype_name(c.dtype) << "_D" << c.D << "_B" << c.shape.B << "H"
    << c.shape.H << "Hkv" << c.shape.Hkv << "_Nq" << c.shape.Nq << "Nk" << c.shape.Nk;
  return s.str();
}

uint32_t seed_of(const Case& c) {
  return 1000003u * uint32_t(c.mode) + 10007u * uint32_t(c.dtype) + 101u * uint32_t(c.D) +
         uint32_t(c.shape.B * 7 + c.shape.H * 13 + c.shape.Hkv * 17 + c.shape.Nq * 19 +
                  c.shape.Nk * 23);
}

class AttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionTest, MatchesReference) {
  SF_SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  const RefProblem p = make_problem(c.shape, c.D, c.dtype, c.mode, seed_of(c));
  const KernelResult got = run_kernels(p, c.dtype, options_for(c.mode));
  const RefResult ref = reference_attention(p);
  check_against_reference(p, ref, got, c.dtype);
}

INSTANTIATE_TEST_SUITE_P(SparseFlash, AttentionTest, ::testing::ValuesIn(all_cases()), case_name);

// The bf16 forward and dK/dV passes run on warpgroup MMA on Hopper (so the
// cases above test those kernels there) and on mma.sync elsewhere and for fp16.
TEST(SparseFlash, ForwardKernelChoice) {
  SF_SKIP_WITHOUT_GPU();
  int device = 0, major = 0, minor = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), cudaSuccess);
  const bool hopper = major == 9 && minor == 0 && sfk::kernel_options().wgmma_forward;
  EXPECT_EQ(forward_uses_wgmma(DType::kBF16), hopper) << "compute capability " << major << "." << minor;
  EXPECT_FALSE(forward_uses_wgmma(DType::kFP16));
  EXPECT_EQ(backward_uses_wgmma(DType::kBF16), hopper && sfk::kernel_options().wgmma_backward);
  EXPECT_FALSE(backward_uses_wgmma(DType::kFP16));
}

// Every instantiation of the forward, dK/dV and dQ kernels runs here: bf16 and
// fp16, D 64 and 128, dQ by atomics and by the deterministic pass, and bf16
// both on warpgroup MMA (on Hopper) and on mma.sync (KernelOptions off). Each
// kernel checks on entry that its launch gave it exactly the dynamic shared
// memory of its layout (traits.cuh: the launcher asks for kBytes of the same
// struct whose offsets the kernel carves) and traps otherwise, so a launcher
// that disagrees with its kernel fails this test; the results must match the
// reference as well.
TEST(SparseFlash, EveryKernelGetsTheSharedMemoryOfItsLayout) {
  SF_SKIP_WITHOUT_GPU();
  const sfk::KernelOptions saved = sfk::kernel_options();
  for (bool wgmma : {true, false}) {
    sfk::KernelOptions o = saved;
    o.wgmma_forward = o.wgmma_backward = wgmma;
    sfk::set_kernel_options(o);
    EXPECT_FALSE(!wgmma && forward_uses_wgmma(DType::kBF16));
    for (DType dtype : {DType::kBF16, DType::kFP16}) {
      for (int D : {64, 128}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << " D " << D
                                          << (wgmma ? " (wgmma where it applies)" : " (mma.sync)"));
        const Case c{Mode::kHash16, dtype, D, Shape{1, 2, 1, 64, 200}};
        const RefProblem p = make_problem(c.shape, c.D, c.dtype, c.mode, seed_of(c) + 7u);
        const KernelResult got = run_kernels(p, c.dtype, options_for(c.mode));
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        check_against_reference(p, reference_attention(p), got, c.dtype);
      }
    }
  }
  sfk::set_kernel_options(saved);
}

// Strided inputs and outputs: [B, N, heads, D] memory seen as [B, heads, N, D].
TEST(SparseFlash, StridedLayout) {
  SF_SKIP_WITHOUT_GPU();
  for (const Shape& s : {Shape{2, 4, 2, 200, 200}, Shape{1, 2, 1, 64, 200}}) {
    for (Mode mode : {Mode::kDense, Mode::kHash16, Mode::kDrop}) {
      for (int D : {64, 128}) {
        SCOPED_TRACE(::testing::Message() << mode_name(mode) << " D=" << D << " Nq=" << s.Nq
                                          << " Nk=" << s.Nk);
        const RefProblem p = make_problem(s, D, DType::kBF16, mode, 4242u + D + s.Nq);
        RunOptions opt = options_for(mode);
        opt.bnhd = true;
        const KernelResult got = run_kernels(p, DType::kBF16, opt);
        check_against_reference(p, reference_attention(p), got, DType::kBF16);
      }
    }
  }
}

// Hash buckets with query 0's bucket different from key 0's: query 0 (and any
// other row left without a key) outputs exactly 0, lse -inf, dq 0; no NaN.
TEST(SparseFlash, RowsWithoutAllowedKeys) {
  SF_SKIP_WITHOUT_GPU();
  const Shape s{2, 4, 2, 300, 300};
  const int D = 64, nb = 16, group = s.H / s.Hkv;
  for (DType dtype : {DType::kBF16, DType::kFP16}) {
    SCOPED_TRACE(dtype_name(dtype));
    RefProblem p = make_problem(s, D, dtype, Mode::kHash16, 99);
    for (int b = 0; b < s.B; ++b) {
      for (int h = 0; h < s.H; ++h) {
        const int kb0 = p.k_bucket[size_t(b * s.Hkv + h / group) * s.Nk];
        p.q_bucket[size_t(b * s.H + h) * s.Nq] = (kb0 + 1) % nb;
      }
    }
    const RefResult ref = reference_attention(p);
    const KernelResult got = run_kernels(p, dtype, options_for(Mode::kHash16));

    for (int row = 0; row < s.B * s.H; ++row) {
      const size_t at = size_t(row) * s.Nq;  // query 0 of this (b, h)
      ASSERT_TRUE(std::isinf(ref.lse[at]));
      EXPECT_TRUE(std::isinf(got.lse[at]) && got.lse[at] < 0)
          << "row " << row << ": lse of query 0 = " << got.lse[at];
      for (int d = 0; d < D; ++d) {
        EXPECT_EQ(got.out[at * D + d], 0.f) << "row " << row << " d " << d;
        for (const Grads& g : got.runs) {
          EXPECT_EQ(g.dq[at * D + d], 0.f)
              << dq_mode_name(g.atomic_dq) << ": row " << row << " d " << d;
        }
      }
    }
    auto count_nan = [](const std::vector<float>& x) {
      return std::count_if(x.begin(), x.end(), [](float e) { return std::isnan(e); });
    };
    auto count_nonfinite = [](const std::vector<float>& x) {
      return std::count_if(x.begin(), x.end(), [](float e) { return !std::isfinite(e); });
    };
    EXPECT_EQ(count_nonfinite(got.out), 0);
    EXPECT_EQ(count_nan(got.lse), 0);
    for (const Grads& g : got.runs) {
      SCOPED_TRACE(dq_mode_name(g.atomic_dq));
      EXPECT_EQ(count_nonfinite(g.dq), 0);
      EXPECT_EQ(count_nonfinite(g.dk), 0);
      EXPECT_EQ(count_nonfinite(g.dv), 0);
    }
    check_against_reference(p, ref, got, dtype);
  }
}

// The backward pass twice on the same inputs gives the same bits.
TEST(SparseFlash, BackwardIsDeterministic) {
  SF_SKIP_WITHOUT_GPU();
  const Shape s{1, 4, 2, 1000, 1000};
  for (DType dtype : {DType::kBF16, DType::kFP16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const RefProblem p = make_problem(s, 64, dtype, Mode::kHash16, 2024);
    RunOptions opt = options_for(Mode::kHash16);
    opt.backward_runs = 2;
    const KernelResult got = run_kernels(p, dtype, opt);
    ASSERT_EQ(got.runs.size(), 4u);  // atomic x 2, deterministic x 2
    auto same = [](const char* name, const std::vector<uint16_t>& a,
                   const std::vector<uint16_t>& b) -> ::testing::AssertionResult {
      if (a.size() == b.size() &&
          std::memcmp(a.data(), b.data(), a.size() * sizeof(uint16_t)) == 0) {
        return ::testing::AssertionSuccess();
      }
      size_t diff = 0, first = 0;
      for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
        if (a[i] != b[i] && diff++ == 0) first = i;
      }
      return ::testing::AssertionFailure() << name << ": " << diff << " of " << a.size()
                                           << " elements differ between runs, first at " << first
                                           << " (0x" << std::hex << a[first] << " vs 0x" << b[first]
                                           << ")";
    };
    // Deterministic mode: everything. Atomic dQ: dK and dV (no atomics there).
    const Grads &a0 = got.runs[0], &a1 = got.runs[1], &d0 = got.runs[2], &d1 = got.runs[3];
    ASSERT_TRUE(a0.atomic_dq && a1.atomic_dq && !d0.atomic_dq && !d1.atomic_dq);
    EXPECT_TRUE(same("dq (deterministic)", d0.dq_raw, d1.dq_raw));
    EXPECT_TRUE(same("dk (deterministic)", d0.dk_raw, d1.dk_raw));
    EXPECT_TRUE(same("dv (deterministic)", d0.dv_raw, d1.dv_raw));
    EXPECT_TRUE(same("dk (atomic dQ)", a0.dk_raw, a1.dk_raw));
    EXPECT_TRUE(same("dv (atomic dQ)", a0.dv_raw, a1.dv_raw));
  }
}

// ---------------------------------------------------------------------------
// GPU: LSH bucket ids against a float64 projection of the same rounded inputs.
// The kernel sums in float32, so a row may pick another bucket only when its
// best two of [xR, -xR] are within rounding of each other; such rows must be
// rare, and every pick must be a maximum up to that rounding.

TEST(SparseFlash, LshBucketIds) {
  SF_SKIP_WITHOUT_GPU();
  struct LshCase {
    int B, H, Hr, N, D, half;
    bool bnhd;
  };
  for (const LshCase& c : {LshCase{2, 4, 2, 1000, 64, 8, false}, LshCase{1, 3, 3, 517, 128, 16, true},
                           LshCase{1, 2, 1, 300, 24, 1, false}, LshCase{2, 2, 2, 257, 64, 12, true}}) {
    for (DType dtype : {DType::kBF16, DType::kFP16}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << " B" << c.B << " H" << c.H << " Hr"
                                        << c.Hr << " N" << c.N << " D" << c.D << " half" << c.half);
      std::mt19937 gen(c.N * 31 + c.D * 7 + c.half + int(dtype));
      std::normal_distribution<float> normal(0.f, 1.f);
      const sfk::Layout l = make_layout(c.H, c.N, c.D, c.bnhd);
      const size_t elems = size_t(c.B) * c.H * c.N * c.D;
      std::vector<uint16_t> xb(elems);
      std::vector<double> xr(elems);  // rounded values, reference layout [B, H, N, D]
      for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
          for (int n = 0; n < c.N; ++n)
            for (int d = 0; d < c.D; ++d) {
              const uint16_t bits = to_bits(dtype, normal(gen));
              xb[b * l.b + h * l.h + n * l.n + d] = bits;
              xr[((size_t(b) * c.H + h) * c.N + n) * c.D + d] = from_bits(dtype, bits);
            }
      std::vector<float> R(size_t(c.Hr) * c.D * c.half);
      for (float& r : R) r = normal(gen);
      DeviceBuffer<uint16_t> x(elems);
      DeviceBuffer<float> rot(R.size());
      DeviceBuffer<int64_t> out(size_t(c.B) * c.H * c.N);
      x.upload(xb);
      rot.upload(R);
      Stream stream;
      out.poison(stream.get());
      SF_CUDA_CHECK(sfk::lsh_bucket_ids(dtype, x.get(), l, c.B, c.H, c.N, c.D, rot.get(), c.Hr,
                                        c.half, out.get(), stream.get()));
      stream.sync("lsh_bucket_ids");
      const std::vector<int64_t> got = out.download();
      int exact = 0, not_max = 0;
      for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
          for (int n = 0; n < c.N; ++n) {
            const size_t row = (size_t(b) * c.H + h) * c.N + n;
            const float* Rh = R.data() + size_t(h / (c.H / c.Hr)) * c.D * c.half;
            std::vector<double> v(2 * c.half);
            double scale = 0;
            for (int j = 0; j < c.half; ++j) {
              double p = 0;
              for (int d = 0; d < c.D; ++d) {
                p += xr[row * c.D + d] * Rh[d * c.half + j];
                scale += std::abs(xr[row * c.D + d] * Rh[d * c.half + j]);
              }
              v[j] = p;
              v[c.half + j] = -p;
            }
            const int want = int(std::max_element(v.begin(), v.end()) - v.begin());
            const int64_t g = got[row];
            ASSERT_GE(g, 0);
            ASSERT_LT(g, 2 * c.half);
            if (g == want) {
              ++exact;
            } else if (v[g] < v[want] - 1e-5 * scale) {
              if (not_max++ == 0)
                ADD_FAILURE() << "row " << row << ": bucket " << g << " (" << v[g]
                              << ") is not a maximum; " << want << " has " << v[want];
            }
          }
      const int rows = c.B * c.H * c.N;
      EXPECT_EQ(not_max, 0);
      EXPECT_GE(exact, rows - std::max(1, rows / 200)) << "rows with another (tied) bucket";
    }
  }
}

// The capped assignment (cap > 0): refusals of bad arguments, and on rows
// that all prefer bucket 0 every block of kLshCapRows rows spreads over the
// buckets in score order, each bucket taking at most cap rows of the block.
TEST(SparseFlash, LshBucketIdsCapped) {
  SF_SKIP_WITHOUT_GPU();
  const int B = 1, H = 2, N = 300, D = 64, half = 8, nb = 2 * half, cap = sfk::kLshCapRows / nb;
  const sfk::Layout l = make_layout(H, N, D, false);
  // Every row is e_0 scaled: projection j is x0 * R[0][j]; R[0][j] = half - j,
  // so the scores are ordered +p_0 > +p_1 > ... > -p_7 > ... > -p_0.
  std::vector<uint16_t> xb(size_t(B) * H * N * D, to_bits(DType::kBF16, 0.f));
  for (int h = 0; h < H; ++h)
    for (int n = 0; n < N; ++n) xb[h * l.h + n * l.n] = to_bits(DType::kBF16, 1.f + n % 3);
  std::vector<float> R(size_t(D) * half, 0.f);
  for (int j = 0; j < half; ++j) R[j] = float(half - j);
  DeviceBuffer<uint16_t> x(xb.size());
  DeviceBuffer<float> rot(R.size()), scores(size_t(B) * H * N * half);
  DeviceBuffer<int64_t> out(size_t(B) * H * N);
  x.upload(xb);
  rot.upload(R);
  Stream stream;
  // Refused: no workspace; nb > 64; cap * nb below the block.
  EXPECT_EQ(sfk::lsh_bucket_ids(DType::kBF16, x.get(), l, B, H, N, D, rot.get(), 1, half, out.get(),
                                stream.get(), nullptr, 0, cap, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(sfk::lsh_bucket_ids(DType::kBF16, x.get(), l, B, H, N, D, rot.get(), 1, 40, out.get(),
                                stream.get(), nullptr, 0, 4, scores.get()),
            cudaErrorInvalidValue);
  EXPECT_EQ(sfk::lsh_bucket_ids(DType::kBF16, x.get(), l, B, H, N, D, rot.get(), 1, half, out.get(),
                                stream.get(), nullptr, 0, cap - 1, scores.get()),
            cudaErrorInvalidValue);
  out.poison(stream.get());
  SF_CUDA_CHECK(sfk::lsh_bucket_ids(DType::kBF16, x.get(), l, B, H, N, D, rot.get(), 1, half,
                                    out.get(), stream.get(), nullptr, 0, cap, scores.get()));
  stream.sync("lsh_bucket_ids capped");
  const std::vector<int64_t> got = out.download();
  for (int h = 0; h < H; ++h)
    for (int n = 0; n < N; ++n) {
      // Row i of its block: buckets fill in score order, cap rows each.
      const int i = n % sfk::kLshCapRows, rank = i / cap;
      const int want = rank < half ? rank : nb - 1 - (rank - half);
      ASSERT_EQ(got[size_t(h) * N + n], want) << "head " << h << " row " << n;
    }
  // NaN rows (an fp16 overflow upstream) still respect the cap.
  for (int h = 0; h < H; ++h)
    for (int n = 0; n < N; n += 2) xb[h * l.h + n * l.n] = 0x7fc0;  // bf16 NaN
  x.upload(xb);
  out.poison(stream.get());
  SF_CUDA_CHECK(sfk::lsh_bucket_ids(DType::kBF16, x.get(), l, B, H, N, D, rot.get(), 1, half,
                                    out.get(), stream.get(), nullptr, 0, cap, scores.get()));
  stream.sync("lsh_bucket_ids capped, NaN rows");
  const std::vector<int64_t> with_nan = out.download();
  for (int h = 0; h < H; ++h)
    for (int n0 = 0; n0 < N; n0 += sfk::kLshCapRows) {
      std::vector<int> count(nb);
      for (int n = n0; n < std::min(N, n0 + sfk::kLshCapRows); ++n) {
        const int64_t b = with_nan[size_t(h) * N + n];
        ASSERT_GE(b, 0);
        ASSERT_LT(b, nb);
        ++count[b];
      }
      for (int b = 0; b < nb; ++b) EXPECT_LE(count[b], cap) << "head " << h << " block " << n0;
    }
}

// ---------------------------------------------------------------------------
// GPU: packing and tile ranges on their own.

struct PackCase {
  int rows, n, num_buckets;
  int sentinel;  // 0: no drop; else the drop bucket given to about half the rows
  int position_offset;
  int dead_bucket = INT_MAX;  // rows at or above it are dropped ones (tile positions)
};

class PackingTest : public ::testing::TestWithParam<PackCase> {};

// The sort (counting sort with its segments for ids of up to 8 bits, the
// radix sort for the sentinels), and the tile ranges with and without
// dropped rows.
TEST_P(PackingTest, StableSortSegmentsAndTileRanges) {
  SF_SKIP_WITHOUT_GPU();
  const PackCase& c = GetParam();
  std::mt19937 gen(c.rows * 131 + c.n * 7 + c.num_buckets);
  std::uniform_int_distribution<int> bucket(0, c.num_buckets - 1);
  std::bernoulli_distribution drop(0.5);
  std::vector<int> in(size_t(c.rows) * c.n);
  for (int& b : in) b = (c.sentinel != 0 && drop(gen)) ? c.sentinel : bucket(gen);

  Stream stream;
  const int bits = sfk::bucket_sort_bits(c.sentinel != 0, c.num_buckets);
  const PackedSide s = pack_side(&in, c.rows, c.n, bits, c.position_offset, stream, c.dead_bucket);
  EXPECT_TRUE(verify_packing("packed", in, s.perm_h, s.bucket_h, c.rows, c.n));
  EXPECT_EQ(s.num_segments, sfk::num_segments_for(bits));
  if (s.num_segments > 0)
    EXPECT_TRUE(verify_segments("segments", s.bucket_h, s.segments_h, c.rows, c.n, s.num_segments));
  EXPECT_TRUE(verify_tiles("tiles", s.perm_h, s.bucket_h, s.tiles_h, c.rows, c.n,
                           c.position_offset, c.dead_bucket));
  // A tile of dropped rows alone has no positions, so it meets no tile.
  for (size_t t = 0; t < s.tiles_h.size(); ++t) {
    const sfk::TileRange& r = s.tiles_h[t];
    if (r.x >= c.dead_bucket) {
      EXPECT_EQ(r.z, INT_MAX) << "tile " << t;
      EXPECT_EQ(r.w, INT_MIN) << "tile " << t;
    }
  }

  // The same sort without asking for segments.
  const PackedSide plain = pack_side(&in, c.rows, c.n, bits, c.position_offset, stream,
                                     c.dead_bucket, /*with_segments=*/false);
  EXPECT_EQ(plain.perm_h, s.perm_h);
  EXPECT_EQ(plain.bucket_h, s.bucket_h);

  // A keep mask applied by the sort itself (counting sort only) packs exactly
  // as the ids with dropped rows written in; with and without bucket ids.
  if (sfk::num_segments_for(bits) > 0) {
    const int dropped = c.dead_bucket < (1 << bits) ? c.dead_bucket : (1 << bits) - 1;
    std::vector<uint8_t> keep(in.size());
    std::bernoulli_distribution kept(0.6);
    for (uint8_t& k : keep) k = kept(gen) ? 1 : 0;
    for (const bool with_ids : {true, false}) {
      SCOPED_TRACE(with_ids ? "keep mask over bucket ids" : "keep mask alone");
      std::vector<int> ids(in.size());
      for (size_t i = 0; i < in.size(); ++i) ids[i] = keep[i] ? (with_ids ? in[i] : 0) : dropped;
      const PackedSide want = pack_side(&ids, c.rows, c.n, bits, c.position_offset, stream,
                                        c.dead_bucket);
      const PackedSide got = pack_side(with_ids ? &in : nullptr, c.rows, c.n, bits,
                                       c.position_offset, stream, c.dead_bucket, true, &keep,
                                       dropped);
      EXPECT_TRUE(verify_packing("keep", ids, got.perm_h, got.bucket_h, c.rows, c.n));
      EXPECT_EQ(got.perm_h, want.perm_h);
      EXPECT_EQ(got.bucket_h, want.bucket_h);
      EXPECT_EQ(got.segments_h, want.segments_h);
      EXPECT_TRUE(std::equal(got.tiles_h.begin(), got.tiles_h.end(), want.tiles_h.begin(),
                             want.tiles_h.end(), [](const sfk::TileRange& x, const sfk::TileRange& y) {
                               return x.x == y.x && x.y == y.y && x.z == y.z && x.w == y.w;
                             }));
    }
  }

  // nullptr perm and bucket: identity order, bucket 0.
  const PackedSide dense = pack_side(nullptr, c.rows, c.n, 0, c.position_offset, stream);
  EXPECT_TRUE(verify_tiles("dense tiles", {}, {}, dense.tiles_h, c.rows, c.n, c.position_offset));
}

INSTANTIATE_TEST_SUITE_P(
    SparseFlash, PackingTest,
    ::testing::Values(PackCase{1, 1, 2, 0, 0}, PackCase{3, 63, 16, 0, 0}, PackCase{2, 64, 1, 0, 5},
                      PackCase{4, 65, 16, sfk::kDroppedQueryBucket, 0, sfk::kDroppedQueryBucket},
                      PackCase{6, 127, 2, 0, 73}, PackCase{2, 1000, 16, 0, 0},
                      PackCase{2, 1000, 1, sfk::kDroppedKeyBucket, 0, sfk::kDroppedQueryBucket},
                      PackCase{1, 4097, 16, 0, 0},
                      PackCase{3, 2048, 64, sfk::kDroppedQueryBucket, 136},
                      // counting sort: chunk edges (1024 rows), the widest ids, dropped rows
                      PackCase{2, 1023, 3, 0, 0, 1}, PackCase{3, 1025, 3, 0, 9, 2},
                      PackCase{2, 5000, 256, 0, 0}, PackCase{1, 3000, 200, 0, 11, 150},
                      PackCase{5, 2049, 34, 0, 0, 32}, PackCase{1, 20000, 8, 0, 0, 7}),
    [](const ::testing::TestParamInfo<PackCase>& info) {
      const PackCase& c = info.param;
      std::ostringstream s;
      s << "rows" << c.rows << "_n" << c.n << "_nb" << c.num_buckets
        << (c.sentinel == sfk::kDroppedQueryBucket ? "_dropq"
            : c.sentinel == sfk::kDroppedKeyBucket ? "_dropk"
                                                   : "")
        << "_off" << c.position_offset;
      if (c.dead_bucket == sfk::kDroppedQueryBucket)
        s << "_deadsentinel";
      else if (c.dead_bucket != INT_MAX)
        s << "_dead" << c.dead_bucket;
      return s.str();
    });

// pack_by_bucket refuses segments for ids wider than kMaxSegmentBits and a
// workspace that is too small, before touching anything.
TEST(SparseFlash, PackingRefusesBadArguments) {
  SF_SKIP_WITHOUT_GPU();
  DeviceBuffer<int> in(100), perm(100), sorted(100), seg(1 << 10);
  DeviceBuffer<unsigned char> ws(sfk::pack_workspace_bytes(1, 100, 9));
  EXPECT_EQ(sfk::pack_by_bucket(in.get(), 1, 100, 9, perm.get(), sorted.get(), seg.get(), ws.get(),
                                ws.size(), nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(sfk::pack_by_bucket(in.get(), 1, 100, 4, perm.get(), sorted.get(), nullptr, ws.get(),
                                sfk::pack_workspace_bytes(1, 100, 4) - 1, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(sfk::pack_by_bucket(in.get(), 0, 100, 4, perm.get(), sorted.get(), nullptr, ws.get(),
                                ws.size(), nullptr),
            cudaErrorInvalidValue);
  // Neither ids nor a keep mask; a keep mask with ids too wide for the
  // counting sort, or a dropped id outside [0, 2^sort_bits).
  DeviceBuffer<uint8_t> keep(100);
  const bool* kp = reinterpret_cast<const bool*>(keep.get());
  EXPECT_EQ(sfk::pack_by_bucket(nullptr, 1, 100, 4, perm.get(), sorted.get(), nullptr, ws.get(),
                                ws.size(), nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(sfk::pack_by_bucket(in.get(), 1, 100, 9, perm.get(), sorted.get(), nullptr, ws.get(),
                                ws.size(), nullptr, kp, 1),
            cudaErrorInvalidValue);
  EXPECT_EQ(sfk::pack_by_bucket(nullptr, 1, 100, 2, perm.get(), sorted.get(), nullptr, ws.get(),
                                ws.size(), nullptr, kp, 4),
            cudaErrorInvalidValue);
  EXPECT_EQ(sfk::pack_by_bucket(nullptr, 1, 100, 2, perm.get(), sorted.get(), nullptr, ws.get(),
                                ws.size(), nullptr, kp, -1),
            cudaErrorInvalidValue);
}

// attention_forward / attention_backward refuse packings the kernels cannot
// serve, before touching the device (so this runs without a GPU too): dropped
// rows (dead_bucket) or segments without a permutation, segments without
// buckets. The pointers are never read.
TEST(SparseFlash, RefusesPackingsTheKernelsCannotServe) {
  alignas(16) static int dummy[64];
  sfk::ForwardParams f;
  f.B = f.H = f.Hkv = 1;
  f.Nq = f.Nk = 64;
  f.D = 64;
  f.scale = 0.125f;
  f.q = f.k = f.v = f.out = dummy;
  f.lse = reinterpret_cast<float*>(dummy);
  const auto* tiles = reinterpret_cast<const sfk::TileRange*>(dummy);
  f.q_pack.tiles = f.k_pack.tiles = tiles;
  auto refused = [&](const sfk::Packing& pk) {
    sfk::ForwardParams g = f;
    g.q_pack = pk;
    sfk::BackwardParams b;
    b.fwd = g;
    b.delta = reinterpret_cast<float*>(dummy);
    return sfk::attention_forward(g, nullptr) == cudaErrorInvalidValue &&
           sfk::attention_backward(b, nullptr) == cudaErrorInvalidValue;
  };
  // A packing with tiles, and perm / bucket / segments (2 of them) where asked.
  auto packing = [&](bool perm, bool bucket, bool segments, int dead_bucket) {
    sfk::Packing pk;
    pk.tiles = tiles;
    pk.perm = perm ? dummy : nullptr;
    pk.bucket = bucket ? dummy : nullptr;
    pk.segments = segments ? dummy : nullptr;
    pk.num_segments = segments ? 2 : 0;
    pk.dead_bucket = dead_bucket;
    return pk;
  };
  EXPECT_TRUE(refused(packing(false, true, false, 1))) << "dropped rows need a permutation";
  EXPECT_TRUE(refused(packing(false, true, true, INT_MAX))) << "segments need a permutation";
  EXPECT_TRUE(refused(packing(true, false, true, INT_MAX))) << "segments need buckets";
  EXPECT_TRUE(refused(sfk::Packing{})) << "tile ranges are required";
  EXPECT_TRUE(refused(packing(true, true, true, -1))) << "a negative dead bucket";
}

// Every refusal says why: the function, the argument and its value
// (last_refusal()). These refusals come before the device is touched, so this
// runs without a GPU too.
TEST(SparseFlash, RefusalsNameTheArgumentAndItsValue) {
  alignas(16) static int dummy[64];
  auto has = [](const std::string& needle) {
    const std::string got = sfk::last_refusal();
    return got.find(needle) != std::string::npos ? ::testing::AssertionSuccess()
                                                 : ::testing::AssertionFailure() << "last_refusal() is \"" << got << "\"";
  };
  sfk::ForwardParams f;
  f.B = f.H = f.Hkv = 1;
  f.Nq = f.Nk = 64;
  f.D = 96;
  f.q = f.k = f.v = f.out = dummy;
  f.lse = reinterpret_cast<float*>(dummy);
  f.q_pack.tiles = f.k_pack.tiles = reinterpret_cast<const sfk::TileRange*>(dummy);
  EXPECT_EQ(sfk::attention_forward(f, nullptr), cudaErrorInvalidValue);
  EXPECT_TRUE(has("attention_forward: D = 96, expected 64 or 128"));
  f.D = 64;
  f.Hkv = 3;
  f.H = 4;
  EXPECT_EQ(sfk::attention_forward(f, nullptr), cudaErrorInvalidValue);
  EXPECT_TRUE(has("attention_forward: Hkv = 3 does not divide H = 4"));
  f.H = f.Hkv = 1;
  f.k_pack.dead_bucket = -2;
  sfk::BackwardParams b;
  b.fwd = f;
  b.delta = reinterpret_cast<float*>(dummy);
  EXPECT_EQ(sfk::attention_backward(b, nullptr), cudaErrorInvalidValue);
  EXPECT_TRUE(has("attention_backward: k_pack.dead_bucket = -2"));

  EXPECT_EQ(sfk::pack_by_bucket(dummy, 0, 100, 4, dummy, dummy, nullptr, dummy, 1 << 20, nullptr),
            cudaErrorInvalidValue);
  EXPECT_TRUE(has("pack_by_bucket: rows = 0"));
  EXPECT_EQ(sfk::pack_by_bucket(dummy, 1, 100, 31, dummy, dummy, nullptr, dummy, 1 << 20, nullptr),
            cudaErrorInvalidValue);
  EXPECT_TRUE(has("pack_by_bucket: sort_bits = 31"));
  EXPECT_EQ(sfk::compute_tile_ranges(dummy, dummy, 1, -5, 0, INT_MAX, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_TRUE(has("compute_tile_ranges: rows = 1, n = -5"));
  const sfk::Layout l{64 * 12, 12, 64 * 12};
  EXPECT_EQ(sfk::lsh_bucket_ids(DType::kBF16, dummy, l, 1, 1, 64, 12, reinterpret_cast<float*>(dummy),
                                1, 8, reinterpret_cast<int64_t*>(dummy), nullptr),
            cudaErrorInvalidValue);
  EXPECT_TRUE(has("lsh_bucket_ids: D = 12"));
}

// Hash buckets through fixed row blocks (no segments given) agree with the
// reference too: both block schemes stay correct.
TEST(SparseFlash, HashWithFixedRowBlocks) {
  SF_SKIP_WITHOUT_GPU();
  for (const Shape& s : {Shape{2, 3, 3, 127, 127}, Shape{1, 4, 2, 1000, 1000}}) {
    for (int D : {64, 128}) {
      SCOPED_TRACE(::testing::Message() << "D=" << D << " N=" << s.Nq);
      const RefProblem p = make_problem(s, D, DType::kBF16, Mode::kHash16, 777u + D + s.Nq);
      RunOptions opt = options_for(Mode::kHash16);
      opt.segments = false;
      const KernelResult got = run_kernels(p, DType::kBF16, opt);
      check_against_reference(p, reference_attention(p), got, DType::kBF16);
    }
  }
}

// ---------------------------------------------------------------------------
// CPU: the swizzled shared-memory addressing of the kernels (attention/kernels/mma.cuh).
// The kernels precompute one per-lane offset and add compile-time block
// offsets (SwizzledLane); these tests check that this equals the tile layout,
// element by element, for every lane, block origin and pattern the kernels use.

// The tile layout written out: rows of W 2-byte elements, the 16-byte chunk
// index XORed with row % 8.
template <int W>
uint32_t reference_offset(int row, int col) {
  const int chunk = (col / 8) ^ (row % 8);
  return static_cast<uint32_t>(2 * (row * W + chunk * 8 + col % 8));
}

// Lane l's own (row, col) inside a block, for each access pattern.
struct LanePattern {
  const char* name;
  int (*row)(int), (*col)(int);
  int col_step;  // block origins c0 are multiples of this
};
const LanePattern kLanePatterns[] = {
    {"ldmatrix a", [](int l) { return l % 16; }, [](int l) { return (l / 16) * 8; }, 16},
    {"ldmatrix b", [](int l) { return l % 8 + (l / 16) * 8; },
     [](int l) { return ((l / 8) % 2) * 8; }, 16},
    {"accumulator pair", [](int l) { return l / 4; }, [](int l) { return (l % 4) * 2; }, 8},
};

template <int W>
sfk::SwizzledLane<W> lane_offsets(int pattern, int lane) {
  if (pattern == 0) return sfk::ldm_lane_a<W>(lane);
  if (pattern == 1) return sfk::ldm_lane_b<W>(lane);
  return sfk::acc_lane<W>(lane);
}

template <int W>
void check_swizzled_lanes() {
  constexpr int kTileRows = 128;  // the largest tile (dK/dV keys)
  // The layout is a permutation of the tile: no two elements share bytes.
  std::vector<int> owner(2 * kTileRows * W, 0);
  for (int r = 0; r < kTileRows; ++r)
    for (int c = 0; c < W; ++c) {
      ASSERT_EQ(sfk::swizzled_offset<W>(r, c), reference_offset<W>(r, c))
          << "row " << r << " col " << c;
      ++owner[reference_offset<W>(r, c) / 2];
    }
  EXPECT_EQ(std::count(owner.begin(), owner.end(), 1), kTileRows * W);

  int64_t checked = 0;
  for (int pi = 0; pi < 3; ++pi) {
    const LanePattern& pat = kLanePatterns[pi];
    for (int lane = 0; lane < 32; ++lane) {
      const sfk::SwizzledLane<W> l = lane_offsets<W>(pi, lane);
      for (int r0 = 0; r0 + 16 <= kTileRows; r0 += 8)
        for (int c0 = 0; c0 + pat.col_step <= W; c0 += pat.col_step) {
          const int row = r0 + pat.row(lane), col = c0 + pat.col(lane);
          ASSERT_EQ(l.at(r0, c0), reference_offset<W>(row, col))
              << pat.name << " W " << W << " lane " << lane << " r0 " << r0 << " c0 " << c0;
          // Moving the block down by 16 rows is a plain add (the dQ loop's
          // addresses for key warp kk are 16 kk rows on from warp 0's).
          if (r0 + 32 <= kTileRows)
            ASSERT_EQ(l.at(r0 + 16, c0), l.at(r0, c0) + 16 * 2 * W) << pat.name << " lane " << lane;
          ++checked;
        }
    }
  }
  // The accumulator pattern stores two adjacent elements as one word.
  for (int lane = 0; lane < 32; ++lane)
    for (int r0 = 0; r0 + 16 <= kTileRows; r0 += 8)
      for (int c0 = 0; c0 + 8 <= W; c0 += 8)
        ASSERT_EQ(reference_offset<W>(r0 + lane / 4, c0 + (lane % 4) * 2 + 1),
                  sfk::acc_lane<W>(lane).at(r0, c0) + 2);
  EXPECT_GT(checked, 0);
}

TEST(SwizzledLane, MatchesTileLayoutForEveryLaneAndBlock) {
  check_swizzled_lanes<64>();
  check_swizzled_lanes<128>();
}

}  // namespace
}  // namespace sparseflash::kernels_test
