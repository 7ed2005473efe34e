// Loading a model to run. Reading order: option parsing, pretrained files,
// runs of ours, the one-line description.
#include "model/load.h"

#include <cmath>
#include <exception>
#include <filesystem>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/llama.h"
#include "io/errors.h"
#include "model/factory.h"
#include "model/llama.h"

namespace sparseflash::model {

namespace {

absl::Status check_vocabulary(const LoadedModel& l) {
  if (l.tokenizer && l.tokenizer->vocab_size() > l.model->vocab_size())
    return absl::InvalidArgumentError(absl::StrCat(
        "the tokenizer has ", l.tokenizer->vocab_size(), " tokens, the model's vocabulary ",
        l.model->vocab_size(), " (wrong --tokenizer?)"));
  return absl::OkStatus();
}

const char* kind_name(attention::Kind kind) {
  switch (kind) {
    case attention::Kind::kHash: return "hash";
    case attention::Kind::kDrop: return "drop";
    case attention::Kind::kShift: return "shift";
    default: return "dense";
  }
}

// Llama's fused q/k/v and gate/up weights, once the model sits on its device.
void fuse_for_inference(CausalLM& model) {
  if (model->arch() == config::Model::LLAMA) static_cast<LlamaImpl*>(model.get())->fuse_projections();
}

}  // namespace

// ---------------------------------------------------------------------------
// options

absl::StatusOr<AttentionOverride> parse_attention(const std::string& kind, int num_buckets,
                                                  double drop_prob, int64_t group_size,
                                                  int64_t sink_tokens, int64_t local_window,
                                                  double lsh_capacity) {
  AttentionOverride o;
  if (kind == "dense") o.kind = attention::Kind::kDense;
  else if (kind == "hash") o.kind = attention::Kind::kHash;
  else if (kind == "drop") o.kind = attention::Kind::kDrop;
  else if (kind == "shift") o.kind = attention::Kind::kShift;
  else
    return absl::InvalidArgumentError(absl::StrCat(
        "--attention: expected dense, hash, drop, shift or saap, got \"", kind, "\""));
  o.num_buckets = num_buckets;
  o.drop_prob = drop_prob;
  o.group_size = group_size;
  o.sink_tokens = sink_tokens;
  o.local_window = local_window;
  if (sink_tokens < 0 || local_window < 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "--sparse-sinks and --sparse-window must be >= 0, got ", sink_tokens, " and ", local_window));
  if (o.kind == attention::Kind::kDense && (sink_tokens > 0 || local_window > 0))
    return absl::InvalidArgumentError(
        "--sparse-sinks and --sparse-window apply to the sparse kinds (hash, drop, shift); dense "
        "attention already sees every earlier key");
  if (o.kind == attention::Kind::kShift && o.group_size < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--group-size must be >= 0 (0 = a quarter of the keys), got ", o.group_size));
  if (o.kind == attention::Kind::kHash && (o.num_buckets < 2 || o.num_buckets % 2 != 0))
    return absl::InvalidArgumentError(
        absl::StrCat("--num-buckets must be even and >= 2, got ", o.num_buckets));
  if (o.kind == attention::Kind::kDrop && !(o.drop_prob >= 0 && o.drop_prob < 1))
    return absl::InvalidArgumentError(absl::StrCat("--drop-prob must be in [0, 1), got ", o.drop_prob));
  o.lsh_capacity = lsh_capacity;
  if (lsh_capacity != 0 && (o.kind != attention::Kind::kHash || !(lsh_capacity >= 1)))
    return absl::InvalidArgumentError(absl::StrCat(
        "--lsh-capacity applies to --attention hash and must be 0 (no cap) or >= 1, got ",
        lsh_capacity));
  if (lsh_capacity != 0 && o.num_buckets > 64)
    return absl::InvalidArgumentError(absl::StrCat(
        "--lsh-capacity needs --num-buckets <= 64 (capped buckets), got ", o.num_buckets));
  return o;
}

absl::StatusOr<at::ScalarType> parse_dtype(const std::string& name, const at::Device& device) {
  if (name == "auto") return device.is_cuda() ? at::kBFloat16 : at::kFloat;
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype: expected auto, float32, bfloat16 or float16, got \"", name, "\""));
}

