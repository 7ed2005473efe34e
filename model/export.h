// Exporting models to other formats: any Llama-family file to our native
// format (an HF Llama directory) or to GGUF for llama.cpp, and a run of ours
// to the HF format of its family (Llama -> HF Llama, GPT -> HF GPT-2) or, for
// Llama runs, to GGUF. `sparseflash convert` calls
// these; runs are restored by the caller (trainer::restore_run).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoint/tensor.h"
#include "configs/experiment.pb.h"
#include "model/causal_lm.h"

namespace sparseflash::model {

struct ExportResult {
  std::string summary;                // one line for the user
  std::vector<std::string> warnings;  // things the user must know about the export
};

// Any Llama checkpoint checkpoint::load_llama_checkpoint reads -> out_dir/model.safetensors
// + config.json (HF Llama layout, rotate-half Q/K; transformers loads it too),
// plus tokenizer.json when the source directory has one. dtype: "auto" keeps
// F32/F16/BF16 tensors as stored and writes dequantised ones as F32; or
// "float32", "bfloat16", "float16".
absl::StatusOr<ExportResult> export_llama_file(const std::string& input, const std::string& out_dir,
                                               const std::string& dtype);

// "f32", "f16", "bf16" or "q8_0": the stored type of a GGUF export's matrices
// (llama.cpp's convert --outtype names); errors name --gguf-type.
absl::StatusOr<checkpoint::DType> parse_gguf_type(const std::string& name);

// Any Llama checkpoint load_llama_checkpoint reads -> one GGUF v3 file at
// out_path that llama.cpp runs (model::write_gguf_llama; `gguf_type` as
// parse_gguf_type reads it), with the source's tokenizer: a GGUF source's
// tokenizer.* keys are copied unchanged; other sources get
// tokenizer.ggml.model "no_vocab" and a warning (llama.cpp then needs a
// vocabulary from elsewhere). Quantised sources are dequantised first, so
// a Q4_1 source written as Q8_0 is requantised, not copied. rope_scaling:
// "" or TYPE:FACTOR (apply_rope_scaling), applied before writing.
absl::StatusOr<ExportResult> export_llama_file_gguf(const std::string& input, const std::string& out_path,
                                                    const std::string& gguf_type,
                                                    const std::string& rope_scaling = "");

// Where a run came from, for the exported files and the messages.
struct RunSource {
  std::string path;       // as the user gave it
  int64_t step = 0;
  std::string tokenizer;  // its identity ("byte", "bpe:...")
  // The tokenizer file its data was prepared with ("" when unknown): a
  // tokenizer.json there is copied next to a Llama export.
  std::string tokenizer_source;
};

enum class ExportFormat {
  kHfLlama,  // `convert --to native`: Llama runs
  kHfGpt2,   // `convert --to hf-gpt2`: GPT runs
  kGguf,     // `convert --to gguf`: Llama runs, for llama.cpp
};

// A run of ours (`model` float32 on the CPU, trained with `config`) -> out_dir.
// kHfLlama: model::write_hf_llama (dtype "auto" = float32) plus the data's
// tokenizer.json. kGguf: out_dir is the .gguf file and `dtype` its GGUF type
// (parse_gguf_type); the tokenizer.* keys of the .gguf the data was prepared
// with, if it was, else "no_vocab" and a warning. kHfGpt2: model.safetensors + config.json for transformers'
// GPT2LMHeadModel (float32; absent biases written as zeros, exactly
// equivalent); layers trained with hash/drop attention are exported dense
// (a warning says so); shared_qk layers have no GPT-2 equivalent and are
// refused. A model of the other family is refused, naming the right format.
absl::StatusOr<ExportResult> export_run(CausalLM model, const config::Experiment& config,
                                        const RunSource& source, ExportFormat format,
                                        const std::string& out_dir, const std::string& dtype);

}  // namespace sparseflash::model
