// The shared model flags and loading from them.
#include "cli/model_flags.h"

#include <iostream>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "io/atomic_file.h"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, model, "",
          "The model: an HF directory (config.json + safetensors), a .gguf file, a llama2.c .bin "
          "checkpoint, a directory written by `sparseflash convert`, or a run of ours (ckpt.pt or "
          "its directory; GPT or Llama).");
ABSL_FLAG(std::string, device, "auto", "auto, cpu, cuda or cuda:N.");
ABSL_FLAG(std::string, dtype, "auto",
          "Weights and activations: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 "
          "or float16. convert: auto keeps float tensors as stored, dequantised ones as float32.");
ABSL_FLAG(std::string, tokenizer, "byte",
          "prepare: byte (vocabulary 256, byte 0 ends a document) or a tokenizer file: a "
          "tokenizer.json, a directory holding one, a .gguf (its embedded vocabulary) or a "
          "llama2.c tokenizer.bin; meta.json records its identity and absolute path. eval, "
          "generate, saap: a tokenizer file of the same kinds; byte = the model's own (a run's: "
          "the one its data was prepared with).");
ABSL_FLAG(std::string, data, "",
          "eval of a run: the prepared directory to take validation loss on (empty = the one "
          "it was trained on). Perplexity (eval, saap): token shards (comma-separated .bin "
          "files) or a prepared directory (its val shards).");
ABSL_FLAG(std::string, text, "", "eval, saap: UTF-8 text file to score.");
ABSL_FLAG(int64_t, context, 2048, "eval, saap: tokens per window (the model's context).");
ABSL_FLAG(int64_t, stride, 0,
          "eval, saap: window step in tokens; each window scores the tokens it adds. "
          "0 = context / 2.");
ABSL_FLAG(int64_t, max_tokens, 0, "eval, saap: score only the first N tokens (0 = all).");
ABSL_FLAG(std::string, attention, "",
          "Attention kind of every layer: dense, hash (LSH buckets), drop (random query/key "
          "dropping), shift (LongLoRA's shifted groups, S2-Attn) or saap (key partitions routed by the classifiers of --saap-index); empty = "
          "a run's own (dense for pretrained files).");
ABSL_FLAG(int32_t, num_buckets, 16, "--attention hash: buckets per layer (even).");
ABSL_FLAG(double, drop_prob, 0.5, "--attention drop: probability of dropping a query or key.");
ABSL_FLAG(int64_t, group_size, 0,
          "--attention shift: positions per group (0 = a quarter of the keys, LongLoRA's).");
ABSL_FLAG(int64_t, sparse_sinks, 0,
          "--attention hash/drop/shift: the first N keys are seen by every query (attention "
          "sinks; attention.sink_tokens).");
ABSL_FLAG(int64_t, sparse_window, 0,
          "--attention hash/drop/shift: every query also sees its N nearest keys, itself "
          "included (attention.local_window).");
ABSL_FLAG(double, lsh_capacity, 0,
          "--attention hash: cap each bucket at this multiple of an even share of every block "
          "of rows (attention.lsh_capacity; 0 = uncapped LSH, else >= 1).");
ABSL_FLAG(std::string, rope_scaling, "",
          "Pretrained files: TYPE:FACTOR (linear, dynamic or yarn, e.g. linear:4) replaces the "
          "file's RoPE scaling, extending its context zero-shot to FACTOR times its pretraining "
          "context.");
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
ABSL_FLAG(uint64_t, seed, 1, "Seed of the sampler, of hash/drop attention and of saap's draws.");
ABSL_FLAG(bool, json, false, "Print the result as one JSON object on stdout.");
ABSL_FLAG(std::string, json_file, "", "Also write the result as a JSON object to this file.");

