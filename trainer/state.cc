// AdamW and checkpoints. A checkpoint is one LibTorch archive holding:
//   format, config (text), tokenizer, state/step, state/tokens,
//   model/<parameter name>, optim/<parameter name>/{exp_avg,exp_avg_sq,step},
//   rng/attention, rng/cpu.
#include "trainer/state.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <google/protobuf/text_format.h>
#include <torch/serialize/archive.h>

#include "absl/strings/str_cat.h"
#include "configs/config.h"

namespace sparseflash::trainer {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------
// AdamW

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

// ---------------------------------------------------------------------------
// checkpoints

std::string checkpoint_path(const std::string& file_or_dir) {
  std::error_code ec;
  if (fs::is_directory(file_or_dir, ec)) return (fs::path(file_or_dir) / "ckpt.pt").string();
  return file_or_dir;
}

absl::Status save_checkpoint(const std::string& path, const config::Experiment& exp,
                             const std::string& tokenizer, model::CausalLM model,
                             const Optimizer* optimizer, const TrainState& state) {
  const std::string tmp = path + ".tmp";
  try {
    torch::serialize::OutputArchive archive;
    archive.write("format", c10::IValue(kCheckpointFormat));
    archive.write("config", c10::IValue(config_to_text(exp)));
    archive.write("tokenizer", c10::IValue(tokenizer));
    archive.write("state/step", c10::IValue(state.step));
    archive.write("state/tokens", c10::IValue(state.tokens));
    for (const auto& item : model->named_parameters())
      archive.write("model/" + item.key(), item.value().detach().cpu());
    if (optimizer) optimizer->save(archive);
    archive.write("rng/attention", model->attention_generator().get_state(), true);
    archive.write("rng/cpu", at::detail::getDefaultCPUGenerator().get_state(), true);
    archive.save_to(tmp);
  } catch (const std::exception& e) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot write checkpoint ", path, ": ", e.what()));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("cannot move checkpoint into place at ", path, ": ", std::strerror(err)));
  }
  return absl::OkStatus();
}

static absl::Status open_archive(const std::string& path, torch::serialize::InputArchive& archive) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    return absl::NotFoundError(absl::StrCat("checkpoint ", path, " does not exist"));
  try {
    archive.load_from(path, c10::Device(c10::kCPU));
  } catch (const std::exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path, " is not a readable sparseflash checkpoint: ", what));
  }
  return absl::OkStatus();
}

absl::StatusOr<CheckpointInfo> read_checkpoint_info(const std::string& path) {
  torch::serialize::InputArchive archive;
  if (auto s = open_archive(path, archive); !s.ok()) return s;
  c10::IValue format, text, tokenizer, step, tokens;
  if (!archive.try_read("format", format) || !format.isInt())
    return absl::DataLossError(absl::StrCat("checkpoint ", path,
                                            " has no 'format' entry: not a sparseflash checkpoint"));
  if (format.toInt() != kCheckpointFormat)
    return absl::FailedPreconditionError(absl::StrCat("checkpoint ", path, " has format ",
                                                      format.toInt(), ", this build reads ",
                                                      kCheckpointFormat));
  if (!archive.try_read("config", text) || !text.isString() ||
      !archive.try_read("tokenizer", tokenizer) || !tokenizer.isString() ||
      !archive.try_read("state/step", step) || !archive.try_read("state/tokens", tokens))
    return absl::DataLossError(absl::StrCat("checkpoint ", path,
                                            " lacks config, tokenizer or state entries"));
  auto config = parse_config(text.toStringRef(), path + " (embedded config)");
  if (!config.ok()) return config.status();
  CheckpointInfo info;
  info.config = *std::move(config);
  info.tokenizer = tokenizer.toStringRef();
  info.state.step = step.toInt();
  info.state.tokens = tokens.toInt();
  return info;
}

absl::Status load_checkpoint(const std::string& path, model::CausalLM model,
                             Optimizer* optimizer) {
  torch::serialize::InputArchive archive;
  if (auto s = open_archive(path, archive); !s.ok()) return s;
  auto wrap = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("checkpoint ", path, ": ", s.message()));
  };
  for (auto& item : model->named_parameters())
    if (auto s = read_into(archive, "model/" + item.key(), item.value()); !s.ok()) return wrap(s);
  if (!optimizer) return absl::OkStatus();
  if (auto s = optimizer->load(archive); !s.ok()) return wrap(s);
  Tensor attention_rng, cpu_rng;
  if (!archive.try_read("rng/attention", attention_rng, true) ||
      !archive.try_read("rng/cpu", cpu_rng, true))
    return wrap(absl::DataLossError("RNG state entries are missing"));
  model->attention_generator().set_state(attention_rng);
  at::Generator cpu_generator = at::detail::getDefaultCPUGenerator();
  cpu_generator.set_state(cpu_rng);
  return absl::OkStatus();
}

}  // namespace sparseflash::trainer
