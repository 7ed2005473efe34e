// Tests for configs/: parsing with file:line errors, presets, --set overrides,
// validation, defaults, resolve_config and the architecture check.
#include "configs/config.h"

#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

namespace sparseflash {
namespace {

// ---------------------------------------------------------------------------
// helpers

// Passes when `text` contains every one of `parts`; otherwise says which one
// is missing and prints the whole text.
::testing::AssertionResult Contains(absl::string_view text,
                                    std::initializer_list<absl::string_view> parts) {
  for (absl::string_view part : parts) {
    if (text.find(part) == absl::string_view::npos) {
      return ::testing::AssertionFailure() << "missing \"" << part << "\" in:\n" << text;
    }
  }
  return ::testing::AssertionSuccess();
}

// Passes when `text` contains none of `parts`.
::testing::AssertionResult Lacks(absl::string_view text,
                                 std::initializer_list<absl::string_view> parts) {
  for (absl::string_view part : parts) {
    if (text.find(part) != absl::string_view::npos) {
      return ::testing::AssertionFailure() << "unexpected \"" << part << "\" in:\n" << text;
    }
  }
  return ::testing::AssertionSuccess();
}

// Writes `text` to a fresh file in the test temp dir and returns its path.
std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "sf_config_test_" + name;
  std::ofstream(path) << text;
  return path;
}

// A small valid config; line numbers matter to the tests below.
constexpr const char* kGood =
    "name: \"good\"\n"                           // 1
    "model {\n"                                  // 2
    "  n_layer: 4\n"                             // 3
    "  n_head: 4\n"                              // 4
    "  d_model: 128\n"                           // 5
    "  block_size: 256\n"                        // 6
    "}\n"                                        // 7
    "attention { kind: HASH num_buckets: 4 }\n"  // 8
    "data { seq_len: 128 batch_size: 2 }\n"      // 9
    "optim { lr: 0.01 }\n";                      // 10

Experiment tiny() {
  absl::StatusOr<Experiment> exp = load_preset("tiny_test");
  EXPECT_TRUE(exp.ok()) << exp.status();
  return *exp;
}

bool same(const Experiment& a, const Experiment& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// ---------------------------------------------------------------------------
// presets

TEST(ConfigPresets, AllPresetsParseAndValidate) {
  const std::vector<std::string> names = preset_names();
  for (const char* expected : {"cpu_default", "gpu_default", "gpt2_small_hash8k", "tiny_test"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), expected), names.end()) << expected;
  }
  for (const std::string& name : names) {
    absl::StatusOr<Experiment> exp = load_preset(name);
    ASSERT_TRUE(exp.ok()) << name << ": " << exp.status();
    EXPECT_TRUE(validate_config(*exp, name).ok()) << name;
    EXPECT_EQ(exp->name(), name) << "a preset's name field should be its file name";
  }
}

TEST(ConfigPresets, EmbeddedPresetsMatchFiles) {
  for (const std::string& name : preset_names()) {
    absl::StatusOr<Experiment> embedded = load_preset(name);
    absl::StatusOr<Experiment> file =
        load_config_file(std::string(SF_SOURCE_DIR) + "/configs/presets/" + name + ".txtpb");
    ASSERT_TRUE(embedded.ok() && file.ok()) << name;
    EXPECT_TRUE(same(*embedded, *file)) << name << ": rebuild to re-embed the presets";
  }
}

TEST(ConfigPresets, PresetValues) {
  absl::StatusOr<Experiment> cpu = load_preset("cpu_default");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(cpu->model().n_layer(), 4);
  EXPECT_EQ(cpu->model().d_model(), 128);
  EXPECT_EQ(cpu->attention().kind(), config::Attention::HASH);
  EXPECT_EQ(cpu->attention().num_buckets(), 4);
  EXPECT_EQ(cpu->data().dir(), "data/linux-docs");
  EXPECT_EQ(cpu->train().device(), "cpu");
  EXPECT_EQ(cpu->checkpoint().out_dir(), "runs/cpu_default");

  absl::StatusOr<Experiment> paper = load_preset("gpt2_small_hash8k");
  ASSERT_TRUE(paper.ok());
  EXPECT_EQ(paper->model().n_layer(), 12);
  EXPECT_EQ(paper->model().d_model(), 768);
  EXPECT_EQ(paper->data().seq_len(), 8192);
  EXPECT_TRUE(paper->attention().shared_qk());
  EXPECT_EQ(paper->attention().num_buckets(), 16);
  EXPECT_EQ(paper->attention().lsh_capacity(), 1.0f);
  EXPECT_FALSE(paper->model().bias());
}

