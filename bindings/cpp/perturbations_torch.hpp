// perturbations_torch.hpp: perturbed ops inside libtorch C++ models (header-only, C++17).
//
//   pert::Op op = pert::Op::builtin(config, pert::Builtin::Argmax, {5});
//   torch::Tensor y = pert::autograd::perturbed(op, theta);           // [batch, 5], differentiable
//   torch::Tensor loss = pert::autograd::fenchel_young(op, theta, y_true).mean();
//   loss.backward();                                                  // theta.grad() is set
//
// Each call runs one forward of the op on a CPU float32 copy of theta (the op's device
// does the sampling). The autograd graph keeps that forward's tape (shared ownership) and
// backward calls the tape's VJP: no dense Jacobian is ever made, and no solver is called
// again. Without grad mode, or when theta does not require grad, no tape is made at all.
// The returned tensors live on theta's device, in float32.
#ifndef PERTURBATIONS_TORCH_HPP
#define PERTURBATIONS_TORCH_HPP

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

#include "perturbations.hpp"

namespace pert {
namespace autograd {

namespace detail {
inline ::torch::Tensor host(const ::torch::Tensor& t) { return t.detach().to(::torch::kCPU, ::torch::kFloat).contiguous(); }

inline ::torch::Tensor from(std::vector<float> values, std::vector<int64_t> shape, const ::torch::Tensor& like) {
  auto* kept = new std::vector<float>(std::move(values));
  auto t = ::torch::from_blob(
      kept->data(), shape, [kept](void*) { delete kept; }, ::torch::TensorOptions().dtype(::torch::kFloat));
  return t.to(like.device());
}

inline View view(const ::torch::Tensor& host_float) {
  return View(host_float.data_ptr<float>(), static_cast<std::size_t>(host_float.numel()));
}

/// A tensor that owns a tape: the autograd context saves it for backward, and the tape is
/// freed when the graph releases it (after backward, or with the graph; its byte is never read).
inline ::torch::Tensor keep(Tape tape) {
  auto* owned = new Tape(std::move(tape));
  return ::torch::from_blob(
      owned, {1}, [owned](void*) { delete owned; }, ::torch::TensorOptions().dtype(::torch::kUInt8));
}

inline const Tape& kept(const ::torch::Tensor& holder) {
  return *static_cast<const Tape*>(holder.storage().data_ptr().get());
}

inline std::vector<int64_t> with_batch(int64_t batch, std::vector<int64_t> shape) {
  shape.insert(shape.begin(), batch);
  return shape;
}

/// The gradients of a backward that has no derivative of its own: as they are, when no
/// graph is being made of the backward; under create_graph, as outputs of a node that
/// fails with a clear error when a second derivative (double backward, a gradient
/// penalty) is taken through them, instead of a silently wrong one (as PyTorch's
/// once_differentiable). The node also takes the function's `inputs`, so that it lies on
/// every path from the gradients back to them.
inline ::torch::autograd::variable_list once_differentiable(::torch::autograd::variable_list grads,
                                                            const ::torch::autograd::variable_list& inputs,
                                                            const char* function) {
  if (!::torch::GradMode::is_enabled()) return grads;
  auto count = grads.size();
  ::torch::autograd::variable_list args = std::move(grads);
  args.insert(args.end(), inputs.begin(), inputs.end());
  auto error = std::make_shared<::torch::autograd::DelayedError>(
      std::string("pert::autograd::") + function +
          " is differentiable once: a second derivative (double backward, a gradient penalty) through it is not computed",
      static_cast<int64_t>(args.size()));
  auto out = error->apply(std::move(args));
  out.resize(count);
  return out;
}

/// y_sigma(theta), its tape kept for backward: J^T g from the same draws.
struct Perturbed : public ::torch::autograd::Function<Perturbed> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor theta, Op* op,
                                 std::vector<int64_t> output_shape) {
    auto t = host(theta);
    auto batch = static_cast<std::size_t>(t.size(0));
    auto result = op->forward_with_tape(view(t), batch);
    // a saved variable: the graph releases it once backward has run
    ctx->save_for_backward({keep(std::move(result.tape))});
    // for once_differentiable only (not a saved variable: no version check, so theta may
    // change in place before backward, as before)
    ctx->saved_data["theta"] = theta;
    ctx->saved_data["input_shape"] = theta.sizes().vec();
    return from(std::move(result.output), with_batch(static_cast<int64_t>(batch), output_shape), theta);
  }

  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    auto holder = ctx->get_saved_variables()[0];
    const Tape& tape = kept(holder);
    auto input_shape = ctx->saved_data["input_shape"].toIntVector();
    auto g = host(grad[0]);
    return once_differentiable({from(tape.vjp(view(g)), input_shape, grad[0]), ::torch::Tensor(), ::torch::Tensor()},
                               {ctx->saved_data["theta"].toTensor()}, "perturbed");
  }
};

