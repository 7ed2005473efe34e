// SAAP attention at inference: the full-sequence path against dense causal
// attention (all partitions selected) and against a float64 loop over the
// definition; the partition-contiguous decode cache (layout, rebuilds,
// decode = full-sequence path on the last position); the CUDA versions of
// both (skip without a GPU). Fresh random inputs on every run.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "saap/partition_attention.h"

namespace sparseflash::saap {
namespace {

using torch::Tensor;

uint64_t fresh_seed() { return std::random_device{}(); }

// The error message of fn, or "" when it does not throw c10::Error.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

#define EXPECT_ERROR_NAMING(statement, word)                                  \
  do {                                                                        \
    const std::string message = error_of([&] { statement; });                 \
    EXPECT_NE(message.find(word), std::string::npos)                          \
        << #statement << " should fail naming '" << word << "', got: '" << message << "'"; \
  } while (0)

// Random selections [B, Hq, Nq, l] in [0, C), with repeats inside a row
// (duplicates) and, when `with_none`, some -1 entries.
Tensor random_selection(std::vector<int64_t> shape, int64_t num_partitions, bool with_none) {
  Tensor sel = torch::randint(num_partitions, shape, torch::kLong);
  const int64_t l = shape.back();
  if (l >= 2) {
    // Every third row repeats its first entry in its last slot.
    Tensor rows = sel.view({-1, l});
    Tensor idx = torch::arange(0, rows.size(0), 3);
    rows.index_put_({idx, l - 1}, rows.index({idx, 0}));
  }
  if (with_none) sel.masked_fill_(torch::rand(shape) < 0.1, -1);
  return sel;
}

// Every query selects all C partitions, in a random order per query.
Tensor all_partitions(std::vector<int64_t> shape_without_l, int64_t num_partitions) {
  Tensor keys = torch::rand(shape_without_l, torch::kFloat).unsqueeze(-1).expand(
                    [&] {
                      auto s = shape_without_l;
                      s.push_back(num_partitions);
                      return s;
                    }()) +
                torch::rand({num_partitions});
  return std::get<1>(keys.sort(-1));
}

// Dense causal attention in float64, queries bottom-right aligned.
Tensor dense_causal(const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t hq = q.size(1), hkv = k.size(1), nq = q.size(2), nk = k.size(2);
  Tensor kk = k.to(torch::kDouble).repeat_interleave(hq / hkv, 1);
  Tensor vv = v.to(torch::kDouble).repeat_interleave(hq / hkv, 1);
  Tensor s = torch::matmul(q.to(torch::kDouble), kk.transpose(2, 3)) / std::sqrt(double(q.size(3)));
  Tensor qpos = torch::arange(nq).unsqueeze(1) + (nk - nq);
  s.masked_fill_(torch::arange(nk).unsqueeze(0) > qpos, -INFINITY);
  return torch::matmul(torch::softmax(s, -1), vv);
}

// The definition, one query at a time, in float64. Also counts the pairs.
Tensor brute_force(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& part,
                   const Tensor& sel, const SaapAttentionOptions& o, SaapVisitStats* stats) {
  const int64_t b_n = q.size(0), hq = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), nk = k.size(2), group = hq / hkv;
  Tensor qd = q.to(torch::kDouble), kd = k.to(torch::kDouble), vd = v.to(torch::kDouble);
  auto pa = part.accessor<int64_t, 3>();
  auto sa = sel.accessor<int64_t, 4>();
  Tensor out = torch::zeros({b_n, hq, nq, d}, torch::kDouble);
  *stats = SaapVisitStats{};
  const double scale = 1.0 / std::sqrt(double(d));
  for (int64_t b = 0; b < b_n; ++b) {
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t p = nk - nq + i;
        std::set<int64_t> chosen;
        for (int64_t t = 0; t < sel.size(3); ++t) chosen.insert(sa[b][h][i][t]);
        std::vector<int64_t> keys;
        for (int64_t j = 0; j <= p; ++j) {
          const bool always = j < o.sink_tokens || p - j < o.local_window;
          const bool routable = !always;  // j in [sinks, p - window]
          const bool routed = routable && chosen.count(pa[b][g][j]) > 0;
          if (always || routed) keys.push_back(j);
          stats->causal_pairs += 1;
          stats->routable_pairs += routable;
          stats->routed_visited += routed;
        }
        stats->visited_pairs += keys.size();
        Tensor idx = torch::tensor(keys, torch::kLong);
        Tensor s = torch::mv(kd[b][g].index_select(0, idx), qd[b][h][i]) * scale;
        out[b][h][i] = torch::mv(vd[b][g].index_select(0, idx).t(), torch::softmax(s, 0));
      }
    }
  }
  return out;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// ---------------------------------------------------------------------------
// select_partitions

