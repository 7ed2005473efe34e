// The training step's fused pieces against plain LibTorch: the chunked linear
// + cross-entropy, unit-norm rows, residual add + LayerNorm / RMSNorm, SwiGLU,
// rotary positions, multi-tensor gradient clipping, cuDNN
// dense attention, device-drawn patterns. CPU checks run everywhere; the
// kernel checks skip without a GPU.
#include <cmath>
#include <cstdlib>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/functional/normalization.h>
#include <torch/nn/utils/clip_grad.h>

#include "attention/attention.h"
#include "attention/flash.h"
#include "configs/config.h"
#include "model/fused.h"
#include "model/gpt.h"
#include "trainer/optimizer.h"
#include "trainer/step.h"

namespace sparseflash {
namespace {

namespace F = torch::nn::functional;
using at::Tensor;

double max_diff(const Tensor& a, const Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// The unfused computation: logits in full, cross_entropy with ignore_index -1.
struct Reference {
  Tensor loss, dx, dw;
};
Reference unfused(const Tensor& x, const Tensor& w, const Tensor& targets) {
  Tensor xr = x.detach().clone().requires_grad_(true), wr = w.detach().clone().requires_grad_(true);
  Tensor logits = at::matmul(xr, wr.t());
  Tensor loss = F::cross_entropy(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}),
                                 F::CrossEntropyFuncOptions().ignore_index(-1));
  loss.backward();
  return {loss.detach(), xr.grad(), wr.grad()};
}

// ---------------------------------------------------------------------------
// linear + cross-entropy

class LinearCrossEntropyChunks : public ::testing::TestWithParam<int64_t> {};

TEST_P(LinearCrossEntropyChunks, LossAndGradientsMatchUnfused) {
  // Odd sizes, two leading dims, some ignored targets, float64.
  const int64_t B = 3, N = 7, d = 5, V = 37;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  Tensor x = at::randn({B, N, d}, f64), w = at::randn({V, d}, f64);
  Tensor targets = at::randint(0, V, {B, N}, at::kLong);
  targets.index_put_({0, 2}, -1);
  targets.index_put_({2, 6}, -1);
  Reference ref = unfused(x, w, targets);

  Tensor xs = x.clone().requires_grad_(true), ws = w.clone().requires_grad_(true);
  Tensor loss = model::linear_cross_entropy(xs, ws, targets, GetParam());
  // Scaled upstream gradient: backward() must scale both gradients by it.
  (loss * 3.0).backward();
  EXPECT_LT(max_diff(loss, ref.loss), 1e-12);
  EXPECT_LT(max_diff(xs.grad(), ref.dx * 3.0), 1e-12);
  EXPECT_LT(max_diff(ws.grad(), ref.dw * 3.0), 1e-12);
  EXPECT_EQ(xs.grad().sizes(), x.sizes());
}

INSTANTIATE_TEST_SUITE_P(ChunkRows, LinearCrossEntropyChunks, ::testing::Values(0, 1, 4, 21, 100));

TEST(LinearCrossEntropy, NoGradientGivesTheSameLossAndFloat32Works) {
  Tensor x = at::randn({11, 6}), w = at::randn({13, 6});
  Tensor targets = at::randint(0, 13, {11}, at::kLong);
  Tensor ref = F::cross_entropy(at::matmul(x, w.t()), targets);
  Tensor with_grad_inputs = model::linear_cross_entropy(x.clone().requires_grad_(true), w, targets, 3);
  at::NoGradGuard no_grad;
  Tensor plain = model::linear_cross_entropy(x, w, targets, 4);
  EXPECT_LT(max_diff(plain, ref), 1e-5);
  EXPECT_LT(max_diff(with_grad_inputs, ref), 1e-5);
}

TEST(LinearCrossEntropy, AllTargetsIgnoredGivesZeroNotNan) {
  Tensor x = at::randn({4, 3}).requires_grad_(true), w = at::randn({5, 3});
  Tensor loss = model::linear_cross_entropy(x, w, at::full({4}, -1, at::kLong));
  loss.backward();
  EXPECT_EQ(loss.item<double>(), 0.0);
  EXPECT_EQ(x.grad().abs().max().item<double>(), 0.0);
}

TEST(LinearCrossEntropy, RejectsBadShapesWithNamedArgument) {
  Tensor x = at::randn({4, 3}), w = at::randn({5, 2});
  EXPECT_THROW(
      {
        try {
          model::linear_cross_entropy(x, w, at::zeros({4}, at::kLong));
        } catch (const c10::Error& e) {
          EXPECT_NE(std::string(e.what()).find("weight [V, d]"), std::string::npos) << e.what();
          throw;
        }
      },
      c10::Error);
  EXPECT_THROW(model::linear_cross_entropy(at::randn({4, 2}), w, at::zeros({4}, at::kInt)),
               c10::Error);
}

TEST(LinearCrossEntropyGpu, KernelUnderAutocastMatchesFloat32) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  // A vocabulary that is not a multiple of 8 (the kernel's unvectorised
  // path) and one that is (16-byte vectors), rows in several chunks.
  for (int64_t V : {1003, 4096}) {
    const int64_t T = 301, d = 64;
    auto cuda = at::TensorOptions().device(at::kCUDA);
    Tensor x = at::randn({T, d}, cuda), w = at::randn({V, d}, cuda) * 0.2;
    Tensor targets = at::randint(0, V, {T}, cuda.dtype(at::kLong));
    targets.index_put_({5}, -1);
    // What the kernel computes from: bf16 logits of bf16 operands.
    Tensor xb = x.to(at::kBFloat16).to(at::kFloat), wb = w.to(at::kBFloat16).to(at::kFloat);
    Reference ref = unfused(xb, wb, targets);
    Tensor xs = x.clone().requires_grad_(true), ws = w.clone().requires_grad_(true);
    Tensor loss;
    {
      at::autocast::set_autocast_enabled(at::kCUDA, true);
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
      loss = model::linear_cross_entropy(xs, ws, targets, 64);
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
    }
    loss.backward();
    EXPECT_EQ(loss.scalar_type(), at::kFloat);
    EXPECT_LT(max_diff(loss, ref.loss), 2e-2) << "V " << V;  // bf16 logits
    const double gx = ref.dx.abs().max().item<double>(), gw = ref.dw.abs().max().item<double>();
    EXPECT_LT(max_diff(xs.grad(), ref.dx), 3e-2 * gx) << "V " << V;
    EXPECT_LT(max_diff(ws.grad(), ref.dw), 3e-2 * gw) << "V " << V;
    EXPECT_EQ(ws.grad().scalar_type(), at::kFloat);
  }
}

