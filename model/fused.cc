// Fused model operations: chunked linear + cross-entropy, residual add +
// LayerNorm / RMSNorm, SwiGLU, rotary positions, unit-norm rows.
// Reading order: the cross-entropy of one chunk of rows (CUDA kernel or ATen
// ops), the chunk loop and its autograd function, then the others, each an
// autograd function over its kernels and a public function choosing between
// it and ATen ops.
#include "model/fused.h"

#include <algorithm>
#include <climits>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#ifdef SPARSEFLASH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/kernels/options.h"
#include "model/kernels/fused.h"
#endif

namespace sparseflash::model {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

namespace {

// The casts below are the ones we ask for, not autocast's.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

#ifdef SPARSEFLASH_WITH_CUDA
void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, what, " failed: ", cudaGetErrorString(e));
}

bool kernel_type(at::ScalarType t, sparseflash::kernels::RowType& out) {
  using sparseflash::kernels::RowType;
  switch (t) {
    case at::kFloat: out = RowType::kF32; return true;
    case at::kBFloat16: out = RowType::kBF16; return true;
    case at::kHalf: out = RowType::kFP16; return true;
    default: return false;
  }
}
#endif

// ---------------------------------------------------------------------------
// one chunk of rows

// Per-row losses (float32 [R]; float64 for float64 logits) of `logits` [R, V] against `targets` [R];
// with `grad`, logits is overwritten by (softmax - onehot) * scale, scale
// being a one-element float32 tensor (1 / the number of counted targets).
Tensor rows_cross_entropy(Tensor& logits, const Tensor& targets, const Tensor& scale, bool grad) {
#ifdef SPARSEFLASH_WITH_CUDA
  sparseflash::kernels::RowType type;
  if (logits.is_cuda() && logits.stride(1) == 1 && kernel_type(logits.scalar_type(), type)) {
    Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
    Tensor t = targets.contiguous();
    check_cuda(sparseflash::kernels::cross_entropy_rows(
                   type, logits.data_ptr(), logits.stride(0), static_cast<int>(logits.size(0)),
                   static_cast<int>(logits.size(1)), t.data_ptr<int64_t>(),
                   grad ? scale.data_ptr<float>() : nullptr, grad, loss.data_ptr<float>(),
                   at::cuda::getCurrentCUDAStream()),
               "cross_entropy_rows");
    return loss;
  }
#endif
  const auto ct = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor lf = logits.to(ct);
  Tensor valid = targets.ge(0);
  Tensor index = targets.clamp_min(0).unsqueeze(1);
  Tensor lse = at::logsumexp(lf, {1}, /*keepdim=*/true);
  Tensor loss = at::where(valid, (lse - lf.gather(1, index)).squeeze(1), at::zeros({}, lf.options()));
  if (grad) {
    Tensor g = at::exp(lf - lse);
    g.scatter_add_(1, index, at::full({lf.size(0), 1}, -1.0, lf.options()));
    g.mul_(valid.to(ct).unsqueeze(1) * scale.to(ct));
    logits.copy_(g);
  }
  return loss;
}

struct ChunkedLoss {
  Tensor loss;    // float32 scalar: the mean over counted targets
  Tensor dx, dw;  // d(loss)/dx in the compute dtype, d(loss)/dweight in float32 (with grad)
};

