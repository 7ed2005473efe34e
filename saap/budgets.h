// Per-head key budgets.
//
// Query heads differ a lot in how much attention leaves the local window and
// the sinks, and in how widely it spreads: one head loses nothing with no
// routed keys at all, another needs a third of them. A uniform key budget
// (every head selects the same fraction of its routable keys) spends keys on
// the first and starves the second. Here the fit measures, per query head
// and for a grid of budgets, the routed attention the classifier's selection
// loses on held-out calibration queries (budget curves, stored in the
// index), and inference splits a mean budget over the heads of all layers so
// that the total lost attention is smallest (a multiple-choice knapsack,
// solved greedily by lost attention saved per key).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "saap/targets.h"

namespace sparseflash::saap {

using at::Tensor;

// What a head's budget curve measures, and the allocation minimises.
enum class BudgetObjective {
  kLostAttention,  // the routed attention outside the selection (budget.lost_mass)
  // The squared error of the head's attention output against dense
  // attention, the selection renormalised (budget.output_error): unlike the
  // lost attention it sees whether the dropped keys' values differ from
  // those kept.
  kOutputError,
};
const char* objective_name(BudgetObjective objective);

// The default grid of the fit: fractions of a query's routable keys.
const std::vector<double>& default_budget_grid();

// InvalidArgument, prefixed with `what`, unless the grid is non-empty and
// ascends strictly within [0, 1] (a user's --budget-grid; the tensor functions
// below throw std::invalid_argument with this message, as LibTorch's ops do).
absl::Status check_budget_grid(const std::vector<double>& grid, const std::string& what);

struct BudgetCurves {
  // float32 [H, G], CPU. lost_mass[h][g]: mean over queries of the routed
  // attention (absolute, as a share of the query's whole attention) outside
  // the partitions selected at budget grid[g]. keys[h][g]: mean over queries
  // of the selected keys / routable keys (at least grid[g], since the
  // partition that crosses the budget is taken whole).
  Tensor lost_mass, keys;
};

// density [H, n, C]: the score partitions are taken in, largest first
// (attention per key); mass [H, n, C]: routed attention per partition (the
// fit's targets); counts [H, n, C]: routable keys per partition. A budget g
// takes partitions in decreasing density while the keys taken before are
// fewer than g * (routable keys), as SaapAttentionHook does. grid ascending
// in [0, 1]. Computed in float32 on the inputs' device, in chunks of queries.
BudgetCurves measure_budget_curves(const Tensor& density, const Tensor& mass,
                                   const Tensor& counts, const std::vector<double>& grid);

// Sums over one layer's sampled queries of the output error at each budget:
// q [Hq, nq, d] and k, v [Hkv, T, d] as attention sees them (RoPE'd q, k),
// keys at positions 0..T-1, query i at q_pos[i] (int64 [nq]); partition int64
// [Hkv, T]; density [Hq, nq, C] the selection order (as in
// measure_budget_curves); options: window, sinks, scale. Returns float32
// [Hq, G] (on q's device): sum over queries of |o_g - o|^2, o the dense
// causal attention output and o_g the output over the sinks, the window and
// the partitions selected at grid[g] (keys in partitions the query can route).
Tensor budget_output_errors(const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& partition, const Tensor& q_pos, const Tensor& density,
                            const std::vector<double>& grid, const MassOptions& options);

// lost_mass, keys [H, G] (the curves of every head to share the budget,
// e.g. all layers' heads stacked). Returns the grid index chosen per head
// (int64 [H]) so that the mean over heads of keys[h][choice] is at most
// mean_budget and the summed lost_mass is small: every head starts at grid
// index 0, then the step (any head to any larger index) with the most lost
// attention saved per key that still fits is taken until none fits or saves.
// Throws std::invalid_argument on shapes or a budget outside [0, 1].
Tensor allocate_head_budgets(const Tensor& lost_mass, const Tensor& keys, double mean_budget);

}  // namespace sparseflash::saap
