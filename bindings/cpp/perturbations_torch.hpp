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
// The returned tensors live on theta's device, in float32. A NaN or infinite incoming
// gradient gives NaN in the gradients of the problems it reaches, with no exception.
#ifndef PERTURBATIONS_TORCH_HPP
#define PERTURBATIONS_TORCH_HPP

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "perturbations.hpp"

namespace pert {
namespace autograd {

namespace detail {
// theta's (or a gradient's) values on the host. A CUDA tensor is first checked as the
// library checks a call (pert_cuda_check_thread: no CUDA graph capture on the current
// stream, no other library's context current), so that a refused call fails here with the
// library's status rather than in the copy.
inline ::torch::Tensor host(const ::torch::Tensor& t) {
  if (t.is_cuda()) pert::cuda_check_thread(t.device().index());
  return t.detach().to(::torch::kCPU, ::torch::kFloat).contiguous();
}

inline ::torch::Tensor from(std::vector<float> values, std::vector<int64_t> shape, const ::torch::Tensor& like) {
  int64_t count = 1;
  for (int64_t s : shape) count *= s;
  if (count != static_cast<int64_t>(values.size()))
    throw pert::detail::error(PERT_STATUS_PANIC, "internal error (please report it): " + std::to_string(values.size()) +
                                                     " values for a tensor of " + std::to_string(count));
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

/// INVALID_ARGUMENT unless `t` holds `like`'s problems: the same leading (batch)
/// dimension and as many values (a problem's values may be shaped otherwise, [batch, 12]
/// against [batch, 3, 4]; a single problem may come without its batch dimension). The
/// library's buffers are flat: a transposed target of the same size would be read in the
/// wrong order.
inline void same_shape(const ::torch::Tensor& t, const ::torch::Tensor& like, const char* name, const char* like_name) {
  bool batch_first = t.dim() >= 1 && like.dim() >= 1 && t.size(0) == like.size(0);
  bool single = like.dim() >= 1 && like.size(0) == 1;
  if (t.numel() != like.numel() || !(batch_first || single))
    throw pert::detail::error(PERT_STATUS_INVALID_ARGUMENT, std::string(name) + " must have " + like_name +
                                                                "'s shape " + ::c10::str(like.sizes()) +
                                                                " (its batch first, as many values), got " +
                                                                ::c10::str(t.sizes()));
}

inline std::vector<int64_t> with_batch(int64_t batch, std::vector<int64_t> shape) {
  shape.insert(shape.begin(), batch);
  return shape;
}

/// The gradients of a backward that has no derivative of its own: as they are, when no
/// graph is being made of the backward; under create_graph, as outputs of a node that
/// fails with a clear error when a second derivative (double backward, a gradient
/// penalty) is taken through them, instead of a silently wrong one (as PyTorch's
/// once_differentiable). The node also takes `inputs` (the function's, and the incoming
/// gradients that the library's products were computed from, off the graph), so that it
/// lies on every path from the gradients back to them: to theta, and to whatever the
/// incoming gradient depends on.
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

/// vjp(g, cleaned) as PyTorch gives a gradient from a non-finite incoming one (an overflow
/// under mixed precision): the problems whose g holds NaN or an infinity get NaN, with no
/// exception; the others their own gradient, from the call on g with those problems' rows
/// zeroed (cleaned true: AI-MLE then leaves its state as it was). g: the host float32 copy
/// of the incoming gradient, [batch, ...].
template <class Vjp>
std::vector<float> tolerant_vjp(const ::torch::Tensor& g, Vjp&& vjp) {
  if (g.dim() == 0 || g.numel() == 0) return vjp(g, false);
  auto rows = g.reshape({g.size(0), -1});
  auto finite = ::torch::isfinite(rows).all(1);
  if (finite.all().item<bool>()) return vjp(g, false);
  auto clean = ::torch::where(finite.unsqueeze(1), rows, ::torch::zeros_like(rows)).reshape(g.sizes()).contiguous();
  std::vector<float> out = vjp(clean, true);
  auto ok = finite.accessor<bool, 1>();
  auto per = static_cast<std::ptrdiff_t>(out.size() / static_cast<std::size_t>(g.size(0)));
  for (int64_t b = 0; b < g.size(0); b++)
    if (!ok[b]) std::fill(out.begin() + b * per, out.begin() + (b + 1) * per, std::numeric_limits<float>::quiet_NaN());
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
    auto values = tolerant_vjp(host(grad[0]), [&](const ::torch::Tensor& g, bool) { return tape.vjp(view(g)); });
    return once_differentiable({from(std::move(values), input_shape, grad[0]), ::torch::Tensor(), ::torch::Tensor()},
                               {ctx->saved_data["theta"].toTensor(), grad[0]}, "perturbed");
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

/// A loss per problem whose gradient with respect to its first input (the predicted
/// costs) the library gives with the loss: SPO+ and the perturbation gradient.
inline ::torch::autograd::variable_list loss_backward(::torch::autograd::AutogradContext* ctx,
                                                      ::torch::autograd::variable_list grad, std::size_t inputs,
                                                      const char* function) {
  auto g_pred = ctx->get_saved_variables()[0];
  std::vector<int64_t> shape(static_cast<std::size_t>(g_pred.dim()), 1);
  shape[0] = g_pred.size(0);
  ::torch::autograd::variable_list out(inputs);
  out[0] = g_pred * grad[0].to(g_pred.device()).reshape(shape);
  return once_differentiable(std::move(out), {ctx->saved_data["pred_cost"].toTensor()}, function);
}

/// The SPO+ loss per problem (pert_spo_plus), its gradient saved for backward.
struct SpoPlus : public ::torch::autograd::Function<SpoPlus> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor pred_cost,
                                 ::torch::Tensor true_cost, ::torch::Tensor true_sol, ::torch::Tensor true_obj, Op* op) {
    auto p = host(pred_cost), c = host(true_cost), w = host(true_sol), z = host(true_obj);
    auto batch = static_cast<std::size_t>(p.size(0));
    auto result = op->spo_plus(view(p), view(c), view(w), view(z), batch);
    ctx->save_for_backward({from(std::move(result.second), pred_cost.sizes().vec(), pred_cost)});
    ctx->saved_data["pred_cost"] = pred_cost;  // (for once_differentiable only)
    return from(std::move(result.first), {static_cast<int64_t>(batch)}, pred_cost);
  }
  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    return loss_backward(ctx, std::move(grad), 5, "spo_plus");
  }
};

/// The perturbation-gradient loss per problem (pert_perturbation_gradient).
struct PerturbationGradient : public ::torch::autograd::Function<PerturbationGradient> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor pred_cost,
                                 ::torch::Tensor true_cost, Op* op, double sigma, bool two_sided) {
    auto p = host(pred_cost), c = host(true_cost);
    auto batch = static_cast<std::size_t>(p.size(0));
    auto result = op->perturbation_gradient(view(p), view(c), batch, sigma, two_sided);
    ctx->save_for_backward({from(std::move(result.second), pred_cost.sizes().vec(), pred_cost)});
    ctx->saved_data["pred_cost"] = pred_cost;
    return from(std::move(result.first), {static_cast<int64_t>(batch)}, pred_cost);
  }
  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    return loss_backward(ctx, std::move(grad), 5, "perturbation_gradient");
  }
};

