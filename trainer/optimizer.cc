// AdamW: decoupled weight decay, PyTorch's fused multi-tensor step; its state
// in checkpoints under optim/<parameter name>/{exp_avg,exp_avg_sq,step}.
#include "trainer/optimizer.h"

#include <ATen/ATen.h>
#include <torch/serialize/archive.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace sparseflash::trainer {

AdamW::AdamW(const model::CausalLM model, const config::Optimizer& options) : options_(options) {
  decay_.weight_decay = options.weight_decay();
  no_decay_.weight_decay = 0;
  for (const auto& item : model->named_parameters()) {
    const Tensor& p = item.value();
    if (!p.requires_grad()) continue;  // frozen (LoRA's base weights): no state
    Group& g = p.dim() >= 2 ? decay_ : no_decay_;
    g.names.push_back(item.key());
    g.params.push_back(p);
    const auto state = at::TensorOptions(p.options()).dtype(
        options.state_dtype() == config::Optimizer::BFLOAT16 ? at::kBFloat16 : p.scalar_type());
    g.exp_avg.push_back(at::zeros(p.sizes(), state));
    g.exp_avg_sq.push_back(at::zeros(p.sizes(), state));
    // The fused kernel keeps the step count in a float tensor beside the param.
    g.steps.push_back(at::zeros({}, p.options().dtype(at::kFloat)));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  for (Group* g : {&decay_, &no_decay_}) {
    std::vector<Tensor> params, grads, m, v, steps;
    for (size_t i = 0; i < g->params.size(); ++i) {
      if (!g->params[i].grad().defined()) continue;
      params.push_back(g->params[i]);
      grads.push_back(g->params[i].grad());
      m.push_back(g->exp_avg[i]);
      v.push_back(g->exp_avg_sq[i]);
      steps.push_back(g->steps[i]);
    }
    if (params.empty()) continue;
    // The fused kernel reads the step count but does not advance it.
    at::_foreach_add_(steps, 1);
    auto update = [&](at::TensorList p, at::TensorList gr, at::TensorList mm, at::TensorList vv,
                      at::TensorList st) {
      at::_fused_adamw_(p, gr, mm, vv, /*max_exp_avg_sqs=*/{}, st, lr, options_.beta1(),
                        options_.beta2(), g->weight_decay, options_.eps(), /*amsgrad=*/false,
                        /*maximize=*/false);
    };
    if (m.front().scalar_type() == params.front().scalar_type()) {
      update(params, grads, m, v, steps);
      continue;
    }
    // Moments stored in another precision: float32 copies of one
    // parameter's at a time, updated, rounded back.
    for (size_t i = 0; i < params.size(); ++i) {
      Tensor m32 = m[i].to(params[i].scalar_type()), v32 = v[i].to(params[i].scalar_type());
      update({params[i]}, {grads[i]}, {m32}, {v32}, {steps[i]});
      m[i].copy_(m32);
      v[i].copy_(v32);
    }
  }
}

void AdamW::zero_grad() {
  for (Group* g : {&decay_, &no_decay_})
    for (auto& p : g->params) p.mutable_grad() = Tensor();
}

void AdamW::save(torch::serialize::OutputArchive& archive) const {
  for (const Group* g : {&decay_, &no_decay_})
    for (size_t i = 0; i < g->params.size(); ++i) {
      archive.write("optim/" + g->names[i] + "/exp_avg", g->exp_avg[i].cpu(), /*is_buffer=*/true);
      archive.write("optim/" + g->names[i] + "/exp_avg_sq", g->exp_avg_sq[i].cpu(), true);
      archive.write("optim/" + g->names[i] + "/step", g->steps[i].cpu(), true);
    }
}

absl::Status read_into(torch::serialize::InputArchive& archive, const std::string& key,
                       Tensor& into) {
  Tensor t;
  if (!archive.try_read(key, t, /*is_buffer=*/true))
    return absl::NotFoundError(absl::StrCat("entry '", key, "' is missing"));
  if (t.sizes() != into.sizes())
    return absl::FailedPreconditionError(
        absl::StrCat("entry '", key, "' has shape ", c10::str(t.sizes()), ", expected ",
                     c10::str(into.sizes())));
  at::NoGradGuard no_grad;
  into.copy_(t);
  return absl::OkStatus();
}

absl::Status AdamW::load(torch::serialize::InputArchive& archive) {
  for (Group* g : {&decay_, &no_decay_})
    for (size_t i = 0; i < g->params.size(); ++i) {
      const std::string prefix = "optim/" + g->names[i];
      if (auto s = read_into(archive, prefix + "/exp_avg", g->exp_avg[i]); !s.ok()) return s;
      if (auto s = read_into(archive, prefix + "/exp_avg_sq", g->exp_avg_sq[i]); !s.ok()) return s;
      if (auto s = read_into(archive, prefix + "/step", g->steps[i]); !s.ok()) return s;
    }
  return absl::OkStatus();
}

}  // namespace sparseflash::trainer
