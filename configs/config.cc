// Experiment configs: parsing, presets, --set overrides, defaults, validation.
//
// Everything here works on the Experiment message through protobuf reflection,
// so adding a field to experiment.proto needs no change in this file unless the
// field wants a range check (validate_with below).
//
// Error messages carry the origin of the offending value:
//   FILE:LINE:COL: <protobuf's message>                          (parse errors)
//   FILE:LINE: field model.n_head = 5 must divide ...           (value from the file)
//   FILE: field model.n_head = 5 must divide ... (from --set model.n_head=5)
// To make that possible the parser records the line of every field it reads
// (an Origins table), and resolve_config adds the path of every override.
#include "configs/config.h"
#include "configs/origins.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace sparseflash {

// Generated from configs/presets/*.txtpb by configs/embed_presets.cmake.
const std::vector<std::pair<std::string_view, std::string_view>>& embedded_presets();

namespace {

namespace pb = google::protobuf;
using pb::FieldDescriptor;
using pb::TextFormat;

// The public API uses std::string_view, but Debian's Abseil is built with its
// own absl::string_view (not an alias), so convert at the boundary.
absl::string_view to_absl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

using config_internal::Origins;
using config_internal::validate_with;

// Fills origins->lines from a ParseInfoTree, walking the parsed message and the
// tree together. Lists written as `layers: [0, 1]` get one location for the
// whole list, so later elements inherit the line of the previous one.
void record_lines(const pb::Message& msg, const TextFormat::ParseInfoTree* tree,
                  const std::string& prefix, std::map<std::string, int>* lines) {
  if (tree == nullptr) return;
  const pb::Reflection* refl = msg.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  refl->ListFields(msg, &fields);
  for (const FieldDescriptor* f : fields) {
    const std::string path = prefix + f->name();
    const bool is_msg = f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE;
    if (f->is_repeated()) {
      int line = -1;
      for (int j = 0; j < refl->FieldSize(msg, f); ++j) {
        const std::string elem = absl::StrCat(path, "[", j, "]");
        const int l = tree->GetLocation(f, j).line;
        if (l >= 0) line = l + 1;
        if (line < 0) continue;
        (*lines)[elem] = line;
        if (j == 0) (*lines)[path] = line;
        if (is_msg) {
          record_lines(refl->GetRepeatedMessage(msg, f, j), tree->GetTreeForNested(f, j),
                       elem + ".", lines);
        }
      }
    } else {
      const int l = tree->GetLocation(f, -1).line;
      if (l >= 0) (*lines)[path] = l + 1;
      if (is_msg) {
        record_lines(refl->GetMessage(msg, f), tree->GetTreeForNested(f, -1), path + ".", lines);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Parsing

// Keeps protobuf's first error (the parser stops there anyway) with its
// 0-based line and column, instead of letting protobuf log it to stderr.
class FirstErrorCollector : public pb::io::ErrorCollector {
 public:
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (has_error_) return;
    has_error_ = true;
    line_ = line;
    column_ = column;
    message_ = message;
  }
  void AddWarning(int, pb::io::ColumnNumber, const std::string&) override {}

  bool has_error() const { return has_error_; }
  const std::string& message() const { return message_; }
  // "SOURCE:LINE:COL: message", 1-based (protobuf counts from 0).
  std::string located(absl::string_view source) const {
    if (line_ < 0) return absl::StrCat(source, ": ", message_);
    return absl::StrCat(source, ":", line_ + 1, ":", column_ + 1, ": ", message_);
  }

 private:
  bool has_error_ = false;
  int line_ = -1;
  pb::io::ColumnNumber column_ = -1;
  std::string message_;
};

// Syntax-level parse: unknown fields, malformed values and repeated singular
// fields are errors (the TextFormat::Parser defaults). No defaults, no
// validation: resolve_config applies overrides before validating.
absl::StatusOr<Experiment> parse_text(absl::string_view text, absl::string_view source,
                                      Origins* origins) {
  Experiment exp;
  FirstErrorCollector errors;
  TextFormat::ParseInfoTree tree;
  TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  parser.WriteLocationsTo(&tree);
  // Explicit, although these are the defaults: a typo in a config must never
  // be silently ignored.
  parser.AllowUnknownField(false);
  parser.AllowUnknownExtension(false);
  if (!parser.ParseFromString(std::string(text), &exp)) {
    if (!errors.has_error()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": cannot parse config"));
    }
    return absl::InvalidArgumentError(errors.located(source));
  }
  origins->source = std::string(source);
  record_lines(exp, &tree, "", &origins->lines);
  return exp;
}

absl::StatusOr<std::string> read_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    const int err = errno;
    const std::string message =
        absl::StrCat("cannot open config file '", path, "': ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(message) : absl::InvalidArgumentError(message);
  }
  std::string text;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  // A directory opens fine on Linux and fails here with EISDIR.
  const int err = std::ferror(f) ? errno : 0;
  std::fclose(f);
  if (err != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read config file '", path, "': ", std::strerror(err)));
  }
  return text;
}

std::optional<absl::string_view> find_preset(absl::string_view name) {
  for (const auto& [preset, text] : embedded_presets()) {
    if (to_absl(preset) == name) return to_absl(text);
  }
  return std::nullopt;
}

absl::Status unknown_preset(absl::string_view name) {
  return absl::NotFoundError(absl::StrCat(
      "unknown preset '", name, "' (known presets: ", absl::StrJoin(preset_names(), ", "), ")"));
}

// ---------------------------------------------------------------------------
// Overrides

// What a --set value for field `f` must look like, for error messages.
std::string expected_value(const FieldDescriptor* f) {
  std::string one;
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
    case FieldDescriptor::CPPTYPE_INT64:
      one = absl::StrCat("an integer (", f->type_name(), ")");
      break;
    case FieldDescriptor::CPPTYPE_UINT32:
    case FieldDescriptor::CPPTYPE_UINT64:
      one = absl::StrCat("a non-negative integer (", f->type_name(), ")");
      break;
    case FieldDescriptor::CPPTYPE_FLOAT:
    case FieldDescriptor::CPPTYPE_DOUBLE:
      one = absl::StrCat("a number (", f->type_name(), ")");
      break;
    case FieldDescriptor::CPPTYPE_BOOL:
      one = "true or false (bool)";
      break;
    case FieldDescriptor::CPPTYPE_STRING:
      one = "a string";
      break;
    case FieldDescriptor::CPPTYPE_ENUM: {
      std::vector<std::string> names;
      const pb::EnumDescriptor* e = f->enum_type();
      for (int i = 0; i < e->value_count(); ++i) names.push_back(e->value(i)->name());
      one = absl::StrCat("one of ", absl::StrJoin(names, ", "), " (enum ", e->full_name(), ")");
      break;
    }
    case FieldDescriptor::CPPTYPE_MESSAGE:
      one = absl::StrCat("a message {field: value ...} of type ", f->message_type()->full_name());
      break;
  }
  if (f->is_repeated()) return absl::StrCat("a list [v1, v2, ...] or a single value, each ", one);
  return one;
}

