// Experiment configs: text-format protobuf files (configs/experiment.proto),
// built-in presets, command-line overrides and validation.
//
// Every error names where the bad value came from (file:line:column or the
// --set argument), the field path, what was expected and what was found.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "configs/experiment.pb.h"

namespace sparseflash {

using config::Experiment;

// Parses text-format `text` (named `source` in messages). Unknown fields,
// malformed values and out-of-range values are errors.
absl::StatusOr<Experiment> parse_config(std::string_view text, std::string_view source);

// Reads and parses a config file.
absl::StatusOr<Experiment> load_config_file(const std::string& path);

// Names of the presets compiled into the binary (configs/presets/*.txtpb).
std::vector<std::string> preset_names();
// Parses the named preset.
absl::StatusOr<Experiment> load_preset(std::string_view name);

// Applies one "path.to.field=value" override, e.g. "optim.lr=3e-4",
// "attention.kind=HASH", "checkpoint.out_dir=runs/x",
// "layer_attention=[{layers: [0] attention {kind: DENSE}}]". A repeated field
// is replaced as a whole. Errors name the override and the field.
absl::Status apply_override(Experiment* exp, std::string_view assignment);

// Range and consistency checks (n_head divides d_model, seq_len <= block_size,
// 0 <= drop_prob < 1, ...). Errors name the field path, the value and what is
// allowed; `source` is prefixed to the message.
absl::Status validate_config(const Experiment& exp, std::string_view source);

// Sets every unset optional field (recursively) to its default, so the text
// form of the result shows every value the run uses.
void fill_defaults(Experiment* exp);

// The complete text format of a config (after fill_defaults).
std::string config_to_text(const Experiment& exp);

// The one entry point the CLI uses: a preset or a file, then the overrides,
// then defaults filled and validation.
//   config_path: file path, or "preset:NAME", or "" for `default_preset`.
//   complete (optional) runs after the overrides, before defaults and
//   validation, while has_*() still tells which fields were given: the model
//   factory fills the architecture of model.init_from there
//   (model/factory.h, complete_from_pretrained).
using ConfigCompleter = std::function<absl::Status(Experiment*)>;
absl::StatusOr<Experiment> resolve_config(const std::string& config_path,
                                          const std::vector<std::string>& overrides,
                                          const std::string& default_preset,
                                          const ConfigCompleter& complete = nullptr);

// Architectural equality: fields that change parameter shapes or meaning
// (model.*, attention.shared_qk, layer shared_qk). Returns OK or an error listing
// each differing field as "model.n_layer: checkpoint 6, config 4".
absl::Status check_same_architecture(const Experiment& checkpoint, const Experiment& now);

}  // namespace sparseflash
