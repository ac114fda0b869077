"""PyTorch over perturbed ops: autograd, the modules `Perturbed` and `FenchelYoungLoss`,
and the torch.func transforms; and the decision-focused methods over the exact solver
(`spo_plus`, `blackbox`, `negative_identity`, `perturbation_gradient`, `imle`, `aimle` and
their modules `SPOPlusLoss`, `BlackBox`, `NegativeIdentity`, `PerturbationGradientLoss`,
`IMLE`, `AIMLE`), and the losses over a solution pool (`nce`, `cmap`, `ltr_pointwise`,
`ltr_pairwise`, `ltr_listwise`; modules `NCELoss`, `CMAPLoss`, `LTRPointwiseLoss`,
`LTRPairwiseLoss`, `LTRListwiseLoss`): see perturbations._methods.

    import perturbations as pt, perturbations.torch as ptt
    op = pt.Op.builtin(pt.Config(num_samples=1000, sigma=0.5, device="cpu"), "argmax", 5)
    y = ptt.Perturbed(op)(theta)                          # differentiable in theta
    loss = ptt.FenchelYoungLoss(op)(theta, y_true)        # reduction="mean" | "sum" | "none"

Each call runs one forward of the op on theta's values as CPU float32 (a contiguous CPU
float32 tensor is read in place, so it must not change until the call returns; any other
is converted first); the graph keeps that call's tape, and backward (or forward-mode AD) takes products with it: no dense
Jacobian, no further solver call. The tape is freed after backward unless
`retain_graph=True`. Without grad mode, or when theta needs no gradient, no tape is made.
Results come back on theta's device and dtype; theta may have any number of leading
batch dimensions.

Gradients: an upstream gradient (or a forward-mode tangent) holding NaN or an infinity,
as after a GradScaler overflow, gives NaN in the problems it touches, with no exception.
`torch.func.grad`, `vjp`, `jvp`, `jacrev`, `jacfwd` and `vmap` work with `perturbed`,
`fenchel_young` and their modules, nested too (`vmap(jacrev(f))` gives each problem's
Jacobian; the op is applied once to the whole vmapped batch, once per chunk with a
chunk_size); the derivative of a
gradient (double backward, hessian) raises a clear error: the tape holds a Jacobian
estimate, not its derivative. `torch.compile(fullgraph=True)` traces models using
`perturbed`, `fenchel_young` and their modules without a graph break, for built-ins and
every kind of solver: under compilation they call the custom ops
`perturbations::forward`, `perturbations::perturbed` (with `perturbations::tape_vjp` for
backward) and `perturbations::fenchel_young`. The decision-focused methods and the pool
losses run in eager mode (under torch.compile they break the graph; torch.func
transforms do not apply to them).
"""

import math
import weakref

import torch

from . import _compile, cuda_check_thread
from .errors import InvalidArgumentError, NonFiniteInputError
from .op import Op

from ._methods import (AIMLE, IMLE, BlackBox, NegativeIdentity, PerturbationGradientLoss,  # noqa: E402,F401
                       SPOPlusLoss, aimle, blackbox, imle, negative_identity, perturbation_gradient, spo_plus)
from ._methods import (CMAPLoss, LTRListwiseLoss, LTRPairwiseLoss, LTRPointwiseLoss, NCELoss,  # noqa: E402,F401
                       cmap, ltr_listwise, ltr_pairwise, ltr_pointwise, nce)
from ._methods import _check_op, _check_reduction, _OpModule, _reduce  # noqa: E402

__all__ = ["perturbed", "fenchel_young", "Perturbed", "FenchelYoungLoss",
           "spo_plus", "blackbox", "negative_identity", "perturbation_gradient", "imle", "aimle",
           "SPOPlusLoss", "BlackBox", "NegativeIdentity", "PerturbationGradientLoss", "IMLE", "AIMLE",
           "nce", "cmap", "ltr_pointwise", "ltr_pairwise", "ltr_listwise",
           "NCELoss", "CMAPLoss", "LTRPointwiseLoss", "LTRPairwiseLoss", "LTRListwiseLoss"]


def _wrapped(t):
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # pragma: no cover - older torch
        return False


def _dual(t):
    try:
        return torch.autograd.forward_ad.unpack_dual(t).tangent is not None
    except RuntimeError:  # pragma: no cover
        return False


def _keep_tape(ctx, tape, theta):
    """The tape rides on a tensor saved for backward (and forward), so that it is released
    with the graph's buffers (after backward without retain_graph); the context itself
    holds only a weak reference (torch.func may hand the saved tensor back wrapped)."""
    key = torch.empty(0)
    key._pert_tape = tape
    ctx.save_for_backward(key, theta)
    ctx.save_for_forward(key, theta)
    ctx.tape = weakref.ref(tape)


