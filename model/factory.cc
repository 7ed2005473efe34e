// The model factory. Reading order: config <-> LlamaConfig, completing a
// config from a pretrained file, building, loading pretrained weights.
#include "model/factory.h"

#include <cmath>
#include <exception>
#include <filesystem>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/serialize/archive.h>
#include <torch/utils.h>
#include <google/protobuf/text_format.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "configs/config.h"
#include "io/errors.h"
#include "model/gpt.h"
#include "model/llama.h"

namespace sparseflash::model {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------
// config::Model <-> checkpoint::LlamaConfig

checkpoint::LlamaConfig llama_config(const config::Model& m) {
  checkpoint::LlamaConfig c;
  c.vocab_size = m.vocab_size();
  c.hidden_size = m.d_model();
  c.intermediate_size = m.d_ff() > 0 ? m.d_ff() : 4 * int64_t{m.d_model()};
  c.num_hidden_layers = m.n_layer();
  c.num_attention_heads = m.n_head();
  c.num_key_value_heads = m.n_kv_head() > 0 ? m.n_kv_head() : m.n_head();
  c.head_dim = m.head_dim() > 0 ? m.head_dim() : m.d_model() / std::max(1, m.n_head());
  c.max_position_embeddings = m.block_size();
  c.rms_norm_eps = m.norm_eps();
  c.rope_theta = m.rope_theta();
  const config::RopeScaling& r = m.rope_scaling();
  c.rope_scaling.type = r.type() == "default" ? "" : r.type();
  c.rope_scaling.factor = r.factor();
  c.rope_scaling.low_freq_factor = r.low_freq_factor();
  c.rope_scaling.high_freq_factor = r.high_freq_factor();
  c.rope_scaling.original_max_position_embeddings = r.original_max_position_embeddings();
  c.rope_scaling.beta_fast = r.beta_fast();
  c.rope_scaling.beta_slow = r.beta_slow();
  c.rope_scaling.attention_factor = r.attention_factor();
  c.rope_scaling.mscale = r.mscale();
  c.rope_scaling.mscale_all_dim = r.mscale_all_dim();
  c.rope_scaling.truncate = r.truncate();
  c.tie_word_embeddings = m.tie_embeddings();
  return c;
}

void set_llama_fields(const checkpoint::LlamaConfig& c, config::Model* m) {
  m->set_arch(config::Model::LLAMA);
  m->set_vocab_size(static_cast<int32_t>(c.vocab_size));
  m->set_d_model(static_cast<int32_t>(c.hidden_size));
  m->set_d_ff(static_cast<int32_t>(c.intermediate_size));
  m->set_n_layer(static_cast<int32_t>(c.num_hidden_layers));
  m->set_n_head(static_cast<int32_t>(c.num_attention_heads));
  m->set_n_kv_head(static_cast<int32_t>(c.num_key_value_heads));
  m->set_head_dim(static_cast<int32_t>(c.head_dim));
  m->set_block_size(static_cast<int32_t>(c.max_position_embeddings));
  m->set_norm_eps(c.rms_norm_eps);
  m->set_rope_theta(c.rope_theta);
  m->set_tie_embeddings(c.tie_word_embeddings);
  m->set_bias(false);
  config::RopeScaling* r = m->mutable_rope_scaling();
  r->set_type(c.rope_scaling.type);
  r->set_factor(c.rope_scaling.factor);
  r->set_low_freq_factor(c.rope_scaling.low_freq_factor);
  r->set_high_freq_factor(c.rope_scaling.high_freq_factor);
  r->set_original_max_position_embeddings(
      static_cast<int32_t>(c.rope_scaling.original_max_position_embeddings));
  if (c.rope_scaling.type == "yarn") {
    r->set_beta_fast(c.rope_scaling.beta_fast);
    r->set_beta_slow(c.rope_scaling.beta_slow);
    r->set_attention_factor(c.rope_scaling.attention_factor);
    r->set_mscale(c.rope_scaling.mscale);
    r->set_mscale_all_dim(c.rope_scaling.mscale_all_dim);
    r->set_truncate(c.rope_scaling.truncate);
  }
}

// ---------------------------------------------------------------------------
// our training checkpoints (trainer/checkpoint.h writes them)

bool is_training_checkpoint(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return fs::is_regular_file(fs::path(path) / "ckpt.pt", ec);
  return fs::path(path).extension() == ".pt" && fs::is_regular_file(path, ec);
}

namespace {

std::string training_checkpoint_file(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) ? (fs::path(path) / "ckpt.pt").string() : path;
}

absl::Status open_training_checkpoint(const std::string& file,
                                      torch::serialize::InputArchive& archive) {
  try {
    archive.load_from(file, c10::Device(c10::kCPU));
  } catch (const std::exception& e) {
    std::string what = e.what();
    return absl::DataLossError(absl::StrCat("model.init_from: ", file,
                                            " is not a readable sparseflash checkpoint: ",
                                            what.substr(0, what.find('\n'))));
  }
  return absl::OkStatus();
}

absl::StatusOr<config::Experiment> training_checkpoint_config(const std::string& file) {
  torch::serialize::InputArchive archive;
  if (auto s = open_training_checkpoint(file, archive); !s.ok()) return s;
  c10::IValue text;
  if (!archive.try_read("config", text) || !text.isString())
    return absl::DataLossError(
        absl::StrCat("model.init_from: ", file, " has no embedded config (not a sparseflash checkpoint)"));
  return parse_config(text.toStringRef(), file + " (embedded config)");
}

// The fields a pretrained file fixes, as (name, value in the file, value
// given). `may_differ` fields are taken from the file only when not given.
struct FieldCheck {
  std::vector<std::string> errors;
  void check(bool given, const std::string& name, const std::string& in_config,
             const std::string& in_file) {
    if (given && in_config != in_file)
      errors.push_back(absl::StrCat("model.", name, " = ", in_config, " but the file has ", in_file));
  }
};

}  // namespace

