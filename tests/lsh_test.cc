// LSH buckets: the CPU definition (scale-invariant, shared with normalised
// keys, centred by earlier blocks), the CUDA kernel against it, and capped
// buckets (attention.lsh_capacity): the rule, balance, causality, the kernel.
#include "tests/attention_test_util.h"

namespace sparseflash::attention {
namespace {

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

}  // namespace
}  // namespace sparseflash::attention
