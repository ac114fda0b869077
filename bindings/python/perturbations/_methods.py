"""Decision-focused learning over an op's solver, as torch autograd functions and modules
(re-exported by perturbations.torch): SPO+, the differentiable black box (DBB), the
negative identity (NID), the perturbation gradient (PG), I-MLE and AI-MLE, with PyEPO's
signs per sense (pyepo.func 2.2: SPOPlus, blackboxOpt, negativeIdentity,
perturbationGradient, implicitMLE, adaptiveImplicitMLE). I-MLE and AI-MLE perturb with the
op's noise (Sum-of-Gamma, `noise="sum_of_gamma"`, is the papers') and keep the forward's
perturbed inputs and solutions (2 batch num_samples input_numel floats) for backward.

Each call hands CPU float32 copies of its tensors to the library, which runs the op's
solver on every problem of the batch (its threads and workers; no noise), and returns
results on the first argument's device and dtype. The losses come per problem and are
reduced by `reduction`; DBB and NID return the solutions y*(theta).

Gradients: SPO+ and PG give their gradient with the loss (no solve in backward); DBB
solves once more per problem in backward; NID does not. The losses of SPO+ and PG are
piecewise linear in the predicted costs, so their second derivative is 0 where it exists;
DBB, NID, I-MLE and AI-MLE are differentiable once (a second derivative through their
gradient raises, with respect to theta and to whatever the incoming gradient depends on). An
upstream gradient holding NaN or an infinity (a GradScaler overflow) gives no exception:
NID returns -g or g as it is; DBB, I-MLE and AI-MLE give NaN in the problems it touches
(AI-MLE's state is then left as it was); SPO+, PG and the pool losses multiply their
gradient by it.
"""

import math

import torch

from .errors import InvalidArgumentError, NonFiniteInputError
from .op import AimleState, Op

