"""Solution pools (issue 31): `perturbations.Pool`, `Op.set_pool`, solve_ratio, and the
pool-based losses NCE, CMAP and pointwise, pairwise and listwise LTR, equal to PyEPO's
(pyepo.func 2.2) on the same inputs and pool for both senses, with the same solver
written as a PyEPO optModel; modules, reductions, errors."""

import os
import time

import numpy as np
import pytest

import _pyepo_model
import perturbations as pt

torch = pytest.importorskip("torch")
import perturbations.torch as ptt  # noqa: E402

D, B, K = 6, 8, 2


def _pyepo():
    if os.environ.get("PERT_REQUIRE_PYEPO"):
        import pyepo  # make test installs it: a missing PyEPO fails there
    return pytest.importorskip("pyepo")


def best_two(x, sense):
    """The 0/1 indicator of the K best entries (smallest minimizing, largest maximizing)."""
    x = np.asarray(x, dtype=np.float32)
    order = np.argsort(x if sense == "minimize" else -x, axis=-1, kind="stable")[..., :K]
    y = np.zeros_like(x)
    np.put_along_axis(y, order, 1.0, axis=-1)
    return y


def make_op(sense, ratio=1.0, **settings):
    cfg = pt.Config(sense=sense, device="cpu", solve_ratio=ratio, linear_objective=True, **settings)
    return pt.Op(cfg, D, D, lambda x: best_two(x, sense))


def pyepo_model(sense):
    return _pyepo_model.pyepo_model(sense, best_two, D)


LOSSES = [("nce", "NCE", "sol"), ("cmap", "CMAP", "sol"), ("ltr_pointwise", "ptLTR", "cost"),
          ("ltr_pairwise", "prLTR", "cost"), ("ltr_listwise", "lsLTR", "cost")]


@pytest.mark.parametrize("sense", ["minimize", "maximize"])
@pytest.mark.parametrize("ours_name, theirs_name, target", LOSSES)
def test_pool_losses_equal_pyepo(sense, ours_name, theirs_name, target):
    _pyepo()
    import pyepo.data.dataset
    import pyepo.func
    rng = np.random.default_rng(3)
    train = pyepo.data.dataset.optDataset(pyepo_model(sense), np.zeros((5, 1)), rng.normal(size=(5, D)))
    pred = torch.tensor(rng.normal(size=(B, D)), dtype=torch.float32)
    cost = torch.tensor(rng.normal(size=(B, D)), dtype=torch.float32)
    sol = torch.tensor(best_two(cost.numpy(), sense))
    tgt = sol if target == "sol" else cost
    theirs_loss = getattr(pyepo.func, theirs_name)(pyepo_model(sense), processes=1, solve_ratio=1.0,
                                                   reduction="none", dataset=train)
    op = make_op(sense)
    pool = pt.Pool(D, 100).add(train.sols)
    op.set_pool(pool)
    weights = torch.arange(1.0, B + 1)
    for step in range(2):  # the second call scores against the pool the first one grew
        theirs_pred = (pred + step).clone().requires_grad_(True)
        theirs = theirs_loss(theirs_pred, tgt)
        (theirs * weights).sum().backward()
        ours_pred = (pred + step).clone().requires_grad_(True)
        ours = getattr(ptt, ours_name)(op, ours_pred, tgt, reduction="none")
        (ours * weights).sum().backward()
        assert len(pool) == theirs_loss.solpool.shape[0]
        assert torch.allclose(ours, theirs.float(), rtol=1e-5, atol=1e-5), (ours, theirs)
        assert torch.allclose(ours_pred.grad, theirs_pred.grad.float(), rtol=1e-5, atol=1e-5)


def test_modules_reductions_and_batch_dimensions():
    op = make_op("minimize")
    op.set_pool(pt.Pool(D, 50).add(np.eye(D, dtype=np.float32)))
    rng = np.random.default_rng(0)
    pred = torch.tensor(rng.normal(size=(2, 3, D)), dtype=torch.float32)
    cost = torch.tensor(rng.normal(size=(2, 3, D)), dtype=torch.float32)
    for module, target in [(ptt.NCELoss, best_two(cost.numpy(), "minimize")), (ptt.CMAPLoss, None),
                           (ptt.LTRPointwiseLoss, cost), (ptt.LTRPairwiseLoss, cost), (ptt.LTRListwiseLoss, cost)]:
        target = torch.tensor(best_two(cost.numpy(), "minimize")) if target is None else torch.as_tensor(target)
        none = module(op, reduction="none")(pred, target)
        assert none.shape == (2, 3)
        assert torch.allclose(module(op)(pred, target), none.mean())
        assert torch.allclose(module(op, reduction="sum")(pred, target), none.sum())
    assert "reduction='mean'" in repr(ptt.NCELoss(op))


