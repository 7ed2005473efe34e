// Reading and writing SAAP index files. See index.h for the layout.
#include "saap/index.h"

#include <exception>

#include <ATen/ATen.h>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "checkpoint/safetensors.h"

namespace sparseflash::saap {

namespace {

struct NamedTensor {
  std::string suffix;
  Tensor SaapLayer::*member;
};

const std::vector<NamedTensor>& layer_tensors() {
  static const std::vector<NamedTensor> names = {
      {"centroids", &SaapLayer::centroids},        {"classifier.in_mean", &SaapLayer::in_mean},
      {"classifier.in_std", &SaapLayer::in_std},   {"classifier.w1", &SaapLayer::w1},
      {"classifier.b1", &SaapLayer::b1},           {"classifier.w2", &SaapLayer::w2},
      {"classifier.b2", &SaapLayer::b2},
  };
  return names;
}

// Present iff the header has a budget grid.
const std::vector<NamedTensor>& budget_tensors() {
  static const std::vector<NamedTensor> names = {
      {"budget.lost_mass", &SaapLayer::budget_lost_mass},
      {"budget.keys", &SaapLayer::budget_keys},
      {"budget.output_error", &SaapLayer::budget_output_error}};
  return names;
}

// The tensors a layer holds under `h`.
std::vector<NamedTensor> tensors_of(const SaapHeader& h) {
  std::vector<NamedTensor> names = layer_tensors();
  if (h.budget_grid_size() > 0)
    names.insert(names.end(), budget_tensors().begin(), budget_tensors().end());
  if (h.recency_edges_size() > 0) names.push_back({"recency", &SaapLayer::recency});
  return names;
}

std::string tensor_name(size_t layer, const std::string& suffix) {
  return absl::StrCat("layers.", layer, ".", suffix);
}

// The shape each tensor must have under `h`.
std::vector<int64_t> expected_shape(const SaapHeader& h, const std::string& suffix) {
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

std::string shape_text(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

absl::Status validate_header(const SaapHeader& h, const std::string& where) {
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

}  // namespace

void store_classifier(const QueryClassifier& classifier, SaapLayer* layer) {
  auto copy = [](const Tensor& t) { return t.detach().to(at::kCPU, at::kFloat).clone(); };
  layer->in_mean = copy(classifier->in_mean);
  layer->in_std = copy(classifier->in_std);
  layer->w1 = copy(classifier->w1);
  layer->b1 = copy(classifier->b1);
  layer->w2 = copy(classifier->w2);
  layer->b2 = copy(classifier->b2);
}

QueryClassifier load_classifier(const SaapLayer& layer, torch::Device device) {
  TORCH_CHECK(layer.w1.defined() && layer.w1.dim() == 3 && layer.w2.defined() &&
                  layer.w2.dim() == 3,
              "load_classifier: the layer has no classifier weights");
  QueryClassifier classifier(layer.w1.size(0), layer.w1.size(1), layer.w1.size(2),
                             layer.w2.size(2), /*seed=*/0, device);
  torch::NoGradGuard no_grad;
  const std::pair<Tensor*, const Tensor*> pairs[] = {
      {&classifier->in_mean, &layer.in_mean}, {&classifier->in_std, &layer.in_std},
      {&classifier->w1, &layer.w1},           {&classifier->b1, &layer.b1},
      {&classifier->w2, &layer.w2},           {&classifier->b2, &layer.b2}};
  for (const auto& [to, from] : pairs) {
    TORCH_CHECK(from->sizes() == to->sizes(), "load_classifier: tensor of shape ", from->sizes(),
                " where ", to->sizes(), " is expected");
    to->copy_(*from);
  }
  classifier->eval();
  return classifier;
}

absl::Status validate_saap_index(const SaapIndex& index) {
  const SaapHeader& h = index.header;
  if (absl::Status s = validate_header(h, "SAAP index header"); !s.ok()) return s;
  if (index.layers.size() != static_cast<size_t>(h.num_layers())) {
    return absl::InvalidArgumentError(absl::StrCat("SAAP index: header says ", h.num_layers(),
                                                   " layers, found ", index.layers.size()));
  }
  for (size_t i = 0; i < index.layers.size(); ++i) {
    for (const NamedTensor& t : tensors_of(h)) {
      const Tensor& value = index.layers[i].*t.member;
      const std::vector<int64_t> want = expected_shape(h, t.suffix);
      if (!value.defined() || value.sizes() != at::IntArrayRef(want)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "SAAP index: ", tensor_name(i, t.suffix), " must be ", shape_text(want), ", got ",
            value.defined() ? shape_text(value.sizes()) : "undefined"));
      }
    }
    if (h.budget_grid_size() == 0 &&
        (index.layers[i].budget_lost_mass.defined() || index.layers[i].budget_keys.defined() ||
         index.layers[i].budget_output_error.defined())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SAAP index: layer ", i, " has budget curves but the header has no budget_grid"));
    }
    if (h.recency_edges_size() == 0 && index.layers[i].recency.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SAAP index: layer ", i, " has recency weights but the header has no recency_edges"));
    }
  }
  return absl::OkStatus();
}

absl::Status write_saap_index(const std::string& path, const SaapIndex& index) {
  if (absl::Status s = validate_saap_index(index); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.message()));
  }
  std::vector<Tensor> keep;  // CPU float32 copies the writer reads from
  std::vector<checkpoint::TensorToWrite> tensors;
  for (size_t i = 0; i < index.layers.size(); ++i) {
    for (const NamedTensor& t : tensors_of(index.header)) {
      Tensor value = (index.layers[i].*t.member).detach().to(at::kCPU, at::kFloat).contiguous();
      keep.push_back(value);
      tensors.push_back({tensor_name(i, t.suffix), checkpoint::DType::kF32, value.sizes().vec(),
                         value.data_ptr(), static_cast<size_t>(value.nbytes())});
    }
  }
  std::string header_bytes;
  if (!index.header.SerializeToString(&header_bytes)) {
    return absl::InternalError(absl::StrCat(path, ": cannot serialise the SAAP header"));
  }
  try {
    checkpoint::write_safetensors(path, tensors,
                                  {{kSaapFormatKey, kSaapFormatValue},
                                   {kSaapHeaderKey, absl::Base64Escape(header_bytes)}});
  } catch (const std::exception& e) {
    return absl::UnavailableError(e.what());
  }
  return absl::OkStatus();
}

