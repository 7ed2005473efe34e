// Exports. Reading order: helpers, Llama files (native, GGUF), Llama runs,
// GPT runs, the entry point for runs.
#include "model/export.h"

#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <ATen/ATen.h>
#include <torch/utils.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "checkpoint/gguf.h"
#include "checkpoint/gguf_writer.h"
#include "checkpoint/llama.h"
#include "checkpoint/safetensors.h"
#include "io/atomic_file.h"
#include "io/errors.h"
#include "model/gpt.h"
#include "model/llama.h"
#include "model/load.h"
#include "nlohmann/json.hpp"

namespace sparseflash::model {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;



// "auto" is `auto_dtype`; other names as parse_dtype reads them.
absl::StatusOr<at::ScalarType> export_dtype(const std::string& name, at::ScalarType auto_dtype) {
  if (name == "auto") return auto_dtype;
  return parse_dtype(name, at::kCPU);
}

checkpoint::DType checkpoint_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return checkpoint::DType::kBF16;
    case at::kHalf: return checkpoint::DType::kF16;
    default: return checkpoint::DType::kF32;
  }
}

// The tokenizer.* keys of the GGUF file at `path` (with `general`, also its
// descriptive general.* keys: license, basename, ...), unchanged; empty when
// `path` is not a GGUF file.
std::vector<checkpoint::GgufEntry> gguf_carried_entries(const std::string& path, bool general) {
  std::vector<checkpoint::GgufEntry> entries;
  if (path.empty() || !fs::is_regular_file(path)) return entries;
  {
    std::ifstream f(path, std::ios::binary);
    char magic[4] = {};
    if (!f.read(magic, 4) || std::string(magic, 4) != "GGUF") return entries;
  }
  auto file = io::value_or_throw(checkpoint::GgufFile::open(path));
  const std::set<std::string> written = {"general.architecture", "general.name", "general.file_type",
                                          "general.quantization_version", "general.alignment"};
  for (const auto& [key, value] : file->metadata()) {
    const bool carried = key.rfind("tokenizer.", 0) == 0 ||
                         (general && key.rfind("general.", 0) == 0 && written.count(key) == 0);
    if (carried) entries.push_back(checkpoint::gguf_entry(*file, key));
  }
  return entries;
}

// options.metadata gets the tokenizer of `tokenizer_source` (a GGUF file's
// keys; with `general`, its general.* keys too), or "no_vocab" and a warning
// naming `what` when there is none.
void add_gguf_tokenizer(const std::string& tokenizer_source, bool general, const std::string& what,
                        checkpoint::GgufLlamaOptions* options, ExportResult* r) {
  options->metadata = gguf_carried_entries(tokenizer_source, general);
  for (const auto& e : options->metadata)
    if (e.key == "tokenizer.ggml.model") return;
  options->metadata.push_back({"tokenizer.ggml.model", static_cast<uint32_t>(checkpoint::GgufType::kString),
                               checkpoint::GgufBuilder::encode_string("no_vocab")});
  r->warnings.push_back(absl::StrCat(
      "no tokenizer written (", what,
      " has no GGUF vocabulary to carry over): tokenizer.ggml.model is \"no_vocab\", so llama.cpp "
      "and our loader need the vocabulary from elsewhere (--tokenizer)"));
}

// The notes of a GGUF write, as warnings.
void add_notes(const std::vector<std::string>& notes, ExportResult* r) {
  r->warnings.insert(r->warnings.end(), notes.begin(), notes.end());
}

// Tensors to write, kept alive until written.
class Writer {
 public:
  explicit Writer(at::ScalarType dtype) : dtype_(dtype) {}
  void add(const std::string& name, const at::Tensor& t) {
    at::Tensor c = t.detach().to(at::kCPU, dtype_).contiguous();
    keep_.push_back(c);
    entries_.push_back({name, checkpoint_dtype(dtype_),
                        std::vector<int64_t>(c.sizes().begin(), c.sizes().end()), c.data_ptr(),
                        static_cast<size_t>(c.nbytes())});
  }
  void write(const std::string& path, const std::map<std::string, std::string>& metadata) {
    io::ok_or_throw(checkpoint::write_safetensors(path, entries_, metadata));
  }

