"""A drop-in for the seed's PyTorch module (`import perturbations`, the PyTorch port of
Berthet et al.'s code): the same names, arguments and semantics, computed by this library.
Change the import line and keep the rest of the program:

    from perturbations import compat as perturbations

    pert_argmax = perturbations.perturbed(argmax, num_samples=1000000, sigma=0.5,
                                          noise='gumbel', batched=True)
    y = pert_argmax(theta_batch)          # differentiable: y.backward(...) reaches theta
    loss_fn = perturbations.FenchelYoungLoss(argmax, num_samples=100, sigma=0.1)

What is the same: `func` is vectorized over a leading dimension of torch tensors and called
once per call on every perturbed input; extra positional arguments are passed through to
it; batched inputs must have rank >= 2 (`ValueError` otherwise), unbatched ones get a
dummy batch dimension; a scalar output per input (`func` returning [rows]) is allowed; an
unknown noise raises `ValueError` when the function is made; each call draws fresh noise
from a seed taken from torch's default generator, so `torch.manual_seed` makes runs
repeatable; the same draws serve forward and backward (no solver call in backward).

What differs, on purpose: the noise is drawn by the library's own streams (not
torch.distributions), in problem-major row order ([batch, num_samples] flattened, where
the seed used [num_samples, batch]: the same for a row-wise `func`); the gradient uses the
library's default sample-mean baseline (unbiased, lower variance; the plain estimator when
num_samples is 1); results and gradients are placed on the input's device (the seed's
`device` argument is accepted and only kept as an attribute); a forward output takes
`func`'s floating dtype, a gradient the input's.

`FenchelYoungLoss` returns the seed's value, the squared distance ||y_sigma(theta) - y||^2
per example (or summed, unbatched), with the Fenchel-Young gradient y_sigma(theta) - y
(its negation when minimizing) reaching theta only. For the true Fenchel-Young loss value
use `perturbations.torch.fenchel_young`.
"""

import functools

import torch

from . import Config, Op

__all__ = ["perturbed", "sample_noise_with_gradients", "FenchelYoungLoss", "SUPPORTED_NOISES"]

_GUMBEL = "gumbel"
_NORMAL = "normal"
SUPPORTED_NOISES = (_GUMBEL, _NORMAL)


def _check_noise(noise):
    if noise not in SUPPORTED_NOISES:
        raise ValueError("{} noise is not supported. Use one of [{}]".format(noise, SUPPORTED_NOISES))


def sample_noise_with_gradients(noise, shape):
    """Samples a noise tensor of `shape` and the gradient of -log of its density there:
    (samples, gradients), Gumbel: 1 - exp(-z), Normal: z. Drawn from torch's default
    generator, as the seed does."""
    _check_noise(noise)
    shape = list(shape)
    if noise == _GUMBEL:
        samples = torch.distributions.gumbel.Gumbel(0.0, 1.0).sample(shape)
        gradients = 1 - torch.exp(-samples)
    else:
        samples = torch.distributions.normal.Normal(0.0, 1.0).sample(shape)
        gradients = samples
    return samples, gradients


def _fresh_seed():
    # from torch's default generator: torch.manual_seed makes the draws repeatable
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class _Spec:
    """The settings of one perturbed function and the output shape `func` gave last time
    for an input shape (a guess; checked on every call)."""

    def __init__(self, func, num_samples, sigma, noise):
        self.func, self.num_samples, self.sigma, self.noise = func, num_samples, sigma, noise
        self.output_shapes = {}

    def _draw(self, seed, input_shape, output_shape, theta32):
        cfg = Config(num_samples=self.num_samples, sigma=self.sigma, noise=self.noise, seed=seed, device="cpu")
        with cfg:
            op = Op.external(cfg, input_shape, output_shape)
        with op:
            return op.draw(theta32)

    def run(self, theta, args, with_tape):
        """(y [batch, *output_shape] on theta's device, the tape or None) for theta
        [batch, *input_shape] (any float tensor)."""
        input_shape = tuple(theta.shape[1:])
        host = theta.detach().to("cpu", torch.float32).contiguous().numpy()
        if theta.shape[0] == 0:
            out = torch.as_tensor(self.func(theta.detach(), *args))
            return torch.zeros((0,) + tuple(out.shape[1:]), dtype=_float_dtype(out), device=theta.device), None
        seed = _fresh_seed()
        guess = self.output_shapes.get(input_shape, ())
        draw = self._draw(seed, input_shape, guess, host)
        try:
            x = torch.from_numpy(draw.inputs()).to(device=theta.device, dtype=theta.dtype)
            y = torch.as_tensor(self.func(x, *args))
            rows = x.shape[0]
            if y.dim() == 0 or y.shape[0] != rows:
                raise ValueError(f"func must return one output per input row ({rows} rows), got shape "
                                 f"{tuple(y.shape)}")
            output_shape = tuple(y.shape[1:])
            dtype = _float_dtype(y)
            if output_shape != guess:
                draw.close()
                draw = self._draw(seed, input_shape, output_shape, host)  # the same rows (same seed)
                self.output_shapes[input_shape] = output_shape
            solutions = y.detach().to("cpu", torch.float32).contiguous().numpy()
            mean, tape = draw.finish(solutions)
            if not with_tape:
                tape.close()
                tape = None
        finally:
            draw.close()
        return torch.from_numpy(mean).to(device=theta.device, dtype=dtype), tape