TEST(ConfigPresets, UnknownPresetListsKnownNames) {
  absl::StatusOr<Experiment> exp = load_preset("no_such_preset");
  ASSERT_FALSE(exp.ok());
  EXPECT_EQ(exp.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(exp.status().message(), {"no_such_preset", "cpu_default", "tiny_test"}));
}

// ---------------------------------------------------------------------------
// parsing

TEST(ConfigParse, GoodFileFromTempDir) {
  const std::string path = write_temp("good.txtpb", kGood);
  absl::StatusOr<Experiment> exp = load_config_file(path);
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_EQ(exp->name(), "good");
  EXPECT_EQ(exp->model().n_head(), 4);
  EXPECT_EQ(exp->attention().kind(), config::Attention::HASH);
  EXPECT_FLOAT_EQ(exp->optim().lr(), 0.01f);
  // Defaults are filled in.
  EXPECT_TRUE(exp->train().has_device());
  EXPECT_EQ(exp->train().device(), "auto");
  EXPECT_FLOAT_EQ(exp->optim().beta2(), 0.95f);
}

TEST(ConfigParse, RejectsUnknownFieldWithLine) {
  const std::string path = write_temp("unknown.txtpb",
                                      "name: \"x\"\n"
                                      "model {\n"
                                      "  n_heads: 4\n"
                                      "}\n");
  absl::StatusOr<Experiment> exp = load_config_file(path);
  ASSERT_FALSE(exp.ok());
  EXPECT_EQ(exp.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(exp.status().message(), {"unknown.txtpb:3:", "n_heads"}));
}

TEST(ConfigParse, RejectsUnknownTopLevelField) {
  absl::StatusOr<Experiment> exp = parse_config("name: \"x\"\nlearning_rate: 3\n", "cfg");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"cfg:2:", "learning_rate"}));
}

TEST(ConfigParse, MalformedValueReportsLine) {
  absl::StatusOr<Experiment> exp =
      parse_config("model { n_layer: 2 }\noptim {\n  lr: \"abc\"\n}\n", "bad.txtpb");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"bad.txtpb:3:"}));
}

TEST(ConfigParse, SyntaxErrorReportsLineAndColumn) {
  absl::StatusOr<Experiment> exp = parse_config("model {\n  n_layer: 2\n", "open.txtpb");
  ASSERT_FALSE(exp.ok());
  // The missing '}' is noticed at end of input, line 3 column 1.
  EXPECT_TRUE(Contains(exp.status().message(), {"open.txtpb:3:1:"}));

  exp = parse_config("model { n_layer: 2 }\nattention { kind: SPARSE }\n", "enum.txtpb");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"enum.txtpb:2:", "SPARSE"}));
}

TEST(ConfigParse, RejectsRepeatedSingularField) {
  absl::StatusOr<Experiment> exp = parse_config("optim {\n  lr: 1\n  lr: 2\n}\n", "dup");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"dup:3:", "lr"}));
}

TEST(ConfigParse, MissingFileNamesPathAndReason) {
  const std::string path = ::testing::TempDir() + "sf_config_test_does_not_exist.txtpb";
  absl::StatusOr<Experiment> exp = load_config_file(path);
  ASSERT_FALSE(exp.ok());
  EXPECT_EQ(exp.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(exp.status().message(), {path, "No such file"}));
}

