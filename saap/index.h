// The SAAP index file: per layer, the key centroids of every KV head and the
// classifier of every query head, for one specific model.
//
// One safetensors file (written atomically). Its "__metadata__" holds
//   "sparseflash_format": "saap-v1"
//   "saap_header":        base64 of the binary SaapHeader (saap_index.proto)
// and its tensors, all F32, are for every layer i:
//   layers.{i}.centroids            [kv_heads, C, head_dim]
//   layers.{i}.classifier.in_mean   [query_heads, head_dim]
//   layers.{i}.classifier.in_std    [query_heads, head_dim]
//   layers.{i}.classifier.w1        [query_heads, head_dim, hidden]
//   layers.{i}.classifier.b1        [query_heads, hidden]
//   layers.{i}.classifier.w2        [query_heads, hidden, C]
//   layers.{i}.classifier.b2        [query_heads, C]
// and, when the header's budget_grid has G > 0 entries (saap/budgets.h),
//   layers.{i}.budget.lost_mass     [query_heads, G]
//   layers.{i}.budget.keys          [query_heads, G]
//   layers.{i}.budget.output_error  [query_heads, G]
// and, when the header has B > 0 recency_edges (saap/targets.h),
//   layers.{i}.recency              [query_heads, B + 1]
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "saap/classifier.h"
#include "saap/index_file.h"
#include "saap/saap_index.pb.h"

namespace sparseflash::saap {

using at::Tensor;

struct SaapLayer {
  Tensor centroids;  // float32, CPU, shapes as in the file comment above
  Tensor in_mean, in_std, w1, b1, w2, b2;
  // Budget curves (BudgetCurves), defined iff header.budget_grid is not empty.
  Tensor budget_lost_mass, budget_keys, budget_output_error;
  // Log weights of the recency bands, defined iff header.recency_edges is not empty.
  Tensor recency;
};

struct SaapIndex {
  SaapHeader header;
  std::vector<SaapLayer> layers;  // header.num_layers() of them
};

// A layer's classifier tensors from a trained classifier (detached CPU
// copies), and a classifier (on `device`, eval mode) from a layer's tensors.
void store_classifier(const QueryClassifier& classifier, SaapLayer* layer);
QueryClassifier load_classifier(const SaapLayer& layer, torch::Device device = torch::kCPU);

// Checks the header fields (positive counts, query heads a multiple of KV
// heads, version) and every tensor's shape against them.
absl::Status validate_saap_index(const SaapIndex& index);

// Validates, then writes `path` atomically (tensors converted to CPU float32).
absl::Status write_saap_index(const std::string& path, const SaapIndex& index);

// Reads and validates an index file, whatever model it belongs to.
absl::StatusOr<SaapIndex> read_saap_index(const std::string& path);

// read_saap_index, then refuses an index fitted on another model:
// FailedPrecondition naming the file and both identities.
absl::StatusOr<SaapIndex> load_saap_index(const std::string& path,
                                          const std::string& model_identity);

}  // namespace sparseflash::saap
