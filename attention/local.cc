// Sinks and a local window on top of a sparse pattern (Pattern::sink_tokens,
// Pattern::local_window): the attention is split into two disjoint parts,
//   A: the pairs the pattern's constraint allows (buckets, drops), computed by
//      the kernels or the reference exactly as without sinks and window;
//   B: the sink and window pairs that A does not hold,
// and merged through their log-sum-exps, out = oA e^(lseA - lse) + oB e^(lseB - lse)
// with lse = log(e^lseA + e^lseB). The backward needs no merge rule: each part's
// gradients are those of its keys under the whole softmax, so A's backward runs
// with the whole attention's out and lse (flash attention's own trick for a
// split key range), and B's is computed here the same way.
//
// B is small (sink_tokens + local_window keys per query). On the GPU it is
// computed by its own kernels (attention/kernels/local_band.h), which also
// merge it into A's output; elsewhere (CPU, float64, other head dims) with
// LibTorch ops on blocks of R query rows: block b holds queries at positions
// [p0, p0 + R) and gathers the sinks and the keys at positions
// [p0 - W + 1, p0 + R - 1], each pair masked by causality, the window and "not
// in A". Memory O(Nq * (S + R + W)) per head, never O(N^2).
#include <cstdlib>
#include <limits>
#include <string>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include "attention/attention.h"
#include "attention/flash.h"
#include "attention/pattern_context.h"
#include "profile/phases.h"

#ifdef SPARSEFLASH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/kernels/local_band.h"
#include "attention/kernels/options.h"
#endif