TEST(SelectPartitions, TopLByDescendingScore) {
  torch::manual_seed(fresh_seed());
  Tensor scores = torch::randn({2, 3, 5, 20});
  Tensor top = select_partitions(scores, 7);
  ASSERT_EQ(top.sizes(), torch::IntArrayRef({2, 3, 5, 7}));
  EXPECT_EQ(top.scalar_type(), torch::kLong);
  Tensor expected = std::get<1>(scores.sort(-1, /*descending=*/true)).narrow(-1, 0, 7);
  EXPECT_TRUE(torch::equal(top, expected));
  EXPECT_TRUE(torch::equal(select_partitions(scores, 20), std::get<1>(scores.sort(-1, true))));
  EXPECT_ERROR_NAMING(select_partitions(scores, 0), "l must lie in [1, C = 20]");
  EXPECT_ERROR_NAMING(select_partitions(scores, 21), "l must lie in [1, C = 20]");
  EXPECT_ERROR_NAMING(select_partitions(torch::ones({3, 4}, torch::kLong), 1), "scores");
}

// ---------------------------------------------------------------------------
// saap_attention: all partitions = dense causal attention

struct DenseCase {
  int64_t batch, q_heads, kv_heads, nq, nk, dim, partitions;
};

class SaapAllPartitions : public ::testing::TestWithParam<DenseCase> {};