// ---------------------------------------------------------------------------
// completing a config

absl::Status complete_from_pretrained(config::Experiment* exp) {
  config::Model* m = exp->mutable_model();
  if (m->init_from().empty()) return absl::OkStatus();
  const std::string path = m->init_from();
  std::error_code ec;
  if (!fs::exists(path, ec))
    return absl::NotFoundError(absl::StrCat("model.init_from: ", path, " does not exist"));

  // What the config gives, before the file's values go in.
  const config::Model given = *m;
  config::Model from_file;
  if (is_training_checkpoint(path)) {
    auto ckpt_config = training_checkpoint_config(training_checkpoint_file(path));
    if (!ckpt_config.ok()) return ckpt_config.status();
    from_file = ckpt_config->model();
    // A GPT run's attention decides its parameters (shared_qk has no key
    // projection): the checkpoint's attention comes along unless given.
    if (from_file.arch() == config::Model::GPT && !exp->has_attention())
      *exp->mutable_attention() = ckpt_config->attention();
  } else {
    const absl::StatusOr<checkpoint::LlamaCheckpoint> ckpt = checkpoint::load_llama_checkpoint(path);
    if (!ckpt.ok())
      return io::with_context(ckpt.status(), absl::StrCat("model.init_from: cannot read ", path));
    set_llama_fields(ckpt->config, &from_file);
    for (float f : ckpt->rope_freq_factors) from_file.add_rope_freq_factors(f);
    if (given.has_arch() && given.arch() != config::Model::LLAMA)
      return absl::InvalidArgumentError(absl::StrCat(
          "model.init_from: ", path, " is a Llama-family model; set model.arch = LLAMA (or leave it out)"));
  }
  from_file.set_init_from(path);

  // Every architecture field: checked where the config gives it; then the
  // file's values, except the ones that may differ where given.
  FieldCheck check;
  const auto* d = config::Model::descriptor();
  const auto* refl = config::Model::GetReflection();
  auto text = [&](const config::Model& msg, const google::protobuf::FieldDescriptor* f) {
    std::string out;
    if (f->is_repeated()) {
      for (int j = 0; j < refl->FieldSize(msg, f); ++j)
        absl::StrAppend(&out, j ? " " : "", refl->GetRepeatedFloat(msg, f, j));
      return absl::StrCat("[", out, "]");
    }
    if (f->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE)
      return absl::StrCat("{", refl->GetMessage(msg, f).ShortDebugString(), "}");
    google::protobuf::TextFormat::PrintFieldValueToString(msg, f, -1, &out);
    return out;
  };
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* f = d->field(i);
    const std::string& name = f->name();
    if (name == "init_from" || name == "init_std" || name == "block_size" ||
        name == "rope_scaling" || name == "lora")
      continue;
    const bool given_here = f->is_repeated() ? refl->FieldSize(given, f) > 0
                            : name == "vocab_size" ? given.vocab_size() != 0  // 0 = "from data"
                                                   : refl->HasField(given, f);
    check.check(given_here, name, text(given, f), text(from_file, f));
  }
  config::Model result = from_file;
  result.set_init_from(path);
  if (given.has_init_std()) result.set_init_std(given.init_std());
  if (given.has_block_size()) result.set_block_size(given.block_size());
  if (given.has_rope_scaling()) {
    *result.mutable_rope_scaling() = given.rope_scaling();
    // Scaling extends the file's pretraining context unless told otherwise
    // (its own original context where the file is scaled already).
    const std::string& file_type = from_file.rope_scaling().type();
    const bool file_scaled = !file_type.empty() && file_type != "default";
    if (!given.rope_scaling().has_original_max_position_embeddings())
      result.mutable_rope_scaling()->set_original_max_position_embeddings(
          file_scaled ? from_file.rope_scaling().original_max_position_embeddings()
                      : from_file.block_size());
  }
  // Adapters belong to the new run (a LoRA source is merged when loaded).
  result.clear_lora();
  if (given.has_lora()) *result.mutable_lora() = given.lora();
  *m = result;
  if (!check.errors.empty())
    return absl::InvalidArgumentError(absl::StrCat(
        "the config disagrees with model.init_from ", path, ":\n  ",
        absl::StrJoin(check.errors, "\n  "),
        "\n(leave these fields out: they come from the file; only model.block_size and "
        "model.rope_scaling may change)"));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// building

