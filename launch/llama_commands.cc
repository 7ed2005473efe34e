// eval --model, generate, convert: the commands on pretrained Llama-family
// checkpoints, and the export of our GPT runs to HF GPT-2. Reading order:
// flags, shared loading, eval, generate, convert.
#include "launch/llama_commands.h"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "checkpoint/llama.h"
#include "checkpoint/safetensors.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "model/factory.h"
#include "model/generate.h"
#include "model/gpt.h"
#include "model/llama.h"
#include "saap/index.h"
#include "saap/inference.h"
#include "nlohmann/json.hpp"
#include "tokenizer/tokenizer.h"
#include "trainer/trainer.h"

// Flags main.cc defines and these commands share with train/eval/sample.
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, data);
ABSL_DECLARE_FLAG(std::string, tokenizer);
ABSL_DECLARE_FLAG(bool, json);
ABSL_DECLARE_FLAG(std::string, prompt);
ABSL_DECLARE_FLAG(double, temperature);
ABSL_DECLARE_FLAG(uint64_t, seed);

ABSL_FLAG(std::string, model, "",
          "Pretrained model: an HF directory (config.json + safetensors), a .gguf file, a "
          "llama2.c .bin checkpoint, or a directory written by `sparseflash convert`.");
ABSL_FLAG(std::string, text, "", "eval --model: UTF-8 text file to score.");
ABSL_FLAG(int64_t, context, 2048, "eval --model: tokens per window (the model's context).");
ABSL_FLAG(int64_t, stride, 0,
          "eval --model: window step in tokens; each window scores the tokens it adds. "
          "0 = context / 2.");
ABSL_FLAG(int64_t, max_tokens, 0, "eval --model: score only the first N tokens (0 = all).");
ABSL_FLAG(std::string, attention, "dense",
          "Attention kind of every layer: dense, hash (LSH buckets), drop (random query/key "
          "dropping) or saap (key partitions routed by the classifiers of --saap-index).");
ABSL_FLAG(std::string, saap_index, "",
          "SAAP index file (`sparseflash saap fit` writes it; --attention saap reads it). It must "
          "have been fitted on this model.");
ABSL_FLAG(std::string, top_l, "16",
          "--attention saap: partitions each query attends to (saap eval: a comma-separated "
          "list).");
ABSL_FLAG(double, key_budget, 0,
          "--attention saap: > 0 selects partitions by key budget instead of --top-l: in "
          "decreasing attention per key until this fraction of the routable keys.");
ABSL_FLAG(bool, per_head_budgets, false,
          "--attention saap with --key-budget: split the budget over the query heads of all "
          "layers by the index's budget curves (least attention lost in total; the mean over "
          "heads stays --key-budget). saap eval: also perplexity with per-head budgets at each "
          "--key-budgets value.");
ABSL_FLAG(std::string, budget_objective, "output",
          "--per-head-budgets: what the split minimises over all heads: output (the squared "
          "error of each head's attention output against dense) or attention (the routed "
          "attention left out). saap eval: a comma-separated list.");
ABSL_FLAG(double, mass_threshold, 0,
          "--attention saap: > 0 selects, per query, the fewest partitions whose predicted share "
          "of the routed attention reaches this value (overrides --top-l and --key-budget).");
ABSL_FLAG(std::string, saap_routing, "classifier",
          "--attention saap: how queries choose partitions: classifier (SAAP), symmetric (the "
          "nearest key centroids, a baseline), all (every partition: dense, for checks) or "
          "oracle (the true attention mass; eval only, the bound of any router).");
ABSL_FLAG(int32_t, num_buckets, 16, "--attention hash: buckets per layer (even).");
ABSL_FLAG(double, drop_prob, 0.5, "--attention drop: probability of dropping a query or key.");
ABSL_FLAG(std::string, dtype, "auto",
          "Weights and activations: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 "
          "or float16. convert: auto keeps float tensors as stored, dequantised ones as float32.");
ABSL_FLAG(std::string, json_file, "", "Also write the result as a JSON object to this file.");
ABSL_FLAG(int64_t, max_new_tokens, 64, "generate: tokens to generate at most (stops earlier at EOS, and at the model's context length).");
ABSL_FLAG(double, top_p, 1.0, "generate: nucleus sampling mass in (0, 1]; 1 = all tokens.");
ABSL_FLAG(std::string, input, "", "convert: the checkpoint to convert.");
ABSL_FLAG(std::string, output, "", "convert: output directory.");
ABSL_FLAG(std::string, to, "native",
          "convert: native (any Llama input -> safetensors + config.json) or hf-gpt2 (our GPT "
          "run or ckpt.pt -> GPT2LMHeadModel's model.safetensors + config.json).");

namespace sparseflash::llama_commands {

absl::StatusOr<saap::BudgetObjective> parse_budget_objective(const std::string& text) {
  if (text == "output") return saap::BudgetObjective::kOutputError;
  if (text == "attention") return saap::BudgetObjective::kLostAttention;
  return absl::InvalidArgumentError(
      absl::StrCat("--budget-objective: expected output or attention, got \"", text, "\""));
}

namespace {

namespace fs = std::filesystem;
using at::Tensor;
using nlohmann::json;

int fail(const char* command, const std::string& message) {
  std::cerr << "sparseflash " << command << ": error: " << message << "\n";
  return 1;
}

// Error text without LibTorch's C++ backtrace.
std::string what_of(const std::exception& e) {
  std::string what = e.what();
  return what.substr(0, what.find("\nException raised from"));
}

const char* format_name(checkpoint::SourceFormat f) { return checkpoint::source_format_name(f); }

absl::StatusOr<at::ScalarType> parse_dtype(const std::string& name, const at::Device& device) {
  if (name == "auto") return device.is_cuda() ? at::kBFloat16 : at::kFloat;
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype: expected auto, float32, bfloat16 or float16, got \"", name, "\""));
}