TEST_P(SaapAllPartitions, EqualsDenseCausalAttention) {
  const DenseCase c = GetParam();
  torch::manual_seed(fresh_seed());
  Tensor q = torch::randn({c.batch, c.q_heads, c.nq, c.dim});
  Tensor k = torch::randn({c.batch, c.kv_heads, c.nk, c.dim}) * 1.5;
  Tensor v = torch::randn({c.batch, c.kv_heads, c.nk, c.dim});
  Tensor part = torch::randint(c.partitions, {c.batch, c.kv_heads, c.nk}, torch::kLong);
  Tensor sel = all_partitions({c.batch, c.q_heads, c.nq}, c.partitions);
  SaapAttentionOptions o;
  o.num_partitions = c.partitions;
  o.local_window = 5;
  o.sink_tokens = 3;
  o.chunk_size = 100;  // several chunks for the long cases, one for the short
  SaapVisitStats stats;
  Tensor out = saap_attention(q, k, v, part, sel, o, &stats);
  ASSERT_EQ(out.sizes(), q.sizes());
  EXPECT_EQ(out.scalar_type(), torch::kFloat);
  Tensor expected = dense_causal(q, k, v);
  EXPECT_LT(max_abs_diff(out, expected), 2e-5);
  EXPECT_EQ(stats.visited_pairs, stats.causal_pairs);
  EXPECT_EQ(stats.routed_visited, stats.routable_pairs);
  int64_t causal = 0;
  for (int64_t i = 0; i < c.nq; ++i) causal += c.nk - c.nq + i + 1;
  EXPECT_EQ(stats.causal_pairs, causal * c.batch * c.q_heads);

  // Same in bfloat16 inputs: returned in bfloat16, computed in float32.
  Tensor out16 = saap_attention(q.to(torch::kBFloat16), k.to(torch::kBFloat16),
                                v.to(torch::kBFloat16), part, sel, o);
  EXPECT_EQ(out16.scalar_type(), torch::kBFloat16);
  Tensor expected16 = dense_causal(q.to(torch::kBFloat16), k.to(torch::kBFloat16),
                                   v.to(torch::kBFloat16));
  EXPECT_LT(max_abs_diff(out16, expected16), 2e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SaapAllPartitions,
    ::testing::Values(DenseCase{1, 2, 2, 1, 1, 16, 4},       // a single token
                      DenseCase{2, 6, 2, 127, 127, 32, 8},   // GQA, odd length
                      DenseCase{1, 4, 1, 1000, 1000, 16, 16},
                      DenseCase{2, 6, 3, 37, 203, 24, 5},    // Nq < Nk
                      DenseCase{1, 3, 3, 1, 300, 8, 7}),     // one query at the end
    [](const auto& info) {
      const DenseCase& c = info.param;
      return "B" + std::to_string(c.batch) + "Hq" + std::to_string(c.q_heads) + "Hkv" +
             std::to_string(c.kv_heads) + "Nq" + std::to_string(c.nq) + "Nk" +
             std::to_string(c.nk);
    });

// ---------------------------------------------------------------------------
// saap_attention: l < C against the definition

TEST(SaapAttention, MatchesAFloat64LoopOverTheDefinition) {
  torch::manual_seed(fresh_seed());
  const int64_t batch = 2, hq = 6, hkv = 2, nk = 61, nq = 45, d = 8, num_partitions = 5;
  for (int64_t l : {1, 2, 3}) {
    Tensor q = torch::randn({batch, hq, nq, d});
    Tensor k = torch::randn({batch, hkv, nk, d}) * 2;
    Tensor v = torch::randn({batch, hkv, nk, d});
    Tensor part = torch::randint(num_partitions, {batch, hkv, nk}, torch::kLong);
    Tensor sel = random_selection({batch, hq, nq, l}, num_partitions, /*with_none=*/l > 1);
    SaapAttentionOptions o;
    o.num_partitions = num_partitions;
    o.local_window = 5;
    o.sink_tokens = 3;
    o.chunk_size = 7;
    SaapVisitStats stats, expected_stats;
    Tensor expected = brute_force(q, k, v, part, sel, o, &expected_stats);
    Tensor out = saap_attention(q, k, v, part, sel, o, &stats);
    EXPECT_LT(max_abs_diff(out, expected), 1e-5) << "l = " << l;
    EXPECT_EQ(stats.visited_pairs, expected_stats.visited_pairs) << "l = " << l;
    EXPECT_EQ(stats.causal_pairs, expected_stats.causal_pairs);
    EXPECT_EQ(stats.routed_visited, expected_stats.routed_visited) << "l = " << l;
    EXPECT_EQ(stats.routable_pairs, expected_stats.routable_pairs);
    EXPECT_LT(stats.visited_pairs, stats.causal_pairs);
    // int32 ids and float64 inputs: same answer, float64 accuracy.
    Tensor out64 = saap_attention(q.to(torch::kDouble), k.to(torch::kDouble), v.to(torch::kDouble),
                                  part.to(torch::kInt), sel.to(torch::kInt), o);
    EXPECT_EQ(out64.scalar_type(), torch::kDouble);
    EXPECT_LT(max_abs_diff(out64, expected), 1e-10) << "l = " << l;
  }
}

TEST(SaapAttention, WindowLongerThanTheSequenceIsDense) {
  torch::manual_seed(fresh_seed());
  Tensor q = torch::randn({1, 2, 20, 16}), k = torch::randn({1, 1, 20, 16});
  Tensor v = torch::randn({1, 1, 20, 16});
  Tensor part = torch::randint(4, {1, 1, 20}, torch::kLong);
  Tensor sel = torch::zeros({1, 2, 20, 1}, torch::kLong);  // one partition only
  SaapAttentionOptions o;
  o.num_partitions = 4;
  o.local_window = 64;
  SaapVisitStats stats;
  EXPECT_LT(max_abs_diff(saap_attention(q, k, v, part, sel, o, &stats), dense_causal(q, k, v)),
            2e-5);
  EXPECT_EQ(stats.routable_pairs, 0);
  EXPECT_EQ(stats.visited_pairs, stats.causal_pairs);
}

TEST(SaapAttention, RejectsBadArgumentsNamingThem) {
  torch::manual_seed(fresh_seed());
  Tensor q = torch::randn({1, 4, 5, 8}), k = torch::randn({1, 2, 9, 8}), v = torch::randn({1, 2, 9, 8});
  Tensor part = torch::randint(3, {1, 2, 9}, torch::kLong);
  Tensor sel = torch::randint(3, {1, 4, 5, 2}, torch::kLong);
  SaapAttentionOptions o;
  o.num_partitions = 3;
  o.local_window = 2;
  o.sink_tokens = 1;
  EXPECT_NO_THROW(saap_attention(q, k, v, part, sel, o));
  EXPECT_ERROR_NAMING(saap_attention(q[0], k, v, part, sel, o), "q must be");
  EXPECT_ERROR_NAMING(saap_attention(q, k[0], v, part, sel, o), "k must be");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v.narrow(2, 0, 8), part, sel, o), "v must have");
  EXPECT_ERROR_NAMING(saap_attention(q, torch::randn({1, 3, 9, 8}), torch::randn({1, 3, 9, 8}),
                                     torch::randint(3, {1, 3, 9}, torch::kLong), sel, o),
                      "not a multiple of KV heads");
  EXPECT_ERROR_NAMING(saap_attention(q, k.narrow(2, 0, 4), v.narrow(2, 0, 4),
                                     part.narrow(2, 0, 4), sel, o),
                      "more queries");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part.to(torch::kFloat), sel, o), "key_partition");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part.narrow(2, 0, 8), sel, o), "key_partition");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel.narrow(1, 0, 2), o), "selected");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel.to(torch::kFloat), o), "selected");
  EXPECT_ERROR_NAMING(saap_attention(q.to(torch::kLong), k, v, part, sel, o), "q must be floating");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part + 3, sel, o), "key_partition ids");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel - 2, o), "selected ids");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel + 3, o), "selected ids");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, torch::zeros({1, 4, 5, 4}, torch::kLong), o),
                      "more than C");
  SaapAttentionOptions bad = o;
  bad.local_window = 0;
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel, bad), "local_window");
  bad = o;
  bad.num_partitions = 0;
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel, bad), "num_partitions");
  bad = o;
  bad.sink_tokens = -1;
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel, bad), "sink_tokens");
  bad = o;
  bad.chunk_size = 0;
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, part, sel, bad), "chunk_size");
  EXPECT_ERROR_NAMING(saap_attention(q, k, v, Tensor(), sel, o), "must all be defined");
}

// ---------------------------------------------------------------------------
// PartitionedKVCache

struct CacheSetup {
  int64_t batch = 2, kv_heads = 2, q_heads = 6, dim = 16, partitions = 6;
  SaapAttentionOptions options;
  CacheSetup() {
    options.local_window = 8;
    options.sink_tokens = 3;
  }
};

// Keys drawn around the centroids (so every partition gets keys, unevenly).
struct Sequence {
  Tensor k_pre, k_rope, v;  // [B, Hkv, T, D]
};

