// Sliding-window perplexity. Reading order: the windows, the checked entry point.
#include "model/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/utils.h>

#include "absl/strings/str_cat.h"

namespace sparseflash::model {

// ---------------------------------------------------------------------------
// windows

double PerplexityResult::perplexity() const { return std::exp(mean_nll()); }

PerplexityResult sliding_window_nll(CausalLM model, const std::vector<int64_t>& ids,
                                    int64_t context, int64_t stride,
                                    const std::function<void(const PerplexityResult&)>& progress) {
  TORCH_CHECK(context >= 2, "sliding_window_nll: context must be >= 2, got ", context);
  TORCH_CHECK(stride >= 1 && stride <= context, "sliding_window_nll: stride must be in [1, ",
              context, "], got ", stride);
  TORCH_CHECK(ids.size() >= 2, "sliding_window_nll: need at least 2 tokens, got ", ids.size());
  torch::NoGradGuard no_grad;
  const int64_t total = static_cast<int64_t>(ids.size());
  const at::Device dev = model->device();
  // The head and log-softmax run on this many rows at a time, so a long
  // window never materialises [context, vocab] float32 logits at once.
  constexpr int64_t kHeadRows = 1024;
  Tensor all = at::tensor(ids, at::TensorOptions().dtype(at::kLong));
  PerplexityResult r;
  const auto start = std::chrono::steady_clock::now();
  int64_t prev_end = 0;
  for (int64_t begin = 0;; begin += stride) {
    const int64_t end = std::min(begin + context, total);
    const int64_t first = std::max(prev_end, begin + 1);  // first target this window scores
    Tensor hidden = model->hidden_states(all.slice(0, begin, end).unsqueeze(0).to(dev))[0];
    Tensor targets = all.slice(0, first, end).to(dev);
    // Position t is predicted by the hidden state of t - 1.
    Tensor h = hidden.slice(0, first - 1 - begin, end - 1 - begin);
    Tensor window_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(dev));
    for (int64_t row = 0; row < h.size(0); row += kHeadRows) {
      const int64_t n = std::min(kHeadRows, h.size(0) - row);
      Tensor logp = at::log_softmax(model->logits(h.slice(0, row, row + n)), -1);
      window_sum -= logp.gather(1, targets.slice(0, row, row + n).unsqueeze(1)).sum().to(at::kDouble);
    }
    r.nll_sum += window_sum.item<double>();
    r.tokens += end - first;
    r.windows += 1;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(r);
    prev_end = end;
    if (end == total) break;
  }
  return r;
}

int64_t window_count(int64_t tokens, int64_t context, int64_t stride) {
  if (tokens <= context) return 1;
  return 1 + (tokens - context + stride - 1) / stride;
}

// ---------------------------------------------------------------------------
// checked entry point

absl::StatusOr<int64_t> resolve_stride(const PerplexityOptions& o) {
  const int64_t stride = o.stride == 0 ? std::max<int64_t>(1, o.context / 2) : o.stride;
  if (o.context < 2) return absl::InvalidArgumentError(absl::StrCat("--context must be >= 2, got ", o.context));
  if (stride < 1 || stride > o.context)
    return absl::InvalidArgumentError(
        absl::StrCat("--stride must be in [1, --context = ", o.context, "], got ", stride));
  return stride;
}

absl::StatusOr<PerplexityReport> evaluate_perplexity(CausalLM model,
                                                     const std::vector<int64_t>& ids,
                                                     const PerplexityOptions& options) {
  auto stride = resolve_stride(options);
  if (!stride.ok()) return stride.status();
  if (ids.size() < 2)
    return absl::InvalidArgumentError(
        absl::StrCat("the input gives ", ids.size(), " token(s); need at least 2"));
  PerplexityReport report;
  report.context = options.context;
  report.stride = *stride;
  const int64_t windows = window_count(static_cast<int64_t>(ids.size()), options.context, *stride);
  std::function<void(const PerplexityResult&)> progress;
  if (options.progress) progress = [&](const PerplexityResult& r) { options.progress(r, windows); };
  report.result = sliding_window_nll(model, ids, options.context, *stride, progress);
  return report;
}

}  // namespace sparseflash::model
