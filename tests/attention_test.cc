// Reference attention against naive masked softmax attention, finite
// differences in float64, and the semantics of each kind.
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/csrc/autograd/autograd.h>

#include "attention/attention.h"
#include "attention/flash.h"

namespace sparseflash::attention {
namespace {

using at::Tensor;

at::TensorOptions f64() { return at::TensorOptions().dtype(at::kDouble); }

Options make_options(Kind kind, int buckets = 4, double drop = 0.5, int64_t group = 0) {
  Options o;
  o.kind = kind;
  o.num_buckets = buckets;
  o.drop_prob = drop;
  o.group_size = group;
  return o;
}

struct Inputs {
  Tensor q, k, v;
};

Inputs random_inputs(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D,
                     uint64_t seed, at::TensorOptions opts = f64()) {
  at::manual_seed(seed);
  return {at::randn({B, H, Nq, D}, opts), at::randn({B, Hkv, Nk, D}, opts),
          at::randn({B, Hkv, Nk, D}, opts)};
}

// Gradients of sum(out * w) with respect to q, k, v.
std::tuple<Tensor, Tensor, Tensor, Tensor> run_with_grads(
    const std::function<Tensor(const Tensor&, const Tensor&, const Tensor&)>& f, const Inputs& in,
    const Tensor& w) {
  Tensor q = in.q.clone().requires_grad_(), k = in.k.clone().requires_grad_(),
         v = in.v.clone().requires_grad_();
  Tensor out = f(q, k, v);
  (out * w).sum().backward();
  return {out.detach(), q.grad(), k.grad(), v.grad()};
}

void expect_close(const Tensor& a, const Tensor& b, double tol, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  EXPECT_FALSE(at::isnan(a).any().item<bool>()) << what << " has NaN";
  const double diff = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  EXPECT_LE(diff, tol) << what << ": max abs difference " << diff;
}

// ---------------------------------------------------------------------------
// against naive attention, every kind, odd shapes, GQA, Nq < Nk

struct Shape {
  int64_t B, H, Hkv, Nq, Nk, D, chunk;
};

class ReferenceVsNaive : public ::testing::TestWithParam<std::tuple<Kind, Shape>> {};

TEST_P(ReferenceVsNaive, ForwardAndGradientsMatch) {
  auto [kind, s] = GetParam();
  Inputs in = random_inputs(s.B, s.H, s.Hkv, s.Nq, s.Nk, s.D, 7 + s.Nq);
  at::Generator gen = at::detail::createCPUGenerator(3);
  Pattern p = draw_pattern(make_options(kind), in.q, in.k, gen, 0);
  Tensor w = at::randn({s.B, s.H, s.Nq, s.D}, f64());
  auto [o_ref, dq_ref, dk_ref, dv_ref] = run_with_grads(
      [&](const Tensor& q, const Tensor& k, const Tensor& v) {
        return reference_attention(q, k, v, p, s.chunk);
      },
      in, w);
  auto [o_nv, dq_nv, dk_nv, dv_nv] = run_with_grads(
      [&](const Tensor& q, const Tensor& k, const Tensor& v) {
        return naive_attention(q, k, v, p);
      },
      in, w);
  // Both run in float64 and differ only by summation order: seen up to 1e-9
  // on the GPU host's CPU (1e-15 here); float32 math would miss by ~1e-6.
  expect_close(o_ref, o_nv, 1e-8, "out");
  expect_close(dq_ref, dq_nv, 1e-8, "dq");
  expect_close(dk_ref, dk_nv, 1e-8, "dk");
  expect_close(dv_ref, dv_nv, 1e-8, "dv");
  if (allowed_mask(p, s.B, s.H, s.Nq, s.Nk, f64()).any().item<bool>())
    EXPECT_GT(o_ref.abs().sum().item<double>(), 0) << "output is all zero";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ReferenceVsNaive,
    ::testing::Combine(::testing::Values(Kind::kDense, Kind::kHash, Kind::kDrop, Kind::kShift),
                       ::testing::Values(Shape{2, 4, 4, 37, 37, 16, 8},     // chunks split rows
                                         Shape{1, 6, 2, 33, 33, 8, 1024},   // GQA, one chunk
                                         Shape{2, 2, 1, 13, 29, 8, 5},      // MQA, Nq < Nk
                                         Shape{1, 1, 1, 1, 1, 4, 3},        // a single token
                                         Shape{1, 3, 3, 127, 127, 16, 32})));

// ---------------------------------------------------------------------------
// finite differences in float64 (what gradcheck does)

class ReferenceGradcheck : public ::testing::TestWithParam<Kind> {};

TEST_P(ReferenceGradcheck, MatchesFiniteDifferences) {
  const int64_t B = 1, H = 2, Hkv = 1, N = 7, D = 3;
  Inputs in = random_inputs(B, H, Hkv, N, N, D, 11);
  at::Generator gen = at::detail::createCPUGenerator(5);
  Pattern p = draw_pattern(make_options(GetParam(), 2, 0.3), in.q, in.k, gen, 0);
  Tensor w = at::randn({B, H, N, D}, f64());
  auto f = [&](const Tensor& q, const Tensor& k, const Tensor& v) {
    return (reference_attention(q, k, v, p, 3) * w).sum().item<double>();
  };
  auto [o, dq, dk, dv] = run_with_grads(
      [&](const Tensor& q, const Tensor& k, const Tensor& v) {
        return reference_attention(q, k, v, p, 3);
      },
      in, w);
  const double eps = 1e-6;
  const Tensor* inputs[3] = {&in.q, &in.k, &in.v};
  const Tensor* grads[3] = {&dq, &dk, &dv};
  for (int which = 0; which < 3; ++which) {
    Tensor base = inputs[which]->clone();
    auto flat = base.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double x0 = flat[i].item<double>();
      Tensor args[3] = {in.q, in.k, in.v};
      flat[i] = x0 + eps;
      args[which] = base;
      const double up = f(args[0], args[1], args[2]);
      flat[i] = x0 - eps;
      const double down = f(args[0], args[1], args[2]);
      flat[i] = x0;
      const double numeric = (up - down) / (2 * eps);
      const double analytic = grads[which]->reshape({-1})[i].item<double>();
      EXPECT_NEAR(analytic, numeric, 1e-6) << "input " << which << " element " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, ReferenceGradcheck,
                         ::testing::Values(Kind::kDense, Kind::kHash, Kind::kDrop,
                                           Kind::kShift));

// ---------------------------------------------------------------------------
// semantics

TEST(LshBuckets, InRangeScaleInvariantAndSharedWithNormalisedKeys) {
  at::manual_seed(1);
  Tensor x = at::randn({2, 3, 50, 8});
  Tensor r = at::randn({3, 8, 4});
  Tensor b = lsh_buckets(x, r);
  EXPECT_GE(b.min().item<int64_t>(), 0);
  EXPECT_LT(b.max().item<int64_t>(), 8);
  EXPECT_TRUE(b.equal(lsh_buckets(x * 3.5, r)));
  EXPECT_TRUE(b.equal(lsh_buckets(x / x.norm(2, -1, true), r)));
  EXPECT_GT(std::get<0>(at::_unique(b)).numel(), 4) << "buckets are not spread";
}

// On CUDA (bf16/fp16) lsh_buckets runs the fused kernel: the same buckets as
// the CPU path on the same rounded inputs, except rows whose two best
// projections tie within float rounding.
TEST(LshBuckets, CudaKernelMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  at::manual_seed(3);
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    Tensor x = at::randn({2, 4, 777, 64}).to(dtype);
    Tensor r = at::randn({2, 64, 8});
    Tensor cuda = x.cuda();
    ASSERT_TRUE(flash_lsh_supported(cuda, r));
    Tensor got = lsh_buckets(cuda, r).cpu();
    Tensor want = lsh_buckets(x.to(at::kFloat), r);
    const int64_t same = got.eq(want).sum().item<int64_t>();
    EXPECT_GE(same, want.numel() - want.numel() / 200) << "of " << want.numel() << " rows";
    // Wherever they differ, both picks are maxima up to rounding.
    Tensor proj = at::matmul(x.to(at::kDouble), r.to(at::kDouble).repeat_interleave(2, 0).unsqueeze(0));
    Tensor v = at::cat({proj, -proj}, -1);
    Tensor gap = v.gather(-1, want.unsqueeze(-1)) - v.gather(-1, got.unsqueeze(-1));
    EXPECT_LT(gap.abs().max().item<double>(), 1e-3);
  }
}

// Centred LSH on CUDA: the kernel subtracts the projected means of the
// earlier blocks from xR. Against float64 on the centred rows: the same
// buckets except near-ties, and every pick a maximum up to rounding. Rows
// with a large common direction (as a trained model's queries have), a
// token-major view, N not a multiple of the block.
TEST(LshBuckets, CudaCentredKernelMatchesCentredRows) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  at::manual_seed(5);
  const int64_t B = 2, N = 777, H = 4, D = 64, block = 128;
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    Tensor offset = at::randn({1, 1, H, D}) * 4.0;
    Tensor x = (at::randn({B, N, H, D}) + offset).to(dtype).transpose(1, 2);  // [B, H, N, D] view
    Tensor r = at::randn({2, D, 8});
    Tensor cuda = x.cuda();
    ASSERT_TRUE(flash_lsh_supported(cuda, r));
    Tensor got = lsh_buckets(cuda, r, block).cpu();
    Tensor centred = center_by_earlier_blocks(x.to(at::kDouble), block);
    Tensor proj = at::matmul(centred, r.to(at::kDouble).repeat_interleave(2, 0).unsqueeze(0));
    Tensor v = at::cat({proj, -proj}, -1);
    Tensor want = v.argmax(-1);
    const int64_t same = got.eq(want).sum().item<int64_t>();
    EXPECT_GE(same, want.numel() - want.numel() / 200) << "of " << want.numel() << " rows";
    Tensor gap = v.gather(-1, want.unsqueeze(-1)) - v.gather(-1, got.unsqueeze(-1));
    EXPECT_LT(gap.abs().max().item<double>(), 5e-3);
    // Not the uncentred buckets: the offset would put most rows in a few.
    Tensor raw = lsh_buckets(cuda, r).cpu();
    EXPECT_LT(raw.eq(got).to(at::kDouble).mean().item<double>(), 0.9);
  }
}

