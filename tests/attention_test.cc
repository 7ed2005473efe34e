// Reference attention against naive masked softmax attention, finite
// differences in float64, the semantics of each kind, and the CUDA kernels
// behind the autograd wrapper against the reference. LSH buckets: lsh_test;
// sinks and a local window: local_window_test.
#include "tests/attention_test_util.h"

namespace sparseflash::attention {
namespace {

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

}  // namespace
}  // namespace sparseflash::attention