Sequence random_sequence(const Tensor& centroids, int64_t batch, int64_t length) {
  const int64_t hkv = centroids.size(0), c = centroids.size(1), d = centroids.size(2);
  // Uneven partition sizes: cluster ids drawn with weights 1 .. C.
  Tensor weights = torch::arange(1, c + 1, torch::kDouble).expand({batch * hkv * length, c});
  Tensor cluster = torch::multinomial(weights, 1, true).view({batch, hkv, length});
  Tensor centre = centroids.unsqueeze(0).expand({batch, hkv, c, d})
                      .gather(2, cluster.unsqueeze(-1).expand({batch, hkv, length, d}));
  Sequence s;
  s.k_pre = centre + torch::randn({batch, hkv, length, d}) * 0.7;
  s.k_rope = torch::randn({batch, hkv, length, d});  // RoPE'd keys: any values
  s.v = torch::randn({batch, hkv, length, d});
  return s;
}

// Nearest centroid of every key in float64: [B, Hkv, T].
Tensor nearest_centroid(const Tensor& k_pre, const Tensor& centroids) {
  Tensor diff = k_pre.to(torch::kDouble).unsqueeze(3) -
                centroids.to(torch::kDouble).unsqueeze(0).unsqueeze(2);  // [B, Hkv, T, C, D]
  return diff.pow(2).sum(-1).argmin(-1);
}

// Every routed key (sinks <= j < T - window) is in its nearest-centroid
// partition exactly once, with its key and value; sinks and window keys are
// not in any partition; partitions do not overlap and fit their capacity.
void expect_layout(const PartitionedKVCache& cache, const Sequence& s, const Tensor& nearest,
                   int64_t length) {
  const auto& o = cache.options();
  ASSERT_EQ(cache.length(), length);
  const int64_t routed_end = std::max(o.sink_tokens, length - o.local_window);
  ASSERT_EQ(cache.routed_end(), routed_end);
  EXPECT_TRUE(torch::equal(cache.key_partition(), nearest.narrow(2, 0, length)));
  EXPECT_TRUE(torch::equal(cache.keys(), s.k_rope.narrow(2, 0, length)));
  EXPECT_TRUE(torch::equal(cache.values(), s.v.narrow(2, 0, length)));
  auto start = cache.partition_start().accessor<int32_t, 3>();
  auto len = cache.partition_length().accessor<int32_t, 3>();
  auto cap = cache.partition_capacity().accessor<int32_t, 3>();
  auto pos = cache.routed_position().accessor<int64_t, 3>();
  auto near = nearest.accessor<int64_t, 3>();
  const int64_t capacity = cache.routed_keys().size(2);
  for (int64_t b = 0; b < cache.batch(); ++b) {
    for (int64_t g = 0; g < cache.kv_heads(); ++g) {
      std::vector<int> seen(length, 0);
      int64_t previous_end = 0;
      for (int64_t c = 0; c < cache.num_partitions(); ++c) {
        ASSERT_GE(start[b][g][c], previous_end) << "partitions overlap";
        ASSERT_LE(len[b][g][c], cap[b][g][c]);
        previous_end = start[b][g][c] + cap[b][g][c];
        ASSERT_LE(previous_end, capacity);
        int64_t last = -1;
        for (int64_t r = start[b][g][c]; r < start[b][g][c] + len[b][g][c]; ++r) {
          const int64_t j = pos[b][g][r];
          ASSERT_GE(j, o.sink_tokens) << "a sink key is routed";
          ASSERT_LT(j, routed_end) << "a window key is routed";
          ASSERT_EQ(near[b][g][j], c) << "key " << j << " in partition " << c;
          ASSERT_GT(j, last) << "partition " << c << " is not in time order";
          last = j;
          seen[j] += 1;
          ASSERT_TRUE(torch::equal(cache.routed_keys()[b][g][r], s.k_rope[b][g][j]));
          ASSERT_TRUE(torch::equal(cache.routed_values()[b][g][r], s.v[b][g][j]));
        }
        EXPECT_TRUE(torch::equal(cache.partition_keys(b, g, c),
                                 cache.routed_keys()[b][g].narrow(0, start[b][g][c], len[b][g][c])));
      }
      for (int64_t j = 0; j < length; ++j) {
        const bool routed = j >= o.sink_tokens && j < routed_end;
        ASSERT_EQ(seen[j], routed ? 1 : 0) << "key " << j << " (b " << b << ", g " << g << ")";
      }
    }
  }
}

Tensor decode_via_saap_attention(const PartitionedKVCache& cache, const Tensor& q,
                                 const Tensor& sel, SaapVisitStats* stats) {
  SaapAttentionOptions o = cache.options();
  o.num_partitions = cache.num_partitions();
  return saap_attention(q.unsqueeze(2), cache.keys(), cache.values(), cache.key_partition(),
                        sel.unsqueeze(2), o, stats)
      .squeeze(2);
}

