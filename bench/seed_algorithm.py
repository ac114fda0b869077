"""The seed's algorithm (../shared/seed, a PyTorch port of Berthet et al.'s perturbations),
reimplemented faithfully as the baseline of `make bench`: noise drawn with
torch.distributions on the CPU, one vectorized solver call on all N x B inputs, the mean,
and the two-einsum VJP of the seed's backward pass."""

import torch
from torch.distributions.gumbel import Gumbel
from torch.distributions.normal import Normal

_GUMBEL = "gumbel"
_NORMAL = "normal"


def sample_noise_with_gradients(noise, shape):
    """As the seed: samples and the gradient of -log density at the samples."""
    if noise == _GUMBEL:
        sampler = Gumbel(0.0, 1.0)
        samples = sampler.sample(shape)
        gradients = 1 - torch.exp(-samples)
    elif noise == _NORMAL:
        sampler = Normal(0.0, 1.0)
        samples = sampler.sample(shape)
        gradients = samples
    else:
        raise ValueError(noise)
    return samples, gradients


def perturbed_forward(func, input_tensor, num_samples, sigma, noise, device):
    """Forward of the seed's `perturbed` decorator (batched): returns the mean and what the
    backward pass keeps (the perturbed outputs and the noise gradients)."""
    input_shape = input_tensor.shape
    perturbed_input_shape = [num_samples] + list(input_shape)
    noises = sample_noise_with_gradients(noise, perturbed_input_shape)
    additive_noise, noise_gradient = tuple([n.type(input_tensor.dtype) for n in noises])
    additive_noise = additive_noise.to(device)
    noise_gradient = noise_gradient.to(device)
    perturbed_input = input_tensor.unsqueeze(0) + sigma * additive_noise
    flat_batch_dim_shape = [-1] + list(input_shape)[1:]
    perturbed_input = torch.reshape(perturbed_input, flat_batch_dim_shape)
    perturbed_output = func(perturbed_input)
    perturbed_input = torch.reshape(perturbed_input, perturbed_input_shape)
    perturbed_output_shape = [num_samples, -1] + list(perturbed_output.shape)[1:]
    perturbed_output = torch.reshape(perturbed_output, perturbed_output_shape)
    forward_output = torch.mean(perturbed_output, dim=0)
    return forward_output, (perturbed_output, noise_gradient)


def perturbed_backward(saved, dy, num_samples, sigma):
    """The seed's backward: two einsums."""
    output, noise_grad = saved
    if output.dim() == noise_grad.dim():  # square case as in the seed's argmax
        g = torch.einsum("nbd,nb->bd", noise_grad, torch.einsum("nbd,bd->nb", output, dy))
    else:
        g = torch.einsum("nbd,nb->bd", noise_grad, output * dy.unsqueeze(0))
    return g / (num_samples * sigma)


def argmax(x):
    return torch.nn.functional.one_hot(torch.argmax(x, dim=-1), x.shape[-1]).float()


def topk_indicator(k):
    def solve(x):
        idx = torch.topk(x, k, dim=-1).indices
        return torch.zeros_like(x).scatter_(-1, idx, 1.0)
    return solve
