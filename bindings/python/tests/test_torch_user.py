"""perturbations.torch as a PyTorch user calls it (issue 28): forward-mode AD and the
torch.func transforms, non-finite upstream gradients, the tape freed after backward, the
modules and their reductions, deepcopy (EMA), DataLoader workers."""

import copy
import gc
import math

import numpy as np
import pytest

import perturbations as pt
from conftest import SIGMA, THETA, argmax_rows

torch = pytest.importorskip("torch")
import perturbations.torch as ptt  # noqa: E402

N = 2000


def cfg(**kw):
    return pt.Config(**{"num_samples": N, "sigma": SIGMA, "noise": "gumbel", "seed": 21, "device": "cpu", **kw})


def twin_tape(theta, **kw):
    """The tape of the same call made by a fresh op of the same settings."""
    return pt.Op.builtin(cfg(**kw), "argmax", 5).forward_with_tape(theta)


def test_forward_mode_ad_carries_the_tangent_through_the_tape_jvp():
    import torch.autograd.forward_ad as fwAD
    theta = torch.tensor(THETA)
    t = torch.tensor([[1.0, 0.0, -1.0, 0.5, 0.0], [0.0, 2.0, 0.0, 0.0, -1.0]])
    _, tape = twin_tape(theta)
    want = tape.jvp(t)
    assert want.abs().sum() > 0
    with fwAD.dual_level():
        y = ptt.perturbed(pt.Op.builtin(cfg(), "argmax", 5), fwAD.make_dual(theta, t))
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None and torch.allclose(tangent, want, atol=1e-6)
    y2, jvp = torch.func.jvp(lambda th: ptt.perturbed(pt.Op.builtin(cfg(), "argmax", 5), th), (theta,), (t,))
    assert torch.allclose(jvp, want, atol=1e-6)
    # a Fenchel-Young loss's tangent: <grad, t> per problem
    op = pt.Op.builtin(cfg(), "argmax", 5)
    y_true = torch.eye(5)[[1, 3]]
    _, grad = pt.Op.builtin(cfg(), "argmax", 5).fenchel_young(theta, y_true)
    _, lt = torch.func.jvp(lambda th: ptt.fenchel_young(op, th, y_true), (theta,), (t,))
    assert torch.allclose(lt, (grad * t).sum(dim=1), atol=1e-5)


