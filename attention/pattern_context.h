// A Pattern kept in an autograd context from forward to backward, for the
// autograd functions of attention/ (internal). Its tensors travel in
// saved_data, not save_for_backward: they are not differentiable, and any of
// them may be undefined.
#pragma once

#include <torch/csrc/autograd/custom_function.h>

#include "attention/attention.h"

namespace sparseflash::attention {

inline void save_pattern(torch::autograd::AutogradContext* ctx, const Pattern& p) {
  ctx->saved_data["q_bucket"] = p.q_bucket;
  ctx->saved_data["k_bucket"] = p.k_bucket;
  ctx->saved_data["q_keep"] = p.q_keep;
  ctx->saved_data["k_keep"] = p.k_keep;
  ctx->saved_data["num_buckets"] = p.num_buckets;
  ctx->saved_data["sink_tokens"] = p.sink_tokens;
  ctx->saved_data["local_window"] = p.local_window;
}

inline Pattern load_pattern(torch::autograd::AutogradContext* ctx) {
  auto tensor = [&](const char* key) {
    const c10::IValue& value = ctx->saved_data[key];
    return value.isTensor() ? value.toTensor() : Tensor();
  };
  Pattern p{tensor("q_bucket"), tensor("k_bucket"), tensor("q_keep"), tensor("k_keep")};
  p.num_buckets = ctx->saved_data["num_buckets"].toInt();
  p.sink_tokens = ctx->saved_data["sink_tokens"].toInt();
  p.local_window = ctx->saved_data["local_window"].toInt();
  return p;
}

}  // namespace sparseflash::attention