TEST(ConfigParse, DirectoryIsNotAConfig) {
  absl::StatusOr<Experiment> exp = load_config_file(::testing::TempDir());
  ASSERT_FALSE(exp.ok());
  EXPECT_EQ(exp.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(exp.status().message(), {"directory"}));
}

// ---------------------------------------------------------------------------
// validation

TEST(ConfigValidate, OutOfRangeNamesFieldValueAndLine) {
  std::string text = kGood;
  text.replace(text.find("n_head: 4"), 9, "n_head: 5");
  absl::StatusOr<Experiment> exp = parse_config(text, "heads.txtpb");
  ASSERT_FALSE(exp.ok());
  EXPECT_EQ(exp.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(exp.status().message(), {"heads.txtpb:4:", "model.n_head = 5", "128"}));
}

TEST(ConfigValidate, ListElementsReportTheirLine) {
  absl::StatusOr<Experiment> exp = parse_config(
      "model { n_layer: 2 }\n"  // 1
      "layer_attention {\n"     // 2
      "  layers: [0]\n"         // 3
      "}\n"                     // 4
      "layer_attention {\n"     // 5
      "  layers: 1\n"           // 6
      "  layers: 5\n"           // 7
      "  attention {\n"         // 8
      "    num_buckets: 7\n"    // 9
      "  }\n"                   // 10
      "}\n",                    // 11
      "la.txtpb");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(),
                       {"la.txtpb:7: field layer_attention[1].layers[1] = 5",
                        "la.txtpb:9: field layer_attention[1].attention.num_buckets = 7"}));
}

TEST(ConfigValidate, DropProbOneRejected) {
  absl::StatusOr<Experiment> exp =
      parse_config("attention {\n  kind: DROP\n  drop_prob: 1.0\n}\n", "drop.txtpb");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(
      Contains(exp.status().message(), {"drop.txtpb:3:", "attention.drop_prob = 1", "[0, 1)"}));
  EXPECT_TRUE(parse_config("attention { kind: DROP drop_prob: 0.99 }", "ok").ok());
}

TEST(ConfigValidate, NanRejected) {
  absl::StatusOr<Experiment> exp = parse_config("optim { lr: nan }\n", "nan.txtpb");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"nan.txtpb:1:", "optim.lr"}));

  Experiment t = tiny();
  t.mutable_optim()->set_beta1(std::nanf(""));
  absl::Status s = validate_config(t, "src");
  EXPECT_TRUE(Contains(s.message(), {"src: ", "optim.beta1 = nan"}));
  t = tiny();
  t.mutable_attention()->set_drop_prob(std::nanf(""));
  EXPECT_TRUE(Contains(validate_config(t, "src").message(), {"attention.drop_prob"}));
}