/// The Fenchel-Young loss per problem, with its gradients saved for backward: with respect
/// to theta, y_sigma(theta) - y_true (maximization) or its negation; with respect to
/// y_true, -theta (maximization) or +theta (minimization).
struct FenchelYoung : public ::torch::autograd::Function<FenchelYoung> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor theta, ::torch::Tensor y_true, Op* op) {
    auto t = host(theta), y = host(y_true);
    auto batch = static_cast<std::size_t>(t.size(0));
    auto result = op->fenchel_young(view(t), view(y), batch);
    ctx->save_for_backward({from(std::move(result.second), theta.sizes().vec(), theta), theta.detach()});
    ctx->saved_data["theta"] = theta;  // (for once_differentiable only, as in Perturbed)
    ctx->saved_data["y_true"] = y_true;
    ctx->saved_data["sign"] = op->sense() == Sense::Maximize ? -1.0 : 1.0;
    ctx->saved_data["y_shape"] = y_true.sizes().vec();
    ctx->saved_data["y_device"] = y_true.device();
    return from(std::move(result.first), {static_cast<int64_t>(batch)}, theta);
  }

  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    auto saved = ctx->get_saved_variables();
    auto g_theta = saved[0], theta = saved[1];
    std::vector<int64_t> shape(static_cast<std::size_t>(g_theta.dim()), 1);
    shape[0] = g_theta.size(0);
    auto per_problem = grad[0].reshape(shape);
    ::torch::Tensor g_y;
    if (ctx->needs_input_grad(1))
      g_y = (theta.to(g_theta.dtype()) * per_problem * ctx->saved_data["sign"].toDouble())
                .reshape(ctx->saved_data["y_shape"].toIntVector())
                .to(ctx->saved_data["y_device"].toDevice());
    return once_differentiable({g_theta * per_problem, g_y, ::torch::Tensor()},
                               {ctx->saved_data["theta"].toTensor(), ctx->saved_data["y_true"].toTensor()},
                               "fenchel_young");
  }
};
}  // namespace detail

/// y_sigma(theta) for theta [batch, *input_shape]; differentiable once. The result has shape
/// [batch, *output_shape] (default: theta's shape when the op's output and input have the
/// same size, else [batch, output_numel]).
inline ::torch::Tensor perturbed(Op& op, const ::torch::Tensor& theta, std::vector<int64_t> output_shape = {}) {
  if (output_shape.empty()) {
    if (op.output_numel() == op.input_numel()) {
      auto s = theta.sizes().vec();
      output_shape.assign(s.begin() + 1, s.end());
    } else {
      output_shape = {static_cast<int64_t>(op.output_numel())};
    }
  }
  if (!::torch::GradMode::is_enabled() || !theta.requires_grad()) {
    // no gradient can be asked: a forward call without a tape
    auto t = detail::host(theta);
    auto batch = t.size(0);
    return detail::from(op.forward(detail::view(t), static_cast<std::size_t>(batch)),
                        detail::with_batch(batch, output_shape), theta);
  }
  return detail::Perturbed::apply(theta, &op, output_shape);
}

/// The Fenchel-Young loss [batch] of theta against y_true (same shape); differentiable
/// once with respect to theta and y_true (a second derivative through it fails with an
/// error, as through perturbed).
inline ::torch::Tensor fenchel_young(Op& op, const ::torch::Tensor& theta, const ::torch::Tensor& y_true) {
  return detail::FenchelYoung::apply(theta, y_true, &op);
}

}  // namespace autograd
}  // namespace pert

#endif  // PERTURBATIONS_TORCH_HPP