const char* dtype_name(at::ScalarType t) {
  return t == at::kBFloat16 ? "bfloat16" : t == at::kHalf ? "float16" : "float32";
}

// ---------------------------------------------------------------------------
// pretrained files

absl::Status apply_rope_scaling(const std::string& spec, checkpoint::LlamaConfig* c) {
  const size_t colon = spec.find(':');
  const std::string type = spec.substr(0, colon);
  double factor = 0;
  if (colon == std::string::npos || !absl::SimpleAtod(spec.substr(colon + 1), &factor) ||
      !(factor >= 1) || (type != "linear" && type != "dynamic" && type != "yarn"))
    return absl::InvalidArgumentError(absl::StrCat(
        "--rope-scaling: expected TYPE:FACTOR with TYPE linear, dynamic or yarn and FACTOR >= 1 "
        "(e.g. linear:4), got \"", spec, "\""));
  const std::string& had = c->rope_scaling.type;
  const int64_t original = had.empty() || had == "default"
                               ? c->max_position_embeddings
                               : c->rope_scaling.original_max_position_embeddings;
  checkpoint::RopeScaling s;
  s.type = type;
  s.factor = factor;
  s.original_max_position_embeddings = original;
  c->rope_scaling = s;
  c->max_position_embeddings = static_cast<int64_t>(std::llround(factor * original));
  return absl::OkStatus();
}

absl::StatusOr<LoadedModel> load_pretrained_model(const std::string& path,
                                                  const LoadOptions& options) {
  if (!std::filesystem::exists(path))
    return absl::NotFoundError(absl::StrCat("--model: ", path, " does not exist"));
  LoadedModel l;
  l.path = path;
  l.device = options.device;
  auto dtype = parse_dtype(options.dtype, options.device);
  if (!dtype.ok()) return dtype.status();
  l.dtype = *dtype;
  absl::StatusOr<checkpoint::LlamaCheckpoint> read = checkpoint::load_llama_checkpoint(path);
  if (!read.ok()) return read.status();
  checkpoint::LlamaCheckpoint ckpt = *std::move(read);
  try {
    if (!options.rope_scaling.empty()) {
      if (!ckpt.rope_freq_factors.empty())
        return absl::InvalidArgumentError(
            absl::StrCat("--rope-scaling: ", path, " has per-frequency RoPE divisors (GGUF "
                         "rope_freqs.weight); other scaling cannot be applied on top"));
      if (auto s = apply_rope_scaling(options.rope_scaling, &ckpt.config); !s.ok()) return s;
    }
    LlamaLoadOptions o;
    attention::Options a;
    if (options.attention) {
      a.kind = options.attention->kind;
      a.num_buckets = options.attention->num_buckets;
      a.drop_prob = options.attention->drop_prob;
      a.group_size = options.attention->group_size;
      a.sink_tokens = options.attention->sink_tokens;
      a.local_window = options.attention->local_window;
      a.lsh_capacity = options.attention->lsh_capacity;
    }
    o.attention = {a};
    o.dtype = l.dtype;
    o.device = l.device;
    o.attention_seed = options.attention_seed;
    l.model = load_llama(ckpt, o);
    l.format = checkpoint::source_format_name(ckpt.format);
    // A SAAP index fitted under a RoPE override belongs to that override.
    l.identity = options.rope_scaling.empty() ? ckpt.identity
                                              : ckpt.identity + "+rope:" + options.rope_scaling;
    l.attention = kind_name(a.kind);
    l.eos_id = ckpt.config.eos_token_id;
  } catch (const std::exception& e) {  // load_llama's messages name the file
    return io::status_from_exception(e);
  }
  if (options.need_tokenizer) {
    auto tokenizer = tokenizer::load_tokenizer(path, options.tokenizer);
    if (!tokenizer.ok()) return tokenizer.status();
    l.tokenizer = *std::move(tokenizer);
  }
  if (auto s = check_vocabulary(l); !s.ok()) return s;
  return l;
}