TEST(PartitionedKVCache, EveryRoutedKeyInItsNearestPartitionOnceThroughRebuilds) {
  torch::manual_seed(fresh_seed());
  CacheSetup setup;
  Tensor centroids = torch::randn({setup.kv_heads, setup.partitions, setup.dim}) * 3;
  const int64_t total = 37 + 60 + 100;
  Sequence s = random_sequence(centroids, setup.batch, total);
  Tensor nearest = nearest_centroid(s.k_pre, centroids);
  PartitionedKVCache cache(centroids, setup.batch, setup.options, torch::kFloat, torch::kCPU);
  EXPECT_EQ(cache.rebuilds(), 0);
  expect_layout(cache, s, nearest, 0);
  auto piece = [&](int64_t begin, int64_t n) {
    cache.append(s.k_pre.narrow(2, begin, n), s.k_rope.narrow(2, begin, n), s.v.narrow(2, begin, n));
  };
  piece(0, 37);  // prefill
  expect_layout(cache, s, nearest, 37);
  int64_t rebuilds_in_decode = cache.rebuilds();
  for (int64_t t = 37; t < 97; ++t) {
    piece(t, 1);
    expect_layout(cache, s, nearest, t + 1);
  }
  rebuilds_in_decode = cache.rebuilds() - rebuilds_in_decode;
  piece(97, 100);
  expect_layout(cache, s, nearest, total);
  // With 16 rows of slack per partition and ~30 keys in the biggest
  // partitions, single-token appends must have overfilled some partition.
  EXPECT_GE(rebuilds_in_decode, 1);
  EXPECT_GE(cache.rebuilds(), 2);
}

// Single-token appends with steady routing: after a rebuild at T0 every
// partition has room for a quarter more keys (and 16), so the next one comes
// only after the cache grew by a good fraction of T0: O(log T) rebuilds, each
// O(T), amortised O(1) per token.
TEST(PartitionedKVCache, RebuildsAreLogarithmicInTheLength) {
  torch::manual_seed(fresh_seed());
  const int64_t hkv = 2, d = 8, num_partitions = 16, steps = 2000;
  SaapAttentionOptions o;
  o.local_window = 4;
  o.sink_tokens = 1;
  Tensor centroids = torch::randn({hkv, num_partitions, d}) * 3;
  Sequence s = random_sequence(centroids, 1, steps);
  PartitionedKVCache cache(centroids, 1, o, torch::kFloat, torch::kCPU);
  std::vector<int64_t> rebuilt_at;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t before = cache.rebuilds();
    cache.append(s.k_pre.narrow(2, t, 1), s.k_rope.narrow(2, t, 1), s.v.narrow(2, t, 1));
    if (cache.rebuilds() > before) rebuilt_at.push_back(t + 1);
  }
  std::string at;
  for (int64_t t : rebuilt_at) at += " " + std::to_string(t);
  // From T = 16 * C on, each rebuild needs the cache to grow by >= 5% (a
  // partition of share p fills after 0.25 * T0 + 16 / p more tokens, less
  // the fluctuations of its arrivals).
  for (size_t i = 1; i < rebuilt_at.size(); ++i) {
    if (rebuilt_at[i - 1] >= 16 * num_partitions) {
      EXPECT_GE(rebuilt_at[i], rebuilt_at[i - 1] * 21 / 20) << "rebuilds at" << at;
    }
  }
  EXPECT_LE(static_cast<int64_t>(rebuilt_at.size()), 30) << "rebuilds at" << at;
  std::printf("%zu rebuilds over %ld single-token appends (C = %ld) at T =%s\n",
              rebuilt_at.size(), static_cast<long>(steps), static_cast<long>(num_partitions),
              at.c_str());
}

TEST(PartitionedKVCache, DecodeEqualsSaapAttentionOnTheLastPosition) {
  torch::manual_seed(fresh_seed());
  CacheSetup setup;
  Tensor centroids = torch::randn({setup.kv_heads, setup.partitions, setup.dim}) * 3;
  Sequence s = random_sequence(centroids, setup.batch, 300);
  PartitionedKVCache cache(centroids, setup.batch, setup.options, torch::kFloat, torch::kCPU);
  cache.reserve(10);  // smaller than needed: the time-ordered cache still grows
  int64_t length = 0;
  for (int64_t n : {2, 1, 1, 5, 3, 17, 1, 1, 120, 1, 1, 1, 100, 46}) {
    cache.append(s.k_pre.narrow(2, length, n), s.k_rope.narrow(2, length, n),
                 s.v.narrow(2, length, n));
    length += n;
    for (int64_t l : {int64_t{1}, int64_t{3}, setup.partitions}) {
      Tensor q = torch::randn({setup.batch, setup.q_heads, setup.dim});
      Tensor sel = l == setup.partitions
                       ? all_partitions({setup.batch, setup.q_heads}, l)
                       : random_selection({setup.batch, setup.q_heads, l}, setup.partitions,
                                          /*with_none=*/true);
      SaapVisitStats decode_stats, reference_stats, full_stats;
      Tensor out = cache.decode(q, sel, &decode_stats);
      Tensor ref = cache.decode_reference(q, sel, &reference_stats);
      Tensor expected = decode_via_saap_attention(cache, q, sel, &full_stats);
      ASSERT_EQ(out.sizes(), q.sizes());
      EXPECT_LT(max_abs_diff(out, expected), 1e-5) << "T = " << length << ", l = " << l;
      EXPECT_LT(max_abs_diff(ref, expected), 1e-5) << "T = " << length << ", l = " << l;
      for (const SaapVisitStats* st : {&decode_stats, &reference_stats}) {
        EXPECT_EQ(st->visited_pairs, full_stats.visited_pairs) << "T = " << length << ", l = " << l;
        EXPECT_EQ(st->causal_pairs, full_stats.causal_pairs);
        EXPECT_EQ(st->routed_visited, full_stats.routed_visited);
        EXPECT_EQ(st->routable_pairs, full_stats.routable_pairs);
      }
      if (l == setup.partitions) EXPECT_EQ(full_stats.visited_pairs, full_stats.causal_pairs);
    }
  }
  EXPECT_GE(cache.rebuilds(), 1);
}

