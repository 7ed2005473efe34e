// Helpers of the attention tests (attention_test, lsh_test, local_window_test):
// float64 options, random q/k/v, gradients of a weighted sum, closeness.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/csrc/autograd/autograd.h>

#include "attention/attention.h"
#include "attention/flash.h"

namespace sparseflash::attention {
namespace {

using at::Tensor;

at::TensorOptions f64() { return at::TensorOptions().dtype(at::kDouble); }

Options make_options(Kind kind, int buckets = 4, double drop = 0.5, int64_t group = 0) {
  Options o;
  o.kind = kind;
  o.num_buckets = buckets;
  o.drop_prob = drop;
  o.group_size = group;
  return o;
}

struct Inputs {
  Tensor q, k, v;
};

Inputs random_inputs(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D,
                     uint64_t seed, at::TensorOptions opts = f64()) {
  at::manual_seed(seed);
  return {at::randn({B, H, Nq, D}, opts), at::randn({B, Hkv, Nk, D}, opts),
          at::randn({B, Hkv, Nk, D}, opts)};
}

// Gradients of sum(out * w) with respect to q, k, v.
std::tuple<Tensor, Tensor, Tensor, Tensor> run_with_grads(
    const std::function<Tensor(const Tensor&, const Tensor&, const Tensor&)>& f, const Inputs& in,
    const Tensor& w) {
  Tensor q = in.q.clone().requires_grad_(), k = in.k.clone().requires_grad_(),
         v = in.v.clone().requires_grad_();
  Tensor out = f(q, k, v);
  (out * w).sum().backward();
  return {out.detach(), q.grad(), k.grad(), v.grad()};
}

void expect_close(const Tensor& a, const Tensor& b, double tol, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  EXPECT_FALSE(at::isnan(a).any().item<bool>()) << what << " has NaN";
  const double diff = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  EXPECT_LE(diff, tol) << what << ": max abs difference " << diff;
}

}  // namespace
}  // namespace sparseflash::attention
