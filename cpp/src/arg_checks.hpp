// Argument checks of the budget and selection operations, shared with the operation that runs both
// (capacities_select.cpp). Each raises mixkv::Error naming the argument.
#pragma once

#include "mixkv/budget.hpp"
#include "mixkv/tensor.hpp"

namespace mixkv::detail {

void check_capacity_args(const BudgetOptions& options, const Tensor& importance, const Tensor& valid_lengths,
                         const Tensor& head_scores, const Tensor& out);
void check_select_args(const Tensor& scores, const Tensor& capacities, const Tensor& positions,
                       const Tensor& counts);

}  // namespace mixkv::detail