std::string field_names(const pb::Descriptor* d) {
  std::vector<std::string> names;
  for (int i = 0; i < d->field_count(); ++i) names.push_back(d->field(i)->name());
  return absl::StrJoin(names, ", ");
}

bool is_quoted(absl::string_view v) {
  return v.size() >= 2 && (v.front() == '"' || v.front() == '\'') && v.back() == v.front();
}

// Sets field `f` of `parent` from the text `value`: the value is parsed as the
// text-format snippet "name: value" into an empty message of the parent's type
// (so protobuf does all the value parsing), then merged in. Singular scalars
// are replaced, singular messages merged (`model={n_layer: 2}` keeps the other
// model fields), repeated fields replaced as a whole.
absl::Status set_leaf(pb::Message* parent, const FieldDescriptor* f, absl::string_view value,
                      const std::string& path, absl::string_view assignment) {
  std::string text;
  if (f->cpp_type() == FieldDescriptor::CPPTYPE_STRING && !is_quoted(value) &&
      !(f->is_repeated() && absl::StartsWith(value, "["))) {
    text = absl::StrCat(f->name(), ": \"", absl::CEscape(value), "\"");
  } else {
    text = absl::StrCat(f->name(), ": ", value);
  }

  std::unique_ptr<pb::Message> tmp(parent->New());
  FirstErrorCollector errors;
  TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  const auto bad_value = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("--set ", assignment, ": expected ",
                                                   expected_value(f), " for ", path, ": ", why));
  };
  if (!parser.ParseFromString(text, tmp.get())) {
    return bad_value(errors.has_error() ? errors.message() : "cannot parse the value");
  }
  // The snippet must set nothing but this field: "optim.lr=1 beta1: 0" parses,
  // but is not what a single assignment means.
  std::vector<const FieldDescriptor*> set;
  tmp->GetReflection()->ListFields(*tmp, &set);
  for (const FieldDescriptor* s : set) {
    if (s != f) return bad_value("unexpected text after the value");
  }
  if (set.empty() && !f->is_repeated()) return bad_value("no value given");

  if (f->is_repeated()) parent->GetReflection()->ClearField(parent, f);
  parent->MergeFrom(*tmp);
  return absl::OkStatus();
}

