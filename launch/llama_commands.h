// The commands for pretrained Llama-family checkpoints and for exporting our
// GPT runs: `eval --model` (sliding-window perplexity), `generate` (KV-cache
// decoding) and `convert` (to our native checkpoint, or GPT run -> HF GPT-2).
// main.cc dispatches to these; their flags are defined in llama_commands.cc
// and listed in commands()'s flag lists by name.
#pragma once

#include <string>
#include <vector>

#include <exception>
#include <memory>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/llama.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::saap {
class SaapAttentionHook;
enum class BudgetObjective;  // saap/budgets.h
}

namespace sparseflash::llama_commands {

// Abseil names (underscores) of the flags each command reads, for main.cc's
// per-command flag lists and --help.
const std::vector<std::string>& eval_flags();      // the --model form only
const std::vector<std::string>& generate_flags();
const std::vector<std::string>& convert_flags();

// ---------------------------------------------------------------------------
// shared with the saap commands (launch/saap_commands.cc)

struct LoadedModel {
  checkpoint::LlamaCheckpoint checkpoint;
  model::Llama model{nullptr};
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;  // null when not needed
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;
  std::string attention;
  std::shared_ptr<saap::SaapAttentionHook> saap;  // --attention saap: installed in the model
};

// The model of --model on --device in --dtype with --attention (saap:
// --saap-index, --top-l, --saap-routing); the tokenizer too when asked.
// Throws on unreadable checkpoints; returns a status for bad flags.
absl::StatusOr<LoadedModel> load_model(bool need_tokenizer);
std::string describe_model(const LoadedModel& l);
// Tokens of --text or --data (exactly one), cut to --max-tokens.
absl::StatusOr<std::vector<int64_t>> read_input_tokens(const LoadedModel& l, std::string* source);
absl::StatusOr<std::vector<int64_t>> parse_top_l_flag();
// One --budget-objective value: "output" or "attention".
absl::StatusOr<saap::BudgetObjective> parse_budget_objective(const std::string& text);
// Prints "sparseflash <command>: error: <message>" and returns 1.
int command_error(const char* command, const std::string& message);
// An exception's message without LibTorch's C++ backtrace.
std::string error_message(const std::exception& e);
absl::Status write_file(const std::string& path, const std::string& text);

// True when --model was given: `eval` then takes the Llama path.
bool eval_model_given();

// Each returns the process exit code and prints its own errors
// ("sparseflash <command>: error: ...").
int run_eval(const std::vector<std::string>& positional);
int run_generate(const std::vector<std::string>& positional);
int run_convert(const std::vector<std::string>& positional);

// ---------------------------------------------------------------------------
// conversions (also used by the tests)

struct ConvertResult {
  std::string summary;                // one line for the user
  std::vector<std::string> warnings;  // things the user must know about the export
};

// Any Llama checkpoint load_llama_checkpoint reads -> out_dir/model.safetensors
// + config.json (HF Llama layout, rotate-half Q/K; transformers loads it too),
// plus tokenizer.json when the source directory has one. dtype: "auto" keeps
// F32/F16/BF16 tensors as stored and writes dequantised ones as F32; or
// "float32", "bfloat16", "float16".
absl::StatusOr<ConvertResult> convert_llama_to_native(const std::string& input,
                                                      const std::string& out_dir,
                                                      const std::string& dtype);

// A Llama run of ours (ckpt.pt or its run directory) -> out_dir as an HF
// Llama directory (model::write_hf_llama; dtype "auto" = float32), plus the
// run's tokenizer.json when its data was prepared with one.
absl::StatusOr<ConvertResult> convert_llama_run_to_hf(const std::string& checkpoint,
                                                      const std::string& out_dir,
                                                      const std::string& dtype);

// Our GPT checkpoint (ckpt.pt or its run directory) -> out_dir/model.safetensors
// + config.json for transformers' GPT2LMHeadModel (float32). Absent biases are
// written as zeros (exactly equivalent). Runs trained with sparse attention
// are exported to GPT-2's dense attention (reported in warnings); shared_qk
// layers have no GPT-2 equivalent and are refused.
absl::StatusOr<ConvertResult> convert_gpt_to_hf_gpt2(const std::string& checkpoint,
                                                     const std::string& out_dir);

}  // namespace sparseflash::llama_commands
