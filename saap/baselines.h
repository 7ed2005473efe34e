// Routing baselines SAAP is compared against: queries scored against the key
// centroids themselves (symmetric k-means), and keys split at random.
// The oracle is recall_at_l(targets, targets, l) (classifier.h).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace sparseflash::saap {

using at::Tensor;

enum class CentroidScore {
  kNegativeDistance,  // nearest centroid first: -|q - c|^2 (symmetric k-means)
  kDotProduct,        // largest q . c first (the centroid's own attention logit)
};

// q [Hq, n, d], centroids [Hkv, C, d] (Hq a multiple of Hkv; query head h
// uses the centroids of KV head h / (Hq / Hkv)) -> float32 [Hq, n, C]
// partition scores, higher = visit first.
Tensor centroid_scores(const Tensor& q, const Tensor& centroids, CentroidScore score);

// Every key in a uniformly random partition: int64 [kv_heads, num_keys] in
// [0, C), drawn from a CPU generator seeded with `seed`.
Tensor random_partitions(int64_t kv_heads, int64_t num_keys, int64_t num_partitions,
                         uint64_t seed);

}  // namespace sparseflash::saap
