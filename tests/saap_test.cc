// SAAP foundations on CPU: batched k-means, the per-head query classifiers
// and the index file. Fresh random data every run; every check can fail.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "absl/strings/escaping.h"
#include "checkpoint/safetensors.h"
#include "saap/baselines.h"
#include "saap/budgets.h"
#include "saap/classifier.h"
#include "saap/index.h"
#include "saap/kmeans.h"
#include "saap/targets.h"

namespace sparseflash::saap {
namespace {

uint64_t fresh_seed() { return std::random_device{}(); }

// Blobs: `clusters` centres per head at scale `spread`, `per_cluster` points
// of noise `noise` around each, shuffled. Returns points [H, n, d] and the
// true cluster of every point [H, n].
std::pair<torch::Tensor, torch::Tensor> blobs(int64_t heads, int64_t clusters, int64_t per_cluster,
                                              int64_t dim, double spread, double noise,
                                              torch::Tensor* centers_out = nullptr) {
  torch::Tensor centers = torch::randn({heads, clusters, dim}) * spread;
  torch::Tensor label = torch::arange(clusters).repeat_interleave(per_cluster);  // [n]
  torch::Tensor labels = torch::stack(
      std::vector<torch::Tensor>(heads, label)).contiguous();  // [H, n]
  for (int64_t h = 0; h < heads; ++h) {
    labels[h] = label.index_select(0, torch::randperm(label.size(0)));
  }
  torch::Tensor x = centers.gather(1, labels.unsqueeze(-1).expand({heads, labels.size(1), dim})) +
                    torch::randn({heads, labels.size(1), dim}) * noise;
  if (centers_out != nullptr) *centers_out = centers;
  return {x, labels};
}

// True when, in every head, the found assignment is a relabelling of the
// true one (one found cluster per true cluster and vice versa).
void expect_same_partition(const torch::Tensor& found, const torch::Tensor& truth,
                           int64_t clusters) {
  for (int64_t h = 0; h < found.size(0); ++h) {
    std::set<int64_t> used;
    for (int64_t c = 0; c < clusters; ++c) {
      torch::Tensor members = found[h].masked_select(truth[h] == c);
      ASSERT_GT(members.numel(), 0);
      const int64_t first = members[0].item<int64_t>();
      EXPECT_TRUE((members == first).all().item<bool>()) << "head " << h << " true cluster " << c
                                                         << " is split";
      used.insert(first);
    }
    EXPECT_EQ(used.size(), static_cast<size_t>(clusters)) << "head " << h << " merges clusters";
  }
}

// The mean of the points of each found cluster equals its centroid.
void expect_centroids_are_means(const torch::Tensor& x, const KMeansResult& r) {
  const int64_t heads = x.size(0), clusters = r.centroids.size(1);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t c = 0; c < clusters; ++c) {
      torch::Tensor mask = r.assignments[h] == c;
      torch::Tensor mean = x[h].index({mask}).mean(0);
      EXPECT_TRUE(torch::allclose(r.centroids[h][c], mean, 1e-4, 1e-3))
          << "head " << h << " cluster " << c;
    }
  }
}

// ---------------------------------------------------------------------------
// k-means

TEST(KMeans, RecoversSeparatedClustersInEveryHead) {
  torch::manual_seed(fresh_seed());
  // Centres ~ N(0, 100^2) in 8 dimensions, noise 0.5: D^2 sampling picks a
  // second seed inside an already-seeded cluster with probability ~1e-4.
  auto [x, truth] = blobs(/*heads=*/3, /*clusters=*/6, /*per_cluster=*/200, /*dim=*/8, 100.0, 0.5);
  KMeansOptions options;
  options.num_clusters = 6;
  options.seed = fresh_seed();
  options.num_init = 2;
  KMeansResult r = batched_kmeans(x, options);
  ASSERT_EQ(r.centroids.sizes(), torch::IntArrayRef({3, 6, 8}));
  ASSERT_EQ(r.assignments.sizes(), torch::IntArrayRef({3, 1200}));
  EXPECT_TRUE(r.converged);
  expect_same_partition(r.assignments, truth, 6);
  expect_centroids_are_means(x, r);
  // Inertia is the within-cluster scatter: about n * d * noise^2.
  EXPECT_NEAR(r.inertia.mean().item<double>(), 1200 * 8 * 0.25, 1200 * 8 * 0.25 * 0.15);
}

TEST(KMeans, ReseedsAnEmptyClusterFromTheFarthestPoint) {
  torch::manual_seed(fresh_seed());
  torch::Tensor centers;
  auto [x, truth] = blobs(2, 3, 100, 4, 50.0, 0.3, &centers);
  // Start with two true centres and one centroid far from every point: the
  // third blob joins one of the first two, the far centroid gets no points.
  KMeansOptions options;
  options.num_clusters = 3;
  options.initial_centroids = centers.clone();
  options.initial_centroids.select(1, 2).fill_(1e4);
  KMeansResult r = batched_kmeans(x, options);
  EXPECT_GE(r.reseeded, 2);  // at least once per head
  EXPECT_TRUE(r.converged);
  expect_same_partition(r.assignments, truth, 3);
  expect_centroids_are_means(x, r);
}