def test_pool_object_and_solve_ratio():
    pool = pt.Pool((2, 3), 4)
    assert len(pool) == 0 and pool.output_shape == (2, 3) and pool.capacity == 4
    pool.add(np.ones((1, 2, 3), dtype=np.float32))
    pool.add(torch.zeros(2, 2, 3))
    assert len(pool) == 2
    with pytest.raises(pt.NonFiniteInputError, match="solutions"):
        pool.add(np.full((1, 2, 3), np.nan, dtype=np.float32))
    with pytest.raises(pt.InvalidArgumentError):
        pool.add(np.ones((1, 3), dtype=np.float32))
    assert len(pool) == 2
    with pytest.raises(pt.InvalidArgumentError, match="capacity"):
        pt.Pool(3, 0)
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(pt.InvalidArgumentError, match="solve_ratio"):
            pt.Config(solve_ratio=bad)
    # a full pool answers 70% of the samples as the solver would, bit for bit
    theta = np.random.default_rng(1).normal(size=(4, D)).astype(np.float32)
    every = np.array([best_two(np.eye(D)[i] + np.eye(D)[j], "maximize") for i in range(D) for j in range(i + 1, D)])
    ops = []
    for ratio in (1.0, 0.3):
        op = make_op("maximize", ratio, num_samples=300, sigma=0.5, seed=4)
        op.set_pool(pt.Pool(D, 100).add(every))
        ops.append((op, op.forward(theta)))
    assert np.array_equal(ops[0][1], ops[1][1])
    assert ops[0][0].solver_calls == 4 * 300 and ops[1][0].solver_calls < 4 * 300 / 2
    assert isinstance(ops[0][0].pool, pt.Pool) and len(ops[0][0].pool) >= len(every)
    # refusals: a solver not declared linear; a pool of another shape; no pool for a loss
    plain = pt.Op(pt.Config(device="cpu"), D, D, lambda x: best_two(x, "maximize"))
    with pytest.raises(pt.InvalidArgumentError, match="linear"):
        plain.set_pool(pt.Pool(D, 3))
    with pytest.raises(pt.InvalidArgumentError, match="output shape"):
        make_op("maximize").set_pool(pt.Pool(D + 1, 3))
    with pytest.raises(pt.InvalidArgumentError, match="solution pool"):
        ptt.nce(make_op("maximize"), torch.zeros(1, D), torch.zeros(1, D))
    with pytest.raises(TypeError):
        make_op("maximize").set_pool("pool")
    op = ops[0][0]
    op.set_pool(None)
    assert op.pool is None


_FORKED = {}


def _child_calls():
    op = _FORKED["op"]  # (inherited by the forked child: an Op cannot be pickled)
    op.forward(np.zeros((2, D), dtype=np.float32))
    return op.solver_calls


def test_a_forked_child_keeps_the_pool():
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork here")
    op = pt.Op.builtin(pt.Config(solve_ratio=0.1, num_samples=400, device="cpu"), "argmax", D)
    op.set_pool(pt.Pool(D, 10).add(np.eye(D, dtype=np.float32)))
    _FORKED["op"] = op
    try:
        with mp.get_context("fork").Pool(1) as workers:
            rows = workers.apply(_child_calls)
    finally:
        _FORKED.clear()
    assert rows < 2 * 400 / 2, rows  # about 10% solved, not all


def test_a_child_forked_while_a_thread_adds_to_the_pool_can_use_it():
    """A child forked (os.fork, as a DataLoader does) while another thread adds to the pool
    through the library (the GIL released) reads, grows and uses the pool: no lock of the
    parent's threads is held in the child."""
    import signal
    import threading
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    wide = 512
    pool = pt.Pool(wide, 1500)
    op = pt.Op.builtin(pt.Config(solve_ratio=0.5, num_samples=16, device="cpu"), "argmax", wide)
    op.set_pool(pool)
    stop = threading.Event()

    def add_until_stopped():
        k = 0
        rows = np.tile((np.arange(wide) % 7).astype(np.float32), (64, 1))
        rows[:, 1] = np.arange(64)
        while not stop.is_set():
            k += 1
            rows[:, 0] = k  # (k, r): new rows every time
            pool.add(rows)

    adder = threading.Thread(target=add_until_stopped)
    adder.start()
    failed = []
    try:
        for _ in range(10000):
            if len(pool) >= 8:
                break
            time.sleep(0.001)
        assert len(pool) >= 8, "the adder thread added nothing"
        for k in range(30):
            time.sleep((k * 37 % 300) * 1e-6)
            pid = os.fork()
            if pid == 0:  # the child: nothing of pytest's may run here
                code = 1
                try:
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # (a Python handler would not run in C)
                    signal.alarm(10)  # a hang ends as SIGALRM
                    before = len(pool)
                    row = np.zeros((1, wide), dtype=np.float32)
                    row[0, 0] = -1  # (no row of the adder)
                    pool.add(row)
                    grew = len(pool) == min(before + 1, 1500)
                    op.forward(np.zeros((2, wide), dtype=np.float32))  # (its solves add to the pool)
                    code = 0 if grew else 2  # (an exception above leaves code 1)
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failed.append(status)
                break
    finally:
        stop.set()
        adder.join()
    assert not failed, f"children ended with wait statuses {failed} (SIGALRM {signal.SIGALRM}: hung)"


