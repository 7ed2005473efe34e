// Phase marks as CUDA event pairs (see phases.h). Events are pooled and
// reused; only collect() synchronises.
#include "profile/phases.h"

#include <atomic>
#include <mutex>
#include <vector>

#include <c10/core/DeviceType.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace sparseflash::profile {

namespace {

struct Mark {
  std::string name;
  cudaEvent_t start = nullptr, end = nullptr;
  bool closed = false;
};

std::atomic<bool> g_enabled{false};
std::mutex g_mutex;
std::vector<Mark> g_marks;  // this window's marks (events reused across windows)
size_t g_used = 0;

cudaEvent_t new_event() {
  cudaEvent_t e;
  C10_CUDA_CHECK(cudaEventCreate(&e));
  return e;
}

}  // namespace

void set_enabled(bool on) { g_enabled.store(on, std::memory_order_relaxed); }

bool enabled() { return g_enabled.load(std::memory_order_relaxed); }

Phase::Phase(const char* name) {
  if (!enabled()) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_used == g_marks.size()) g_marks.push_back({"", new_event(), new_event(), false});
  Mark& m = g_marks[g_used];
  m.name = name;
  m.closed = false;
  slot_ = static_cast<int>(g_used++);
  C10_CUDA_CHECK(cudaEventRecord(m.start, c10::cuda::getCurrentCUDAStream().stream()));
}

Phase::~Phase() {
  if (slot_ < 0) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  Mark& m = g_marks[slot_];
  // A destructor must not throw: a failed record leaves the mark open (skipped).
  if (cudaEventRecord(m.end, c10::cuda::getCurrentCUDAStream().stream()) == cudaSuccess)
    m.closed = true;
}

std::map<std::string, double> collect() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::map<std::string, double> ms;
  for (size_t i = 0; i < g_used; ++i) {
    Mark& m = g_marks[i];
    if (!m.closed) continue;
    C10_CUDA_CHECK(cudaEventSynchronize(m.end));
    float t = 0;
    C10_CUDA_CHECK(cudaEventElapsedTime(&t, m.start, m.end));
    ms[m.name] += t;
  }
  g_used = 0;
  return ms;
}

}  // namespace sparseflash::profile
