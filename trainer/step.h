// One optimizer step, in llm.c's shape: forward and backward over the
// micro-batches (a data-parallel job reduces gradients while the backward
// runs), clip, update. The training loop (trainer.cc) and the training-step
// benchmark (bench/train_step.cc) run this same function.
//
// A step queues its GPU work without waiting for it: the loss and gradient
// norm come back as device scalars, copied to pinned host memory behind an
// event that fires before the optimizer's update has run, so the host can
// read them (one wait per step) while the GPU is still updating.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>

#include "model/causal_lm.h"
#include "trainer/distributed.h"
#include "trainer/optimizer.h"

namespace sparseflash::trainer {

// bf16 autocast on CUDA for the lifetime of the object.
class Autocast {
 public:
  explicit Autocast(bool on);
  ~Autocast();
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  bool on_;
};

struct Batch {
  at::Tensor x, y;  // int64 [B, N]: inputs and next-token targets
};

// What several processes add to a step. The single-process version
// (local_gradients) does no communication.
class GradientSync {
 public:
  virtual ~GradientSync() = default;
  // Before each micro-step's backward; `last` on the step's last micro-step.
  virtual void begin_backward(bool last) = 0;
  // After the last backward: gradients complete (and averaged over ranks).
  virtual CommStats finish_gradients() = 0;
  // The global gradient L2 norm before clipping, clipped to max_norm as
  // torch::nn::utils::clip_grad_norm_ does; a device scalar.
  virtual at::Tensor clip_grad_norm(double max_norm) = 0;
  // After the update: gradients back to zero for the next step.
  virtual void zero_grad(Optimizer& optimizer) = 0;
};

// The parameters a step updates: those that require gradients (LoRA freezes
// the rest).
std::vector<at::Tensor> trainable_parameters(const model::CausalLM& model);

std::unique_ptr<GradientSync> local_gradients(std::vector<at::Tensor> params);
std::unique_ptr<GradientSync> data_parallel_gradients(DataParallel& dp);

// clip_grad_norm_'s result (the total L2 norm; gradients scaled by
// min(1, max_norm / (norm + 1e-6))) computed with multi-tensor kernels and
// returned as a device scalar: no host synchronisation.
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

struct StepOptions {
  int grad_accum = 1;
  double grad_clip = 0;  // 0: no clipping, and grad_norm is not computed
  bool bf16 = false;     // autocast (CUDA)
};

struct StepResult {
  CommStats comm;
  // Read with values(): this process's loss (mean over the micro-steps) and
  // the gradient norm (0 without clipping).
  std::pair<double, double> values();

  at::Tensor loss, grad_norm;  // float32 device scalars
  at::Tensor host;             // [2] float32, pinned on CUDA
  std::optional<c10::Event> ready;
};

// micro_batch(m) returns micro-step m's batch, on the model's device.
StepResult train_step(model::CausalLM model, Optimizer& optimizer, GradientSync& sync,
                      const StepOptions& options, double lr,
                      const std::function<Batch(int micro)>& micro_batch);

}  // namespace sparseflash::trainer