// Each bad override of a valid config is caught and names its field.
TEST(ConfigValidate, RangeRules) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"model.n_layer=0", "model.n_layer = 0"},
      {"model.n_head=0", "model.n_head = 0"},
      {"model.d_model=0", "model.d_model = 0"},
      {"model.block_size=0", "model.block_size"},
      {"model.vocab_size=-1", "model.vocab_size = -1"},
      {"model.init_std=0", "model.init_std = 0"},
      {"attention.num_buckets=3", "attention.num_buckets = 3"},
      {"attention.num_buckets=0", "attention.num_buckets = 0"},
      {"attention.drop_prob=-0.1", "attention.drop_prob"},
      {"attention.chunk_size=0", "attention.chunk_size = 0"},
      {"attention.lsh_capacity=0.5", "attention.lsh_capacity = 0.5 must be 0 (no cap) or >= 1"},
      {"attention.lsh_capacity=-1", "attention.lsh_capacity = -1"},
      {"attention.lsh_capacity=nan", "attention.lsh_capacity = nan"},
      {"layer_attention=[{layers: [0] attention {num_buckets: 128 lsh_capacity: 1}}]",
       "layer_attention[0].attention.lsh_capacity = 1 needs num_buckets <= 64, got 128"},
      {"layer_attention=[{layers: [0] attention {num_buckets: 5}}]",
       "layer_attention[0].attention.num_buckets = 5"},
      {"layer_attention=[{layers: [0, 2]}]", "layer_attention[0].layers[1] = 2"},
      {"layer_attention=[{layers: [-1]}]", "layer_attention[0].layers[0] = -1"},
      {"layer_attention=[{layers: [1, 1]}]", "listed twice"},
      {"layer_attention=[{layers: [0]}, {layers: [0]}]", "already listed in layer_attention[0]"},
      {"data.dir=", "data.dir"},
      {"data.seq_len=65", "data.seq_len = 65 must be <= model.block_size = 64"},
      {"data.seq_len=0", "data.seq_len = 0"},
      {"data.batch_size=0", "data.batch_size = 0"},
      {"optim.lr=0", "optim.lr = 0"},
      {"optim.lr=inf", "optim.lr = inf"},
      {"optim.beta1=1", "optim.beta1 = 1"},
      {"optim.beta2=-0.5", "optim.beta2"},
      {"optim.eps=0", "optim.eps"},
      {"optim.weight_decay=-1", "optim.weight_decay"},
      {"optim.grad_clip=-1", "optim.grad_clip"},
      {"schedule.warmup_steps=-1", "schedule.warmup_steps"},
      {"schedule.warmup_fraction=1.5", "schedule.warmup_fraction = 1.5"},
      {"schedule.min_lr_ratio=2", "schedule.min_lr_ratio"},
      {"train.max_steps=0", "train.max_steps"},
      {"train.grad_accum=0", "train.grad_accum"},
      {"train.device=gpu", "train.device = \"gpu\""},
      {"train.device=cuda:", "train.device"},
      {"train.device=cuda:x", "train.device"},
      {"train.cpu_threads=-2", "train.cpu_threads"},
      {"checkpoint.out_dir=", "checkpoint.out_dir"},
      {"checkpoint.interval=-1", "checkpoint.interval"},
      {"logging.interval=0", "logging.interval = 0"},
      {"eval.interval=-1", "eval.interval"},
      {"eval.batches=0", "eval.batches"},
      {"eval.sample_tokens=-1", "eval.sample_tokens"},
      {"saap_fit.partitions=0", "saap_fit.partitions = 0 must be >= 1"},
      {"saap_fit.classifier_hidden=0", "saap_fit.classifier_hidden = 0"},
      {"saap_fit.local_window=0", "saap_fit.local_window = 0 must be >= 1"},
      {"saap_fit.sink_tokens=-1", "saap_fit.sink_tokens = -1"},
      {"saap_fit.kmeans_keys=0", "saap_fit.kmeans_keys = 0"},
      {"saap_fit.kmeans_iterations=0", "saap_fit.kmeans_iterations = 0"},
      {"saap_fit.queries_per_window=0", "saap_fit.queries_per_window = 0"},
      {"saap_fit.classifier_steps=0", "saap_fit.classifier_steps = 0"},
      {"saap_fit.budget_windows=0", "saap_fit.budget_windows = 0"},
      {"saap_fit.budget_queries_per_window=0", "saap_fit.budget_queries_per_window = 0"},
      {"saap_fit.windows=-1", "saap_fit.windows = -1"},
      {"saap_fit.key_space=sideways", "saap_fit.key_space = \"sideways\" must be \"pre-rope\" or \"rope\""},
  };
  for (const auto& [assignment, expected] : cases) {
    Experiment exp = tiny();
    ASSERT_TRUE(apply_override(&exp, assignment).ok()) << assignment;
    absl::Status s = validate_config(exp, "tiny");
    EXPECT_FALSE(s.ok()) << assignment;
    EXPECT_TRUE(Contains(s.message(), {expected})) << assignment;
  }
}

