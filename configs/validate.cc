// Validation of experiment configs: every range and consistency check, all
// violations reported at once, each with its origin (configs/origins.h).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "configs/config.h"
#include "configs/origins.h"

namespace sparseflash::config_internal {

namespace {

// Collects every violation (not just the first), each with its origin.
class Checker {
 public:
  explicit Checker(const Origins& origins) : origins_(origins) {}

  void fail(const std::string& path, const std::string& value, const std::string& what) {
    errors_.push_back(
        origins_.describe(path, absl::StrCat("field ", path, " = ", value, " ", what)));
  }

  void at_least(const std::string& path, int64_t v, int64_t lo) {
    if (v < lo) fail(path, absl::StrCat(v), absl::StrCat("must be >= ", lo));
  }

  // Float checks: the negated comparisons also reject NaN.
  bool finite(const std::string& path, float v) {
    if (std::isfinite(v)) return true;
    fail(path, absl::StrCat(v), "must be a finite number");
    return false;
  }
  void positive(const std::string& path, float v) {
    if (finite(path, v) && !(v > 0)) fail(path, absl::StrCat(v), "must be > 0");
  }
  void non_negative(const std::string& path, float v) {
    if (finite(path, v) && !(v >= 0)) fail(path, absl::StrCat(v), "must be >= 0");
  }
  // v in [lo, hi) or [lo, hi].
  void in_range(const std::string& path, float v, float lo, float hi, bool hi_inclusive) {
    if (!finite(path, v)) return;
    const bool ok = v >= lo && (hi_inclusive ? v <= hi : v < hi);
    if (!ok) {
      fail(path, absl::StrCat(v),
           absl::StrCat("must be in [", lo, ", ", hi, hi_inclusive ? "]" : ")"));
    }
  }

  absl::Status status() const {
    if (errors_.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrJoin(errors_, "\n"));
  }

