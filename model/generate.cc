// The sampler: temperature, then top-k, then top-p, on float64 probabilities.
#include "model/generate.h"

#include <limits>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/utils.h>

namespace sparseflash::model {

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::kMaxTokens: return "max_tokens";
    case StopReason::kEndOfSequence: return "end_of_sequence";
    case StopReason::kContext: return "context_full";
    case StopReason::kCaller: return "stopped";
  }
  return "?";
}

// The next id from float32 logits [vocab] on the CPU.
static int64_t pick(const Tensor& logits, const SamplingOptions& s, at::Generator& sampler) {
  if (s.temperature <= 0) return logits.argmax().item<int64_t>();
  Tensor scaled = logits.to(at::kDouble) / s.temperature;
  if (s.top_k > 0 && s.top_k < scaled.size(0)) {
    Tensor kth = std::get<0>(scaled.topk(s.top_k)).select(0, s.top_k - 1);
    scaled = scaled.masked_fill(scaled.lt(kth), -std::numeric_limits<double>::infinity());
  }
  Tensor probs = at::softmax(scaled, -1);
  if (s.top_p < 1) {
    auto [sorted, order] = probs.sort(/*dim=*/-1, /*descending=*/true);
    // Keep the most likely tokens up to and including the one that reaches top_p.
    Tensor before = sorted.cumsum(-1) - sorted;
    Tensor keep = before.lt(s.top_p);
    keep.index_put_({0}, true);
    sorted = sorted.masked_fill(keep.logical_not(), 0);
    probs = at::zeros_like(probs).scatter(-1, order, sorted);
  }
  return at::multinomial(probs, 1, false, sampler).item<int64_t>();
}

Generation generate(CausalLM model, const std::vector<int64_t>& prompt, int64_t max_new,
                    const SamplingOptions& sampling,
                    const std::function<bool(int64_t)>& on_token) {
  const int64_t context = model->context_length();
  const int64_t n = static_cast<int64_t>(prompt.size());
  TORCH_CHECK(n > 0, "generate: the prompt has no tokens");
  TORCH_CHECK(n < context, "generate: the prompt has ", n,
              " tokens; the model's context length is ", context,
              ", so nothing can follow it (shorten the prompt)");
  TORCH_CHECK(max_new >= 0, "generate: max_new must be >= 0, got ", max_new);
  TORCH_CHECK(sampling.top_p > 0 && sampling.top_p <= 1,
              "generate: top_p must be in (0, 1], got ", sampling.top_p);
  TORCH_CHECK(sampling.top_k >= 0, "generate: top_k must be >= 0, got ", sampling.top_k);
  for (int64_t id : prompt)
    TORCH_CHECK(id >= 0 && id < model->vocab_size(), "generate: prompt token ", id,
                " is outside the vocabulary [0, ", model->vocab_size(), ")");
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  at::Generator sampler = at::detail::createCPUGenerator(sampling.seed);
  KVCache cache;
  Generation out;
  Tensor ids = at::tensor(prompt, at::TensorOptions().dtype(at::kLong)).view({1, -1});
  try {
    for (int64_t t = 0;; ++t) {
      if (t == max_new) {
        out.stop = StopReason::kMaxTokens;
        break;
      }
      Tensor h = model->hidden_states(ids.to(model->device()), &cache).select(1, -1);  // [1, d]
      const int64_t next = pick(model->logits(h)[0].cpu(), sampling, sampler);
      out.ids.push_back(next);
      if (on_token && !on_token(next)) {
        out.stop = StopReason::kCaller;
        break;
      }
      if (next == sampling.eos_id) {
        out.stop = StopReason::kEndOfSequence;
        break;
      }
      // The sequence now holds cache.length + 1 tokens (the last not yet
      // fed); it may not grow past the context length.
      if (cache.length + 1 >= context) {
        out.stop = StopReason::kContext;
        break;
      }
      ids = at::full({1, 1}, next, at::TensorOptions().dtype(at::kLong));
    }
  } catch (...) {
    if (was_training) model->train();
    throw;
  }
  if (was_training) model->train();
  return out;
}

}  // namespace sparseflash::model
