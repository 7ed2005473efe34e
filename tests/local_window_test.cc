// Sinks and a local window on top of a sparse pattern: the mask's definition,
// the reference and the split attention against naive attention, the
// interface, and the local CUDA kernels (GPU) against the reference.
#include "tests/attention_test_util.h"

namespace sparseflash::attention {
namespace {

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
  // 1e-8, not 1e-10: on the GPU host (16 cores, ctest -j2) one run out of many
  // differed by 5.9e-10 (outputs are O(1)); not reproduced on 2 cores with 1 to
  // 32 threads. A wrong sink or window changes outputs by more than 1e-3 (below).
  expect_close(out, naive_attention(in.q, in.k, in.v, p), 1e-8, "out");
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