absl::StatusOr<attention::Options> attention_from_flags() {
  attention::Options o;
  const std::string kind = absl::GetFlag(FLAGS_attention);
  if (kind == "dense" || kind == "saap") o.kind = attention::Kind::kDense;
  else if (kind == "hash") o.kind = attention::Kind::kHash;
  else if (kind == "drop") o.kind = attention::Kind::kDrop;
  else
    return absl::InvalidArgumentError(
        absl::StrCat("--attention: expected dense, hash, drop or saap, got \"", kind, "\""));
  o.num_buckets = absl::GetFlag(FLAGS_num_buckets);
  o.drop_prob = absl::GetFlag(FLAGS_drop_prob);
  if (o.kind == attention::Kind::kHash && (o.num_buckets < 2 || o.num_buckets % 2 != 0))
    return absl::InvalidArgumentError(
        absl::StrCat("--num-buckets must be even and >= 2, got ", o.num_buckets));
  if (o.kind == attention::Kind::kDrop && !(o.drop_prob >= 0 && o.drop_prob < 1))
    return absl::InvalidArgumentError(
        absl::StrCat("--drop-prob must be in [0, 1), got ", o.drop_prob));
  return o;
}

// ---------------------------------------------------------------------------
// shared loading

using Loaded = LoadedModel;

// --top-l as a list of positive integers.
absl::StatusOr<std::vector<int64_t>> parse_top_l(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v < 1)
      return absl::InvalidArgumentError(
          absl::StrCat("--top-l: expected positive integers, got \"", text, "\""));
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError("--top-l: no value given");
  return out;
}

// --attention saap: the index (refused when fitted on another model) and the hook.
absl::StatusOr<std::shared_ptr<saap::SaapAttentionHook>> saap_hook_from_flags(const Loaded& l) {
  const std::string path = absl::GetFlag(FLAGS_saap_index);
  if (path.empty()) return absl::InvalidArgumentError("--attention saap needs --saap-index FILE");
  auto index = saap::load_saap_index(path, l.checkpoint.identity);
  if (!index.ok()) return index.status();
  auto top_l = parse_top_l(absl::GetFlag(FLAGS_top_l));
  if (!top_l.ok()) return top_l.status();
  if (top_l->size() != 1)
    return absl::InvalidArgumentError("--top-l: give one value with --attention saap");
  saap::SaapInferenceOptions o;
  o.top_l = (*top_l)[0];
  o.key_budget = absl::GetFlag(FLAGS_key_budget);
  o.mass_threshold = absl::GetFlag(FLAGS_mass_threshold);
  o.per_head_budgets = absl::GetFlag(FLAGS_per_head_budgets);
  auto objective = parse_budget_objective(absl::GetFlag(FLAGS_budget_objective));
  if (!objective.ok()) return objective.status();
  o.budget_objective = *objective;
  if (o.per_head_budgets && o.key_budget <= 0)
    return absl::InvalidArgumentError("--per-head-budgets splits a key budget: give --key-budget");
  if (!(o.mass_threshold >= 0 && o.mass_threshold <= 1))
    return absl::InvalidArgumentError(absl::StrCat("--mass-threshold must be in [0, 1], got ",
                                                   o.mass_threshold));
  if (!(o.key_budget >= 0 && o.key_budget <= 1))
    return absl::InvalidArgumentError(absl::StrCat("--key-budget must be in [0, 1], got ",
                                                   o.key_budget));
  const std::string routing = absl::GetFlag(FLAGS_saap_routing);
  if (routing == "classifier") o.routing = saap::Routing::kClassifier;
  else if (routing == "symmetric") o.routing = saap::Routing::kSymmetric;
  else if (routing == "all") o.routing = saap::Routing::kAll;
  else if (routing == "oracle") o.routing = saap::Routing::kOracle;
  else
    return absl::InvalidArgumentError(absl::StrCat(
        "--saap-routing: expected classifier, symmetric, all or oracle, got \"", routing, "\""));
  if (o.key_budget == 0 && o.mass_threshold == 0 && o.routing != saap::Routing::kAll &&
      o.top_l > index->header.partitions())
    return absl::InvalidArgumentError(absl::StrCat("--top-l ", o.top_l, " exceeds the index's ",
                                                   index->header.partitions(), " partitions"));
  try {
    return std::make_shared<saap::SaapAttentionHook>(*index, o, l.device);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what_of(e)));
  }
}

