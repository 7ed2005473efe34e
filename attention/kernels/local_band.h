// The local part of attention with sinks and a local window, on the GPU: the
// torch-free interface (attention/local.cc is the caller).
//
// Attention under a sparse pattern with sinks or a window is split in two
// disjoint parts (attention/local.cc): A, the pairs of the pattern's
// constraint, computed by the sparse flash kernels; and B, computed here: for
// the query at position qp, the keys at
//     kp < sinks                  (sink slots), and
//     sinks <= kp, qp - kp < window   (window slots),
// causally (kp <= qp), minus the pairs A holds (same bucket when buckets are
// given, both kept when keep flags are given).
//
// Forward: one block per 64 queries of one head gathers its slots (the sinks,
// then the window keys [p0 - window + 1, p0 + 63]) in chunks of 64 and keeps
// an online softmax, then merges with A's output through the log-sum-exps, so
// the caller gets the whole attention's output and log-sum-exp.
// Backward, given the whole attention's output and log-sum-exp: one pass per
// query block writes dQ (and adds the sink keys' dK, dV with atomics: every
// block sees them), one pass per block of 64 window keys writes their dK, dV
// (a key is seen by the queries up to window - 1 positions after it), so no
// window key needs an atomic. Arithmetic in float32 on CUDA cores: B holds
// about sinks + window keys per query, too few for tensor-core tiles to pay.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention/kernels/sparse_flash.h"

namespace sparseflash::kernels {

struct LocalParams {
  DType dtype = DType::kBF16;
  int B = 0, H = 0, Hkv = 0, Nq = 0, Nk = 0, D = 0;  // D in {64, 128}; H % Hkv == 0
  int sinks = 0;   // at most Nk
  int window = 0;  // 0: sinks only
  float scale = 0;
  const void *q = nullptr, *k = nullptr, *v = nullptr;  // head dim contiguous
  Layout q_layout, k_layout, v_layout;
  // Part A's constraint, nullptr where absent: buckets int32 [B, H, Nq] and
  // [B, Hkv, Nk], keep flags uint8 [B, H, Nq] and [B, Hkv, Nk], contiguous.
  const int* q_bucket = nullptr;
  const int* k_bucket = nullptr;
  const uint8_t* q_keep = nullptr;
  const uint8_t* k_keep = nullptr;
};

struct LocalForwardParams {
  LocalParams p;
  const void* out_a = nullptr;  // A's output, like q
  Layout out_a_layout;
  const float* lse_a = nullptr;  // A's log-sum-exp [B, H, Nq] contiguous (-inf: no key)
  void* out = nullptr;           // the merged output, like q
  Layout out_layout;
  float* lse = nullptr;  // the merged log-sum-exp [B, H, Nq] contiguous
};

struct LocalBackwardParams {
  LocalParams p;
  const void* out = nullptr;  // the whole attention's output and log-sum-exp
  Layout out_layout;
  const float* lse = nullptr;  // [B, H, Nq] contiguous
  const void* dout = nullptr;  // head dim contiguous
  Layout dout_layout;
  float* delta = nullptr;  // workspace [B, H, Nq]
  float* dq = nullptr;     // [B, H, Nq, D] contiguous, written
  float* dk = nullptr;     // [B, Hkv, Nk, D] contiguous, written (zeroed here first)
  float* dv = nullptr;
  // Optional [B, H, ceil(Nq / 64), sinks, D] each. Given, every query block
  // writes its share of the sink keys' dK, dV here and the caller sums them
  // (bit-reproducible); nullptr: added into dk, dv with atomics (the order of
  // the additions varies run to run).
  float* sink_dk = nullptr;
  float* sink_dv = nullptr;
};

inline int local_query_blocks(int Nq) { return (Nq + 63) / 64; }

bool local_head_dim_supported(int D);
// cudaErrorInvalidValue for shapes outside the above.
cudaError_t local_forward(const LocalForwardParams& params, cudaStream_t stream);
cudaError_t local_backward(const LocalBackwardParams& params, cudaStream_t stream);

}  // namespace sparseflash::kernels