 private:
  at::ScalarType dtype_;
  std::vector<at::Tensor> keep_;
  std::vector<checkpoint::TensorToWrite> entries_;
};

}  // namespace

// ---------------------------------------------------------------------------
// Llama files

absl::StatusOr<ExportResult> export_llama_file(const std::string& input, const std::string& out_dir,
                                               const std::string& dtype_text) {
  try {
    checkpoint::LlamaCheckpoint ckpt = io::value_or_throw(checkpoint::load_llama_checkpoint(input));
    // auto: keep one float type when every matrix is stored in it.
    std::set<checkpoint::DType> stored;
    for (const auto& [name, info] : ckpt.tensors) stored.insert(info.dtype);
    at::ScalarType kept = at::kFloat;
    if (stored.size() == 1 && *stored.begin() == checkpoint::DType::kBF16) kept = at::kBFloat16;
    if (stored.size() == 1 && *stored.begin() == checkpoint::DType::kF16) kept = at::kHalf;
    auto dtype = export_dtype(dtype_text, kept);
    if (!dtype.ok()) return dtype.status();
    const auto& c = ckpt.config;
    if (!ckpt.rope_freq_factors.empty() && c.rope_scaling.type.empty())
      return absl::FailedPreconditionError(absl::StrCat(
          input, ": rope_freqs.weight (per-frequency RoPE divisors) has no HF config "
          "equivalent without rope_scaling; the native format cannot represent it"));
    LlamaLoadOptions o;  // float32 on the CPU: exact for every stored type
    Llama m = load_llama(ckpt, o);
    io::ok_or_throw(write_hf_llama(*m, out_dir, *dtype));
    ExportResult r;
    const fs::path in(input);
    const fs::path tokenizer_json =
        fs::is_directory(in) ? in / "tokenizer.json" : in.parent_path() / "tokenizer.json";
    const char* format = checkpoint::source_format_name(ckpt.format);
    if (ckpt.format != checkpoint::SourceFormat::kGguf && fs::exists(tokenizer_json)) {
      fs::copy_file(tokenizer_json, fs::path(out_dir) / "tokenizer.json",
                    fs::copy_options::overwrite_existing);
    } else {
      const bool own_vocabulary = ckpt.format == checkpoint::SourceFormat::kGguf ||
                                  ckpt.format == checkpoint::SourceFormat::kLlama2c;
      r.warnings.push_back(
          own_vocabulary
              ? absl::StrCat("no tokenizer.json written (", format,
                             " keeps its vocabulary in its own file): pass --tokenizer ", input,
                             " to eval/generate with the converted model")
              : absl::StrCat("no tokenizer.json written: ", input, " has none"));
    }
    r.summary = absl::StrFormat(
        "wrote %s: %s Llama (%d layers, d %d, vocab %d) from %s, %s tensors%s", out_dir, format,
        c.num_hidden_layers, c.hidden_size, c.vocab_size, input, dtype_name(*dtype),
        ckpt.qk_interleaved ? ", Q/K permuted to rotate-half" : "");
    return r;
  } catch (const std::exception& e) {
    return io::status_from_exception(e);
  }
}

absl::StatusOr<checkpoint::DType> parse_gguf_type(const std::string& name) {
  if (name == "f32") return checkpoint::DType::kF32;
  if (name == "f16") return checkpoint::DType::kF16;
  if (name == "bf16") return checkpoint::DType::kBF16;
  if (name == "q8_0") return checkpoint::DType::kQ8_0;
  return absl::InvalidArgumentError(
      absl::StrCat("--gguf-type: expected f32, f16, bf16 or q8_0, got \"", name, "\""));
}