// ---------------------------------------------------------------------------
// bucket capacity (attention.lsh_capacity)

// How many rows of each block of `block` rows went to each bucket:
// [rows, blocks, nb].
Tensor block_counts(const Tensor& buckets, int64_t block, int64_t nb) {
  Tensor b = buckets.reshape({-1, buckets.size(-1)});
  const int64_t N = b.size(1), blocks = (N + block - 1) / block;
  Tensor counts = at::zeros({b.size(0), blocks, nb}, at::kLong);
  auto c = counts.accessor<int64_t, 3>();
  auto ids = b.accessor<int64_t, 2>();
  for (int64_t r = 0; r < b.size(0); ++r)
    for (int64_t n = 0; n < N; ++n) ++c[r][n / block][ids[r][n]];
  return counts;
}

TEST(LshCapacity, RowsPerBucketFromTheFactor) {
  EXPECT_EQ(lsh_bucket_capacity(0, 16), 0);
  EXPECT_EQ(lsh_bucket_capacity(1, 16), 8);
  EXPECT_EQ(lsh_bucket_capacity(1.5, 16), 12);
  EXPECT_EQ(lsh_bucket_capacity(1, 6), 22);  // ceil(128 / 6)
  EXPECT_EQ(lsh_bucket_capacity(1000, 16), kLshCapacityBlock);
  EXPECT_THROW(lsh_bucket_capacity(0.5, 16), c10::Error);
  EXPECT_THROW(lsh_bucket_capacity(-1, 16), c10::Error);
}

// Each row takes the largest score among the buckets with room, in order
// within its block; without pressure it is argmax; with cap * nb == block
// every whole block fills each bucket exactly.
TEST(LshCapacity, CappedArgmaxTakesTheBestBucketWithRoom) {
  at::manual_seed(11);
  const int64_t block = 32, nb = 8, N = 150;  // a partial last block
  // Skewed scores: bucket 3 is most rows' favourite.
  Tensor scores = at::randn({2, 3, N, nb}, f64());
  scores.select(-1, 3).add_(1.5);
  EXPECT_TRUE(capped_argmax(scores, block, block).equal(scores.argmax(-1)));
  const int64_t cap = block / nb;
  Tensor got = capped_argmax(scores, block, cap);
  Tensor counts = block_counts(got, block, nb);
  EXPECT_LE(counts.max().item<int64_t>(), cap);
  EXPECT_TRUE(counts.slice(1, 0, N / block).eq(cap).all().item<bool>());
  // Brute force: replay each row's choice.
  Tensor s = scores.reshape({-1, N, nb});
  Tensor g = got.reshape({-1, N});
  for (int64_t r = 0; r < s.size(0); ++r) {
    std::vector<int64_t> used(nb);
    for (int64_t n = 0; n < N; ++n) {
      if (n % block == 0) std::fill(used.begin(), used.end(), 0);
      int64_t want = -1;
      for (int64_t j = 0; j < nb; ++j) {
        if (used[j] >= cap) continue;
        if (want < 0 || s[r][n][j].item<double>() > s[r][n][want].item<double>()) want = j;
      }
      ASSERT_EQ(g[r][n].item<int64_t>(), want) << "row " << r << " position " << n;
      ++used[want];
    }
  }
  // Equal scores: the first bucket with room, so position n goes to n % block / cap.
  Tensor ties = capped_argmax(at::zeros({1, N, nb}), block, cap);
  for (int64_t n = 0; n < N; ++n) EXPECT_EQ(ties[0][n].item<int64_t>(), n % block / cap);
  EXPECT_THROW(capped_argmax(scores, block, cap - 1), c10::Error);
}

