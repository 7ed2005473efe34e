// SAAP on a (tiny, random) Llama: fitting an index through the model's
// attention hook, the routing evaluation, and the inference hook, which with
// every partition selected must reproduce the dense model exactly (logits and
// greedy generation through the partitioned decode cache).
#include <gtest/gtest.h>

#include <stdlib.h>

#include <cmath>
#include <map>
#include <random>

#include <ATen/ATen.h>
#include <torch/torch.h>

#include "model/generate.h"
#include "model/llama.h"
#include "saap/budgets.h"
#include "saap/model/calibrate.h"
#include "saap/index.h"
#include "saap/model/inference.h"
#include "tests/test_util.h"

namespace sparseflash::saap {
namespace {

using test_util::must;

// An options error: InvalidArgument whose message holds `text`.
void expect_refused(const absl::Status& status, const std::string& text) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(std::string(status.message()).find(text), std::string::npos) << status;
}

checkpoint::LlamaConfig tiny_config() {
  checkpoint::LlamaConfig c;
  c.vocab_size = 97;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 1024;
  c.rope_theta = 5000;
  return c;
}

// Fresh random weights (seeded from the test's random device, printed on failure).
model::Llama random_llama(uint64_t seed) {
  torch::manual_seed(seed);
  model::Llama m(tiny_config(), std::vector<attention::Options>{attention::Options{}});
  torch::NoGradGuard no_grad;
  for (auto& p : m->named_parameters()) {
    if (p.key().find("norm") != std::string::npos) p.value().copy_(1 + 0.1 * torch::randn_like(p.value()));
    else p.value().normal_(0, 0.3);
  }
  m->eval();
  return m;
}

std::vector<int64_t> random_ids(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ids(n);
  for (auto& id : ids) id = static_cast<int64_t>(rng() % 97);
  return ids;
}

FitOptions small_fit() {
  FitOptions o;
  o.context = 160;
  o.partitions = 8;
  o.hidden = 16;
  o.local_window = 8;
  o.sink_tokens = 2;
  o.kmeans_keys = 256;
  o.kmeans_iterations = 10;
  o.queries_per_window = 96;
  o.train.steps = 60;
  o.train.batch_size = 64;
  o.train.recall_at = {1, 2, 4};
  return o;
}

class SaapLlama : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    RecordProperty("seed", std::to_string(seed_));
    model_ = random_llama(seed_);
    ids_ = random_ids(480, seed_ + 1);
  }
  uint64_t seed_ = 0;
  model::Llama model_{nullptr};
  std::vector<int64_t> ids_;
};

TEST_F(SaapLlama, FitWritesAConsistentIndexThatRoundTrips) {
  FitReport report;
  SaapIndex index = must(fit_saap_index(model_, "fnv1a64:tiny", ids_, small_fit(), &report));
  SCOPED_TRACE("seed " + std::to_string(seed_));
  EXPECT_EQ(report.windows, 3);
  EXPECT_EQ(report.tokens, 480);
  EXPECT_EQ(report.queries_per_head, 3 * 96);
  EXPECT_GE(report.keys_per_head, 8);
  ASSERT_EQ(index.layers.size(), 2u);
  EXPECT_TRUE(index.header.pre_rope_keys());
  EXPECT_TRUE(index.header.count_prior());
  EXPECT_EQ(index.header.local_window(), 8);
  EXPECT_EQ(index.header.sink_tokens(), 2);
  EXPECT_TRUE(validate_saap_index(index).ok());
  for (size_t i = 0; i < report.classifier.recall_at.size(); ++i) {
    EXPECT_GT(report.classifier.recall[i], 0);
    EXPECT_LE(report.classifier.recall[i], report.classifier.oracle_recall[i] + 1e-6);
  }
  char dir_template[] = "/tmp/saap_llama_test_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::string path = dir + "/tiny.saap";
  ASSERT_TRUE(write_saap_index(path, index).ok());
  auto back = load_saap_index(path, "fnv1a64:tiny");
  ASSERT_TRUE(back.ok()) << back.status();
  for (size_t l = 0; l < index.layers.size(); ++l) {
    EXPECT_TRUE(back->layers[l].centroids.equal(index.layers[l].centroids));
    EXPECT_TRUE(back->layers[l].w2.equal(index.layers[l].w2));
  }
  EXPECT_FALSE(load_saap_index(path, "fnv1a64:other").ok());
  test_util::remove_tree(dir);
}