TEST(LinearCrossEntropyGpu, Float32KernelMatchesUnfusedClosely) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  auto cuda = at::TensorOptions().device(at::kCUDA);
  Tensor x = at::randn({2, 9, 16}, cuda), w = at::randn({77, 16}, cuda);
  Tensor targets = at::randint(0, 77, {2, 9}, cuda.dtype(at::kLong));
  Reference ref = unfused(x, w, targets);
  Tensor xs = x.clone().requires_grad_(true), ws = w.clone().requires_grad_(true);
  Tensor loss = model::linear_cross_entropy(xs, ws, targets, 5);
  loss.backward();
  EXPECT_LT(max_diff(loss, ref.loss), 1e-4);
  EXPECT_LT(max_diff(xs.grad(), ref.dx), 1e-4);
  EXPECT_LT(max_diff(ws.grad(), ref.dw), 1e-4);
}

// ---------------------------------------------------------------------------
// unit-norm rows

TEST(UnitNormRows, MatchesNormalizeWithGradients) {
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  Tensor x = at::randn({2, 3, 5, 7}, f64);
  x.index_put_({0, 1, 2}, 0.0);  // a zero row: the eps branch
  Tensor a = x.clone().requires_grad_(true), b = x.clone().requires_grad_(true);
  Tensor ya = model::unit_norm_rows(a, 1e-6);
  Tensor yb = F::normalize(b, F::NormalizeFuncOptions().dim(-1).eps(1e-6));
  Tensor g = at::randn(ya.sizes(), f64);
  (ya * g).sum().backward();
  (yb * g).sum().backward();
  EXPECT_LT(max_diff(ya, yb), 1e-12);
  EXPECT_LT(max_diff(a.grad(), b.grad()), 1e-9);
}

TEST(UnitNormRowsGpu, KernelMatchesFloat64OnStridedViews) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf})
    for (int64_t D : {64, 128, 24}) {
      const int64_t B = 2, N = 33, H = 3;
      // q as the model has it: a view of a [B, N, 2 H D] projection.
      Tensor proj = at::randn({B, N, 2 * H * D}, at::TensorOptions().device(at::kCUDA)).to(dtype);
      Tensor q = proj.slice(2, 0, H * D).view({B, N, H, D}).transpose(1, 2);
      // A zero row takes the eps branch (dy / eps overflows float16: not there).
      if (dtype != at::kHalf) q.index_put_({1, 2, 4}, 0.0);
      Tensor qk = q.detach().requires_grad_(true);
      Tensor y = model::unit_norm_rows(qk, 1e-6);
      Tensor g = at::randn(y.sizes(), y.options().dtype(at::kFloat)).to(dtype);
      (y.to(at::kFloat) * g.to(at::kFloat)).sum().backward();
      Tensor q64 = q.detach().to(at::kDouble).cpu().requires_grad_(true);
      Tensor y64 = F::normalize(q64, F::NormalizeFuncOptions().dim(-1).eps(1e-6));
      (y64 * g.to(at::kDouble).cpu()).sum().backward();
      const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
      EXPECT_EQ(y.scalar_type(), dtype);
      EXPECT_LT(max_diff(y.cpu(), y64), tol) << dtype << " D " << D;
      // Gradients relative to their size (rows' norms vary).
      const double scale = q64.grad().abs().max().item<double>();
      EXPECT_LT(max_diff(qk.grad().cpu(), q64.grad()), tol * scale * 4) << dtype << " D " << D;
      // Token-major output: the model's reshape back to [B, N, H D] is a view.
      EXPECT_LT(y.stride(1), y.stride(2));
    }
}