absl::StatusOr<SaapIndex> read_saap_index(const std::string& path) {
  std::shared_ptr<const checkpoint::SafetensorsFile> file;
  try {
    file = checkpoint::SafetensorsFile::open(path);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(e.what());
  }
  const auto& meta = file->metadata();
  auto format = meta.find(kSaapFormatKey);
  if (format == meta.end() || format->second != kSaapFormatValue) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a SAAP index (metadata ", kSaapFormatKey, " is ",
        format == meta.end() ? "missing" : "\"" + format->second + "\"", ", expected \"",
        kSaapFormatValue, "\")"));
  }
  auto encoded = meta.find(kSaapHeaderKey);
  std::string header_bytes;
  SaapIndex index;
  if (encoded == meta.end() || !absl::Base64Unescape(encoded->second, &header_bytes) ||
      !index.header.ParseFromString(header_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": metadata ", kSaapHeaderKey, " is missing or not a base64 SaapHeader protobuf"));
  }
  if (absl::Status s = validate_header(index.header, absl::StrCat(path, ": header"));
      !s.ok()) {
    return s;
  }
  const std::vector<NamedTensor> names = tensors_of(index.header);
  const size_t expected_count = index.header.num_layers() * names.size();
  if (file->tensors().size() != expected_count) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", file->tensors().size(),
                                                   " tensors, the header implies ",
                                                   expected_count));
  }
  index.layers.resize(index.header.num_layers());
  for (size_t i = 0; i < index.layers.size(); ++i) {
    for (const NamedTensor& t : names) {
      const std::string name = tensor_name(i, t.suffix);
      const checkpoint::TensorInfo* info = file->find(name);
      const std::vector<int64_t> want = expected_shape(index.header, t.suffix);
      if (info == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " is missing"));
      }
      if (info->dtype != checkpoint::DType::kF32 || info->shape != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": tensor ", name, " must be F32 ", shape_text(want), ", found ",
            checkpoint::dtype_name(info->dtype), " ", checkpoint::shape_string(info->shape)));
      }
      Tensor value = at::empty(want, at::kFloat);
      checkpoint::to_float32(*info, value.data_ptr<float>());
      if (!at::isfinite(value).all().item<bool>()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " holds NaN or Inf"));
      }
      if (t.suffix == "classifier.in_std" && !(value > 0).all().item<bool>()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " must be positive (it divides the queries)"));
      }
      if (absl::StartsWith(t.suffix, "budget.") && !(value >= 0).all().item<bool>()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", name, " must be non-negative"));
      }
      index.layers[i].*t.member = value;
    }
  }
  return index;
}

absl::StatusOr<SaapIndex> load_saap_index(const std::string& path,
                                          const std::string& model_identity) {
  absl::StatusOr<SaapIndex> index = read_saap_index(path);
  if (!index.ok()) return index.status();
  if (index->header.model_identity() != model_identity) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": SAAP index was fitted on model ", index->header.model_identity(),
        " but the loaded model is ", model_identity, "; fit an index for this model"));
  }
  return index;
}

}  // namespace sparseflash::saap
