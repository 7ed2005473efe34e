// Per-head key budgets. See budgets.h.
#include "saap/budgets.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include <ATen/ATen.h>

#include "absl/strings/str_format.h"
#include "io/errors.h"

namespace sparseflash::saap {

const std::vector<double>& default_budget_grid() {
  static const std::vector<double> grid = {0,    0.005, 0.01, 0.02, 0.035, 0.05, 0.075,
                                           0.1,  0.15,  0.2,  0.3,  0.45,  0.7,  1.0};
  return grid;
}

const char* objective_name(BudgetObjective objective) {
  return objective == BudgetObjective::kOutputError ? "output" : "attention";
}

absl::Status check_budget_grid(const std::vector<double>& grid, const std::string& what) {
  if (grid.empty())
    return absl::InvalidArgumentError(absl::StrFormat("%s: the budget grid is empty", what));
  for (size_t i = 0; i < grid.size(); ++i)
    if (!(grid[i] >= 0 && grid[i] <= 1) || (i > 0 && !(grid[i] > grid[i - 1])))
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: the budget grid must ascend strictly within [0, 1], got %g at position %d", what,
          grid[i], i));
  return absl::OkStatus();
}

namespace {

// The key-budget selection order of some queries: partitions by descending
// density, their routable keys in that order, the keys taken before each and
// the total. Budget g takes the partitions with before < g * total.
struct BudgetOrder {
  Tensor order, keys, before, total;
};

BudgetOrder budget_order(const Tensor& density, const Tensor& counts) {
  BudgetOrder o;
  o.order = std::get<1>(density.to(at::kFloat).sort(-1, /*descending=*/true));
  o.keys = counts.to(at::kFloat).gather(-1, o.order);
  o.before = o.keys.cumsum(-1) - o.keys;
  o.total = o.keys.sum(-1, /*keepdim=*/true);
  return o;
}

// In sorted order: whether each partition is taken at budget g.
Tensor taken_sorted(const BudgetOrder& o, double g) { return o.before.lt(o.total * g); }

}  // namespace

Tensor budget_output_errors(const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& partition, const Tensor& q_pos, const Tensor& density,
                            const std::vector<double>& grid, const MassOptions& options) {
  io::check_argument(check_budget_grid(grid, "budget_output_errors"));
  if (q.dim() != 3 || k.dim() != 3 || v.sizes() != k.sizes() || q.size(2) != k.size(2) ||
      k.size(0) < 1 || q.size(0) % k.size(0) != 0)
    throw std::invalid_argument(absl::StrFormat(
        "budget_output_errors: q must be [Hq, nq, d] and k, v [Hkv, T, d] with Hkv dividing "
        "Hq, got %s, %s and %s",
        c10::str(q.sizes()), c10::str(k.sizes()), c10::str(v.sizes())));
  const int64_t hq = q.size(0), nq = q.size(1), d = q.size(2), hkv = k.size(0), T = k.size(1);
  const int64_t group = hq / hkv, G = static_cast<int64_t>(grid.size());
  if (partition.sizes() != at::IntArrayRef({hkv, T}) || q_pos.dim() != 1 || q_pos.size(0) != nq ||
      density.dim() != 3 || density.size(0) != hq || density.size(1) != nq)
    throw std::invalid_argument(absl::StrFormat(
        "budget_output_errors: partition must be [%d, %d], q_pos [%d] and density [%d, %d, C], "
        "got %s, %s and %s",
        hkv, T, nq, hq, nq, c10::str(partition.sizes()), c10::str(q_pos.sizes()),
        c10::str(density.sizes())));
  const int64_t C = density.size(2);
  const double scale = options.scale > 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
  const auto device = q.device();
  Tensor keys = k.to(device, at::kFloat);
  Tensor values = v.to(device, at::kFloat).repeat_interleave(group, 0);  // [Hq, T, d]
  Tensor part = partition.to(device, at::kLong).repeat_interleave(group, 0);  // [Hq, T]
  Tensor positions = q_pos.to(device, at::kLong);
  Tensor key_index = at::arange(T, positions.options());
  Tensor errors = at::zeros({hq, G}, q.options().dtype(at::kFloat));
  const int64_t chunk = 64;
  for (int64_t at = 0; at < nq; at += chunk) {
    const int64_t m = std::min(chunk, nq - at);
    Tensor pos = positions.narrow(0, at, m);
    Tensor qc = q.narrow(1, at, m).to(at::kFloat).reshape({hkv, group * m, d});
    Tensor scores = at::bmm(qc, keys.transpose(1, 2)).mul_(scale).reshape({hq, m, T});
    Tensor causal = key_index.view({1, T}) <= pos.view({m, 1});  // [m, T]
    scores.masked_fill_(causal.logical_not().unsqueeze(0), -std::numeric_limits<float>::infinity());
    Tensor p = at::softmax(scores, -1);  // [Hq, m, T]
    Tensor dense = at::bmm(p, values);   // [Hq, m, d]
    Tensor routed = (key_index.view({1, T}) >= options.sink_tokens) &
                    (key_index.view({1, T}) <= pos.view({m, 1}) - options.local_window);
    Tensor fixed = (causal & routed.logical_not()).to(at::kFloat).unsqueeze(0);  // [1, m, T]
    Tensor p_routed = p * routed.to(at::kFloat).unsqueeze(0);
    Tensor p_fixed = p * fixed;
    Tensor o_fixed = at::bmm(p_fixed, values);
    Tensor m_fixed = p_fixed.sum(-1, /*keepdim=*/true);
    // Selection order and keys per partition for these queries.
    Tensor counts = routable_key_counts(partition.to(device, at::kLong), C, pos,
                                        options.local_window, options.sink_tokens)
                        .repeat_interleave(group, 0);  // [Hq, m, C]
    const BudgetOrder o = budget_order(density.narrow(1, at, m).to(device), counts);
    Tensor key_part = part.unsqueeze(1).expand({hq, m, T});
    for (int64_t g = 0; g < G; ++g) {
      // Taken partitions back in partition order, then per key.
      Tensor sel = at::zeros(o.order.sizes(), o.order.options().dtype(at::kBool))
                       .scatter_(-1, o.order, taken_sorted(o, grid[g]))
                       .gather(-1, key_part)
                       .to(at::kFloat);
      Tensor w = p_routed * sel;
      Tensor out = (o_fixed + at::bmm(w, values)) / (m_fixed + w.sum(-1, /*keepdim=*/true));
      errors.select(1, g).add_((out - dense).pow(2).sum(-1).sum(1));
    }
  }
  return errors;
}