// Applies one override; *path_out receives the normalised field path it wrote
// (e.g. "layer_attention[0].attention.kind") for Origins.
absl::Status apply_override_at(Experiment* exp, absl::string_view assignment,
                               std::string* path_out) {
  const size_t eq = assignment.find('=');
  if (eq == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--set ", assignment, ": expected path=value, e.g. optim.lr=3e-4"));
  }
  const absl::string_view path_text = absl::StripAsciiWhitespace(assignment.substr(0, eq));
  const absl::string_view value = absl::StripAsciiWhitespace(assignment.substr(eq + 1));
  const auto error = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("--set ", assignment, ": ", why));
  };
  if (path_text.empty()) return error("empty field path before '='");

  const std::vector<absl::string_view> parts = absl::StrSplit(path_text, '.');
  pb::Message* msg = exp;
  std::string path;
  for (size_t i = 0; i < parts.size(); ++i) {
    absl::string_view name = parts[i];
    const bool last = i + 1 == parts.size();

    // "name[index]" picks one element of a repeated message field.
    int index = -1;
    if (const size_t open = name.find('['); open != absl::string_view::npos) {
      absl::string_view idx = name.substr(open + 1);
      if (!absl::ConsumeSuffix(&idx, "]") || !absl::SimpleAtoi(idx, &index) || index < 0) {
        return error(absl::StrCat("bad index in '", name, "' (expected name[N])"));
      }
      name = name.substr(0, open);
    }
    if (name.empty()) return error(absl::StrCat("empty component in field path '", path_text, "'"));

    const pb::Descriptor* desc = msg->GetDescriptor();
    const FieldDescriptor* f = desc->FindFieldByName(std::string(name));
    if (f == nullptr) {
      return error(absl::StrCat("message ", desc->full_name(), " has no field '", name,
                                "' (fields: ", field_names(desc), ")"));
    }
    path = path.empty() ? f->name() : absl::StrCat(path, ".", f->name());
    const pb::Reflection* refl = msg->GetReflection();
    const bool is_msg = f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE;

    if (index >= 0) {
      if (!f->is_repeated() || !is_msg) {
        return error(
            absl::StrCat("field ", path, " is not a list of messages; drop the [", index, "]"));
      }
      const int size = refl->FieldSize(*msg, f);
      if (index >= size) {
        return error(absl::StrCat("index ", index, " out of range: ", path, " has ", size,
                                  size == 1 ? " element" : " elements"));
      }
      absl::StrAppend(&path, "[", index, "]");
      if (last) {
        return error(absl::StrCat("cannot replace one element; set a field inside it (", path,
                                  ".FIELD=...) or the whole list (", f->name(), "=[...])"));
      }
      msg = refl->MutableRepeatedMessage(msg, f, index);
      continue;
    }
    if (last) {
      absl::Status s = set_leaf(msg, f, value, path, assignment);
      if (!s.ok()) return s;
      *path_out = path;
      return absl::OkStatus();
    }
    if (!is_msg) {
      return error(absl::StrCat("field ", path, " is a ", f->type_name(),
                                ", not a message; it has no field '", parts[i + 1], "'"));
    }
    if (f->is_repeated()) {
      return error(absl::StrCat("field ", path, " is a list; pick an element, e.g. ", path, "[0].",
                                parts[i + 1]));
    }
    msg = refl->MutableMessage(msg, f);
  }
  return error("empty field path");  // unreachable: StrSplit yields >= 1 part
}

// ---------------------------------------------------------------------------
// Defaults

