// Reading and writing SAAP index files. See index.h for the layout.
#include "saap/index.h"

#include <exception>
#include <map>

#include <ATen/ATen.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "checkpoint/safetensors.h"

namespace sparseflash::saap {

namespace {

struct NamedTensor {
  std::string suffix;
  Tensor SaapLayer::*member;
};

Tensor SaapLayer::*member_of(const std::string& suffix) {
  static const std::map<std::string, Tensor SaapLayer::*> members = {
      {"centroids", &SaapLayer::centroids},
      {"classifier.in_mean", &SaapLayer::in_mean},
      {"classifier.in_std", &SaapLayer::in_std},
      {"classifier.w1", &SaapLayer::w1},
      {"classifier.b1", &SaapLayer::b1},
      {"classifier.w2", &SaapLayer::w2},
      {"classifier.b2", &SaapLayer::b2},
      {"budget.lost_mass", &SaapLayer::budget_lost_mass},
      {"budget.keys", &SaapLayer::budget_keys},
      {"budget.output_error", &SaapLayer::budget_output_error},
      {"recency", &SaapLayer::recency}};
  return members.at(suffix);
}

// The tensors a layer holds under `h` (saap_tensor_suffixes).
std::vector<NamedTensor> tensors_of(const SaapHeader& h) {
  std::vector<NamedTensor> names;
  for (const std::string& suffix : saap_tensor_suffixes(h)) names.push_back({suffix, member_of(suffix)});
  return names;
}

std::string shape_text(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
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
  if (absl::Status s = validate_saap_header(h, "SAAP index header"); !s.ok()) return s;
  if (index.layers.size() != static_cast<size_t>(h.num_layers())) {
    return absl::InvalidArgumentError(absl::StrCat("SAAP index: header says ", h.num_layers(),
                                                   " layers, found ", index.layers.size()));
  }
  for (size_t i = 0; i < index.layers.size(); ++i) {
    for (const NamedTensor& t : tensors_of(h)) {
      const Tensor& value = index.layers[i].*t.member;
      const std::vector<int64_t> want = saap_tensor_shape(h, t.suffix);
      if (!value.defined() || value.sizes() != at::IntArrayRef(want)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "SAAP index: ", saap_tensor_name(i, t.suffix), " must be ", shape_text(want), ", got ",
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
      tensors.push_back({saap_tensor_name(i, t.suffix), checkpoint::DType::kF32, value.sizes().vec(),
                         value.data_ptr(), static_cast<size_t>(value.nbytes())});
    }
  }
  std::string header_bytes;
  if (!index.header.SerializeToString(&header_bytes)) {
    return absl::InternalError(absl::StrCat(path, ": cannot serialise the SAAP header"));
  }
  return checkpoint::write_safetensors(path, tensors,
                                      {{kSaapFormatKey, kSaapFormatValue},
                                       {kSaapHeaderKey, absl::Base64Escape(header_bytes)}});
}

absl::StatusOr<SaapIndex> read_saap_index(const std::string& path) {
  absl::StatusOr<std::shared_ptr<const checkpoint::SafetensorsFile>> file =
      checkpoint::SafetensorsFile::open(path);
  if (!file.ok()) return file.status();
  SaapIndex index;
  absl::StatusOr<SaapHeader> header = read_saap_file(
      **file, path, [&](size_t layer, const std::string& suffix, const std::vector<int64_t>& shape) {
        if (index.layers.size() <= layer) index.layers.resize(layer + 1);
        Tensor& value = index.layers[layer].*member_of(suffix);
        value = at::empty(shape, at::kFloat);
        return value.data_ptr<float>();
      });
  if (!header.ok()) return header.status();
  index.header = *std::move(header);
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