def _tape(ctx):
    """(the tape, theta) of the call; torch's own error once the graph's buffers are freed."""
    _, theta = ctx.saved_tensors
    tape = ctx.tape()
    if tape is None:  # pragma: no cover - the saved tensor keeps it while the graph can use it
        raise RuntimeError("perturbations: the tape of this call was already freed")
    return tape, theta


def _product(tape, which, v):
    """tape.vjp / tape.jvp of a plain tensor v of shape [*lead, *batch_shape, *inner]: the
    leading dimensions (several cotangents per problem, as jacrev asks) one product each;
    problems whose v holds NaN or an infinity get NaN."""
    inner, outer = ((tape.output_shape, tape.input_shape) if which == "vjp"
                    else (tape.input_shape, tape.output_shape))
    per = tape.batch_shape + tuple(inner)
    k = len(per)
    if v.dim() < k or tuple(v.shape[v.dim() - k:]) != per:
        raise InvalidArgumentError(2, f"perturbations: a {which} product needs [..., {', '.join(map(str, per))}],"
                                      f" got {list(v.shape)}")
    lead = tuple(v.shape[:v.dim() - k])
    if lead and v.is_cuda and not torch.compiler.is_compiling():  # (the library's checks, first)
        cuda_check_thread(v.device.index)
    fn = tape.vjp if which == "vjp" else tape.jvp
    if not lead:
        try:
            return fn(v)  # one cotangent per problem: the product as it is
        except NonFiniteInputError:
            pass  # (the library checks finiteness) some problems' cotangents are not finite
    # (the library takes float32: a finite float64 above its range is not finite either)
    rows = v.reshape((math.prod(lead), tape.batch, math.prod(inner))).to(torch.float32)
    finite = torch.isfinite(rows).all(dim=2)
    clean = torch.where(finite.unsqueeze(2), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    parts = [fn(r.reshape((tape.batch,) + tuple(inner))) for r in clean.unbind(0)]
    size = (rows.shape[0], tape.batch, math.prod(outer))
    out = torch.stack(parts).reshape(size) if parts else torch.zeros(size)  # (none: jacrev of no output)
    out = out.to(device=v.device, dtype=v.dtype)
    if not bool(finite.all()):
        out = torch.where(finite.unsqueeze(2), out, torch.full((), math.nan, dtype=out.dtype, device=out.device))
    return out.reshape(lead + tape.batch_shape + tuple(outer))


def _no_second_derivative():
    return RuntimeError("perturbations: the derivative of a gradient in theta (double backward, hessian, "
                        "jacfwd of jacrev) is not available: the tape holds the op's Jacobian estimate, not "
                        "its derivative in theta")


_OTHER = {"vjp": "jvp", "jvp": "vjp"}


class _TapeProduct(torch.autograd.Function):
    """(v, theta) -> the tape's VJP or JVP of v. Linear in v (its derivative in v is the
    other product); it depends on theta through the tape, whose derivative the library
    does not have: asking for it raises instead of giving zero."""

    @staticmethod
    def forward(v, theta, tape, which):
        return _product(tape, _kind(which), v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # (`which` with its count of leading dimensions: a product taken under a cotangent
        # vmap keeps it in its own derivatives; tangents not given stay None, so that a
        # derivative in v alone is not mistaken for one in theta)
        ctx.theta, ctx.tape, ctx.which = inputs[1], inputs[2], inputs[3]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, u):
        if ctx.needs_input_grad[1]:
            raise _no_second_derivative()
        if u is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        kind, lead = ctx.which if isinstance(ctx.which, tuple) else (ctx.which, 0)
        return _TapeProduct.apply(u, ctx.theta, ctx.tape, (_OTHER[kind], lead)), None, None, None

    @staticmethod
    def jvp(ctx, v_t, theta_t, _tape, _which):
        if theta_t is not None:
            raise _no_second_derivative()
        return _TapeProduct.apply(v_t, ctx.theta, ctx.tape, ctx.which)

    @staticmethod
    def vmap(info, in_dims, v, theta, tape, which):
        # Levels are unwrapped innermost first. A level that batches theta made the tape
        # (its problems are the tape's leading batch dimension): its dimension goes right
        # after the leading dimensions of the levels unwrapped before it (jacrev's basis
        # inside vmap, say), which _product reads as several cotangents per problem; a level
        # that does not batch theta adds such a leading dimension, in front. (theta only
        # carries the dependence on it, it is not read: passed on as it is.)
        kind, lead = which if isinstance(which, tuple) else (which, 0)
        if in_dims[1] is None:
            v = v.movedim(in_dims[0], 0)  # (v is batched here: theta is not)
            return _TapeProduct.apply(v, theta, tape, (kind, lead + 1)), 0
        if in_dims[0] is None:
            v = v.unsqueeze(lead).expand(v.shape[:lead] + (info.batch_size,) + v.shape[lead:])
        else:
            v = v.movedim(in_dims[0], lead)
        return _TapeProduct.apply(v, theta, tape, (kind, lead)), lead


def _kind(which):
    """"vjp" or "jvp" of _TapeProduct's `which` (with its count of leading dimensions
    under vmap, see _TapeProduct.vmap)."""
    return which[0] if isinstance(which, tuple) else which


def _vjp(ctx, grad_y):
    """The backward of both forms: without create_graph the product itself (no graph to
    make); with it, a _TapeProduct node, whose own derivative in theta is refused."""
    tape, theta = _tape(ctx)
    if not torch.is_grad_enabled():
        return _product(tape, "vjp", grad_y)
    return _TapeProduct.apply(grad_y, theta, tape, "vjp")


class _PlainPerturbed(torch.autograd.Function):
    """The eager autograd form (no torch.func transform, no dual tensor): the classic
    signature, which torch applies without binding arguments per call."""

    @staticmethod
    def forward(ctx, theta, op):
        y, tape = op.forward_with_tape(theta.detach())
        _keep_tape(ctx, tape, theta)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _vjp(ctx, grad_y), None


class _Perturbed(torch.autograd.Function):
    @staticmethod
    def forward(theta, op):
        return op.forward_with_tape(theta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _keep_tape(ctx, output[1], inputs[0])

    @staticmethod
    def backward(ctx, grad_y, _):
        return _vjp(ctx, grad_y), None

    @staticmethod
    def jvp(ctx, theta_t, _):
        tape, theta = _tape(ctx)
        return _TapeProduct.apply(theta_t, theta, tape, "jvp"), None

    @staticmethod
    def vmap(info, in_dims, theta, op):
        # the vmapped dimension becomes one more batch dimension of one call
        return _Perturbed.apply(theta.movedim(in_dims[0], 0), op), (0, None)


def perturbed(op: Op, theta: torch.Tensor) -> torch.Tensor:
    """y_sigma(theta) for theta [*batch, *input_shape], differentiable (backward: the VJP
    of this call's tape; forward mode: its JVP)."""
    _check_op(op)
    if not isinstance(theta, torch.Tensor):
        theta = torch.as_tensor(theta)
    if torch.compiler.is_compiling():
        if torch.is_grad_enabled() and theta.requires_grad:
            return _compile.perturbed(theta, op.id, _compile.site())[0]
        return _compile.forward(theta, op.id, _compile.site())
    if _wrapped(theta) or _dual(theta):
        return _Perturbed.apply(theta, op)[0]
    if torch.is_grad_enabled() and theta.requires_grad:
        return _PlainPerturbed.apply(theta, op)
    return op.forward(theta)


class _Frozen(torch.autograd.Function):
    """(grad, theta) -> grad: the Fenchel-Young gradient y_sigma(theta) - y_true as a
    function of theta, whose derivative (the Jacobian of y_sigma, which the loss's call
    keeps no tape of) is refused instead of taken as zero."""

    @staticmethod
    def forward(grad, theta):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # (a tangent in grad alone leaves theta's None)

    @staticmethod
    def backward(ctx, u):
        if ctx.needs_input_grad[1]:
            raise _no_second_derivative()
        return u, None

    @staticmethod
    def jvp(ctx, grad_t, theta_t):
        if theta_t is not None:
            raise _no_second_derivative()
        return grad_t

    @staticmethod
    def vmap(info, in_dims, grad, theta):
        g = grad.movedim(in_dims[0], 0) if in_dims[0] is not None else grad.expand((info.batch_size,) + grad.shape)
        return _Frozen.apply(g, theta), 0


def _fy_backward(ctx, grad_loss, y_true):
    """The loss's backward; `y_true` (the target, its values unused) carries the gradient's
    own derivative in it under create_graph."""
    grad, theta = ctx.saved_tensors[:2]
    if torch.is_grad_enabled():  # create_graph (or a torch.func transform): see _Frozen
        # the gradient's own derivative in y_true is sign I (exact; the added term is 0)
        grad = _Frozen.apply(grad, theta) + ctx.sign * (y_true - y_true.detach())
    per = grad_loss.reshape(grad_loss.shape + (1,) * ctx.inner)
    g_theta = grad * per if ctx.needs_input_grad[0] else None
    g_y = ctx.sign * theta * per if ctx.needs_input_grad[1] else None
    return g_theta, g_y, None


class _PlainFenchelYoung(torch.autograd.Function):
    """The eager autograd form of the loss (see _PlainPerturbed)."""

    @staticmethod
    def forward(ctx, theta, y_true, op):
        loss, grad = op.fenchel_young(theta.detach(), y_true.detach())
        ctx.save_for_backward(grad, theta)
        # (a reference, not a saved tensor: its values are never read, so y_true may change
        # in place before backward, as before the create_graph term that uses it)
        ctx.y_true = y_true
        ctx.sign = -1.0 if op.sense == "maximize" else 1.0
        ctx.inner = len(op.input_shape)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _fy_backward(ctx, grad_loss, ctx.y_true)


class _FenchelYoung(torch.autograd.Function):
    @staticmethod
    def forward(theta, y_true, op):
        loss, grad = op.fenchel_young(theta, y_true)
        return loss, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, y_true, op = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], theta, y_true)  # (torch.func wraps what is saved)
        ctx.save_for_forward(output[1], theta)
        ctx.sign = -1.0 if op.sense == "maximize" else 1.0
        ctx.inner = len(op.input_shape)

    @staticmethod
    def backward(ctx, grad_loss, _):
        return _fy_backward(ctx, grad_loss, ctx.saved_tensors[2])

    @staticmethod
    def jvp(ctx, theta_t, y_t, _):
        grad, theta = ctx.saved_tensors
        dims = tuple(range(-ctx.inner, 0))
        t = torch.zeros(grad.shape[:grad.dim() - ctx.inner], dtype=grad.dtype, device=grad.device)
        if theta_t is not None:
            t = t + (grad * theta_t).sum(dim=dims) if dims else t + grad * theta_t
        if y_t is not None:
            t = t + ctx.sign * ((theta * y_t).sum(dim=dims) if dims else theta * y_t)
        return t, None

    @staticmethod
    def vmap(info, in_dims, theta, y_true, op):
        def front(t, d):
            return t.movedim(d, 0) if d is not None else t.expand((info.batch_size,) + tuple(t.shape))
        return _FenchelYoung.apply(front(theta, in_dims[0]), front(y_true, in_dims[1]), op), (0, 0)


