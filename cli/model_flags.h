// The flags eval, generate and saap share: which model to load and how
// (--model, --tokenizer, --device, --dtype, --attention and its SAAP options),
// what to read (--text, --data), and where results go (--json, --json-file).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "data/tokens.h"
#include "model/load.h"
#include "nlohmann/json.hpp"
#include "saap/model/evaluate.h"

namespace sparseflash::cli {

// Abseil names of the flags loaded_model_from_flags reads.
const std::vector<std::string>& model_flag_names();

struct LoadedFromFlags {
  model::LoadedModel loaded;
  std::shared_ptr<saap::SaapAttentionHook> saap;  // --attention saap: installed in the model
  std::string description;                        // model::describe, with the SAAP part
};

// --model through trainer::load_for_inference; with --attention saap the
// index of --saap-index is installed as the model's attention hook.
// --attention's default keeps a run's own attention (dense for files).
absl::StatusOr<LoadedFromFlags> load_model_from_flags(bool need_tokenizer);

// --text or --data (exactly one), cut to --max-tokens; prints the encoding
// time of a text to stderr.
absl::StatusOr<data::Tokens> read_tokens_from_flags(const model::LoadedModel& loaded);

// --top-l as a list of positive integers.
absl::StatusOr<std::vector<int64_t>> top_l_from_flags();

// The --saap-index flag's check shared by eval and generate: only with --attention saap.
bool saap_index_without_saap();

// Writes j to --json-file when given.
absl::Status write_json_file(const nlohmann::json& j);

}  // namespace sparseflash::cli
