// LSH bucket ids (plain and capped) against a float64 projection, the bucket
// sort and tile ranges (pack_by_bucket, compute_tile_ranges), and the
// refusals of every entry point.
#include "tests/kernels/sparse_flash_test_util.cuh"

namespace sparseflash::kernels_test {
namespace {

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

}  // namespace
}  // namespace sparseflash::kernels_test