def test_torch_func_grad_vmap_jacrev_and_a_clear_error_for_second_derivatives():
    theta = torch.tensor(THETA)
    g = torch.tensor([[1.0, -1.0, 0.5, 0.0, 2.0], [0.0, 1.0, 0.0, -0.5, 0.0]])
    _, tape = twin_tape(theta)
    op = pt.Op.builtin(cfg(), "argmax", 5)
    grad = torch.func.grad(lambda th: (ptt.perturbed(op, th) * g).sum())(theta)
    assert torch.allclose(grad, tape.vjp(g), atol=1e-6)
    # vmap: one call over the vmapped batch, as the batched call
    grid = torch.stack([theta, theta.flip(0)])
    y = torch.func.vmap(lambda th: ptt.perturbed(pt.Op.builtin(cfg(), "argmax", 5), th))(grid)
    assert torch.equal(y, pt.Op.builtin(cfg(), "argmax", 5).forward(grid))
    # jacrev: one VJP per output entry, the tape's Jacobian
    jac = torch.func.jacrev(lambda th: ptt.perturbed(pt.Op.builtin(cfg(), "argmax", 5), th))(theta)
    dense = tape.jacobian()  # [2, 5, 5]
    for b in range(2):
        assert torch.allclose(jac[b, :, b, :], dense[b], atol=1e-6)
        assert jac[b, :, 1 - b, :].abs().max() == 0
    # vmap of grad: per-example gradients
    per = torch.func.vmap(torch.func.grad(
        lambda th: ptt.perturbed(pt.Op.builtin(cfg(), "argmax", 5), th)[:, 1].sum()))(grid)
    _, grid_tape = pt.Op.builtin(cfg(), "argmax", 5).forward_with_tape(grid)
    assert torch.allclose(per, grid_tape.vjp(torch.tensor([0.0, 1, 0, 0, 0]).expand(2, 2, 5)), atol=1e-6)
    with pytest.raises(RuntimeError, match="derivative of a gradient"):
        torch.func.hessian(lambda th: ptt.perturbed(op, th)[0, 1])(theta)
    th = theta.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ptt.perturbed(op, th)[0, 1], th, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative of a gradient"):
        gr.sum().backward()
    with pytest.raises(pt.InvalidArgumentError, match="torch.func"):
        torch.func.vmap(op.forward)(grid)
    # the loss's second derivative in theta is refused too (its gradient's Jacobian)
    y_true = torch.eye(5)[[1, 3]]
    with pytest.raises(RuntimeError, match="derivative of a gradient"):
        torch.func.hessian(lambda t: ptt.fenchel_young(op, t, y_true, reduction="sum"))(theta)
    th = theta.clone().requires_grad_(True)
    (gl,) = torch.autograd.grad(ptt.fenchel_young(op, th, y_true, reduction="sum"), th, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative of a gradient"):
        gl.sum().backward()
    # its derivative in y_true (minus theta) is exact and allowed
    yt = y_true.clone().requires_grad_(True)
    th = theta.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad(ptt.fenchel_young(op, th, yt, reduction="sum"), yt, create_graph=True)
    gy.sum().backward()
    assert torch.equal(th.grad, -torch.ones(2, 5))
    # and the gradient in theta (y_sigma - y_true, maximizing) has derivative -I in y_true,
    # by reverse and forward mode, and in eager mode with create_graph
    def grad_theta(yy):
        return torch.func.grad(lambda t: ptt.fenchel_young(op, t, yy, reduction="sum"))(theta)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        jac = transform(grad_theta)(y_true)  # [2, 5, 2, 5]
        assert torch.equal(jac.reshape(10, 10), -torch.eye(10)), transform.__name__
    yt = y_true.clone().requires_grad_(True)
    th = theta.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(ptt.fenchel_young(op, th, yt, reduction="sum"), th, create_graph=True)
    (gyt,) = torch.autograd.grad((gt * torch.arange(10.0).reshape(2, 5)).sum(), yt)
    assert torch.equal(gyt, -torch.arange(10.0).reshape(2, 5))


def test_per_problem_jacobians_under_vmap_are_each_problems_own():
    # vmap(jacrev(f)) / vmap(jacfwd(f)): the standard per-sample Jacobian, one call over the
    # vmapped batch; a batch as large as the output (5 problems of 5) cannot pass for
    # another layout, and the batch of 3 and the nested vmap check the layouts too
    for batch in (5, 3):
        theta = torch.linspace(-1, 1, batch * 5).reshape(batch, 5).cos()
        _, tape = twin_tape(theta)
        dense = torch.as_tensor(tape.jacobian())  # [batch, 5, 5]
        f = lambda th: ptt.perturbed(pt.Op.builtin(cfg(), "argmax", 5), th)  # noqa: E731
        for transform in (torch.func.jacrev, torch.func.jacfwd):
            jac = torch.func.vmap(transform(f))(theta)
            assert jac.shape == (batch, 5, 5)
            assert torch.allclose(jac, dense, atol=1e-6), (batch, transform.__name__)
        # vmap of a vjp with a cotangent per problem
        g = torch.linspace(-2, 2, batch * 5).reshape(batch, 5)

        def one(th, gg):
            _, back = torch.func.vjp(f, th)
            return back(gg)[0]
        assert torch.allclose(torch.func.vmap(one)(theta, g), torch.as_tensor(tape.vjp(g)), atol=1e-6)
        # two vmapped dimensions: the call sees [2, batch] problems
        grid = torch.stack([theta, theta])
        _, grid_tape = twin_tape(grid)
        nested = torch.func.vmap(torch.func.vmap(torch.func.jacrev(f)))(grid)
        assert torch.allclose(nested, torch.as_tensor(grid_tape.jacobian()), atol=1e-6)
    # derivatives in the cotangent alone, under a vmap over the problems: the VJP is linear
    # in v, its Jacobian in v is J^T per problem (by reverse and by forward mode)
    theta = torch.linspace(-1, 1, 15).reshape(3, 5).cos()
    _, tape = twin_tape(theta)
    dense = torch.as_tensor(tape.jacobian())
    cotangents = torch.linspace(-1, 1, 20).reshape(4, 5)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        def per(th):
            _, back = torch.func.vjp(f, th)
            return transform(lambda vs: torch.func.vmap(lambda v: back(v)[0])(vs))(cotangents)
        got = torch.func.vmap(per)(theta)  # [3 problems, 4, 5, 4, 5]
        for r in range(4):
            assert torch.allclose(got[:, r, :, r, :], dense.transpose(1, 2), atol=1e-6), transform.__name__
            assert got[:, r, :, (r + 1) % 4, :].abs().max() == 0
    # no problem: an empty Jacobian, as torch's own functions give
    assert torch.func.jacrev(f)(torch.zeros(0, 5)).shape == (0, 5, 0, 5)


def test_a_non_finite_upstream_gradient_comes_out_non_finite_without_an_exception():
    op = pt.Op.builtin(cfg(), "argmax", 5)
    theta = torch.tensor(THETA, requires_grad=True)
    y = ptt.perturbed(op, theta)
    g = torch.zeros(2, 5)
    g[0, 1] = math.inf  # a GradScaler overflow in problem 0
    g[1, 3] = 1.0
    y.backward(g)
    assert torch.isnan(theta.grad[0]).all()
    _, tape = twin_tape(THETA)
    assert torch.allclose(theta.grad[1], torch.from_numpy(tape.vjp(np.eye(5, dtype=np.float32)[[3, 3]]))[1])
    # a finite float64 cotangent beyond float32's range is not finite for the float32 tape
    th64 = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    g64 = torch.zeros(2, 5, dtype=torch.float64)
    g64[0, 0] = 1e39
    ptt.perturbed(op, th64).backward(g64)
    assert torch.isnan(th64.grad[0]).all() and torch.isfinite(th64.grad[1]).all()
    # the Fenchel-Young loss as well (its backward is torch arithmetic)
    theta.grad = None
    loss = ptt.fenchel_young(op, theta, torch.eye(5)[[1, 3]], reduction="sum")
    loss.backward(torch.tensor(math.nan))
    assert torch.isnan(theta.grad).all()


def test_the_tape_is_freed_after_backward_unless_the_graph_is_retained():
    op = pt.Op.builtin(cfg(), "argmax", 5)
    theta = torch.tensor(THETA, requires_grad=True)
    y = ptt.perturbed(op, theta)
    tape = y.grad_fn.tape
    y.sum().backward()
    gc.collect()
    assert tape() is None and y.requires_grad  # y kept, its tape gone
    y = ptt.perturbed(op, theta)
    tape = y.grad_fn.tape
    (g1,) = torch.autograd.grad(y.sum(), theta, retain_graph=True)
    gc.collect()
    assert tape() is not None
    (g2,) = torch.autograd.grad(y.sum(), theta)
    gc.collect()
    assert tape() is None and torch.equal(g1, g2)
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


def test_the_modules_and_their_reductions():
    op = pt.Op.builtin(cfg(), "argmax", 5)
    theta = torch.tensor(THETA, requires_grad=True)
    y_true = torch.eye(5)[[1, 3]]
    per = pt.Op.builtin(cfg(), "argmax", 5).fenchel_young(THETA, y_true.numpy())[0]
    for reduction, want in (("mean", per.mean()), ("sum", per.sum()), ("none", per)):
        fy = ptt.FenchelYoungLoss(pt.Op.builtin(cfg(), "argmax", 5), reduction=reduction)
        got = fy(theta, y_true)
        assert np.allclose(got.detach().numpy(), want, atol=1e-6)
        loss = ptt.fenchel_young(pt.Op.builtin(cfg(), "argmax", 5), theta, y_true, reduction=reduction)
        assert np.allclose(loss.detach().numpy(), want, atol=1e-6)
    assert ptt.FenchelYoungLoss(op).reduction == "mean"
    with pytest.raises(ValueError):
        ptt.FenchelYoungLoss(op, reduction="average")
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), ptt.Perturbed(pt.Op.builtin(cfg(), "argmax", 5)))
    out = model(torch.ones(4, 3))
    assert out.shape == (4, 5) and out.requires_grad
    out.sum().backward()
    assert model[0].weight.grad is not None
    # a target given as a plain list broadcasts over the batch
    assert ptt.FenchelYoungLoss(op, reduction="none")(theta, [0, 1, 0, 0, 0]).shape == (2,)
    assert "reduction='mean'" in repr(ptt.FenchelYoungLoss(op))


