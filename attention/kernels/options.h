// Switches of the attention kernels, for comparisons in benchmarks and tests.
// The one place the kernels read the environment: once, on first use, unless
// set_kernel_options replaced them before.
#pragma once

namespace sparseflash::kernels {

struct KernelOptions {
  // The bf16 forward (and dK/dV) on warpgroup MMA on sm_90; off with
  // SPARSEFLASH_NO_WGMMA set (both passes then run on mma.sync).
  bool wgmma_forward = true;
  // The bf16 dK/dV on warpgroup MMA (given wgmma_forward); off with
  // SPARSEFLASH_NO_WGMMA_BWD set.
  bool wgmma_backward = true;
  // The forward-style passes' grid with heads fastest; SPARSEFLASH_GRID_ORDER=blocks
  // puts row blocks fastest.
  bool grid_heads_fastest = true;
};

// From the environment on first use.
const KernelOptions& kernel_options();
// Replaces them for the launches that follow (not while a launch runs on
// another thread): tests and benchmarks compare the paths in one process.
void set_kernel_options(const KernelOptions& options);

// SPARSEFLASH_LOCAL_KERNELS: "0" sends the local-band part of sparse attention
// with sinks and a window to LibTorch (attention/local.cc); read at every call,
// since tests switch it between cases.
bool local_kernels_from_environment();

// SPARSEFLASH_FUSED_LLAMA: "1" runs the Llama layer's fused operations
// (model/fused.h: add_rms_norm, swiglu, rotary) on their CUDA kernels; unset
// or anything else, on their ATen paths (the default until those kernels have
// passed fused_test on a GPU). Read at every call, so that benchmarks and tests
// can compare both in one process.
bool fused_llama_kernels_from_environment();

}  // namespace sparseflash::kernels
