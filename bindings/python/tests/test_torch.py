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
        best = np.argmin if sense == "minimize" else np.argmax
        fy = pt.Op(pt.Config(num_samples=200, sigma=SIGMA, device="cpu", sense=sense), 5, 5,
                   lambda x, best=best: np.eye(5, dtype=np.float32)[best(x, axis=1)])
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


def test_plain_cpu_float32_tensors_are_read_and_written_in_place_with_the_same_numbers():
    # a contiguous CPU float32 tensor goes to the library as it is (no numpy array in
    # between); its results must be the numpy path's, bit for bit, and float32 tensors
    # whatever torch's default dtype; an odd address or a broadcast target still works
    def ops():
        cfg = pt.Config(num_samples=64, sigma=SIGMA, seed=11, device="cpu")
        return pt.Op.builtin(cfg, "argmax", (5,)), pt.Op.builtin(cfg, "argmax", (5,))

    op, twin = ops()
    g = np.array([[1.0, -1.0, 0.5, 0.0, 2.0], [0.0, 1.0, 0.0, -0.5, 0.0]], dtype=np.float32)
    y_np, tape_np = twin.forward_with_tape(THETA)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y, tape = op.forward_with_tape(torch.from_numpy(THETA.copy()))
        vjp, jac, obj = tape.vjp(torch.from_numpy(g)), tape.jacobian(), tape.objective()
        jvp = tape.jvp(torch.from_numpy(g))
    finally:
        torch.set_default_dtype(before)
    for got, want in ((y, y_np), (vjp, tape_np.vjp(g)), (jac, tape_np.jacobian()), (obj, tape_np.objective()),
                      (jvp, tape_np.jvp(g))):
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert np.array_equal(got.numpy(), want)
    # results are made on the CPU whatever torch's default device (the library writes them)
    op, twin = ops()
    with torch.device("meta"):
        y_meta = op.forward(torch.from_numpy(THETA.copy()))
    assert y_meta.device.type == "cpu" and np.array_equal(y_meta.numpy(), twin.forward(THETA))
    # a float32 tensor at an address that is not a multiple of 4 (copied first)
    raw = bytearray(THETA.size * 4 + 1)
    buf = np.frombuffer(raw, dtype=np.uint8)[1:].view(np.float32).reshape(THETA.shape)
    buf[...] = THETA
    odd = torch.from_numpy(buf)
    assert odd.data_ptr() % 4 != 0
    op, twin = ops()
    assert torch.equal(op.forward(odd), torch.from_numpy(twin.forward(THETA)))
    # a negative view (its memory holds -theta) gives theta's results, not its memory's
    op, twin = ops()
    assert torch.equal(op.forward(torch._neg_view(torch.from_numpy(-THETA))), torch.from_numpy(twin.forward(THETA)))
    # the Fenchel-Young loss with a target that broadcasts, tensors against numpy
    op, twin = ops()
    target = torch.eye(5)[1]
    loss, grad = op.fenchel_young(torch.from_numpy(THETA.copy()), target)
    loss_np, grad_np = twin.fenchel_young(THETA, np.eye(5, dtype=np.float32)[[1, 1]])
    assert loss.dtype == torch.float32 and np.array_equal(loss.numpy(), loss_np)
    assert np.array_equal(grad.numpy(), grad_np)


def test_integer_and_boolean_tensors_are_converted_not_read_as_float_bytes():
    # one-hot solutions kept as long or bool tensors, and integer costs, are common in
    # decision-focused code: their values, not their bytes, reach the library
    import perturbations.torch as ptt

    def argmin_rows(x):
        return np.eye(x.shape[1], dtype=np.float32)[np.argmin(x, axis=1)]

    def op(**kw):
        cfg = pt.Config(num_samples=8, sigma=1e-3, device="cpu", sense="minimize", linear_objective=True, **kw)
        return pt.Op(cfg, 5, 5, argmin_rows)

    cost = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0], [2.0, 4.0, 1.0, 3.0, 5.0]])
    sol = torch.from_numpy(argmin_rows(cost.numpy()))
    obj = (cost * sol).sum(1)
    for kind in (torch.long, torch.int32, torch.bool, torch.uint8):
        assert torch.equal(ptt.spo_plus(op(), cost, cost, sol.to(kind), obj, "none"), torch.zeros(2)), kind
        assert torch.equal(op().solve(cost.to(kind) if kind is not torch.bool else sol.bool()),
                           sol if kind is not torch.bool else torch.from_numpy(argmin_rows(sol.numpy()))), kind
    y = ptt.perturbed(op(), cost.long())
    assert y.dtype == torch.float32 and torch.equal(y, sol)
    with_long, with_float = op(), op()
    for o, members in ((with_long, torch.eye(5).long()), (with_float, torch.eye(5))):
        pool = pt.Pool(5, 10)
        pool.add(members)
        o.set_pool(pool)
    assert torch.equal(ptt.nce(with_long, cost, sol.long(), "none"), ptt.nce(with_float, cost, sol, "none"))
    with pytest.raises(pt.InvalidArgumentError, match="real numbers"):
        op().solve(cost.to(torch.complex64))


def test_a_builtin_op_refuses_the_minimize_sense():
    # the built-ins maximize: a minimizing op over one would give SPO+ and PG the wrong
    # sign and disagree with the pool losses, silently
    with pytest.raises(pt.InvalidArgumentError, match="built-in solvers maximize"):
        pt.Op.builtin(pt.Config(sense="minimize", device="cpu"), "argmax", 5)
    with pytest.raises(pt.InvalidArgumentError, match="sense maximize"):
        pt.Op.builtin(pt.Config(sense="minimize", device="cpu"), "topk", 5, k=2)
    pt.Op.builtin(pt.Config(sense="maximize", device="cpu"), "ranks", 5).close()


def test_fenchel_young_target_may_change_in_place_before_backward():
    # backward never reads y_true's values (only create_graph's derivative in it uses the
    # tensor): changing it in place after the loss is computed leaves backward working
    import perturbations.torch as ptt
    op = pt.Op.builtin(pt.Config(num_samples=50, sigma=SIGMA, device="cpu"), "argmax", (5,))
    theta = torch.tensor(THETA, requires_grad=True)
    y = torch.eye(5)[[1, 3]].requires_grad_(True)
    target = y * 1.0
    loss = ptt.fenchel_young(op, theta, target, reduction="sum")
    with torch.no_grad():
        target.zero_()
    loss.backward()
    assert torch.isfinite(theta.grad).all() and torch.equal(y.grad, -theta.detach())