TEST(ConfigValidate, AcceptsBoundaryValues) {
  for (const char* assignment :
       {"train.device=cuda:1", "train.device=auto", "train.device=cuda", "data.seq_len=64",
        "attention.drop_prob=0", "schedule.warmup_fraction=1", "schedule.min_lr_ratio=0",
        "optim.grad_clip=0", "eval.interval=0", "layer_attention=[{layers: [0, 1]}]"}) {
    Experiment exp = tiny();
    ASSERT_TRUE(apply_override(&exp, assignment).ok()) << assignment;
    EXPECT_TRUE(validate_config(exp, "tiny").ok())
        << assignment << ": " << validate_config(exp, "tiny");
  }
}

TEST(ConfigValidate, ReportsEveryViolation) {
  Experiment exp = tiny();
  exp.mutable_model()->set_n_layer(0);
  exp.mutable_optim()->set_lr(-1);
  absl::Status s = validate_config(exp, "");
  EXPECT_TRUE(Contains(s.message(), {"model.n_layer = 0", "optim.lr = -1"}));
  EXPECT_TRUE(Lacks(s.message(), {": field"}));  // no source prefix when none given
}

// ---------------------------------------------------------------------------
// overrides

TEST(ConfigOverride, ScalarsOfEveryType) {
  Experiment exp = tiny();
  ASSERT_TRUE(apply_override(&exp, "optim.lr=3e-4").ok());
  ASSERT_TRUE(apply_override(&exp, "model.n_layer=3").ok());
  ASSERT_TRUE(apply_override(&exp, "attention.kind=DROP").ok());
  ASSERT_TRUE(apply_override(&exp, "attention.shared_qk=true").ok());
  ASSERT_TRUE(apply_override(&exp, "train.bf16=false").ok());
  ASSERT_TRUE(apply_override(&exp, "checkpoint.out_dir=runs/x y").ok());
  ASSERT_TRUE(apply_override(&exp, "eval.sample_prompt=\"Hello \\\"world\\\"\"").ok());
  ASSERT_TRUE(apply_override(&exp, "data.seed=18446744073709551615").ok());
  ASSERT_TRUE(apply_override(&exp, "name=run-7").ok());
  EXPECT_FLOAT_EQ(exp.optim().lr(), 3e-4f);
  EXPECT_EQ(exp.model().n_layer(), 3);
  EXPECT_EQ(exp.attention().kind(), config::Attention::DROP);
  EXPECT_TRUE(exp.attention().shared_qk());
  EXPECT_FALSE(exp.train().bf16());
  EXPECT_EQ(exp.checkpoint().out_dir(), "runs/x y");
  EXPECT_EQ(exp.eval().sample_prompt(), "Hello \"world\"");
  EXPECT_EQ(exp.data().seed(), 18446744073709551615ull);
  EXPECT_EQ(exp.name(), "run-7");
  // Untouched neighbours keep their values.
  EXPECT_EQ(exp.model().n_head(), 2);
  EXPECT_EQ(exp.attention().num_buckets(), 4);
}

TEST(ConfigOverride, MessageValueMerges) {
  Experiment exp = tiny();
  ASSERT_TRUE(apply_override(&exp, "model={n_layer: 3 d_model: 64}").ok());
  EXPECT_EQ(exp.model().n_layer(), 3);
  EXPECT_EQ(exp.model().d_model(), 64);
  EXPECT_EQ(exp.model().n_head(), 2);  // merged, not replaced
}