namespace sparseflash::attention {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

at::ScalarType compute_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The blocked layout of part B for one call.
struct Blocks {
  int64_t B, H, Hkv, G, Nq, Nk, D, offset;
  int64_t S;       // sink keys (at most Nk)
  int64_t W;       // window
  int64_t R;       // query rows per block
  int64_t nblk;    // blocks (the last one padded)
  int64_t Ws;      // window slots per block (R + W - 1, or 0 without a window)
  int64_t slots;   // S + Ws
  Tensor key_pos;  // int64 [nblk, slots]: the key position of each slot (clamped into [0, Nk))
  Tensor allowed;  // bool [B or 1, Hkv, nblk, G, R, slots]: the pairs of part B
};

Blocks make_blocks(const Tensor& q, const Tensor& k, const Pattern& p) {
  Blocks b;
  b.B = q.size(0), b.H = q.size(1), b.Nq = q.size(2), b.D = q.size(3);
  b.Hkv = k.size(1), b.Nk = k.size(2), b.G = b.H / b.Hkv, b.offset = b.Nk - b.Nq;
  b.S = std::min(p.sink_tokens, b.Nk);
  b.W = p.local_window;
  b.R = b.W > 0 ? 64 : std::max<int64_t>(1, std::min<int64_t>(b.Nq, 1024));
  b.nblk = (b.Nq + b.R - 1) / b.R;
  b.Ws = b.W > 0 ? b.R + b.W - 1 : 0;
  b.slots = b.S + b.Ws;
  auto idx = at::TensorOptions().dtype(at::kLong).device(q.device());

  // Positions: queries [nblk, R], slots [nblk, slots].
  Tensor block_start = at::arange(b.nblk, idx) * b.R + b.offset;            // [nblk]
  Tensor row = at::arange(b.R, idx);
  Tensor q_pos = block_start.unsqueeze(1) + row.unsqueeze(0);                 // [nblk, R]
  Tensor q_valid = (q_pos - b.offset).lt(b.Nq);                               // padded rows
  Tensor sink_pos = at::arange(b.S, idx).unsqueeze(0).expand({b.nblk, b.S});
  Tensor win_pos = block_start.unsqueeze(1) - (b.W - 1) + at::arange(b.Ws, idx).unsqueeze(0);
  Tensor slot_pos = at::cat({sink_pos, win_pos}, 1);                         // [nblk, slots]
  b.key_pos = slot_pos.clamp(0, b.Nk - 1);

  // Head-independent rule: causal; sink slots hold the sinks, window slots the
  // keys within W of the query that are not sinks (each key in one slot).
  Tensor qp = q_pos.unsqueeze(2), kp = slot_pos.unsqueeze(1);                 // [nblk, R, slots]
  Tensor is_sink_slot = at::arange(b.slots, idx).lt(b.S).view({1, 1, b.slots});
  Tensor in_window = kp.ge(b.S).logical_and(kp.ge(0)).logical_and(qp.sub(kp).lt(b.W));
  Tensor rule = kp.le(qp).logical_and(is_sink_slot.logical_or(in_window))
                    .logical_and(q_valid.unsqueeze(2));                        // [nblk, R, slots]
  Tensor allowed = rule.view({1, 1, b.nblk, 1, b.R, b.slots});

  // Minus the pairs part A holds: same bucket (HASH, SHIFT) and both kept (DROP).
  auto query_side = [&](const Tensor& t) {  // [B, H, Nq] -> [B, Hkv, nblk, G, R, 1]
    Tensor padded = at::constant_pad_nd(t, {0, b.nblk * b.R - b.Nq}, 0);
    return padded.view({b.B, b.Hkv, b.G, b.nblk, b.R}).permute({0, 1, 3, 2, 4}).unsqueeze(-1);
  };
  auto key_side = [&](const Tensor& t) {  // [B, Hkv, Nk] -> [B, Hkv, nblk, 1, 1, slots]
    return t.index_select(2, b.key_pos.flatten())
        .view({b.B, b.Hkv, b.nblk, 1, 1, b.slots});
  };
  Tensor in_a;
  if (p.q_bucket.defined()) in_a = query_side(p.q_bucket).eq(key_side(p.k_bucket));
  if (p.q_keep.defined()) {
    Tensor kept = query_side(p.q_keep.to(at::kByte)).ne(0).logical_and(key_side(p.k_keep));
    in_a = in_a.defined() ? in_a.logical_and(kept) : kept;
  }
  b.allowed = in_a.defined() ? allowed.logical_and(in_a.logical_not()) : allowed;
  return b;
}

// q [B, H, Nq, D] -> [B, Hkv, nblk, G * R, D] (padded rows are zeros).
Tensor block_queries(const Tensor& q, const Blocks& b) {
  Tensor padded = at::constant_pad_nd(q, {0, 0, 0, b.nblk * b.R - b.Nq}, 0);
  return padded.view({b.B, b.Hkv, b.G, b.nblk, b.R, b.D})
      .permute({0, 1, 3, 2, 4, 5})
      .reshape({b.B, b.Hkv, b.nblk, b.G * b.R, b.D});
}

// [B, Hkv, nblk, G * R, D] -> [B, H, Nq, D].
Tensor unblock_queries(const Tensor& x, const Blocks& b) {
  return x.view({b.B, b.Hkv, b.nblk, b.G, b.R, b.D})
      .permute({0, 1, 3, 2, 4, 5})
      .reshape({b.B, b.H, b.nblk * b.R, b.D})
      .slice(2, 0, b.Nq);
}

// [B, H, Nq] -> [B, Hkv, nblk, G * R, 1].
Tensor block_rows(const Tensor& x, const Blocks& b) {
  Tensor padded = at::constant_pad_nd(x, {0, b.nblk * b.R - b.Nq}, 0);
  return padded.view({b.B, b.Hkv, b.G, b.nblk, b.R})
      .permute({0, 1, 3, 2, 4})
      .reshape({b.B, b.Hkv, b.nblk, b.G * b.R, 1});
}

// k [B, Hkv, Nk, D] -> [B, Hkv, nblk, slots, D].
Tensor gather_keys(const Tensor& k, const Blocks& b) {
  return k.index_select(2, b.key_pos.flatten()).view({b.B, b.Hkv, b.nblk, b.slots, b.D});
}

// Scores of part B with its disallowed pairs at -inf, and the mask, both
// [B, Hkv, nblk, G * R, slots], in compute precision.
std::pair<Tensor, Tensor> block_scores(const Tensor& qb, const Tensor& kb, const Blocks& b,
                                       double scale) {
  Tensor scores = at::matmul(qb, kb.transpose(-1, -2)) * scale;
  Tensor mask = b.allowed.expand({b.B, b.Hkv, b.nblk, b.G, b.R, b.slots})
                    .reshape({b.B, b.Hkv, b.nblk, b.G * b.R, b.slots});
  return {scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()), mask};
}