absl::StatusOr<ExportResult> export_llama_file_gguf(const std::string& input, const std::string& out_path,
                                                    const std::string& gguf_type,
                                                    const std::string& rope_scaling) {
  auto type = parse_gguf_type(gguf_type);
  if (!type.ok()) return type.status();
  try {
    checkpoint::LlamaCheckpoint ckpt = io::value_or_throw(checkpoint::load_llama_checkpoint(input));
    if (!rope_scaling.empty()) {
      if (!ckpt.rope_freq_factors.empty())
        return absl::InvalidArgumentError(absl::StrCat(
            "--rope-scaling: ", input, " has per-frequency RoPE divisors (GGUF rope_freqs.weight); "
            "other scaling cannot be applied on top"));
      if (auto s = apply_rope_scaling(rope_scaling, &ckpt.config); !s.ok()) return s;
    }
    const auto& c = ckpt.config;
    Llama m = load_llama(ckpt, LlamaLoadOptions{});  // float32 on the CPU: exact for every stored type
    ExportResult r;
    checkpoint::GgufLlamaOptions o;
    o.type = *type;
    if (ckpt.format == checkpoint::SourceFormat::kGguf) {
      auto source = io::value_or_throw(checkpoint::GgufFile::open(input));
      if (source->has("general.name")) o.name = source->get_string("general.name");
    }
    if (o.name.empty()) o.name = fs::path(input).filename().replace_extension().string();
    add_gguf_tokenizer(ckpt.format == checkpoint::SourceFormat::kGguf ? input : "", /*general=*/true, input,
                       &o, &r);
    add_notes(io::value_or_throw(write_gguf_llama(*m, out_path, o)), &r);
    r.summary = absl::StrFormat(
        "wrote %s: GGUF %s Llama (%d layers, d %d, vocab %d%s) from %s (%s)%s", out_path,
        gguf_type, c.num_hidden_layers, c.hidden_size, c.vocab_size,
        c.rope_scaling.type.empty() ? "" : ", rope_scaling " + c.rope_scaling.type, input,
        checkpoint::source_format_name(ckpt.format),
        ckpt.qk_interleaved ? "" : ", Q/K rows interleaved for llama.cpp");
    return r;
  } catch (const std::exception& e) {
    return io::status_from_exception(e);
  }
}

// ---------------------------------------------------------------------------
// Llama runs