TEST(KMeans, SphericalGroupsByDirectionWhateverTheNorm) {
  torch::manual_seed(fresh_seed());
  torch::Tensor dirs;
  auto [x, truth] = blobs(2, 4, 150, 16, 1.0, 0.0, &dirs);
  torch::Tensor unit = torch::nn::functional::normalize(
      x + torch::randn_like(x) * 0.01 * x.norm(2, -1, true),
      torch::nn::functional::NormalizeFuncOptions().dim(-1));
  torch::Tensor points = unit * (torch::rand({2, 600, 1}) * 10 + 0.1);  // norms 0.1 .. 10
  KMeansOptions options;
  options.num_clusters = 4;
  options.metric = KMeansMetric::kSpherical;
  options.seed = fresh_seed();
  // Random directions in 16 dimensions can be close (cosine ~0.5); three
  // k-means++ draws per head make a bad seeding (~1% per draw) negligible.
  options.num_init = 3;
  KMeansResult r = batched_kmeans(points, options);
  expect_same_partition(r.assignments, truth, 4);
  EXPECT_TRUE(torch::allclose(r.centroids.norm(2, -1), torch::ones({2, 4}), 1e-5, 1e-5));
  // Assigning the same points again reproduces the result.
  EXPECT_TRUE(torch::equal(assign_to_centroids(points, r.centroids, KMeansMetric::kSpherical),
                           r.assignments));
}

TEST(KMeans, SameSeedSameResultAndChunkingDoesNotMatter) {
  torch::manual_seed(fresh_seed());
  torch::Tensor x = torch::randn({2, 500, 6});
  KMeansOptions options;
  options.num_clusters = 7;
  options.init = KMeansInit::kRandomSample;
  options.seed = fresh_seed();
  KMeansResult a = batched_kmeans(x, options);
  options.chunk_size = 37;
  KMeansResult b = batched_kmeans(x, options);
  EXPECT_TRUE(torch::allclose(a.centroids, b.centroids, 1e-5, 1e-5));
  EXPECT_TRUE(torch::equal(a.assignments, b.assignments));
  // Lloyd never leaves a point with a nearer centroid than its own.
  EXPECT_TRUE(torch::equal(assign_to_centroids(x, a.centroids, KMeansMetric::kEuclidean),
                           a.assignments));
}