// ---------------------------------------------------------------------------
// residual add + LayerNorm

TEST(AddLayerNorm, EqualsAddThenLayerNormOnCpu) {
  Tensor x = at::randn({3, 5, 12}), y = at::randn({3, 5, 12}), w = at::randn({12});
  auto [h, out] = model::add_layer_norm(x, y, w, Tensor(), 1e-5);
  EXPECT_TRUE(at::equal(h, x + y));
  EXPECT_TRUE(at::equal(out, at::layer_norm(x + y, {12}, w, {}, 1e-5)));
  auto [h2, out2] = model::add_layer_norm(x, Tensor(), w, Tensor(), 1e-5);
  EXPECT_TRUE(at::equal(h2, x));
  EXPECT_THROW(model::add_layer_norm(x, y, at::randn({5}), Tensor(), 1e-5), c10::Error);
}

TEST(AddLayerNormGpu, KernelMatchesFloat64WithGradients) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  auto cuda = at::TensorOptions().device(at::kCUDA);
  for (int64_t C : {768, 576, 12, 2048})
    for (auto y_type : {at::kFloat, at::kBFloat16})
      for (bool with_bias : {false, true})
        for (bool with_y : {true, false}) {
          const int64_t rows = 4000;  // more than the backward's 264 blocks x 8 warps
          Tensor x = (at::randn({2, rows / 2, C}, cuda) + 0.5).requires_grad_(true);
          Tensor y = with_y ? at::randn({2, rows / 2, C}, cuda).to(y_type).requires_grad_(true) : Tensor();
          Tensor w = (at::randn({C}, cuda) * 0.3 + 1).requires_grad_(true);
          Tensor b = with_bias ? at::randn({C}, cuda).requires_grad_(true) : Tensor();
          Tensor h, out;
          {
            at::autocast::set_autocast_enabled(at::kCUDA, true);
            at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
            std::tie(h, out) = model::add_layer_norm(x, y, w, b, 1e-5);
            at::autocast::set_autocast_enabled(at::kCUDA, false);
            at::autocast::clear_cache();
          }
          EXPECT_EQ(out.scalar_type(), at::kBFloat16);
          EXPECT_EQ(h.scalar_type(), at::kFloat);
          Tensor gh = at::randn(h.sizes(), cuda), gout = at::randn(out.sizes(), cuda).to(at::kBFloat16);
          ((h * gh).sum() + (out.to(at::kFloat) * gout.to(at::kFloat)).sum()).backward();
          // float64 reference from the same inputs
          auto d = [](const Tensor& t) {
            return t.defined() ? t.detach().cpu().to(at::kDouble).requires_grad_(true) : Tensor();
          };
          Tensor x64 = d(x), y64 = d(y), w64 = d(w), b64 = d(b);
          Tensor h64 = with_y ? x64 + y64 : x64 * 1.0;
          Tensor o64 = at::layer_norm(h64, {C}, w64, b64, 1e-5);
          ((h64 * gh.cpu().to(at::kDouble)).sum() + (o64 * gout.cpu().to(at::kDouble)).sum()).backward();
          const std::string what = "C " + std::to_string(C) + " y " + c10::toString(y_type) +
                                   (with_bias ? " bias" : "") + (with_y ? "" : " no y");
          EXPECT_LT(max_diff(h.cpu(), h64), 1e-5) << what;
          // bf16 output: a few units in the last place at the output's magnitude
          // (one ulp is 2^-7 of it; at C = 2048 outputs reach ~8, where 3e-2 is one ulp).
          EXPECT_LT(max_diff(out.cpu(), o64), std::max(3e-2, 1e-2 * o64.abs().max().item<double>()))
              << what;
          auto rel = [](const Tensor& a, const Tensor& ref) {
            return max_diff(a.cpu(), ref) / std::max(1e-12, ref.abs().max().item<double>());
          };
          EXPECT_LT(rel(x.grad(), x64.grad()), 1e-2) << what;
          if (with_y) EXPECT_LT(rel(y.grad(), y64.grad()), 1e-2) << what;
          EXPECT_LT(rel(w.grad(), w64.grad()), 1e-2) << what;
          if (with_bias) EXPECT_LT(rel(b.grad(), b64.grad()), 1e-2) << what;
        }
}

// ---------------------------------------------------------------------------
// residual add + RMSNorm, SwiGLU, rotary positions (the Llama layer)

// The Llama operations' CUDA kernels (SPARSEFLASH_FUSED_LLAMA=1) while in scope.
struct FusedLlamaKernels {
  FusedLlamaKernels() { setenv("SPARSEFLASH_FUSED_LLAMA", "1", 1); }
  ~FusedLlamaKernels() { unsetenv("SPARSEFLASH_FUSED_LLAMA"); }
};