TEST(PartitionedKVCache, StoresInItsDtypeAndPartitionsPrefillByNearestCentroid) {
  // A bf16 cache filled by one prefill: keys and partition buffers in bf16,
  // partitions from the pre-RoPE keys, decode in q's dtype.
  torch::manual_seed(fresh_seed());
  CacheSetup setup;
  Tensor centroids = torch::randn({setup.kv_heads, setup.partitions, setup.dim}) * 3;
  Sequence s = random_sequence(centroids, setup.batch, 50);
  PartitionedKVCache cache(centroids, setup.batch, setup.options, torch::kBFloat16, torch::kCPU);
  cache.append(s.k_pre, s.k_rope, s.v);
  EXPECT_EQ(cache.keys().scalar_type(), torch::kBFloat16);
  EXPECT_EQ(cache.routed_keys().scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(cache.key_partition(), assign_key_partitions(s.k_pre, centroids)));
  EXPECT_TRUE(torch::equal(cache.key_partition(), nearest_centroid(s.k_pre, centroids)));
  Tensor q = torch::randn({setup.batch, setup.q_heads, setup.dim}, torch::kBFloat16);
  Tensor sel = random_selection({setup.batch, setup.q_heads, 2}, setup.partitions, false);
  Tensor out = cache.decode(q, sel);
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  SaapVisitStats unused;
  EXPECT_LT(max_abs_diff(out, decode_via_saap_attention(cache, q, sel, &unused)), 1e-2);
}

TEST(PartitionedKVCache, RejectsBadArgumentsNamingThem) {
  torch::manual_seed(fresh_seed());
  CacheSetup setup;
  Tensor centroids = torch::randn({setup.kv_heads, setup.partitions, setup.dim});
  auto make = [&](const Tensor& c, const SaapAttentionOptions& o) {
    PartitionedKVCache cache(c, setup.batch, o, torch::kFloat, torch::kCPU);
  };
  EXPECT_ERROR_NAMING(make(centroids[0], setup.options), "centroids");
  Tensor nan_centroids = centroids.clone();
  nan_centroids[0][0][0] = NAN;
  EXPECT_ERROR_NAMING(make(nan_centroids, setup.options), "NaN");
  SaapAttentionOptions bad = setup.options;
  bad.local_window = 0;
  EXPECT_ERROR_NAMING(make(centroids, bad), "local_window");
  PartitionedKVCache cache(centroids, setup.batch, setup.options, torch::kFloat, torch::kCPU);
  Tensor q = torch::randn({setup.batch, setup.q_heads, setup.dim});
  Tensor sel = torch::zeros({setup.batch, setup.q_heads, 1}, torch::kLong);
  EXPECT_ERROR_NAMING(cache.decode(q, sel), "empty");
  Tensor k = torch::randn({setup.batch, setup.kv_heads, 3, setup.dim});
  EXPECT_ERROR_NAMING(cache.append(k.narrow(3, 0, 8), k, k), "k_pre must be");
  EXPECT_ERROR_NAMING(cache.append(k, k.narrow(2, 0, 2), k), "k_rope has 2 tokens");
  EXPECT_ERROR_NAMING(cache.append(k, k, k.to(torch::kLong)), "v must be floating");
  EXPECT_ERROR_NAMING(cache.append(k, k, k[0]), "v must be");
  cache.append(k, k, k);
  EXPECT_NO_THROW(cache.decode(q, sel));
  EXPECT_ERROR_NAMING(cache.decode(q.narrow(1, 0, 5), sel), "q_rope");
  EXPECT_ERROR_NAMING(cache.decode(q, sel + setup.partitions), "selected ids");
  EXPECT_ERROR_NAMING(cache.decode(q, sel - 2), "selected ids");
  EXPECT_ERROR_NAMING(cache.decode(q, sel.to(torch::kFloat)), "selected");
  EXPECT_ERROR_NAMING(cache.decode(q, torch::zeros({setup.batch, setup.q_heads, 7}, torch::kLong)),
                      "selected");
  EXPECT_ERROR_NAMING(cache.partition_keys(0, 0, setup.partitions), "partition_keys");
  EXPECT_EQ(cache.length(), 3);  // failed appends left the cache as it was
}

// ---------------------------------------------------------------------------
// CUDA (skip without a GPU)