// Recursion is safe because the schema has no recursive message types; a
// recursive one would make MutableMessage below create submessages forever.
void fill_defaults_in(pb::Message* msg) {
  const pb::Descriptor* d = msg->GetDescriptor();
  const pb::Reflection* r = msg->GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    const bool is_msg = f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE;
    if (f->is_repeated()) {
      if (is_msg) {
        for (int j = 0; j < r->FieldSize(*msg, f); ++j) {
          fill_defaults_in(r->MutableRepeatedMessage(msg, f, j));
        }
      }
      continue;
    }
    // Setting a oneof member would clear its siblings: only recurse into the set one.
    if (f->containing_oneof() != nullptr && !r->HasField(*msg, f)) continue;
    if (is_msg) {
      fill_defaults_in(r->MutableMessage(msg, f));
      continue;
    }
    if (r->HasField(*msg, f)) continue;
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT32:
        r->SetInt32(msg, f, f->default_value_int32());
        break;
      case FieldDescriptor::CPPTYPE_INT64:
        r->SetInt64(msg, f, f->default_value_int64());
        break;
      case FieldDescriptor::CPPTYPE_UINT32:
        r->SetUInt32(msg, f, f->default_value_uint32());
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        r->SetUInt64(msg, f, f->default_value_uint64());
        break;
      case FieldDescriptor::CPPTYPE_FLOAT:
        r->SetFloat(msg, f, f->default_value_float());
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
        r->SetDouble(msg, f, f->default_value_double());
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        r->SetBool(msg, f, f->default_value_bool());
        break;
      case FieldDescriptor::CPPTYPE_ENUM:
        r->SetEnum(msg, f, f->default_value_enum());
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        r->SetString(msg, f, f->default_value_string());
        break;
      case FieldDescriptor::CPPTYPE_MESSAGE:
        break;  // handled above
    }
  }
}

// ---------------------------------------------------------------------------
// Architecture comparison

std::string field_text(const pb::Message& msg, const FieldDescriptor* f) {
  std::string out;
  if (!f->is_repeated()) {
    TextFormat::PrintFieldValueToString(msg, f, -1, &out);
    return out;
  }
  const int n = msg.GetReflection()->FieldSize(msg, f);
  for (int i = 0; i < n; ++i) {
    std::string item;
    TextFormat::PrintFieldValueToString(msg, f, i, &item);
    absl::StrAppend(&out, i ? ", " : "", item);
  }
  return absl::StrCat("[", out, "]");
}

// The attention settings layer `layer` runs with.
const config::Attention& attention_of_layer(const Experiment& exp, int layer) {
  for (const config::LayerAttention& la : exp.layer_attention()) {
    for (int l : la.layers()) {
      if (l == layer) return la.attention();
    }
  }
  return exp.attention();
}

bool has_layer_override(const Experiment& exp, int layer) {
  return &attention_of_layer(exp, layer) != &exp.attention();
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API

absl::StatusOr<Experiment> parse_config(std::string_view text, std::string_view source) {
  Origins origins;
  absl::StatusOr<Experiment> exp = parse_text(to_absl(text), to_absl(source), &origins);
  if (!exp.ok()) return exp.status();
  fill_defaults(&*exp);
  if (absl::Status s = validate_with(*exp, origins); !s.ok()) return s;
  return exp;
}

absl::StatusOr<Experiment> load_config_file(const std::string& path) {
  absl::StatusOr<std::string> text = read_file(path);
  if (!text.ok()) return text.status();
  return parse_config(*text, path);
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& preset : embedded_presets()) names.emplace_back(preset.first);
  std::sort(names.begin(), names.end());
  return names;
}

absl::StatusOr<Experiment> load_preset(std::string_view name) {
  const std::optional<absl::string_view> text = find_preset(to_absl(name));
  if (!text) return unknown_preset(to_absl(name));
  const std::string source = absl::StrCat("preset:", to_absl(name));
  return parse_config(std::string_view(text->data(), text->size()), source);
}

absl::Status apply_override(Experiment* exp, std::string_view assignment) {
  std::string path;
  return apply_override_at(exp, to_absl(assignment), &path);
}

absl::Status validate_config(const Experiment& exp, std::string_view source) {
  Origins origins;
  origins.source = std::string(source);
  return validate_with(exp, origins);
}

void fill_defaults(Experiment* exp) { fill_defaults_in(exp); }

