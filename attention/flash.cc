// LibTorch side of the sparse flash kernels: input checks, packing (bucket
// ids -> stable sort -> tile ranges), the autograd function, and the
// fallback answer "not supported" for builds without CUDA.
#include "attention/flash.h"

#include <climits>
#include <cmath>
#include <optional>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#ifdef SPARSEFLASH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/kernels/sparse_flash.h"
#endif

#include "profile/phases.h"

namespace sparseflash::attention {

#ifndef SPARSEFLASH_WITH_CUDA

bool flash_supported(const Tensor&, const Tensor&, const Tensor&) { return false; }
bool cudnn_supported(const Tensor&, const Tensor&, const Tensor&) { return false; }
Tensor cudnn_attention(const Tensor&, const Tensor&, const Tensor&, double) {
  TORCH_CHECK(false, "cudnn_attention: this build has no CUDA support (nvcc was not found)");
}
bool flash_lsh_supported(const Tensor&, const Tensor&) { return false; }
Tensor flash_lsh_buckets(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "flash_lsh_buckets: this build has no CUDA kernels (nvcc was not found)");
}
Tensor flash_attention(const Tensor&, const Tensor&, const Tensor&, const Pattern&, double, bool) {
  TORCH_CHECK(false, "flash_attention: this build has no CUDA kernels (nvcc was not found)");
}
std::pair<Tensor, Tensor> flash_attention_with_lse(const Tensor&, const Tensor&, const Tensor&,
                                                   const Pattern&, double) {
  TORCH_CHECK(false, "flash_attention: this build has no CUDA kernels (nvcc was not found)");
}
std::tuple<Tensor, Tensor, Tensor> flash_backward_part(const Tensor&, const Tensor&, const Tensor&,
                                                       const Pattern&, double, const Tensor&,
                                                       const Tensor&, const Tensor&, bool) {
  TORCH_CHECK(false, "flash_backward_part: this build has no CUDA kernels (nvcc was not found)");
}

#else

namespace sk = sparseflash::kernels;
static_assert(kLshCapacityBlock == sk::kLshCapRows, "lsh_buckets and the LSH kernel cap the same blocks");
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

bool flash_supported(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto dt = q.scalar_type();
  return q.is_cuda() && k.is_cuda() && v.is_cuda() && q.dim() == 4 && k.dim() == 4 &&
         v.sizes() == k.sizes() && (dt == at::kBFloat16 || dt == at::kHalf) &&
         k.scalar_type() == dt && v.scalar_type() == dt && (q.size(3) == 64 || q.size(3) == 128) &&
         k.size(3) == q.size(3) && k.size(0) == q.size(0) && q.size(1) % k.size(1) == 0 &&
         q.size(2) <= k.size(2);
}

bool cudnn_supported(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto dt = q.scalar_type();
  return q.is_cuda() && k.is_cuda() && v.is_cuda() && q.dim() == 4 && k.sizes() == q.sizes() &&
         v.sizes() == q.sizes() && (dt == at::kBFloat16 || dt == at::kHalf) &&
         k.scalar_type() == dt && v.scalar_type() == dt && q.size(3) % 8 == 0 &&
         q.size(3) <= 128 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1;
}

namespace {

// cuDNN's forward and backward as ATen exposes them, wrapped so that the
// phases are timed like our kernels' and the output gradient reaches cuDNN
// in the output's memory order.
struct CudnnAttention : public torch::autograd::Function<CudnnAttention> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        double scale) {
    profile::Phase phase("attention.forward");
    std::optional<double> s;
    if (scale > 0) s = scale;
    auto r = at::_scaled_dot_product_cudnn_attention(q, k, v, std::nullopt,
                                                     /*compute_log_sumexp=*/true, 0.0,
                                                     /*is_causal=*/true,
                                                     /*return_debug_mask=*/false, s);
    Tensor out = std::get<0>(r);
    ctx->save_for_backward({q, k, v, out, std::get<1>(r), std::get<6>(r), std::get<7>(r)});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    profile::Phase phase("attention.backward");
    auto s = ctx->get_saved_variables();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3];
    Tensor dout = grads[0];
    if (dout.strides() != out.strides()) dout = at::empty_like(out).copy_(dout);
    std::optional<double> scale;
    if (ctx->saved_data["scale"].toDouble() > 0) scale = ctx->saved_data["scale"].toDouble();
    auto [dq, dk, dv] = at::_scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, s[4], s[5], s[6], Tensor(), Tensor(), Tensor(), q.size(2), k.size(2),
        0.0, /*is_causal=*/true, scale);
    return {dq, dk, dv, Tensor()};
  }
};

}  // namespace