__all__ = ["spo_plus", "blackbox", "negative_identity", "perturbation_gradient", "imle", "aimle",
           "SPOPlusLoss", "BlackBox", "NegativeIdentity", "PerturbationGradientLoss", "IMLE", "AIMLE",
           "nce", "cmap", "ltr_pointwise", "ltr_pairwise", "ltr_listwise",
           "NCELoss", "CMAPLoss", "LTRPointwiseLoss", "LTRPairwiseLoss", "LTRListwiseLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_op(op, method=None):
    if not isinstance(op, Op):
        raise TypeError(f"op must be a perturbations.Op, got {type(op).__name__}")
    if method is not None and tuple(op.output_shape) != tuple(op.input_shape):
        # (checked before the forward: DBB's and NID's backward would fail only then)
        raise InvalidArgumentError(2, f"{method} needs output_shape == input_shape (a linear objective "
                                      f"<theta, y>), got output {list(op.output_shape)} and input "
                                      f"{list(op.input_shape)}")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise InvalidArgumentError(2, f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, "
                                      f"got {reduction!r}")


def _check_step(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(2, f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise InvalidArgumentError(2, f"{name} must be finite and > 0, got {value!r}")
    return v


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _needs_grad(t):
    return torch.is_grad_enabled() and t.requires_grad


class _LossWithGrad(torch.autograd.Function):
    """A loss per problem whose gradient in the predicted costs comes with it; `run(op,
    pred, *rest)` gives (loss, grad)."""

    @staticmethod
    def forward(ctx, pred, run, op, *rest):
        loss, grad = run(op, pred.detach(), *rest)
        ctx.save_for_backward(grad)
        ctx.inner = len(op.input_shape)
        ctx.count = len(rest)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        per = grad_loss.reshape(grad_loss.shape + (1,) * ctx.inner)
        return (grad * per, None, None) + (None,) * ctx.count


class _Refused(torch.autograd.Function):
    """(message, value, *inputs) -> value, on a node joined to `inputs` whose backward
    raises RuntimeError(message). The engine runs that backward only when a gradient is
    asked through it, toward one of the inputs: a derivative the library does not have
    then fails loudly instead of being left None or zero."""

    @staticmethod
    def forward(ctx, message, value, *inputs):
        ctx.message = message
        return value.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def _loss(run, op, pred, names, *rest):
    pred = _tensor(pred)
    plain = tuple(r.detach() if isinstance(r, torch.Tensor) else r for r in rest)
    loss = _LossWithGrad.apply(pred, run, op, *plain) if _needs_grad(pred) else run(op, pred, *plain)[0]
    if torch.is_grad_enabled():
        for name, r in zip(names, rest):
            if isinstance(r, torch.Tensor) and r.requires_grad:
                # (-0.0 joined to the target: x + -0.0 is x, bits and all; asked only when the
                # target's gradient is, as PyTorch's own losses raise for a target only then)
                loss = loss + _Refused.apply(
                    f"perturbations: the derivative of this loss with respect to {name} is not implemented (it "
                    f"is differentiable in the predicted costs only): detach {name}",
                    torch.full_like(loss.detach(), -0.0), r)
    return loss


def spo_plus(op: Op, pred_cost, true_cost, true_sol, true_obj, reduction: str = "mean") -> torch.Tensor:
    """The SPO+ loss (Elmachtoub & Grigas 2022) of pred_cost [*batch, *input_shape] against
    true_cost and true_sol (broadcast to pred_cost's shape) and true_obj ([*batch] or
    [*batch, 1]), reduced by `reduction` ("mean", "sum" or "none": per problem). One solve
    per problem, at 2 pred_cost - true_cost; the gradient in pred_cost is 2 (true_sol -
    y*(2 pred_cost - true_cost)) minimizing, 2 (y*(2 pred_cost - true_cost) - true_sol)
    maximizing. The op's output shape must equal its input shape."""
    _check_op(op, "SPO+")
    _check_reduction(reduction)
    loss = _loss(lambda o, p, c, w, z: o.spo_plus(p, c, w, z), op, pred_cost, ("true_cost", "true_sol", "true_obj"),
                 true_cost, true_sol, true_obj)
    return _reduce(loss, reduction)


def perturbation_gradient(op: Op, pred_cost, true_cost, sigma, two_sided: bool = True,
                          reduction: str = "mean") -> torch.Tensor:
    """The perturbation-gradient loss (PG, Huang & Gupta 2024) of pred_cost along true_cost
    (broadcast to pred_cost's shape), a finite difference of width sigma of the optimal value
    that approximates s <true_cost, y*(pred_cost)> (the true cost of the predicted decision
    when minimizing, its negation when maximizing); central (two_sided) or
    backward differences; reduced by `reduction`. Two solves per problem; the gradient in
    pred_cost is s (w+ - w-) / (2 sigma) (two-sided) or s (w - w-) / sigma, s = +1
    minimizing, -1 maximizing. two_sided defaults to True, where PyEPO's
    perturbationGradient defaults to backward differences (two_sides=False)."""
    _check_op(op, "the perturbation gradient (PG)")
    _check_reduction(reduction)
    sigma = _check_step(sigma, "sigma")
    two_sided = bool(two_sided)
    loss = _loss(lambda o, p, c: o.perturbation_gradient(p, c, sigma, two_sided), op, pred_cost, ("true_cost",),
                 true_cost)
    return _reduce(loss, reduction)


def _tolerant_vjp(vjp, grad_y, inner):
    """vjp(grad_y) as PyTorch gives a gradient from a non-finite one (a GradScaler
    overflow): the problems whose grad_y holds NaN or an infinity (or a float64 beyond
    float32's range) get NaN, with no exception; the others their own gradient, from the
    call on grad_y with those problems' rows zeroed."""
    try:
        return vjp(grad_y)
    except NonFiniteInputError:
        # (the library checks finiteness: only then is a pass made here)
        lead = grad_y.shape[:grad_y.dim() - inner]
        bad = ~torch.isfinite(grad_y.to(torch.float32).reshape(lead + (-1,))).all(dim=-1)
        if not bool(bad.any()):
            raise  # (another input's: the call fails as it is)
    bad = bad.reshape(lead + (1,) * inner)
    clean = torch.where(bad, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device), grad_y)
    out = vjp(clean)
    return torch.where(bad, torch.full((), math.nan, dtype=out.dtype, device=out.device), out)


def _differentiable_once(name, grad, *inputs):
    """A gradient the library computed off the graph, joined (under create_graph) to every
    path back to the inputs it came from (theta, and the incoming gradient: whatever that
    depends on), so that a second derivative through it fails loudly instead of being lost
    (PyTorch's once_differentiable joins it to none of them)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Refused.apply(f"perturbations: {name} is differentiable once: a second derivative (double "
                              f"backward, a gradient penalty) through its gradient is not computed",
                              grad, *inputs)
    return grad


class _Solve(torch.autograd.Function):
    """y*(theta) forward; backward by DBB (lambd > 0) or NID (lambd None)."""

    @staticmethod
    def forward(ctx, theta, op, lambd):
        y = op.solve(theta.detach())
        ctx.op, ctx.lambd = op, lambd
        ctx.save_for_backward(theta, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        theta, y = ctx.saved_tensors
        op, inner = ctx.op, len(ctx.op.input_shape)
        with torch.no_grad():
            if ctx.lambd is None:  # -g or g, exactly (pert_negative_identity_vjp's rule), in g's dtype
                grad = -grad_y if op.sense == "minimize" else grad_y.clone()
            else:
                grad = _tolerant_vjp(lambda g: op.blackbox_vjp(theta.detach(), y, g, ctx.lambd), grad_y, inner)
        name = "the negative identity (NID)" if ctx.lambd is None else "the black-box gradient (DBB)"
        return _differentiable_once(name, grad, grad_y, theta), None, None


def _solve_layer(op, theta, lambd):
    theta = _tensor(theta)
    if _needs_grad(theta):
        return _Solve.apply(theta, op, lambd)
    return op.solve(theta)


def blackbox(op: Op, theta, lambd) -> torch.Tensor:
    """y*(theta), the op's solver on each problem of theta [*batch, *input_shape] with no
    noise, differentiable by the differentiable black box (DBB, Vlastelica et al. 2020):
    backward solves once per problem at theta + s lambd g and returns
    s (y*(theta + s lambd g) - y*(theta)) / lambd, s = +1 minimizing, -1 maximizing
    (PyEPO's blackboxOpt). lambd > 0 (PyEPO recommends 10 to 20, in the units of theta)."""
    _check_op(op, "the black-box gradient (DBB)")
    return _solve_layer(op, theta, _check_step(lambd, "lambd"))


def negative_identity(op: Op, theta) -> torch.Tensor:
    """y*(theta), differentiable by the negative identity (NID, Sahoo et al. 2023): backward
    returns -g minimizing, g maximizing (PyEPO's negativeIdentity); no solve in backward."""
    _check_op(op, "the negative identity (NID)")
    return _solve_layer(op, theta, None)


class _Imle(torch.autograd.Function):
    """I-MLE's forward (the record kept on the context), backward by I-MLE (lambd) or AI-MLE
    (state)."""

    @staticmethod
    def forward(ctx, theta, op, lambd, two_sided, state):
        y, record = op.imle_forward(theta.detach())
        ctx.op, ctx.record, ctx.lambd, ctx.two_sided, ctx.state = op, record, lambd, two_sided, state
        # (a reference for _Once's node only: not saved, as backward never reads its values,
        # so theta may change in place before backward)
        ctx.theta = theta
        return y

    @staticmethod
    def backward(ctx, grad_y):
        op, record, inner = ctx.op, ctx.record, len(ctx.op.input_shape)
        state = ctx.state

        def aimle_vjp(g):
            if g is not grad_y:  # (a non-finite grad_y: the state is left as it was)
                return op.aimle_vjp(record, g, AimleState(state.alpha, state.grad_norm_avg, state.step), ctx.two_sided)
            return op.aimle_vjp(record, g, state, ctx.two_sided)

        with torch.no_grad():
            if state is None:
                grad = _tolerant_vjp(lambda g: op.imle_vjp(record, g, ctx.lambd, ctx.two_sided), grad_y, inner)
            else:
                grad = _tolerant_vjp(aimle_vjp, grad_y, inner)
        return _differentiable_once("I-MLE" if state is None else "AI-MLE", grad, grad_y, ctx.theta), \
            None, None, None, None


def _imle_layer(op, theta, lambd, two_sided, state):
    theta = _tensor(theta)
    if _needs_grad(theta):
        return _Imle.apply(theta, op, lambd, bool(two_sided), state)
    return op.forward(theta)


def imle(op: Op, theta, lambd, two_sided: bool = False) -> torch.Tensor:
    """y_sigma(theta), the mean over the op's samples of y*(theta + sigma Z) (its noise:
    Sum-of-Gamma, `noise="sum_of_gamma"`, is I-MLE's), differentiable by I-MLE (Niepert et
    al. 2021; PyEPO's implicitMLE): backward solves the forward's perturbed inputs moved by
    s lambd g (s = +1 minimizing, -1 maximizing: the target distribution theta - lambd g
    when maximizing) and returns s mean(y*(x + s lambd g) - y*(x)) / lambd, or the central
    difference when two_sided. lambd > 0. With a pool (`Op.set_pool`) and solve_ratio < 1,
    each of those samples is answered from the pool with probability 1 - solve_ratio, as
    PyEPO's `solve_ratio` does."""
    _check_op(op, "I-MLE")
    return _imle_layer(op, theta, _check_step(lambd, "lambd"), two_sided, None)


def aimle(op: Op, theta, two_sided: bool = False, state: AimleState = None) -> torch.Tensor:
    """As `imle`, with AI-MLE's adaptive step (Minervini et al. 2023; PyEPO's
    adaptiveImplicitMLE): lambda = state.alpha |theta| / |g|, and `state` (an AimleState,
    updated by each backward pass) adapts alpha. Pass the same state at every step (the
    module AIMLE keeps one); None starts from a fresh one each call (no adaptation)."""
    _check_op(op, "AI-MLE")
    if state is None:
        state = AimleState()
    elif not isinstance(state, AimleState):
        raise TypeError(f"state must be a perturbations.AimleState, got {type(state).__name__}")
    return _imle_layer(op, theta, None, two_sided, state)


class SPOPlusLoss(torch.nn.Module):
    """SPO+ as a module: `forward(pred_cost, true_cost, true_sol, true_obj)` returns the
    loss reduced by `reduction` (see `spo_plus`)."""

    def __init__(self, op: Op, reduction: str = "mean"):
        super().__init__()
        _check_op(op, "SPO+")
        _check_reduction(reduction)
        self.op, self.reduction = op, reduction

    def forward(self, pred_cost, true_cost, true_sol, true_obj):
        return spo_plus(self.op, pred_cost, true_cost, true_sol, true_obj, reduction=self.reduction)

    def extra_repr(self):
        return f"{self.op!r}, reduction={self.reduction!r}"


class PerturbationGradientLoss(torch.nn.Module):
    """PG as a module: `forward(pred_cost, true_cost)` returns the loss reduced by
    `reduction` (see `perturbation_gradient`). sigma defaults to PyEPO's 0.1; two_sided
    defaults to True (central differences), where PyEPO's perturbationGradient defaults to
    backward differences (two_sides=False): pass two_sided=False for PyEPO's default."""

    def __init__(self, op: Op, sigma: float = 0.1, two_sided: bool = True, reduction: str = "mean"):
        super().__init__()
        _check_op(op, "the perturbation gradient (PG)")
        _check_reduction(reduction)
        self.op, self.sigma, self.two_sided = op, _check_step(sigma, "sigma"), bool(two_sided)
        self.reduction = reduction

    def forward(self, pred_cost, true_cost):
        return perturbation_gradient(self.op, pred_cost, true_cost, self.sigma, self.two_sided,
                                     reduction=self.reduction)

    def extra_repr(self):
        return f"{self.op!r}, sigma={self.sigma}, two_sided={self.two_sided}, reduction={self.reduction!r}"


class BlackBox(torch.nn.Module):
    """DBB as a module: `forward(theta)` returns y*(theta) (see `blackbox`; lambd defaults
    to PyEPO's 10)."""

    def __init__(self, op: Op, lambd: float = 10.0):
        super().__init__()
        _check_op(op, "the black-box gradient (DBB)")
        self.op, self.lambd = op, _check_step(lambd, "lambd")

    def forward(self, theta):
        return blackbox(self.op, theta, self.lambd)

    def extra_repr(self):
        return f"{self.op!r}, lambd={self.lambd}"


class _OpModule(torch.nn.Module):
    """A module over one op and nothing else (Perturbed, NegativeIdentity)."""

    def __init__(self, op: Op):
        super().__init__()
        _check_op(op)
        self.op = op

    def extra_repr(self):
        return repr(self.op)


class NegativeIdentity(_OpModule):
    """NID as a module: `forward(theta)` returns y*(theta) (see `negative_identity`)."""

    def forward(self, theta):
        return negative_identity(self.op, theta)


class IMLE(torch.nn.Module):
    """I-MLE as a module: `forward(theta)` returns y_sigma(theta) (see `imle`; lambd defaults
    to PyEPO's 10)."""

    def __init__(self, op: Op, lambd: float = 10.0, two_sided: bool = False):
        super().__init__()
        _check_op(op, "I-MLE")
        self.op, self.lambd, self.two_sided = op, _check_step(lambd, "lambd"), bool(two_sided)

    def forward(self, theta):
        return imle(self.op, theta, self.lambd, self.two_sided)

    def extra_repr(self):
        return f"{self.op!r}, lambd={self.lambd}, two_sided={self.two_sided}"


class AIMLE(torch.nn.Module):
    """AI-MLE as a module: `forward(theta)` returns y_sigma(theta) (see `aimle`); the module
    keeps its AimleState (`self.state`) across steps."""

    def __init__(self, op: Op, two_sided: bool = False):
        super().__init__()
        _check_op(op, "AI-MLE")
        self.op, self.two_sided, self.state = op, bool(two_sided), AimleState()

    def forward(self, theta):
        return aimle(self.op, theta, self.two_sided, self.state)

    def extra_repr(self):
        return f"{self.op!r}, two_sided={self.two_sided}, {self.state!r}"


# ---- losses over the op's solution pool (Op.set_pool; PyEPO's NCE, CMAP and LTR) ----------

def _pool_loss(method, op, pred_cost, target, reduction):
    _check_op(op, _POOL_LOSS_NAMES[method])
    _check_reduction(reduction)
    loss = _loss(lambda o, p, t: getattr(o, method)(p, t), op, pred_cost, (_POOL_LOSS_TARGETS[method],), target)
    return _reduce(loss, reduction)


_POOL_LOSS_NAMES = {"nce": "NCE", "cmap": "CMAP", "ltr_pointwise": "the pointwise LTR loss",
                    "ltr_pairwise": "the pairwise LTR loss", "ltr_listwise": "the listwise LTR loss"}
_POOL_LOSS_TARGETS = {"nce": "true_sol", "cmap": "true_sol", "ltr_pointwise": "true_cost",
                      "ltr_pairwise": "true_cost", "ltr_listwise": "true_cost"}


def nce(op: Op, pred_cost, true_sol, reduction: str = "mean") -> torch.Tensor:
    """The noise-contrastive estimation loss (Mulamba et al. 2021; PyEPO's NCE) of pred_cost
    [*batch, *input_shape] against the true solutions over the op's solution pool (seed it
    with the training set's true solutions: `perturbations.Pool`, `Op.set_pool`): mean over
    w in the pool of s (<pred_cost, true_sol> - <pred_cost, w>), s = +1 minimizing, -1
    maximizing; reduced by `reduction`. With probability solve_ratio (the op's config) the
    batch is solved first, which adds its solutions to the pool."""
    return _pool_loss("nce", op, pred_cost, true_sol, reduction)


def cmap(op: Op, pred_cost, true_sol, reduction: str = "mean") -> torch.Tensor:
    """The contrastive MAP loss (PyEPO's CMAP): as `nce` with the largest margin over the
    pool instead of the mean."""
    return _pool_loss("cmap", op, pred_cost, true_sol, reduction)


def ltr_pointwise(op: Op, pred_cost, true_cost, reduction: str = "mean") -> torch.Tensor:
    """The pointwise learning-to-rank loss (Mandi et al. 2022; PyEPO's pointwiseLTR) over
    the op's pool: mean over w of <true_cost - pred_cost, w>^2; as `nce` otherwise."""
    return _pool_loss("ltr_pointwise", op, pred_cost, true_cost, reduction)


def ltr_pairwise(op: Op, pred_cost, true_cost, reduction: str = "mean") -> torch.Tensor:
    """The pairwise learning-to-rank loss (PyEPO's pairwiseLTR) over the op's pool: hinges
    relu(s (<pred_cost, w_b> - <pred_cost, w>)) of the pool's best solution w_b for
    true_cost over every w, divided by the pool's size - 1."""
    return _pool_loss("ltr_pairwise", op, pred_cost, true_cost, reduction)


def ltr_listwise(op: Op, pred_cost, true_cost, reduction: str = "mean") -> torch.Tensor:
    """The listwise learning-to-rank loss (PyEPO's listwiseLTR) over the op's pool: the
    cross-entropy of softmax(-s <pred_cost, w>) against max(softmax(-s <true_cost, w>),
    1e-8) over the pool's w."""
    return _pool_loss("ltr_listwise", op, pred_cost, true_cost, reduction)


class _PoolLossModule(torch.nn.Module):
    """A pool-based loss as a module: `forward(pred_cost, target)` (true_sol for NCE and
    CMAP, true_cost for LTR) returns the loss reduced by `reduction`."""

    _fn = None

    def __init__(self, op: Op, reduction: str = "mean"):
        super().__init__()
        _check_op(op, _POOL_LOSS_NAMES[type(self)._fn.__name__])
        _check_reduction(reduction)
        self.op, self.reduction = op, reduction

    def forward(self, pred_cost, target):
        return type(self)._fn(self.op, pred_cost, target, reduction=self.reduction)

    def extra_repr(self):
        return f"{self.op!r}, reduction={self.reduction!r}"


class NCELoss(_PoolLossModule):
    """NCE as a module: `forward(pred_cost, true_sol)` (see `nce`)."""

    _fn = staticmethod(nce)


class CMAPLoss(_PoolLossModule):
    """CMAP as a module: `forward(pred_cost, true_sol)` (see `cmap`)."""

    _fn = staticmethod(cmap)


class LTRPointwiseLoss(_PoolLossModule):
    """Pointwise LTR as a module: `forward(pred_cost, true_cost)` (see `ltr_pointwise`)."""

    _fn = staticmethod(ltr_pointwise)


class LTRPairwiseLoss(_PoolLossModule):
    """Pairwise LTR as a module: `forward(pred_cost, true_cost)` (see `ltr_pairwise`)."""

    _fn = staticmethod(ltr_pairwise)


class LTRListwiseLoss(_PoolLossModule):
    """Listwise LTR as a module: `forward(pred_cost, true_cost)` (see `ltr_listwise`)."""

    _fn = staticmethod(ltr_listwise)