// lsh_buckets with a capacity: balanced blocks, causal (a row's bucket does
// not depend on later rows), argmax where the cap does not bind.
TEST(LshCapacity, CappedBucketsAreBalancedAndCausal) {
  at::manual_seed(12);
  const int64_t N = 300, D = 16, nb = 16;
  Tensor x = at::randn({2, 3, N, D}) + at::randn({1, 3, 1, D}) * 3;  // a common direction
  Tensor r = at::randn({3, D, nb / 2});
  Tensor raw = lsh_buckets(x, r, 0);
  Tensor capped = lsh_buckets(x, r, 0, 1.0);
  const int64_t cap = lsh_bucket_capacity(1.0, nb);
  EXPECT_GT(block_counts(raw, kLshCapacityBlock, nb).max().item<int64_t>(), 2 * cap)
      << "the raw buckets should be uneven for this test to mean anything";
  EXPECT_LE(block_counts(capped, kLshCapacityBlock, nb).max().item<int64_t>(), cap);
  // The first row of each block always gets its favourite.
  for (int64_t n = 0; n < N; n += kLshCapacityBlock)
    EXPECT_TRUE(capped.select(2, n).equal(raw.select(2, n)));
  EXPECT_TRUE(lsh_buckets(x, r, 0, 100.0).equal(raw));
  // Causal: new rows after position m change nothing before it.
  for (int64_t m : {5, 128, 200}) {
    Tensor y = x.clone();
    y.slice(2, m + 1, N).normal_();
    EXPECT_TRUE(lsh_buckets(y, r, 0, 1.0).slice(2, 0, m + 1).equal(capped.slice(2, 0, m + 1)))
        << "m = " << m;
    EXPECT_TRUE(lsh_buckets(y, r, 64, 1.0).slice(2, 0, m + 1)
                    .equal(lsh_buckets(x, r, 64, 1.0).slice(2, 0, m + 1)))
        << "centred, m = " << m;
  }
}

TEST(LshCapacity, DrawPatternCapsTheBuckets) {
  const int64_t N = 256, nb = 8;
  Inputs in = random_inputs(1, 2, 2, N, N, 16, 31);
  in.q = in.q + 2.0;  // uneven raw buckets
  Options o = make_options(Kind::kHash, nb);
  o.lsh_capacity = 1;
  at::Generator gen = at::detail::createCPUGenerator(9);
  Pattern p = draw_pattern(o, in.q, in.k, gen, 0);
  EXPECT_LE(block_counts(p.q_bucket, kLshCapacityBlock, nb).max().item<int64_t>(),
            lsh_bucket_capacity(1, nb));
  EXPECT_LE(block_counts(p.k_bucket, kLshCapacityBlock, nb).max().item<int64_t>(),
            lsh_bucket_capacity(1, nb));
}

// The kernel's capped assignment against capped_argmax, exactly: integer
// rows and rotations make every projection exact in any order, and many
// scores tie, so the tie rule is checked too. nb 8, 16, 64 (a full warp of
// bucket pairs); caps that bind and one that does not bind everywhere; N
// not a multiple of the block; a token-major view.
TEST(LshCapacity, CudaKernelMatchesCappedArgmaxExactly) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  at::manual_seed(13);
  const int64_t B = 2, N = 333, H = 4, D = 64;
  for (auto dtype : {at::kBFloat16, at::kHalf})
    for (auto [nb, capacity] : std::vector<std::pair<int64_t, double>>{{8, 1}, {16, 1}, {16, 1.5}, {64, 1}, {64, 3}}) {
      Tensor x = at::randint(-3, 4, {B, N, H, D}).to(dtype).transpose(1, 2);
      Tensor r = at::randint(-2, 3, {2, D, nb / 2}).to(at::kFloat);
      Tensor cuda = x.cuda();
      ASSERT_TRUE(flash_lsh_supported(cuda, r));
      Tensor got = lsh_buckets(cuda, r, 0, capacity).cpu();
      Tensor proj = at::matmul(x.to(at::kDouble), r.to(at::kDouble).repeat_interleave(2, 0).unsqueeze(0));
      Tensor want = capped_argmax(at::cat({proj, -proj}, -1), kLshCapacityBlock,
                                  lsh_bucket_capacity(capacity, nb));
      EXPECT_TRUE(got.equal(want)) << "nb " << nb << " capacity " << capacity << ": "
                                   << got.ne(want).sum().item<int64_t>() << " rows differ";
    }
}

// Centred and capped on CUDA, against float64 on the centred rows: every
// block within the cap, and the same buckets but for near-ties (and the rows
// after one in its block, whose room changed).
TEST(LshCapacity, CudaCentredCappedMatchesFloat64) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  at::manual_seed(14);
  const int64_t B = 2, N = 777, H = 4, D = 64, nb = 16, block = 128;
  Tensor x = (at::randn({B, N, H, D}) + at::randn({1, 1, H, D}) * 4.0).to(at::kBFloat16).transpose(1, 2);
  Tensor r = at::randn({2, D, nb / 2});
  Tensor got = lsh_buckets(x.cuda(), r, block, 1.0).cpu();
  const int64_t cap = lsh_bucket_capacity(1.0, nb);
  EXPECT_LE(block_counts(got, kLshCapacityBlock, nb).max().item<int64_t>(), cap);
  Tensor centred = center_by_earlier_blocks(x.to(at::kDouble), block);
  Tensor proj = at::matmul(centred, r.to(at::kDouble).repeat_interleave(2, 0).unsqueeze(0));
  Tensor want = capped_argmax(at::cat({proj, -proj}, -1), kLshCapacityBlock, cap);
  EXPECT_GE(got.eq(want).to(at::kDouble).mean().item<double>(), 0.95);
}

