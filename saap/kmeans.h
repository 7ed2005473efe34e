// Batched k-means: one independent clustering per head, all heads at once.
//
// Points x [heads, n, d] -> centroids [heads, C, d] and assignments
// [heads, n]. Distances come from batched matmuls
// (|x|^2 - 2 x c^T + |c|^2), so the same code runs on CPU and CUDA tensors.
// SAAP clusters keys with it (Euclidean, see docs/saap.md for why).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace sparseflash::saap {

using at::Tensor;

enum class KMeansMetric {
  kEuclidean,  // squared L2 distance, centroid = mean
  kSpherical,  // points and centroids on the unit sphere, nearest = largest cosine
};
enum class KMeansInit {
  kPlusPlus,      // k-means++ (D^2 sampling)
  kRandomSample,  // C distinct points drawn uniformly
};

struct KMeansOptions {
  int64_t num_clusters = 64;  // C
  KMeansMetric metric = KMeansMetric::kEuclidean;
  KMeansInit init = KMeansInit::kPlusPlus;
  int64_t max_iterations = 50;
  // Stops when, in every head, the summed squared centroid shift of an
  // iteration is at most tolerance * (mean per-dimension variance of the
  // head's points), as scikit-learn does; or when no assignment changed.
  double tolerance = 1e-4;
  uint64_t seed = 1234;  // all random draws come from a CPU generator seeded here
  // Points per assignment chunk: bounds the [heads, chunk, C] distance block.
  int64_t chunk_size = 16384;
  // Independent runs (each from its own draw of `init`); every head keeps
  // the run with its lowest inertia, as scikit-learn's n_init does.
  int64_t num_init = 1;
  // [heads, C, d]: start from these instead of `init` (normalised for kSpherical).
  Tensor initial_centroids;
};

struct KMeansResult {
  Tensor centroids;    // float32 [heads, C, d], on x's device
  Tensor assignments;  // int64 [heads, n]
  Tensor inertia;      // float32 [heads]: summed distance of points to their centroid
  int64_t iterations = 0;  // the most any run took
  bool converged = false;  // every run converged
  int64_t reseeded = 0;  // empty clusters re-seeded, over all heads and iterations
};

// x: [heads, n, d] floating point, n >= C. Computed in float32.
// Throws c10::Error naming the argument for bad shapes or options.
KMeansResult batched_kmeans(const Tensor& x, const KMeansOptions& options);

// Nearest centroid of every point: x [heads, n, d], centroids [heads, C, d]
// -> int64 [heads, n]. For kSpherical, x is normalised first (the centroids
// already are). `min_distance`, when non-null, receives the distance [heads, n].
Tensor assign_to_centroids(const Tensor& x, const Tensor& centroids, KMeansMetric metric,
                           int64_t chunk_size = 16384, Tensor* min_distance = nullptr);

const char* kmeans_metric_name(KMeansMetric metric);

}  // namespace sparseflash::saap
