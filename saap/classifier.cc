// Batched per-head MLP classifiers and their training loop (AdamW, soft
// targets). See classifier.h.
#include "saap/classifier.h"

#include <chrono>
#include <cmath>
#include <cstdio>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/activation.h>
#include <torch/optim/adamw.h>

namespace sparseflash::saap {

// ---------------------------------------------------------------------------
// the model

QueryClassifierImpl::QueryClassifierImpl(int64_t heads, int64_t dim, int64_t hidden,
                                         int64_t partitions, uint64_t seed, torch::Device device)
    : heads_(heads), dim_(dim), hidden_(hidden), partitions_(partitions) {
  TORCH_CHECK(heads > 0 && dim > 0 && hidden > 0 && partitions > 1,
              "QueryClassifier: heads, dim, hidden must be positive and partitions > 1, got heads=",
              heads, " dim=", dim, " hidden=", hidden, " partitions=", partitions);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  // Kaiming-uniform-like init as torch::nn::Linear does, per head.
  const double a1 = 1.0 / std::sqrt(static_cast<double>(dim));
  const double a2 = 1.0 / std::sqrt(static_cast<double>(hidden));
  auto uniform = [&](std::vector<int64_t> shape, double bound) {
    return (at::rand(shape, gen) * 2 - 1).mul_(bound).to(device);
  };
  w1 = register_parameter("w1", uniform({heads, dim, hidden}, a1));
  b1 = register_parameter("b1", uniform({heads, hidden}, a1));
  w2 = register_parameter("w2", uniform({heads, hidden, partitions}, a2));
  b2 = register_parameter("b2", uniform({heads, partitions}, a2));
  in_mean = register_buffer("in_mean", torch::zeros({heads, dim}, torch::device(device)));
  in_std = register_buffer("in_std", torch::ones({heads, dim}, torch::device(device)));
}

Tensor QueryClassifierImpl::forward(const Tensor& q) {
  TORCH_CHECK(q.dim() == 3 && q.size(0) == heads_ && q.size(2) == dim_,
              "QueryClassifier: queries must be [heads=", heads_, ", n, dim=", dim_, "], got ",
              q.sizes());
  Tensor x = (q.to(w1.device(), at::kFloat) - in_mean.unsqueeze(1)) / in_std.unsqueeze(1);
  Tensor h = torch::relu(torch::baddbmm(b1.unsqueeze(1), x, w1));
  return torch::baddbmm(b2.unsqueeze(1), h, w2);
}

void QueryClassifierImpl::fit_input_scaling(const Tensor& q) {
  TORCH_CHECK(q.dim() == 3 && q.size(0) == heads_ && q.size(2) == dim_ && q.size(1) > 1,
              "QueryClassifier::fit_input_scaling: queries must be [heads=", heads_,
              ", n>1, dim=", dim_, "], got ", q.sizes());
  torch::NoGradGuard no_grad;
  Tensor x = q.to(in_mean.device(), at::kFloat);
  in_mean.copy_(x.mean(1));
  in_std.copy_(x.std(1).clamp_min(1e-6));
}

// ---------------------------------------------------------------------------
// losses and metrics

namespace {

Tensor normalized_targets(const Tensor& targets) {
  return targets / targets.sum(-1, /*keepdim=*/true);
}

}  // namespace

Tensor log_count_prior(const Tensor& counts) {
  return counts.to(at::kFloat).clamp_min(1e-6).log();
}

Tensor key_density(const Tensor& logits, const Tensor& counts) {
  return logits - log_count_prior(counts);
}

Tensor soft_target_kl(const Tensor& logits, const Tensor& targets, bool weight_by_mass) {
  Tensor raw = targets.to(logits.device(), at::kFloat);
  Tensor t = normalized_targets(raw);
  Tensor log_p = torch::log_softmax(logits, -1);
  // sum t (log t - log p), with 0 log 0 = 0.
  Tensor t_log_t = at::xlogy(t, t);
  Tensor kl = (t_log_t - t * log_p).sum(-1);
  if (!weight_by_mass) return kl.mean();
  // Rows weighted by their mass, the weights averaging 1 in each head.
  Tensor mass = raw.sum(-1);
  return (kl * mass / mass.mean(1, /*keepdim=*/true).clamp_min(1e-30)).mean();
}

Tensor recall_at_l(const Tensor& scores, const Tensor& targets, int64_t l) {
  TORCH_CHECK(scores.sizes() == targets.sizes() && scores.dim() == 3,
              "recall_at_l: scores and targets must both be [heads, n, C], got ", scores.sizes(),
              " and ", targets.sizes());
  TORCH_CHECK(l >= 1 && l <= scores.size(2), "recall_at_l: l must be in [1, C=", scores.size(2),
              "], got ", l);
  Tensor t = normalized_targets(targets.to(scores.device(), at::kFloat));
  Tensor top = std::get<1>(scores.topk(l, -1));
  return t.gather(-1, top).sum(-1).mean(1);
}

// ---------------------------------------------------------------------------
// training

ClassifierReport train_classifier(QueryClassifier& model, const Tensor& queries,
                                  const Tensor& targets, const ClassifierTrainOptions& options,
                                  const Tensor& logit_offsets) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t heads = model->heads(), partitions = model->partitions();
  TORCH_CHECK(queries.dim() == 3 && queries.size(0) == heads && queries.size(2) == model->dim(),
              "train_classifier: queries must be [heads=", heads, ", n, dim=", model->dim(),
              "], got ", queries.sizes());
  const int64_t n = queries.size(1);
  TORCH_CHECK(targets.sizes() == at::IntArrayRef({heads, n, partitions}),
              "train_classifier: targets must be [", heads, ", ", n, ", ", partitions, "], got ",
              targets.sizes());
  TORCH_CHECK(options.holdout_fraction > 0 && options.holdout_fraction < 1,
              "train_classifier: holdout_fraction must be in (0, 1), got ", options.holdout_fraction);
  TORCH_CHECK(options.steps >= 1 && options.batch_size >= 1,
              "train_classifier: steps and batch_size must be >= 1, got ", options.steps, " and ",
              options.batch_size);
  for (int64_t l : options.recall_at) {
    TORCH_CHECK(l >= 1 && l <= partitions, "train_classifier: recall_at value ", l,
                " is outside [1, C=", partitions, "]");
  }
  const torch::Device device = model->w1.device();
  Tensor q = queries.to(device, at::kFloat);
  Tensor t = targets.to(device, at::kFloat);
  TORCH_CHECK(at::isfinite(q).all().item<bool>(), "train_classifier: queries hold NaN or Inf");
  TORCH_CHECK((t >= 0).all().item<bool>() && at::isfinite(t).all().item<bool>(),
              "train_classifier: targets must be finite and non-negative");
  TORCH_CHECK((t.sum(-1) > 0).all().item<bool>(),
              "train_classifier: every target row needs positive attention mass");