TEST(KMeans, RejectsBadArguments) {
  KMeansOptions options;
  options.num_clusters = 8;
  EXPECT_THROW(batched_kmeans(torch::randn({2, 5, 3}), options), c10::Error);  // n < C
  EXPECT_THROW(batched_kmeans(torch::randn({20, 3}), options), c10::Error);    // not 3-D
  torch::Tensor bad = torch::randn({1, 20, 3});
  bad[0][4][1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(batched_kmeans(bad, options), c10::Error);
  options.initial_centroids = torch::randn({1, 7, 3});
  EXPECT_THROW(batched_kmeans(torch::randn({1, 20, 3}), options), c10::Error);
}

TEST(KMeans, CudaMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(fresh_seed());
  auto [x, truth] = blobs(4, 8, 300, 64, 300.0, 1.0);
  KMeansOptions options;
  options.num_clusters = 8;
  options.seed = fresh_seed();
  KMeansResult cpu = batched_kmeans(x, options);
  KMeansResult gpu = batched_kmeans(x.cuda(), options);
  ASSERT_TRUE(gpu.centroids.is_cuda());
  // Float rounding may order the k-means++ draws differently, so compare
  // partitions up to relabelling, and the within-cluster scatter.
  gpu.centroids = gpu.centroids.cpu();
  gpu.assignments = gpu.assignments.cpu();
  expect_same_partition(cpu.assignments, truth, 8);
  expect_same_partition(gpu.assignments, truth, 8);
  expect_centroids_are_means(x, gpu);
  EXPECT_TRUE(torch::allclose(cpu.inertia, gpu.inertia.cpu(), 1e-3, 1e-2));
}

// ---------------------------------------------------------------------------
// classifier

TEST(Classifier, RecallAtLOnAKnownExample) {
  // One head, two queries, four partitions.
  torch::Tensor targets = torch::tensor({0.5f, 0.3f, 0.2f, 0.0f, 0.1f, 0.1f, 0.1f, 0.7f})
                              .reshape({1, 2, 4}) * 3;  // unnormalised on purpose
  torch::Tensor scores = torch::tensor({0.f, 2.f, 1.f, 3.f, 9.f, 8.f, 7.f, 6.f}).reshape({1, 2, 4});
  // l=1: query 0 picks partition 3 (mass 0), query 1 partition 0 (0.1).
  EXPECT_NEAR(recall_at_l(scores, targets, 1).item<double>(), (0.0 + 0.1) / 2, 1e-6);
  EXPECT_NEAR(recall_at_l(scores, targets, 2).item<double>(), (0.3 + 0.2) / 2, 1e-6);
  EXPECT_NEAR(recall_at_l(scores, targets, 4).item<double>(), 1.0, 1e-6);
  EXPECT_NEAR(recall_at_l(targets, targets, 1).item<double>(), (0.5 + 0.7) / 2, 1e-6);
  EXPECT_THROW(recall_at_l(scores, targets, 5), c10::Error);
}

TEST(Classifier, LearnsASyntheticRoutingTask) {
  const uint64_t seed = fresh_seed();
  torch::manual_seed(seed);
  const int64_t heads = 4, dim = 16, partitions = 8, n = 4000;
  // Each head routes a query by |q . w_c| over unit directions w_c, shifted
  // by a per-head offset (as Llama queries share a mean): not linear in q, so
  // the hidden layer has to work. Targets are the softmax of 3 |q . w_c|.
  torch::Tensor w = torch::nn::functional::normalize(
      torch::randn({heads, dim, partitions}), torch::nn::functional::NormalizeFuncOptions().dim(1));
  torch::Tensor offset = torch::randn({heads, 1, dim}) * 5;
  torch::Tensor z = torch::randn({heads, n, dim});
  torch::Tensor q = z + offset;
  torch::Tensor targets = torch::softmax(3 * torch::bmm(z, w).abs(), -1);

  QueryClassifier model(heads, dim, /*hidden=*/64, partitions, seed);
  ClassifierTrainOptions options;
  options.steps = 600;
  options.batch_size = 256;
  options.seed = seed;
  options.recall_at = {1, 2, partitions};
  // The untrained classifier is far from the bar below (the check can fail).
  {
    torch::NoGradGuard no_grad;
    QueryClassifier untrained(heads, dim, 64, partitions, seed + 1);
    untrained->fit_input_scaling(q);
    EXPECT_LT(recall_at_l(untrained->forward(q), targets, 1).mean().item<double>(),
              0.8 * recall_at_l(targets, targets, 1).mean().item<double>());
  }
  ClassifierReport report = train_classifier(model, q, targets, options);
  std::printf("held-out: recall@1 %.3f (oracle %.3f), recall@2 %.3f (oracle %.3f), KL %.4f, "
              "%.1f s\n",
              report.recall[0], report.oracle_recall[0], report.recall[1],
              report.oracle_recall[1], report.holdout_kl, report.seconds);
  EXPECT_EQ(report.holdout_queries, 400);
  // Chance is 1/C of the mass per partition (0.125 at l=1). A classifier
  // that learned the routing function comes within a few percent of the
  // oracle's top-1 mass; 90% of it leaves room for the held-out noise of 400
  // queries and the finite training, and is far above what a wrong or
  // half-learned routing gets (a random permutation of the partitions scores
  // about 0.125).
  EXPECT_GT(report.recall[0], 0.9 * report.oracle_recall[0]);
  EXPECT_GT(report.recall[1], 0.9 * report.oracle_recall[1]);
  EXPECT_NEAR(report.recall[2], 1.0, 1e-5);
  EXPECT_NEAR(report.oracle_recall[2], 1.0, 1e-5);
  // Held-out KL well below that of predicting the uniform distribution.
  torch::Tensor uniform = torch::zeros({heads, n, partitions});
  EXPECT_LT(report.holdout_kl, 0.3 * soft_target_kl(uniform, targets).item<double>());
}

TEST(Classifier, RejectsBadTargets) {
  QueryClassifier model(2, 4, 8, 3);
  torch::Tensor q = torch::randn({2, 50, 4});
  torch::Tensor t = torch::rand({2, 50, 3});
  ClassifierTrainOptions options;
  options.steps = 2;
  torch::Tensor negative = t.clone();
  negative[1][3][2] = -0.5;
  EXPECT_THROW(train_classifier(model, q, negative, options), c10::Error);
  torch::Tensor massless = t.clone();
  massless[0][7].zero_();
  EXPECT_THROW(train_classifier(model, q, massless, options), c10::Error);
  EXPECT_THROW(train_classifier(model, q, t.narrow(2, 0, 2), options), c10::Error);
  options.recall_at = {4};
  EXPECT_THROW(train_classifier(model, q, t, options), c10::Error);
}

// ---------------------------------------------------------------------------
// attention-mass targets

TEST(Targets, PartitionMassMatchesABruteForceLoop) {
  torch::manual_seed(fresh_seed());
  const int64_t hq = 6, hkv = 2, nk = 40, nq = 11, d = 8, c = 5;
  torch::Tensor q = torch::randn({hq, nq, d}, torch::kDouble) * 2;
  torch::Tensor k = torch::randn({hkv, nk, d}, torch::kDouble) * 2;
  torch::Tensor pos = torch::randint(nk, {nq}, torch::kLong);
  pos[0] = 3;  // inside window + sinks: no routed mass
  torch::Tensor part = torch::randint(c, {hkv, nk}, torch::kLong);
  MassOptions options;
  options.local_window = 6;
  options.sink_tokens = 2;
  options.chunk_size = 4;  // several chunks, the last one short
  torch::Tensor mass = partition_attention_mass(q, k, pos, part, c, options);
  ASSERT_EQ(mass.sizes(), torch::IntArrayRef({hq, nq, c}));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int64_t h = 0; h < hq; ++h) {
    const int64_t kv = h / (hq / hkv);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t p = pos[i].item<int64_t>();
      std::vector<double> w(p + 1);
      double total = 0;
      for (int64_t j = 0; j <= p; ++j) {
        w[j] = std::exp(scale * q[h][i].dot(k[kv][j]).item<double>());
        total += w[j];
      }
      std::vector<double> want(c, 0.0);
      double kept = 0;
      for (int64_t j = 0; j <= p; ++j) {
        const bool routed = j >= options.sink_tokens && j <= p - options.local_window;
        if (routed) want[part[kv][j].item<int64_t>()] += w[j] / total;
        if (!routed) kept += w[j] / total;
      }
      for (int64_t x = 0; x < c; ++x) {
        EXPECT_NEAR(mass[h][i][x].item<double>(), want[x], 1e-5)
            << "head " << h << " query " << i << " partition " << x;
      }
      EXPECT_NEAR(mass[h][i].sum().item<double>() + kept, 1.0, 1e-5);
    }
  }
  EXPECT_EQ(mass.select(1, 0).abs().sum().item<double>(), 0.0);
  // Bad arguments are refused.
  EXPECT_THROW(partition_attention_mass(q, k, pos, part, 3, options), c10::Error);
  EXPECT_THROW(partition_attention_mass(q, k, pos + nk, part, c, options), c10::Error);
  EXPECT_THROW(partition_attention_mass(q.narrow(0, 0, 5), k, pos, part, c, options), c10::Error);
}

