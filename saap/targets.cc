// Attention mass per key partition, chunked over queries. See targets.h.
#include "saap/targets.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_format.h"
#include "io/errors.h"

namespace sparseflash::saap {

namespace {

// The checks shared by the mass functions; returns Hq / Hkv.
int64_t check_mass_inputs(const Tensor& q, const Tensor& k, const Tensor& q_pos,
                          const MassOptions& options, const char* what) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(2) == k.size(2), what,
              ": q must be [Hq, nq, d] and k [Hkv, nk, d], got ", q.sizes(), " and ", k.sizes());
  const int64_t hq = q.size(0), nq = q.size(1), hkv = k.size(0), nk = k.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, what, ": query heads ", hq,
              " are not a multiple of KV heads ", hkv);
  TORCH_CHECK(q_pos.dim() == 1 && q_pos.size(0) == nq && q_pos.scalar_type() == at::kLong, what,
              ": q_pos must be int64 [", nq, "], got ", q_pos.sizes(), " ", q_pos.scalar_type());
  TORCH_CHECK(options.local_window >= 0 && options.sink_tokens >= 0 && options.chunk_size > 0,
              what, ": local_window and sink_tokens must be >= 0 and chunk_size > 0");
  if (nq > 0) {
    TORCH_CHECK(q_pos.min().item<int64_t>() >= 0 && q_pos.max().item<int64_t>() < nk, what,
                ": q_pos must lie in [0, ", nk, ")");
  }
  return hq / hkv;
}

// Calls visit(start, m, weights, pos) for each chunk of m queries from
// `start`: weights [Hkv, group * m, nk] the causal softmax weights zeroed
// outside the routed keys (sink_tokens <= j <= q_pos - local_window), pos
// [group * m] the query positions (query head h = kv * group + g).
template <typename Visit>
void for_each_routed_chunk(const Tensor& q, const Tensor& k, const Tensor& q_pos,
                           const MassOptions& options, int64_t group, Visit visit) {
  const int64_t hkv = k.size(0), nq = q.size(1), nk = k.size(1), d = q.size(2);
  const double scale = options.scale > 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
  const auto device = q.device();
  Tensor keys = k.to(device, at::kFloat);
  Tensor positions = q_pos.to(device);
  Tensor key_index = at::arange(nk, positions.options());  // [nk]
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
    visit(start, m, weights, pos);
  }
}

}  // namespace

Tensor partition_attention_mass(const Tensor& q, const Tensor& k, const Tensor& q_pos,
                                const Tensor& partition, int64_t num_partitions,
                                const MassOptions& options) {
  const int64_t group = check_mass_inputs(q, k, q_pos, options, "partition_attention_mass");
  const int64_t hq = q.size(0), nq = q.size(1), hkv = k.size(0), nk = k.size(1);
  TORCH_CHECK(partition.sizes() == at::IntArrayRef({hkv, nk}) &&
                  partition.scalar_type() == at::kLong,
              "partition_attention_mass: partition must be int64 [", hkv, ", ", nk, "], got ",
              partition.sizes(), " ", partition.scalar_type());
  TORCH_CHECK(num_partitions >= 1, "partition_attention_mass: num_partitions must be >= 1");
  if (nk > 0) {
    TORCH_CHECK(partition.min().item<int64_t>() >= 0 &&
                    partition.max().item<int64_t>() < num_partitions,
                "partition_attention_mass: partition ids must lie in [0, ", num_partitions, ")");
  }
  // [Hkv, nk, C] one-hot of each key's partition: the per-partition sums are one bmm.
  Tensor one_hot = at::one_hot(partition.to(q.device()), num_partitions).to(at::kFloat);
  Tensor result = at::empty({hq, nq, num_partitions}, q.options().dtype(at::kFloat));
  for_each_routed_chunk(q, k, q_pos, options, group,
                        [&](int64_t start, int64_t m, const Tensor& weights, const Tensor&) {
                          Tensor mass = at::bmm(weights, one_hot);  // [Hkv, group*m, C]
                          result.narrow(1, start, m).copy_(mass.reshape({hq, m, num_partitions}));
                        });
  return result;
}

absl::Status check_recency_edges(const std::vector<int64_t>& edges, const char* what) {
  for (size_t i = 0; i < edges.size(); ++i) {
    if (edges[i] < 1 || (i > 0 && edges[i] <= edges[i - 1]))
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: recency band edges must ascend strictly from >= 1, got %d at %d", what, edges[i],
          i));
  }
  return absl::OkStatus();
}

