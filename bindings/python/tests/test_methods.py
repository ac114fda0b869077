"""The decision-focused methods over the exact solver (issue 30): SPO+, DBB, NID and PG
equal PyEPO's (pyepo.func 2.2) on the same inputs for both senses, with the same solver
written as a PyEPO optModel; modules, reductions, batch dimensions, dtypes, threads and
workers, and errors."""

import os

import numpy as np
import pytest

import _pyepo_model
import perturbations as pt

torch = pytest.importorskip("torch")
import perturbations.torch as ptt  # noqa: E402

D, B = 6, 12


def _pyepo():
    if os.environ.get("PERT_REQUIRE_PYEPO"):
        import pyepo  # make test installs it: a missing PyEPO fails there
    return pytest.importorskip("pyepo")


def one_hot_best(x, sense):
    x = np.asarray(x, dtype=np.float32)
    best = x.argmin(-1) if sense == "minimize" else x.argmax(-1)
    y = np.zeros_like(x)
    np.put_along_axis(y, best[..., None], 1.0, axis=-1)
    return y


def make_op(sense, threads=1, workers=False):
    cfg = pt.Config(sense=sense, threads=threads, device="cpu")
    if workers:
        return pt.Op.with_workers(cfg, D, D, lambda worker: (lambda x: one_hot_best(x, sense)))
    return pt.Op(cfg, D, D, lambda x: one_hot_best(x, sense))


def pyepo_model(sense):
    return _pyepo_model.pyepo_model(sense, one_hot_best, D)


def data(seed, sense):
    rng = np.random.default_rng(seed)
    pred = torch.tensor(rng.normal(size=(B, D)), dtype=torch.float32)
    cost = torch.tensor(rng.normal(size=(B, D)), dtype=torch.float32)
    sol = torch.tensor(one_hot_best(cost.numpy(), sense))
    obj = (cost.double() * sol.double()).sum(1, keepdim=True).float()
    return pred, cost, sol, obj


@pytest.mark.parametrize("sense", ["minimize", "maximize"])
def test_spo_plus_equals_pyepo(sense):
    _pyepo()
    import pyepo.func
    pred, cost, sol, obj = data(1, sense)
    theirs_pred = pred.clone().requires_grad_(True)
    theirs = pyepo.func.SPOPlus(pyepo_model(sense), processes=1, reduction="none")(theirs_pred, cost, sol, obj)
    (theirs * torch.arange(1.0, B + 1)).sum().backward()
    ours_pred = pred.clone().requires_grad_(True)
    ours = ptt.spo_plus(make_op(sense), ours_pred, cost, sol, obj, reduction="none")
    (ours * torch.arange(1.0, B + 1)).sum().backward()
    assert torch.allclose(ours, theirs.float(), atol=1e-5)
    assert torch.equal(ours_pred.grad, theirs_pred.grad.float())
    assert (ours >= -1e-5).all() and (ours > 0.1).any()
    # 0 at the truth
    assert ptt.spo_plus(make_op(sense), cost, cost, sol, obj, reduction="none").abs().max() < 1e-6


@pytest.mark.parametrize("sense", ["minimize", "maximize"])
def test_blackbox_and_negative_identity_equal_pyepo(sense):
    _pyepo()
    import pyepo.func
    pred, _, _, _ = data(2, sense)
    g = torch.tensor(np.random.default_rng(3).normal(size=(B, D)), dtype=torch.float32)
    for lambd in (0.3, 10.0):
        t1 = pred.clone().requires_grad_(True)
        y1 = pyepo.func.blackboxOpt(pyepo_model(sense), lambd=lambd, processes=1)(t1)
        (y1 * g).sum().backward()
        t2 = pred.clone().requires_grad_(True)
        y2 = ptt.blackbox(make_op(sense), t2, lambd)
        (y2 * g).sum().backward()
        assert torch.equal(y2, y1.float())
        # PyEPO divides by lambd + 1e-8 in float32: the same up to that
        assert torch.allclose(t2.grad, t1.grad.float(), rtol=1e-6, atol=1e-7)
        assert lambd < 1 or t2.grad.abs().sum() > 0
    t1 = pred.clone().requires_grad_(True)
    (pyepo.func.negativeIdentity(pyepo_model(sense), processes=1)(t1) * g).sum().backward()
    t2 = pred.clone().requires_grad_(True)
    (ptt.NegativeIdentity(make_op(sense))(t2) * g).sum().backward()
    assert torch.equal(t2.grad, t1.grad.float())