double resolve_scale(const Tensor& q, double scale) {
  return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
}

// Part B's gradients given the whole attention's out and lse (compute precision).
std::tuple<Tensor, Tensor, Tensor> local_part_backward(const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Pattern& p,
                                                       double scale, const Tensor& out,
                                                       const Tensor& lse, const Tensor& grad_out) {
  auto ct = compute_type(q);
  Blocks b = make_blocks(q, k, p);
  Tensor qb = block_queries(q.to(ct), b), kb = gather_keys(k.to(ct), b),
         vb = gather_keys(v.to(ct), b);
  Tensor dout = block_queries(grad_out.to(ct), b);
  auto [scores, mask] = block_scores(qb, kb, b, scale);
  Tensor lse_b = block_rows(lse.to(ct), b);
  lse_b = at::where(at::isinf(lse_b), at::zeros_like(lse_b), lse_b);
  Tensor prob = at::exp(scores - lse_b).masked_fill(mask.logical_not(), 0);
  Tensor delta = block_rows((grad_out.to(ct) * out.to(ct)).sum(-1), b);  // rowsum(dO * O)
  Tensor dvb = at::matmul(prob.transpose(-1, -2), dout);                   // [.., slots, D]
  Tensor dprob = at::matmul(dout, vb.transpose(-1, -2));
  Tensor dscores = prob * (dprob - delta) * scale;
  Tensor dq = unblock_queries(at::matmul(dscores, kb), b);
  Tensor dkb = at::matmul(dscores.transpose(-1, -2), qb);
  // Back to key positions: every slot adds into the key it gathered (masked
  // slots carry zeros).
  auto scatter = [&](const Tensor& slots_grad) {
    Tensor g = at::zeros({b.B, b.Hkv, b.Nk, b.D}, slots_grad.options());
    g.index_add_(2, b.key_pos.flatten(), slots_grad.reshape({b.B, b.Hkv, b.nblk * b.slots, b.D}));
    return g;
  };
  return {dq.to(q.scalar_type()), scatter(dkb).to(k.scalar_type()),
          scatter(dvb).to(v.scalar_type())};
}

#ifdef SPARSEFLASH_WITH_CUDA
namespace sk = sparseflash::kernels;

// Part B runs on the local kernels on a GPU (attention_test LocalWindowGpu.*
// checks them against the float64 reference); SPARSEFLASH_LOCAL_KERNELS=0 takes
// the LibTorch path instead (to compare, and what KernelSplitMatchesReference tests).
bool local_kernels_enabled() { return sk::local_kernels_from_environment(); }

// Can part B run on the local kernels? (Else the LibTorch blocks above.)
bool local_kernels_apply(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto t = q.scalar_type();
  return local_kernels_enabled() && q.is_cuda() && (t == at::kBFloat16 || t == at::kHalf) && k.scalar_type() == t &&
         v.scalar_type() == t && k.device() == q.device() && v.device() == q.device() &&
         sk::local_head_dim_supported(static_cast<int>(q.size(3))) && k.size(3) == q.size(3) &&
         q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.size(1) <= 65535 &&
         q.size(0) <= 65535 && k.numel() < (int64_t{1} << 31) && q.numel() < (int64_t{1} << 31);
}