TEST(HashAttention, QueryAttendsOnlyToEarlierKeysOfItsBucket) {
  const int64_t N = 40, D = 8;
  Inputs in = random_inputs(1, 2, 2, N, N, D, 21);
  at::Generator gen = at::detail::createCPUGenerator(9);
  Pattern p = draw_pattern(make_options(Kind::kHash, 4), in.q, in.k, gen, 0);
  Tensor out = reference_attention(in.q, in.k, in.v, p, 16);
  const double scale = 1 / std::sqrt(double(D));
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < N; ++i) {
      // Softmax over the keys that share the query's bucket and come no later.
      const int64_t qb = p.q_bucket[0][h][i].item<int64_t>();
      Tensor expected = at::zeros({D}, f64());
      double norm = 0;
      std::vector<std::pair<double, int64_t>> scores;
      for (int64_t j = 0; j <= i; ++j)
        if (p.k_bucket[0][h][j].item<int64_t>() == qb)
          scores.push_back({(in.q[0][h][i] * in.k[0][h][j]).sum().item<double>() * scale, j});
      double m = -1e300;
      for (auto& s : scores) m = std::max(m, s.first);
      for (auto& s : scores) {
        const double e = std::exp(s.first - m);
        norm += e;
        expected += e * in.v[0][h][s.second];
      }
      if (norm > 0) expected /= norm;
      expect_close(out[0][h][i], expected, 1e-8, "row");
    }
}

TEST(HashAttention, RotationsRedrawnUnlessFixed) {
  Inputs in = random_inputs(1, 2, 2, 64, 64, 16, 4);
  at::Generator gen = at::detail::createCPUGenerator(1);
  Options o = make_options(Kind::kHash, 8);
  Tensor a = draw_pattern(o, in.q, in.k, gen, 0).q_bucket;
  Tensor b = draw_pattern(o, in.q, in.k, gen, 0).q_bucket;
  EXPECT_FALSE(a.equal(b)) << "rotation was not redrawn";
  o.fixed_rotation = true;
  Tensor c = draw_pattern(o, in.q, in.k, gen, 0).q_bucket;
  Tensor d = draw_pattern(o, in.q, in.k, gen, 0).q_bucket;
  EXPECT_TRUE(c.equal(d));
  EXPECT_FALSE(c.equal(draw_pattern(o, in.q, in.k, gen, 1).q_bucket)) << "layers share R";
  o.shared_qk = true;
  Pattern s = draw_pattern(o, in.q, in.k, gen, 0);
  EXPECT_TRUE(s.q_bucket.equal(s.k_bucket));
}

TEST(DropAttention, DroppedQueriesGiveZeroAndDroppedKeysAreIgnored) {
  const int64_t N = 64;
  Inputs in = random_inputs(2, 2, 2, N, N, 8, 31);
  at::Generator gen = at::detail::createCPUGenerator(2);
  Pattern p = draw_pattern(make_options(Kind::kDrop, 2, 0.5), in.q, in.k, gen, 0);
  const double kept = p.q_keep.to(at::kDouble).mean().item<double>();
  EXPECT_GT(kept, 0.3);
  EXPECT_LT(kept, 0.7);
  Tensor q = in.q.clone().requires_grad_();
  Tensor out = reference_attention(q, in.k, in.v, p, 16);
  out.sum().backward();
  Tensor dropped = p.q_keep.logical_not().unsqueeze(-1).expand_as(out);
  EXPECT_EQ(out.masked_select(dropped).abs().max().item<double>(), 0.0);
  EXPECT_EQ(q.grad().masked_select(dropped).abs().max().item<double>(), 0.0);
  // Changing the values of dropped keys changes nothing.
  Tensor v2 = in.v.clone();
  v2.masked_fill_(p.k_keep.logical_not().unsqueeze(-1).expand_as(v2), 1e3);
  expect_close(reference_attention(in.q, in.k, v2, p, 16), out.detach(), 0, "out");
}

// S2-Attn's mask from its definition: causal, same group of G positions,
// groups shifted by G / 2 on the upper half of the key heads (and the query
// heads that read them); queries bottom-right aligned.
Tensor shift_mask(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t G) {
  Tensor m = at::zeros({B, H, Nq, Nk}, at::kBool);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t j_head = h / (H / Hkv);
    const int64_t s = Hkv >= 2 && j_head >= Hkv / 2 ? G / 2 : 0;
    for (int64_t i = 0; i < Nq; ++i) {
      const int64_t pi = i + Nk - Nq;
      for (int64_t j = 0; j <= pi; ++j)
        if ((pi + s) / G == (j + s) / G) m.index_put_({at::indexing::Slice(), h, i, j}, true);
    }
  }
  return m;
}

TEST(ShiftAttention, GroupsAndTheShiftedHalfFollowTheDefinition) {
  struct Case {
    int64_t H, Hkv, Nq, Nk, G;
  };
  // G = 0: a quarter of the keys, rounded up (23 -> 6, 40 -> 10).
  for (Case c : {Case{4, 2, 23, 23, 6}, Case{6, 3, 23, 23, 5}, Case{4, 4, 17, 40, 0},
                 Case{2, 2, 23, 23, 0}, Case{3, 1, 9, 9, 4}, Case{2, 2, 5, 5, 1}}) {
    Pattern p = shift_groups(2, c.H, c.Hkv, c.Nq, c.Nk, c.G, at::kCPU);
    const int64_t G = c.G > 0 ? c.G : (c.Nk + 3) / 4;
    Tensor got = allowed_mask(p, 2, c.H, c.Nq, c.Nk, f64());
    EXPECT_TRUE(at::equal(got, shift_mask(2, c.H, c.Hkv, c.Nq, c.Nk, G)))
        << "H " << c.H << " Hkv " << c.Hkv << " Nq " << c.Nq << " Nk " << c.Nk << " G " << G;
    EXPECT_GT(p.num_buckets, std::max(p.q_bucket.max().item<int64_t>(),
                                      p.k_bucket.max().item<int64_t>()));
    EXPECT_TRUE(pattern_density(p).item<double>() > 0);
  }
  EXPECT_THROW(shift_groups(1, 3, 2, 4, 4, 2, at::kCPU), c10::Error);  // H not a multiple
  EXPECT_THROW(shift_groups(1, 2, 2, 5, 4, 2, at::kCPU), c10::Error);  // Nq > Nk
}

// With one key head, Attention gives each half of the query heads its own
// copy of the keys, the second half shifted: the result of two key heads.
TEST(ShiftAttention, OneKeyHeadIsSplitBetweenPlainAndShiftedQueryHeads) {
  const int64_t N = 31, G = 8;
  Inputs in = random_inputs(2, 4, 1, N, N, 8, 13);
  Options o = make_options(Kind::kShift, 2, 0.5, G);
  o.backend = Backend::kReference;
  Attention attn(o, 0);
  at::Generator gen = at::detail::createCPUGenerator(1);
  Tensor out = attn.forward(in.q, in.k, in.v, gen);
  Tensor k2 = in.k.expand({2, 2, N, 8}), v2 = in.v.expand({2, 2, N, 8});
  Tensor mask = shift_mask(2, 4, 2, N, N, G);
  Tensor scores = at::matmul(in.q, k2.repeat_interleave(2, 1).transpose(-1, -2)) / std::sqrt(8.0);
  Tensor prob = at::softmax(scores.masked_fill(mask.logical_not(), -INFINITY), -1);
  expect_close(out, at::matmul(prob, v2.repeat_interleave(2, 1)), 1e-12, "out");
  // The shifted half sees other groups than the plain half.
  EXPECT_FALSE(at::equal(mask.select(1, 0), mask.select(1, 3)));
}

