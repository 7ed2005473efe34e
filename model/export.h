// Exporting models to other formats: any Llama-family file to our native
// format (an HF Llama directory), and a run of ours to the HF format of its
// family (Llama -> HF Llama, GPT -> HF GPT-2). `sparseflash convert` calls
// these; runs are restored by the caller (trainer::load_model).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
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
};

// A run of ours (`model` float32 on the CPU, trained with `config`) -> out_dir.
// kHfLlama: model::write_hf_llama (dtype "auto" = float32) plus the data's
// tokenizer.json. kHfGpt2: model.safetensors + config.json for transformers'
// GPT2LMHeadModel (float32; absent biases written as zeros, exactly
// equivalent); layers trained with hash/drop attention are exported dense
// (a warning says so); shared_qk layers have no GPT-2 equivalent and are
// refused. A model of the other family is refused, naming the right format.
absl::StatusOr<ExportResult> export_run(CausalLM model, const config::Experiment& config,
                                        const RunSource& source, ExportFormat format,
                                        const std::string& out_dir, const std::string& dtype);

}  // namespace sparseflash::model