// transformers' LlamaRMSNorm in float64.
Tensor rms_norm64(const Tensor& h, const Tensor& w, double eps) {
  return w * (h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps));
}

TEST(AddRmsNorm, EqualsAddThenRmsNormOnCpu) {
  Tensor x = at::randn({3, 5, 12}), y = at::randn({3, 5, 12}), w = at::randn({12});
  auto [h, out] = model::add_rms_norm(x, y, w, 1e-5);
  EXPECT_TRUE(at::equal(h, x + y));
  Tensor expected = rms_norm64((x + y).to(at::kDouble), w.to(at::kDouble), 1e-5);
  EXPECT_EQ(out.scalar_type(), at::kFloat);
  EXPECT_LT(max_diff(out, expected), 1e-5 * expected.abs().max().item<double>());
  auto [h2, out2] = model::add_rms_norm(x, Tensor(), w, 1e-5);
  EXPECT_TRUE(at::equal(h2, x));
  EXPECT_LT(max_diff(out2, rms_norm64(x.to(at::kDouble), w.to(at::kDouble), 1e-5)), 1e-4);
  EXPECT_THROW(model::add_rms_norm(x, y, at::randn({5}), 1e-5), c10::Error);
  EXPECT_THROW(model::add_rms_norm(x, at::randn({3, 5, 11}), w, 1e-5), c10::Error);
}

TEST(AddRmsNormGpu, KernelMatchesFloat64WithGradients) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  FusedLlamaKernels on;
  auto cuda = at::TensorOptions().device(at::kCUDA);
  for (int64_t C : {576, 12, 2048, 964})
    for (auto y_type : {at::kFloat, at::kBFloat16})
      for (bool with_y : {true, false})
        for (bool autocast : {true, false}) {
          const int64_t rows = 4001;  // more than the backward's 264 blocks x 8 warps, odd
          Tensor x = (at::randn({rows, C}, cuda) + 0.5).requires_grad_(true);
          Tensor y = with_y ? at::randn({rows, C}, cuda).to(y_type).requires_grad_(true) : Tensor();
          Tensor w = (at::randn({C}, cuda) * 0.3 + 1).requires_grad_(true);
          Tensor h, out;
          {
            at::autocast::set_autocast_enabled(at::kCUDA, autocast);
            at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
            std::tie(h, out) = model::add_rms_norm(x, y, w, 1e-5);
            at::autocast::set_autocast_enabled(at::kCUDA, false);
            at::autocast::clear_cache();
          }
          EXPECT_EQ(out.scalar_type(), autocast ? at::kBFloat16 : at::kFloat);
          EXPECT_EQ(h.scalar_type(), at::kFloat);
          Tensor gh = at::randn(h.sizes(), cuda), gout = at::randn(out.sizes(), cuda).to(out.scalar_type());
          ((h * gh).sum() + (out.to(at::kFloat) * gout.to(at::kFloat)).sum()).backward();
          auto d = [](const Tensor& t) {
            return t.defined() ? t.detach().cpu().to(at::kDouble).requires_grad_(true) : Tensor();
          };
          Tensor x64 = d(x), y64 = d(y), w64 = d(w);
          Tensor h64 = with_y ? x64 + y64 : x64 * 1.0;
          Tensor o64 = rms_norm64(h64, w64, 1e-5);
          ((h64 * gh.cpu().to(at::kDouble)).sum() + (o64 * gout.cpu().to(at::kDouble)).sum()).backward();
          const std::string what = "C " + std::to_string(C) + " y " + c10::toString(y_type) +
                                   (with_y ? "" : " no y") + (autocast ? " autocast" : "");
          EXPECT_LT(max_diff(h.cpu(), h64), 1e-5) << what;
          const double out_tol = autocast ? std::max(3e-2, 1e-2 * o64.abs().max().item<double>())
                                          : 1e-4 * o64.abs().max().item<double>();
          EXPECT_LT(max_diff(out.cpu(), o64), out_tol) << what;
          auto rel = [](const Tensor& a, const Tensor& ref) {
            return max_diff(a.cpu(), ref) / std::max(1e-12, ref.abs().max().item<double>());
          };
          const double grad_tol = autocast ? 1e-2 : 1e-4;
          EXPECT_LT(rel(x.grad(), x64.grad()), grad_tol) << what;
          if (with_y) EXPECT_LT(rel(y.grad(), y64.grad()), y_type == at::kFloat ? grad_tol : 1e-2) << what;
          EXPECT_LT(rel(w.grad(), w64.grad()), grad_tol) << what;
        }
}

TEST(Swiglu, IsSiluTimesUpWithItsGradientsOnCpu) {
  Tensor g = at::randn({4, 7}, at::kDouble).requires_grad_(true);
  Tensor u = at::randn({4, 7}, at::kDouble).requires_grad_(true);
  Tensor out = model::swiglu(g, u);
  Tensor gd = g.detach(), ud = u.detach(), s = at::sigmoid(gd);
  EXPECT_LT(max_diff(out, gd * s * ud), 1e-12);
  Tensor dout = at::randn({4, 7}, at::kDouble);
  out.backward(dout);
  // The closed forms the CUDA kernel uses.
  EXPECT_LT(max_diff(g.grad(), dout * ud * s * (1 + gd * (1 - s))), 1e-12);
  EXPECT_LT(max_diff(u.grad(), dout * gd * s), 1e-12);
  EXPECT_THROW(model::swiglu(g, at::randn({4, 6}, at::kDouble)), c10::Error);
}