ChunkedLoss chunked_cross_entropy(const Tensor& x, const Tensor& weight, const Tensor& targets,
                                  at::ScalarType compute, int64_t chunk_rows, bool grad) {
  NoAutocast no_autocast;
  at::NoGradGuard no_grad;
  Tensor xc = x.to(compute), wc = weight.to(compute);
  const int64_t rows = xc.size(0), vocab = wc.size(0);
  if (chunk_rows <= 0) {
    const int64_t budget = int64_t{256} << 20;  // bytes of logits per chunk
    chunk_rows = std::max<int64_t>(1, budget / (vocab * static_cast<int64_t>(xc.element_size())));
  }
  // Out-of-range targets would be read out of bounds by the kernel; this
  // check raises on the device without a host synchronisation.
  at::_assert_async(targets.lt(vocab).all(), "linear_cross_entropy: a target is >= the vocabulary size");
  // Sums and the weight gradient in float32 (float64 for float64 inputs).
  const auto acc = compute == at::kDouble ? at::kDouble : at::kFloat;
  Tensor count = targets.ge(0).sum().to(acc);
  Tensor scale = (1.0 / count.clamp_min(1)).reshape({1});
  ChunkedLoss r;
  Tensor loss_sum = at::zeros({}, xc.options().dtype(acc));
  if (grad) {
    r.dx = at::empty_like(xc, at::MemoryFormat::Contiguous);
    r.dw = at::zeros({vocab, xc.size(1)}, xc.options().dtype(acc));
  }
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t r1 = std::min(rows, r0 + chunk_rows);
    Tensor xr = xc.slice(0, r0, r1);
    Tensor logits = at::mm(xr, wc.t());
    loss_sum.add_(rows_cross_entropy(logits, targets.slice(0, r0, r1), scale, grad).sum());
    if (!grad) continue;
    Tensor dx_rows = r.dx.slice(0, r0, r1);
    at::mm_out(dx_rows, logits, wc);
    if (xc.is_cuda() && compute != at::kFloat)
      at::addmm_out(r.dw, r.dw, logits.t(), xr, at::kFloat);  // float32 accumulation
    else
      r.dw.addmm_(logits.t().to(acc), xr.to(acc));
  }
  r.loss = (loss_sum * scale.squeeze(0)).to(acc == at::kDouble ? at::kDouble : at::kFloat);
  return r;
}

struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const Tensor& targets, at::ScalarType compute, int64_t chunk_rows) {
    ChunkedLoss r = chunked_cross_entropy(x, weight, targets, compute, chunk_rows, true);
    ctx->save_for_backward({r.dx, r.dw});
    ctx->saved_data["x_type"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["w_type"] = static_cast<int64_t>(weight.scalar_type());
    return r.loss;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor& g = grads[0];
    const auto x_type = static_cast<at::ScalarType>(ctx->saved_data["x_type"].toInt());
    const auto w_type = static_cast<at::ScalarType>(ctx->saved_data["w_type"].toInt());
    Tensor dx = (saved[0] * g.to(saved[0].scalar_type())).to(x_type);
    Tensor dw = (saved[1] * g.to(saved[1].scalar_type())).to(w_type);
    return {dx, dw, Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

Tensor linear_cross_entropy(const Tensor& x, const Tensor& weight, const Tensor& targets,
                            int64_t chunk_rows) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "linear_cross_entropy: x [..., d] and weight [V, d] expected, got x ", x.sizes(),
              " weight ", weight.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "linear_cross_entropy: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.numel() * x.size(-1) == x.numel(), "linear_cross_entropy: ", targets.numel(),
              " targets for x ", x.sizes());
  TORCH_CHECK(x.device() == weight.device() && x.device() == targets.device(),
              "linear_cross_entropy: x, weight and targets must be on one device, got ",
              x.device(), ", ", weight.device(), ", ", targets.device());
  at::ScalarType compute = x.scalar_type();
  if (x.is_cuda() && at::autocast::is_autocast_enabled(at::kCUDA))
    compute = at::autocast::get_autocast_dtype(at::kCUDA);
  Tensor x2 = x.reshape({-1, x.size(-1)}), t = targets.reshape({-1});
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad());
  if (!grad) return chunked_cross_entropy(x2, weight, t, compute, chunk_rows, false).loss;
  return LinearCrossEntropy::apply(x2, weight, t, compute, chunk_rows);
}

// ---------------------------------------------------------------------------
// unit-norm rows: the kernels' autograd function