def test_imle_samples_are_answered_from_the_pool():
    """I-MLE through autograd on a pooled op (solve_ratio 0.3, a pool of every solution):
    the forward and the gradient equal those of solving every sample, bit for bit, with
    fewer rows solved."""
    def make(ratio):
        op = pt.Op.builtin(pt.Config(solve_ratio=ratio, num_samples=300, sigma=0.7, seed=3, device="cpu"),
                           "argmax", D)
        op.set_pool(pt.Pool(D, 10).add(np.eye(D, dtype=np.float32)))
        return op
    theta = torch.tensor(np.random.default_rng(1).normal(size=(B, D)), dtype=torch.float32)
    weights = torch.arange(D, dtype=torch.float32)
    results = []
    for ratio in (1.0, 0.3):
        op = make(ratio)
        t = theta.clone().requires_grad_(True)
        y = ptt.imle(op, t, 0.5, two_sided=True)
        (y * weights).sum().backward()
        results.append((y.detach(), t.grad, op.solver_calls))
    (y1, g1, rows1), (y2, g2, rows2) = results
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert rows1 == 3 * B * 300 and rows2 < rows1 / 2, (rows1, rows2)


def test_warm_starts_get_the_pools_best():
    """A per-worker solver of a pooled op gets `info.pool_best(x)`: the pool's member of
    best <x, y> (the pool as the call began), checked by hand; without a pool, None."""
    members = np.array([[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=np.float32)
    seen = {"rows": 0, "wrong": 0, "none": 0}
    kept = []

    def make_solver(worker):
        def solve(x, info):
            kept.append(info)
            assert info.pool_best(x[0, :3]) is None  # not one row: nothing read or written
            for row in x:
                got = info.pool_best(row)
                if got is None:
                    seen["none"] += 1
                else:
                    want = members[int(np.argmax(members.astype(np.float64) @ row.astype(np.float64)))]
                    seen["rows"] += 1
                    seen["wrong"] += int(not np.array_equal(got, want))
            y = np.zeros_like(x)
            y[np.arange(len(x)), np.argmax(x, axis=1)] = 1
            return y
        return solve

    cfg = pt.Config(num_samples=20, sigma=0.7, device="cpu", threads=2, linear_objective=True)
    theta = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)
    with pt.Op.with_workers(cfg, 6, 6, make_solver) as op, pt.Pool(6, 100) as pool:
        pool.add(members)
        op.set_pool(pool)
        op.forward(theta)
        assert seen == {"rows": 60, "wrong": 0, "none": 0}
        assert all(info.pool_best(theta[0]) is None for info in kept)  # after its call: none
    with pt.Op.with_workers(cfg, 6, 6, make_solver) as plain:
        plain.forward(theta)
        assert seen["none"] == 60


def test_solve_ratio_zero_answers_every_sample_from_a_seeded_pool():
    # PyEPO's solve_ratio=0: the pool seeded with the training set's solutions answers
    # every sample, and the pool losses never solve their batch; an empty pool is filled
    # by solving first
    calls = []

    def solver(x):
        calls.append(x.shape[0])
        return np.eye(4, dtype=np.float32)[np.argmax(x, axis=1)]

    cfg = pt.Config(solve_ratio=0, num_samples=50, sigma=0.5, device="cpu", linear_objective=True)
    assert cfg.solve_ratio == 0
    op = pt.Op(cfg, 4, 4, solver)
    pool = pt.Pool(4, 8)
    op.set_pool(pool)
    theta = np.array([[0.1, 0.9, 0.3, 0.2], [0.8, 0.1, 0.0, 0.7]], dtype=np.float32)
    op.forward(theta)  # an empty pool: every sample solved, and their solutions kept
    assert sum(calls) == 100 and len(pool) > 0
    calls.clear()
    pool.add(np.eye(4, dtype=np.float32))
    y = op.forward(theta)
    assert calls == [] and np.allclose(y.sum(axis=1), 1.0)
    loss = torch.as_tensor(op.nce(theta, np.eye(4, dtype=np.float32)[[1, 0]])[0])
    assert calls == [] and torch.isfinite(loss).all()
    with pytest.raises(pt.InvalidArgumentError, match=r"solve_ratio must be in \[0, 1\]"):
        pt.Config(solve_ratio=-0.1)