TEST(SwigluGpu, KernelMatchesFloat64WithGradients) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  FusedLlamaKernels on;
  for (auto type : {at::kBFloat16, at::kHalf, at::kFloat})
    for (int64_t n : {1, 3, 1536 * 37 + 1, 1536 * 64})
      for (bool offset : {false, true}) {  // offset by one element: no aligned pairs
        auto opts = at::TensorOptions().device(at::kCUDA).dtype(type);
        Tensor gbuf = at::randn({n + 1}, opts) * 3, ubuf = at::randn({n + 1}, opts);
        Tensor g = gbuf.narrow(0, offset ? 1 : 0, n).detach().requires_grad_(true);
        Tensor u = ubuf.narrow(0, offset ? 1 : 0, n).detach().requires_grad_(true);
        Tensor out = model::swiglu(g, u);
        EXPECT_EQ(out.scalar_type(), type);
        Tensor dout = at::randn({n}, opts);
        out.backward(dout);
        Tensor g64 = g.detach().cpu().to(at::kDouble).requires_grad_(true);
        Tensor u64 = u.detach().cpu().to(at::kDouble).requires_grad_(true);
        Tensor o64 = at::silu(g64) * u64;
        o64.backward(dout.cpu().to(at::kDouble));
        const double tol = type == at::kFloat ? 1e-5 : type == at::kHalf ? 2e-3 : 1e-2;
        auto rel = [](const Tensor& a, const Tensor& ref) {
          return max_diff(a.cpu(), ref) / std::max(1e-12, ref.abs().max().item<double>());
        };
        const std::string what = c10::toString(type) + std::string(" n ") + std::to_string(n) +
                                 (offset ? " offset" : "");
        EXPECT_LT(rel(out, o64), tol) << what;
        EXPECT_LT(rel(g.grad(), g64.grad()), tol) << what;
        EXPECT_LT(rel(u.grad(), u64.grad()), tol) << what;
      }
}

// cos/sin tables of rotate-half RoPE: column i and i + D/2 share angle pos * f_i.
std::pair<Tensor, Tensor> rope_tables(int64_t N, int64_t D, at::TensorOptions opts) {
  Tensor f = at::pow(10000.0, -at::arange(0, D / 2, at::kDouble) * 2.0 / D);
  Tensor angles = at::arange(N, at::kDouble).unsqueeze(1) * f.unsqueeze(0);
  angles = at::cat({angles, angles}, -1);
  return {angles.cos().to(opts), angles.sin().to(opts)};
}

TEST(Rotary, RotatesEachPairOfHalvesOnCpu) {
  const int64_t B = 2, H = 3, N = 5, D = 6;
  Tensor x = at::randn({B, N, H, D}, at::kDouble).transpose(1, 2).requires_grad_(false);
  auto [cos, sin] = rope_tables(N, D, at::TensorOptions().dtype(at::kDouble));
  Tensor y = model::rotary(x, cos, sin);
  // (x_i + i x_j) e^{i theta}: the pair as one complex number.
  Tensor c = cos.narrow(1, 0, D / 2), s = sin.narrow(1, 0, D / 2);
  Tensor a = x.narrow(3, 0, D / 2), b = x.narrow(3, D / 2, D / 2);
  EXPECT_LT(max_diff(y.narrow(3, 0, D / 2), a * c - b * s), 1e-12);
  EXPECT_LT(max_diff(y.narrow(3, D / 2, D / 2), b * c + a * s), 1e-12);
  // A rotation keeps each pair's norm.
  EXPECT_LT(max_diff(y.narrow(3, 0, D / 2).pow(2) + y.narrow(3, D / 2, D / 2).pow(2), a * a + b * b),
            1e-12);
  EXPECT_THROW(model::rotary(x, cos.narrow(0, 0, N - 1), sin.narrow(0, 0, N - 1)), c10::Error);
  EXPECT_THROW(model::rotary(at::randn({1, 1, N, 5}), cos, sin), c10::Error);
}