TEST_F(SaapLlama, AllPartitionsReproduceTheDenseModel) {
  SaapIndex index = must(fit_saap_index(model_, "id", ids_, small_fit(), nullptr));
  torch::NoGradGuard no_grad;
  Tensor x = at::tensor(std::vector<int64_t>(ids_.begin(), ids_.begin() + 200)).view({1, -1});
  Tensor dense = model_->forward(x);
  SaapInferenceOptions all;
  all.routing = Routing::kAll;
  auto hook = std::make_shared<SaapAttentionHook>(index, all, at::kCPU);
  model_->set_attention_hook(hook);
  Tensor saap = model_->forward(x);
  EXPECT_LT((saap - dense).abs().max().item<double>(), 1e-4) << "seed " << seed_;
  EXPECT_NEAR(hook->stats().visited_fraction(), 1.0, 1e-12);

  // Greedy generation: prompt prefill, then one-token steps through the
  // partitioned decode cache (CPU reference path), with rebuilds on the way.
  std::vector<int64_t> prompt(ids_.begin(), ids_.begin() + 40);
  model::SamplingOptions greedy;
  auto with_hook = model::generate(model_, prompt, 24, greedy).ids;
  model_->set_attention_hook(nullptr);
  auto without = model::generate(model_, prompt, 24, greedy).ids;
  EXPECT_EQ(with_hook, without) << "seed " << seed_;
}

TEST_F(SaapLlama, FewPartitionsVisitFewerKeysAndChangeTheOutput) {
  SaapIndex index = must(fit_saap_index(model_, "id", ids_, small_fit(), nullptr));
  torch::NoGradGuard no_grad;
  Tensor x = at::tensor(std::vector<int64_t>(ids_.begin(), ids_.begin() + 300)).view({1, -1});
  Tensor dense = model_->forward(x);
  SaapInferenceOptions two;
  two.top_l = 2;
  auto hook = std::make_shared<SaapAttentionHook>(index, two, at::kCPU);
  model_->set_attention_hook(hook);
  Tensor saap = model_->forward(x);
  model_->set_attention_hook(nullptr);
  EXPECT_TRUE(at::isfinite(saap).all().item<bool>());
  EXPECT_GT((saap - dense).abs().max().item<double>(), 1e-4);
  EXPECT_LT(hook->stats().visited_fraction(), 0.9);
  EXPECT_GT(hook->stats().routed_fraction(), 0.0);
  EXPECT_LT(hook->stats().routed_fraction(), 0.9);
  // The oracle (true attention mass per partition) at every partition is
  // dense; at two partitions it is a valid selection too; it has no decode path.
  SaapInferenceOptions oracle_all;
  oracle_all.routing = Routing::kOracle;
  oracle_all.top_l = 8;
  model_->set_attention_hook(std::make_shared<SaapAttentionHook>(index, oracle_all, at::kCPU));
  EXPECT_LT((model_->forward(x) - dense).abs().max().item<double>(), 1e-4) << "seed " << seed_;
  SaapInferenceOptions oracle_two = oracle_all;
  oracle_two.top_l = 2;
  auto oracle_hook = std::make_shared<SaapAttentionHook>(index, oracle_two, at::kCPU);
  model_->set_attention_hook(oracle_hook);
  EXPECT_TRUE(at::isfinite(model_->forward(x)).all().item<bool>());
  EXPECT_LT(oracle_hook->stats().visited_fraction(), 0.9);
  EXPECT_THROW(model::generate(model_, {1, 2, 3}, 2, model::SamplingOptions{}).ids, c10::Error);
  model_->set_attention_hook(nullptr);
  SaapInferenceOptions bad;
  bad.top_l = 9;  // C = 8
  EXPECT_THROW(SaapAttentionHook(index, bad, at::kCPU), std::invalid_argument);
}