def _float_dtype(t):
    return t.dtype if t.dtype.is_floating_point else torch.float32


class _PerturbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, spec, args):
        y, tape = spec.run(theta, args, with_tape=True)
        ctx.tape, ctx.theta_dtype = tape, theta.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        g = ctx.tape.vjp(dy.detach().to("cpu", torch.float32).contiguous().numpy())
        return torch.from_numpy(g).to(device=dy.device, dtype=ctx.theta_dtype), None, None


def perturbed(func=None, num_samples=1000, sigma=0.05, noise=_NORMAL, batched=True, device=None):
    """Turns `func` into its perturbed, differentiable version (the seed's
    `perturbations.perturbed`), as a function or, when `func` is None, a decorator.

    func: vectorized over a leading dimension: [rows, D1, ..., Dk] -> [rows, ...] (or [rows]).
    num_samples: N, perturbed copies per input. sigma: the noise's scale.
    noise: 'normal' or 'gumbel'. batched: inputs carry a leading batch dimension (rank >= 2).
    device: accepted for compatibility; the work follows the input's device.
    """
    _check_noise(noise)

    def _perturbed(func):
        spec = _Spec(func, num_samples, sigma, noise)

        @functools.wraps(func)
        def wrapper(input_tensor, *args):
            if not isinstance(input_tensor, torch.Tensor):
                input_tensor = torch.as_tensor(input_tensor)
            if batched:
                if not input_tensor.dim() >= 2:
                    raise ValueError("Batched inputs must have at least rank two")
                theta = input_tensor
            else:  # adds a dummy batch dimension
                theta = input_tensor.unsqueeze(0)
            if torch.is_grad_enabled() and theta.requires_grad:
                y = _PerturbedFunction.apply(theta, spec, args)
            else:
                y, _ = spec.run(theta, args, with_tape=False)
            return y if batched else y[0]

        wrapper.num_samples, wrapper.sigma, wrapper.noise, wrapper.device = num_samples, sigma, noise, device
        return wrapper

    if func is not None:
        return _perturbed(func)
    return _perturbed


class _FenchelYoungFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, y_true, loss_module, args):
        with torch.no_grad():
            diff = loss_module.perturbed(theta.detach(), *args) - y_true.detach().to(theta.dtype)
        if not loss_module._maximize:
            diff = -diff
        if loss_module._batched:
            loss = torch.sum(torch.reshape(diff, [diff.shape[0], -1]) ** 2, dim=-1)
        else:
            loss = torch.sum(diff ** 2)
        ctx.save_for_backward(diff)
        ctx.batched = loss_module._batched
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (diff,) = ctx.saved_tensors
        if ctx.batched:  # dy is [batch]
            dy = torch.reshape(dy, [dy.shape[0]] + (diff.dim() - 1) * [1])
        return dy * diff, None, None, None


class FenchelYoungLoss(torch.nn.Module):
    """The seed's Fenchel-Young loss module: `loss_fn(theta, y_true, *args)` gives, per
    example when batched, ||y_sigma(theta) - y_true||^2 (the seed's value), and its gradient
    with respect to theta is the Fenchel-Young gradient y_sigma(theta) - y_true (negated
    when `maximize` is False); y_true gets none. `.perturbed` is the perturbed `func`."""

    def __init__(self, func=None, num_samples=1000, sigma=0.01, noise=_NORMAL, batched=True, maximize=True,
                 device=None):
        super().__init__()
        self._batched = batched
        self._maximize = maximize
        self.func = func
        self.num_samples, self.sigma, self.noise, self.device = num_samples, sigma, noise, device
        self.perturbed = perturbed(func=func, num_samples=num_samples, sigma=sigma, noise=noise, batched=batched,
                                   device=device)

    def forward(self, theta, y_true, *args):
        return _FenchelYoungFunction.apply(theta, y_true, self, args)