#ifdef SPARSEFLASH_WITH_CUDA
namespace {

sparseflash::kernels::RowsView rows_view(const Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// An empty [B, H, N, D] tensor stored as [B, N, H, D] (heads of one token together).
Tensor empty_token_major(const Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options())
      .transpose(1, 2);
}

struct UnitNormRows : public torch::autograd::Function<UnitNormRows> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double eps) {
    c10::cuda::CUDAGuard guard(x.device());
    sparseflash::kernels::RowType type;
    kernel_type(x.scalar_type(), type);
    Tensor y = empty_token_major(x);
    check_cuda(sparseflash::kernels::unit_norm_rows_forward(
                   type, rows_view(x), rows_view(y), static_cast<int>(x.size(0)),
                   static_cast<int>(x.size(1)), static_cast<int>(x.size(2)),
                   static_cast<int>(x.size(3)), static_cast<float>(eps),
                   at::cuda::getCurrentCUDAStream()),
               "unit_norm_rows");
    ctx->save_for_backward({x});
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    c10::cuda::CUDAGuard guard(x.device());
    Tensor dy = grads[0];
    if (dy.stride(3) != 1) dy = dy.contiguous();
    sparseflash::kernels::RowType type;
    kernel_type(x.scalar_type(), type);
    Tensor dx = empty_token_major(x);
    check_cuda(sparseflash::kernels::unit_norm_rows_backward(
                   type, rows_view(x), rows_view(dy.to(x.scalar_type())), rows_view(dx),
                   static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
                   static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                   static_cast<float>(ctx->saved_data["eps"].toDouble()),
                   at::cuda::getCurrentCUDAStream()),
               "unit_norm_rows backward");
    return {dx, Tensor()};
  }
};

}  // namespace
#endif

// ---------------------------------------------------------------------------
// residual add + LayerNorm

