// The sparse flash attention kernels against the float64 CPU reference: the
// reference itself (hand-computed cases, finite differences), every mode, dtype,
// head size and shape, strided layouts, rows without keys, determinism, and
// the shared memory of every kernel instantiation. (Helpers and what the tests
// require: sparse_flash_test_util.cuh.)
#include "tests/kernels/sparse_flash_test_util.cuh"

namespace sparseflash::kernels_test {
namespace {

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