def fenchel_young(op: Op, theta: torch.Tensor, y_true, reduction: str = "none") -> torch.Tensor:
    """The Fenchel-Young loss of theta [*batch, *input_shape] against y_true (any
    array-like that broadcasts to theta's shape), per problem [*batch] (reduction "none",
    the default here), or its "mean" or "sum". Differentiable with respect to theta
    (y_sigma(theta) - y_true when maximizing, the negation when minimizing) and y_true
    (-theta when maximizing, +theta when minimizing)."""
    _check_op(op, "the Fenchel-Young loss")
    _check_reduction(reduction)
    if not isinstance(theta, torch.Tensor):
        theta = torch.as_tensor(theta)
    if theta.is_cuda and not torch.compiler.is_compiling():  # (the library's checks, first)
        cuda_check_thread(theta.device.index)
    dtype = theta.dtype if theta.dtype.is_floating_point else torch.float32
    y = torch.as_tensor(y_true, device=theta.device)
    y = y.to(dtype)
    try:
        y = y.expand(theta.shape)
    except RuntimeError:
        raise InvalidArgumentError(2, f"y_true of shape {list(y.shape)} does not broadcast to theta's shape "
                                      f"{list(theta.shape)}") from None
    if torch.compiler.is_compiling():
        loss = _compile.fenchel_young(theta, y, op.id, _compile.site())[0]
    elif _wrapped(theta) or _wrapped(y) or _dual(theta) or _dual(y):
        loss = _FenchelYoung.apply(theta, y, op)[0]
    elif torch.is_grad_enabled() and (theta.requires_grad or y.requires_grad):
        loss = _PlainFenchelYoung.apply(theta, y, op)
    else:
        loss = op.fenchel_young(theta, y)[0]
    return _reduce(loss, reduction)


class Perturbed(_OpModule):
    """The perturbed optimizer as a module: `forward(theta)` returns y_sigma(theta),
    differentiable. `copy.deepcopy` (EMA, AveragedModel) gives a module over a new op with
    the same settings and solver."""

    def forward(self, theta):
        return perturbed(self.op, theta)


class FenchelYoungLoss(torch.nn.Module):
    """The Fenchel-Young loss as a module: `forward(theta, y_true)` returns the loss,
    reduced over the problems by `reduction` ("mean", the default, "sum" or "none")."""

    def __init__(self, op: Op, reduction: str = "mean"):
        super().__init__()
        _check_op(op, "the Fenchel-Young loss")
        _check_reduction(reduction)
        self.op, self.reduction = op, reduction

    def forward(self, theta, y_true):
        return fenchel_young(self.op, theta, y_true, reduction=self.reduction)

    def extra_repr(self):
        return f"{self.op!r}, reduction={self.reduction!r}"
