// perturbations_torch.hpp: perturbed ops inside libtorch C++ models (header-only, C++17).
//
//   pert::Op op = pert::Op::builtin(config, pert::Builtin::Argmax, {5});
//   torch::Tensor y = pert::torch::perturbed(op, theta);            // [batch, 5], differentiable
//   torch::Tensor loss = pert::torch::fenchel_young(op, theta, y_true).mean();
//   loss.backward();                                               // theta.grad() is set
//
// Each call runs one forward of the op on a CPU float32 copy of theta (the op's device
// does the sampling); backward uses what that forward kept, without solver calls. The
// returned tensors live on theta's device.
#ifndef PERTURBATIONS_TORCH_HPP
#define PERTURBATIONS_TORCH_HPP

#include <torch/autograd.h>

#include <vector>

#include "perturbations.hpp"

namespace pert {
namespace torch {

namespace detail {
inline ::torch::Tensor host(const ::torch::Tensor& t) { return t.detach().to(::torch::kCPU, ::torch::kFloat).contiguous(); }

inline ::torch::Tensor from(const std::vector<float>& values, std::vector<int64_t> shape, const ::torch::Tensor& like) {
  return ::torch::tensor(values, ::torch::kFloat).reshape(shape).to(like.device());
}

/// y_sigma(theta) with the Jacobian J of the same draws saved for backward: Jᵀg.
struct Perturbed : public ::torch::autograd::Function<Perturbed> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor theta, Op* op,
                                 std::vector<int64_t> output_shape) {
    auto t = host(theta);
    auto batch = static_cast<std::size_t>(t.size(0));
    auto result = op->forward_with_tape(View(t.data_ptr<float>(), static_cast<std::size_t>(t.numel())), batch);
    auto d = static_cast<int64_t>(op->input_numel()), o = static_cast<int64_t>(op->output_numel());
    auto jacobian = from(result.tape.jacobian(), {static_cast<int64_t>(batch), o, d}, theta);
    ctx->save_for_backward({jacobian});
    ctx->saved_data["input_shape"] = theta.sizes().vec();
    output_shape.insert(output_shape.begin(), static_cast<int64_t>(batch));
    return from(result.output, output_shape, theta);
  }

  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    auto jacobian = ctx->get_saved_variables()[0];
    auto g = grad[0].reshape({jacobian.size(0), 1, jacobian.size(1)}).to(jacobian.dtype());
    auto input_shape = ctx->saved_data["input_shape"].toIntVector();
    return {::torch::bmm(g, jacobian).reshape(input_shape), ::torch::Tensor(), ::torch::Tensor()};
  }
};

/// The Fenchel-Young loss per problem, with its gradient saved for backward.
struct FenchelYoung : public ::torch::autograd::Function<FenchelYoung> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor theta, ::torch::Tensor y_true, Op* op) {
    auto t = host(theta), y = host(y_true);
    auto batch = static_cast<std::size_t>(t.size(0));
    auto n = static_cast<std::size_t>(t.numel());
    auto result = op->fenchel_young(View(t.data_ptr<float>(), n), View(y.data_ptr<float>(), n), batch);
    ctx->save_for_backward({from(result.second, theta.sizes().vec(), theta)});
    return from(result.first, {static_cast<int64_t>(batch)}, theta);
  }

  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    auto g = ctx->get_saved_variables()[0];
    std::vector<int64_t> shape(static_cast<std::size_t>(g.dim()), 1);
    shape[0] = g.size(0);
    return {g * grad[0].reshape(shape), ::torch::Tensor(), ::torch::Tensor()};
  }
};
}  // namespace detail

/// y_sigma(theta) for theta [batch, *input_shape]; differentiable. The result has shape
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
  return detail::Perturbed::apply(theta, &op, output_shape);
}

/// The Fenchel-Young loss [batch] of theta against y_true (same shape); differentiable
/// with respect to theta.
inline ::torch::Tensor fenchel_young(Op& op, const ::torch::Tensor& theta, const ::torch::Tensor& y_true) {
  return detail::FenchelYoung::apply(theta, y_true, &op);
}

}  // namespace torch
}  // namespace pert

#endif  // PERTURBATIONS_TORCH_HPP