TEST(RotaryGpu, KernelMatchesFloat64WithGradients) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  FusedLlamaKernels on;
  for (auto type : {at::kBFloat16, at::kHalf, at::kFloat})
    for (int64_t D : {64, 128, 6, 2})  // D / 2 odd: one column per thread
      for (bool token_major : {true, false}) {
        const int64_t B = 2, H = 3, N = 257;
        auto opts = at::TensorOptions().device(at::kCUDA).dtype(type);
        Tensor x = token_major ? at::randn({B, N, H, D}, opts).transpose(1, 2)
                               : at::randn({B, H, N, D}, opts);
        x.requires_grad_(true);
        auto [cos, sin] = rope_tables(N, D, opts);
        Tensor y = model::rotary(x, cos, sin);
        EXPECT_EQ(y.scalar_type(), type);
        EXPECT_EQ(y.sizes(), x.sizes());
        // An upstream gradient whose last dimension is not contiguous.
        Tensor dy = at::randn({B, H, D, N}, opts).transpose(2, 3);
        y.backward(dy);
        Tensor x64 = x.detach().cpu().to(at::kDouble).requires_grad_(true);
        Tensor c64 = cos.cpu().to(at::kDouble), s64 = sin.cpu().to(at::kDouble);
        Tensor y64 = model::rotary(x64, c64, s64);
        y64.backward(dy.cpu().to(at::kDouble));
        const double tol = type == at::kFloat ? 1e-5 : type == at::kHalf ? 2e-3 : 1e-2;
        const std::string what = c10::toString(type) + std::string(" D ") + std::to_string(D) +
                                 (token_major ? " token-major" : " head-major");
        EXPECT_LT(max_diff(y.cpu(), y64), tol * 4) << what;
        EXPECT_LT(max_diff(x.grad().cpu(), x64.grad()), tol * 4) << what;
      }
}

// ---------------------------------------------------------------------------
// clipping

TEST(ClipGradNorm, MatchesLibTorchClipGradNorm) {
  for (double max_norm : {0.5, 1e6}) {
    std::vector<Tensor> a, b;
    for (auto shape : {std::vector<int64_t>{3, 4}, {7}, {2, 2, 2}}) {
      Tensor p = at::randn(shape).requires_grad_(true);
      p.mutable_grad() = at::randn(shape) * 3;
      Tensor q = p.detach().clone().requires_grad_(true);
      q.mutable_grad() = p.grad().clone();
      a.push_back(p);
      b.push_back(q);
    }
    Tensor norm = trainer::clip_grad_norm(a, max_norm);
    const double ref = torch::nn::utils::clip_grad_norm_(b, max_norm);
    EXPECT_NEAR(norm.item<double>(), ref, 1e-5 * ref);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_LT(max_diff(a[i].grad(), b[i].grad()), 1e-6);
  }
}

// ---------------------------------------------------------------------------
// attention: cuDNN dense, device-drawn patterns, pattern density

TEST(PatternDensity, OneBucketIsDenseUniformIsOneOverBuckets) {
  attention::Pattern p;
  p.num_buckets = 4;
  p.q_bucket = at::zeros({2, 3, 8}, at::kLong);
  p.k_bucket = p.q_bucket;
  EXPECT_NEAR(attention::pattern_density(p).item<double>(), 1.0, 1e-6);
  p.q_bucket = (at::arange(8, at::kLong) % 4).expand({2, 3, 8}).contiguous();
  p.k_bucket = p.q_bucket;
  EXPECT_NEAR(attention::pattern_density(p).item<double>(), 0.25, 1e-6);
  attention::Pattern drop;
  drop.q_keep = at::arange(8).lt(4).expand({1, 2, 8});
  drop.k_keep = at::ones({1, 2, 8}, at::kBool);
  EXPECT_NEAR(attention::pattern_density(drop).item<double>(), 0.5, 1e-6);
}

TEST(CenterByEarlierBlocks, SubtractsTheMeanOfEarlierWholeBlocksOnly) {
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  for (int64_t N : {1, 4, 10, 12}) {
    Tensor x = at::randn({2, 3, N, 5}, f64) + 4.0;  // a common offset, as real queries have
    const int64_t block = 4;
    Tensor y = attention::center_by_earlier_blocks(x, block);
    ASSERT_EQ(y.sizes(), x.sizes());
    for (int64_t i = 0; i < N; ++i) {
      const int64_t earlier = i / block * block;  // rows of the whole blocks before i's
      Tensor expect = earlier == 0 ? x.select(2, i)
                                   : x.select(2, i) - x.slice(2, 0, earlier).mean(2);
      EXPECT_LT(max_diff(y.select(2, i), expect), 1e-12) << "N " << N << " row " << i;
    }
    // Causal: changing later rows leaves earlier results alone.
    if (N > 5) {
      Tensor x2 = x.clone();
      x2.slice(2, 5, N).add_(100.0);
      Tensor y2 = attention::center_by_earlier_blocks(x2, block);
      EXPECT_LT(max_diff(y2.slice(2, 0, 5), y.slice(2, 0, 5)), 1e-12);
    }
  }
}

TEST(CenterByEarlierBlocks, SpreadsOffsetRowsOverTheBuckets) {
  // Rows with a large shared direction: raw LSH puts nearly all in one
  // bucket; centred, the pattern's density approaches 1 / nb.
  at::manual_seed(3);
  const int64_t N = 2048, D = 64, nb = 16;
  Tensor offset = at::randn({1, 1, 1, D}) * 6.0;
  Tensor q = at::randn({1, 2, N, D}) + offset;
  attention::Options o;
  o.kind = attention::Kind::kHash;
  o.num_buckets = nb;
  o.shared_qk = true;
  at::Generator g = at::detail::createCPUGenerator(1);
  o.lsh_center = false;
  const double raw = attention::pattern_density(attention::draw_pattern(o, q, q, g, 0)).item<double>();
  o.lsh_center = true;
  const double centred =
      attention::pattern_density(attention::draw_pattern(o, q, q, g, 0)).item<double>();
  EXPECT_GT(raw, 0.5);
  EXPECT_LT(centred, 2.0 / nb);
}