TEST(ConfigOverride, RepeatedFieldsAreReplaced) {
  Experiment exp = tiny();
  ASSERT_TRUE(apply_override(&exp,
                             "layer_attention=[{layers: [0] attention {kind: DENSE}}, "
                             "{layers: [1] attention {kind: HASH num_buckets: 8}}]")
                  .ok());
  ASSERT_EQ(exp.layer_attention_size(), 2);
  EXPECT_EQ(exp.layer_attention(0).attention().kind(), config::Attention::DENSE);
  EXPECT_EQ(exp.layer_attention(1).attention().num_buckets(), 8);

  // A single message value also replaces the whole list.
  ASSERT_TRUE(apply_override(&exp, "layer_attention={layers: [1]}").ok());
  ASSERT_EQ(exp.layer_attention_size(), 1);
  EXPECT_EQ(exp.layer_attention(0).layers(0), 1);

  // Scalar lists: a [list] or a single value; indexing into message lists.
  ASSERT_TRUE(apply_override(&exp, "layer_attention[0].layers=[0, 1]").ok());
  EXPECT_EQ(exp.layer_attention(0).layers_size(), 2);
  ASSERT_TRUE(apply_override(&exp, "layer_attention[0].layers=1").ok());
  ASSERT_EQ(exp.layer_attention(0).layers_size(), 1);
  EXPECT_EQ(exp.layer_attention(0).layers(0), 1);
  ASSERT_TRUE(apply_override(&exp, "layer_attention[0].attention.kind=DROP").ok());
  EXPECT_EQ(exp.layer_attention(0).attention().kind(), config::Attention::DROP);

  ASSERT_TRUE(apply_override(&exp, "layer_attention=[]").ok());
  EXPECT_EQ(exp.layer_attention_size(), 0);
}

TEST(ConfigOverride, RejectsBadPaths) {
  Experiment exp = tiny();
  absl::Status s = apply_override(&exp, "optim.lrr=1");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(
      Contains(s.message(), {"--set optim.lrr=1", "sparseflash.config.Optimizer has no field 'lrr'",
                             "fields: lr, beta1, beta2"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "optim.lr").message(), {"optim.lr", "path=value"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "modle.n_layer=2").message(),
                       {"modle", "sparseflash.config.Experiment"}));
  EXPECT_TRUE(
      Contains(apply_override(&exp, "optim.lr.x=1").message(), {"optim.lr", "not a message"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "optim..lr=1").message(), {"empty component"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "=1").message(), {"empty field path"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "layer_attention.layers=1").message(),
                       {"layer_attention[0].layers"}));
  EXPECT_TRUE(
      Contains(apply_override(&exp, "layer_attention[3].layers=1").message(), {"out of range"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "model[0].n_layer=1").message(), {"not a list"}));
  // Nothing was changed by the failed overrides.
  EXPECT_TRUE(same(exp, tiny()));
}

TEST(ConfigOverride, RejectsBadValues) {
  Experiment exp = tiny();
  absl::Status s = apply_override(&exp, "optim.lr=abc");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), {"--set optim.lr=abc", "optim.lr", "double"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "attention.kind=SPARSE").message(),
                       {"attention.kind", "DENSE, HASH, DROP"}));
  EXPECT_TRUE(
      Contains(apply_override(&exp, "model.n_layer=2.5").message(), {"model.n_layer", "int32"}));
  EXPECT_TRUE(
      Contains(apply_override(&exp, "model.n_layer=99999999999").message(), {"model.n_layer"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "train.bf16=maybe").message(), {"train.bf16", "bool"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "model.n_layer=").message(), {"model.n_layer"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "model={n_lay: 2}").message(),
                       {"n_lay", "sparseflash.config.Model"}));
  EXPECT_TRUE(Contains(apply_override(&exp, "model=3").message(), {"message"}));
  // One assignment sets one field: trailing text is not smuggled in.
  EXPECT_TRUE(
      Contains(apply_override(&exp, "optim.lr=1 beta1: 0.5").message(), {"unexpected text"}));
  EXPECT_TRUE(same(exp, tiny()));
}

// ---------------------------------------------------------------------------
// defaults and text form

TEST(ConfigText, FillDefaultsShowsEveryField) {
  Experiment exp;
  exp.add_layer_attention()->add_layers(0);
  const std::string text = config_to_text(exp);
  for (const char* field :
       {"num_buckets: 16", "warmup_fraction: 0.02", "device: \"auto\"", "kind: DENSE",
        "sample_prompt: \"The kernel \"", "resume: true", "bias: false", "rotation_seed: 1234"}) {
    EXPECT_TRUE(Contains(text, {field}));
  }
  // The layer_attention element got its own full Attention.
  fill_defaults(&exp);
  EXPECT_TRUE(exp.layer_attention(0).has_attention());
  EXPECT_TRUE(exp.layer_attention(0).attention().has_chunk_size());
  EXPECT_TRUE(exp.has_eval() && exp.eval().has_sample_tokens());
}