Tensor cudnn_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  TORCH_CHECK(cudnn_supported(q, k, v),
              "cudnn_attention: needs CUDA bf16/fp16 q, k, v of one shape [B, H, N, D] with D a "
              "multiple of 8 up to 128 and D contiguous; got q ",
              q.sizes(), " ", q.scalar_type(), ", k ", k.sizes(), ", v ", v.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  return CudnnAttention::apply(q, k, v, scale);
}

namespace {

// A new tensor of t's shape stored in t's order of dimensions: token-major
// ([B, N, H, D] in memory) when t is a view of a [B, N, H * D] projection,
// so that the model's views back to [B, N, H * D] need no copy.
Tensor empty_in_order_of(const Tensor& t) {
  if (t.size(1) > 1 && t.size(2) > 1 && t.stride(1) < t.stride(2))
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
  return at::empty(t.sizes(), t.options());
}

void check_cuda(cudaError_t e, const char* what) {
  const std::string why = e == cudaErrorInvalidValue ? sk::last_refusal() : "";
  TORCH_CHECK(e == cudaSuccess, "flash_attention: ", what, " failed: ", cudaGetErrorString(e),
              why.empty() ? "" : " (", why, why.empty() ? "" : ")");
}


void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "flash_attention: q must be [B, H, Nq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(),
              "flash_attention: k and v must both be [B, Hkv, Nk, D], got k ", k.sizes(), " v ",
              v.sizes());
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "flash_attention: q, k, v must be on one CUDA device, got ", q.device(), ", ",
              k.device(), ", ", v.device());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "flash_attention: q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flash_attention: k and v must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128,
              "flash_attention: head dim must be 64 or 128, got ", q.size(3));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "flash_attention: k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "flash_attention: ", q.size(1),
              " query heads is not a multiple of ", k.size(1), " key heads");
  TORCH_CHECK(q.size(2) <= k.size(2), "flash_attention: more queries (", q.size(2),
              ") than keys (", k.size(2), ")");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(3) == 1, "flash_attention: the head dim of q, k and v must be contiguous");
}

