"""perturbations.compat, the drop-in for the seed's PyTorch module, tested on the seed's
README examples (perturbed argmax against softmax, batched and unbatched, decorator,
gradients against the softmax gradient, the perturbed OR) and its API's edges. Tolerances
are 5 standard deviations of the estimator (MATH.md)."""

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from perturbations import compat as perturbations  # noqa: E402

SIGMA = 0.5
ROWS = [[-0.6, 1.9, -0.2, 1.1, -1.0], [-0.6, 1.0, -0.2, 1.8, -1.0]]


def argmax(x, axis=-1):
    return F.one_hot(torch.argmax(x, dim=axis), list(x.shape)[axis]).float()


def hard_or(x):
    s = ((torch.sign(x) + 1) / 2.0).type(torch.bool)
    result = torch.any(s, dim=-1)
    return result.type(torch.float) * 2.0 - 1


def test_perturbed_argmax_is_softmax_unbatched_batched_and_as_a_decorator():
    n = 100_000
    tol = lambda p: 5 * torch.sqrt(p * (1 - p) / n) + 1e-6  # noqa: E731
    pert_argmax = perturbations.perturbed(argmax, num_samples=n, sigma=SIGMA, noise="gumbel", batched=False)
    theta = torch.tensor(ROWS[0])
    y = pert_argmax(theta)
    p = F.softmax(theta / SIGMA, dim=-1)
    assert y.shape == (5,) and y.dtype == torch.float32
    assert torch.all((y - p).abs() <= tol(p))

    theta_batch = torch.tensor(ROWS, requires_grad=True)
    pert_batched = perturbations.perturbed(argmax, num_samples=n, sigma=SIGMA, noise="gumbel", batched=True)
    y = pert_batched(theta_batch)
    p = F.softmax(theta_batch.detach() / SIGMA, dim=-1)
    assert y.shape == (2, 5) and torch.all((y.detach() - p).abs() <= tol(p))

    @perturbations.perturbed(num_samples=n, sigma=SIGMA, noise="gumbel", batched=True)
    def decorated(x, axis=-1):
        return F.one_hot(torch.argmax(x, dim=axis), list(x.shape)[axis]).float()

    assert decorated.__name__ == "decorated"
    assert torch.all((decorated(theta_batch).detach() - p).abs() <= tol(p))


def test_gradient_of_the_norm_matches_the_softmax_gradient():
    n = 100_000
    pert_argmax = perturbations.perturbed(argmax, num_samples=n, sigma=SIGMA, noise="gumbel", batched=True)
    theta = torch.tensor(ROWS, requires_grad=True)
    torch.linalg.norm(pert_argmax(theta)).backward()
    grad_pert = theta.grad.clone()

    soft = torch.tensor(ROWS, requires_grad=True)
    norm = torch.linalg.norm(F.softmax(soft / SIGMA, dim=-1))
    norm.backward()
    grad_soft = soft.grad
    # backward's VJP takes dy = y / ||y||, entries in [0, 1]: each gradient entry has a
    # standard deviation below max|dy| / (sigma sqrt(N)) (one-hot outputs)
    assert (grad_pert - grad_soft).abs().max() < 5 / (SIGMA * math.sqrt(n))
    assert grad_pert.abs().max() > 0.1  # the gradient is there (the softmax one reaches 0.17)


def test_perturbed_or_full_reduce_has_its_closed_form():
    n = 100_000
    sigma = 0.1
    pert_or = perturbations.perturbed(hard_or, num_samples=n, sigma=sigma, noise="gumbel", batched=True)
    theta = torch.tensor([[-5.0, 0.2], [-5.0, 0.1]])
    y = pert_or(theta)
    assert y.shape == (2,)
    exact = 1 - 2 * torch.prod(torch.exp(-torch.exp(theta / sigma)), dim=-1)
    assert torch.all((y - exact).abs() <= 5 / math.sqrt(n))  # s.d. of a +-1 mean <= 1/sqrt(N)
    # the two instances differ, as in the seed's README (1.0000 and 0.8540 there)
    assert float(y[0]) > 0.99 and abs(float(y[1]) - 0.854) < 0.02


def test_extra_arguments_reach_func_and_dtypes_follow_the_seed():
    seen = []

    def along(x, axis):
        seen.append((tuple(x.shape), x.dtype, axis))
        return argmax(x, axis=axis)

    pert = perturbations.perturbed(along, num_samples=7, sigma=0.1)
    theta = torch.tensor(ROWS, dtype=torch.float64, requires_grad=True)
    y = pert(theta, -1)
    assert seen == [((14, 5), torch.float64, -1)]  # one vectorized call over batch * N rows
    assert y.dtype == torch.float32  # func's output dtype
    y.sum().backward()
    assert theta.grad.dtype == torch.float64 and theta.grad.shape == (2, 5)