// The means LSH centring subtracts (and, projected, the GPU kernel), on the
// token-major view a projection gives ([B, N, H, D] memory seen as
// [B, H, N, D]), against a loop over rows.
TEST(CenterByEarlierBlocks, MeansOfTokenMajorViewsMatchALoop) {
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 2, H = 3, D = 5, block = 4;
  for (int64_t N : {0, 1, 4, 5, 12, 13}) {
    Tensor x = (at::randn({B, N, H, D}, f64) + 2.0).transpose(1, 2);
    Tensor m = attention::earlier_block_means(x, block);
    const int64_t blocks = (N + block - 1) / block;
    ASSERT_EQ(m.sizes(), (std::vector<int64_t>{B, H, blocks, D})) << "N " << N;
    for (int64_t j = 0; j < blocks; ++j) {
      Tensor want = at::zeros({B, H, D}, f64);
      for (int64_t i = 0; i < j * block; ++i) want += x.select(2, i);
      if (j > 0) want /= static_cast<double>(j * block);
      EXPECT_LT(max_diff(m.select(2, j), want), 1e-12) << "N " << N << " block " << j;
    }
  }
}

TEST(CudnnAttentionGpu, MatchesReferenceOnModelLayout) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  for (int64_t D : {64, 128}) {
    const int64_t B = 2, N = 193, H = 3;
    auto cuda = at::TensorOptions().device(at::kCUDA);
    Tensor qkv = at::randn({B, N, 3 * H * D}, cuda).to(at::kBFloat16);
    auto heads = [&](int i) {
      return qkv.slice(2, i * H * D, (i + 1) * H * D).view({B, N, H, D}).transpose(1, 2);
    };
    if (!attention::cudnn_supported(heads(0), heads(1), heads(2))) GTEST_SKIP() << "cuDNN refuses";
    Tensor q = heads(0).detach().requires_grad_(true), k = heads(1).detach().requires_grad_(true),
           v = heads(2).detach().requires_grad_(true);
    Tensor out = attention::cudnn_attention(q, k, v);
    Tensor g = at::randn(out.sizes(), cuda).to(at::kBFloat16);
    (out.to(at::kFloat) * g.to(at::kFloat)).sum().backward();
    auto f = [](const Tensor& t) { return t.detach().to(at::kFloat).requires_grad_(true); };
    Tensor qr = f(heads(0)), kr = f(heads(1)), vr = f(heads(2));
    Tensor ref = attention::reference_attention(qr, kr, vr, attention::Pattern());
    (ref * g.to(at::kFloat)).sum().backward();
    EXPECT_LT(max_diff(out, ref), 2e-2) << "D " << D;
    EXPECT_LT(max_diff(q.grad(), qr.grad()), 5e-2 * qr.grad().abs().max().item<double>());
    EXPECT_LT(max_diff(k.grad(), kr.grad()), 5e-2 * kr.grad().abs().max().item<double>());
    EXPECT_LT(max_diff(v.grad(), vr.grad()), 5e-2 * vr.grad().abs().max().item<double>());
    // Output in q's (token-major) order, so [B, N, H D] is a view of it.
    EXPECT_TRUE(out.transpose(1, 2).is_contiguous()) << out.strides();
  }
}

// Dense grouped-query attention through the interface (backend AUTO) goes to
// cuDNN on keys and values repeated to the query heads; the key and value
// gradients are summed back over each group.
TEST(CudnnAttentionGpu, GroupedQueryAttentionThroughTheInterface) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  const int64_t B = 2, N = 301, H = 9, Hkv = 3, D = 64;
  auto cuda = at::TensorOptions().device(at::kCUDA);
  Tensor q0 = at::randn({B, H, N, D}, cuda), k0 = at::randn({B, Hkv, N, D}, cuda),
         v0 = at::randn({B, Hkv, N, D}, cuda);
  auto bf = [](const Tensor& t) { return t.to(at::kBFloat16).requires_grad_(true); };
  Tensor q = bf(q0), k = bf(k0), v = bf(v0);
  if (!attention::cudnn_supported(q, q, q)) GTEST_SKIP() << "cuDNN refuses";
  attention::Options o;  // dense, AUTO
  attention::Attention attn(o, 0);
  at::Generator gen = at::detail::createCPUGenerator(1);
  Tensor out = attn.forward(q, k, v, gen);
  EXPECT_FALSE(attn.last_pattern().q_bucket.defined());
  Tensor g = at::randn(out.sizes(), cuda);
  (out.to(at::kFloat) * g).sum().backward();
  auto f = [](const Tensor& t) { return t.detach().to(at::kFloat).requires_grad_(true); };
  Tensor qr = f(q), kr = f(k), vr = f(v);
  Tensor ref = attention::reference_attention(qr, kr, vr, attention::Pattern());
  (ref * g).sum().backward();
  EXPECT_LT(max_diff(out, ref), 2e-2);
  EXPECT_LT(max_diff(q.grad(), qr.grad()), 5e-2 * qr.grad().abs().max().item<double>());
  EXPECT_LT(max_diff(k.grad(), kr.grad()), 5e-2 * kr.grad().abs().max().item<double>());
  EXPECT_LT(max_diff(v.grad(), vr.grad()), 5e-2 * vr.grad().abs().max().item<double>());
  // Our kernel (backend KERNEL) gives the same within bf16 rounding.
  o.backend = attention::Backend::kKernel;
  attention::Attention ours(o, 0);
  EXPECT_LT(max_diff(ours.forward(q.detach(), k.detach(), v.detach(), gen), ref), 2e-2);
}