/// A loss over the op's pool (nce, cmap, ltr_*), its gradient saved for backward.
struct PoolLossLayer : public ::torch::autograd::Function<PoolLossLayer> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor pred_cost,
                                 ::torch::Tensor target, Op* op, int64_t kind) {
    auto p = host(pred_cost), t = host(target);
    auto batch = static_cast<std::size_t>(p.size(0));
    std::pair<std::vector<float>, std::vector<float>> result;
    switch (kind) {
      case 0: result = op->nce(view(p), view(t), batch); break;
      case 1: result = op->cmap(view(p), view(t), batch); break;
      case 2: result = op->ltr_pointwise(view(p), view(t), batch); break;
      case 3: result = op->ltr_pairwise(view(p), view(t), batch); break;
      default: result = op->ltr_listwise(view(p), view(t), batch); break;
    }
    ctx->save_for_backward({from(std::move(result.second), pred_cost.sizes().vec(), pred_cost)});
    ctx->saved_data["pred_cost"] = pred_cost;
    return from(std::move(result.first), {static_cast<int64_t>(batch)}, pred_cost);
  }
  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    return loss_backward(ctx, std::move(grad), 4, "a pool loss");
  }
};

/// y*(theta) forward; backward by DBB (lambda > 0) or NID (lambda = 0).
struct SolveLayer : public ::torch::autograd::Function<SolveLayer> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor theta, Op* op, double lambda) {
    auto t = host(theta);
    auto batch = static_cast<std::size_t>(t.size(0));
    auto y = from(op->solve(view(t), batch), theta.sizes().vec(), t).to(theta.device());
    // theta's host copy and the output, as saved variables (an output kept in saved_data
    // would hold its own node: a reference cycle, never freed); the graph releases them
    // after backward, and an in-place change of the output before backward is caught
    ctx->save_for_backward({t, y});
    ctx->saved_data["theta"] = theta;  // (for once_differentiable only, as in Perturbed)
    ctx->saved_data["op"] = static_cast<int64_t>(reinterpret_cast<std::intptr_t>(op));
    ctx->saved_data["lambda"] = lambda;
    return y;
  }
  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    auto* op = reinterpret_cast<Op*>(static_cast<std::intptr_t>(ctx->saved_data["op"].toInt()));
    auto saved = ctx->get_saved_variables();
    auto t = saved[0], y = host(saved[1]);
    auto batch = static_cast<std::size_t>(t.size(0));
    double lambda = ctx->saved_data["lambda"].toDouble();
    auto theta = ctx->saved_data["theta"].toTensor();
    // (the op's own sense, in the library: the wrapper's copy may not know a sense set
    // through the raw config handle)
    auto values = tolerant_vjp(host(grad[0]), [&](const ::torch::Tensor& g, bool) {
      return lambda > 0 ? op->blackbox_vjp(view(t), view(y), view(g), batch, lambda)
                        : op->negative_identity_vjp(view(g), batch);
    });
    return once_differentiable({from(std::move(values), theta.sizes().vec(), grad[0]), ::torch::Tensor(), ::torch::Tensor()},
                               {theta, grad[0]}, lambda > 0 ? "blackbox" : "negative_identity");
  }
};