Tensor distance_band_mass(const Tensor& q, const Tensor& k, const Tensor& q_pos,
                          const std::vector<int64_t>& edges, const MassOptions& options) {
  io::check_argument(check_recency_edges(edges, "distance_band_mass"));
  const int64_t group = check_mass_inputs(q, k, q_pos, options, "distance_band_mass");
  const int64_t hq = q.size(0), nq = q.size(1), hkv = k.size(0), nk = k.size(1);
  const int64_t bands = static_cast<int64_t>(edges.size()) + 1;
  Tensor cuts = at::tensor(edges, q_pos.options().device(q.device()));
  Tensor key_index = at::arange(nk, cuts.options());
  Tensor result = at::empty({hq, nq, bands}, q.options().dtype(at::kFloat));
  for_each_routed_chunk(
      q, k, q_pos, options, group,
      [&](int64_t start, int64_t m, const Tensor& weights, const Tensor& pos) {
        // Age beyond the last routable key; unrouted keys carry weight 0, so
        // their (clamped) band does not matter.
        Tensor age = (pos.unsqueeze(1) - options.local_window - key_index.unsqueeze(0))
                         .clamp_min(0);                                       // [group*m, nk]
        Tensor band = at::bucketize(age, cuts, /*out_int32=*/false, /*right=*/true);
        Tensor mass = at::zeros({hkv, group * m, bands}, weights.options())
                          .scatter_add_(2, band.unsqueeze(0).expand({hkv, group * m, nk}), weights);
        result.narrow(1, start, m).copy_(mass.reshape({hq, m, bands}));
      });
  return result;
}

Tensor distance_band_counts(const Tensor& q_pos, int64_t local_window, int64_t sink_tokens,
                            const std::vector<int64_t>& edges) {
  io::check_argument(check_recency_edges(edges, "distance_band_counts"));
  TORCH_CHECK(q_pos.dim() == 1, "distance_band_counts: q_pos must be [nq], got ", q_pos.sizes());
  // Routable keys at or before position x: |[sink_tokens, x]|.
  auto upto = [&](const Tensor& x) { return (x - sink_tokens + 1).clamp_min(0); };
  Tensor last = q_pos.to(at::kLong) - local_window;
  std::vector<Tensor> bands;
  Tensor younger = upto(last);
  for (int64_t e : edges) {
    Tensor older = upto(last - e);
    bands.push_back(younger - older);
    younger = older;
  }
  bands.push_back(younger);
  return at::stack(bands, 1).to(at::kFloat);
}