// Brute force: the recency band of key j for a query at p (-1: not routable).
int64_t band_of(int64_t p, int64_t j, int64_t window, int64_t sinks,
                const std::vector<int64_t>& edges) {
  const int64_t last = p - window;
  if (j < sinks || j > last) return -1;
  int64_t b = 0;
  while (b < static_cast<int64_t>(edges.size()) && last - j >= edges[b]) ++b;
  return b;
}

TEST(Targets, RecencyBandsMatchABruteForceLoop) {
  torch::manual_seed(fresh_seed());
  const int64_t hq = 6, hkv = 2, nk = 60, nq = 13, d = 8, c = 5;
  const std::vector<int64_t> edges = {3, 7, 20};
  const int64_t bands = 4;
  torch::Tensor q = torch::randn({hq, nq, d}, torch::kDouble) * 2;
  torch::Tensor k = torch::randn({hkv, nk, d}, torch::kDouble) * 2;
  torch::Tensor pos = torch::randint(nk, {nq}, torch::kLong);
  pos[0] = 5;       // inside window + sinks: nothing routed
  pos[1] = nk - 1;  // every band populated
  MassOptions options;
  options.local_window = 6;
  options.sink_tokens = 2;
  options.chunk_size = 4;
  torch::Tensor mass = distance_band_mass(q, k, pos, edges, options);
  torch::Tensor counts = distance_band_counts(pos, 6, 2, edges);
  ASSERT_EQ(mass.sizes(), torch::IntArrayRef({hq, nq, bands}));
  ASSERT_EQ(counts.sizes(), torch::IntArrayRef({nq, bands}));
  // The band masses add up to the partition masses' total.
  torch::Tensor part = torch::randint(c, {hkv, nk}, torch::kLong);
  EXPECT_TRUE(torch::allclose(mass.sum(-1),
                              partition_attention_mass(q, k, pos, part, c, options).sum(-1),
                              1e-5, 1e-6));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  torch::Tensor beta = torch::randn({hq, bands});
  torch::Tensor routable = routable_key_counts(part, c, pos, 6, 2);  // [Hkv, nq, C]
  torch::Tensor weighted = recency_weighted_counts(routable, part, 0, pos, 6, 2, edges, beta);
  ASSERT_EQ(weighted.sizes(), torch::IntArrayRef({hq, nq, c}));
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t p = pos[i].item<int64_t>();
    std::vector<double> n(bands, 0.0);
    for (int64_t j = 0; j <= p; ++j) {
      const int64_t b = band_of(p, j, 6, 2, edges);
      if (b >= 0) n[b] += 1;
    }
    for (int64_t b = 0; b < bands; ++b)
      EXPECT_EQ(counts[i][b].item<double>(), n[b]) << "query " << i << " band " << b;
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t kv = h / (hq / hkv);
      std::vector<double> w(p + 1);
      double total = 0;
      for (int64_t j = 0; j <= p; ++j) {
        w[j] = std::exp(scale * q[h][i].dot(k[kv][j]).item<double>());
        total += w[j];
      }
      std::vector<double> want(bands, 0.0), want_w(c, 0.0);
      for (int64_t j = 0; j <= p; ++j) {
        const int64_t b = band_of(p, j, 6, 2, edges);
        if (b < 0) continue;
        want[b] += w[j] / total;
        want_w[part[kv][j].item<int64_t>()] += std::exp(beta[h][b].item<double>());
      }
      for (int64_t b = 0; b < bands; ++b)
        EXPECT_NEAR(mass[h][i][b].item<double>(), want[b], 1e-5)
            << "head " << h << " query " << i << " band " << b;
      for (int64_t x = 0; x < c; ++x)
        EXPECT_NEAR(weighted[h][i][x].item<double>(), want_w[x], 1e-4 * (1 + want_w[x]))
            << "head " << h << " query " << i << " partition " << x;
    }
  }
  // Zero log weights give the plain counts; a slice holding the recent
  // bands (a decode step) gives the same as the whole sequence.
  EXPECT_TRUE(torch::allclose(
      recency_weighted_counts(routable, part, 0, pos, 6, 2, edges, torch::zeros({hq, bands})),
      routable.repeat_interleave(3, 0), 1e-5, 1e-5));
  // One query at a time (the decode path counts by scatter, not prefix sums).
  for (int64_t i = 0; i < nq; ++i) {
    torch::Tensor qi = pos.narrow(0, i, 1);
    EXPECT_TRUE(torch::allclose(
        recency_weighted_counts(routable_key_counts(part, c, qi, 6, 2), part, 0, qi, 6, 2, edges,
                                beta),
        weighted.narrow(1, i, 1), 1e-5, 1e-5))
        << "query " << i << " at " << qi.item<int64_t>();
  }
  torch::Tensor one = pos.narrow(0, 1, 1);  // the query at nk - 1
  torch::Tensor one_routable = routable_key_counts(part, c, one, 6, 2);
  const int64_t first = nk - 1 - 6 - 20 + 1;
  torch::Tensor sliced = recency_weighted_counts(
      one_routable, part.narrow(1, first, nk - first), first, one, 6, 2, edges, beta);
  EXPECT_TRUE(torch::allclose(sliced, weighted.narrow(1, 1, 1), 1e-5, 1e-5));
  // A slice that misses part of the recent bands is refused, and so are
  // edges that do not ascend.
  EXPECT_THROW(recency_weighted_counts(one_routable, part.narrow(1, first + 1, nk - first - 1),
                                       first + 1, one, 6, 2, edges, beta),
               c10::Error);
  EXPECT_THROW(distance_band_counts(pos, 6, 2, {3, 3}), std::invalid_argument);
  EXPECT_THROW(distance_band_mass(q, k, pos, {0, 4}, options), std::invalid_argument);
  EXPECT_THROW(recency_weighted_counts(routable, part, 0, pos, 6, 2, edges, beta.narrow(1, 0, 3)),
               c10::Error);
}