// ---------------------------------------------------------------------------
// runs of ours

absl::StatusOr<LoadedModel> prepare_run_model(CausalLM trained, const config::Experiment& config,
                                              const std::string& path, const std::string& identity,
                                              std::unique_ptr<tokenizer::Tokenizer> tokenizer,
                                              const LoadOptions& options) {
  LoadedModel l;
  l.path = path;
  l.format = "run";
  l.identity = identity;
  l.device = options.device;
  auto dtype = parse_dtype(options.dtype, options.device);
  if (!dtype.ok()) return dtype.status();
  l.dtype = *dtype;
  // Inference reads the weights with a LoRA run's adapters folded in.
  merge_lora(*trained);
  l.model = trained;
  l.attention = "as trained";
  if (options.attention) {
    // The same weights in a model whose every layer attends as asked.
    config::Experiment exp = config;
    exp.mutable_model()->clear_lora();
    config::Attention* a = exp.mutable_attention();
    const attention::Kind kind = options.attention->kind;
    a->set_kind(kind == attention::Kind::kHash    ? config::Attention::HASH
                : kind == attention::Kind::kDrop  ? config::Attention::DROP
                : kind == attention::Kind::kShift ? config::Attention::SHIFT
                                                  : config::Attention::DENSE);
    a->set_num_buckets(options.attention->num_buckets);
    a->set_drop_prob(options.attention->drop_prob);
    a->set_group_size(static_cast<int32_t>(options.attention->group_size));
    a->set_sink_tokens(static_cast<int32_t>(options.attention->sink_tokens));
    a->set_local_window(static_cast<int32_t>(options.attention->local_window));
    a->set_lsh_capacity(options.attention->lsh_capacity);
    exp.clear_layer_attention();
    auto built = build_model(exp, trained->vocab_size());
    if (!built.ok()) return built.status();
    l.model = *std::move(built);
    torch::NoGradGuard no_grad;
    auto from = trained->named_parameters();
    for (auto& item : l.model->named_parameters()) item.value().copy_(from[item.key()]);
    l.model->attention_generator() = at::detail::createCPUGenerator(options.attention_seed);
    l.attention = kind_name(options.attention->kind);
  }
  try {
    l.model->to(l.device, l.dtype);
    fuse_for_inference(l.model);
    l.model->eval();
  } catch (const std::exception& e) {
    return io::with_context(io::status_from_exception(e), path);
  }
  if (options.need_tokenizer && !options.tokenizer.empty()) {
    auto opened = tokenizer::open_tokenizer(options.tokenizer);
    if (!opened.ok()) return io::with_context(opened.status(), path);
    tokenizer = *std::move(opened);
  }
  if (options.need_tokenizer) l.tokenizer = std::move(tokenizer);
  if (auto s = check_vocabulary(l); !s.ok()) return s;
  return l;
}

// ---------------------------------------------------------------------------
// description

std::string describe(const LoadedModel& l, const std::string& attention_label) {
  const AttentionShape shape = l.model->attention_shape();
  return absl::StrFormat(
      "%s (%s %s): %d layers, d %d, %d/%d heads, vocab %d, %.1fM parameters; %s on %s, %s "
      "attention",
      l.path, l.format, arch_name(l.model->arch()), shape.layers, l.model->output_weight().size(1),
      shape.heads, shape.kv_heads, l.model->vocab_size(), l.model->num_parameters() / 1e6,
      dtype_name(l.dtype), l.device.str(), attention_label.empty() ? l.attention : attention_label);
}

}  // namespace sparseflash::model