sk::Layout layout(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The kernels' view of the call; holds the int32 / uint8 copies of the pattern.
struct LocalCall {
  sk::LocalParams params;
  Tensor q_bucket, k_bucket, q_keep, k_keep;

  LocalCall(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& p, double scale) {
    sk::LocalParams& lp = params;
    lp.dtype = q.scalar_type() == at::kBFloat16 ? sk::DType::kBF16 : sk::DType::kFP16;
    lp.B = q.size(0), lp.H = q.size(1), lp.Hkv = k.size(1), lp.Nq = q.size(2), lp.Nk = k.size(2),
    lp.D = q.size(3);
    lp.sinks = static_cast<int>(std::min<int64_t>(p.sink_tokens, k.size(2)));
    lp.window = static_cast<int>(std::min<int64_t>(p.local_window, k.size(2) + 1));
    lp.scale = static_cast<float>(scale);
    lp.q = q.data_ptr(), lp.k = k.data_ptr(), lp.v = v.data_ptr();
    lp.q_layout = layout(q), lp.k_layout = layout(k), lp.v_layout = layout(v);
    if (p.q_bucket.defined()) {
      q_bucket = p.q_bucket.to(at::kInt).contiguous();
      k_bucket = p.k_bucket.to(at::kInt).contiguous();
      lp.q_bucket = q_bucket.data_ptr<int>();
      lp.k_bucket = k_bucket.data_ptr<int>();
    }
    if (p.q_keep.defined()) {
      q_keep = p.q_keep.to(at::kByte).contiguous();
      k_keep = p.k_keep.to(at::kByte).contiguous();
      lp.q_keep = q_keep.data_ptr<uint8_t>();
      lp.k_keep = k_keep.data_ptr<uint8_t>();
    }
  }
};

void check_kernel(cudaError_t e, const char* what) {
  const std::string why = e == cudaErrorInvalidValue ? sk::last_refusal() : "";
  TORCH_CHECK(e == cudaSuccess, "local_attention: ", what, " failed: ", cudaGetErrorString(e),
              why.empty() ? "" : " (", why, why.empty() ? "" : ")");
}

// A's output and log-sum-exp merged with part B: the whole attention's.
std::pair<Tensor, Tensor> local_merge_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Pattern& p, double scale, const Tensor& out_a,
                                           const Tensor& lse_a) {
  c10::cuda::CUDAGuard guard(q.device());
  LocalCall call(q, k, v, p, scale);
  sk::LocalForwardParams fp;
  fp.p = call.params;
  Tensor a = out_a.stride(3) == 1 ? out_a : out_a.contiguous();
  Tensor la = lse_a.to(at::kFloat).contiguous();
  Tensor out = at::empty_like(a), lse = at::empty_like(la);
  fp.out_a = a.data_ptr(), fp.out_a_layout = layout(a), fp.lse_a = la.data_ptr<float>();
  fp.out = out.data_ptr(), fp.out_layout = layout(out), fp.lse = lse.data_ptr<float>();
  check_kernel(sk::local_forward(fp, at::cuda::getCurrentCUDAStream()), "local forward");
  return {out, lse};
}

