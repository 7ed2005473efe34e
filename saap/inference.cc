// The SAAP attention hook. See inference.h.
#include "saap/inference.h"

#include <stdexcept>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_format.h"
#include "saap/baselines.h"

namespace sparseflash::saap {

const char* routing_name(Routing routing) {
  switch (routing) {
    case Routing::kClassifier: return "classifier";
    case Routing::kSymmetric: return "symmetric";
    case Routing::kAll: return "all";
  }
  return "?";
}

SaapAttentionHook::SaapAttentionHook(const SaapIndex& index, const SaapInferenceOptions& options,
                                     at::Device device)
    : header_(index.header), options_(options) {
  const int64_t C = header_.partitions();
  if (!header_.pre_rope_keys())
    throw std::invalid_argument(
        "SAAP attention: the index was fitted on RoPE'd keys (a baseline); inference needs "
        "one fitted on pre-RoPE keys");
  if (options_.top_l < 1 || options_.top_l > C)
    throw std::invalid_argument(absl::StrFormat(
        "SAAP attention: top-l must be in [1, partitions = %d], got %d", C, options_.top_l));
  attention_.local_window = header_.local_window();
  attention_.sink_tokens = header_.sink_tokens();
  attention_.top_l = options_.top_l;
  attention_.num_partitions = C;
  attention_.chunk_size = options_.chunk_size;
  for (const SaapLayer& layer : index.layers) {
    centroids_.push_back(layer.centroids.to(device, at::kFloat));
    classifiers_.push_back(load_classifier(layer, device));
  }
  caches_.resize(index.layers.size());
}

Tensor SaapAttentionHook::scores(int layer, const Tensor& q_pre) const {
  const int64_t B = q_pre.size(0), H = q_pre.size(1), N = q_pre.size(2), D = q_pre.size(3);
  const int64_t C = header_.partitions();
  Tensor q = q_pre.to(at::kFloat).permute({1, 0, 2, 3}).reshape({H, B * N, D});
  Tensor s;
  switch (options_.routing) {
    case Routing::kClassifier: s = classifiers_[layer]->forward(q); break;
    case Routing::kSymmetric:
      s = centroid_scores(q, centroids_[layer], CentroidScore::kNegativeDistance);
      break;
    case Routing::kAll: s = at::zeros({H, B * N, C}, q.options()); break;
  }
  return s.view({H, B, N, C}).permute({1, 0, 2, 3});
}

Tensor SaapAttentionHook::attend(const model::AttentionCall& call) {
  const int layer = call.layer;
  TORCH_CHECK(layer >= 0 && layer < static_cast<int>(centroids_.size()),
              "SAAP attention: layer ", layer, " but the index has ", centroids_.size());
  const int64_t N = call.q.size(2), T = call.k.size(2);
  const int64_t l = options_.routing == Routing::kAll ? header_.partitions() : options_.top_l;
  Tensor selected = select_partitions(scores(layer, call.q_pre), l);
  SaapVisitStats st;
  Tensor out;
  if (!call.with_cache) {
    Tensor part = assign_key_partitions(call.k_pre, centroids_[layer]);
    out = saap_attention(call.q, call.k, call.v, part, selected, attention_, &st);
  } else {
    auto& cache = caches_[layer];
    if (call.offset == 0) {
      cache = std::make_unique<PartitionedKVCache>(centroids_[layer], call.k.size(0), attention_,
                                                   call.k.scalar_type(), call.k.device());
    }
    TORCH_CHECK(cache && cache->length() == call.offset,
                "SAAP attention: layer ", layer, " cache holds ", cache ? cache->length() : 0,
                " tokens, the call starts at position ", call.offset,
                " (a generation must start at position 0 with this hook installed)");
    cache->append(call.k_pre, call.k.narrow(2, T - N, N), call.v.narrow(2, T - N, N));
    if (N == 1) {
      out = cache->decode(call.q.select(2, 0), selected.select(2, 0), &st).unsqueeze(2);
    } else {
      out = saap_attention(call.q, call.k, call.v, cache->key_partition(), selected, attention_,
                           &st);
    }
  }
  stats_ += st;
  return out;
}

}  // namespace sparseflash::saap
