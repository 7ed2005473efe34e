// A short, bounded rendering of a JSON value for error messages: scalars as
// JSON (strings cut at 80 characters), containers as their kind and size, so
// a hostile deeply nested header never gets serialised in full.
#pragma once

#include <string>

#include "nlohmann/json.hpp"

namespace sparseflash::checkpoint {

inline std::string json_brief(const nlohmann::json& j) {
  if (j.is_array() || j.is_object()) {
    return std::string(j.type_name()) + " of " + std::to_string(j.size());
  }
  if (j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    if (s.size() > 80) return nlohmann::json(s.substr(0, 80)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "...";
  }
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace sparseflash::checkpoint