@pytest.mark.parametrize("sense", ["minimize", "maximize"])
@pytest.mark.parametrize("two_sided", [True, False])
def test_perturbation_gradient_equals_pyepo(sense, two_sided):
    _pyepo()
    import pyepo.func
    pred, cost, _, _ = data(4, sense)
    for sigma in (0.1, 1.0):
        t1 = pred.clone().requires_grad_(True)
        theirs = pyepo.func.perturbationGradient(pyepo_model(sense), sigma=sigma, two_sides=two_sided,
                                                 processes=1, reduction="none")(t1, cost)
        theirs.sum().backward()
        t2 = pred.clone().requires_grad_(True)
        ours = ptt.perturbation_gradient(make_op(sense), t2, cost, sigma, two_sided=two_sided, reduction="none")
        ours.sum().backward()
        # PyEPO divides by (2) sigma + 1e-8 and sums in float32
        assert torch.allclose(ours, theirs.float(), rtol=1e-5, atol=1e-5)
        assert torch.allclose(t2.grad, t1.grad.float(), rtol=1e-5, atol=1e-6)


def test_methods_give_the_same_bits_on_threads_and_workers():
    for sense in ("minimize", "maximize"):
        pred, cost, sol, obj = data(5, sense)
        g = torch.tensor(np.random.default_rng(6).normal(size=(B, D)), dtype=torch.float32)
        results = []
        for op in (make_op(sense), make_op(sense, threads=2), make_op(sense, threads=2, workers=True)):
            p = pred.clone().requires_grad_(True)
            ptt.spo_plus(op, p, cost, sol, obj).backward()
            q = pred.clone().requires_grad_(True)
            (ptt.blackbox(op, q, 10.0) * g).sum().backward()
            r = pred.clone().requires_grad_(True)
            ptt.perturbation_gradient(op, r, cost, 0.5).backward()
            results.append([p.grad, q.grad, r.grad])
            op.close()
        for other in results[1:]:
            for a, b in zip(other, results[0]):
                assert torch.equal(a, b)


def test_modules_reductions_batch_dimensions_and_dtypes():
    sense = "minimize"
    op = make_op(sense)
    pred, cost, sol, obj = data(7, sense)
    per = ptt.spo_plus(op, pred, cost, sol, obj, reduction="none")
    assert per.shape == (B,)
    assert torch.allclose(ptt.SPOPlusLoss(op)(pred, cost, sol, obj), per.mean())
    assert torch.allclose(ptt.SPOPlusLoss(op, reduction="sum")(pred, cost, sol, obj), per.sum())
    # true_obj [batch] as well as PyEPO's [batch, 1]; leading batch dimensions; float64 in and out
    assert torch.equal(ptt.spo_plus(op, pred, cost, sol, obj.reshape(-1), reduction="none"), per)
    p64 = pred.double().reshape(3, 4, D).requires_grad_(True)
    l64 = ptt.spo_plus(op, p64, cost.reshape(3, 4, D), sol.reshape(3, 4, D), obj.reshape(3, 4), reduction="none")
    assert l64.dtype == torch.float64 and l64.shape == (3, 4)
    l64.sum().backward()
    assert p64.grad.shape == (3, 4, D) and p64.grad.dtype == torch.float64
    pg = ptt.PerturbationGradientLoss(op, sigma=0.5, reduction="none")(pred, cost)
    assert torch.equal(pg, ptt.perturbation_gradient(op, pred, cost, 0.5, reduction="none"))
    y = ptt.BlackBox(op, lambd=5.0)(pred)
    assert torch.equal(y, torch.tensor(one_hot_best(pred.numpy(), sense)))
    assert "lambd=5.0" in repr(ptt.BlackBox(op, lambd=5.0))
    # no gradient asked: no autograd node
    assert not ptt.spo_plus(op, pred, cost, sol, obj).requires_grad
    with torch.no_grad():
        assert not ptt.blackbox(op, pred.clone().requires_grad_(True), 1.0).requires_grad
    # the numpy level
    loss, grad = op.spo_plus(pred.numpy(), cost.numpy(), sol.numpy(), obj.numpy())
    assert isinstance(loss, np.ndarray) and np.array_equal(loss, per.numpy())


