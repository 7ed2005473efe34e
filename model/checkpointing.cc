// Activation checkpointing as a LibTorch autograd function whose backward
// recomputes the block and runs a nested backward through it (the
// "reentrant" form of torch.utils.checkpoint).
#include "model/checkpointing.h"

#include <utility>

#include <ATen/autocast_mode.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

namespace sparseflash::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward needs besides tensors, kept in the context's saved_data
// (which holds IValues only) as a capsule.
struct Call : torch::CustomClassHolder {
  BlockFn fn;
  std::vector<bool> defined;  // which of the block's inputs were defined
  at::Generator generator;
  Tensor generator_state;     // before the forward run
  bool autocast = false;
  at::ScalarType autocast_dtype = at::kBFloat16;

  // The block's inputs with the undefined ones back in their places.
  std::vector<Tensor> arguments(const std::vector<Tensor>& given) const {
    std::vector<Tensor> out;
    size_t next = 0;
    for (bool d : defined) out.push_back(d ? given[next++] : Tensor());
    return out;
  }
};

// CUDA autocast as the forward pass had it, for the recomputation (which
// runs on an autograd thread, where it is off); its cast cache is cleared on
// the way out, as leaving an autocast region does.
class AutocastAs {
 public:
  AutocastAs(bool enabled, at::ScalarType dtype)
      : was_(at::autocast::is_autocast_enabled(at::kCUDA)),
        was_dtype_(at::autocast::get_autocast_dtype(at::kCUDA)) {
    at::autocast::set_autocast_enabled(at::kCUDA, enabled);
    at::autocast::set_autocast_dtype(at::kCUDA, dtype);
    if (enabled) at::autocast::increment_nesting();
    enabled_ = enabled;
  }
  ~AutocastAs() {
    if (enabled_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCUDA, was_);
    at::autocast::set_autocast_dtype(at::kCUDA, was_dtype_);
  }

 private:
  bool was_, enabled_ = false;
  at::ScalarType was_dtype_;
};

struct Checkpoint : torch::autograd::Function<Checkpoint> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               c10::intrusive_ptr<Call> call) {
    // Autograd is off here: fn keeps nothing for a backward.
    variable_list outputs = call->fn(call->arguments(inputs.vec()));
    for (size_t i = 0; i < outputs.size(); ++i)
      TORCH_CHECK(outputs[i].defined(), "checkpointed block: output ", i, " is undefined");
    ctx->save_for_backward(inputs.vec());
    ctx->saved_data["call"] = c10::IValue::make_capsule(std::move(call));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto call = c10::static_intrusive_pointer_cast<Call>(ctx->saved_data["call"].toCapsule());
    variable_list saved = ctx->get_saved_variables();
    std::vector<Tensor> inputs;
    for (const Tensor& s : saved) {
      Tensor d = s.detach();
      d.requires_grad_(s.requires_grad() && at::isFloatingType(s.scalar_type()));
      inputs.push_back(d);
    }
    variable_list outputs;
    {
      // The forward run's draws again, then the stream put back.
      Tensor after = call->generator.get_state();
      call->generator.set_state(call->generator_state);
      at::AutoGradMode grad(true);
      AutocastAs autocast(call->autocast, call->autocast_dtype);
      outputs = call->fn(call->arguments(inputs));
      call->generator.set_state(after);
    }
    TORCH_CHECK(outputs.size() == grad_outputs.size(), "checkpointed block: ", outputs.size(),
                " outputs on recomputation, ", grad_outputs.size(), " in the forward pass");
    variable_list roots, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (!grad_outputs[i].defined() || !outputs[i].requires_grad()) continue;
      roots.push_back(outputs[i]);
      grads.push_back(grad_outputs[i]);
    }
    // Parameters accumulate their gradients here; inputs get theirs in .grad.
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    variable_list result;
    for (const Tensor& d : inputs) result.push_back(d.requires_grad() ? d.grad() : Tensor());
    result.emplace_back();  // the call
    return result;
  }
};

}  // namespace

std::vector<Tensor> checkpointed(const BlockFn& fn, const std::vector<Tensor>& inputs,
                                 at::Generator& generator) {
  auto call = c10::make_intrusive<Call>();
  call->fn = fn;
  call->generator = generator;
  call->generator_state = generator.get_state();
  call->autocast = at::autocast::is_autocast_enabled(at::kCUDA);
  call->autocast_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  std::vector<Tensor> given;
  for (const Tensor& t : inputs) {
    call->defined.push_back(t.defined());
    if (t.defined()) given.push_back(t);
  }
  return Checkpoint::apply(at::TensorList(given), std::move(call));
}

}  // namespace sparseflash::model