std::string config_to_text(const Experiment& exp) {
  Experiment full = exp;
  fill_defaults(&full);
  std::string text;
  TextFormat::Printer printer;
  printer.PrintToString(full, &text);
  return text;
}

absl::StatusOr<Experiment> resolve_config(const std::string& config_path,
                                          const std::vector<std::string>& overrides,
                                          const std::string& default_preset,
                                          const ConfigCompleter& complete) {
  // Parse without validating: an override may fix a value the file gets wrong.
  Origins origins;
  absl::StatusOr<Experiment> exp;
  absl::string_view preset = config_path;
  const bool is_preset = config_path.empty() || absl::ConsumePrefix(&preset, "preset:");
  if (config_path.empty()) preset = default_preset;
  if (is_preset) {
    const std::optional<absl::string_view> text = find_preset(preset);
    if (!text) return unknown_preset(preset);
    exp = parse_text(*text, absl::StrCat("preset:", preset), &origins);
  } else {
    absl::StatusOr<std::string> text = read_file(config_path);
    if (!text.ok()) return text.status();
    exp = parse_text(*text, config_path, &origins);
  }
  if (!exp.ok()) return exp.status();

  for (const std::string& assignment : overrides) {
    std::string path;
    if (absl::Status s = apply_override_at(&*exp, assignment, &path); !s.ok()) return s;
    origins.overrides.emplace_back(path, assignment);
  }
  if (complete && is_preset && !exp->model().init_from().empty()) {
    // A preset's model shape is a default, not something the user gave: with
    // a pretrained model the file's shape replaces it, and only what the
    // overrides give is checked against the file.
    config::Model* m = exp->mutable_model();
    const std::string init_from = m->init_from();
    const bool arch_given = m->has_arch();
    const config::Model::Arch arch = m->arch();
    config::Experiment from_overrides;
    for (const std::string& assignment : overrides) {
      std::string path;
      if (absl::Status s = apply_override_at(&from_overrides, assignment, &path); !s.ok()) return s;
    }
    const double init_std = m->init_std();
    const bool init_std_given = m->has_init_std();
    m->Clear();
    m->MergeFrom(from_overrides.model());
    m->set_init_from(init_from);
    if (arch_given && !m->has_arch()) m->set_arch(arch);
    if (init_std_given && !m->has_init_std()) m->set_init_std(init_std);
  }
  if (complete)
    if (absl::Status s = complete(&*exp); !s.ok()) return s;
  fill_defaults(&*exp);
  if (absl::Status s = validate_with(*exp, origins); !s.ok()) return s;
  return exp;
}

absl::Status check_same_architecture(const Experiment& checkpoint, const Experiment& now) {
  Experiment a = checkpoint, b = now;
  fill_defaults(&a);
  fill_defaults(&b);
  std::vector<std::string> diffs;
  const auto compare = [&](const pb::Message& x, const pb::Message& y, const FieldDescriptor* f,
                           const std::string& path) {
    const std::string vx = field_text(x, f), vy = field_text(y, f);
    if (vx != vy) diffs.push_back(absl::StrCat(path, ": checkpoint ", vx, ", config ", vy));
  };

  // Every model field shapes parameters (or their initialisation).
  // (except init_from: where the first weights came from does not matter
  // once a checkpoint holds them).
  const pb::Descriptor* md = config::Model::descriptor();
  for (int i = 0; i < md->field_count(); ++i) {
    if (md->field(i)->name() == "init_from") continue;
    compare(a.model(), b.model(), md->field(i), "model." + md->field(i)->name());
  }
  // shared_qk removes the key projection.
  const FieldDescriptor* shared_qk = config::Attention::descriptor()->FindFieldByName("shared_qk");
  compare(a.attention(), b.attention(), shared_qk, "attention.shared_qk");
  // Per layer, where either side overrides the layer's attention (differences
  // coming only from attention.shared_qk are already listed above).
  const int layers = std::min(a.model().n_layer(), b.model().n_layer());
  for (int l = 0; l < layers; ++l) {
    if (!has_layer_override(a, l) && !has_layer_override(b, l)) continue;
    compare(attention_of_layer(a, l), attention_of_layer(b, l), shared_qk,
            absl::StrCat("layer ", l, " attention.shared_qk"));
  }

  if (diffs.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("the config's architecture differs from the checkpoint's:\n  ",
                   absl::StrJoin(diffs, "\n  ")));
}

}  // namespace sparseflash