TEST(ReferenceAttention, RowsWithoutAllowedKeyAreZeroNotNan) {
  // Query 0 with its key dropped has nothing to attend to; so has every query
  // whose bucket has no earlier key.
  Inputs in = random_inputs(1, 1, 1, 5, 5, 4, 41);
  Pattern p;
  p.q_bucket = at::tensor({0, 1, 0, 2, 1}, at::kLong).view({1, 1, 5});
  p.k_bucket = at::tensor({3, 1, 3, 0, 1}, at::kLong).view({1, 1, 5});
  Tensor q = in.q.clone().requires_grad_(), k = in.k.clone().requires_grad_(),
         v = in.v.clone().requires_grad_();
  Tensor out = reference_attention(q, k, v, p, 2);
  out.sum().backward();
  for (int64_t i : {0, 2, 3}) EXPECT_EQ(out[0][0][i].abs().sum().item<double>(), 0.0) << i;
  EXPECT_GT(out[0][0][1].abs().sum().item<double>(), 0.0);
  for (const Tensor& g : {q.grad(), k.grad(), v.grad()})
    EXPECT_FALSE(at::isnan(g).any().item<bool>());
  auto [o2, lse] = reference_attention_with_lse(in.q, in.k, in.v, p, 2);
  EXPECT_TRUE(std::isinf(lse[0][0][0].item<float>()));
  EXPECT_FALSE(std::isinf(lse[0][0][1].item<float>()));
}

TEST(ReferenceAttention, ChunkSizeDoesNotChangeResult) {
  Inputs in = random_inputs(1, 2, 2, 100, 100, 8, 51);
  at::Generator gen = at::detail::createCPUGenerator(8);
  Pattern p = draw_pattern(make_options(Kind::kHash, 4), in.q, in.k, gen, 0);
  expect_close(reference_attention(in.q, in.k, in.v, p, 1),
               reference_attention(in.q, in.k, in.v, p, 4096), 1e-8, "chunk 1 vs 4096");
}

TEST(ReferenceAttention, RejectsBadShapesWithNamedArgument) {
  Inputs in = random_inputs(1, 3, 2, 8, 8, 4, 1);
  Pattern p;
  try {
    reference_attention(in.q, in.k, in.v, p);
    FAIL() << "3 query heads over 2 key heads accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("query heads"), std::string::npos) << e.what();
  }
}

TEST(ReferenceAttentionGpu, Bf16MatchesFloat64OnCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  for (Kind kind : {Kind::kDense, Kind::kHash, Kind::kDrop, Kind::kShift}) {
    Inputs in = random_inputs(2, 4, 2, 1000, 1000, 64, 61);
    at::Generator gen = at::detail::createCPUGenerator(4);
    Pattern p = draw_pattern(make_options(kind, 8), in.q, in.k, gen, 0);
    Tensor w = at::randn({2, 4, 1000, 64}, f64());
    auto cuda_opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    Inputs g{in.q.to(cuda_opts), in.k.to(cuda_opts), in.v.to(cuda_opts)};
    Pattern pg{p.q_bucket.defined() ? p.q_bucket.cuda() : Tensor(),
               p.k_bucket.defined() ? p.k_bucket.cuda() : Tensor(),
               p.q_keep.defined() ? p.q_keep.cuda() : Tensor(),
               p.k_keep.defined() ? p.k_keep.cuda() : Tensor()};
    // Compare against float64 on the same bf16-rounded inputs.
    Inputs rounded{g.q.cpu().to(at::kDouble), g.k.cpu().to(at::kDouble), g.v.cpu().to(at::kDouble)};
    auto ref = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return reference_attention(q, k, v, p, 256);
        },
        rounded, w);
    auto gpu = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return reference_attention(q, k, v, pg, 256);
        },
        g, w.to(cuda_opts));
    // bf16 output rounding (2^-8 relative) dominates.
    expect_close(std::get<0>(gpu).cpu(), std::get<0>(ref), 2e-2, "out");
    expect_close(std::get<1>(gpu).cpu(), std::get<1>(ref), 5e-2, "dq");
    expect_close(std::get<2>(gpu).cpu(), std::get<2>(ref), 5e-2, "dk");
    expect_close(std::get<3>(gpu).cpu(), std::get<3>(ref), 5e-2, "dv");
  }
}

// The CUDA kernels behind the interface, against the float64 reference on the
// same bf16-rounded inputs and the same pattern: every kind, both head dims,
// GQA, Nq < Nk, forward and all three gradients.
class FlashVsReference : public ::testing::TestWithParam<std::tuple<Kind, int64_t>> {};