TEST(Targets, RecencyLogWeightsAreTheAttentionPerKeyOfEachBand) {
  // Two heads, three bands with 10, 20 and 70 keys.
  torch::Tensor mass = torch::tensor({{0.5, 0.2, 0.7}, {0.0, 0.1, 0.7}}, torch::kDouble);
  torch::Tensor keys = torch::tensor({10.0, 20.0, 70.0}, torch::kDouble);
  torch::Tensor beta = recency_log_weights(mass, keys);
  ASSERT_EQ(beta.sizes(), torch::IntArrayRef({2, 3}));
  EXPECT_NEAR(beta[0][0].item<double>(), std::log(0.05 / 0.01), 1e-5);
  EXPECT_NEAR(beta[0][1].item<double>(), std::log(0.01 / 0.01), 1e-5);
  EXPECT_EQ(beta[0][2].item<double>(), 0.0);
  // No attention in a band: 1e-6 of the densest band's.
  EXPECT_NEAR(beta[1][0].item<double>(), std::log(1e-6 * 0.01 / 0.01), 1e-4);
  EXPECT_NEAR(beta[1][1].item<double>(), std::log(0.005 / 0.01), 1e-5);
  EXPECT_THROW(recency_log_weights(mass, torch::tensor({10.0, 0.0, 70.0})), c10::Error);
}

// ---------------------------------------------------------------------------
// baselines

TEST(Baselines, CentroidScoresRankAsTheirDefinitions) {
  torch::manual_seed(fresh_seed());
  const int64_t hq = 6, hkv = 3, n = 9, d = 5, c = 7;
  torch::Tensor q = torch::randn({hq, n, d});
  torch::Tensor cents = torch::randn({hkv, c, d}) * 2;
  torch::Tensor near = centroid_scores(q, cents, CentroidScore::kNegativeDistance);
  torch::Tensor dot = centroid_scores(q, cents, CentroidScore::kDotProduct);
  ASSERT_EQ(near.sizes(), torch::IntArrayRef({hq, n, c}));
  for (int64_t h = 0; h < hq; ++h) {
    torch::Tensor mine = cents[h / 2];  // 2 query heads per KV head
    torch::Tensor dist = (q[h].unsqueeze(1) - mine.unsqueeze(0)).pow(2).sum(-1);  // [n, C]
    // Scores differ from -distance by |q|^2 only: same order, same differences.
    torch::Tensor shifted = near[h] - q[h].pow(2).sum(-1, true);
    EXPECT_TRUE(torch::allclose(shifted, -dist, 1e-4, 1e-4)) << "head " << h;
    EXPECT_TRUE(torch::allclose(dot[h], q[h].matmul(mine.t()), 1e-5, 1e-5)) << "head " << h;
  }
  EXPECT_THROW(centroid_scores(q.narrow(0, 0, 4), cents, CentroidScore::kDotProduct), c10::Error);
}

TEST(Baselines, RandomPartitionsAreUniformAndSeeded) {
  const uint64_t seed = fresh_seed();
  torch::Tensor a = random_partitions(2, 16000, 16, seed);
  ASSERT_EQ(a.sizes(), torch::IntArrayRef({2, 16000}));
  EXPECT_GE(a.min().item<int64_t>(), 0);
  EXPECT_LT(a.max().item<int64_t>(), 16);
  // 1000 expected per partition and head; the standard deviation is ~31.
  torch::Tensor counts = torch::zeros({2, 16}, torch::kLong).scatter_add_(1, a, torch::ones_like(a));
  EXPECT_GT(counts.min().item<int64_t>(), 800);
  EXPECT_LT(counts.max().item<int64_t>(), 1200);
  EXPECT_TRUE(torch::equal(a, random_partitions(2, 16000, 16, seed)));
  EXPECT_FALSE(torch::equal(a, random_partitions(2, 16000, 16, seed + 1)));
}

// ---------------------------------------------------------------------------
// index file

std::string temp_path(const std::string& name) {
  return testing::TempDir() + "saap_test_" + std::to_string(fresh_seed()) + "_" + name;
}

SaapIndex random_index(const std::string& identity) {
  SaapIndex index;
  SaapHeader& h = index.header;
  h.set_format_version(kSaapFormatVersion);
  h.set_model_identity(identity);
  h.set_num_layers(2);
  h.set_num_query_heads(6);
  h.set_num_kv_heads(2);
  h.set_head_dim(8);
  h.set_partitions(5);
  h.set_classifier_hidden(12);
  h.set_local_window(64);
  h.set_sink_tokens(4);
  h.set_key_metric(SaapHeader::EUCLIDEAN);
  h.set_calibration_context(8192);
  h.set_calibration_data("synthetic");
  for (int i = 0; i < 2; ++i) {
    QueryClassifier c(6, 8, 12, 5, fresh_seed());
    c->fit_input_scaling(torch::randn({6, 40, 8}) * 3 + 1);
    SaapLayer layer;
    layer.centroids = torch::randn({2, 5, 8});
    store_classifier(c, &layer);
    index.layers.push_back(layer);
  }
  return index;
}

