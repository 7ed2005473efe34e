// One optimizer step. Reading order: autocast, the gradient sync of one and
// of several processes, clipping, the step.
#include "trainer/step.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/utils.h>

#include "profile/phases.h"

namespace sparseflash::trainer {

// ---------------------------------------------------------------------------
// autocast

Autocast::Autocast(bool on) : on_(on) {
  if (!on_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
}

Autocast::~Autocast() {
  if (!on_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, false);
  at::autocast::clear_cache();
}

// ---------------------------------------------------------------------------
// gradient sync

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return at::zeros({}, at::kFloat);
  std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  at::Tensor total = norms.size() == 1 ? norms[0] : at::stack(norms).norm(2);
  at::Tensor coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  at::_foreach_mul_(grads, coef);
  return total.to(at::kFloat);
}

namespace {

class LocalGradients : public GradientSync {
 public:
  explicit LocalGradients(std::vector<at::Tensor> params) : params_(std::move(params)) {}
  void begin_backward(bool) override {}
  CommStats finish_gradients() override { return {}; }
  at::Tensor clip_grad_norm(double max_norm) override {
    return trainer::clip_grad_norm(params_, max_norm);
  }
  void zero_grad(Optimizer& optimizer) override { optimizer.zero_grad(); }

 private:
  std::vector<at::Tensor> params_;
};

class DataParallelGradients : public GradientSync {
 public:
  explicit DataParallelGradients(DataParallel& dp) : dp_(dp) {}
  void begin_backward(bool last) override { dp_.begin_backward(last); }
  CommStats finish_gradients() override { return dp_.finish_gradients(); }
  at::Tensor clip_grad_norm(double max_norm) override {
    // The collective version reads the norm on the host (its all-reduce).
    return at::scalar_tensor(dp_.clip_grad_norm(max_norm), at::kFloat);
  }
  // Keeps the .grad views into the communication buckets.
  void zero_grad(Optimizer&) override { dp_.zero_grad(); }

 private:
  DataParallel& dp_;
};

}  // namespace

std::vector<at::Tensor> trainable_parameters(const model::CausalLM& model) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& p : model->parameters())
    if (p.requires_grad()) out.push_back(p);
  return out;
}

std::unique_ptr<GradientSync> local_gradients(std::vector<at::Tensor> params) {
  return std::make_unique<LocalGradients>(std::move(params));
}

std::unique_ptr<GradientSync> data_parallel_gradients(DataParallel& dp) {
  return std::make_unique<DataParallelGradients>(dp);
}

// ---------------------------------------------------------------------------
// the step

std::pair<double, double> StepResult::values() {
  if (ready) ready->synchronize();
  const float* v = host.data_ptr<float>();
  return {v[0], v[1]};
}

StepResult train_step(model::CausalLM model, Optimizer& optimizer, GradientSync& sync,
                      const StepOptions& options, double lr,
                      const std::function<Batch(int micro)>& micro_batch) {
  StepResult r;
  const int accum = options.grad_accum;
  for (int micro = 0; micro < accum; ++micro) {
    Batch batch = micro_batch(micro);
    sync.begin_backward(/*last=*/micro == accum - 1);
    at::Tensor loss;
    {
      profile::Phase phase("step.forward");
      Autocast autocast(options.bf16);
      loss = model->loss(batch.x, batch.y);
    }
    {
      profile::Phase phase("step.backward");
      (loss / accum).backward();
    }
    at::Tensor l = loss.detach() / accum;
    r.loss = micro == 0 ? l : r.loss + l;
  }
  const at::Device device = r.loss.device();
  {
    profile::Phase phase("step.reduce_and_clip");
    r.comm = sync.finish_gradients();
    r.grad_norm = options.grad_clip > 0 ? sync.clip_grad_norm(options.grad_clip).to(device)
                                        : at::zeros({}, r.loss.options());
  }
  // Loss and norm to the host behind an event, before the update is queued.
  at::Tensor values = at::stack({r.loss.to(at::kFloat), r.grad_norm.to(at::kFloat)});
  if (device.is_cuda()) {
    r.host = at::empty({2}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
    r.host.copy_(values, /*non_blocking=*/true);
    r.ready.emplace(c10::DeviceType::CUDA);
    r.ready->record(c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device));
  } else {
    r.host = values.contiguous();
  }
  {
    profile::Phase phase("step.optimizer");
    optimizer.step(lr);
    sync.zero_grad(optimizer);
  }
  return r;
}

}  // namespace sparseflash::trainer