  const int64_t holdout = std::max<int64_t>(1, std::llround(n * options.holdout_fraction));
  const int64_t train = n - holdout;
  TORCH_CHECK(train >= 1, "train_classifier: ", n, " queries leave none for training");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  Tensor order = at::randperm(n, gen, at::kLong).to(device);
  Tensor q_train = q.index_select(1, order.narrow(0, 0, train));
  Tensor t_train = t.index_select(1, order.narrow(0, 0, train));
  Tensor q_held = q.index_select(1, order.narrow(0, train, holdout));
  Tensor t_held = t.index_select(1, order.narrow(0, train, holdout));
  Tensor o_train, o_held;
  if (logit_offsets.defined()) {
    TORCH_CHECK(logit_offsets.sizes() == t.sizes(), "train_classifier: logit_offsets must be [",
                heads, ", ", n, ", ", partitions, "], got ", logit_offsets.sizes());
    Tensor o = logit_offsets.to(device, at::kFloat);
    TORCH_CHECK(!at::isnan(o).any().item<bool>() && !at::isinf(o).any().item<bool>(),
                "train_classifier: logit_offsets hold NaN or Inf");
    o_train = o.index_select(1, order.narrow(0, 0, train));
    o_held = o.index_select(1, order.narrow(0, train, holdout));
  }
  // The classifier's logits plus the offsets of the same queries, if any.
  auto scores = [&](const Tensor& q_rows, const Tensor& offsets) {
    Tensor logits = model->forward(q_rows);
    return offsets.defined() ? logits + offsets : logits;
  };

  model->fit_input_scaling(q_train);
  model->train();
  torch::optim::AdamW optimizer(
      model->parameters(),
      torch::optim::AdamWOptions(options.lr).weight_decay(options.weight_decay));
  const int64_t batch = std::min(options.batch_size, train);
  const int64_t tail_from = options.steps - std::max<int64_t>(1, options.steps / 10);
  double tail_sum = 0;
  int64_t tail_count = 0;
  for (int64_t step = 0; step < options.steps; ++step) {
    const double progress = static_cast<double>(step) / options.steps;
    const double lr = options.lr * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * progress)));
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    }
    Tensor idx = at::randint(train, {batch}, gen, at::kLong).to(device);
    Tensor loss = soft_target_kl(
        scores(q_train.index_select(1, idx),
               o_train.defined() ? o_train.index_select(1, idx) : Tensor()),
        t_train.index_select(1, idx), options.weight_by_mass);
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    if (step >= tail_from) {
      tail_sum += loss.item<double>();
      ++tail_count;
    }
    if (options.log_every > 0 && (step + 1) % options.log_every == 0) {
      std::printf("  classifier step %lld/%lld  kl %.4f\n", static_cast<long long>(step + 1),
                  static_cast<long long>(options.steps), loss.item<double>());
    }
  }
  model->eval();

  ClassifierReport report;
  report.train_kl = tail_sum / tail_count;
  report.train_queries = train;
  report.holdout_queries = holdout;
  report.holdout_index = order.narrow(0, train, holdout);
  torch::NoGradGuard no_grad;
  Tensor logits = scores(q_held, o_held);
  report.holdout_kl = soft_target_kl(logits, t_held).item<double>();
  report.recall_at = options.recall_at;
  for (int64_t l : options.recall_at) {
    report.recall.push_back(recall_at_l(logits, t_held, l).mean().item<double>());
    report.oracle_recall.push_back(recall_at_l(t_held, t_held, l).mean().item<double>());
  }
  report.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace sparseflash::saap