TEST(SaapIndex, RoundTripsExactly) {
  SaapIndex index = random_index("fnv1a64:0123456789abcdef");
  const std::string path = temp_path("round_trip.safetensors");
  ASSERT_TRUE(write_saap_index(path, index).ok());
  absl::StatusOr<SaapIndex> back = load_saap_index(path, "fnv1a64:0123456789abcdef");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->header.SerializeAsString(), index.header.SerializeAsString());
  ASSERT_EQ(back->layers.size(), 2u);
  // The classifier rebuilt from the file scores queries as the original.
  torch::Tensor q = torch::randn({6, 30, 8});
  torch::NoGradGuard no_grad;
  QueryClassifier original = load_classifier(index.layers[1]);
  EXPECT_TRUE(torch::equal(load_classifier(back->layers[1])->forward(q), original->forward(q)));
  for (size_t i = 0; i < 2; ++i) {
    const SaapLayer& a = index.layers[i];
    const SaapLayer& b = back->layers[i];
    EXPECT_TRUE(torch::equal(a.centroids, b.centroids));
    EXPECT_TRUE(torch::equal(a.in_mean, b.in_mean));
    EXPECT_TRUE(torch::equal(a.in_std, b.in_std));
    EXPECT_TRUE(torch::equal(a.w1, b.w1));
    EXPECT_TRUE(torch::equal(a.b1, b.b1));
    EXPECT_TRUE(torch::equal(a.w2, b.w2));
    EXPECT_TRUE(torch::equal(a.b2, b.b2));
  }
  std::remove(path.c_str());
}

TEST(SaapIndex, RefusesAnotherModelNamingBothIdentities) {
  const std::string path = temp_path("identity.safetensors");
  ASSERT_TRUE(write_saap_index(path, random_index("fnv1a64:aaaaaaaaaaaaaaaa")).ok());
  absl::StatusOr<SaapIndex> back = load_saap_index(path, "fnv1a64:bbbbbbbbbbbbbbbb");
  ASSERT_FALSE(back.ok());
  EXPECT_EQ(back.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string message(back.status().message());
  EXPECT_NE(message.find("fnv1a64:aaaaaaaaaaaaaaaa"), std::string::npos) << message;
  EXPECT_NE(message.find("fnv1a64:bbbbbbbbbbbbbbbb"), std::string::npos) << message;
  EXPECT_NE(message.find(path), std::string::npos) << message;
  std::remove(path.c_str());
}

TEST(SaapIndex, RefusesCorruptOrInconsistentFiles) {
  const std::string path = temp_path("corrupt.safetensors");
  SaapIndex index = random_index("fnv1a64:0000000000000001");
  float dummy[4] = {1, 2, 3, 4};
  auto expect_refused = [&](const std::map<std::string, std::string>& metadata,
                            const std::string& expected_text) {
    ASSERT_TRUE(checkpoint::write_safetensors(path, {{"x", checkpoint::DType::kF32, {4}, dummy, 16}},
                                              metadata)
                    .ok());
    absl::StatusOr<SaapIndex> back = read_saap_index(path);
    ASSERT_FALSE(back.ok()) << expected_text;
    EXPECT_NE(std::string(back.status().message()).find(expected_text), std::string::npos)
        << back.status();
  };
  // Not a SAAP index at all, a header that is not base64, base64 of garbage.
  expect_refused({}, "not a SAAP index");
  expect_refused({{kSaapFormatKey, kSaapFormatValue}, {kSaapHeaderKey, "%%% not base64"}},
                 "saap_header");
  expect_refused({{kSaapFormatKey, kSaapFormatValue},
                  {kSaapHeaderKey, absl::Base64Escape(std::string("\xff\xff\xff\x07garbage"))}},
                 "saap_header");
  // A well-formed header that disagrees with the tensors.
  expect_refused({{kSaapFormatKey, kSaapFormatValue},
                  {kSaapHeaderKey, absl::Base64Escape(index.header.SerializeAsString())}},
                 "tensors, the header implies");
  SaapHeader zero_heads = index.header;
  zero_heads.set_num_kv_heads(0);
  expect_refused({{kSaapFormatKey, kSaapFormatValue},
                  {kSaapHeaderKey, absl::Base64Escape(zero_heads.SerializeAsString())}},
                 "num_kv_heads");

  // A valid file with its bytes damaged: truncated, and a flipped header byte.
  ASSERT_TRUE(write_saap_index(path, index).ok());
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 7);
  EXPECT_FALSE(read_saap_index(path).ok());
  std::string flipped = bytes;
  flipped[12] = '}';
  std::ofstream(path, std::ios::binary | std::ios::trunc) << flipped;
  EXPECT_FALSE(read_saap_index(path).ok());
  EXPECT_FALSE(read_saap_index(path + ".missing").ok());

  // Writing refuses an index whose tensors disagree with its header.
  SaapIndex wrong = index;
  wrong.layers[1].w2 = torch::randn({6, 12, 4});
  absl::Status s = write_saap_index(path, wrong);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find("layers.1.classifier.w2"), std::string::npos) << s;
  std::remove(path.c_str());
}

