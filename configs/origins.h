// Internal to configs/: where each value of a config came from (a file's
// line, a --set override), and the validation that reports it.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "configs/experiment.pb.h"

namespace sparseflash::config_internal {

struct Origins {
  // File name (or "preset:NAME") prefixed to every message; may be empty.
  std::string source;
  // Field path ("model.n_head", "layer_attention[0].layers[1]") -> 1-based line.
  std::map<std::string, int> lines;
  // (path, assignment) of every --set override, in the order applied.
  std::vector<std::pair<std::string, std::string>> overrides;

  // The override that last wrote `path` (or a message/list containing it).
  const std::string* override_for(const std::string& path) const {
    for (auto it = overrides.rbegin(); it != overrides.rend(); ++it) {
      const std::string& p = it->first;
      if (path == p ||
          (absl::StartsWith(path, p) && (path[p.size()] == '.' || path[p.size()] == '['))) {
        return &it->second;
      }
    }
    return nullptr;
  }

  // Wraps a message about `path` with its origin.
  std::string describe(const std::string& path, const std::string& message) const {
    if (const std::string* assignment = override_for(path)) {
      return absl::StrCat(source.empty() ? "" : absl::StrCat(source, ": "), message,
                          " (from --set ", *assignment, ")");
    }
    auto line = lines.find(path);
    if (line != lines.end() && !source.empty()) {
      return absl::StrCat(source, ":", line->second, ": ", message);
    }
    return source.empty() ? message : absl::StrCat(source, ": ", message);
  }
};

// Every range and consistency check of an experiment config; all violations
// in one error, each message prefixed with its value's origin.
absl::Status validate_with(const Experiment& exp, const Origins& origins);

}  // namespace sparseflash::config_internal
