"""A drop-in for the seed's PyTorch module (`import perturbations`, the PyTorch port of
Berthet et al.'s code): the same names, arguments and semantics, computed by this library.
Change the import line and keep the rest of the program:

    from perturbations import compat as perturbations

    pert_argmax = perturbations.perturbed(argmax, num_samples=1000000, sigma=0.5,
                                          noise='gumbel', batched=True)
    y = pert_argmax(theta_batch)          # differentiable: y.backward(...) reaches theta
    loss_fn = perturbations.FenchelYoungLoss(argmax, num_samples=100, sigma=0.1)

What is the same: `func` is vectorized over a leading dimension of torch tensors and called
once per call on the num_samples * batch perturbed inputs theta + sigma*Z, in theta's
dtype on theta's device, ordered as the seed orders them ([num_samples, batch]
flattened), so extra positional arguments tiled the seed's way still line up; batched
inputs must have rank >= 2 (`ValueError` otherwise), unbatched ones get a dummy batch
dimension; a scalar output per input (`func` returning [rows]) is allowed; an unknown
noise raises `ValueError` when the function is made; each call draws fresh noise from a
seed taken from torch's default generator, so `torch.manual_seed` makes runs repeatable;
the same draws serve forward and backward (no `func` call in backward), and the backward
pass is made of torch operations (so it can be differentiated again).

What differs, on purpose: the noise comes from the library's own counter-based streams
(not torch.distributions); the gradient uses the library's default sample-mean baseline
(unbiased, lower variance; the plain estimator when num_samples is 1); results and
gradients follow the input's device (the seed's `device` argument is accepted and kept
as an attribute only); integer inputs are perturbed in float32 (the seed truncated the
noise to integers); `func` runs without grad mode, as inside the seed's autograd Function.

`FenchelYoungLoss` returns the seed's value, the squared distance ||y_sigma(theta) - y||^2
per example (or summed, unbatched), with the Fenchel-Young gradient y_sigma(theta) - y
(its negation when minimizing) reaching theta only. For the true Fenchel-Young loss value
use `perturbations.torch.fenchel_young`.
"""

import functools

import numpy as np
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
    """The settings of one perturbed function."""

    def __init__(self, func, num_samples, sigma, noise):
        self.func, self.num_samples, self.sigma, self.noise = func, num_samples, sigma, noise

    def noise_rows(self, batch, input_shape):
        """sigma * Z for `batch` problems: [num_samples, batch, *input_shape] float32 on the
        CPU, from the library's streams (the perturbed inputs of theta = 0)."""
        cfg = Config(num_samples=self.num_samples, sigma=self.sigma, noise=self.noise, seed=_fresh_seed(),
                     device="cpu")
        with cfg, Op.external(cfg, input_shape, input_shape) as op:
            with op.draw(np.zeros((batch,) + tuple(input_shape), dtype=np.float32)) as draw:
                rows = torch.from_numpy(draw.inputs())  # problem-major [batch * N, *D]
        return rows.view((batch, self.num_samples) + tuple(input_shape)).transpose(0, 1)

    def run(self, theta, args):
        """(y [batch, *output_shape], the noise sigma*Z and the solutions [N, batch, ...])
        for theta [batch, *input_shape], as the seed computes them: the perturbed inputs
        theta + sigma*Z in theta's (floating) dtype on its device, `func` called once on
        the N*batch rows in the seed's order ([N, batch] flattened)."""
        batch, input_shape, n = theta.shape[0], tuple(theta.shape[1:]), self.num_samples
        dtype = _float_dtype(theta)
        theta = theta.detach().to(dtype)
        if batch == 0:
            y = torch.as_tensor(self.func(theta, *args))
            return torch.zeros((0,) + tuple(y.shape[1:]), dtype=_float_dtype(y), device=theta.device), None, None
        z = self.noise_rows(batch, input_shape).to(device=theta.device, dtype=dtype)
        x = (theta.unsqueeze(0) + z).reshape((n * batch,) + input_shape)
        with torch.no_grad():
            y = torch.as_tensor(self.func(x, *args), device=theta.device)
        if y.dim() == 0 or y.shape[0] != n * batch:
            raise ValueError(f"func must return one output per input row ({n * batch} rows), got shape "
                             f"{tuple(y.shape)}")
        y = y.to(_float_dtype(y)).reshape((n, batch) + tuple(y.shape[1:]))
        return y.mean(dim=0), z, y


def _float_dtype(t):
    return t.dtype if t.dtype.is_floating_point else torch.float32


class _PerturbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, spec, args):
        mean, z, y = spec.run(theta, args)
        ctx.spec, ctx.theta_shape, ctx.theta_dtype = spec, theta.shape, _float_dtype(theta)
        if z is None:
            ctx.save_for_backward(theta.new_zeros(()), theta.new_zeros(()), theta.new_zeros(()))
            ctx.empty = True
        else:
            ctx.save_for_backward(z, y, mean)
            ctx.empty = False
        return mean

    @staticmethod
    def backward(ctx, dy):
        if ctx.empty:
            return torch.zeros(ctx.theta_shape, dtype=ctx.theta_dtype, device=dy.device), None, None
        z, y, mean = ctx.saved_tensors
        spec = ctx.spec
        n, batch = y.shape[0], y.shape[1]
        score = z / spec.sigma if spec.noise == _NORMAL else 1 - torch.exp(-z / spec.sigma)
        # the sample-mean baseline (unbiased; the plain estimator for a single sample)
        if n >= 2:
            yc, scale = y - mean.unsqueeze(0), 1.0 / (spec.sigma * (n - 1))
        else:
            yc, scale = y, 1.0 / spec.sigma
        yc = yc.reshape(n, batch, -1).to(dy.dtype)
        score = score.reshape(n, batch, -1).to(dy.dtype)
        g = torch.einsum("nbd,nb->bd", score, torch.einsum("nbo,bo->nb", yc, dy.reshape(batch, -1)))
        return (g * scale).reshape(ctx.theta_shape).to(ctx.theta_dtype), None, None


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
                y, _, _ = spec.run(theta, args)
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
            loss = torch.sum((diff ** 2).reshape(diff.shape[0], -1), dim=-1)
        else:
            loss = torch.sum(diff ** 2)
        ctx.save_for_backward(diff)
        ctx.batched = loss_module._batched
        return loss

    @staticmethod
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

    def forward(self, input_tensor, y_true, *args):
        return _FenchelYoungFunction.apply(input_tensor, y_true, self, args)