TEST(DevicePatternsGpu, FollowFromTheGeneratorStateWithoutHostCopies) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  auto cuda = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  Tensor q = at::randn({2, 4, 300, 64}, cuda), k = at::randn({2, 4, 300, 64}, cuda);
  for (auto kind : {attention::Kind::kHash, attention::Kind::kDrop}) {
    attention::Options o;
    o.kind = kind;
    at::Generator a = at::detail::createCPUGenerator(77), b = at::detail::createCPUGenerator(77);
    attention::Pattern pa = attention::draw_pattern(o, q, k, a, 3);
    attention::Pattern pb = attention::draw_pattern(o, q, k, b, 3);
    const Tensor& ta = kind == attention::Kind::kHash ? pa.q_bucket : pa.q_keep;
    const Tensor& tb = kind == attention::Kind::kHash ? pb.q_bucket : pb.q_keep;
    EXPECT_TRUE(ta.is_cuda());
    EXPECT_TRUE(at::equal(ta, tb)) << "same seed, same pattern";
    // The next draw of the same generator (the next step) differs.
    attention::Pattern pc = attention::draw_pattern(o, q, k, a, 3);
    const Tensor& tc = kind == attention::Kind::kHash ? pc.q_bucket : pc.q_keep;
    EXPECT_FALSE(at::equal(ta, tc)) << "a new draw each call";
    // Resuming from a saved generator state reproduces the draw.
    at::Generator c = at::detail::createCPUGenerator(1);
    c.set_state(b.get_state());
    attention::Pattern pd = attention::draw_pattern(o, q, k, c, 3);
    attention::Pattern pe = attention::draw_pattern(o, q, k, b, 3);
    const Tensor& td = kind == attention::Kind::kHash ? pd.q_bucket : pd.q_keep;
    const Tensor& te = kind == attention::Kind::kHash ? pe.q_bucket : pe.q_keep;
    EXPECT_TRUE(at::equal(td, te)) << "state restored, same pattern";
  }
  // Drop probability is honoured on the device.
  attention::Options drop;
  drop.kind = attention::Kind::kDrop;
  drop.drop_prob = 0.3;
  at::Generator g = at::detail::createCPUGenerator(5);
  attention::Pattern p = attention::draw_pattern(drop, q, k, g, 0);
  EXPECT_NEAR(p.q_keep.to(at::kFloat).mean().item<double>(), 0.7, 0.03);
}

TEST(TrainStepGpu, SharedQkHashStepRunsAndLossIsFinite) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  for (const char* kind : {"attention.kind=HASH", "attention.kind=DROP", "attention.kind=DENSE"}) {
    auto exp = resolve_config("preset:tiny_test",
                              {"model.vocab_size=256", "model.n_head=2", "model.d_model=128",
                               "model.block_size=256", kind, "attention.shared_qk=true",
                               "train.device=cuda"},
                              "tiny_test");
    ASSERT_TRUE(exp.ok()) << exp.status();
    model::GPT gpt(*exp, 0);
    gpt->to(at::kCUDA);
    trainer::AdamW opt(gpt, exp->optim());
    auto sync = trainer::local_gradients(gpt->parameters());
    trainer::StepOptions so;
    so.grad_clip = 1.0;
    so.bf16 = true;
    Tensor x = at::randint(0, 256, {2, 256}, at::TensorOptions().device(at::kCUDA).dtype(at::kLong));
    double first = 0, last = 0;
    for (int s = 0; s < 8; ++s) {
      auto r = trainer::train_step(gpt, opt, *sync, so, 3e-3, [&](int) {
        return trainer::Batch{x, x.roll(-1, 1)};
      });
      auto [loss, norm] = r.values();
      ASSERT_TRUE(std::isfinite(loss) && std::isfinite(norm)) << kind << " step " << s;
      (s == 0 ? first : last) = loss;
    }
    EXPECT_LT(last, first) << kind;
  }
}

}  // namespace
}  // namespace sparseflash