// Part B's gradients (float32) given the whole attention's out and lse.
std::tuple<Tensor, Tensor, Tensor> local_backward_cuda(const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Pattern& p,
                                                       double scale, const Tensor& out,
                                                       const Tensor& lse, const Tensor& grad_out,
                                                       bool deterministic) {
  c10::cuda::CUDAGuard guard(q.device());
  LocalCall call(q, k, v, p, scale);
  sk::LocalBackwardParams bp;
  bp.p = call.params;
  Tensor o = out.stride(3) == 1 ? out : out.contiguous();
  Tensor dout = grad_out.stride(3) == 1 ? grad_out : grad_out.contiguous();
  Tensor l = lse.to(at::kFloat).contiguous();
  auto f32 = q.options().dtype(at::kFloat);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  Tensor delta = at::empty({B, H, Nq}, f32);
  Tensor dq = at::empty({B, H, Nq, D}, f32);
  Tensor dk = at::empty({B, Hkv, Nk, D}, f32), dv = at::empty({B, Hkv, Nk, D}, f32);
  bp.out = o.data_ptr(), bp.out_layout = layout(o), bp.lse = l.data_ptr<float>();
  bp.dout = dout.data_ptr(), bp.dout_layout = layout(dout);
  bp.delta = delta.data_ptr<float>(), bp.dq = dq.data_ptr<float>();
  bp.dk = dk.data_ptr<float>(), bp.dv = dv.data_ptr<float>();
  const int64_t S = bp.p.sinks;
  Tensor sink_dk, sink_dv;
  if (deterministic && S > 0 && Nq > 0) {
    const int64_t nblk = sk::local_query_blocks(static_cast<int>(Nq));
    sink_dk = at::empty({B, Hkv, H / Hkv, nblk, S, D}, f32);
    sink_dv = at::empty_like(sink_dk);
    bp.sink_dk = sink_dk.data_ptr<float>(), bp.sink_dv = sink_dv.data_ptr<float>();
  }
  check_kernel(sk::local_backward(bp, at::cuda::getCurrentCUDAStream()), "local backward");
  if (sink_dk.defined()) {
    dk.slice(2, 0, S).add_(sink_dk.sum({2, 3}));
    dv.slice(2, 0, S).add_(sink_dv.sum({2, 3}));
  }
  return {dq, dk, dv};
}
#endif  // SPARSEFLASH_WITH_CUDA