// Throws (std::exception) on unreadable checkpoints; returns a status for bad flags.
absl::StatusOr<Loaded> load(bool need_tokenizer) {
  Loaded l;
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return absl::InvalidArgumentError("--model is required");
  if (absl::GetFlag(FLAGS_attention) == "saap" && absl::GetFlag(FLAGS_saap_index).empty())
    return absl::InvalidArgumentError("--attention saap needs --saap-index FILE");
  if (!fs::exists(path)) return absl::NotFoundError(absl::StrCat("--model: ", path, " does not exist"));
  auto device = trainer::resolve_device(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return device.status();
  l.device = *device;
  auto dtype = parse_dtype(absl::GetFlag(FLAGS_dtype), l.device);
  if (!dtype.ok()) return dtype.status();
  l.dtype = *dtype;
  auto attn = attention_from_flags();
  if (!attn.ok()) return attn.status();
  l.attention = absl::GetFlag(FLAGS_attention);
  std::string run_tokenizer;  // a run of ours: the tokenizer its data was prepared with
  if (model::is_training_checkpoint(path)) {
    // A Llama run of ours (ckpt.pt or its directory): its weights, with the
    // attention the flags ask for.
    auto run = trainer::load_model(path, "cpu");
    if (!run.ok()) return run.status();
    auto* trained = dynamic_cast<model::LlamaImpl*>(run->model.get());
    if (!trained)
      return absl::InvalidArgumentError(absl::StrCat(
          path, " is a ", model::arch_name(run->model->arch()),
          " run; use `sparseflash eval --checkpoint` and `sparseflash sample --checkpoint` for it"));
    l.checkpoint.path = path;
    l.checkpoint.format = checkpoint::SourceFormat::kNative;
    l.checkpoint.config = trained->config();
    l.checkpoint.identity = absl::StrCat("run:", trainer::checkpoint_path(path), "@", run->step);
    l.model = model::Llama(trained->config(), std::vector<attention::Options>{*attn});
    if (!trained->rope_frequency_factors().empty())
      l.model->set_rope_frequency_factors(trained->rope_frequency_factors());
    {
      torch::NoGradGuard no_grad;
      auto from = trained->named_parameters();
      for (auto& item : l.model->named_parameters()) item.value().copy_(from[item.key()]);
    }
    l.model->attention_generator() =
        at::detail::createCPUGenerator(absl::GetFlag(FLAGS_seed));
    l.model->to(l.device, l.dtype);
    l.model->fuse_projections();
    l.model->eval();
    auto meta = data::read_meta(run->config.data().dir());
    if (meta.ok()) run_tokenizer = meta->tokenizer_source;
    if (run_tokenizer.empty() && !run->config.model().init_from().empty())
      run_tokenizer = run->config.model().init_from();
  } else {
    l.checkpoint = checkpoint::load_llama_checkpoint(path);
    model::LlamaLoadOptions o;
    o.attention = {*attn};
    o.dtype = l.dtype;
    o.device = l.device;
    o.attention_seed = absl::GetFlag(FLAGS_seed);
    l.model = model::load_llama(l.checkpoint, o);
  }
  if (l.attention == "saap") {
    auto hook = saap_hook_from_flags(l);
    if (!hook.ok()) return hook.status();
    l.saap = *hook;
    l.model->set_attention_hook(l.saap);
  }
  if (need_tokenizer) {
    // main.cc's --tokenizer is shared with prepare, whose default is "byte".
    std::string tok = absl::GetFlag(FLAGS_tokenizer);
    if (tok == "byte") tok.clear();
    if (tok.empty() && !run_tokenizer.empty()) tok = run_tokenizer;
    l.tokenizer = tok == "byte" ? tokenizer::open_tokenizer(tok) : tokenizer::load_tokenizer(path, tok);
    if (l.tokenizer->vocab_size() > l.checkpoint.config.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat(
          "the tokenizer has ", l.tokenizer->vocab_size(), " tokens, the model's vocabulary ",
          l.checkpoint.config.vocab_size, " (wrong --tokenizer?)"));
  }
  return l;
}

const char* dtype_label(at::ScalarType t) {
  return t == at::kBFloat16 ? "bfloat16" : t == at::kHalf ? "float16" : "float32";
}

std::string describe(const Loaded& l) {
  const auto& c = l.checkpoint.config;
  return absl::StrFormat(
      "%s (%s): %d layers, d %d, %d/%d heads, vocab %d, %.1fM parameters; %s on %s, %s attention",
      l.checkpoint.path, format_name(l.checkpoint.format), c.num_hidden_layers, c.hidden_size,
      c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
      l.model->num_parameters() / 1e6, dtype_label(l.dtype), l.device.str(),
      l.saap ? absl::StrFormat("saap (%s, %s of %d partitions, window %d, sinks %d)",
                               saap::routing_name(l.saap->options().routing),
                               l.saap->options().key_budget > 0
                                   ? absl::StrFormat("key budget %g%s",
                                                     l.saap->options().key_budget,
                                                     l.saap->options().per_head_budgets
                                                         ? absl::StrCat(
                                                               " split per head by ",
                                                               saap::objective_name(
                                                                   l.saap->options()
                                                                       .budget_objective))
                                                         : "")
                                   : absl::StrCat("top-l ", l.saap->options().top_l),
                               l.saap->header().partitions(),
                               l.saap->header().local_window(), l.saap->header().sink_tokens())
             : l.attention);
}

absl::Status write_text_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  f.close();
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

absl::StatusOr<std::string> read_text_file(const std::string& path, const char* flag) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// --data: shard files (comma-separated) or a prepared directory (its val_*.bin).
absl::StatusOr<std::vector<int64_t>> read_shards(const std::string& spec, int64_t vocab) {
  std::vector<std::string> paths;
  if (fs::is_directory(spec)) {
    // POSIX listing: std::filesystem's iterators are also exported by
    // libtorch.so, and binding to its copy crashed on the GPU host.
    DIR* dir = opendir(spec.c_str());
    if (dir == nullptr) return absl::NotFoundError(absl::StrCat("--data: cannot list ", spec));
    while (const dirent* e = readdir(dir)) {
      const std::string name = e->d_name;
      if (name.rfind("val_", 0) == 0 && name.size() > 8 &&
          name.compare(name.size() - 4, 4, ".bin") == 0)
        paths.push_back((fs::path(spec) / name).string());
    }
    closedir(dir);
    std::sort(paths.begin(), paths.end());
    if (paths.empty()) return absl::NotFoundError(absl::StrCat("--data: no val_*.bin in ", spec));
  } else {
    paths = absl::StrSplit(spec, ',', absl::SkipEmpty());
  }
  std::vector<int64_t> ids;
  for (const auto& p : paths) {
    auto shard = data::Shard::open(p);
    if (!shard.ok()) return shard.status();
    if (shard->vocab_size() > vocab)
      return absl::InvalidArgumentError(absl::StrCat(
          "--data: ", p, " holds ids of a vocabulary of ", shard->vocab_size(),
          ", the model has ", vocab));
    const size_t at = ids.size();
    ids.resize(at + shard->size());
    shard->read(0, shard->size(), ids.data() + at);
  }
  return ids;
}

// The tokens of --text (encoded with the model's tokenizer, BOS first) or of
// --data shards, cut to --max-tokens; `source` names where they came from.
absl::StatusOr<std::vector<int64_t>> read_input(const Loaded& l, std::string* source) {
  const bool from_text = !absl::GetFlag(FLAGS_text).empty();
  const bool from_data = !absl::GetFlag(FLAGS_data).empty();
  if (from_text == from_data)
    return absl::InvalidArgumentError("give exactly one of --text FILE or --data SHARDS");
  std::vector<int64_t> ids;
  if (from_text) {
    *source = absl::GetFlag(FLAGS_text);
    auto text = read_text_file(*source, "--text");
    if (!text.ok()) return text.status();
    if (!l.tokenizer) return absl::InternalError("--text needs the model's tokenizer loaded");
    const auto start = std::chrono::steady_clock::now();
    auto encoded = l.tokenizer->encode(*text, /*add_bos=*/true);
    ids.assign(encoded.begin(), encoded.end());
    std::cerr << absl::StrFormat(
        "text: %s, %d bytes -> %d tokens (%.2f s)\n", *source, text->size(), ids.size(),
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  } else {
    *source = absl::GetFlag(FLAGS_data);
    auto read = read_shards(*source, l.checkpoint.config.vocab_size);
    if (!read.ok()) return read.status();
    ids = std::move(*read);
  }
  const int64_t max_tokens = absl::GetFlag(FLAGS_max_tokens);
  if (max_tokens > 0 && static_cast<int64_t>(ids.size()) > max_tokens) ids.resize(max_tokens);
  return ids;
}

// ---------------------------------------------------------------------------
// eval --model

int eval_impl() {
  if (!absl::GetFlag(FLAGS_saap_index).empty() && absl::GetFlag(FLAGS_attention) != "saap")
    return fail("eval", "--saap-index is used with --attention saap only");
  const bool from_text = !absl::GetFlag(FLAGS_text).empty();
  const bool from_data = !absl::GetFlag(FLAGS_data).empty();
  if (from_text == from_data) return fail("eval", "give exactly one of --text FILE or --data SHARDS");
  const int64_t context = absl::GetFlag(FLAGS_context);
  int64_t stride = absl::GetFlag(FLAGS_stride);
  if (stride == 0) stride = std::max<int64_t>(1, context / 2);
  if (context < 2) return fail("eval", absl::StrCat("--context must be >= 2, got ", context));
  if (stride < 1 || stride > context)
    return fail("eval", absl::StrCat("--stride must be in [1, --context = ", context, "], got ", stride));
  auto loaded = load(from_text);
  if (!loaded.ok()) return fail("eval", std::string(loaded.status().message()));
  Loaded& l = *loaded;
  std::cerr << "model: " << describe(l) << "\n";
  if (context > l.checkpoint.config.max_position_embeddings)
    std::cerr << "warning: --context " << context << " exceeds the model's max_position_embeddings "
              << l.checkpoint.config.max_position_embeddings << "\n";

  std::string source;
  auto input = read_input(l, &source);
  if (!input.ok()) return fail("eval", std::string(input.status().message()));
  std::vector<int64_t> ids = std::move(*input);
  if (ids.size() < 2)
    return fail("eval", absl::StrCat(source, " gives ", ids.size(), " token(s); need at least 2"));

  const int64_t total = static_cast<int64_t>(ids.size());
  const int64_t windows =
      total <= context ? 1 : 1 + (total - context + stride - 1) / stride;
  const bool tty = isatty(STDERR_FILENO);
  auto progress = [&](const model::PerplexityResult& r) {
    const std::string line = absl::StrFormat(
        "window %d/%d: %d/%d tokens, mean NLL %.4f, perplexity %.3f, %.0f tokens/s", r.windows,
        windows, r.tokens, total - 1, r.mean_nll(), r.perplexity(), r.tokens_per_second());
    if (tty) std::cerr << "\r\033[K" << line << std::flush;
    else if (r.windows == 1 || r.windows % 10 == 0 || r.windows == windows) std::cerr << line << "\n";
  };
  model::CausalLM lm = model::as_causal_lm(l.model);
  auto r = model::sliding_window_nll(lm, ids, context, stride, progress);
  if (tty) std::cerr << "\n";

  json j = {{"model", l.checkpoint.path},
            {"format", format_name(l.checkpoint.format)},
            {"source", source},
            {"tokens", r.tokens},
            {"windows", r.windows},
            {"context", context},
            {"stride", stride},
            {"mean_nll", r.mean_nll()},
            {"perplexity", r.perplexity()},
            {"seconds", r.seconds},
            {"tokens_per_second", r.tokens_per_second()},
            {"dtype", dtype_label(l.dtype)},
            {"device", l.device.str()},
            {"attention", l.attention}};
  if (l.saap) {
    const auto& st = l.saap->stats();
    j["saap"] = {{"index", absl::GetFlag(FLAGS_saap_index)},
                 {"routing", saap::routing_name(l.saap->options().routing)},
                 {"top_l", l.saap->options().top_l},
                 {"key_budget", l.saap->options().key_budget},
                 {"mass_threshold", l.saap->options().mass_threshold},
                 {"per_head_budgets", l.saap->head_budgets()},
                 {"budget_objective", saap::objective_name(l.saap->options().budget_objective)},
                 {"partitions", l.saap->header().partitions()},
                 {"local_window", l.saap->header().local_window()},
                 {"sink_tokens", l.saap->header().sink_tokens()},
                 {"keys_visited", st.visited_fraction()},
                 {"routed_keys_visited", st.routed_fraction()}};
    std::cerr << absl::StrFormat(
        "saap: %.2f%% of causal (query, key) pairs visited, %.2f%% of the routable ones\n",
        100 * st.visited_fraction(), 100 * st.routed_fraction());
  }
  if (!absl::GetFlag(FLAGS_json_file).empty()) {
    auto s = write_text_file(absl::GetFlag(FLAGS_json_file), j.dump(2) + "\n");
    if (!s.ok()) return fail("eval", std::string(s.message()));
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << absl::StrFormat(
        "tokens: %d scored in %d windows (context %d, stride %d)\nmean NLL: %.5f nats/token\n"
        "perplexity: %.4f\ntokens/s: %.0f (%.2f s)\n",
        r.tokens, r.windows, context, stride, r.mean_nll(), r.perplexity(), r.tokens_per_second(),
        r.seconds);
  }
  return 0;
}

// ---------------------------------------------------------------------------
// generate

int generate_impl() {
  if (!absl::GetFlag(FLAGS_saap_index).empty() && absl::GetFlag(FLAGS_attention) != "saap")
    return fail("generate", "--saap-index is used with --attention saap only");
  const int64_t max_new = absl::GetFlag(FLAGS_max_new_tokens);
  const double temperature = absl::GetFlag(FLAGS_temperature);
  const double top_p = absl::GetFlag(FLAGS_top_p);
  if (max_new < 0) return fail("generate", "--max-new-tokens must be >= 0");
  if (!(temperature >= 0)) return fail("generate", "--temperature must be >= 0");
  if (!(top_p > 0 && top_p <= 1)) return fail("generate", absl::StrCat("--top-p must be in (0, 1], got ", top_p));
  auto loaded = load(/*need_tokenizer=*/true);
  if (!loaded.ok()) return fail("generate", std::string(loaded.status().message()));
  Loaded& l = *loaded;
  std::cerr << "model: " << describe(l) << "\n";
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  auto encoded = l.tokenizer->encode(prompt, /*add_bos=*/true);
  if (encoded.empty())
    return fail("generate", "the prompt gives no tokens and the tokenizer adds no BOS; give --prompt");
  std::vector<int64_t> prompt_ids(encoded.begin(), encoded.end());

  model::SamplingOptions s;
  s.temperature = temperature;
  s.top_p = top_p;
  s.seed = absl::GetFlag(FLAGS_seed);
  s.eos_id = l.tokenizer->eos_id() >= 0 ? l.tokenizer->eos_id() : l.checkpoint.config.eos_token_id;
  const bool print_json = absl::GetFlag(FLAGS_json);
  if (!print_json) std::cout << prompt << std::flush;
  const auto start = std::chrono::steady_clock::now();
  model::CausalLM lm = model::as_causal_lm(l.model);
  const model::Generation generation = model::generate(lm, prompt_ids, max_new, s, [&](int64_t id) {
    if (!print_json && id != s.eos_id) std::cout << l.tokenizer->decode_token(static_cast<int32_t>(id)) << std::flush;
    return true;
  });
  const std::vector<int64_t>& ids = generation.ids;
  if (generation.stop == model::StopReason::kContext)
    std::cerr << absl::StrFormat(
        "\n[generate: stopped at the model's context length (%d tokens: %d prompt + %d new); "
        "it does not slide its window]\n",
        lm->context_length(), prompt_ids.size(), ids.size());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<int32_t> ids32(ids.begin(), ids.end());
  if (!ids32.empty() && ids32.back() == s.eos_id) ids32.pop_back();
  const std::string completion = l.tokenizer->decode(ids32);
  const bool stopped_at_eos = !ids.empty() && ids.back() == s.eos_id;
  json j = {{"model", l.checkpoint.path},
            {"prompt", prompt},
            {"prompt_ids", prompt_ids},
            {"ids", ids},
            {"text", completion},
            {"stopped_at_eos", stopped_at_eos},
            {"stop", model::stop_reason_name(generation.stop)},
            {"temperature", temperature},
            {"top_p", top_p},
            {"seed", s.seed},
            {"seconds", seconds},
            {"tokens_per_second", seconds > 0 ? ids.size() / seconds : 0.0}};
  if (l.saap) {
    j["saap"] = {{"top_l", l.saap->options().top_l},
                 {"routing", saap::routing_name(l.saap->options().routing)},
                 {"keys_visited", l.saap->stats().visited_fraction()}};
  }
  if (print_json) std::cout << j.dump() << "\n";
  else std::cout << "\n";
  std::cerr << absl::StrFormat("%d tokens in %.2f s (%.1f tokens/s)%s\n", ids.size(), seconds,
                               seconds > 0 ? ids.size() / seconds : 0.0,
                               stopped_at_eos ? ", stopped at EOS" : "");
  if (!absl::GetFlag(FLAGS_json_file).empty()) {
    auto st = write_text_file(absl::GetFlag(FLAGS_json_file), j.dump(2) + "\n");
    if (!st.ok()) return fail("generate", std::string(st.message()));
  }
  return 0;
}

// ---------------------------------------------------------------------------
// convert

checkpoint::DType checkpoint_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return checkpoint::DType::kBF16;
    case at::kHalf: return checkpoint::DType::kF16;
    default: return checkpoint::DType::kF32;
  }
}