TEST(SaapIndex, RoundTripsBudgetCurvesAndRefusesThemHalfPresent) {
  SaapIndex index = random_index("fnv1a64:00000000000000b1");
  for (double g : {0.0, 0.1, 0.5, 1.0}) index.header.add_budget_grid(static_cast<float>(g));
  for (SaapLayer& layer : index.layers) {
    layer.budget_lost_mass = torch::rand({6, 4});
    layer.budget_keys = torch::rand({6, 4});
    layer.budget_output_error = torch::rand({6, 4});
  }
  const std::string path = temp_path("budgets.safetensors");
  ASSERT_TRUE(write_saap_index(path, index).ok());
  absl::StatusOr<SaapIndex> back = read_saap_index(path);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->header.budget_grid_size(), 4);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(torch::equal(back->layers[i].budget_lost_mass, index.layers[i].budget_lost_mass));
    EXPECT_TRUE(torch::equal(back->layers[i].budget_keys, index.layers[i].budget_keys));
  }
  // Curves of the wrong width, curves without a grid, a grid without curves,
  // a grid that does not ascend: all refused when writing, naming the problem.
  SaapIndex wrong = index;
  wrong.layers[0].budget_keys = torch::rand({6, 3});
  absl::Status s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("layers.0.budget.keys"), std::string::npos) << s;
  wrong = index;
  wrong.header.clear_budget_grid();
  s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("no budget_grid"), std::string::npos) << s;
  wrong = index;
  wrong.layers[1].budget_lost_mass = Tensor();
  s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("layers.1.budget.lost_mass"), std::string::npos) << s;
  wrong = index;
  wrong.header.set_budget_grid(2, 0.05f);
  s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("budget_grid must ascend"), std::string::npos) << s;
  std::remove(path.c_str());
}

TEST(SaapIndex, RoundTripsRecencyWeightsAndRefusesThemInconsistent) {
  SaapIndex index = random_index("fnv1a64:00000000000000c2");
  index.header.set_count_prior(true);
  for (int e : {64, 256}) index.header.add_recency_edges(e);
  for (SaapLayer& layer : index.layers) layer.recency = torch::randn({6, 3});
  const std::string path = temp_path("recency.safetensors");
  ASSERT_TRUE(write_saap_index(path, index).ok());
  absl::StatusOr<SaapIndex> back = read_saap_index(path);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->header.recency_edges_size(), 2);
  EXPECT_EQ(back->header.recency_edges(1), 256);
  for (size_t i = 0; i < 2; ++i)
    EXPECT_TRUE(torch::equal(back->layers[i].recency, index.layers[i].recency));
  SaapIndex wrong = index;
  wrong.layers[1].recency = torch::randn({6, 2});
  absl::Status s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("layers.1.recency"), std::string::npos) << s;
  wrong = index;
  wrong.header.clear_recency_edges();
  s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("no recency_edges"), std::string::npos) << s;
  wrong = index;
  wrong.header.set_recency_edges(1, 64);
  s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("recency_edges must ascend"), std::string::npos) << s;
  wrong = index;
  wrong.header.set_count_prior(false);
  s = write_saap_index(path, wrong);
  EXPECT_NE(std::string(s.message()).find("need count_prior"), std::string::npos) << s;
  std::remove(path.c_str());
}

// One query, three partitions; by hand: order c0 (density 3), c2 (2), c1 (1);
// keys 2, 4, 4 of 10; routed mass 0.3, 0.1, 0.2 of 0.6.
TEST(Budgets, CurvesOnAHandComputedExample) {
  Tensor density = torch::tensor({3.0f, 1.0f, 2.0f}).view({1, 1, 3});
  Tensor counts = torch::tensor({2.0f, 4.0f, 4.0f}).view({1, 1, 3});
  Tensor mass = torch::tensor({0.3f, 0.1f, 0.2f}).view({1, 1, 3});
  BudgetCurves c = measure_budget_curves(density, mass, counts, {0, 0.1, 0.25, 0.5, 1});
  const std::vector<double> lost = {0.6, 0.3, 0.1, 0.1, 0};
  const std::vector<double> keys = {0, 0.2, 0.6, 0.6, 1};
  ASSERT_EQ(c.lost_mass.sizes(), at::IntArrayRef({1, 5}));
  for (int g = 0; g < 5; ++g) {
    EXPECT_NEAR(c.lost_mass[0][g].item<double>(), lost[g], 1e-6) << g;
    EXPECT_NEAR(c.keys[0][g].item<double>(), keys[g], 1e-6) << g;
  }
  // Two queries average; a second head is independent of the first.
  Tensor d2 = torch::cat({density, density.flip(-1)}, 1).repeat({2, 1, 1});
  Tensor c2 = counts.repeat({2, 2, 1});
  Tensor m2 = mass.repeat({2, 2, 1});
  m2[1].zero_();
  BudgetCurves two = measure_budget_curves(d2, m2, c2, {0, 0.25, 1});
  // Query 2 (densities 2, 1, 3) takes only c2 at 0.25: lost 0.4, keys 0.4.
  EXPECT_NEAR(two.lost_mass[0][1].item<double>(), (0.1 + 0.4) / 2, 1e-6);
  EXPECT_NEAR(two.keys[0][1].item<double>(), (0.6 + 0.4) / 2, 1e-6);
  EXPECT_NEAR(two.lost_mass[1][0].item<double>(), 0, 1e-6);
  EXPECT_THROW(measure_budget_curves(density, mass, counts, {0.5, 0.2}), std::invalid_argument);
  EXPECT_THROW(measure_budget_curves(density, mass.view({1, 3, 1}), counts, {0, 1}),
               std::invalid_argument);
}