namespace {

absl::StatusOr<ExportResult> export_llama_run(LlamaImpl& llama, const RunSource& source,
                                              const std::string& out_dir,
                                              const std::string& dtype_text) {
  auto dtype = export_dtype(dtype_text, at::kFloat);
  if (!dtype.ok()) return dtype.status();
  try {
    io::ok_or_throw(write_hf_llama(llama, out_dir, *dtype));
  } catch (const std::exception& e) {
    return io::with_context(io::status_from_exception(e), source.path);
  }
  ExportResult r;
  // The tokenizer the run was trained with, where it is a tokenizer.json.
  const std::string& from = source.tokenizer_source;
  const fs::path tokenizer_json =
      fs::is_directory(from) ? fs::path(from) / "tokenizer.json" : fs::path(from);
  if (!from.empty() && tokenizer_json.filename() == "tokenizer.json" &&
      fs::exists(tokenizer_json)) {
    fs::copy_file(tokenizer_json, fs::path(out_dir) / "tokenizer.json",
                  fs::copy_options::overwrite_existing);
  } else {
    r.warnings.push_back(absl::StrCat(
        "no tokenizer.json written (the run's data was tokenized with ",
        from.empty() ? "an unknown tokenizer" : from,
        "): pass --tokenizer to eval/generate with the exported model"));
  }
  const auto& c = llama.config();
  r.summary = absl::StrFormat(
      "wrote %s: Llama (%d layers, d %d, vocab %d, context %d%s) from %s at step %d, %s", out_dir,
      c.num_hidden_layers, c.hidden_size, c.vocab_size, c.max_position_embeddings,
      c.rope_scaling.type.empty() ? "" : ", rope_scaling " + c.rope_scaling.type, source.path,
      source.step, dtype_name(*dtype));
  return r;
}

absl::StatusOr<ExportResult> export_llama_run_gguf(LlamaImpl& llama, const RunSource& source,
                                                   const std::string& out_path,
                                                   const std::string& gguf_type) {
  auto type = parse_gguf_type(gguf_type);
  if (!type.ok()) return type.status();
  ExportResult r;
  try {
    checkpoint::GgufLlamaOptions o;
    o.type = *type;
    o.name = fs::path(source.path).filename().string();
    add_gguf_tokenizer(source.tokenizer_source, /*general=*/false,
                       source.tokenizer_source.empty() ? "the run's tokenizer (" + source.tokenizer + ")"
                                                       : source.tokenizer_source,
                       &o, &r);
    add_notes(io::value_or_throw(write_gguf_llama(llama, out_path, o)), &r);
  } catch (const std::exception& e) {
    return io::with_context(io::status_from_exception(e), source.path);
  }
  const auto& c = llama.config();
  r.summary = absl::StrFormat(
      "wrote %s: GGUF %s Llama (%d layers, d %d, vocab %d, context %d%s) from %s at step %d", out_path,
      gguf_type, c.num_hidden_layers, c.hidden_size, c.vocab_size, c.max_position_embeddings,
      c.rope_scaling.type.empty() ? "" : ", rope_scaling " + c.rope_scaling.type, source.path, source.step);
  return r;
}

// ---------------------------------------------------------------------------
// GPT runs

absl::StatusOr<ExportResult> export_gpt_run(GPTImpl& gpt, const config::Experiment& exp,
                                            const RunSource& source, const std::string& out_dir) {
  const auto& m = exp.model();
  ExportResult r;
  std::vector<std::string> sparse_layers;
  for (int l = 0; l < m.n_layer(); ++l) {
    auto o = layer_attention_options(exp, l);
    if (o.shared_qk)
      return absl::FailedPreconditionError(absl::StrCat(
          source.path, ": layer ", l,
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
  const int64_t d = m.d_model(), V = gpt.vocab_size();
  auto params = gpt.named_parameters();
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
             {"sparseflash_source", source.path},
             {"sparseflash_step", std::to_string(source.step)},
             {"sparseflash_tokenizer", source.tokenizer}});
  } catch (const std::exception& e) {
    return io::status_from_exception(e, absl::StatusCode::kInternal);
  }
  // The byte tokenizer's ids are the bytes; its end-of-document id is 0.
  json config = {{"architectures", {"GPT2LMHeadModel"}},
                 {"model_type", "gpt2"},
                 {"vocab_size", V},
                 {"n_positions", gpt.block_size()},
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
  auto s = io::write_file_atomically((fs::path(out_dir) / "config.json").string(),
                                     config.dump(2) + "\n");
  if (!s.ok()) return s;
  r.summary = absl::StrFormat(
      "wrote %s: GPT-2 (%d layers, d %d, %d heads, vocab %d = %s tokenizer, %d positions) from "
      "%s at step %d",
      out_dir, m.n_layer(), d, m.n_head(), V, source.tokenizer, gpt.block_size(), source.path,
      source.step);
  return r;
}

}  // namespace

// ---------------------------------------------------------------------------
// runs

absl::StatusOr<ExportResult> export_run(CausalLM model, const config::Experiment& config,
                                        const RunSource& source, ExportFormat format,
                                        const std::string& out_dir, const std::string& dtype) {
  const config::Model::Arch arch = model->arch();
  // A LoRA run exports as one model, its adapters folded into the weights.
  merge_lora(*model);
  if (format == ExportFormat::kHfLlama || format == ExportFormat::kGguf) {
    if (arch != config::Model::LLAMA)
      return absl::InvalidArgumentError(absl::StrCat(source.path, " is a ", arch_name(arch),
                                                     " run of ours; export it with --to hf-gpt2"));
    auto& llama = *static_cast<LlamaImpl*>(model.get());
    if (format == ExportFormat::kGguf) return export_llama_run_gguf(llama, source, out_dir, dtype);
    return export_llama_run(llama, source, out_dir, dtype);
  }
  if (arch != config::Model::GPT)
    return absl::InvalidArgumentError(absl::StrCat(
        source.path, " holds a ", arch_name(arch),
        " model; --to hf-gpt2 exports GPT runs (use --to native or --to gguf for Llama runs)"));
  return export_gpt_run(*static_cast<GPTImpl*>(model.get()), config, source, out_dir);
}

}  // namespace sparseflash::model