sk::Layout layout_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The kernels copy rows in 16-byte pieces: a tensor whose rows are not
// 16-byte aligned (its address or a stride), or whose head dim is not
// contiguous (dout; check_inputs refuses that for q, k, v), is used through a
// contiguous copy.
Tensor with_aligned_rows(const Tensor& t) {
  const bool aligned = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                       t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Bucket ids in original order (int32 [B * heads, N]) for one side, or an
// undefined tensor for dense.
Tensor side_buckets(const Tensor& bucket, const Tensor& keep, int dropped_bucket) {
  if (!bucket.defined() && !keep.defined()) return Tensor();
  Tensor b = bucket.defined() ? bucket.to(at::kInt) : at::zeros(keep.sizes(), keep.options().dtype(at::kInt));
  if (keep.defined()) b = at::where(keep, b, at::full_like(b, dropped_bucket));
  return b.contiguous();
}

// The packed order of one side: perm, sorted buckets, bucket segments (bucket
// ids of up to kMaxSegmentBits bits) and tile ranges.
struct Packed {
  Tensor perm, bucket, segments, tiles;
  int num_segments = 0;
  int dead_bucket = INT_MAX;
  sk::Packing packing() const {
    sk::Packing p;
    p.perm = perm.defined() ? perm.data_ptr<int>() : nullptr;
    p.bucket = bucket.defined() ? bucket.data_ptr<int>() : nullptr;
    p.tiles = reinterpret_cast<const sk::TileRange*>(tiles.data_ptr<int>());
    p.segments = segments.defined() ? segments.data_ptr<int>() : nullptr;
    p.num_segments = segments.defined() ? num_segments : 0;
    p.dead_bucket = dead_bucket;
    return p;
  }
};

// One side's bucket ids (int32, original order) as the sort reads them: the
// pattern's buckets (undefined: all 0) and, given keep, dropped rows' id
// `dropped`. With a keep mask and ids the counting sort takes (sort_bits <=
// kMaxSegmentBits), the sort applies the mask itself (SortIds) and no id pass
// runs: `keep` is then set and the returned ids are the pattern's alone.
struct SideIds {
  Tensor ids;   // int32 [rows, n] or undefined
  Tensor keep;  // bool [rows, n] (contiguous) or undefined
  int dropped = 0;
};

SideIds side_ids(const Tensor& bucket, const Tensor& keep, int dropped, int sort_bits,
                 const at::Device& device) {
  if (keep.defined() && sort_bits <= sk::kMaxSegmentBits) {
    TORCH_CHECK(keep.device() == device, "flash_attention: the pattern's keep masks must be on ",
                device, " (q's device), got ", keep.device());
    SideIds s;
    s.ids = bucket.defined() ? bucket.to(at::kInt).contiguous() : Tensor();
    s.keep = keep.to(at::kBool).contiguous();
    s.dropped = dropped;
    return s;
  }
  return {side_buckets(bucket, keep, dropped), Tensor(), 0};
}

// dead_bucket: rows with a bucket at or above it are dropped ones.
Packed pack_side(const SideIds& side, int64_t rows, int64_t n, int position_offset, int sort_bits,
                 int dead_bucket, const at::TensorOptions& device) {
  const Tensor& buckets = side.ids;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto i32 = device.dtype(at::kInt);
  Packed p;
  p.dead_bucket = dead_bucket;
  p.tiles = at::empty({rows, sk::num_tiles(static_cast<int>(n)), 4}, i32);
  if (buckets.defined() || side.keep.defined()) {
    TORCH_CHECK(!buckets.defined() || buckets.numel() == rows * n, "flash_attention: pattern has ",
                buckets.numel(), " bucket ids, expected ", rows * n);
    TORCH_CHECK(!side.keep.defined() || side.keep.numel() == rows * n,
                "flash_attention: pattern has ", side.keep.numel(), " keep flags, expected ",
                rows * n);
    p.perm = at::empty({rows, n}, i32);
    p.bucket = at::empty({rows, n}, i32);
    p.num_segments = sk::num_segments_for(sort_bits);
    if (p.num_segments > 0) p.segments = at::empty({rows, p.num_segments + 1}, i32);
    const size_t bytes =
        sk::pack_workspace_bytes(static_cast<int>(rows), static_cast<int>(n), sort_bits);
    Tensor ws = at::empty({static_cast<int64_t>(bytes)}, device.dtype(at::kByte));
    check_cuda(sk::pack_by_bucket(buckets.defined() ? buckets.data_ptr<int>() : nullptr,
                                  static_cast<int>(rows), static_cast<int>(n), sort_bits,
                                  p.perm.data_ptr<int>(), p.bucket.data_ptr<int>(),
                                  p.segments.defined() ? p.segments.data_ptr<int>() : nullptr,
                                  ws.data_ptr(), bytes, stream,
                                  side.keep.defined() ? side.keep.data_ptr<bool>() : nullptr,
                                  side.dropped),
               "bucket sort");
  }
  check_cuda(sk::compute_tile_ranges(p.perm.defined() ? p.perm.data_ptr<int>() : nullptr,
                                     p.bucket.defined() ? p.bucket.data_ptr<int>() : nullptr,
                                     static_cast<int>(rows), static_cast<int>(n), position_offset,
                                     dead_bucket,
                                     reinterpret_cast<sk::TileRange*>(p.tiles.data_ptr<int>()),
                                     stream),
             "tile ranges");
  return p;
}

struct Call {
  sk::ForwardParams params;
  Packed qp, kp;
};

// Packs both sides and fills the forward parameters (out and lse allocated).
Call prepare(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pattern,
             double scale, Tensor& out, Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Hkv = k.size(1), Nk = k.size(2);
  int max_bucket = static_cast<int>(pattern.num_buckets);
  if (pattern.q_bucket.defined() && max_bucket <= 0)  // unknown: ask the GPU (a sync)
    max_bucket = static_cast<int>(std::max(pattern.q_bucket.max().item<int64_t>(),
                                           pattern.k_bucket.max().item<int64_t>())) + 1;
  if (max_bucket <= 0) max_bucket = 1;
  // Dropped rows get the two buckets after the real ones: they match nothing,
  // sort last, and keep the radix sort to the few bits the ids need.
  TORCH_CHECK(pattern.q_keep.defined() == pattern.k_keep.defined(),
              "flash_attention: pattern has q_keep or k_keep but not both");
  const int bits = sk::bucket_sort_bits(false, max_bucket + (pattern.q_keep.defined() ? 2 : 0));
  const SideIds qb = side_ids(pattern.q_bucket, pattern.q_keep, max_bucket, bits, q.device());
  const SideIds kb = side_ids(pattern.k_bucket, pattern.k_keep, max_bucket + 1, bits, q.device());
  TORCH_CHECK((qb.ids.defined() || qb.keep.defined()) == (kb.ids.defined() || kb.keep.defined()),
              "flash_attention: pattern constrains only one side");
  Call c;
  // Both sides' dropped rows: buckets max_bucket (queries), max_bucket + 1 (keys).
  const int dead = pattern.q_keep.defined() ? max_bucket : INT_MAX;
  c.qp = pack_side(qb, B * H, Nq, static_cast<int>(Nk - Nq), bits, dead, q.options());
  c.kp = pack_side(kb, B * Hkv, Nk, 0, bits, dead, q.options());
  out = empty_in_order_of(q);
  lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  sk::ForwardParams& p = c.params;
  p.dtype = q.scalar_type() == at::kBFloat16 ? sk::DType::kBF16 : sk::DType::kFP16;
  p.B = B, p.H = H, p.Hkv = Hkv, p.Nq = Nq, p.Nk = Nk, p.D = q.size(3);
  p.scale = static_cast<float>(scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(q.size(3))));
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.out = out.data_ptr();
  p.q_layout = layout_of(q), p.k_layout = layout_of(k), p.v_layout = layout_of(v);
  p.out_layout = layout_of(out);
  p.lse = lse.data_ptr<float>();
  p.q_pack = c.qp.packing();
  p.k_pack = c.kp.packing();
  return c;
}