def test_fresh_noise_per_call_repeatable_with_torch_manual_seed():
    pert = perturbations.perturbed(argmax, num_samples=20, sigma=1.0)
    theta = torch.tensor(ROWS)
    torch.manual_seed(4)
    a, b = pert(theta), pert(theta)
    torch.manual_seed(4)
    c = pert(theta)
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_errors_are_the_seeds():
    with pytest.raises(ValueError, match="cauchy noise is not supported"):
        perturbations.perturbed(argmax, noise="cauchy")
    with pytest.raises(ValueError, match="at least rank two"):
        perturbations.perturbed(argmax)(torch.tensor(ROWS[0]))
    with pytest.raises(ValueError):
        perturbations.sample_noise_with_gradients("uniform", [2])
    with pytest.raises(ValueError):
        perturbations.FenchelYoungLoss(argmax, noise="laplace")


def test_sample_noise_with_gradients():
    assert perturbations._GUMBEL == "gumbel" and perturbations._NORMAL == "normal"
    z, g = perturbations.sample_noise_with_gradients(perturbations._GUMBEL, [1000, 3])
    assert z.shape == (1000, 3) and torch.allclose(g, 1 - torch.exp(-z))
    assert abs(float(g.mean())) < 5 / math.sqrt(3000)  # E[1 - e^-Z] = 0 (unit variance)
    z, g = perturbations.sample_noise_with_gradients(perturbations._NORMAL, (4,))
    assert torch.equal(z, g)


@pytest.mark.parametrize("maximize", [True, False])
def test_fenchel_young_loss_value_and_gradient_to_theta_only(maximize):
    loss_fn = perturbations.FenchelYoungLoss(argmax, num_samples=500, sigma=0.5, maximize=maximize)
    assert isinstance(loss_fn, torch.nn.Module)
    theta = torch.tensor(ROWS, requires_grad=True)
    y_true = torch.eye(5)[[1, 3]].requires_grad_(True)
    torch.manual_seed(11)
    loss = loss_fn(theta, y_true)
    torch.manual_seed(11)  # the same draws
    y_sigma = loss_fn.perturbed(theta.detach())
    diff = (y_sigma - y_true.detach()) * (1 if maximize else -1)
    assert loss.shape == (2,) and torch.allclose(loss, (diff ** 2).sum(dim=-1))
    (loss * torch.tensor([1.0, 3.0])).sum().backward()
    assert torch.allclose(theta.grad, diff * torch.tensor([[1.0], [3.0]]))
    assert y_true.grad is None

    unbatched = perturbations.FenchelYoungLoss(argmax, num_samples=50, sigma=0.5, batched=False)
    value = unbatched(torch.tensor(ROWS[0], requires_grad=True), torch.eye(5)[1])
    assert value.shape == ()


def test_rows_come_in_the_seeds_order_so_tiled_arguments_line_up():
    n = 2000

    def masked_argmax(x, mask):  # mask tiled the seed's way: [N * batch, 3]
        return argmax(x - 1e4 * mask)

    pert = perturbations.perturbed(masked_argmax, num_samples=n, sigma=0.5)
    theta = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).repeat(n, 1)
    y = pert(theta, mask)
    assert y[0, 0] > 0.8 and y[1, 0] == 0.0  # the second problem's first entry is masked


def test_float64_inputs_are_perturbed_in_float64_and_batch_0_has_a_gradient():
    n = 100_000
    pert = perturbations.perturbed(argmax, num_samples=n, sigma=0.01)
    theta = torch.tensor([[1e6, 1e6 + 0.02]], dtype=torch.float64, requires_grad=True)
    y = pert(theta)
    p = 0.5 * (1 + math.erf(0.02 / (0.01 * math.sqrt(2)) / math.sqrt(2)))  # Phi(2/sqrt(2))
    assert abs(float(y[0, 1].detach()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    empty = torch.zeros(0, 5, requires_grad=True)
    pert(empty).sum().backward()
    assert empty.grad.shape == (0, 5)


def test_double_backward_and_the_seeds_keyword_names():
    pert = perturbations.perturbed(argmax, num_samples=200, sigma=0.5)
    theta = torch.tensor(ROWS, requires_grad=True)
    (g,) = torch.autograd.grad(torch.linalg.norm(pert(theta)), theta, create_graph=True)
    g.pow(2).sum().backward()  # a gradient penalty, as with the seed
    loss_fn = perturbations.FenchelYoungLoss(argmax, num_samples=50, sigma=0.5)
    assert loss_fn(input_tensor=torch.tensor(ROWS), y_true=torch.eye(5)[[1, 3]]).shape == (2,)
