// Per-head key budgets. See budgets.h.
#include "saap/budgets.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include <ATen/ATen.h>

#include "absl/strings/str_format.h"

namespace sparseflash::saap {

const std::vector<double>& default_budget_grid() {
  static const std::vector<double> grid = {0,    0.005, 0.01, 0.02, 0.035, 0.05, 0.075,
                                           0.1,  0.15,  0.2,  0.3,  0.45,  0.7,  1.0};
  return grid;
}

BudgetCurves measure_budget_curves(const Tensor& density, const Tensor& mass,
                                   const Tensor& counts, const std::vector<double>& grid) {
  if (density.dim() != 3 || mass.sizes() != density.sizes() || counts.sizes() != density.sizes())
    throw std::invalid_argument(absl::StrFormat(
        "measure_budget_curves: density, mass and counts must be [H, n, C] of one shape, got "
        "%s, %s and %s",
        c10::str(density.sizes()), c10::str(mass.sizes()), c10::str(counts.sizes())));
  if (grid.empty()) throw std::invalid_argument("measure_budget_curves: the grid is empty");
  for (size_t i = 0; i < grid.size(); ++i)
    if (!(grid[i] >= 0 && grid[i] <= 1) || (i > 0 && !(grid[i] > grid[i - 1])))
      throw std::invalid_argument(absl::StrFormat(
          "measure_budget_curves: the grid must ascend strictly within [0, 1], got %g at %d",
          grid[i], i));
  const int64_t H = density.size(0), n = density.size(1), G = static_cast<int64_t>(grid.size());
  auto f32 = density.options().dtype(at::kFloat);
  Tensor lost = at::zeros({H, G}, f32.dtype(at::kDouble));
  Tensor keys = at::zeros({H, G}, f32.dtype(at::kDouble));
  const int64_t chunk = 512;
  for (int64_t at = 0; at < n; at += chunk) {
    const int64_t len = std::min(chunk, n - at);
    Tensor order = std::get<1>(density.narrow(1, at, len).to(at::kFloat).sort(-1, true));
    Tensor c = counts.narrow(1, at, len).to(at::kFloat).gather(-1, order);
    Tensor m = mass.narrow(1, at, len).to(at::kFloat).gather(-1, order);
    Tensor before = c.cumsum(-1) - c;
    Tensor total = c.sum(-1, /*keepdim=*/true);
    Tensor routed = m.sum(-1);
    Tensor inv_total = at::where(total > 0, total.reciprocal(), at::zeros_like(total)).squeeze(-1);
    for (int64_t g = 0; g < G; ++g) {
      Tensor take = before.lt(total * grid[g]).to(at::kFloat);
      Tensor selected_mass = (m * take).sum(-1);
      Tensor selected_keys = (c * take).sum(-1);
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