namespace {

std::vector<attention::Options> all_layer_attention(const config::Experiment& exp) {
  std::vector<attention::Options> out;
  for (int l = 0; l < exp.model().n_layer(); ++l) out.push_back(layer_attention_options(exp, l));
  return out;
}

void init_llama(LlamaImpl& model, double std) {
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    Tensor& p = item.value();
    if (p.dim() == 1) p.fill_(1.0);  // RMSNorm gains
    else p.normal_(0.0, std);
  }
}

}  // namespace

// What every family gets after it is built: adapters, checkpointing.
static CausalLM finish(CausalLM model, const config::Experiment& exp) {
  if (exp.model().lora().rank() > 0)
    add_lora(*model, exp.model().arch(), LoraOptions::from_config(exp.model().lora()),
             exp.train().seed() ^ 0x10a4ull);
  model->set_activation_checkpointing(exp.train().activation_checkpointing());
  return model;
}

absl::StatusOr<CausalLM> build_model(const config::Experiment& exp, int64_t data_vocab_size) {
  try {
    if (exp.model().arch() == config::Model::GPT) {
      GPT gpt(exp, data_vocab_size);
      return finish(as_causal_lm(gpt), exp);
    }
    config::Model m = exp.model();
    if (m.vocab_size() == 0) m.set_vocab_size(static_cast<int32_t>(data_vocab_size));
    if (m.vocab_size() <= 0)
      return absl::InvalidArgumentError(
          "model.vocab_size is 0 and no data gives it (set model.vocab_size)");
    Llama llama(llama_config(m), all_layer_attention(exp));
    if (m.rope_freq_factors_size() > 0)
      llama->set_rope_frequency_factors(
          std::vector<float>(m.rope_freq_factors().begin(), m.rope_freq_factors().end()));
    init_llama(*llama, m.init_std());
    llama->attention_generator() = at::detail::createCPUGenerator(exp.train().seed() ^ 0x5eedull);
    return finish(as_causal_lm(llama), exp);
  } catch (const std::exception& e) {
    std::string what = e.what();
    return absl::InvalidArgumentError(
        absl::StrCat("cannot build the model: ", what.substr(0, what.find('\n'))));
  }
}

