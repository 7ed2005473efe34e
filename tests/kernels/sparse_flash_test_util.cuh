// What the kernel tests share: problems and their float64 reference
// (tests/kernels/cpu_reference.h), device buffers poisoned with NaN, running
// the kernels (forward, then the backward with dQ by atomics and by the
// deterministic pass) and the checks against the reference. Included by
// sparse_flash_test.cu and lsh_packing_test.cu.
//
// The torch-free tests of the sparse flash attention kernels
// (attention/kernels/sparse_flash.h) against a float64 CPU reference
// (tests/kernels/cpu_reference.h). GPU tests skip themselves without a GPU;
// the CpuReference.* tests always run.
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
#pragma once

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

}  // namespace
}  // namespace sparseflash::kernels_test