// Tensors to write, kept alive until written.
class Writer {
 public:
  explicit Writer(at::ScalarType dtype) : dtype_(dtype) {}
  void add(const std::string& name, const Tensor& t) {
    Tensor c = t.detach().to(at::kCPU, dtype_).contiguous();
    keep_.push_back(c);
    entries_.push_back({name, checkpoint_dtype(dtype_),
                        std::vector<int64_t>(c.sizes().begin(), c.sizes().end()), c.data_ptr(),
                        static_cast<size_t>(c.nbytes())});
  }
  void write(const std::string& path, const std::map<std::string, std::string>& metadata) {
    checkpoint::write_safetensors(path, entries_, metadata);
  }

 private:
  at::ScalarType dtype_;
  std::vector<Tensor> keep_;
  std::vector<checkpoint::TensorToWrite> entries_;
};

}  // namespace

absl::StatusOr<ConvertResult> convert_llama_to_native(const std::string& input,
                                                      const std::string& out_dir,
                                                      const std::string& dtype_name) {
  try {
    checkpoint::LlamaCheckpoint ckpt = checkpoint::load_llama_checkpoint(input);
    at::ScalarType dtype = at::kFloat;
    if (dtype_name == "auto") {
      // Keep one float type when every matrix is stored in it.
      std::set<checkpoint::DType> stored;
      for (const auto& [name, info] : ckpt.tensors) stored.insert(info.dtype);
      if (stored.size() == 1 && *stored.begin() == checkpoint::DType::kBF16) dtype = at::kBFloat16;
      if (stored.size() == 1 && *stored.begin() == checkpoint::DType::kF16) dtype = at::kHalf;
    } else {
      auto parsed = parse_dtype(dtype_name, at::kCPU);
      if (!parsed.ok()) return parsed.status();
      dtype = *parsed;
    }
    const auto& c = ckpt.config;
    if (!ckpt.rope_freq_factors.empty() && c.rope_scaling.type.empty())
      return absl::FailedPreconditionError(absl::StrCat(
          input, ": rope_freqs.weight (per-frequency RoPE divisors) has no HF config "
          "equivalent without rope_scaling; the native format cannot represent it"));
    model::LlamaLoadOptions o;  // float32 on the CPU: exact for every stored type
    model::Llama m = model::load_llama(ckpt, o);
    model::write_hf_llama(*m, out_dir, dtype);
    ConvertResult r;
    const fs::path in(input);
    const fs::path tokenizer_json = fs::is_directory(in) ? in / "tokenizer.json" : in.parent_path() / "tokenizer.json";
    if (ckpt.format != checkpoint::SourceFormat::kGguf && fs::exists(tokenizer_json)) {
      fs::copy_file(tokenizer_json, fs::path(out_dir) / "tokenizer.json",
                    fs::copy_options::overwrite_existing);
    } else {
      const bool own_vocabulary = ckpt.format == checkpoint::SourceFormat::kGguf ||
                                  ckpt.format == checkpoint::SourceFormat::kLlama2c;
      r.warnings.push_back(
          own_vocabulary
              ? absl::StrCat("no tokenizer.json written (", format_name(ckpt.format),
                             " keeps its vocabulary in its own file): pass --tokenizer ", input,
                             " to eval/generate with the converted model")
              : absl::StrCat("no tokenizer.json written: ", input, " has none"));
    }
    r.summary = absl::StrFormat(
        "wrote %s: %s Llama (%d layers, d %d, vocab %d) from %s, %s tensors%s", out_dir,
        format_name(ckpt.format), c.num_hidden_layers, c.hidden_size, c.vocab_size, input,
        dtype_label(dtype), ckpt.qk_interleaved ? ", Q/K permuted to rotate-half" : "");
    return r;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(what_of(e));
  }
}