TEST(ConfigText, FillDefaultsKeepsSetValues) {
  Experiment exp;
  exp.mutable_model()->set_n_layer(9);
  fill_defaults(&exp);
  EXPECT_EQ(exp.model().n_layer(), 9);
  EXPECT_EQ(exp.model().n_head(), 6);
}

TEST(ConfigText, RoundTrips) {
  for (const std::string& name : preset_names()) {
    absl::StatusOr<Experiment> exp = load_preset(name);
    ASSERT_TRUE(exp.ok());
    absl::StatusOr<Experiment> again = parse_config(config_to_text(*exp), "text");
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(same(*exp, *again)) << name;
  }
}

// ---------------------------------------------------------------------------
// architecture check

TEST(ConfigArch, ReportsEachDifference) {
  Experiment ckpt = tiny(), now = tiny();
  EXPECT_TRUE(check_same_architecture(ckpt, now).ok());
  now.mutable_optim()->set_lr(0.5);  // not architectural
  now.mutable_train()->set_max_steps(7);
  now.mutable_attention()->set_num_buckets(8);
  EXPECT_TRUE(check_same_architecture(ckpt, now).ok());

  ckpt.mutable_model()->set_n_layer(6);
  now.mutable_model()->set_n_layer(4);
  now.mutable_model()->set_bias(true);
  now.mutable_attention()->set_shared_qk(true);
  absl::Status s = check_same_architecture(ckpt, now);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(s.message(), {"model.n_layer: checkpoint 6, config 4",
                                     "model.bias: checkpoint false, config true",
                                     "attention.shared_qk: checkpoint false, config true"}));
  EXPECT_TRUE(Lacks(s.message(), {"model.n_head"}));
}

TEST(ConfigArch, ComparesEffectiveSharedQkPerLayer) {
  Experiment ckpt = tiny(), now = tiny();
  ASSERT_TRUE(
      apply_override(&now, "layer_attention=[{layers: [1] attention {shared_qk: true}}]").ok());
  absl::Status s = check_same_architecture(ckpt, now);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(
      Contains(s.message(), {"layer 1 attention.shared_qk: checkpoint false, config true"}));
  EXPECT_TRUE(Lacks(s.message(), {"layer 0"}));

  // Same effective value reached differently is fine.
  ASSERT_TRUE(apply_override(&ckpt,
                             "layer_attention=[{layers: [1] attention {shared_qk: true "
                             "kind: DENSE}}]")
                  .ok());
  EXPECT_TRUE(check_same_architecture(ckpt, now).ok()) << check_same_architecture(ckpt, now);
}

// ---------------------------------------------------------------------------
// resolve_config

TEST(ConfigResolve, FileThenOverridesInOrder) {
  const std::string path = write_temp("resolve.txtpb", kGood);
  absl::StatusOr<Experiment> exp =
      resolve_config(path, {"optim.lr=0.02", "model.n_layer=2", "optim.lr=0.03"}, "tiny_test");
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_EQ(exp->name(), "good");  // the file, not the default preset
  EXPECT_FLOAT_EQ(exp->optim().lr(), 0.03f);
  EXPECT_EQ(exp->model().n_layer(), 2);
  EXPECT_EQ(exp->model().d_model(), 128);
  EXPECT_TRUE(exp->train().has_device());  // defaults filled
}

TEST(ConfigResolve, PresetsByNameAndDefault) {
  absl::StatusOr<Experiment> exp = resolve_config("preset:cpu_default", {}, "tiny_test");
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_EQ(exp->name(), "cpu_default");

  exp = resolve_config("", {"train.max_steps=3"}, "tiny_test");
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_EQ(exp->name(), "tiny_test");
  EXPECT_EQ(exp->train().max_steps(), 3);

  exp = resolve_config("preset:nope", {}, "tiny_test");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"nope", "gpu_default"}));

  exp = resolve_config("/no/such/dir/x.txtpb", {}, "tiny_test");
  ASSERT_FALSE(exp.ok());
  EXPECT_EQ(exp.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(exp.status().message(), {"/no/such/dir/x.txtpb"}));
}

