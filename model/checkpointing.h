// Activation checkpointing (train.activation_checkpointing): a block's
// forward keeps only its inputs; its backward runs the block again with
// autograd on and backpropagates through that second run. Peak activation
// memory falls from every block's intermediates to one block's plus the
// blocks' inputs, for about one more forward pass of compute.
//
// The second run must compute what the first did: it runs under the same
// autocast state, and with the model's attention generator set back to its
// state before the first run, so hash rotations and drop masks repeat
// exactly; afterwards the generator is put back where the forward pass left
// it, so a run's random stream is the same with checkpointing and without.
#pragma once

#include <functional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace sparseflash::model {

using at::Tensor;

// The block: inputs -> outputs. Parameters it uses get their gradients
// accumulated as without checkpointing.
using BlockFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& inputs)>;

// fn(inputs) without keeping fn's intermediates for the backward. Inputs may
// be undefined (passed to fn as they are, and given no gradient); every
// output must be defined. `generator` is the one fn draws from (it is
// restored for the recomputation).
std::vector<Tensor> checkpointed(const BlockFn& fn, const std::vector<Tensor>& inputs,
                                 at::Generator& generator);

}  // namespace sparseflash::model