TEST_P(FlashVsReference, ForwardAndGradientsMatch) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  auto [kind, D] = GetParam();
  for (auto [Nq, Nk] : {std::pair<int64_t, int64_t>{1000, 1000}, {77, 300}}) {
    Inputs in = random_inputs(2, 4, 2, Nq, Nk, D, 71 + Nq);
    at::Generator gen = at::detail::createCPUGenerator(6);
    // Shift: groups of 96, which divide neither length.
    Pattern p = draw_pattern(make_options(kind, 16, 0.5, 96), in.q, in.k, gen, 0);
    auto cuda_opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    Inputs g{in.q.to(cuda_opts), in.k.to(cuda_opts), in.v.to(cuda_opts)};
    ASSERT_TRUE(flash_supported(g.q, g.k, g.v));
    Pattern pg = p;
    for (Tensor* t : {&pg.q_bucket, &pg.k_bucket, &pg.q_keep, &pg.k_keep})
      if (t->defined()) *t = t->cuda();
    Inputs rounded{g.q.cpu().to(at::kDouble), g.k.cpu().to(at::kDouble), g.v.cpu().to(at::kDouble)};
    Tensor w = at::randn({2, 4, Nq, D}, f64());
    auto ref = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return reference_attention(q, k, v, p, 256);
        },
        rounded, w);
    // dQ by atomics (the default) and by the deterministic pass; the
    // deterministic backward twice gives the same bits.
    std::vector<Tensor> first_det;
    for (bool deterministic : {false, true, true}) {
      auto got = run_with_grads(
          [&](const Tensor& q, const Tensor& k, const Tensor& v) {
            return flash_attention(q, k, v, pg, 0, deterministic);
          },
          g, w.to(cuda_opts));
      const std::string what = "Nq " + std::to_string(Nq) +
                               (deterministic ? " deterministic " : " atomic dQ ");
      expect_close(std::get<0>(got).cpu(), std::get<0>(ref), 2e-2, what + "out");
      expect_close(std::get<1>(got).cpu(), std::get<1>(ref), 5e-2, what + "dq");
      expect_close(std::get<2>(got).cpu(), std::get<2>(ref), 5e-2, what + "dk");
      expect_close(std::get<3>(got).cpu(), std::get<3>(ref), 5e-2, what + "dv");
      if (!deterministic) continue;
      std::vector<Tensor> grads{std::get<1>(got), std::get<2>(got), std::get<3>(got)};
      if (first_det.empty()) {
        first_det = grads;
      } else {
        for (size_t i = 0; i < grads.size(); ++i)
          EXPECT_TRUE(at::equal(grads[i], first_det[i])) << what << "gradient " << i
                                                         << " differs between two runs";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(KindsAndHeadDims, FlashVsReference,
                         ::testing::Combine(::testing::Values(Kind::kDense, Kind::kHash,
                                                              Kind::kDrop, Kind::kShift),
                                            ::testing::Values(int64_t{64}, int64_t{128})));

// Views whose rows are not 16-byte aligned are used through contiguous
// copies: the results of the contiguous tensors, gradients included
// (dropping; q, k, v and the output gradient all such views). Two cases: one
// element into a wider buffer (a misaligned address), and a row stride of
// D + 4 elements (a misaligned stride). Deterministic dQ gives the same bits;
// atomic dQ the same values up to the order of its additions.
TEST(FlashAttention, MisalignedViewsGiveTheContiguousResult) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const int64_t B = 2, H = 2, N = 300, D = 64;
  Pattern p;
  p.q_keep = at::rand({B, H, N}, bf.dtype(at::kFloat)).ge(0.4);
  p.k_keep = at::rand({B, H, N}, bf.dtype(at::kFloat)).ge(0.4);
  for (auto [width, offset] : {std::pair<int64_t, int64_t>{D + 8, 1}, {D + 4, 0}}) {
    const Tensor wide_q = at::randn({B, H, N, width}, bf), wide_k = at::randn({B, H, N, width}, bf),
                 wide_v = at::randn({B, H, N, width}, bf), wide_w = at::randn({B, H, N, width}, bf);
    // view: q, k, v and the output's weights are views of wide leaves.
    auto run = [&](bool view, bool deterministic) {
      std::vector<Tensor> leaves, in;
      for (const Tensor* x : {&wide_q, &wide_k, &wide_v}) {
        Tensor leaf = (view ? x->clone() : x->narrow(3, offset, D).contiguous()).requires_grad_();
        in.push_back(view ? leaf.narrow(3, offset, D) : leaf);
        leaves.push_back(leaf);
      }
      const Tensor w = view ? wide_w.narrow(3, offset, D) : wide_w.narrow(3, offset, D).contiguous();
      const bool misaligned = reinterpret_cast<uintptr_t>(in[0].data_ptr()) % 16 != 0 ||
                              in[0].stride(2) % 8 != 0;
      EXPECT_EQ(misaligned, view);
      Tensor out = flash_attention(in[0], in[1], in[2], p, 0, deterministic);
      (out * w).sum().backward();  // the output gradient is w itself
      std::vector<Tensor> r{out.detach()};
      for (const Tensor& leaf : leaves)
        r.push_back(view ? leaf.grad().narrow(3, offset, D) : leaf.grad());
      return r;
    };
    const char* names[] = {"out", "dq", "dk", "dv"};
    for (bool deterministic : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "width " << width << " offset " << offset
                                        << (deterministic ? " deterministic" : " atomic dQ"));
      const std::vector<Tensor> got = run(true, deterministic), want = run(false, deterministic);
      for (size_t i = 0; i < got.size(); ++i) {
        if (deterministic || i != 1)
          EXPECT_TRUE(at::equal(got[i], want[i])) << names[i] << " differs from the contiguous run";
        else  // one bf16 rounding step apart at most
          expect_close(got[i].cpu(), want[i].cpu(),
                       1e-2 * (1 + want[i].abs().max().item<double>()), "dq");
      }
    }
  }
}

TEST(FlashAttention, NotUsedOnCpuOrFloat32) {
  Inputs in = random_inputs(1, 2, 2, 8, 8, 64, 1, at::TensorOptions().dtype(at::kFloat));
  EXPECT_FALSE(flash_supported(in.q, in.k, in.v));
  if (!torch::cuda::is_available()) return;
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  EXPECT_FALSE(flash_supported(in.q.to(f32), in.k.to(f32), in.v.to(f32)));
  auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  Inputs odd = random_inputs(1, 2, 2, 8, 8, 48, 1, bf);
  EXPECT_FALSE(flash_supported(odd.q, odd.k, odd.v)) << "head dim 48 has no kernel";
}


// ---------------------------------------------------------------------------
// sinks and a local window on top of a sparse pattern

Options local_options(Kind kind, int64_t sinks, int64_t window) {
  Options o = make_options(kind, 8, 0.6, 24);
  o.sink_tokens = sinks;
  o.local_window = window;
  return o;
}

// The mask is the definition: causal, and (the kind's constraint, or a sink,
// or within the window), checked pair by pair on a small case.
TEST(LocalWindow, MaskIsConstraintOrSinkOrWindow) {
  Inputs in = random_inputs(1, 2, 1, 40, 50, 8, 3);
  at::Generator gen = at::detail::createCPUGenerator(4);
  Pattern p = draw_pattern(local_options(Kind::kHash, 3, 5), in.q, in.k, gen, 0);
  ASSERT_EQ(p.sink_tokens, 3);
  ASSERT_EQ(p.local_window, 5);
  Tensor mask = allowed_mask(p, 1, 2, 40, 50, f64());
  auto qb = p.q_bucket.accessor<int64_t, 3>();
  auto kb = p.k_bucket.accessor<int64_t, 3>();
  int64_t local_only = 0;
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 40; ++i)
      for (int64_t j = 0; j < 50; ++j) {
        const int64_t qpos = i + 10;
        const bool same = qb[0][h][i] == kb[0][0][j];
        const bool local = j < 3 || qpos - j < 5;
        const bool want = qpos >= j && (same || local);
        local_only += want && !same;
        ASSERT_EQ(mask[0][h][i][j].item<bool>(), want) << "h " << h << " i " << i << " j " << j;
      }
  EXPECT_GT(local_only, 40) << "the case should hold pairs that only the sinks or window allow";
}