// saap fit's section: its defaults are the fit's (the flags' help repeats
// them), and a file that holds only that section resolves on a preset.
TEST(ConfigSaapFit, DefaultsAndAFileWithOnlyTheSection) {
  config::SaapFit d;
  EXPECT_EQ(d.partitions(), 256);
  EXPECT_EQ(d.classifier_hidden(), 256);
  EXPECT_EQ(d.local_window(), 64);
  EXPECT_EQ(d.sink_tokens(), 4);
  EXPECT_EQ(d.kmeans_keys(), 65536);
  EXPECT_EQ(d.kmeans_iterations(), 25);
  EXPECT_EQ(d.queries_per_window(), 1024);
  EXPECT_EQ(d.classifier_steps(), 2000);
  EXPECT_TRUE(d.weight_by_mass());
  EXPECT_TRUE(d.count_prior());
  EXPECT_EQ(d.recency_bands(), "auto");
  EXPECT_EQ(d.budget_grid(), "0,0.005,0.01,0.02,0.035,0.05,0.075,0.1,0.15,0.2,0.3,0.45,0.7,1");
  EXPECT_EQ(d.budget_windows(), 4);
  EXPECT_EQ(d.budget_queries_per_window(), 256);
  EXPECT_EQ(d.windows(), 0);
  EXPECT_EQ(d.key_space(), "pre-rope");

  const std::string path = write_temp("saap.txtpb", "saap_fit {\n  partitions: 1024\n  local_window: 0\n}\n");
  absl::StatusOr<Experiment> exp = resolve_config(path, {}, "cpu_default");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"saap.txtpb:3: field saap_fit.local_window = 0"}))
      << exp.status();
  exp = resolve_config(path, {"saap_fit.local_window=128", "saap_fit.recency_bands=none"},
                       "cpu_default");
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_EQ(exp->saap_fit().partitions(), 1024);
  EXPECT_EQ(exp->saap_fit().local_window(), 128);
  EXPECT_EQ(exp->saap_fit().recency_bands(), "none");
  EXPECT_EQ(exp->saap_fit().classifier_steps(), 2000);
}

TEST(ConfigResolve, OverrideCanFixTheFile) {
  std::string text = kGood;
  text.replace(text.find("n_head: 4"), 9, "n_head: 5");
  const std::string path = write_temp("fixable.txtpb", text);
  EXPECT_FALSE(resolve_config(path, {}, "tiny_test").ok());
  EXPECT_TRUE(resolve_config(path, {"model.n_head=8"}, "tiny_test").ok());
}

TEST(ConfigResolve, ErrorsSayWhereTheValueCameFrom) {
  const std::string path = write_temp("origin.txtpb", kGood);
  // From the file: file and line (data.seq_len is on line 9).
  absl::StatusOr<Experiment> exp = resolve_config(path, {"model.block_size=100"}, "tiny_test");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(),
                       {"origin.txtpb:9: field data.seq_len = 128", "model.block_size = 100"}));
  // From an override: the --set argument.
  exp = resolve_config(path, {"model.n_head=5"}, "tiny_test");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(
      Contains(exp.status().message(), {"model.n_head = 5", "(from --set model.n_head=5)"}));
  EXPECT_TRUE(Lacks(exp.status().message(), {"origin.txtpb:4"}));
  exp = resolve_config(path, {"layer_attention=[{layers: [7]}]"}, "tiny_test");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"layer_attention[0].layers[0] = 7",
                                                "(from --set layer_attention=[{layers: [7]}])"}));
  // A bad override path fails before validation.
  exp = resolve_config(path, {"optim.lrr=1"}, "tiny_test");
  ASSERT_FALSE(exp.ok());
  EXPECT_TRUE(Contains(exp.status().message(), {"optim.lrr"}));
}

}  // namespace
}  // namespace sparseflash