absl::StatusOr<ConvertResult> convert_llama_run_to_hf(const std::string& checkpoint_path,
                                                      const std::string& out_dir,
                                                      const std::string& dtype_name) {
  auto loaded = trainer::load_model(checkpoint_path, "cpu");
  if (!loaded.ok()) return loaded.status();
  auto* llama = dynamic_cast<model::LlamaImpl*>(loaded->model.get());
  if (!llama)
    return absl::InvalidArgumentError(absl::StrCat(
        checkpoint_path, " is a ", model::arch_name(loaded->model->arch()),
        " run of ours; export it with --to hf-gpt2"));
  at::ScalarType dtype = at::kFloat;
  if (dtype_name != "auto") {
    auto parsed = parse_dtype(dtype_name, at::kCPU);
    if (!parsed.ok()) return parsed.status();
    dtype = *parsed;
  }
  try {
    model::write_hf_llama(*llama, out_dir, dtype);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(checkpoint_path, ": ", what_of(e)));
  }
  ConvertResult r;
  // The tokenizer the run was trained with, where it is a tokenizer.json.
  auto meta = data::read_meta(loaded->config.data().dir());
  const std::string source = meta.ok() ? meta->tokenizer_source : "";
  const fs::path tokenizer_json = fs::is_directory(source) ? fs::path(source) / "tokenizer.json"
                                                           : fs::path(source);
  if (!source.empty() && tokenizer_json.filename() == "tokenizer.json" &&
      fs::exists(tokenizer_json)) {
    fs::copy_file(tokenizer_json, fs::path(out_dir) / "tokenizer.json",
                  fs::copy_options::overwrite_existing);
  } else {
    r.warnings.push_back(absl::StrCat(
        "no tokenizer.json written (the run's data was tokenized with ",
        source.empty() ? "an unknown tokenizer" : source,
        "): pass --tokenizer to eval/generate with the exported model"));
  }
  const auto& c = llama->config();
  r.summary = absl::StrFormat(
      "wrote %s: Llama (%d layers, d %d, vocab %d, context %d%s) from %s at step %d, %s", out_dir,
      c.num_hidden_layers, c.hidden_size, c.vocab_size, c.max_position_embeddings,
      c.rope_scaling.type.empty() ? "" : ", rope_scaling " + c.rope_scaling.type,
      checkpoint_path, loaded->step, dtype_label(dtype));
  return r;
}