#ifdef SPARSEFLASH_WITH_CUDA
namespace {

struct AddLayerNorm : public torch::autograd::Function<AddLayerNorm> {
  // y and bias with no elements stand for "none" (autograd takes no undefined inputs).
  static tensor_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& y_in,
                             const Tensor& weight, const Tensor& bias_in, double eps,
                             at::ScalarType out_type, bool rms) {
    c10::cuda::CUDAGuard guard(x.device());
    const Tensor y = y_in.numel() > 0 ? y_in : Tensor();
    const Tensor bias = bias_in.numel() > 0 ? bias_in : Tensor();
    namespace sk = sparseflash::kernels;
    const int64_t width = x.size(-1), rows = x.numel() / width;
    Tensor yc = y.defined() ? y.contiguous() : y;
    Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor out = at::empty(x.sizes(), x.options().dtype(out_type));
    Tensor stats = at::empty({2, rows}, x.options());
    sk::AddLayerNormParams p;
    p.rows = static_cast<int>(rows), p.width = static_cast<int>(width);
    p.eps = static_cast<float>(eps);
    p.x = x.data_ptr<float>();
    if (yc.defined()) {
      p.y = yc.data_ptr();
      kernel_type(yc.scalar_type(), p.y_type);
    }
    p.weight = weight.data_ptr<float>();
    p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    p.h = h.data_ptr<float>();
    p.out = out.data_ptr();
    kernel_type(out_type, p.out_type);
    p.mean = stats[0].data_ptr<float>();
    p.rstd = stats[1].data_ptr<float>();
    p.rms = rms;
    check_cuda(sk::add_layer_norm_forward(p, at::cuda::getCurrentCUDAStream()),
               rms ? "add_rms_norm" : "add_layer_norm");
    ctx->save_for_backward({h, stats, weight, bias_in});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["y_type"] = y.defined() ? static_cast<int64_t>(y.scalar_type()) : int64_t{-1};
    return {h, out};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &h = s[0], &stats = s[1], &weight = s[2];
    const Tensor bias = s[3].numel() > 0 ? s[3] : Tensor();
    c10::cuda::CUDAGuard guard(h.device());
    namespace sk = sparseflash::kernels;
    const int64_t width = h.size(-1), rows = h.numel() / width;
    const int64_t y_type = ctx->saved_data["y_type"].toInt();
    Tensor dh = grads[0].defined() ? grads[0].to(at::kFloat).contiguous() : Tensor();
    Tensor dout = grads[1].defined() ? grads[1].contiguous() : at::zeros_like(h);
    sk::AddLayerNormParams p;
    p.rows = static_cast<int>(rows), p.width = static_cast<int>(width);
    p.eps = static_cast<float>(ctx->saved_data["eps"].toDouble());
    p.x = h.data_ptr<float>();  // unused by the backward; must be set
    if (y_type >= 0) kernel_type(static_cast<at::ScalarType>(y_type), p.y_type);
    p.weight = weight.data_ptr<float>();
    p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    p.h = const_cast<float*>(h.data_ptr<float>());
    p.out = dout.data_ptr();
    kernel_type(dout.scalar_type(), p.out_type);
    p.mean = const_cast<float*>(stats[0].data_ptr<float>());
    p.rstd = const_cast<float*>(stats[1].data_ptr<float>());
    p.rms = ctx->saved_data["rms"].toBool();
    const int blocks = sk::add_layer_norm_backward_blocks(static_cast<int>(rows));
    Tensor dx = at::empty_like(h);
    Tensor dy = y_type >= 0 ? at::empty(h.sizes(), h.options().dtype(static_cast<at::ScalarType>(y_type)))
                            : Tensor();
    Tensor partial = at::empty({bias.defined() ? 2 : 1, blocks, width}, h.options());
    sk::AddLayerNormGrads g;
    g.dout = dout.data_ptr();
    g.dh = dh.defined() ? dh.data_ptr<float>() : nullptr;
    g.dx = dx.data_ptr<float>();
    g.dy = dy.defined() ? dy.data_ptr() : nullptr;
    g.partial_dw = partial[0].data_ptr<float>();
    g.partial_db = bias.defined() ? partial[1].data_ptr<float>() : nullptr;
    check_cuda(sk::add_layer_norm_backward(p, g, at::cuda::getCurrentCUDAStream()),
               p.rms ? "add_rms_norm backward" : "add_layer_norm backward");
    Tensor sums = partial.sum(1);
    return {dx, dy, sums[0], bias.defined() ? sums[1] : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace
#endif

namespace {

void check_residual_norm(const char* what, const Tensor& x, const Tensor& y, const Tensor& weight,
                         const Tensor& bias) {
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width, what, ": weight ", weight.sizes(),
              " does not match x ", x.sizes());
  TORCH_CHECK(!bias.defined() || bias.sizes() == weight.sizes(), what, ": bias ", bias.sizes(),
              " does not match weight ", weight.sizes());
  TORCH_CHECK(!y.defined() || y.sizes() == x.sizes(), what, ": y ", y.sizes(), " does not match x ",
              x.sizes());
}

// The output type under CUDA autocast (the next matmul's), else `otherwise`.
at::ScalarType norm_out_type(const Tensor& x, at::ScalarType otherwise) {
  if (x.is_cuda() && at::autocast::is_autocast_enabled(at::kCUDA))
    return at::autocast::get_autocast_dtype(at::kCUDA);
  return otherwise;
}

#ifdef SPARSEFLASH_WITH_CUDA
// Whether the residual-norm kernels take these inputs (see fused.h).
bool residual_norm_kernel_applies(const Tensor& x, const Tensor& y, const Tensor& weight,
                                  const Tensor& bias, at::ScalarType out_type) {
  const int64_t width = x.size(-1);
  sparseflash::kernels::RowType unused;
  return x.is_cuda() && x.scalar_type() == at::kFloat && x.is_contiguous() && width % 4 == 0 &&
         width <= sparseflash::kernels::kMaxLayerNormWidth &&
         (!y.defined() || kernel_type(y.scalar_type(), unused)) &&
         weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
         (!bias.defined() || (bias.scalar_type() == at::kFloat && bias.is_contiguous())) &&
         kernel_type(out_type, unused) && x.numel() / width <= INT32_MAX;
}

std::pair<Tensor, Tensor> residual_norm_kernel(const Tensor& x, const Tensor& y,
                                               const Tensor& weight, const Tensor& bias,
                                               double eps, at::ScalarType out_type, bool rms) {
  NoAutocast no_autocast;
  Tensor none = at::empty({0}, x.options());
  auto r = AddLayerNorm::apply(x, y.defined() ? y : none, weight, bias.defined() ? bias : none,
                               eps, out_type, rms);
  return {r[0], r[1]};
}
#endif

}  // namespace

std::pair<Tensor, Tensor> add_layer_norm(const Tensor& x, const Tensor& y, const Tensor& weight,
                                         const Tensor& bias, double eps) {
  check_residual_norm("add_layer_norm", x, y, weight, bias);
  const int64_t width = x.size(-1);
  const at::ScalarType out_type = norm_out_type(x, x.scalar_type());
#ifdef SPARSEFLASH_WITH_CUDA
  if (residual_norm_kernel_applies(x, y, weight, bias, out_type))
    return residual_norm_kernel(x, y, weight, bias, eps, out_type, /*rms=*/false);
#endif
  Tensor h = y.defined() ? x + y : x;
  Tensor out;
  {
    NoAutocast no_autocast;
    out = at::layer_norm(h, {width}, weight, bias, eps).to(out_type);
  }
  return {h, out};
}

std::pair<Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight,
                                       double eps) {
  check_residual_norm("add_rms_norm", x, y, weight, Tensor());
  // Without autocast the output keeps the type of weight * h, as transformers' RMSNorm.
  const at::ScalarType product_type = at::promote_types(weight.scalar_type(), x.scalar_type());
  const at::ScalarType out_type = norm_out_type(x, product_type);
#ifdef SPARSEFLASH_WITH_CUDA
  if (sparseflash::kernels::fused_llama_kernels_from_environment() &&
      residual_norm_kernel_applies(x, y, weight, Tensor(), out_type))
    return residual_norm_kernel(x, y, weight, Tensor(), eps, out_type, /*rms=*/true);
#endif
  Tensor h = y.defined() ? x + y : x;
  // transformers' LlamaRMSNorm, op for op: float32 statistics, back to h's
  // type, then the gain.
  Tensor hf = h.to(at::kFloat);
  hf = hf * at::rsqrt(hf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  Tensor out = weight * hf.to(h.scalar_type());
  if (out.scalar_type() != out_type) out = out.to(out_type);
  return {h, out};
}

// ---------------------------------------------------------------------------
// SwiGLU

#ifdef SPARSEFLASH_WITH_CUDA
namespace {

struct Swiglu : public torch::autograd::Function<Swiglu> {
  static Tensor forward(AutogradContext* ctx, const Tensor& gate, const Tensor& up) {
    c10::cuda::CUDAGuard guard(gate.device());
    sparseflash::kernels::RowType type;
    kernel_type(gate.scalar_type(), type);
    Tensor out = at::empty_like(gate, at::MemoryFormat::Contiguous);
    check_cuda(sparseflash::kernels::swiglu_forward(type, gate.data_ptr(), up.data_ptr(),
                                                    out.data_ptr(), gate.numel(),
                                                    at::cuda::getCurrentCUDAStream()),
               "swiglu");
    ctx->save_for_backward({gate, up});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &gate = saved[0], &up = saved[1];
    c10::cuda::CUDAGuard guard(gate.device());
    sparseflash::kernels::RowType type;
    kernel_type(gate.scalar_type(), type);
    Tensor dout = grads[0].to(gate.scalar_type()).contiguous();
    Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
    check_cuda(sparseflash::kernels::swiglu_backward(type, gate.data_ptr(), up.data_ptr(),
                                                     dout.data_ptr(), dgate.data_ptr(),
                                                     dup.data_ptr(), gate.numel(),
                                                     at::cuda::getCurrentCUDAStream()),
               "swiglu backward");
    return {dgate, dup};
  }
};

}  // namespace
#endif

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu: gate ", gate.sizes(), " and up ", up.sizes(),
              " differ in shape");
#ifdef SPARSEFLASH_WITH_CUDA
  sparseflash::kernels::RowType type;
  if (sparseflash::kernels::fused_llama_kernels_from_environment() && gate.is_cuda() &&
      up.device() == gate.device() && gate.scalar_type() == up.scalar_type() &&
      kernel_type(gate.scalar_type(), type) && gate.is_contiguous() && up.is_contiguous()) {
    NoAutocast no_autocast;
    return Swiglu::apply(gate, up);
  }
#endif
  return at::silu(gate) * up;
}