BudgetCurves measure_budget_curves(const Tensor& density, const Tensor& mass,
                                   const Tensor& counts, const std::vector<double>& grid) {
  if (density.dim() != 3 || mass.sizes() != density.sizes() || counts.sizes() != density.sizes())
    throw std::invalid_argument(absl::StrFormat(
        "measure_budget_curves: density, mass and counts must be [H, n, C] of one shape, got "
        "%s, %s and %s",
        c10::str(density.sizes()), c10::str(mass.sizes()), c10::str(counts.sizes())));
  io::check_argument(check_budget_grid(grid, "measure_budget_curves"));
  const int64_t H = density.size(0), n = density.size(1), G = static_cast<int64_t>(grid.size());
  auto f32 = density.options().dtype(at::kFloat);
  Tensor lost = at::zeros({H, G}, f32.dtype(at::kDouble));
  Tensor keys = at::zeros({H, G}, f32.dtype(at::kDouble));
  const int64_t chunk = 512;
  for (int64_t at = 0; at < n; at += chunk) {
    const int64_t len = std::min(chunk, n - at);
    const BudgetOrder o = budget_order(density.narrow(1, at, len), counts.narrow(1, at, len));
    Tensor m = mass.narrow(1, at, len).to(at::kFloat).gather(-1, o.order);
    Tensor routed = m.sum(-1);
    Tensor inv_total =
        at::where(o.total > 0, o.total.reciprocal(), at::zeros_like(o.total)).squeeze(-1);
    for (int64_t g = 0; g < G; ++g) {
      Tensor take = taken_sorted(o, grid[g]).to(at::kFloat);
      Tensor selected_mass = (m * take).sum(-1);
      Tensor selected_keys = (o.keys * take).sum(-1);
      lost.select(1, g).add_((routed - selected_mass).clamp_min(0).sum(1).to(at::kDouble));
      keys.select(1, g).add_((selected_keys * inv_total).sum(1).to(at::kDouble));
    }
  }
  const double inv_n = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  return {(lost * inv_n).to(at::kCPU, at::kFloat), (keys * inv_n).to(at::kCPU, at::kFloat)};
}

Tensor allocate_head_budgets(const Tensor& lost_mass, const Tensor& keys, double mean_budget) {
  if (lost_mass.dim() != 2 || keys.sizes() != lost_mass.sizes() || lost_mass.size(1) < 1)
    throw std::invalid_argument(absl::StrFormat(
        "allocate_head_budgets: lost_mass and keys must be [H, G] of one shape, got %s and %s",
        c10::str(lost_mass.sizes()), c10::str(keys.sizes())));
  if (!(mean_budget >= 0 && mean_budget <= 1))
    throw std::invalid_argument(absl::StrFormat(
        "allocate_head_budgets: the mean budget must be in [0, 1], got %g", mean_budget));
  const int64_t H = lost_mass.size(0), G = lost_mass.size(1);
  Tensor lc = lost_mass.to(at::kCPU, at::kDouble).contiguous();
  Tensor kc = keys.to(at::kCPU, at::kDouble).contiguous();
  const double* lost = lc.data_ptr<double>();
  const double* key = kc.data_ptr<double>();
  std::vector<int64_t> choice(H, 0);
  double spent = 0;
  for (int64_t h = 0; h < H; ++h) spent += key[h * G];
  const double limit = mean_budget * static_cast<double>(H) + 1e-9;
  for (;;) {
    int64_t best_h = -1, best_j = -1;
    double best_ratio = 0;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t c = choice[h];
      for (int64_t j = c + 1; j < G; ++j) {
        const double dk = key[h * G + j] - key[h * G + c];
        const double saved = lost[h * G + c] - lost[h * G + j];
        if (saved <= 0 || spent + std::max(dk, 0.0) > limit) continue;
        // A step that saves attention without costing keys goes first.
        const double ratio = dk > 0 ? saved / dk : std::numeric_limits<double>::infinity();
        if (ratio > best_ratio) {
          best_ratio = ratio;
          best_h = h;
          best_j = j;
        }
      }
    }
    if (best_h < 0) break;
    spent += key[best_h * G + best_j] - key[best_h * G + choice[best_h]];
    choice[best_h] = best_j;
  }
  return at::tensor(choice, at::TensorOptions().dtype(at::kLong));
}

}  // namespace sparseflash::saap
