"""PyTorch integration: tensors in and out (device, dtype), autograd through the tape's
VJP checked against the closed form, no tape without grad, Fenchel-Young gradients."""

import math

import numpy as np
import pytest

import perturbations as pt

SIGMA = 0.5
THETA = np.array([[-0.6, 1.9, -0.2, 1.1, -1.0], [-0.6, 1.0, -0.2, 1.8, -1.0]], dtype=np.float32)

torch = pytest.importorskip("torch")


def test_torch_tensors_in_and_out_and_autograd_is_the_tape_vjp():
    import perturbations.torch as ptt
    cfg = pt.Config(num_samples=5000, sigma=SIGMA, noise="gumbel", seed=5, device="cpu")
    op, twin = pt.Op.builtin(cfg, "argmax", (5,)), pt.Op.builtin(cfg, "argmax", (5,))
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    y = ptt.perturbed(op, theta)
    assert y.dtype == torch.float64 and y.shape == (2, 5)
    g = torch.tensor([[1.0, -1.0, 0.5, 0.0, 2.0], [0.0, 1.0, 0.0, -0.5, 0.0]], dtype=torch.float64)
    (y * g).sum().backward()
    y2, tape = twin.forward_with_tape(theta.detach())
    assert torch.equal(y.detach(), y2)
    assert torch.allclose(theta.grad, tape.vjp(g), atol=1e-5)
    # gradcheck-style against the closed form: J = (diag p - p p^T) / sigma
    p = torch.softmax(theta.detach() / SIGMA, dim=-1)
    exact = torch.einsum("bo,bod->bd", g, (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) / SIGMA)
    assert (theta.grad - exact).abs().max() < 5 * g.abs().sum(dim=1).max() / (SIGMA * math.sqrt(5000))


def test_torch_no_tape_without_grad_and_fenchel_young_gradients():
    import perturbations.torch as ptt
    op = pt.Op.builtin(pt.Config(num_samples=200, sigma=SIGMA, device="cpu"), "argmax", (5,))
    with torch.no_grad():
        y = ptt.perturbed(op, torch.tensor(THETA, requires_grad=True))
    assert not y.requires_grad
    for sense, sign in (("maximize", -1.0), ("minimize", 1.0)):
        fy = pt.Op.builtin(pt.Config(num_samples=200, sigma=SIGMA, device="cpu", sense=sense), "argmax", (5,))
        theta = torch.tensor(THETA, requires_grad=True)
        target = torch.eye(5)[[1, 3]].requires_grad_(True)
        (ptt.fenchel_young(fy, theta, target) * torch.tensor([1.0, 2.0])).sum().backward()
        assert torch.allclose(target.grad, sign * theta.detach() * torch.tensor([[1.0], [2.0]]))
        assert theta.grad.abs().sum() > 0


def test_torch_retained_graphs_and_integer_inputs():
    import perturbations.torch as ptt
    op = pt.Op.builtin(pt.Config(num_samples=300, sigma=SIGMA, device="cpu"), "argmax", (5,))
    theta = torch.tensor(THETA, requires_grad=True)
    y = ptt.perturbed(op, theta)
    (g1,) = torch.autograd.grad(y.sum(), theta, retain_graph=True)
    (g2,) = torch.autograd.grad(y.sum(), theta)
    assert torch.equal(g1, g2)
    out = op.forward(torch.tensor([[0, 3, 1, 2, 0]]))
    assert out.dtype == torch.float32 and float(out.sum()) == pytest.approx(1.0)