TEST_F(SaapLlama, PerHeadBudgetsSplitTheKeyBudgetAndAtFullBudgetAreDense) {
  SaapIndex index = must(fit_saap_index(model_, "id", ids_, small_fit(), nullptr));
  FitOptions no_curves = small_fit();
  no_curves.budget_grid.clear();
  SaapIndex bare = must(fit_saap_index(model_, "id", ids_, no_curves, nullptr));
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const int64_t G = static_cast<int64_t>(default_budget_grid().size());
  ASSERT_EQ(index.header.budget_grid_size(), G);
  for (const SaapLayer& layer : index.layers) {
    ASSERT_EQ(layer.budget_lost_mass.sizes(), at::IntArrayRef({4, G}));
    ASSERT_EQ(layer.budget_output_error.sizes(), at::IntArrayRef({4, G}));
    EXPECT_GE(layer.budget_output_error.min().item<double>(), 0);
    EXPECT_LT(layer.budget_output_error.select(1, G - 1).max().item<double>(), 1e-8);
    // No keys lose the whole routed attention, all keys lose none; the keys
    // taken grow with the budget and never fall short of it.
    EXPECT_TRUE((layer.budget_lost_mass.select(1, 0) >= layer.budget_lost_mass.select(1, G - 1))
                    .all().item<bool>());
    EXPECT_LT(layer.budget_lost_mass.select(1, G - 1).abs().max().item<double>(), 1e-5);
    EXPECT_LT(layer.budget_keys.select(1, 0).abs().max().item<double>(), 1e-6);
    EXPECT_NEAR(layer.budget_keys.select(1, G - 1).min().item<double>(), 1.0, 1e-5);
    Tensor k = layer.budget_keys;
    EXPECT_TRUE((k.narrow(1, 1, G - 1) >= k.narrow(1, 0, G - 1) - 1e-6).all().item<bool>());
    for (int64_t g = 0; g < G; ++g)
      EXPECT_GE(k.select(1, g).min().item<double>(), default_budget_grid()[g] - 1e-5);
  }
  torch::NoGradGuard no_grad;
  Tensor x = at::tensor(std::vector<int64_t>(ids_.begin(), ids_.begin() + 300)).view({1, -1});
  Tensor dense = model_->forward(x);

  // The whole budget: every head gets every key, so the model is dense, in
  // prefill and through the decode cache.
  SaapInferenceOptions full;
  full.key_budget = 1;
  full.per_head_budgets = true;
  auto hook = std::make_shared<SaapAttentionHook>(index, full, at::kCPU);
  ASSERT_EQ(hook->head_budgets().size(), 8u);
  for (double b : hook->head_budgets()) EXPECT_EQ(b, 1.0);
  model_->set_attention_hook(hook);
  EXPECT_LT((model_->forward(x) - dense).abs().max().item<double>(), 1e-4);
  EXPECT_NEAR(hook->stats().visited_fraction(), 1.0, 1e-12);
  std::vector<int64_t> prompt(ids_.begin(), ids_.begin() + 40);
  auto with_hook = model::generate(model_, prompt, 16, model::SamplingOptions{}).ids;
  model_->set_attention_hook(nullptr);
  EXPECT_EQ(with_hook, model::generate(model_, prompt, 16, model::SamplingOptions{}).ids);

  // A quarter of the keys: the heads' mean planned fraction stays within
  // it, some heads differ, and fewer keys are visited.
  SaapInferenceOptions quarter = full;
  quarter.key_budget = 0.25;
  for (BudgetObjective objective : {BudgetObjective::kLostAttention, BudgetObjective::kOutputError}) {
    SaapInferenceOptions o = quarter;
    o.budget_objective = objective;
    SaapAttentionHook h(index, o, at::kCPU);
    EXPECT_LE(h.planned_key_fraction(), 0.25 + 1e-6) << objective_name(objective);
  }
  hook = std::make_shared<SaapAttentionHook>(index, quarter, at::kCPU);
  EXPECT_LE(hook->planned_key_fraction(), 0.25 + 1e-6);
  double mean = 0;
  for (double b : hook->head_budgets()) mean += b / 8;
  EXPECT_GT(mean, 0.0);
  model_->set_attention_hook(hook);
  Tensor sparse = model_->forward(x);
  model_->set_attention_hook(nullptr);
  EXPECT_TRUE(at::isfinite(sparse).all().item<bool>());
  EXPECT_LT(hook->stats().visited_fraction(), 0.9);
  EXPECT_LT(hook->stats().routed_fraction(), 0.5);

  // Refused: no key budget to split, an index without curves.
  SaapInferenceOptions no_budget;
  no_budget.per_head_budgets = true;
  EXPECT_THROW(SaapAttentionHook(index, no_budget, at::kCPU), std::invalid_argument);
  EXPECT_EQ(bare.header.budget_grid_size(), 0);
  EXPECT_FALSE(bare.layers[0].budget_keys.defined());
  EXPECT_THROW(SaapAttentionHook(bare, quarter, at::kCPU), std::invalid_argument);
}