/// y_sigma(theta) by I-MLE's forward, its record kept for backward (I-MLE with lambda > 0,
/// else AI-MLE with the state at `state`).
struct ImleLayer : public ::torch::autograd::Function<ImleLayer> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, ::torch::Tensor theta, Op* op, double lambda,
                                 bool two_sided, pert_aimle_state* state) {
    auto t = host(theta);
    auto batch = static_cast<std::size_t>(t.size(0));
    auto result = op->imle_forward(view(t), batch);
    auto* record = new Imle(std::move(result.second));
    // the record rides on a saved variable (freed with the graph, as a tape)
    ctx->save_for_backward({::torch::from_blob(
        record, {1}, [record](void*) { delete record; }, ::torch::TensorOptions().dtype(::torch::kUInt8))});
    ctx->saved_data["theta"] = theta;  // (for once_differentiable only)
    ctx->saved_data["op"] = static_cast<int64_t>(reinterpret_cast<std::intptr_t>(op));
    ctx->saved_data["state"] = static_cast<int64_t>(reinterpret_cast<std::intptr_t>(state));
    ctx->saved_data["lambda"] = lambda;
    ctx->saved_data["two_sided"] = two_sided;
    return from(std::move(result.first), theta.sizes().vec(), theta);
  }
  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grad) {
    auto holder = ctx->get_saved_variables()[0];
    const Imle& record = *static_cast<const Imle*>(holder.storage().data_ptr().get());
    auto* op = reinterpret_cast<Op*>(static_cast<std::intptr_t>(ctx->saved_data["op"].toInt()));
    auto* state = reinterpret_cast<pert_aimle_state*>(static_cast<std::intptr_t>(ctx->saved_data["state"].toInt()));
    bool two_sided = ctx->saved_data["two_sided"].toBool();
    auto values = tolerant_vjp(host(grad[0]), [&](const ::torch::Tensor& g, bool cleaned) {
      if (!state) return op->imle_vjp(record, view(g), ctx->saved_data["lambda"].toDouble(), two_sided);
      if (!cleaned) return op->aimle_vjp(record, view(g), *state, two_sided);
      pert_aimle_state copy = *state;  // (a non-finite incoming gradient: the state is left as it was)
      return op->aimle_vjp(record, view(g), copy, two_sided);
    });
    auto theta = ctx->saved_data["theta"].toTensor();
    return once_differentiable({from(std::move(values), theta.sizes().vec(), grad[0]), ::torch::Tensor(),
                                ::torch::Tensor(), ::torch::Tensor(), ::torch::Tensor()},
                               {theta, grad[0]}, state ? "aimle" : "imle");
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
  } else {
    // (checked before the forward: its solves and its place in the op's draws are not spent)
    int64_t count = 1, want = static_cast<int64_t>(op.output_numel());
    bool positive = true;
    for (int64_t s : output_shape) {
      positive = positive && s >= 1 && s <= want / count;  // (no product beyond want: no overflow)
      count = positive ? count * s : count;
    }
    if (!positive || count != static_cast<int64_t>(op.output_numel()))
      throw pert::detail::error(PERT_STATUS_INVALID_ARGUMENT,
                                "output_shape " + ::c10::str(output_shape) + " must hold the op's output_numel = " +
                                    std::to_string(op.output_numel()) + " values, each dimension >= 1");
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

/// The Fenchel-Young loss [batch] of theta against y_true (the same problems: its batch first and as many values, refused otherwise); differentiable
/// once with respect to theta and y_true (a second derivative through it fails with an
/// error, as through perturbed).
inline ::torch::Tensor fenchel_young(Op& op, const ::torch::Tensor& theta, const ::torch::Tensor& y_true) {
  detail::same_shape(y_true, theta, "y_true", "theta");
  return detail::FenchelYoung::apply(theta, y_true, &op);
}


/// The SPO+ loss [batch] of pred_cost [batch, *input_shape] against true_cost and true_sol
/// (the same problems: batch first, as many values) and true_obj ([batch] or [batch, 1]); differentiable once in pred_cost
/// (pert_spo_plus: one solve per problem at 2 pred_cost - true_cost). The op's output
/// shape must equal its input shape.
inline ::torch::Tensor spo_plus(Op& op, const ::torch::Tensor& pred_cost, const ::torch::Tensor& true_cost,
                                const ::torch::Tensor& true_sol, const ::torch::Tensor& true_obj) {
  detail::same_shape(true_cost, pred_cost, "true_cost", "pred_cost");
  detail::same_shape(true_sol, pred_cost, "true_sol", "pred_cost");
  return detail::SpoPlus::apply(pred_cost, true_cost, true_sol, true_obj, &op);
}

/// The losses [batch] over the op's solution pool of pred_cost [batch, *input_shape]
/// against the true solutions (nce, cmap) or the true costs (ltr_*), the same problems (batch first, as many values);
/// differentiable once in pred_cost (pert_nce, pert_cmap, pert_ltr_pointwise,
/// pert_ltr_pairwise, pert_ltr_listwise: PyEPO's NCE, CMAP, ptLTR, prLTR, lsLTR).
inline ::torch::Tensor nce(Op& op, const ::torch::Tensor& pred_cost, const ::torch::Tensor& true_sol) {
  detail::same_shape(true_sol, pred_cost, "true_sol", "pred_cost");
  return detail::PoolLossLayer::apply(pred_cost, true_sol, &op, 0);
}
inline ::torch::Tensor cmap(Op& op, const ::torch::Tensor& pred_cost, const ::torch::Tensor& true_sol) {
  detail::same_shape(true_sol, pred_cost, "true_sol", "pred_cost");
  return detail::PoolLossLayer::apply(pred_cost, true_sol, &op, 1);
}
inline ::torch::Tensor ltr_pointwise(Op& op, const ::torch::Tensor& pred_cost, const ::torch::Tensor& true_cost) {
  detail::same_shape(true_cost, pred_cost, "true_cost", "pred_cost");
  return detail::PoolLossLayer::apply(pred_cost, true_cost, &op, 2);
}
inline ::torch::Tensor ltr_pairwise(Op& op, const ::torch::Tensor& pred_cost, const ::torch::Tensor& true_cost) {
  detail::same_shape(true_cost, pred_cost, "true_cost", "pred_cost");
  return detail::PoolLossLayer::apply(pred_cost, true_cost, &op, 3);
}
inline ::torch::Tensor ltr_listwise(Op& op, const ::torch::Tensor& pred_cost, const ::torch::Tensor& true_cost) {
  detail::same_shape(true_cost, pred_cost, "true_cost", "pred_cost");
  return detail::PoolLossLayer::apply(pred_cost, true_cost, &op, 4);
}

/// y*(theta), the op's solver with no noise, differentiable once by the differentiable black
/// box (DBB): backward solves at theta + s * lambda * grad (s = +1 minimizing, -1
/// maximizing) and returns s * (y*(theta') - y*(theta)) / lambda (pert_blackbox_vjp).
/// `op` must outlive the graph (backward calls it).
inline void require_square(const Op& op, const char* method) {
  if (op.output_numel() != op.input_numel())
    throw pert::detail::error(PERT_STATUS_INVALID_ARGUMENT, std::string(method) +
                                                                " needs output_shape == input_shape (a linear objective <theta, y>)");
}

inline ::torch::Tensor blackbox(Op& op, const ::torch::Tensor& theta, double lambda) {
  require_square(op, "the black-box gradient (DBB)");
  if (!(lambda > 0) || !std::isfinite(lambda))
    throw pert::detail::error(PERT_STATUS_INVALID_ARGUMENT, "lambda must be finite and > 0, got " + std::to_string(lambda));
  return detail::SolveLayer::apply(theta, &op, lambda);
}

/// y*(theta), differentiable once by the negative identity (NID): backward returns -grad
/// minimizing, grad maximizing (pert_negative_identity_vjp). `op` must outlive the graph.
inline ::torch::Tensor negative_identity(Op& op, const ::torch::Tensor& theta) {
  require_square(op, "the negative identity (NID)");
  return detail::SolveLayer::apply(theta, &op, 0.0);
}

/// The perturbation-gradient loss [batch] of pred_cost along true_cost (the same problems);
/// differentiable once in pred_cost (pert_perturbation_gradient; central differences when
/// two_sided).
inline ::torch::Tensor perturbation_gradient(Op& op, const ::torch::Tensor& pred_cost, const ::torch::Tensor& true_cost,
                                             double sigma, bool two_sided = true) {
  detail::same_shape(true_cost, pred_cost, "true_cost", "pred_cost");
  return detail::PerturbationGradient::apply(pred_cost, true_cost, &op, sigma, two_sided);
}


/// y_sigma(theta) (the op's noise; Sum-of-Gamma is I-MLE's), differentiable once by I-MLE
/// (pert_imle_vjp: the forward's perturbed inputs moved by s * lambda * grad, s = +1
/// minimizing, -1 maximizing; central differences when two_sided). `op` must outlive the
/// graph (backward calls it).
inline ::torch::Tensor imle(Op& op, const ::torch::Tensor& theta, double lambda, bool two_sided = false) {
  if (!(lambda > 0) || !std::isfinite(lambda))
    throw pert::detail::error(PERT_STATUS_INVALID_ARGUMENT, "lambda must be finite and > 0, got " + std::to_string(lambda));
  return detail::ImleLayer::apply(theta, &op, lambda, two_sided, static_cast<pert_aimle_state*>(nullptr));
}

/// As imle, with AI-MLE's adaptive step (pert_aimle_vjp): `state` (start from
/// pert_aimle_state_default(), one per layer) is updated by each backward pass and must
/// outlive the graph, as `op`.
inline ::torch::Tensor aimle(Op& op, const ::torch::Tensor& theta, pert_aimle_state& state, bool two_sided = false) {
  return detail::ImleLayer::apply(theta, &op, 0.0, two_sided, &state);
}

}  // namespace autograd
}  // namespace pert

#endif  // PERTURBATIONS_TORCH_HPP