 private:
  const Origins& origins_;
  std::vector<std::string> errors_;
};

void check_attention(Checker& c, const config::Attention& a, const std::string& prefix) {
  const int nb = a.num_buckets();
  if (nb < 2 || nb % 2 != 0) {
    c.fail(prefix + ".num_buckets", absl::StrCat(nb), "must be even and >= 2");
  }
  c.in_range(prefix + ".drop_prob", a.drop_prob(), 0.f, 1.f, /*hi_inclusive=*/false);
  c.at_least(prefix + ".chunk_size", a.chunk_size(), 1);
  c.at_least(prefix + ".lsh_center_block", a.lsh_center_block(), 1);
  c.at_least(prefix + ".group_size", a.group_size(), 0);
  c.at_least(prefix + ".sink_tokens", a.sink_tokens(), 0);
  c.at_least(prefix + ".local_window", a.local_window(), 0);
  if (a.lsh_capacity() != 0 && !(a.lsh_capacity() >= 1)) {
    c.fail(prefix + ".lsh_capacity", absl::StrCat(a.lsh_capacity()), "must be 0 (no cap) or >= 1");
  } else if (a.lsh_capacity() != 0 && nb > 64) {
    c.fail(prefix + ".lsh_capacity", absl::StrCat(a.lsh_capacity()),
           absl::StrCat("needs num_buckets <= 64, got ", nb));
  }
}

bool valid_device(const std::string& d) {
  if (d == "auto" || d == "cpu" || d == "cuda") return true;
  absl::string_view rest = d;
  int index;
  return absl::ConsumePrefix(&rest, "cuda:") && !rest.empty() &&
         std::all_of(rest.begin(), rest.end(), absl::ascii_isdigit) &&
         absl::SimpleAtoi(rest, &index);
}

std::string quoted(const std::string& s) { return absl::StrCat("\"", absl::CEscape(s), "\""); }

}  // namespace

absl::Status validate_with(const Experiment& exp, const Origins& origins) {
  Checker c(origins);

  const config::Model& m = exp.model();
  const bool llama = m.arch() == config::Model::LLAMA;
  c.at_least("model.n_layer", m.n_layer(), 1);
  c.at_least("model.n_head", m.n_head(), 1);
  c.at_least("model.d_model", m.d_model(), 1);
  if (m.n_head() >= 1 && m.d_model() >= 1 && m.d_model() % m.n_head() != 0 &&
      !(llama && m.head_dim() > 0)) {
    c.fail("model.n_head", absl::StrCat(m.n_head()),
           absl::StrCat("must divide model.d_model = ", m.d_model()));
  }
  c.at_least("model.block_size", m.block_size(), 1);
  c.at_least("model.vocab_size", m.vocab_size(), 0);
  c.positive("model.init_std", m.init_std());
  if (llama) {
    c.at_least("model.n_kv_head", m.n_kv_head(), 0);
    const int kv = m.n_kv_head() > 0 ? m.n_kv_head() : m.n_head();
    if (m.n_head() >= 1 && kv >= 1 && m.n_head() % kv != 0)
      c.fail("model.n_kv_head", absl::StrCat(m.n_kv_head()),
             absl::StrCat("must divide model.n_head = ", m.n_head()));
    c.at_least("model.head_dim", m.head_dim(), 0);
    const int hd = m.head_dim() > 0 ? m.head_dim() : (m.n_head() > 0 ? m.d_model() / m.n_head() : 0);
    if (hd % 2 != 0)
      c.fail("model.head_dim", absl::StrCat(hd), "must be even (rotary embeddings)");
    c.at_least("model.d_ff", m.d_ff(), 0);
    c.positive("model.rope_theta", m.rope_theta());
    c.non_negative("model.norm_eps", m.norm_eps());
    if (m.bias()) c.fail("model.bias", "true", "must be false for model.arch = LLAMA");
    const std::string& type = m.rope_scaling().type();
    if (!type.empty() && type != "default" && type != "linear" && type != "llama3" &&
        type != "dynamic" && type != "yarn")
      c.fail("model.rope_scaling.type", quoted(type),
             "must be \"\", \"default\", \"linear\", \"dynamic\", \"yarn\" or \"llama3\"");
    if (type == "yarn" || type == "dynamic" || type == "llama3")
      c.positive("model.rope_scaling.original_max_position_embeddings",
                 m.rope_scaling().original_max_position_embeddings());
    if (!type.empty() && type != "default") c.positive("model.rope_scaling.factor", m.rope_scaling().factor());
    if (m.rope_freq_factors_size() != 0 && m.rope_freq_factors_size() != hd / 2)
      c.fail("model.rope_freq_factors", absl::StrCat(m.rope_freq_factors_size(), " values"),
             absl::StrCat("must hold head_dim / 2 = ", hd / 2, " values (or none)"));
    auto no_shared_qk = [&](const config::Attention& a, const std::string& path) {
      if (a.shared_qk())
        c.fail(path, "true", "is not available for model.arch = LLAMA (its keys have their own projection)");
    };
    no_shared_qk(exp.attention(), "attention.shared_qk");
    for (int i = 0; i < exp.layer_attention_size(); ++i)
      no_shared_qk(exp.layer_attention(i).attention(),
                   absl::StrCat("layer_attention[", i, "].attention.shared_qk"));
  }
  if (exp.optim().state_dtype() == config::Optimizer::BFLOAT16 && exp.distributed().zero1())
    c.fail("optim.state_dtype", "BFLOAT16", "is not available with distributed.zero1 (its shards "
           "keep float32 moments)");
  if (m.has_lora()) {
    c.at_least("model.lora.rank", m.lora().rank(), 0);
    if (m.lora().rank() > 0) c.positive("model.lora.alpha", m.lora().alpha());
  }

  check_attention(c, exp.attention(), "attention");
  std::map<int, int> owner;  // layer -> index of the layer_attention entry listing it
  for (int i = 0; i < exp.layer_attention_size(); ++i) {
    const config::LayerAttention& la = exp.layer_attention(i);
    const std::string prefix = absl::StrCat("layer_attention[", i, "]");
    check_attention(c, la.attention(), prefix + ".attention");
    for (int j = 0; j < la.layers_size(); ++j) {
      const int layer = la.layers(j);
      const std::string path = absl::StrCat(prefix, ".layers[", j, "]");
      if (layer < 0 || layer >= m.n_layer()) {
        c.fail(path, absl::StrCat(layer),
               absl::StrCat("must be in [0, model.n_layer = ", m.n_layer(), ")"));
      } else if (auto [it, inserted] = owner.emplace(layer, i); !inserted) {
        c.fail(path, absl::StrCat(layer),
               it->second == i
                   ? absl::StrCat("is listed twice in ", prefix)
                   : absl::StrCat("is already listed in layer_attention[", it->second, "]"));
      }
    }
  }

  const config::Data& d = exp.data();
  if (d.dir().empty()) c.fail("data.dir", "\"\"", "must not be empty");
  c.at_least("data.seq_len", d.seq_len(), 1);
  if (d.seq_len() > m.block_size()) {
    c.fail("data.seq_len", absl::StrCat(d.seq_len()),
           absl::StrCat("must be <= model.block_size = ", m.block_size()));
  }
  c.at_least("data.batch_size", d.batch_size(), 1);

  const config::Optimizer& o = exp.optim();
  c.positive("optim.lr", o.lr());
  c.in_range("optim.beta1", o.beta1(), 0.f, 1.f, false);
  c.in_range("optim.beta2", o.beta2(), 0.f, 1.f, false);
  c.positive("optim.eps", o.eps());
  c.non_negative("optim.weight_decay", o.weight_decay());
  c.non_negative("optim.grad_clip", o.grad_clip());

  const config::Schedule& s = exp.schedule();
  c.at_least("schedule.warmup_steps", s.warmup_steps(), 0);
  c.in_range("schedule.warmup_fraction", s.warmup_fraction(), 0.f, 1.f, true);
  c.in_range("schedule.min_lr_ratio", s.min_lr_ratio(), 0.f, 1.f, true);

  const config::Train& t = exp.train();
  c.at_least("train.max_steps", t.max_steps(), 1);
  c.at_least("train.grad_accum", t.grad_accum(), 1);
  if (!valid_device(t.device())) {
    c.fail("train.device", quoted(t.device()), "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"");
  }
  c.at_least("train.cpu_threads", t.cpu_threads(), 0);

  if (exp.checkpoint().out_dir().empty()) c.fail("checkpoint.out_dir", "\"\"", "must not be empty");
  c.at_least("checkpoint.interval", exp.checkpoint().interval(), 0);
  c.at_least("logging.interval", exp.logging().interval(), 1);
  c.at_least("eval.interval", exp.eval().interval(), 0);
  c.at_least("eval.batches", exp.eval().batches(), 1);
  c.at_least("eval.sample_tokens", exp.eval().sample_tokens(), 0);
  c.positive("distributed.bucket_mb", exp.distributed().bucket_mb());
  c.at_least("distributed.timeout_s", exp.distributed().timeout_s(), 1);

  // (recency_bands and budget_grid are parsed, and checked, by saap fit itself.)
  const config::SaapFit& f = exp.saap_fit();
  c.at_least("saap_fit.partitions", f.partitions(), 1);
  c.at_least("saap_fit.classifier_hidden", f.classifier_hidden(), 1);
  c.at_least("saap_fit.local_window", f.local_window(), 1);
  c.at_least("saap_fit.sink_tokens", f.sink_tokens(), 0);
  c.at_least("saap_fit.kmeans_keys", f.kmeans_keys(), 1);
  c.at_least("saap_fit.kmeans_iterations", f.kmeans_iterations(), 1);
  c.at_least("saap_fit.queries_per_window", f.queries_per_window(), 1);
  c.at_least("saap_fit.classifier_steps", f.classifier_steps(), 1);
  c.at_least("saap_fit.budget_windows", f.budget_windows(), 1);
  c.at_least("saap_fit.budget_queries_per_window", f.budget_queries_per_window(), 1);
  c.at_least("saap_fit.windows", f.windows(), 0);
  if (f.key_space() != "pre-rope" && f.key_space() != "rope")
    c.fail("saap_fit.key_space", quoted(f.key_space()), "must be \"pre-rope\" or \"rope\"");
  return c.status();
}

}  // namespace sparseflash::config_internal
