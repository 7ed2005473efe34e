// The torch-free half of reading SAAP index files. See index_file.h.
#include "saap/index_file.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace sparseflash::saap {

absl::Status validate_saap_header(const SaapHeader& h, const std::string& where) {
  if (h.format_version() != kSaapFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": format_version ", h.format_version(),
                                                   ", this build reads ", kSaapFormatVersion));
  }
  if (h.model_identity().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": model_identity is empty"));
  }
  const std::pair<const char*, int64_t> positive[] = {
      {"num_layers", h.num_layers()},     {"num_query_heads", h.num_query_heads()},
      {"num_kv_heads", h.num_kv_heads()}, {"head_dim", h.head_dim()},
      {"classifier_hidden", h.classifier_hidden()}};
  for (const auto& [field, value] : positive) {
    if (value < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", field, " must be positive, got ", value));
    }
  }
  if (h.partitions() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": partitions must be >= 2, got ", h.partitions()));
  }
  if (h.num_query_heads() % h.num_kv_heads() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": num_query_heads ", h.num_query_heads(),
                     " is not a multiple of num_kv_heads ", h.num_kv_heads()));
  }
  if (h.local_window() < 0 || h.sink_tokens() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": local_window and sink_tokens must be >= 0, got ",
                     h.local_window(), " and ", h.sink_tokens()));
  }
  for (int i = 0; i < h.budget_grid_size(); ++i) {
    const float g = h.budget_grid(i);
    if (!(g >= 0 && g <= 1) || (i > 0 && !(g > h.budget_grid(i - 1)))) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": budget_grid must ascend strictly within [0, 1], got ", g, " at ", i));
    }
  }
  for (int i = 0; i < h.recency_edges_size(); ++i) {
    const int32_t e = h.recency_edges(i);
    if (e < 1 || (i > 0 && e <= h.recency_edges(i - 1))) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": recency_edges must ascend strictly from >= 1, got ", e, " at ", i));
    }
  }
  if (h.recency_edges_size() > 0 && !h.count_prior()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": recency_edges need count_prior (the bands weight its counts)"));
  }
  return absl::OkStatus();
}

std::vector<std::string> saap_tensor_suffixes(const SaapHeader& h) {
  std::vector<std::string> suffixes = {"centroids",         "classifier.in_mean", "classifier.in_std",
                                       "classifier.w1",     "classifier.b1",      "classifier.w2",
                                       "classifier.b2"};
  if (h.budget_grid_size() > 0)
    suffixes.insert(suffixes.end(), {"budget.lost_mass", "budget.keys", "budget.output_error"});
  if (h.recency_edges_size() > 0) suffixes.push_back("recency");
  return suffixes;
}

std::string saap_tensor_name(size_t layer, const std::string& suffix) {
  return absl::StrCat("layers.", layer, ".", suffix);
}

std::vector<int64_t> saap_tensor_shape(const SaapHeader& h, const std::string& suffix) {
  const int64_t kv = h.num_kv_heads(), q = h.num_query_heads(), d = h.head_dim(),
                c = h.partitions(), hidden = h.classifier_hidden();
  if (suffix == "centroids") return {kv, c, d};
  if (suffix == "classifier.in_mean" || suffix == "classifier.in_std") return {q, d};
  if (suffix == "classifier.w1") return {q, d, hidden};
  if (suffix == "classifier.b1") return {q, hidden};
  if (suffix == "classifier.w2") return {q, hidden, c};
  if (absl::StartsWith(suffix, "budget.")) return {q, h.budget_grid_size()};
  if (suffix == "recency") return {q, h.recency_edges_size() + 1};
  return {q, c};  // classifier.b2
}

absl::StatusOr<SaapHeader> read_saap_file(const checkpoint::SafetensorsFile& file,
                                          const std::string& path, const SaapTensorBuffer& buffer) {
  const auto& meta = file.metadata();
  auto format = meta.find(kSaapFormatKey);
  if (format == meta.end() || format->second != kSaapFormatValue) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a SAAP index (metadata ", kSaapFormatKey, " is ",
        format == meta.end() ? "missing" : "\"" + format->second + "\"", ", expected \"",
        kSaapFormatValue, "\")"));
  }
  auto encoded = meta.find(kSaapHeaderKey);
  std::string header_bytes;
  SaapHeader header;
  if (encoded == meta.end() || !absl::Base64Unescape(encoded->second, &header_bytes) ||
      !header.ParseFromString(header_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": metadata ", kSaapHeaderKey, " is missing or not a base64 SaapHeader protobuf"));
  }
  if (absl::Status s = validate_saap_header(header, absl::StrCat(path, ": header")); !s.ok()) {
    return s;
  }
  const std::vector<std::string> suffixes = saap_tensor_suffixes(header);
  const size_t expected_count = static_cast<size_t>(header.num_layers()) * suffixes.size();
  if (file.tensors().size() != expected_count) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", file.tensors().size(),
                                                   " tensors, the header implies ",
                                                   expected_count));
  }
  for (size_t i = 0; i < static_cast<size_t>(header.num_layers()); ++i) {
    for (const std::string& suffix : suffixes) {
      const std::string name = saap_tensor_name(i, suffix);
      const checkpoint::TensorInfo* info = file.find(name);
      const std::vector<int64_t> want = saap_tensor_shape(header, suffix);
      if (info == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " is missing"));
      }
      if (info->dtype != checkpoint::DType::kF32 || info->shape != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": tensor ", name, " must be F32 ", checkpoint::shape_string(want), ", found ",
            checkpoint::dtype_name(info->dtype), " ", checkpoint::shape_string(info->shape)));
      }
      float* values = buffer(i, suffix, want);
      checkpoint::to_float32(*info, values);
      float* const end = values + info->numel();
      if (!std::all_of(values, end, [](float v) { return std::isfinite(v); })) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " holds NaN or Inf"));
      }
      if (suffix == "classifier.in_std" && !std::all_of(values, end, [](float v) { return v > 0; })) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " must be positive (it divides the queries)"));
      }
      if (absl::StartsWith(suffix, "budget.") &&
          !std::all_of(values, end, [](float v) { return v >= 0; })) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " must be non-negative"));
      }
    }
  }
  return header;
}

}  // namespace sparseflash::saap