namespace sparseflash::cli {

const std::vector<std::string>& model_flag_names() {
  static const std::vector<std::string> f = {
      "model", "tokenizer", "attention", "num_buckets", "drop_prob", "group_size",
      "sparse_sinks", "sparse_window", "lsh_capacity", "rope_scaling", "saap_index",
      "top_l", "key_budget", "per_head_budgets", "budget_objective", "mass_threshold",
      "saap_routing", "dtype", "device", "seed", "json", "json_file"};
  return f;
}

bool saap_index_without_saap() {
  return !absl::GetFlag(FLAGS_saap_index).empty() && absl::GetFlag(FLAGS_attention) != "saap";
}

absl::StatusOr<std::vector<int64_t>> top_l_from_flags() {
  const std::string text = absl::GetFlag(FLAGS_top_l);
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

namespace {

absl::StatusOr<saap::SaapInferenceOptions> saap_options_from_flags() {
  auto top_l = top_l_from_flags();
  if (!top_l.ok()) return top_l.status();
  if (top_l->size() != 1)
    return absl::InvalidArgumentError("--top-l: give one value with --attention saap");
  saap::SaapInferenceOptions o;
  o.top_l = (*top_l)[0];
  o.key_budget = absl::GetFlag(FLAGS_key_budget);
  o.mass_threshold = absl::GetFlag(FLAGS_mass_threshold);
  o.per_head_budgets = absl::GetFlag(FLAGS_per_head_budgets);
  auto objective = saap::parse_budget_objective(absl::GetFlag(FLAGS_budget_objective));
  if (!objective.ok()) return objective.status();
  o.budget_objective = *objective;
  auto routing = saap::parse_routing(absl::GetFlag(FLAGS_saap_routing));
  if (!routing.ok()) return routing.status();
  o.routing = *routing;
  return o;
}

}  // namespace

absl::StatusOr<LoadedFromFlags> load_model_from_flags(bool need_tokenizer) {
  const std::string path = absl::GetFlag(FLAGS_model);
  const std::string attention = absl::GetFlag(FLAGS_attention);
  if (path.empty()) return absl::InvalidArgumentError("--model is required");
  if (attention == "saap" && absl::GetFlag(FLAGS_saap_index).empty())
    return absl::InvalidArgumentError("--attention saap needs --saap-index FILE");
  model::LoadOptions o;
  auto device = trainer::resolve_device(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return device.status();
  o.device = *device;
  o.dtype = absl::GetFlag(FLAGS_dtype);
  if (!attention.empty()) {
    auto a = model::parse_attention(attention == "saap" ? "dense" : attention,
                                    absl::GetFlag(FLAGS_num_buckets), absl::GetFlag(FLAGS_drop_prob),
                                    absl::GetFlag(FLAGS_group_size), absl::GetFlag(FLAGS_sparse_sinks),
                                    absl::GetFlag(FLAGS_sparse_window),
                                    absl::GetFlag(FLAGS_lsh_capacity));
    if (!a.ok()) return a.status();
    o.attention = *a;
  }
  o.attention_seed = absl::GetFlag(FLAGS_seed);
  o.rope_scaling = absl::GetFlag(FLAGS_rope_scaling);
  o.need_tokenizer = need_tokenizer;
  // --tokenizer is shared with prepare, whose default is "byte".
  o.tokenizer = absl::GetFlag(FLAGS_tokenizer) == "byte" ? "" : absl::GetFlag(FLAGS_tokenizer);
  auto loaded = trainer::load_for_inference(path, o);
  if (!loaded.ok()) return loaded.status();
  LoadedFromFlags l{*std::move(loaded), nullptr, ""};
  if (attention == "saap") {
    auto saap_options = saap_options_from_flags();
    if (!saap_options.ok()) return saap_options.status();
    auto hook = saap::open_saap_hook(absl::GetFlag(FLAGS_saap_index), l.loaded.identity,
                                     *saap_options, l.loaded.device);
    if (!hook.ok()) return hook.status();
    l.saap = *hook;
    l.loaded.model->set_attention_hook(l.saap);
    l.loaded.attention = "saap";
  }
  l.description = model::describe(l.loaded, l.saap ? saap::describe(*l.saap) : "");
  return l;
}

absl::StatusOr<data::Tokens> read_tokens_from_flags(const model::LoadedModel& loaded) {
  data::TokenSource source;
  source.text = absl::GetFlag(FLAGS_text);
  source.shards = absl::GetFlag(FLAGS_data);
  source.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  auto tokens = data::read_tokens(source, loaded.tokenizer.get(), loaded.model->vocab_size());
  if (tokens.ok() && !source.text.empty())
    std::cerr << absl::StrFormat("text: %s, %d bytes -> %d tokens (%.2f s)\n", tokens->source,
                                 tokens->text_bytes, tokens->ids.size(), tokens->encode_seconds);
  return tokens;
}

absl::Status write_json_file(const nlohmann::json& j) {
  const std::string path = absl::GetFlag(FLAGS_json_file);
  if (path.empty()) return absl::OkStatus();
  return io::write_file_atomically(
      path, j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

}  // namespace sparseflash::cli