def test_blackbox_is_differentiable_once():
    op = make_op("minimize")
    t = data(8, "minimize")[0].clone().requires_grad_(True)
    y = ptt.blackbox(op, t, 10.0)
    # a loss whose gradient in y depends on theta: its second derivative would go through
    # DBB's backward, which has no derivative of its own
    (g,) = torch.autograd.grad((y * t).sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        g.sum().backward()
    # a second derivative with respect to what the incoming gradient depends on (a weight
    # of the loss), through DBB, NID, I-MLE and AI-MLE: refused too, not lost (None)
    w = torch.linspace(-1.0, 1.0, t.numel()).reshape(t.shape).requires_grad_(True)
    for method in (lambda o, x: ptt.blackbox(o, x, 10.0), ptt.negative_identity,
                   lambda o, x: ptt.imle(o, x, 10.0), ptt.aimle):
        x = t.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad((method(op, x) * w).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(g.pow(2).sum(), w, allow_unused=True)
    # create_graph alone (a second derivative of something else) still works
    x = t.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((ptt.blackbox(op, x, 10.0) * w.detach()).sum(), x, create_graph=True)
    assert torch.isfinite(g).all()


def test_methods_refuse_bad_arguments():
    op = make_op("minimize")
    pred, cost, sol, obj = data(9, "minimize")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(pt.InvalidArgumentError, match="lambd must be finite and > 0"):
            ptt.blackbox(op, pred, bad)
        with pytest.raises(pt.InvalidArgumentError, match="sigma must be finite and > 0"):
            ptt.perturbation_gradient(op, pred, cost, bad)
        with pytest.raises(pt.InvalidArgumentError, match="lambda must be finite and > 0"):
            op.blackbox_vjp(pred, pred, pred, bad)
    with pytest.raises(ValueError, match="reduction"):
        ptt.spo_plus(op, pred, cost, sol, obj, reduction="avg")
    with pytest.raises(ValueError, match="true_obj must have shape"):
        ptt.spo_plus(op, pred, cost, sol, obj.reshape(2, -1))
    with pytest.raises(ValueError, match="true_cost of shape"):
        ptt.spo_plus(op, pred, cost[:, :3], sol, obj)
    with pytest.raises(ValueError, match="pred_cost must have shape"):
        ptt.spo_plus(op, pred[:, :3], cost, sol, obj)
    bad_sol = sol.clone()
    bad_sol[2, 1] = float("nan")
    with pytest.raises(pt.NonFiniteInputError, match=r"true_sol\[2\]\[1\]"):
        ptt.spo_plus(op, pred, cost, bad_sol, obj)
    with pytest.raises(TypeError, match="perturbations.Op"):
        ptt.SPOPlusLoss("not an op")
    # solutions not of the cost's shape: no linear objective
    scalar = pt.Op(pt.Config(device="cpu"), D, (), lambda x: x.sum(-1))
    with pytest.raises(pt.InvalidArgumentError, match="needs output_shape == input_shape"):
        ptt.spo_plus(scalar, pred, cost, sol, obj)
    # DBB and NID refuse such an op in their forward (their backward would need it), and
    # SPO+ before it looks at true_sol's shape
    half = pt.Op(pt.Config(device="cpu"), D, D // 2, lambda x: x[..., : D // 2])
    theta = pred.clone().requires_grad_(True)
    for method in (lambda: ptt.blackbox(half, theta, 10.0), lambda: ptt.negative_identity(half, theta),
                   lambda: ptt.spo_plus(half, pred, cost, sol[..., : D // 2], obj)):
        with pytest.raises(pt.InvalidArgumentError, match="needs output_shape == input_shape"):
            method()
    # I-MLE and AI-MLE too (an empty batch included), and the modules when they are made
    empty = torch.zeros(0, D, requires_grad=True)
    for method in (lambda: ptt.imle(half, empty, 1.0), lambda: ptt.aimle(half, empty),
                   lambda: ptt.BlackBox(half), lambda: ptt.SPOPlusLoss(half), lambda: ptt.IMLE(half),
                   lambda: ptt.AIMLE(half), lambda: ptt.PerturbationGradientLoss(half)):
        with pytest.raises(pt.InvalidArgumentError, match="needs output_shape == input_shape"):
            method()

    def failing(x):
        raise KeyError("no path")

    with pytest.raises(KeyError, match="no path"):
        ptt.spo_plus(pt.Op(pt.Config(device="cpu"), D, D, failing), pred, cost, sol, obj)


def test_sum_of_gamma_noise_from_python():
    cfg = pt.Config(noise="sum_of_gamma", sog_kappa=3.0, sog_terms=20, num_samples=200, sigma=0.5, device="cpu")
    assert (cfg.noise, cfg.sog_kappa, cfg.sog_terms) == ("sum_of_gamma", 3.0, 20)
    assert "sog_kappa=3.0" in repr(cfg)
    op = pt.Op.builtin(cfg, "argmax", 3)
    theta = torch.tensor([[0.2, 0.1, 0.4]])
    y = ptt.perturbed(op, theta)
    assert abs(float(y.sum()) - 1.0) < 1e-5
    # the same draws as a callback op with the same settings (a copy of the config)
    twin = pt.Op(pt.Config(**cfg.settings()), 3, 3, lambda x: one_hot_best(x, "maximize"))
    assert torch.equal(twin.forward(theta), y)
    loss = ptt.fenchel_young(op, theta.clone().requires_grad_(True), torch.tensor([[0.0, 0.0, 1.0]]))
    assert loss.shape == (1,)
    with pytest.raises(pt.InvalidArgumentError, match="no closed-form density"):
        ptt.perturbed(op, theta.clone().requires_grad_(True))
    with pytest.raises(pt.InvalidArgumentError, match="kappa must be from 0.001 to 1000"):
        pt.Config(noise="sum_of_gamma", sog_kappa=0)
    with pytest.raises(pt.InvalidArgumentError, match="number of terms"):
        pt.Config(sog_terms=0)  # checked even before the noise is chosen


@pytest.mark.parametrize("sense", ["minimize", "maximize"])
@pytest.mark.parametrize("two_sided", [False, True])
def test_imle_gradient_is_its_formula_on_the_forwards_draws(sense, two_sided):
    n = 12
    cfg = dict(sense=sense, num_samples=n, sigma=0.5, noise="sum_of_gamma", seed=3, device="cpu")
    op = pt.Op(pt.Config(**cfg), D, D, lambda x: one_hot_best(x, sense))
    twin = pt.Op(pt.Config(**cfg), D, D, lambda x: one_hot_best(x, sense))
    theta = torch.tensor(np.random.default_rng(1).normal(size=(3, D)), dtype=torch.float32)
    g = torch.tensor(np.random.default_rng(2).normal(size=(3, D)), dtype=torch.float32)
    x = twin.draw(theta.numpy()).inputs()[:3 * n].reshape(3, n, D)  # the forward's perturbed inputs
    y = one_hot_best(x, sense)
    lambd, s = 2.0, (1.0 if sense == "minimize" else -1.0)
    gn = g.numpy()[:, None, :]
    if two_sided:
        want = (one_hot_best(x + lambd * gn, sense) - one_hot_best(x - lambd * gn, sense)).mean(1) / (2 * lambd)
    else:
        want = s * (one_hot_best(x + s * lambd * gn, sense) - y).mean(1) / lambd
    t = theta.clone().requires_grad_(True)
    out = ptt.imle(op, t, lambd, two_sided=two_sided)
    assert torch.allclose(out, torch.tensor(y.mean(1)), atol=1e-6)
    (out * g).sum().backward()
    assert np.allclose(t.grad.numpy(), want, atol=1e-6)


def test_aimle_module_keeps_and_adapts_its_state():
    op = pt.Op(pt.Config(num_samples=8, sigma=0.5, noise="gumbel", device="cpu"), D, D,
               lambda x: one_hot_best(x, "maximize"))
    layer = ptt.AIMLE(op)
    assert (layer.state.alpha, layer.state.grad_norm_avg, layer.state.step) == (1.0, 1.0, 1e-3)
    theta = torch.tensor(np.random.default_rng(4).normal(size=(5, D)), dtype=torch.float32, requires_grad=True)
    for _ in range(3):
        (layer(theta) * torch.arange(D, dtype=torch.float32)).sum().backward()
    assert layer.state.grad_norm_avg < 1.0 and abs(layer.state.alpha - 1.003) < 1e-12
    assert "AimleState(alpha=" in repr(layer)
    # the module I-MLE, its reductions of errors
    assert ptt.IMLE(op, lambd=3.0)(theta).shape == theta.shape
    with pytest.raises(pt.InvalidArgumentError, match="lambd must be finite and > 0"):
        ptt.imle(op, theta, 0.0)
    with pytest.raises(TypeError, match="AimleState"):
        ptt.aimle(op, theta, state={"alpha": 1})
    other = pt.Op(pt.Config(num_samples=8, device="cpu"), D, D, lambda x: one_hot_best(x, "maximize"))
    _, record = op.imle_forward(theta.detach())
    with pytest.raises(pt.InvalidArgumentError, match="another op"):
        other.imle_vjp(record, torch.ones(5, D), 1.0)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        op.imle_vjp(record, torch.ones(4, D), 1.0)
    # no gradient asked: a plain forward call
    with torch.no_grad():
        assert not ptt.imle(op, theta, 1.0).requires_grad
    # no problem, with or without a gradient asked: an empty result (as the other methods)
    empty = torch.zeros(0, D, requires_grad=True)
    for layer_of in (lambda t: ptt.imle(op, t, 1.0), lambda t: ptt.aimle(op, t)):
        y = layer_of(empty)
        assert y.shape == (0, D) and y.requires_grad
        y.sum().backward()
        assert empty.grad.shape == (0, D)
        assert layer_of(empty.detach()).shape == (0, D)
    # the library's own empty record: backward passes write nothing, AI-MLE's state is kept
    y, record = op.imle_forward(empty.detach())
    assert y.shape == (0, D) and record.batch_shape == (0,)
    assert op.imle_vjp(record, torch.zeros(0, D), 1.0, two_sided=True).shape == (0, D)
    state = pt.AimleState()
    assert op.aimle_vjp(record, torch.zeros(0, D), state).shape == (0, D)
    assert (state.alpha, state.grad_norm_avg) == (1.0, 1.0)



@pytest.mark.parametrize("sense", ["minimize", "maximize"])
def test_a_non_finite_upstream_gradient_gives_nan_not_an_exception(sense):
    # as after a GradScaler overflow: the problems the bad gradient touches get NaN (NID:
    # -g or g itself), the others their own gradient; AI-MLE's state is left as it was
    import math

    def op():
        cfg = pt.Config(sense=sense, device="cpu", noise="sum_of_gamma", num_samples=8, seed=3)
        return pt.Op(cfg, 4, 4, lambda x: one_hot_best(x, sense))

    theta = torch.tensor([[0.3, -0.2, 0.9, 0.1], [0.5, 0.4, -1.0, 0.0], [0.2, 0.1, 0.0, 0.3]])
    w = torch.tensor([[1.0, 2.0, 0.5, -1.0], [math.inf, 0.0, 1.0, 0.0], [0.0, math.nan, 0.0, 1.0]])
    clean = w.clone()
    clean[1:] = 0.0  # (the rows of the problems the bad values touch, zeroed)
    s = 1.0 if sense == "minimize" else -1.0
    for name in ("DBB", "I-MLE", "AI-MLE", "NID"):
        states = [pt.AimleState(), pt.AimleState()]
        grads = []
        for k, upstream in enumerate((w, clean)):
            o, t = op(), theta.clone().requires_grad_(True)
            y = {"DBB": lambda: ptt.blackbox(o, t, 2.0), "I-MLE": lambda: ptt.imle(o, t, 2.0),
                 "AI-MLE": lambda: ptt.aimle(o, t, state=states[k]), "NID": lambda: ptt.negative_identity(o, t)}[name]()
            (y * upstream).sum().backward()
            grads.append(t.grad)
        if name == "NID":
            assert torch.allclose(grads[0], -s * w, rtol=0, atol=0, equal_nan=True), name
            continue
        assert torch.isnan(grads[0][1:]).all(), name
        assert torch.isfinite(grads[1]).all() and torch.equal(grads[0][0], grads[1][0]), name
        if name == "AI-MLE":
            assert (states[0].alpha, states[0].grad_norm_avg, states[0].step) == (1.0, 1.0, 1e-3)
            assert states[1].grad_norm_avg != 1.0


def test_targets_that_require_grad_are_refused_in_backward_not_left_none():
    # the losses are differentiable in the predicted costs only: a gradient asked of a
    # target raises (as PyTorch's losses do), where PyEPO's NCE would give one and its
    # SPOPlus None
    op = make_op("minimize")
    pred, cost, sol, obj = data(12, "minimize")
    pool = pt.Pool(D, 64)
    pool.add(sol)
    pooled = pt.Op(pt.Config(sense="minimize", device="cpu", linear_objective=True), D, D,
                   lambda x: one_hot_best(x, "minimize"))
    pooled.set_pool(pool)
    cases = [("true_cost", lambda c: ptt.spo_plus(op, pred, c, sol, obj)),
             ("true_sol", lambda w: ptt.spo_plus(op, pred, cost, w, obj)),
             ("true_obj", lambda z: ptt.spo_plus(op, pred, cost, sol, z)),
             ("true_cost", lambda c: ptt.perturbation_gradient(op, pred, c, 0.1)),
             ("true_sol", lambda w: ptt.nce(pooled, pred, w)),
             ("true_cost", lambda c: ptt.ltr_listwise(pooled, pred, c))]
    x = pred.clone().requires_grad_(True)
    for name, loss in cases:
        target = {"true_cost": cost, "true_sol": sol, "true_obj": obj}[name].clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match=f"with respect to {name} is not implemented"):
            loss(target).sum().backward()
        with torch.no_grad():
            loss(target)  # (no graph, no gradient asked: fine)
        # only the predicted costs' gradient asked: given, with the loss's bits unchanged
        pred_only = loss(target)
        assert torch.equal(pred_only, loss(target.detach()))
    for name, loss in [("true_cost", lambda c: ptt.spo_plus(op, x, c, sol, obj)),
                       ("true_sol", lambda w: ptt.nce(pooled, x, w))]:
        target = {"true_cost": cost, "true_sol": sol}[name].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(target), x)
        (want,) = torch.autograd.grad(loss(target.detach()), x)
        assert torch.equal(g, want)
        x.grad = None
        loss(target).backward(inputs=[x])
        assert torch.equal(x.grad, want)
        x.grad = None


def test_loss_modules_refuse_a_non_square_op_when_made():
    odd = pt.Op(pt.Config(device="cpu"), 4, 3, lambda x: np.zeros((x.shape[0], 3), np.float32))
    for module in (ptt.NCELoss, ptt.CMAPLoss, ptt.LTRPointwiseLoss, ptt.LTRPairwiseLoss, ptt.LTRListwiseLoss,
                   ptt.FenchelYoungLoss, ptt.SPOPlusLoss):
        with pytest.raises(pt.InvalidArgumentError, match="needs output_shape == input_shape"):
            module(odd)


def test_imle_allows_theta_to_change_in_place_before_backward():
    # I-MLE's backward reads only its record, never theta's values
    cfg = pt.Config(sense="minimize", device="cpu", noise="sum_of_gamma", num_samples=8, seed=2)
    op = pt.Op(cfg, D, D, lambda x: one_hot_best(x, "minimize"))
    theta = data(14, "minimize")[0].clone().requires_grad_(True)
    leaf = theta * 1.0
    y = ptt.imle(op, leaf, 2.0)
    with torch.no_grad():
        leaf.mul_(3.0)
    y.sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