struct LocalAttention : public torch::autograd::Function<LocalAttention> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Pattern& p, bool kernel, int64_t chunk_size, double scale,
                        bool deterministic) {
    NoAutocast no_autocast;
    scale = resolve_scale(q, scale);
    Pattern base = p;
    base.sink_tokens = base.local_window = 0;
    auto [out_a, lse_a] = kernel ? flash_attention_with_lse(q, k, v, base, scale)
                                 : reference_attention_with_lse(q, k, v, base, chunk_size, scale);
    Tensor out, lse;
#ifdef SPARSEFLASH_WITH_CUDA
    if (kernel && local_kernels_apply(q, k, v)) {
      {
        profile::Phase phase("attention.local");
        std::tie(out, lse) = local_merge_cuda(q, k, v, p, scale, out_a, lse_a);
      }
      save(ctx, q, k, v, p, out, lse, kernel, chunk_size, scale, deterministic);
      return out;
    }
#endif
    {
      profile::Phase phase("attention.local");
      auto [out_b, lse_b] = local_part(q, k, v, p, scale);
      auto ct = out_b.scalar_type();
      lse_a = lse_a.to(ct);
      lse = at::logaddexp(lse_a, lse_b);
      // Rows with no key in either part keep out 0 and lse -inf.
      auto weight = [&](const Tensor& part_lse) {
        Tensor w = at::exp(part_lse - lse);
        return at::where(at::isnan(w), at::zeros_like(w), w).unsqueeze(-1);
      };
      out = (out_a.to(ct) * weight(lse_a) + out_b * weight(lse_b));
    }
    // The kernels' backward reads out in q's dtype and lse in float32; the
    // reference keeps compute precision.
    Tensor out_saved = kernel ? out.to(q.scalar_type()) : out;
    Tensor lse_saved = kernel ? lse.to(at::kFloat).contiguous() : lse;
    save(ctx, q, k, v, p, out_saved, lse_saved, kernel, chunk_size, scale, deterministic);
    return out.to(q.scalar_type());
  }

  static void save(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Pattern& p, const Tensor& out_saved, const Tensor& lse_saved,
                   bool kernel, int64_t chunk_size, double scale, bool deterministic) {
    ctx->save_for_backward({q, k, v, out_saved, lse_saved});
    save_pattern(ctx, p);
    ctx->saved_data["kernel"] = kernel;
    ctx->saved_data["chunk"] = chunk_size;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["deterministic"] = deterministic;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    NoAutocast no_autocast;
    auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    Pattern p = load_pattern(ctx);
    Pattern base = p;
    base.sink_tokens = base.local_window = 0;
    const double scale = ctx->saved_data["scale"].toDouble();
    const Tensor& dout = grads[0];
    auto [dq_a, dk_a, dv_a] =
        ctx->saved_data["kernel"].toBool()
            ? flash_backward_part(q, k, v, base, scale, out, lse, dout,
                                  ctx->saved_data["deterministic"].toBool())
            : reference_backward(q, k, v, base, ctx->saved_data["chunk"].toInt(), scale, out, lse,
                                 dout);
    profile::Phase phase("attention.local");
    Tensor dq_b, dk_b, dv_b;
#ifdef SPARSEFLASH_WITH_CUDA
    if (ctx->saved_data["kernel"].toBool() && local_kernels_apply(q, k, v))
      std::tie(dq_b, dk_b, dv_b) = local_backward_cuda(q, k, v, p, scale, out, lse, dout,
                                                       ctx->saved_data["deterministic"].toBool());
#endif
    if (!dq_b.defined())
      std::tie(dq_b, dk_b, dv_b) = local_part_backward(q, k, v, p, scale, out, lse, dout);
    return {dq_a.add_(dq_b), dk_a.add_(dk_b), dv_a.add_(dv_b), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

}  // namespace

std::pair<Tensor, Tensor> local_part(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Pattern& p, double scale) {
  NoAutocast no_autocast;
  at::NoGradGuard no_grad;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(1) % k.size(1) == 0 &&
                  q.size(2) <= k.size(2),
              "local_part: expected q [B, H, Nq, D], k and v [B, Hkv, Nk, D] with H a multiple "
              "of Hkv and Nq <= Nk, got q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
  TORCH_CHECK(p.sink_tokens >= 0 && p.local_window >= 0,
              "local_part: sink_tokens and local_window must be >= 0, got ", p.sink_tokens, " and ",
              p.local_window);
  scale = resolve_scale(q, scale);
  auto ct = compute_type(q);
  const double inf = std::numeric_limits<double>::infinity();
  if (!p.has_local() || q.size(2) == 0) {
    return {at::zeros(q.sizes(), q.options().dtype(ct)),
            at::full({q.size(0), q.size(1), q.size(2)}, -inf, q.options().dtype(ct))};
  }
  Blocks b = make_blocks(q, k, p);
  Tensor qb = block_queries(q.to(ct), b), kb = gather_keys(k.to(ct), b),
         vb = gather_keys(v.to(ct), b);
  auto [scores, mask] = block_scores(qb, kb, b, scale);
  Tensor m = std::get<0>(scores.max(-1, true));
  m = at::where(m.eq(-inf), at::zeros_like(m), m);
  Tensor e = at::exp(scores - m);
  Tensor l = e.sum(-1, true);
  Tensor o = at::matmul(e, vb) / at::where(l.gt(0), l, at::ones_like(l));
  Tensor lse = (m + at::log(l)).squeeze(-1);  // [B, Hkv, nblk, G * R]
  Tensor lse_rows = lse.view({b.B, b.Hkv, b.nblk, b.G, b.R})
                        .permute({0, 1, 3, 2, 4})
                        .reshape({b.B, b.H, b.nblk * b.R})
                        .slice(2, 0, b.Nq);
  return {unblock_queries(o, b), lse_rows};
}

Tensor local_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pattern,
                       bool kernel, int64_t chunk_size, double scale, bool deterministic) {
  TORCH_CHECK(pattern.has_local(),
              "local_attention: the pattern has no sinks and no local window (use the kernels or "
              "the reference directly)");
  return LocalAttention::apply(q, k, v, pattern, kernel, chunk_size, scale, deterministic);
}

}  // namespace sparseflash::attention
