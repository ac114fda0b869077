"""The ops of perturbations.torch as torch custom ops (torch.library), with fake
implementations, so that torch.compile(fullgraph=True) traces models that use them
without a graph break: `perturbations::forward`, `perturbations::perturbed` (y and the key
of its tape), `perturbations::tape_vjp` and `perturbations::fenchel_young`. Each call site of a traced
graph passes its own number, so that two calls on the same input stay two draws.

An Op is passed by an integer id (custom ops take tensors and plain values); the tape of
a call stays in a table under the key tensor the call returns, and leaves it when that
tensor is freed: after backward, unless the graph is retained, or with the output when
no backward runs."""

import itertools
import threading
import weakref
from typing import Tuple

import torch

from .op import BY_ID

_TAPES = {}
# each call draws fresh noise: two calls on the same inputs are not one. Each call site of
# a traced graph gets its own number (`site`, unused by the call), so that no pass merges
# two of them (common subexpression elimination looks at the arguments only)
_DRAWS = (torch.Tag.nondeterministic_seeded,)


class _Sites:
    """Call-site numbers (an attribute that torch.compile's tracing can read and bump)."""

    last = 0


SITES = _Sites()


def site():
    """A new call-site number."""
    SITES.last += 1
    return SITES.last
_IDS = itertools.count(1)
_LOCK = threading.Lock()


def _op(i):
    op = BY_ID.get(i)
    if op is None:
        raise RuntimeError(f"perturbations: op {i} of a compiled graph no longer exists (keep the Op alive while "
                           f"the compiled model runs)")
    return op


def _batch(op, theta):
    k = len(op.input_shape)
    return tuple(theta.shape[:theta.dim() - k])


@torch.library.custom_op("perturbations::forward", mutates_args=(), tags=_DRAWS)
def forward(theta: torch.Tensor, op: int, site: int) -> torch.Tensor:
    return _op(op).forward(theta)


@forward.register_fake
def _(theta, op, site):
    o = _op(op)
    return theta.new_empty(_batch(o, theta) + o.output_shape)


def _keep(tape):
    with _LOCK:
        i = next(_IDS)
        _TAPES[i] = tape
    key = torch.tensor(i, dtype=torch.int64)
    weakref.finalize(key, _TAPES.pop, i, None)
    return key


@torch.library.custom_op("perturbations::perturbed", mutates_args=(), tags=_DRAWS)
def perturbed(theta: torch.Tensor, op: int, site: int) -> Tuple[torch.Tensor, torch.Tensor]:
    y, tape = _op(op).forward_with_tape(theta)
    return y, _keep(tape)


@perturbed.register_fake
def _(theta, op, site):
    o = _op(op)
    return theta.new_empty(_batch(o, theta) + o.output_shape), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("perturbations::tape_vjp", mutates_args=())
def tape_vjp(grad_y: torch.Tensor, key: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    from .torch import _product
    tape = _TAPES.get(int(key))
    if tape is None:
        raise RuntimeError("perturbations: the tape of this call was already freed (backward through the graph "
                           "a second time needs retain_graph=True)")
    return _product(tape, "vjp", grad_y).to(dtype=theta.dtype)


@tape_vjp.register_fake
def _(grad_y, key, theta):
    return torch.empty_like(theta)


def _perturbed_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[0])


def _perturbed_backward(ctx, grad_y, _grad_key):
    key, theta = ctx.saved_tensors
    return tape_vjp(grad_y, key, theta), None, None


perturbed.register_autograd(_perturbed_backward, setup_context=_perturbed_setup)


@torch.library.custom_op("perturbations::fenchel_young", mutates_args=(), tags=_DRAWS)
def fenchel_young(theta: torch.Tensor, y_true: torch.Tensor, op: int, site: int) -> Tuple[torch.Tensor,
                                                                                      torch.Tensor]:
    return _op(op).fenchel_young(theta, y_true)


@fenchel_young.register_fake
def _(theta, y_true, op, site):
    return theta.new_empty(_batch(_op(op), theta)), torch.empty_like(theta)


def _fy_setup(ctx, inputs, output):
    theta, y_true, op, _ = inputs
    ctx.save_for_backward(output[1], theta, y_true)
    ctx.sign = -1.0 if _op(op).sense == "maximize" else 1.0
    ctx.inner = len(_op(op).input_shape)


def _fy_backward(ctx, grad_loss, _grad_grad):
    from .torch import _fy_backward as eager  # the same formulas (and refusals) as in eager mode
    g_theta, g_y, _ = eager(ctx, grad_loss, ctx.saved_tensors[2])
    return g_theta, g_y, None, None


fenchel_young.register_autograd(_fy_backward, setup_context=_fy_setup)