TEST(SaapAttentionCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(fresh_seed());
  const int64_t batch = 2, hq = 8, hkv = 2, nq = 700, nk = 1500, d = 64, num_partitions = 32;
  Tensor q = torch::randn({batch, hq, nq, d}), k = torch::randn({batch, hkv, nk, d});
  Tensor v = torch::randn({batch, hkv, nk, d});
  Tensor part = torch::randint(num_partitions, {batch, hkv, nk}, torch::kLong);
  Tensor sel = random_selection({batch, hq, nq, 4}, num_partitions, true);
  SaapAttentionOptions o;
  o.num_partitions = num_partitions;
  o.local_window = 32;
  o.sink_tokens = 4;
  o.chunk_size = 256;
  SaapVisitStats cpu_stats, gpu_stats;
  Tensor cpu = saap_attention(q, k, v, part, sel, o, &cpu_stats);
  auto cuda = [](const Tensor& t) { return t.to(torch::kCUDA); };
  Tensor gpu = saap_attention(cuda(q), cuda(k), cuda(v), cuda(part), cuda(sel), o, &gpu_stats);
  EXPECT_TRUE(gpu.is_cuda());
  EXPECT_LT(max_abs_diff(gpu.cpu(), cpu), 1e-4);
  EXPECT_EQ(gpu_stats.visited_pairs, cpu_stats.visited_pairs);
  EXPECT_EQ(gpu_stats.routed_visited, cpu_stats.routed_visited);
  Tensor gpu16 = saap_attention(cuda(q).to(torch::kBFloat16), cuda(k).to(torch::kBFloat16),
                                cuda(v).to(torch::kBFloat16), cuda(part), cuda(sel), o);
  EXPECT_EQ(gpu16.scalar_type(), torch::kBFloat16);
  EXPECT_LT(max_abs_diff(gpu16.cpu(), cpu), 3e-2);
  // Mixed devices are refused.
  EXPECT_ERROR_NAMING(saap_attention(cuda(q), k, v, part, sel, o), "k is on");
  EXPECT_ERROR_NAMING(saap_attention(cuda(q), cuda(k), cuda(v), part, sel, o), "key_partition");
}

// SmolLM2-135M's attention at the eval context (9 query heads on 3 KV heads,
// D = 64, 8192 tokens, C = 256, bf16): l = C equals PyTorch's causal SDPA;
// prints the time of one layer's call at l = 16.
TEST(SaapAttentionCuda, EvalShapeEqualsSdpaAtAllPartitionsAndIsTimed) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(fresh_seed());
  const int64_t hq = 9, hkv = 3, n = 8192, d = 64, num_partitions = 256;
  auto bf16 = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  auto ids = torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA);
  Tensor q = torch::randn({1, hq, n, d}, bf16), k = torch::randn({1, hkv, n, d}, bf16);
  Tensor v = torch::randn({1, hkv, n, d}, bf16);
  Tensor part = torch::randint(num_partitions, {1, hkv, n}, ids);
  SaapAttentionOptions o;
  o.num_partitions = num_partitions;
  o.local_window = 64;
  o.sink_tokens = 4;
  o.chunk_size = 512;
  Tensor all = torch::rand({1, hq, n, num_partitions}, bf16.dtype(torch::kFloat)).argsort(/*dim=*/-1, /*descending=*/false);
  SaapVisitStats stats;
  Tensor out = saap_attention(q, k, v, part, all, o, &stats);
  Tensor expected = at::scaled_dot_product_attention(q, k.repeat_interleave(hq / hkv, 1),
                                                     v.repeat_interleave(hq / hkv, 1), {}, 0.0,
                                                     /*is_causal=*/true);
  EXPECT_LT(max_abs_diff(out, expected), 2e-2);
  EXPECT_EQ(stats.visited_pairs, stats.causal_pairs);

  Tensor sel = torch::randint(num_partitions, {1, hq, n, 16}, ids);
  saap_attention(q, k, v, part, sel, o);  // warm-up
  torch::cuda::synchronize();
  const int repeats = 10;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < repeats; ++i) saap_attention(q, k, v, part, sel, o);
  torch::cuda::synchronize();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
      repeats;
  saap_attention(q, k, v, part, sel, o, &stats);
  std::printf("saap_attention 1 x %ld heads x %ld tokens, C = %ld, l = 16, bf16: %.2f ms per "
              "layer (x 30 layers = %.1f ms); keys visited %.4f, routed %.4f\n",
              static_cast<long>(hq), static_cast<long>(n), static_cast<long>(num_partitions), ms,
              30 * ms, stats.visited_fraction(), stats.routed_fraction());
  RecordProperty("ms_per_layer", std::to_string(ms));
}

class PartitionedKVCacheCuda : public ::testing::TestWithParam<int64_t> {};