TEST_F(SaapLlama, RecencyBandsFitAndRouteTheSameInPrefillAndDecode) {
  FitOptions o = small_fit();
  o.recency_edges = {4, 12, 40};
  FitReport report;
  SaapIndex index = must(fit_saap_index(model_, "id", ids_, o, &report));
  SCOPED_TRACE("seed " + std::to_string(seed_));
  ASSERT_TRUE(validate_saap_index(index).ok());
  ASSERT_EQ(index.header.recency_edges_size(), 3);
  ASSERT_TRUE(report.recency_log_weights.defined());
  for (size_t l = 0; l < index.layers.size(); ++l) {
    const Tensor& beta = index.layers[l].recency;
    ASSERT_EQ(beta.sizes(), at::IntArrayRef({4, 4}));
    EXPECT_TRUE(at::isfinite(beta).all().item<bool>());
    EXPECT_EQ(beta.select(1, 3).abs().max().item<double>(), 0.0);  // relative to the oldest band
    EXPECT_TRUE(beta.equal(report.recency_log_weights.narrow(0, 4 * l, 4)));
  }
  torch::NoGradGuard no_grad;
  const int64_t n = 300, prefill = 240;
  Tensor x = at::tensor(std::vector<int64_t>(ids_.begin(), ids_.begin() + n)).view({1, -1});
  Tensor dense = model_->forward(x);
  // All partitions: dense, with or without the bands.
  SaapInferenceOptions all;
  all.routing = Routing::kAll;
  model_->set_attention_hook(std::make_shared<SaapAttentionHook>(index, all, at::kCPU));
  EXPECT_LT((model_->forward(x) - dense).abs().max().item<double>(), 1e-4);

  // Two partitions: the whole text at once (prefill path) and a prompt then
  // one token at a time through the partitioned cache (decode path, which
  // counts band keys from the recent keys only) give the same logits.
  SaapInferenceOptions two;
  two.top_l = 2;
  auto hook = std::make_shared<SaapAttentionHook>(index, two, at::kCPU);
  model_->set_attention_hook(hook);
  Tensor whole = model_->forward(x);
  EXPECT_GT((whole - dense).abs().max().item<double>(), 1e-4);
  model_->set_attention_hook(std::make_shared<SaapAttentionHook>(index, two, at::kCPU));
  model::KVCache cache;
  Tensor first = model_->forward(x.narrow(1, 0, prefill), &cache);
  EXPECT_LT((first - whole.narrow(1, 0, prefill)).abs().max().item<double>(), 1e-4);
  double worst = 0;
  for (int64_t t = prefill; t < n; ++t) {
    Tensor step = model_->forward(x.narrow(1, t, 1), &cache);
    worst = std::max(worst, (step - whole.narrow(1, t, 1)).abs().max().item<double>());
  }
  EXPECT_LT(worst, 1e-4);

  // Zero band weights route exactly as the plain count prior.
  SaapIndex flat = index;
  for (SaapLayer& layer : flat.layers) layer.recency = at::zeros_like(layer.recency);
  SaapIndex plain = index;
  plain.header.clear_recency_edges();
  for (SaapLayer& layer : plain.layers) layer.recency = Tensor();
  model_->set_attention_hook(std::make_shared<SaapAttentionHook>(flat, two, at::kCPU));
  Tensor a = model_->forward(x);
  model_->set_attention_hook(std::make_shared<SaapAttentionHook>(plain, two, at::kCPU));
  Tensor b = model_->forward(x);
  model_->set_attention_hook(nullptr);
  EXPECT_LT((a - b).abs().max().item<double>(), 1e-5);

  // Bands the calibration context cannot measure, or without the count
  // prior, are refused.
  FitOptions too_old = o;
  too_old.recency_edges = {4, 200};
  expect_refused(fit_saap_index(model_, "id", ids_, too_old, nullptr).status(),
                 "the oldest recency band starts");
  FitOptions no_prior = o;
  no_prior.count_prior = false;
  expect_refused(fit_saap_index(model_, "id", ids_, no_prior, nullptr).status(),
                 "recency bands weight the count prior");
}