absl::StatusOr<ConvertResult> convert_gpt_to_hf_gpt2(const std::string& checkpoint_path,
                                                     const std::string& out_dir) {
  auto loaded = trainer::load_model(checkpoint_path, "cpu");
  if (!loaded.ok()) return loaded.status();
  const auto& exp = loaded->config;
  const auto& m = exp.model();
  ConvertResult r;
  std::vector<std::string> sparse_layers;
  for (int l = 0; l < m.n_layer(); ++l) {
    auto o = model::layer_attention_options(exp, l);
    if (o.shared_qk)
      return absl::FailedPreconditionError(absl::StrCat(
          checkpoint_path, ": layer ", l,
          " uses attention.shared_qk (keys are normalised queries); GPT-2 has no such layer"));
    if (o.kind != attention::Kind::kDense) sparse_layers.push_back(std::to_string(l));
  }
  if (!sparse_layers.empty())
    r.warnings.push_back(absl::StrCat(
        "this run was trained with sparse attention (hash/drop) in layer(s) ",
        absl::StrJoin(sparse_layers, ","),
        "; GPT-2 has dense attention only, so the exported model attends densely and its "
        "outputs differ from the run's"));

  torch::NoGradGuard no_grad;
  auto* gpt = dynamic_cast<model::GPTImpl*>(loaded->model.get());
  if (!gpt)
    return absl::InvalidArgumentError(absl::StrCat(
        checkpoint_path, " holds a ", model::arch_name(loaded->model->arch()),
        " model; --to hf-gpt2 exports GPT runs (use --to native for Llama runs)"));
  const int64_t d = m.d_model(), V = gpt->vocab_size();
  auto params = gpt->named_parameters();
  auto get = [&](const std::string& name) { return params[name].detach().to(at::kFloat); };
  auto bias_or_zeros = [&](const std::string& name, int64_t n) {
    return params.contains(name) ? get(name) : at::zeros({n});
  };
  Writer w(at::kFloat);
  w.add("transformer.wte.weight", get("wte.weight"));
  w.add("transformer.wpe.weight", get("wpe.weight"));
  for (int l = 0; l < m.n_layer(); ++l) {
    const std::string ours = "blocks." + std::to_string(l) + ".";
    const std::string hf = "transformer.h." + std::to_string(l) + ".";
    // GPT-2's Conv1D stores [in, out]: our Linear weights transposed.
    w.add(hf + "ln_1.weight", get(ours + "ln_1.weight"));
    w.add(hf + "ln_1.bias", bias_or_zeros(ours + "ln_1.bias", d));
    w.add(hf + "attn.c_attn.weight", get(ours + "attn.c_attn.weight").t());
    w.add(hf + "attn.c_attn.bias", bias_or_zeros(ours + "attn.c_attn.bias", 3 * d));
    w.add(hf + "attn.c_proj.weight", get(ours + "attn.c_proj.weight").t());
    w.add(hf + "attn.c_proj.bias", bias_or_zeros(ours + "attn.c_proj.bias", d));
    w.add(hf + "ln_2.weight", get(ours + "ln_2.weight"));
    w.add(hf + "ln_2.bias", bias_or_zeros(ours + "ln_2.bias", d));
    w.add(hf + "mlp.c_fc.weight", get(ours + "c_fc.weight").t());
    w.add(hf + "mlp.c_fc.bias", bias_or_zeros(ours + "c_fc.bias", 4 * d));
    w.add(hf + "mlp.c_proj.weight", get(ours + "mlp_proj.weight").t());
    w.add(hf + "mlp.c_proj.bias", bias_or_zeros(ours + "mlp_proj.bias", d));
  }
  w.add("transformer.ln_f.weight", get("ln_f.weight"));
  w.add("transformer.ln_f.bias", bias_or_zeros("ln_f.bias", d));
  try {
    fs::create_directories(out_dir);
    w.write((fs::path(out_dir) / "model.safetensors").string(),
            {{"format", "pt"},
             {"sparseflash_source", checkpoint_path},
             {"sparseflash_step", std::to_string(loaded->step)},
             {"sparseflash_tokenizer", loaded->tokenizer}});
  } catch (const std::exception& e) {
    return absl::InternalError(what_of(e));
  }
  // The byte tokenizer's ids are the bytes; its end-of-document id is 0.
  json config = {{"architectures", {"GPT2LMHeadModel"}},
                 {"model_type", "gpt2"},
                 {"vocab_size", V},
                 {"n_positions", gpt->block_size()},
                 {"n_embd", d},
                 {"n_layer", m.n_layer()},
                 {"n_head", m.n_head()},
                 {"n_inner", 4 * d},
                 {"activation_function", "gelu_new"},
                 {"layer_norm_epsilon", 1e-5},
                 {"resid_pdrop", 0.0},
                 {"embd_pdrop", 0.0},
                 {"attn_pdrop", 0.0},
                 {"scale_attn_weights", true},
                 {"tie_word_embeddings", true},
                 {"bos_token_id", 0},
                 {"eos_token_id", 0},
                 {"torch_dtype", "float32"}};
  auto s = write_text_file((fs::path(out_dir) / "config.json").string(), config.dump(2) + "\n");
  if (!s.ok()) return s;
  r.summary = absl::StrFormat(
      "wrote %s: GPT-2 (%d layers, d %d, %d heads, vocab %d = %s tokenizer, %d positions) from "
      "%s at step %d",
      out_dir, m.n_layer(), d, m.n_head(), V, loaded->tokenizer, gpt->block_size(),
      checkpoint_path, loaded->step);
  return r;
}

