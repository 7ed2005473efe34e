// Attention mass per key partition, chunked over queries. See targets.h.
#include "saap/targets.h"

#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace sparseflash::saap {

Tensor partition_attention_mass(const Tensor& q, const Tensor& k, const Tensor& q_pos,
                                const Tensor& partition, int64_t num_partitions,
                                const MassOptions& options) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(2) == k.size(2),
              "partition_attention_mass: q must be [Hq, nq, d] and k [Hkv, nk, d], got ",
              q.sizes(), " and ", k.sizes());
  const int64_t hq = q.size(0), nq = q.size(1), d = q.size(2);
  const int64_t hkv = k.size(0), nk = k.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "partition_attention_mass: query heads ", hq,
              " are not a multiple of KV heads ", hkv);
  TORCH_CHECK(q_pos.dim() == 1 && q_pos.size(0) == nq && q_pos.scalar_type() == at::kLong,
              "partition_attention_mass: q_pos must be int64 [", nq, "], got ", q_pos.sizes(),
              " ", q_pos.scalar_type());
  TORCH_CHECK(partition.sizes() == at::IntArrayRef({hkv, nk}) &&
                  partition.scalar_type() == at::kLong,
              "partition_attention_mass: partition must be int64 [", hkv, ", ", nk, "], got ",
              partition.sizes(), " ", partition.scalar_type());
  TORCH_CHECK(num_partitions >= 1, "partition_attention_mass: num_partitions must be >= 1");
  TORCH_CHECK(options.local_window >= 0 && options.sink_tokens >= 0 && options.chunk_size > 0,
              "partition_attention_mass: local_window and sink_tokens must be >= 0 and "
              "chunk_size > 0");
  if (nq > 0) {
    TORCH_CHECK(q_pos.min().item<int64_t>() >= 0 && q_pos.max().item<int64_t>() < nk,
                "partition_attention_mass: q_pos must lie in [0, ", nk, ")");
  }
  if (nk > 0) {
    TORCH_CHECK(partition.min().item<int64_t>() >= 0 &&
                    partition.max().item<int64_t>() < num_partitions,
                "partition_attention_mass: partition ids must lie in [0, ", num_partitions, ")");
  }
  const int64_t group = hq / hkv;
  const double scale = options.scale > 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
  const auto device = q.device();
  Tensor keys = k.to(device, at::kFloat);
  Tensor positions = q_pos.to(device);
  // [Hkv, nk, C] one-hot of each key's partition: the per-partition sums are one bmm.
  Tensor one_hot = at::one_hot(partition.to(device), num_partitions).to(at::kFloat);
  Tensor key_index = at::arange(nk, positions.options());  // [nk]
  Tensor result = at::empty({hq, nq, num_partitions}, q.options().dtype(at::kFloat));
  for (int64_t start = 0; start < nq; start += options.chunk_size) {
    const int64_t m = std::min(options.chunk_size, nq - start);
    // [Hq, m, d] -> [Hkv, group * m, d]: query head h = kv * group + g.
    Tensor qc = q.narrow(1, start, m).to(at::kFloat).reshape({hkv, group * m, d});
    Tensor scores = at::bmm(qc, keys.transpose(1, 2)).mul_(scale);  // [Hkv, group*m, nk]
    Tensor pos = positions.narrow(0, start, m).repeat({group});      // [group*m]
    Tensor future = key_index.unsqueeze(0) > pos.unsqueeze(1);       // [group*m, nk]
    scores.masked_fill_(future.unsqueeze(0), -std::numeric_limits<float>::infinity());
    Tensor weights = at::softmax(scores, -1);
    Tensor routed = (key_index.unsqueeze(0) >= options.sink_tokens) &
                    (key_index.unsqueeze(0) <= pos.unsqueeze(1) - options.local_window);
    weights.mul_(routed.unsqueeze(0).to(at::kFloat));
    Tensor mass = at::bmm(weights, one_hot);  // [Hkv, group*m, C]
    result.narrow(1, start, m).copy_(mass.reshape({hq, m, num_partitions}));
  }
  return result;
}

Tensor routable_key_counts(const Tensor& partition, int64_t num_partitions, const Tensor& q_pos,
                           int64_t local_window, int64_t sink_tokens) {
  TORCH_CHECK(partition.dim() >= 1 && q_pos.dim() == 1,
              "routable_key_counts: partition must be [..., T] and q_pos [nq], got ",
              partition.sizes(), " and ", q_pos.sizes());
  const int64_t dim = partition.dim() - 1, T = partition.size(dim);
  std::vector<int64_t> shape(partition.sizes().begin(), partition.sizes().end());
  shape.push_back(num_partitions);
  // cum[..., j, c]: keys 0..j in partition c.
  Tensor cum = at::zeros(shape, partition.options().dtype(at::kFloat))
                   .scatter_(-1, partition.unsqueeze(-1), 1.0)
                   .cumsum(dim);
  Tensor last = q_pos.to(partition.device()) - local_window;  // last routable key
  Tensor counts = cum.index_select(dim, last.clamp(0, T - 1));
  if (sink_tokens > 0)
    counts = counts - cum.select(dim, std::min(sink_tokens, T) - 1).unsqueeze(dim);
  std::vector<int64_t> valid_shape(shape.size(), 1);
  valid_shape[dim] = q_pos.size(0);
  return counts * last.ge(sink_tokens).to(at::kFloat).view(valid_shape);
}

}  // namespace sparseflash::saap
