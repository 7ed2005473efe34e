// Per-query-head partition classifiers: one 2-layer MLP per head (d -> hidden
// -> C), all heads evaluated at once with batched matmuls over [heads, ...]
// weights. Trained on soft targets (the attention mass each query puts on
// each key partition) with the KL divergence, scored by recall@l.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

namespace sparseflash::saap {

using at::Tensor;

class QueryClassifierImpl : public torch::nn::Module {
 public:
  // Weights drawn from `seed` (CPU generator, then moved to `device`).
  QueryClassifierImpl(int64_t heads, int64_t dim, int64_t hidden, int64_t partitions,
                      uint64_t seed = 1234, torch::Device device = torch::kCPU);

  // q [heads, n, dim] -> logits float32 [heads, n, partitions].
  Tensor forward(const Tensor& q);

  // Per-head input standardisation (kept as buffers, saved in the index):
  // inputs are (q - mean) / std before the first layer. Queries of a Llama
  // head share a large mean component; without this the first layer mostly
  // sees it.
  void fit_input_scaling(const Tensor& q);

  int64_t heads() const { return heads_; }
  int64_t dim() const { return dim_; }
  int64_t hidden() const { return hidden_; }
  int64_t partitions() const { return partitions_; }

  Tensor in_mean, in_std;  // [heads, dim]
  Tensor w1, b1;           // [heads, dim, hidden], [heads, hidden]
  Tensor w2, b2;           // [heads, hidden, partitions], [heads, partitions]

 private:
  int64_t heads_, dim_, hidden_, partitions_;
};
TORCH_MODULE(QueryClassifier);

struct ClassifierTrainOptions {
  int64_t steps = 2000;
  int64_t batch_size = 512;  // queries per head per step
  double lr = 3e-3;           // AdamW, cosine decay to lr / 10
  double weight_decay = 1e-2;
  double holdout_fraction = 0.1;  // last queries (after a seeded shuffle) held out
  uint64_t seed = 1234;
  std::vector<int64_t> recall_at = {1, 2, 4};  // l values reported on held-out queries
  int64_t log_every = 0;  // > 0: print the training loss every this many steps
  // Weight each query's KL by its target mass (the attention it sends to the
  // routed keys; rows are unnormalised targets), so the queries whose routing
  // changes the output most count most. The reported KL stays unweighted.
  bool weight_by_mass = false;
};

struct ClassifierReport {
  double train_kl = 0;    // mean KL(target || prediction) over the last 10% of steps
  double holdout_kl = 0;  // on the held-out queries
  // recall[i]: held-out recall@recall_at[i], averaged over heads and queries.
  std::vector<int64_t> recall_at;
  std::vector<double> recall;
  std::vector<double> oracle_recall;  // the same l with the true top-l partitions
  int64_t train_queries = 0, holdout_queries = 0;
  // The held-out queries' columns of `queries` (int64 [holdout_queries], on
  // the classifier's device), for measurements on the same split.
  Tensor holdout_index;
  double seconds = 0;
};

// queries [heads, n, dim]; targets [heads, n, C], non-negative, every row with
// positive mass (rows are normalised to distributions here). Trains `model`
// in place on the non-held-out queries (fit_input_scaling included).
// logit_offsets (optional, finite, [heads, n, C]) are added to the logits
// in training and in the held-out report: SAAP passes the log of the number
// of keys each partition holds for that query, so the classifier learns the
// attention per key and the cache's counts scale it at inference.
ClassifierReport train_classifier(QueryClassifier& model, const Tensor& queries,
                                  const Tensor& targets, const ClassifierTrainOptions& options,
                                  const Tensor& logit_offsets = Tensor());

// The logit offsets of count-aware classifiers (header count_prior): the log
// of each partition's number of routable keys, float32, with empty
// partitions at log(1e-6) (finite, so no NaN reaches the softmax).
Tensor log_count_prior(const Tensor& counts);

// Predicted attention per key of each partition: logits that score a
// partition's attention mass (count-aware classifier logits with their prior
// added, or the log of true masses) less log_count_prior(counts), counts the
// partition's routable keys. Key budgets take partitions in this order.
Tensor key_density(const Tensor& logits, const Tensor& counts);

// Mean KL(target || softmax(logits)) over heads and queries; targets normalised
// per row. weight_by_mass: each row's KL weighted by its unnormalised mass
// (weights averaging 1 per head).
Tensor soft_target_kl(const Tensor& logits, const Tensor& targets, bool weight_by_mass = false);

// Fraction of each query's attention mass held by its top-l scored
// partitions, per head: scores, targets [heads, n, C] -> float32 [heads].
// Scoring with the targets themselves gives the oracle recall.
Tensor recall_at_l(const Tensor& scores, const Tensor& targets, int64_t l);

}  // namespace sparseflash::saap
