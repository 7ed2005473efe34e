// Timing for the GPU benchmarks: the median of `reps` runs of a callable on
// the current CUDA stream, measured with CUDA events after 3 warm-up runs.
#pragma once

#include <algorithm>
#include <functional>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

namespace sparseflash::bench {

inline double median_ms(const std::function<void()>& fn, int reps) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> times;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, stream);
    fn();
    cudaEventRecord(b, stream);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    times.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace sparseflash::bench