// The backward kernels over packed sides, given the output and log-sum-exp
// the probabilities are normalised by.
std::tuple<Tensor, Tensor, Tensor> run_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& out, const Tensor& lse,
                                                const Tensor& grad_out, const Packed& qp,
                                                const Packed& kp, double scale,
                                                bool deterministic) {
  Tensor dout = with_aligned_rows(grad_out);
  sk::BackwardParams b;
  sk::ForwardParams& f = b.fwd;
  f.dtype = q.scalar_type() == at::kBFloat16 ? sk::DType::kBF16 : sk::DType::kFP16;
  f.B = q.size(0), f.H = q.size(1), f.Hkv = k.size(1), f.Nq = q.size(2), f.Nk = k.size(2),
  f.D = q.size(3);
  f.scale = static_cast<float>(scale);
  f.q = q.data_ptr(), f.k = k.data_ptr(), f.v = v.data_ptr(), f.out = out.data_ptr();
  f.q_layout = layout_of(q), f.k_layout = layout_of(k), f.v_layout = layout_of(v);
  f.out_layout = layout_of(out);
  f.lse = lse.data_ptr<float>();
  f.q_pack = qp.packing();
  f.k_pack = kp.packing();
  Tensor dq = empty_in_order_of(q), dk = empty_in_order_of(k), dv = empty_in_order_of(v);
  Tensor delta = at::empty({f.B, f.H, f.Nq}, q.options().dtype(at::kFloat));
  b.dout = dout.data_ptr(), b.dout_layout = layout_of(dout);
  b.dq = dq.data_ptr(), b.dk = dk.data_ptr(), b.dv = dv.data_ptr();
  b.dq_layout = layout_of(dq), b.dk_layout = layout_of(dk), b.dv_layout = layout_of(dv);
  b.delta = delta.data_ptr<float>();
  Tensor dq_accum;
  if (!deterministic) {
    dq_accum = at::empty({f.B, f.H, f.Nq, f.D}, q.options().dtype(at::kFloat));
    b.dq_accum = dq_accum.data_ptr<float>();
  }
  check_cuda(sk::attention_backward(b, at::cuda::getCurrentCUDAStream()), "backward");
  return {dq, dk, dv};
}

