// Routing baselines. See baselines.h.
#include "saap/baselines.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

namespace sparseflash::saap {

Tensor centroid_scores(const Tensor& q, const Tensor& centroids, CentroidScore score) {
  TORCH_CHECK(q.dim() == 3 && centroids.dim() == 3 && q.size(2) == centroids.size(2),
              "centroid_scores: q must be [Hq, n, d] and centroids [Hkv, C, d], got ", q.sizes(),
              " and ", centroids.sizes());
  const int64_t hq = q.size(0), n = q.size(1), d = q.size(2), hkv = centroids.size(0),
                c = centroids.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "centroid_scores: query heads ", hq,
              " are not a multiple of KV heads ", hkv);
  const int64_t group = hq / hkv;
  // [Hq, n, d] -> [Hkv, group * n, d]: query head h = kv * group + g.
  Tensor x = q.to(at::kFloat).reshape({hkv, group * n, d});
  Tensor cents = centroids.to(q.device(), at::kFloat);
  Tensor dot = at::bmm(x, cents.transpose(1, 2));  // [Hkv, group*n, C]
  if (score == CentroidScore::kNegativeDistance) {
    // -|q|^2 is the same for every partition of a query; it does not change the order.
    dot = dot.mul_(2).sub_(cents.pow(2).sum(-1).unsqueeze(1));
  }
  return dot.reshape({hq, n, c});
}

Tensor random_partitions(int64_t kv_heads, int64_t num_keys, int64_t num_partitions,
                         uint64_t seed) {
  TORCH_CHECK(kv_heads > 0 && num_keys >= 0 && num_partitions > 0,
              "random_partitions: kv_heads and num_partitions must be positive and num_keys "
              ">= 0, got ", kv_heads, ", ", num_partitions, ", ", num_keys);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(num_partitions, {kv_heads, num_keys}, gen, at::kLong);
}

}  // namespace sparseflash::saap
