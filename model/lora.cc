// LoRA adapters: the adapted projection, adding adapters to a model and
// freezing the rest, merging.
#include "model/lora.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/linear.h>
#include <torch/utils.h>

namespace sparseflash::model {

namespace F = torch::nn::functional;

// ---------------------------------------------------------------------------
// the projection

Tensor LoraLinearImpl::forward(const Tensor& x) {
  Tensor y = torch::nn::LinearImpl::forward(x);
  if (!lora_a_.defined()) return y;
  // y + scale (x A^T) B^T as one GEMM that accumulates into y (beta = 1):
  // no separate scaling and addition passes over the [tokens, out] output.
  std::vector<int64_t> shape = y.sizes().vec();
  Tensor xa = F::linear(x, lora_a_).reshape({-1, lora_a_.size(0)});
  return at::addmm(y.reshape({-1, y.size(-1)}), xa, lora_b_.t(), /*beta=*/1, /*alpha=*/scale_)
      .view(shape);
}

void LoraLinearImpl::add_adapter(int64_t rank, double alpha, at::Generator& generator) {
  if (lora_a_.defined()) throw std::invalid_argument("LoRA: the projection has an adapter already");
  if (rank < 1) throw std::invalid_argument("LoRA: rank must be >= 1, got " + std::to_string(rank));
  const int64_t out = weight.size(0), in = weight.size(1);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  Tensor a = at::empty({rank, in}, at::TensorOptions().dtype(at::kFloat));
  a.uniform_(-bound, bound, generator);
  lora_a_ = register_parameter("lora_a", a.to(weight.options()));
  lora_b_ = register_parameter("lora_b", at::zeros({out, rank}, weight.options()));
  scale_ = alpha / static_cast<double>(rank);
}

Tensor LoraLinearImpl::merged_weight() const {
  torch::NoGradGuard no_grad;
  if (!lora_a_.defined()) return weight.detach();
  Tensor delta = at::matmul(lora_b_.to(at::kFloat), lora_a_.to(at::kFloat)) * scale_;
  return (weight.to(at::kFloat) + delta).to(weight.scalar_type());
}

void LoraLinearImpl::merge() {
  if (!lora_a_.defined()) return;
  {
    torch::NoGradGuard no_grad;
    weight.copy_(merged_weight());
  }
  parameters_.erase("lora_a");
  parameters_.erase("lora_b");
  lora_a_ = Tensor();
  lora_b_ = Tensor();
  scale_ = 0;
}

// ---------------------------------------------------------------------------
// options

LoraOptions LoraOptions::from_config(const config::Model::Lora& c) {
  LoraOptions o;
  o.rank = c.rank();
  o.alpha = c.alpha();
  o.targets.assign(c.targets().begin(), c.targets().end());
  o.train_embeddings = c.train_embeddings();
  o.train_norms = c.train_norms();
  return o;
}

std::vector<std::string> lora_target_names(config::Model::Arch arch) {
  if (arch == config::Model::LLAMA)
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return {"c_attn", "c_proj", "c_fc", "mlp_proj"};
}

// ---------------------------------------------------------------------------
// a model

namespace {

std::string last_part(const std::string& path) {
  const size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// Token and position embeddings, and an untied output head.
bool is_embedding(const std::string& name) {
  return contains(name, "embed_tokens") || contains(name, "lm_head") || name == "wte.weight" ||
         name == "wpe.weight";
}

// RMSNorm / LayerNorm gains and LayerNorm biases.
bool is_norm(const std::string& name) { return contains(name, "norm") || contains(name, "ln_"); }

}  // namespace

void add_lora(torch::nn::Module& model, config::Model::Arch arch, const LoraOptions& options,
              uint64_t seed) {
  if (options.rank < 1)
    throw std::invalid_argument("model.lora.rank must be >= 1, got " + std::to_string(options.rank));
  const std::vector<std::string> known = lora_target_names(arch);
  const std::vector<std::string> targets = options.targets.empty() ? known : options.targets;
  for (const std::string& t : targets)
    if (std::find(known.begin(), known.end(), t) == known.end()) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      throw std::invalid_argument("model.lora.targets: this model has no projection \"" + t +
                                  "\" (it has " + list + ")");
    }
  const std::set<std::string> wanted(targets.begin(), targets.end());
  at::Generator generator = at::detail::createCPUGenerator(seed);
  int adapted = 0;
  for (const auto& item : model.named_modules()) {
    auto* linear = dynamic_cast<LoraLinearImpl*>(item.value().get());
    if (!linear || !wanted.count(last_part(item.key()))) continue;
    linear->add_adapter(options.rank, options.alpha, generator);
    ++adapted;
  }
  if (adapted == 0) throw std::invalid_argument("model.lora: no projection to adapt");
  for (auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    const bool adapter = contains(name, ".lora_a") || contains(name, ".lora_b");
    const bool train = adapter || (options.train_embeddings && is_embedding(name)) ||
                       (options.train_norms && is_norm(name));
    item.value().set_requires_grad(train);
  }
}

int merge_lora(torch::nn::Module& model) {
  int merged = 0;
  for (const auto& item : model.modules()) {
    auto* linear = dynamic_cast<LoraLinearImpl*>(item.get());
    if (!linear || !linear->has_adapter()) continue;
    linear->merge();
    ++merged;
  }
  return merged;
}

}  // namespace sparseflash::model