namespace {

int convert_impl() {
  const std::string input = absl::GetFlag(FLAGS_input), output = absl::GetFlag(FLAGS_output);
  const std::string to = absl::GetFlag(FLAGS_to);
  if (input.empty()) return fail("convert", "--input is required");
  if (output.empty()) return fail("convert", "--output is required");
  if (!fs::exists(input)) return fail("convert", absl::StrCat("--input: ", input, " does not exist"));
  absl::StatusOr<ConvertResult> r;
  const bool gpt_run = fs::exists(fs::path(input) / "ckpt.pt") ||
                      fs::path(input).extension() == ".pt";
  if (to == "native" && gpt_run) {
    r = convert_llama_run_to_hf(input, output, absl::GetFlag(FLAGS_dtype));
  } else if (to == "native") {
    r = convert_llama_to_native(input, output, absl::GetFlag(FLAGS_dtype));
  } else if (to == "hf-gpt2") {
    r = convert_gpt_to_hf_gpt2(input, output);
  } else {
    return fail("convert", absl::StrCat("--to: expected native or hf-gpt2, got \"", to, "\""));
  }
  if (!r.ok()) return fail("convert", std::string(r.status().message()));
  for (const auto& w : r->warnings) std::cout << "note: " << w << "\n";
  std::cout << r->summary << "\n";
  return 0;
}

// Runs a command body, turning exceptions (unreadable checkpoints, LibTorch
// errors) into the command's error line.
int guarded(const char* command, int (*body)()) {
  try {
    return body();
  } catch (const std::exception& e) {
    return fail(command, what_of(e));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// entry points

const std::vector<std::string>& eval_flags() {
  static const std::vector<std::string> f = {
      "model", "tokenizer", "text", "data", "context", "stride", "max_tokens", "attention",
      "num_buckets", "drop_prob", "saap_index", "top_l", "key_budget", "per_head_budgets", "budget_objective", "mass_threshold",
      "saap_routing", "dtype", "device", "seed", "json", "json_file"};
  return f;
}

const std::vector<std::string>& generate_flags() {
  static const std::vector<std::string> f = {
      "model", "tokenizer", "prompt", "max_new_tokens", "temperature", "top_p", "seed",
      "attention", "num_buckets", "drop_prob", "saap_index", "top_l", "key_budget", "per_head_budgets", "budget_objective", "mass_threshold",
      "saap_routing", "dtype", "device", "json", "json_file"};
  return f;
}

const std::vector<std::string>& convert_flags() {
  static const std::vector<std::string> f = {"input", "output", "to", "dtype"};
  return f;
}

bool eval_model_given() { return !absl::GetFlag(FLAGS_model).empty(); }

absl::StatusOr<LoadedModel> load_model(bool need_tokenizer) { return load(need_tokenizer); }
std::string describe_model(const LoadedModel& l) { return describe(l); }
absl::StatusOr<std::vector<int64_t>> read_input_tokens(const LoadedModel& l, std::string* source) {
  return read_input(l, source);
}
absl::StatusOr<std::vector<int64_t>> parse_top_l_flag() {
  return parse_top_l(absl::GetFlag(FLAGS_top_l));
}
int command_error(const char* command, const std::string& message) { return fail(command, message); }
std::string error_message(const std::exception& e) { return what_of(e); }
absl::Status write_file(const std::string& path, const std::string& text) {
  return write_text_file(path, text);
}

int run_eval(const std::vector<std::string>& positional) {
  if (!positional.empty())
    return fail("eval", absl::StrCat("unexpected argument '", positional[0], "'"));
  return guarded("eval", eval_impl);
}

int run_generate(const std::vector<std::string>& positional) {
  if (!positional.empty())
    return fail("generate", absl::StrCat("unexpected argument '", positional[0],
                                         "' (the prompt is given with --prompt)"));
  return guarded("generate", generate_impl);
}

int run_convert(const std::vector<std::string>& positional) {
  if (!positional.empty())
    return fail("convert", absl::StrCat("unexpected argument '", positional[0],
                                        "' (give --input and --output)"));
  return guarded("convert", convert_impl);
}

}  // namespace sparseflash::llama_commands