struct FlashAttention : public torch::autograd::Function<FlashAttention> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q_in, const Tensor& k_in,
                        const Tensor& v_in, const Pattern& pattern, double scale,
                        bool deterministic) {
    check_inputs(q_in, k_in, v_in);
    c10::cuda::CUDAGuard guard(q_in.device());
    Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
    Tensor out, lse;
    Call c = [&] {
      profile::Phase phase("attention.packing");
      return prepare(q, k, v, pattern, scale, out, lse);
    }();
    {
      profile::Phase phase("attention.forward");
      check_cuda(sk::attention_forward(c.params, at::cuda::getCurrentCUDAStream()), "forward");
    }
    // The packing is kept for the backward: same pattern, no second sort.
    auto undef = [](const Tensor& t) { return t.defined() ? t : at::empty({0}, at::kInt); };
    ctx->save_for_backward({q, k, v, out, lse, undef(c.qp.perm), undef(c.qp.bucket), c.qp.tiles,
                            undef(c.qp.segments), undef(c.kp.perm), undef(c.kp.bucket), c.kp.tiles,
                            undef(c.kp.segments)});
    ctx->saved_data["num_segments"] = static_cast<int64_t>(c.qp.num_segments);
    ctx->saved_data["dead_bucket"] = static_cast<int64_t>(c.qp.dead_bucket);
    ctx->saved_data["scale"] = static_cast<double>(c.params.scale);
    ctx->saved_data["deterministic"] = deterministic;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    profile::Phase phase("attention.backward");
    auto s = ctx->get_saved_variables();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4];
    c10::cuda::CUDAGuard guard(q.device());
    const int num_segments = static_cast<int>(ctx->saved_data["num_segments"].toInt());
    const int dead_bucket = static_cast<int>(ctx->saved_data["dead_bucket"].toInt());
    auto packed = [&](const Tensor& perm, const Tensor& bucket, const Tensor& tiles,
                      const Tensor& segments) {
      Packed p;
      if (perm.numel() > 0) p.perm = perm, p.bucket = bucket;
      if (segments.numel() > 0) p.segments = segments, p.num_segments = num_segments;
      p.tiles = tiles;
      p.dead_bucket = dead_bucket;
      return p;
    };
    Packed qp = packed(s[5], s[6], s[7], s[8]), kp = packed(s[9], s[10], s[11], s[12]);
    auto [dq, dk, dv] = run_backward(q, k, v, out, lse, grads[0], qp, kp,
                                     ctx->saved_data["scale"].toDouble(),
                                     ctx->saved_data["deterministic"].toBool());
    return {dq, dk, dv, Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

bool flash_lsh_supported(const Tensor& x, const Tensor& rotations) {
  const auto dt = x.scalar_type();
  if (!x.is_cuda() || x.dim() != 4 || (dt != at::kBFloat16 && dt != at::kHalf)) return false;
  const int64_t D = x.size(3);
  if (D % 8 != 0 || D > 256 || x.stride(3) != 1) return false;
  if (rotations.dim() != 3 || rotations.size(1) != D || rotations.size(0) <= 0 ||
      x.size(1) % rotations.size(0) != 0 || rotations.size(2) > (1 << 20))
    return false;
  const auto* props = at::cuda::getDeviceProperties(x.device().index());
  if (!sk::lsh_shape_fits(static_cast<int>(D), static_cast<int>(rotations.size(2)),
                          props->sharedMemPerBlockOptin))
    return false;
  const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr());
  return addr % 16 == 0 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0;
}