// ---------------------------------------------------------------------------
// pretrained weights

absl::Status load_pretrained(const config::Experiment& exp, CausalLM& model) {
  const std::string& path = exp.model().init_from();
  if (path.empty()) return absl::OkStatus();
  if (is_training_checkpoint(path)) {
    const std::string file = training_checkpoint_file(path);
    torch::serialize::InputArchive archive;
    if (auto s = open_training_checkpoint(file, archive); !s.ok()) return s;
    // A LoRA run's adapters are folded into its weights: the new run starts
    // from the model the old one describes, with adapters of its own (if
    // it has any) starting afresh.
    double source_lora_scale = 0;
    c10::IValue text;
    if (archive.try_read("config", text) && text.isString()) {
      auto source = parse_config(text.toStringRef(), file + " (embedded config)");
      if (source.ok() && source->model().lora().rank() > 0)
        source_lora_scale = source->model().lora().alpha() / source->model().lora().rank();
    }
    auto ends_with = [](const std::string& s, const std::string& end) {
      return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
    };
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      const std::string& name = item.key();
      if (ends_with(name, ".lora_a") || ends_with(name, ".lora_b")) continue;
      Tensor t;
      const std::string key = "model/" + name;
      if (!archive.try_read(key, t, /*is_buffer=*/false) &&
          !archive.try_read(key, t, /*is_buffer=*/true))
        return absl::NotFoundError(
            absl::StrCat("model.init_from ", file, ": entry '", key, "' is missing"));
      if (t.sizes() != item.value().sizes())
        return absl::FailedPreconditionError(
            absl::StrCat("model.init_from ", file, ": entry '", key, "' has shape ",
                         c10::str(t.sizes()), ", the model has ", c10::str(item.value().sizes())));
      Tensor a, b;
      const std::string base = key.substr(0, key.size() - std::string(".weight").size());
      if (source_lora_scale > 0 && ends_with(name, ".weight") &&
          archive.try_read(base + ".lora_a", a) && archive.try_read(base + ".lora_b", b))
        t = (t.to(at::kFloat) + at::matmul(b.to(at::kFloat), a.to(at::kFloat)) * source_lora_scale)
                .to(t.scalar_type());
      item.value().copy_(t);
    }
    return absl::OkStatus();
  }
  auto* llama = dynamic_cast<LlamaImpl*>(model.get());
  if (!llama)
    return absl::InvalidArgumentError(absl::StrCat(
        "model.init_from: ", path, " is a Llama-family file but the model is ",
        arch_name(model->arch())));
  const absl::StatusOr<checkpoint::LlamaCheckpoint> ckpt = checkpoint::load_llama_checkpoint(path);
  if (!ckpt.ok()) return io::with_context(ckpt.status(), "model.init_from");
  try {
    copy_llama_weights(*ckpt, *llama);
  } catch (const std::exception& e) {
    return io::with_context(io::status_from_exception(e), "model.init_from");
  }
  return absl::OkStatus();
}

}  // namespace sparseflash::model