TEST_F(SaapLlama, RoutingEvaluationRanksTheOracleFirst) {
  SaapIndex index = must(fit_saap_index(model_, "id", ids_, small_fit(), nullptr));
  FitOptions rope_fit = small_fit();
  rope_fit.pre_rope_keys = false;
  SaapIndex rope = must(fit_saap_index(model_, "id", ids_, rope_fit, nullptr));
  RoutingEvalOptions o;
  o.context = 160;
  o.queries_per_window = 64;
  o.top_l = {1, 2, 4};
  o.key_budgets = {0.25, 0.5};
  auto report = must(evaluate_routing(model_, index, &rope, ids_, o));
  std::map<std::pair<std::string, int64_t>, RoutingRow> rows;
  for (const auto& r : report.rows)
    if (r.l > 0) rows[{r.method, r.l}] = r;
  for (const char* m : {"saap", "symmetric", "symmetric_dot", "rope_kmeans", "rope_saap", "random",
                        "oracle"})
    for (int64_t l : o.top_l) ASSERT_TRUE(rows.count({m, l})) << m << " l=" << l;
  for (int64_t l : o.top_l) {
    for (const char* m : {"saap", "symmetric", "random"}) {
      const auto& r = rows[{m, l}];
      const double oracle = rows[{"oracle", l}].recall;
      EXPECT_LE(r.recall, oracle + 1e-9) << m << " l=" << l;
      EXPECT_GE(r.recall, 0);
      EXPECT_GT(r.keys_visited, 0);
      EXPECT_LE(r.keys_visited, 1 + 1e-9);
      EXPECT_LE(r.attention_kept, 1 + 1e-6);
    }
    if (l > 1) {
      const double now = rows[{"saap", l}].recall, before = rows[{"saap", l / 2}].recall;
      EXPECT_GE(now, before - 1e-9) << "l=" << l;
    }
  }
  EXPECT_EQ(report.windows, 3);
  EXPECT_GT(report.mean_routed_mass, 0);
  EXPECT_LT(report.mean_routed_mass, 1);
  // Budget rows select at most about the budget (plus the crossing partition).
  int budget_rows = 0;
  for (const auto& r : report.rows)
    if (r.l == 0) {
      ++budget_rows;
      EXPECT_GE(r.routed_keys_visited, 0) << r.method;
      EXPECT_LE(r.routed_keys_visited, 1 + 1e-9) << r.method;
    }
  EXPECT_EQ(budget_rows, 7 * 2);
  // An index of another shape is refused.
  SaapIndex wrong = index;
  wrong.header.set_num_kv_heads(4);
  expect_refused(evaluate_routing(model_, wrong, nullptr, ids_, o).status(),
                 "saap eval --index: the index has 2 layers");
  expect_refused(evaluate_routing(model_, rope, nullptr, ids_, o).status(),
                 "--index was fitted on RoPE'd keys");
}

}  // namespace
}  // namespace sparseflash::saap