TEST(Budgets, AllocationSpendsKeysWhereTheyKeepTheMostAttention) {
  // Head 0 loses much attention without keys, head 1 little.
  Tensor lost = torch::tensor({0.8f, 0.1f, 0.0f, 0.05f, 0.01f, 0.0f}).view({2, 3});
  Tensor keys = torch::tensor({0.0f, 0.5f, 1.0f, 0.0f, 0.5f, 1.0f}).view({2, 3});
  auto choice = [&](double budget) {
    Tensor c = allocate_head_budgets(lost, keys, budget);
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + 2);
  };
  EXPECT_EQ(choice(0), (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(choice(0.25), (std::vector<int64_t>{1, 0}));   // 0.7 saved for 0.5 keys
  EXPECT_EQ(choice(0.5), (std::vector<int64_t>{2, 0}));    // then 0.1 over 0.04
  EXPECT_EQ(choice(0.75), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(choice(1), (std::vector<int64_t>{2, 2}));
  // Random convex curves a_h (1 - g)^p_h on an even grid (where this greedy
  // is optimal): the budget holds, and the split loses no more attention
  // than giving every head the same grid point.
  torch::manual_seed(fresh_seed());
  const int64_t H = 40, G = 8;
  Tensor grid = torch::linspace(0, 1, G);
  Tensor l = torch::rand({H, 1}) * (1 - grid).view({1, G}).pow(1 + 3 * torch::rand({H, 1}));
  Tensor k = grid.expand({H, G}).contiguous();
  for (double budget : {0.05, 0.2, 0.4, 0.9}) {
    Tensor c = allocate_head_budgets(l, k, budget);
    Tensor spent = k.gather(1, c.view({H, 1})).mean();
    EXPECT_LE(spent.item<double>(), budget + 1e-6);
    const int64_t uniform = static_cast<int64_t>(std::floor(budget * (G - 1) + 1e-9));
    EXPECT_LE(l.gather(1, c.view({H, 1})).sum().item<double>(),
              l.select(1, uniform).sum().item<double>() + 1e-6)
        << budget;
  }
  EXPECT_THROW(allocate_head_budgets(lost, keys, 1.5), std::invalid_argument);
  EXPECT_THROW(allocate_head_budgets(lost, keys.view({3, 2}), 0.5), std::invalid_argument);
}

// budget_output_errors against a float64 loop over queries and keys.
TEST(Budgets, OutputErrorsMatchABruteForceLoop) {
  torch::manual_seed(fresh_seed());
  const int64_t hq = 4, hkv = 2, T = 37, d = 8, C = 5, nq = 11, window = 3, sinks = 2;
  Tensor q = torch::randn({hq, nq, d}), k = torch::randn({hkv, T, d}), v = torch::randn({hkv, T, d});
  Tensor part = torch::randint(C, {hkv, T}, torch::kLong);
  Tensor pos = std::get<0>(torch::randperm(T - window - sinks, torch::kLong).narrow(0, 0, nq).sort()) +
               window + sinks;
  Tensor density = torch::randn({hq, nq, C});
  const std::vector<double> grid = {0, 0.2, 0.5, 1};
  MassOptions mo;
  mo.local_window = window;
  mo.sink_tokens = sinks;
  Tensor got = budget_output_errors(q, k, v, part, pos, density, grid, mo);
  ASSERT_EQ(got.sizes(), at::IntArrayRef({hq, 4}));
  Tensor qd = q.to(torch::kDouble), kd = k.to(torch::kDouble), vd = v.to(torch::kDouble);
  const double scale = 1 / std::sqrt(static_cast<double>(d));
  for (int64_t h = 0; h < hq; ++h) {
    const int64_t g_kv = h / (hq / hkv);
    for (size_t g = 0; g < grid.size(); ++g) {
      double want = 0;
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t p = pos[i].item<int64_t>();
        // Keys per partition the query can route, and the partitions taken.
        std::vector<double> n(C, 0);
        for (int64_t j = sinks; j <= p - window; ++j) n[part[g_kv][j].item<int64_t>()] += 1;
        double total = 0;
        for (double x : n) total += x;
        std::vector<int64_t> order(C);
        for (int64_t c = 0; c < C; ++c) order[c] = c;
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return density[h][i][a].item<float>() > density[h][i][b].item<float>();
        });
        std::vector<bool> take(C, false);
        double before = 0;
        for (int64_t c : order) {
          take[c] = before < total * grid[g];
          before += n[c];
        }
        Tensor s = torch::zeros({p + 1}, torch::kDouble);
        for (int64_t j = 0; j <= p; ++j) s[j] = (qd[h][i] * kd[g_kv][j]).sum() * scale;
        Tensor w = torch::softmax(s, 0);
        Tensor dense = torch::zeros({d}, torch::kDouble), sel = torch::zeros({d}, torch::kDouble);
        double mass = 0;
        for (int64_t j = 0; j <= p; ++j) {
          dense += w[j] * vd[g_kv][j];
          const bool routed = j >= sinks && j <= p - window;
          if (!routed || take[part[g_kv][j].item<int64_t>()]) {
            sel += w[j] * vd[g_kv][j];
            mass += w[j].item<double>();
          }
        }
        want += (sel / mass - dense).pow(2).sum().item<double>();
      }
      EXPECT_NEAR(got[h][g].item<double>(), want, 1e-4 * (1 + want)) << "h " << h << " g " << g;
    }
    EXPECT_LT(got[h][3].item<double>(), 1e-9);  // every partition: dense
  }
  EXPECT_THROW(budget_output_errors(q, k, v, part.narrow(1, 0, 5), pos, density, grid, mo),
               std::invalid_argument);
}

}  // namespace
}  // namespace sparseflash::saap