TEST_P(PartitionedKVCacheCuda, KernelDecodeMatchesReferenceAndCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(fresh_seed());
  const int64_t batch = 2, hq = 8, hkv = 2, d = GetParam(), num_partitions = 16;
  SaapAttentionOptions o;
  o.local_window = 64;
  o.sink_tokens = 4;
  Tensor centroids = torch::randn({hkv, num_partitions, d}) * 2;
  Sequence s = random_sequence(centroids, batch, 3000);
  PartitionedKVCache gpu(centroids, batch, o, torch::kBFloat16, torch::kCUDA);
  PartitionedKVCache cpu(centroids, batch, o, torch::kFloat, torch::kCPU);
  ASSERT_TRUE(gpu.uses_kernel(torch::kBFloat16));
  ASSERT_FALSE(cpu.uses_kernel(torch::kBFloat16));
  int64_t length = 0;
  auto bf16 = [](const Tensor& t) { return t.to(torch::kBFloat16); };
  for (int64_t n : {1000, 1, 1, 1, 500, 1, 1000, 1, 1, 1, 1, 492}) {
    auto piece = [&](const Tensor& t) { return t.narrow(2, length, n); };
    gpu.append(piece(s.k_pre).cuda(), bf16(piece(s.k_rope)).cuda(), bf16(piece(s.v)).cuda());
    // The CPU cache gets the bf16-rounded keys, so both attend the same values.
    cpu.append(piece(s.k_pre), bf16(piece(s.k_rope)).to(torch::kFloat),
               bf16(piece(s.v)).to(torch::kFloat));
    length += n;
    // Centroids are far apart relative to the noise: no key is near a tie.
    ASSERT_TRUE(torch::equal(gpu.key_partition().cpu(), cpu.key_partition()))
        << (gpu.key_partition().cpu() != cpu.key_partition()).sum().item<int64_t>()
        << " keys got another partition on the GPU";
    for (int64_t l : {int64_t{1}, int64_t{4}, num_partitions}) {
      Tensor q = torch::randn({batch, hq, d});
      Tensor sel = random_selection({batch, hq, l}, num_partitions, l > 1);
      Tensor out = gpu.decode(bf16(q).cuda(), sel.cuda());
      Tensor ref = gpu.decode_reference(bf16(q).cuda(), sel.cuda());
      Tensor on_cpu = cpu.decode(bf16(q).to(torch::kFloat), sel);
      EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
      EXPECT_LT(max_abs_diff(out.cpu(), ref.cpu()), 2e-2) << "T = " << length << ", l = " << l;
      EXPECT_LT(max_abs_diff(out.cpu(), on_cpu), 2e-2) << "T = " << length << ", l = " << l;
      SaapVisitStats gpu_stats, cpu_stats;
      gpu.decode(bf16(q).cuda(), sel.cuda(), &gpu_stats);
      cpu.decode(bf16(q).to(torch::kFloat), sel, &cpu_stats);
      EXPECT_EQ(gpu_stats.visited_pairs, cpu_stats.visited_pairs);
      EXPECT_EQ(gpu_stats.routed_visited, cpu_stats.routed_visited);
    }
  }
  EXPECT_GE(gpu.rebuilds(), 1);
}

INSTANTIATE_TEST_SUITE_P(HeadDims, PartitionedKVCacheCuda, ::testing::Values(64, 128));

// A generation step at SmolLM2's shape after an 8192-token prompt: the kernel
// decode equals the reference; prints the time of append + decode per layer.
TEST(PartitionedKVCacheCuda, EvalShapeDecodeStepIsTimed) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(fresh_seed());
  const int64_t hq = 9, hkv = 3, n = 8192, d = 64, num_partitions = 256, l = 16;
  auto bf16 = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  SaapAttentionOptions o;
  o.local_window = 64;
  o.sink_tokens = 4;
  Tensor centroids = torch::randn({hkv, num_partitions, d}, bf16.dtype(torch::kFloat));
  PartitionedKVCache cache(centroids, 1, o, torch::kBFloat16, torch::kCUDA);
  cache.reserve(n + 64);
  cache.append(torch::randn({1, hkv, n, d}, bf16), torch::randn({1, hkv, n, d}, bf16),
               torch::randn({1, hkv, n, d}, bf16));
  Tensor sel = torch::randint(num_partitions, {1, hq, l}, bf16.dtype(torch::kLong));
  Tensor q = torch::randn({1, hq, d}, bf16);
  EXPECT_LT(max_abs_diff(cache.decode(q, sel).cpu(), cache.decode_reference(q, sel).cpu()), 2e-2);
  const int steps = 50;
  std::vector<Tensor> k_new, q_new;
  for (int i = 0; i < steps; ++i) {
    k_new.push_back(torch::randn({1, hkv, 1, d}, bf16));
    q_new.push_back(torch::randn({1, hq, d}, bf16));
  }
  torch::cuda::synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    cache.append(k_new[i], k_new[i], k_new[i]);
    cache.decode(q_new[i], sel);
  }
  torch::cuda::synchronize();
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
      steps;
  SaapVisitStats stats = cache.decode_stats(sel);
  std::printf("PartitionedKVCache step at T = %ld, 1 x %ld heads, C = %ld, l = %ld, bf16: "
              "append + decode %.1f us per layer; keys visited %.4f; %ld rebuilds\n",
              static_cast<long>(cache.length()), static_cast<long>(hq),
              static_cast<long>(num_partitions), static_cast<long>(l), us,
              stats.visited_fraction(), static_cast<long>(cache.rebuilds()));
  RecordProperty("us_per_step", std::to_string(us));
}

}  // namespace
}  // namespace sparseflash::saap