// The reference under a pattern with sinks and a window equals naive masked
// attention (forward and gradients), for each sparse kind, GQA and Nq < Nk.
TEST(LocalWindow, ReferenceMatchesNaive) {
  for (Kind kind : {Kind::kHash, Kind::kDrop, Kind::kShift}) {
    Inputs in = random_inputs(2, 4, 2, 37, 61, 16, 11);
    at::Generator gen = at::detail::createCPUGenerator(12);
    Pattern p = draw_pattern(local_options(kind, 2, 7), in.q, in.k, gen, 0);
    Tensor w = at::randn({2, 4, 37, 16}, f64());
    auto naive = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return naive_attention(q, k, v, p);
        },
        in, w);
    auto ref = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return reference_attention(q, k, v, p, 16);
        },
        in, w);
    const std::string what = "kind " + std::to_string(static_cast<int>(kind)) + " ";
    expect_close(std::get<0>(ref), std::get<0>(naive), 1e-10, what + "out");
    expect_close(std::get<1>(ref), std::get<1>(naive), 1e-10, what + "dq");
    expect_close(std::get<2>(ref), std::get<2>(naive), 1e-10, what + "dk");
    expect_close(std::get<3>(ref), std::get<3>(naive), 1e-10, what + "dv");
  }
}

// The split computation (the constraint's part by the reference, the sinks
// and window outside it gathered per block, merged by log-sum-exp) equals the
// reference under the whole pattern: forward and all gradients, in float64,
// over windows shorter than, equal to and longer than a block, sinks only,
// window only, lengths that divide nothing, GQA, Nq < Nk, and a drop pattern
// where every query is dropped (the output is then the local part alone).
TEST(LocalWindow, SplitAttentionMatchesReference) {
  struct Case {
    Kind kind;
    int64_t Nq, Nk, sinks, window;
  };
  for (Case c : {Case{Kind::kHash, 77, 93, 3, 10}, Case{Kind::kHash, 130, 130, 0, 64},
                 Case{Kind::kHash, 150, 150, 4, 0}, Case{Kind::kDrop, 100, 170, 1, 1},
                 Case{Kind::kDrop, 70, 70, 2, 200}, Case{Kind::kShift, 129, 129, 4, 65}}) {
    Inputs in = random_inputs(2, 6, 2, c.Nq, c.Nk, 16, 17 + c.Nq);
    at::Generator gen = at::detail::createCPUGenerator(18);
    Pattern p = draw_pattern(local_options(c.kind, c.sinks, c.window), in.q, in.k, gen, 0);
    Tensor w = at::randn({2, 6, c.Nq, 16}, f64());
    auto ref = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return reference_attention(q, k, v, p, 32);
        },
        in, w);
    auto split = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return local_attention(q, k, v, p, /*kernel=*/false, 32);
        },
        in, w);
    const std::string what = "Nq " + std::to_string(c.Nq) + " S " + std::to_string(c.sinks) +
                             " W " + std::to_string(c.window) + " ";
    expect_close(std::get<0>(split), std::get<0>(ref), 1e-10, what + "out");
    expect_close(std::get<1>(split), std::get<1>(ref), 1e-10, what + "dq");
    expect_close(std::get<2>(split), std::get<2>(ref), 1e-10, what + "dk");
    expect_close(std::get<3>(split), std::get<3>(ref), 1e-10, what + "dv");
  }
  // Every query dropped: only sinks and the window remain, and every query
  // has its own key, so no row is empty.
  Inputs in = random_inputs(1, 2, 1, 50, 50, 8, 5);
  Pattern p;
  p.q_keep = at::zeros({1, 2, 50}, at::kBool);
  p.k_keep = at::ones({1, 1, 50}, at::kBool);
  p.sink_tokens = 1;
  p.local_window = 4;
  Tensor out = local_attention(in.q, in.k, in.v, p, false);
  expect_close(out, reference_attention(in.q, in.k, in.v, p), 1e-10, "all dropped");
  EXPECT_GT(out.abs().min().item<double>(), 0) << "a dropped query still attends to its neighbours";
}

// The interface takes sink_tokens and local_window from the options and
// computes the split attention under the pattern it drew.
TEST(LocalWindow, AttentionInterfaceUsesThem) {
  Inputs in = random_inputs(2, 4, 4, 90, 90, 16, 23);
  Attention attention(local_options(Kind::kHash, 2, 16), 0);
  at::Generator gen = at::detail::createCPUGenerator(24);
  Tensor out = attention.forward(in.q, in.k, in.v, gen);
  const Pattern& p = attention.last_pattern();
  EXPECT_EQ(p.sink_tokens, 2);
  EXPECT_EQ(p.local_window, 16);
  expect_close(out, naive_attention(in.q, in.k, in.v, p), 1e-10, "out");
  // Without them the same draw gives a different (sparser) result.
  Pattern plain = p;
  plain.sink_tokens = plain.local_window = 0;
  EXPECT_GT((naive_attention(in.q, in.k, in.v, plain) - out).abs().max().item<double>(), 1e-3);
  Options dense = make_options(Kind::kDense);
  dense.local_window = 8;
  Attention dense_attention(dense, 0);
  gen = at::detail::createCPUGenerator(24);
  dense_attention.forward(in.q, in.k, in.v, gen);
  EXPECT_FALSE(dense_attention.last_pattern().has_local()) << "dense needs no window";
}

