"""PyTorch autograd over perturbed ops: `perturbed(op, theta)` and
`fenchel_young(op, theta, y_true)` are differentiable. Each call runs one forward of the op
on a CPU float32 copy of theta; the graph keeps that call's tape and backward calls its VJP
(no dense Jacobian, no further solver call). Without grad mode, or when theta does not
require grad, no tape is made. Results come back on theta's device and dtype."""

import torch

from . import Op

__all__ = ["perturbed", "fenchel_young"]


class _Perturbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, op):
        y, tape = op.forward_with_tape(theta.detach())
        ctx.tape = tape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        # the tape stays on the context (freed with the graph): its VJP may be asked again
        # under retain_graph
        return ctx.tape.vjp(grad_y.detach()), None


class _FenchelYoung(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, y_true, op):
        loss, grad = op.fenchel_young(theta.detach(), y_true.detach())
        ctx.save_for_backward(grad, theta.detach())
        ctx.sign = -1.0 if op.sense == "maximize" else 1.0
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad, theta = ctx.saved_tensors
        per_problem = grad_loss.reshape((-1,) + (1,) * (grad.dim() - 1))
        g_y = None
        if ctx.needs_input_grad[1]:
            g_y = ctx.sign * theta * per_problem
        return grad * per_problem, g_y, None


def perturbed(op: Op, theta: torch.Tensor) -> torch.Tensor:
    """y_sigma(theta) for theta [batch, *input_shape], differentiable (backward: the VJP
    of this call's tape)."""
    if not (torch.is_grad_enabled() and theta.requires_grad):
        return op.forward(theta)
    return _Perturbed.apply(theta, op)


def fenchel_young(op: Op, theta: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """The Fenchel-Young loss [batch] of theta against y_true, differentiable with respect
    to theta and to y_true (-theta when maximizing, +theta when minimizing)."""
    return _FenchelYoung.apply(theta, y_true, op)