Tensor recency_weighted_counts(const Tensor& routable, const Tensor& partition,
                               int64_t first_position, const Tensor& q_pos,
                               int64_t local_window, int64_t sink_tokens,
                               const std::vector<int64_t>& edges, const Tensor& log_weights) {
  io::check_argument(check_recency_edges(edges, "recency_weighted_counts"));
  const int64_t B = static_cast<int64_t>(edges.size());
  TORCH_CHECK(partition.dim() >= 2 && routable.dim() == partition.dim() + 1 && q_pos.dim() == 1,
              "recency_weighted_counts: routable must be [..., Hkv, nq, C], partition "
              "[..., Hkv, T'] and q_pos [nq], got ",
              routable.sizes(), ", ", partition.sizes(), " and ", q_pos.sizes());
  const int64_t dim = partition.dim() - 1, T = partition.size(dim), hkv = partition.size(dim - 1);
  const int64_t nq = q_pos.size(0), C = routable.size(-1);
  TORCH_CHECK(routable.size(-3) == hkv && routable.size(-2) == nq,
              "recency_weighted_counts: routable ", routable.sizes(), " does not match ", hkv,
              " KV heads and ", nq, " queries");
  TORCH_CHECK(log_weights.dim() == 2 && log_weights.size(1) == B + 1 &&
                  log_weights.size(0) % hkv == 0,
              "recency_weighted_counts: log_weights must be [Hq, ", B + 1,
              "] with Hq a multiple of ", hkv, ", got ", log_weights.sizes());
  TORCH_CHECK(first_position >= 0, "recency_weighted_counts: first_position must be >= 0");
  const int64_t group = log_weights.size(0) / hkv;
  // Checked where the caller keeps q_pos (a host copy spares a device sync).
  if (nq > 0 && B > 0) {
    const int64_t oldest_needed = q_pos.min().item<int64_t>() - local_window - edges.back() + 1;
    TORCH_CHECK(first_position <= std::max(sink_tokens, oldest_needed),
                "recency_weighted_counts: the partitions start at position ", first_position,
                " but the recent bands reach back to ", std::max(sink_tokens, oldest_needed));
  }
  Tensor pos = q_pos.to(partition.device(), at::kLong);
  std::vector<int64_t> rshape(routable.sizes().begin(), routable.sizes().end());
  rshape[rshape.size() - 3] *= group;
  // exp(beta) as [Hq, 1, 1] per band; result = w_B routable + sum_b<B (w_b - w_B) band_b.
  Tensor w = log_weights.to(routable.device(), at::kFloat).exp();
  auto per_head = [&](const Tensor& x /* [..., Hkv, nq, C] */, const Tensor& wb /* [Hq] */) {
    return x.repeat_interleave(group, -3) * wb.view({-1, 1, 1});
  };
  const Tensor w_old = w.select(1, B);
  Tensor result = per_head(routable.to(at::kFloat), w_old);
  if (B == 0 || nq == 0 || T == 0) return result.view(rshape);
  if (nq == 1) {
    // One query (a decode step): count the slice's keys per (band, partition)
    // with one scatter instead of prefix sums over [T', C].
    Tensor key_pos = at::arange(first_position, first_position + T, pos.options());
    Tensor age = pos.select(0, 0) - local_window - key_pos;  // [T']
    Tensor band = at::zeros_like(age);  // the edges at or below the age
    for (int64_t e : edges) band += age.ge(e);
    Tensor in_band = (age >= 0) & (key_pos >= sink_tokens) & (band < B);  // [T']
    std::vector<int64_t> flat(partition.sizes().begin(), partition.sizes().end());
    flat.back() = B * C;
    Tensor index = band.clamp_max(B - 1) * C + partition.to(at::kLong);  // [..., Hkv, T']
    Tensor counts = at::zeros(flat, routable.options().dtype(at::kFloat))
                        .scatter_add_(-1, index, in_band.to(at::kFloat).expand_as(index));
    std::vector<int64_t> split(flat.begin(), flat.end() - 1);
    split.push_back(B);
    split.push_back(C);
    counts = counts.view(split);  // [..., Hkv, B, C]
    for (int64_t b = 0; b < B; ++b)
      result += per_head(counts.select(-2, b).unsqueeze(-2), w.select(1, b) - w_old);
    return result.clamp_min(0);
  }
  // cum[..., t, c]: keys at positions first_position .. first_position + t in c.
  std::vector<int64_t> shape(partition.sizes().begin(), partition.sizes().end());
  shape.push_back(C);
  Tensor cum = at::zeros(shape, routable.options().dtype(at::kFloat))
                   .scatter_(-1, partition.to(at::kLong).unsqueeze(-1), 1.0)
                   .cumsum(dim);
  // Keys of the slice in [lo, x]: the routable ones it holds.
  const int64_t lo = std::max(sink_tokens, first_position);
  Tensor base = lo - 1 - first_position >= 0 ? cum.select(dim, std::min(lo - 1 - first_position, T - 1))
                                             : Tensor();
  std::vector<int64_t> valid_shape(shape.size(), 1);
  valid_shape[dim] = nq;
  auto upto = [&](const Tensor& x /* [nq] */) {
    Tensor c = cum.index_select(dim, (x - first_position).clamp(0, T - 1));
    if (base.defined()) c = c - base.unsqueeze(dim);
    return c * x.ge(lo).to(at::kFloat).view(valid_shape);
  };
  Tensor last = pos - local_window;
  Tensor younger = upto(last);
  for (int64_t b = 0; b < B; ++b) {
    Tensor older = upto(last - edges[b]);
    result += per_head(younger - older, w.select(1, b) - w_old);
    younger = older;
  }
  return result.clamp_min(0);
}

Tensor recency_log_weights(const Tensor& band_mass, const Tensor& band_keys) {
  TORCH_CHECK(band_mass.dim() == 2 && band_keys.dim() == 1 &&
                  band_keys.size(0) == band_mass.size(1) && band_mass.size(1) >= 1,
              "recency_log_weights: band_mass must be [Hq, B + 1] and band_keys [B + 1], got ",
              band_mass.sizes(), " and ", band_keys.sizes());
  Tensor keys = band_keys.to(band_mass.device(), at::kDouble);
  TORCH_CHECK((keys > 0).all().item<bool>(),
              "recency_log_weights: every band needs routable keys, got ", band_keys);
  Tensor density = band_mass.to(at::kDouble).clamp_min(0) / keys.unsqueeze(0);
  Tensor floor = (density.amax(1, /*keepdim=*/true) * 1e-6).clamp_min(1e-300);
  Tensor log_density = at::maximum(density, floor).log();
  return (log_density - log_density.narrow(1, band_mass.size(1) - 1, 1)).to(at::kFloat);
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