def test_deepcopy_of_a_model_holding_an_op_and_averaged_models():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), ptt.Perturbed(pt.Op.builtin(cfg(), "argmax", 5)))
    clone = copy.deepcopy(model)
    assert clone[1].op is not model[1].op
    x = torch.ones(2, 3)
    assert torch.equal(clone(x), model(x))  # the same settings, each at its first call
    ema = torch.optim.swa_utils.AveragedModel(model)
    ema.update_parameters(model)
    assert ema(x).shape == (2, 5)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(model, "/dev/null")


class _Noisy(torch.utils.data.Dataset):
    """Each item is a perturbed solution drawn by an op made in the parent process."""

    def __init__(self, op):
        self.op = op

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(self.op.forward(THETA[:1]))[0]


def _worker_draws(seed):
    op = pt.Op(pt.Config(num_samples=3, sigma=5.0, seed=7, device="cpu"), 5, 5, argmax_rows)
    loader = torch.utils.data.DataLoader(_Noisy(op), batch_size=1, num_workers=2,
                                         multiprocessing_context="fork")
    torch.manual_seed(seed)
    return torch.cat(list(loader))


def test_dataloader_workers_draw_their_own_repeatable_noise():
    draws = _worker_draws(0)
    # items 0, 2 come from worker 0 and 1, 3 from worker 1, each at its first and second call
    assert not torch.equal(draws[0], draws[1]), "both workers drew the same noise"
    assert torch.equal(draws, _worker_draws(0))  # repeatable for a seed
    assert not torch.equal(draws, _worker_draws(1))