// ---------------------------------------------------------------------------
// rotary positions

#ifdef SPARSEFLASH_WITH_CUDA
namespace {

// y = rotary(x) (transpose false) or its adjoint, both [B, H, N, D] with D contiguous.
void rotary_kernel(const Tensor& x, const Tensor& y, const Tensor& cos, const Tensor& sin,
                   bool transpose) {
  sparseflash::kernels::RowType type;
  kernel_type(x.scalar_type(), type);
  check_cuda(sparseflash::kernels::rotary(
                 type, rows_view(x), rows_view(y), cos.data_ptr(), sin.data_ptr(),
                 static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
                 static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), transpose,
                 at::cuda::getCurrentCUDAStream()),
             transpose ? "rotary backward" : "rotary");
}

struct Rotary : public torch::autograd::Function<Rotary> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& cos,
                        const Tensor& sin) {
    c10::cuda::CUDAGuard guard(x.device());
    // Token-major, as ATen's x * cos gives for the heads view of a [B, N, H * D] projection.
    Tensor y = empty_token_major(x);
    rotary_kernel(x, y, cos, sin, /*transpose=*/false);
    ctx->save_for_backward({cos, sin});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &cos = saved[0], &sin = saved[1];
    c10::cuda::CUDAGuard guard(cos.device());
    Tensor dy = grads[0].to(cos.scalar_type());
    if (dy.stride(3) != 1) dy = dy.contiguous();
    Tensor dx = empty_token_major(dy);
    rotary_kernel(dy, dx, cos, sin, /*transpose=*/true);
    return {dx, Tensor(), Tensor()};
  }
};

}  // namespace
#endif

Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary: x must be [B, H, N, D] with D even, got ",
              x.sizes());
  const int64_t N = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == N && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rotary: cos ", cos.sizes(), " and sin ", sin.sizes(), " must both be [N, D] = [", N,
              ", ", D, "] for x ", x.sizes());