// The kernels for the constraint's part, on the GPU: against the float64
// reference under the whole pattern (same bf16-rounded inputs), forward and
// gradients, hash and drop, both head dims, GQA, Nq < Nk.
TEST(LocalWindowGpu, KernelSplitMatchesReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  setenv("SPARSEFLASH_LOCAL_KERNELS", "0", 1);  // part B on LibTorch (attention/local.cc)
  for (Kind kind : {Kind::kHash, Kind::kDrop}) {
    for (int64_t D : {64, 128}) {
      for (auto [Nq, Nk] : {std::pair<int64_t, int64_t>{1000, 1000}, {77, 300}}) {
        Inputs in = random_inputs(2, 4, 2, Nq, Nk, D, 91 + Nq);
        at::Generator gen = at::detail::createCPUGenerator(9);
        Options o = local_options(kind, 4, 64);
        o.num_buckets = 16;
        Pattern p = draw_pattern(o, in.q, in.k, gen, 0);
        auto cuda_opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
        Inputs g{in.q.to(cuda_opts), in.k.to(cuda_opts), in.v.to(cuda_opts)};
        ASSERT_TRUE(flash_supported(g.q, g.k, g.v));
        Pattern pg = p;
        for (Tensor* t : {&pg.q_bucket, &pg.k_bucket, &pg.q_keep, &pg.k_keep})
          if (t->defined()) *t = t->cuda();
        Inputs rounded{g.q.cpu().to(at::kDouble), g.k.cpu().to(at::kDouble),
                       g.v.cpu().to(at::kDouble)};
        Tensor w = at::randn({2, 4, Nq, D}, f64());
        auto ref = run_with_grads(
            [&](const Tensor& q, const Tensor& k, const Tensor& v) {
              return reference_attention(q, k, v, p, 256);
            },
            rounded, w);
        auto got = run_with_grads(
            [&](const Tensor& q, const Tensor& k, const Tensor& v) {
              return local_attention(q, k, v, pg, /*kernel=*/true);
            },
            g, w.to(cuda_opts));
        const std::string what = "kind " + std::to_string(static_cast<int>(kind)) + " D " +
                                 std::to_string(D) + " Nq " + std::to_string(Nq) + " ";
        expect_close(std::get<0>(got).cpu(), std::get<0>(ref), 2e-2, what + "out");
        expect_close(std::get<1>(got).cpu(), std::get<1>(ref), 5e-2, what + "dq");
        expect_close(std::get<2>(got).cpu(), std::get<2>(ref), 5e-2, what + "dk");
        expect_close(std::get<3>(got).cpu(), std::get<3>(ref), 5e-2, what + "dv");
      }
    }
  }
}

// The local kernels (attention/kernels/local_band.h) over the geometry
// their blocks must get right: sinks only, windows of 1, just under and over
// one chunk, longer than a block; more sinks than one chunk; fewer queries
// than keys (the last block padded); every kind; float16 and bfloat16.
TEST(LocalWindowGpu, LocalKernelsMatchReferenceAcrossGeometry) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  setenv("SPARSEFLASH_LOCAL_KERNELS", "1", 1);  // the default; a test before may have set 0
  struct Case {
    Kind kind;
    int64_t sinks, window, Nq, Nk, D;
    at::ScalarType dtype;
  };
  const Case cases[] = {
      {Kind::kHash, 4, 0, 333, 333, 64, at::kBFloat16},
      {Kind::kHash, 0, 1, 200, 257, 64, at::kBFloat16},
      {Kind::kHash, 3, 63, 300, 300, 128, at::kHalf},
      {Kind::kDrop, 70, 65, 190, 411, 64, at::kBFloat16},
      {Kind::kDrop, 1, 200, 400, 400, 128, at::kBFloat16},
      {Kind::kShift, 4, 64, 321, 321, 64, at::kHalf},
  };
  for (const Case& c : cases) {
    Inputs in = random_inputs(2, 6, 2, c.Nq, c.Nk, c.D, 7 + c.Nq + c.window);
    at::Generator gen = at::detail::createCPUGenerator(11);
    Options o = local_options(c.kind, c.sinks, c.window);
    Pattern p = draw_pattern(o, in.q, in.k, gen, 0);
    auto cuda_opts = at::TensorOptions().dtype(c.dtype).device(at::kCUDA);
    Inputs g{in.q.to(cuda_opts), in.k.to(cuda_opts), in.v.to(cuda_opts)};
    Pattern pg = p;
    for (Tensor* t : {&pg.q_bucket, &pg.k_bucket, &pg.q_keep, &pg.k_keep})
      if (t->defined()) *t = t->cuda();
    Inputs rounded{g.q.cpu().to(at::kDouble), g.k.cpu().to(at::kDouble), g.v.cpu().to(at::kDouble)};
    Tensor w = at::randn({2, 6, c.Nq, c.D}, f64());
    auto ref = run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return reference_attention(q, k, v, p, 256);
        },
        rounded, w);
    const std::string what = "kind " + std::to_string(static_cast<int>(c.kind)) + " sinks " +
                             std::to_string(c.sinks) + " window " + std::to_string(c.window) +
                             " Nq " + std::to_string(c.Nq) + " ";
    for (bool deterministic : {false, true}) {
      auto got = run_with_grads(
          [&](const Tensor& q, const Tensor& k, const Tensor& v) {
            return local_attention(q, k, v, pg, /*kernel=*/true, 1024, 0.0, deterministic);
          },
          g, w.to(cuda_opts));
      const std::string how = what + (deterministic ? "deterministic " : "");
      expect_close(std::get<0>(got).cpu(), std::get<0>(ref), 2e-2, how + "out");
      expect_close(std::get<1>(got).cpu(), std::get<1>(ref), 5e-2, how + "dq");
      expect_close(std::get<2>(got).cpu(), std::get<2>(ref), 5e-2, how + "dk");
      expect_close(std::get<3>(got).cpu(), std::get<3>(ref), 5e-2, how + "dv");
    }
    // The window and sinks matter in this case (the test could not pass with
    // part B left out): attention without them differs.
    Pattern base = p;
    base.sink_tokens = base.local_window = 0;
    Tensor without = reference_attention(rounded.q, rounded.k, rounded.v, base, 256);
    EXPECT_GT((without - std::get<0>(ref)).abs().max().item<double>(), 0.1) << what;
  }
}

// Deterministic mode: the sink keys' gradients are summed per block in a
// fixed order, so two backward passes agree bit for bit.
TEST(LocalWindowGpu, DeterministicLocalBackwardIsBitIdentical) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  setenv("SPARSEFLASH_LOCAL_KERNELS", "1", 1);
  auto cuda_opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  Inputs in = random_inputs(1, 4, 2, 2048, 2048, 64, 5);
  at::Generator gen = at::detail::createCPUGenerator(3);
  Pattern p = draw_pattern(local_options(Kind::kHash, 8, 64), in.q, in.k, gen, 0);
  for (Tensor* t : {&p.q_bucket, &p.k_bucket, &p.q_keep, &p.k_keep})
    if (t->defined()) *t = t->cuda();
  Inputs g{in.q.to(cuda_opts), in.k.to(cuda_opts), in.v.to(cuda_opts)};
  Tensor w = at::randn({1, 4, 2048, 64}, cuda_opts);
  auto run = [&] {
    return run_with_grads(
        [&](const Tensor& q, const Tensor& k, const Tensor& v) {
          return local_attention(q, k, v, p, /*kernel=*/true, 1024, 0.0, /*deterministic=*/true);
        },
        g, w);
  };
  auto a = run(), b = run();
  EXPECT_TRUE(at::equal(std::get<1>(a), std::get<1>(b)));
  EXPECT_TRUE(at::equal(std::get<2>(a), std::get<2>(b)));
  EXPECT_TRUE(at::equal(std::get<3>(a), std::get<3>(b)));
}

}  // namespace
}  // namespace sparseflash::attention
