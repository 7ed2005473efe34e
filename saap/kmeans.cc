// Batched Lloyd k-means over heads. See kmeans.h for the contract and
// docs/saap.md for why SAAP uses the Euclidean variant on pre-RoPE keys.
#include "saap/kmeans.h"

#include <algorithm>
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

namespace sparseflash::saap {

namespace {

Tensor normalize_rows(const Tensor& x) {
  return x / x.norm(2, -1, /*keepdim=*/true).clamp_min(1e-12);
}

// Squared distances of x [H, m, d] to centroids [H, C, d], with |x|^2 given.
Tensor squared_distances(const Tensor& x, const Tensor& x_sq, const Tensor& centroids,
                         const Tensor& c_sq) {
  Tensor d = at::baddbmm(x_sq.unsqueeze(-1) + c_sq.unsqueeze(1), x, centroids.transpose(1, 2),
                         /*beta=*/1, /*alpha=*/-2);
  return d.clamp_min_(0);
}

// Gathers rows idx [H, k] of x [H, n, d] -> [H, k, d].
Tensor gather_rows(const Tensor& x, const Tensor& idx) {
  return x.gather(1, idx.unsqueeze(-1).expand({idx.size(0), idx.size(1), x.size(2)}));
}

Tensor kmeans_plus_plus(const Tensor& x, int64_t num_clusters, at::Generator& gen) {
  const int64_t heads = x.size(0), n = x.size(1);
  std::vector<Tensor> chosen;
  chosen.reserve(num_clusters);
  Tensor first = at::randint(n, {heads, 1}, gen, at::kLong).to(x.device());
  chosen.push_back(gather_rows(x, first));
  Tensor min_d = (x - chosen.back()).pow(2).sum(-1);  // [H, n]
  for (int64_t j = 1; j < num_clusters; ++j) {
    // D^2 sampling by inverse CDF with uniforms from the CPU generator, so a
    // seed gives the same centroids on any device.
    Tensor cdf = min_d.to(at::kDouble).cumsum(1);
    Tensor total = cdf.select(1, n - 1).unsqueeze(1);
    Tensor u = at::rand({heads, 1}, gen, at::kDouble).to(x.device()) * total;
    Tensor idx = at::searchsorted(cdf, u, /*out_int32=*/false, /*right=*/true).clamp_max_(n - 1);
    chosen.push_back(gather_rows(x, idx));
    min_d = at::minimum(min_d, (x - chosen.back()).pow(2).sum(-1));
  }
  return at::cat(chosen, 1);
}

Tensor random_sample(const Tensor& x, int64_t num_clusters, at::Generator& gen) {
  Tensor keys = at::rand({x.size(0), x.size(1)}, gen);
  Tensor idx = std::get<1>(keys.topk(num_clusters, 1)).to(x.device());
  return gather_rows(x, idx);
}

// Lloyd iterations from `centroids` (already normalised for kSpherical, as x is).
KMeansResult lloyd(const Tensor& x, Tensor centroids, const KMeansOptions& options) {
  const int64_t heads = x.size(0), n = x.size(1), dim = x.size(2);
  const int64_t num_clusters = centroids.size(1);
  const bool spherical = options.metric == KMeansMetric::kSpherical;
  // scikit-learn's scale for the tolerance: mean per-dimension variance.
  Tensor shift_limit = x.var(1, /*unbiased=*/false).mean(-1) * options.tolerance;  // [H]
  KMeansResult result;
  Tensor previous;
  Tensor ones = at::ones({heads, n}, x.options());
  for (int64_t it = 1; it <= options.max_iterations; ++it) {
    Tensor distance;
    Tensor assignments = assign_to_centroids(x, centroids, KMeansMetric::kEuclidean,
                                             options.chunk_size, &distance);
    if (previous.defined() && at::equal(previous, assignments)) {
      result.converged = true;
      break;
    }
    previous = assignments;

    Tensor sums = at::zeros_like(centroids).scatter_add_(
        1, assignments.unsqueeze(-1).expand({heads, n, dim}), x);
    Tensor counts = at::zeros({heads, num_clusters}, x.options()).scatter_add_(1, assignments, ones);
    Tensor updated = sums / counts.clamp_min(1).unsqueeze(-1);

    // Empty clusters: the e-th empty cluster of a head takes the head's e-th
    // farthest point from its current centroid, which also splits the
    // cluster with the largest error.
    Tensor empty = counts == 0;
    const int64_t num_empty = empty.sum().item<int64_t>();
    if (num_empty > 0) {
      const int64_t most = empty.sum(1).max().item<int64_t>();
      Tensor farthest = std::get<1>(distance.topk(most, 1));          // [H, most]
      Tensor rank = (empty.cumsum(1) - 1).clamp_(0, most - 1);         // [H, C]
      Tensor seeds = gather_rows(x, farthest.gather(1, rank));         // [H, C, d]
      updated = at::where(empty.unsqueeze(-1), seeds, updated);
      result.reseeded += num_empty;
    }
    if (spherical) updated = normalize_rows(updated);

    Tensor shift = (updated - centroids).pow(2).sum({1, 2});
    centroids = updated;
    result.iterations = it;
    if (num_empty == 0 && (shift <= shift_limit).all().item<bool>()) {
      result.converged = true;
      break;
    }
  }

  result.assignments = assign_to_centroids(x, centroids, KMeansMetric::kEuclidean,
                                           options.chunk_size, nullptr);
  // The inertia from the distances themselves (|x - c|^2), not from the
  // |x|^2 - 2 x.c + |c|^2 expansion the assignment uses: with a large common
  // offset (keys of one head share one) the expansion cancels catastrophically
  // in float32, and the inertia picks the best of the restarts.
  // Chunked over the points, as the assignment is, to bound memory.
  result.inertia = at::zeros({heads}, x.options());
  const int64_t step = std::max<int64_t>(1, options.chunk_size);
  for (int64_t i = 0; i < n; i += step) {
    const int64_t len = std::min(step, n - i);
    Tensor own = gather_rows(centroids, result.assignments.narrow(1, i, len));  // [H, len, d]
    result.inertia += (x.narrow(1, i, len) - own).pow(2).sum({1, 2});
  }
  result.centroids = centroids;
  return result;
}

}  // namespace

const char* kmeans_metric_name(KMeansMetric metric) {
  return metric == KMeansMetric::kSpherical ? "spherical" : "euclidean";
}

Tensor assign_to_centroids(const Tensor& x_in, const Tensor& centroids_in, KMeansMetric metric,
                           int64_t chunk_size, Tensor* min_distance) {
  TORCH_CHECK(x_in.dim() == 3, "assign_to_centroids: x must be [heads, n, d], got ", x_in.sizes());
  TORCH_CHECK(centroids_in.dim() == 3 && centroids_in.size(0) == x_in.size(0) &&
                  centroids_in.size(2) == x_in.size(2),
              "assign_to_centroids: centroids must be [heads=", x_in.size(0), ", C, d=",
              x_in.size(2), "], got ", centroids_in.sizes());
  TORCH_CHECK(chunk_size > 0, "assign_to_centroids: chunk_size must be positive, got ", chunk_size);
  Tensor x = x_in.to(at::kFloat);
  if (metric == KMeansMetric::kSpherical) x = normalize_rows(x);
  Tensor centroids = centroids_in.to(x.device(), at::kFloat).contiguous();
  Tensor c_sq = centroids.pow(2).sum(-1);
  const int64_t n = x.size(1);
  std::vector<Tensor> ids, dists;
  for (int64_t start = 0; start < n; start += chunk_size) {
    Tensor xc = x.narrow(1, start, std::min(chunk_size, n - start));
    auto [d, i] = squared_distances(xc, xc.pow(2).sum(-1), centroids, c_sq).min(-1);
    ids.push_back(i);
    dists.push_back(d);
  }
  if (min_distance != nullptr) *min_distance = at::cat(dists, 1);
  return at::cat(ids, 1);
}

KMeansResult batched_kmeans(const Tensor& x_in, const KMeansOptions& options) {
  TORCH_CHECK(x_in.defined() && x_in.dim() == 3,
              "batched_kmeans: x must be [heads, n, d], got ",
              x_in.defined() ? x_in.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "batched_kmeans: x must be floating point, got ",
              x_in.scalar_type());
  const int64_t heads = x_in.size(0), n = x_in.size(1), dim = x_in.size(2);
  const int64_t num_clusters = options.num_clusters;
  TORCH_CHECK(heads > 0 && dim > 0, "batched_kmeans: x has an empty dimension: ", x_in.sizes());
  TORCH_CHECK(num_clusters >= 1, "batched_kmeans: num_clusters must be >= 1, got ", num_clusters);
  TORCH_CHECK(n >= num_clusters, "batched_kmeans: need at least num_clusters=", num_clusters,
              " points per head, got n=", n);
  TORCH_CHECK(options.max_iterations >= 1, "batched_kmeans: max_iterations must be >= 1, got ",
              options.max_iterations);
  TORCH_CHECK(options.tolerance >= 0, "batched_kmeans: tolerance must be >= 0, got ",
              options.tolerance);
  TORCH_CHECK(options.num_init >= 1, "batched_kmeans: num_init must be >= 1, got ",
              options.num_init);
  TORCH_CHECK(options.num_init == 1 || !options.initial_centroids.defined(),
              "batched_kmeans: num_init must be 1 when initial_centroids are given");
  TORCH_CHECK(options.chunk_size > 0, "batched_kmeans: chunk_size must be positive, got ",
              options.chunk_size);

  const bool spherical = options.metric == KMeansMetric::kSpherical;
  Tensor x = x_in.to(at::kFloat).contiguous();
  TORCH_CHECK(at::isfinite(x).all().item<bool>(), "batched_kmeans: x holds NaN or Inf");
  if (spherical) x = normalize_rows(x);

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  KMeansResult best;
  for (int64_t run = 0; run < options.num_init; ++run) {
    Tensor centroids;
    if (options.initial_centroids.defined()) {
      TORCH_CHECK(options.initial_centroids.sizes() == at::IntArrayRef({heads, num_clusters, dim}),
                  "batched_kmeans: initial_centroids must be [", heads, ", ", num_clusters, ", ",
                  dim, "], got ", options.initial_centroids.sizes());
      centroids = options.initial_centroids.to(x.device(), at::kFloat).clone();
    } else if (options.init == KMeansInit::kPlusPlus) {
      centroids = kmeans_plus_plus(x, num_clusters, gen);
    } else {
      centroids = random_sample(x, num_clusters, gen);
    }
    if (spherical) centroids = normalize_rows(centroids);
    KMeansResult r = lloyd(x, centroids, options);
    if (run == 0) {
      best = r;
      continue;
    }
    Tensor better = r.inertia < best.inertia;  // [H]
    best.centroids = at::where(better.view({heads, 1, 1}), r.centroids, best.centroids);
    best.assignments = at::where(better.view({heads, 1}), r.assignments, best.assignments);
    best.inertia = at::where(better, r.inertia, best.inertia);
    best.iterations = std::max(best.iterations, r.iterations);
    best.converged = best.converged && r.converged;
    best.reseeded += r.reseeded;
  }
  return best;
}

}  // namespace sparseflash::saap