Tensor flash_lsh_buckets(const Tensor& x, const Tensor& rotations, const Tensor& offsets,
                         int64_t offset_block, int64_t cap) {
  TORCH_CHECK(flash_lsh_supported(x, rotations), "flash_lsh_buckets: unsupported x ", x.sizes(),
              " (", x.scalar_type(), ", strides ", x.strides(), ") or rotations ",
              rotations.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  Tensor r = rotations.to(x.device(), at::kFloat).contiguous();
  const int64_t nb = 2 * rotations.size(2);
  TORCH_CHECK(cap == 0 || (cap > 0 && cap <= kLshCapacityBlock && nb <= 64 &&
                           cap * nb >= kLshCapacityBlock),
              "flash_lsh_buckets: a bucket capacity needs nb <= 64 and ", kLshCapacityBlock,
              " >= cap >= ", kLshCapacityBlock, " / nb, got cap ", cap, " with nb ", nb);
  Tensor out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  // With a cap the kernel stages the projections here for its assignment pass.
  Tensor scores;
  if (cap > 0) scores = at::empty({out.numel() * r.size(2)}, x.options().dtype(at::kFloat));
  Tensor off;
  if (offsets.defined()) {
    TORCH_CHECK(offset_block >= 1, "flash_lsh_buckets: offset_block must be >= 1, got ",
                offset_block);
    const int64_t blocks = (x.size(2) + offset_block - 1) / offset_block;
    TORCH_CHECK(offsets.dim() == 4 && offsets.size(0) == x.size(0) &&
                    offsets.size(1) == x.size(1) && offsets.size(2) == blocks &&
                    offsets.size(3) == r.size(2),
                "flash_lsh_buckets: offsets must be [B, H, ceil(N / offset_block), nb/2] = [",
                x.size(0), ", ", x.size(1), ", ", blocks, ", ", r.size(2), "], got ",
                offsets.sizes());
    off = offsets.to(x.device(), at::kFloat).contiguous();
  }
  check_cuda(sk::lsh_bucket_ids(x.scalar_type() == at::kBFloat16 ? sk::DType::kBF16 : sk::DType::kFP16,
                                x.data_ptr(), {x.stride(0), x.stride(1), x.stride(2)},
                                static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
                                static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                                r.data_ptr<float>(), static_cast<int>(r.size(0)),
                                static_cast<int>(r.size(2)), out.data_ptr<int64_t>(),
                                at::cuda::getCurrentCUDAStream(),
                                off.defined() ? off.data_ptr<float>() : nullptr,
                                static_cast<int>(offset_block), static_cast<int>(cap),
                                scores.defined() ? scores.data_ptr<float>() : nullptr),
             "LSH bucket ids");
  return out;
}

Tensor flash_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pattern,
                       double scale, bool deterministic) {
  return FlashAttention::apply(q, k, v, pattern, scale, deterministic);
}

std::pair<Tensor, Tensor> flash_attention_with_lse(const Tensor& q_in, const Tensor& k_in,
                                                   const Tensor& v_in, const Pattern& pattern,
                                                   double scale) {
  check_inputs(q_in, k_in, v_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  Tensor out, lse;
  Call c = prepare(q, k, v, pattern, scale, out, lse);
  check_cuda(sk::attention_forward(c.params, at::cuda::getCurrentCUDAStream()), "forward");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_backward_part(const Tensor& q_in, const Tensor& k_in,
                                                       const Tensor& v_in, const Pattern& pattern,
                                                       double scale, const Tensor& out_in,
                                                       const Tensor& lse, const Tensor& grad_out,
                                                       bool deterministic) {
  profile::Phase phase("attention.backward");
  check_inputs(q_in, k_in, v_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(out_in.sizes() == q_in.sizes() && out_in.scalar_type() == q_in.scalar_type(),
              "flash_backward_part: out must be like q ", q_in.sizes(), " ", q_in.scalar_type(),
              ", got ", out_in.sizes(), " ", out_in.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q_in.size(0), q_in.size(1), q_in.size(2)}),
              "flash_backward_part: lse must be contiguous float32 [B, H, Nq], got ", lse.sizes(),
              " ", lse.scalar_type());
  Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  Tensor out = with_aligned_rows(out_in);
  Tensor unused_out, unused_lse;
  Call c = prepare(q, k, v, pattern, scale, unused_out, unused_lse);
  return run_backward(q, k, v, out, lse, grad_out, c.qp, c.kp, c.params.scale, deterministic);
}

#endif  // SPARSEFLASH_WITH_CUDA

}  // namespace sparseflash::attention