#ifdef SPARSEFLASH_WITH_CUDA
  sparseflash::kernels::RowType type;
  if (sparseflash::kernels::fused_llama_kernels_from_environment() && x.is_cuda() &&
      kernel_type(x.scalar_type(), type) && x.stride(3) == 1 &&
      cos.device() == x.device() && sin.device() == x.device() &&
      cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() &&
      cos.is_contiguous() && sin.is_contiguous() && !cos.requires_grad() &&
      !sin.requires_grad() && x.numel() / D <= INT32_MAX) {
    NoAutocast no_autocast;
    return Rotary::apply(x, cos, sin);
  }
#endif
  const int64_t half = D / 2;
  Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// ---------------------------------------------------------------------------
// unit-norm rows

Tensor unit_norm_rows(const Tensor& x, double eps) {
  TORCH_CHECK(x.dim() == 4, "unit_norm_rows: x must be [B, H, N, D], got ", x.sizes());
  TORCH_CHECK(eps > 0, "unit_norm_rows: eps must be > 0, got ", eps);
#ifdef SPARSEFLASH_WITH_CUDA
  sparseflash::kernels::RowType type;
  if (x.is_cuda() && x.stride(3) == 1 && kernel_type(x.scalar_type(), type)) {
    NoAutocast no_autocast;
    return UnitNormRows::apply(x, eps);
  }
#endif
  NoAutocast no_autocast;
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor xf = x.to(ct);
  Tensor norm = at::linalg_vector_norm(xf, 2, {-1}, /*keepdim=*/true).clamp_min(eps);
  return (xf / norm).to(x.scalar_type());
}

}  // namespace sparseflash::model
