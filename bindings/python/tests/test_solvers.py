"""How Python solvers are called and checked (issue 28: defaulted parameters, results of
the wrong shape, outputs never written), and per-worker solvers."""

import functools
import threading

import numpy as np
import pytest

import perturbations as pt
from conftest import SIGMA, THETA, argmax_rows


def cfg(**kw):
    return pt.Config(**{"num_samples": 300, "sigma": SIGMA, "noise": "gumbel", "seed": 11, "device": "cpu", **kw})


def reference():
    return pt.Op.builtin(cfg(), "argmax", 5).forward(THETA)


def test_a_defaulted_second_parameter_is_not_an_output():
    def argmax(x, axis=-1):  # the seed's README signature
        y = np.zeros_like(x)
        np.put_along_axis(y, x.argmax(axis=axis)[..., None], 1.0, axis=axis)
        return y

    def along(x, axis):
        return argmax(x, axis)

    for solver in (argmax, functools.partial(along, axis=-1), lambda x, *rest: argmax_rows(x)):
        assert np.array_equal(pt.Op(cfg(), 5, 5, solver).forward(THETA), reference())


def test_the_two_argument_form_when_asked_or_required():
    def writes(x, out):
        out[...] = argmax_rows(x)

    class Writer:
        def __call__(self, x, out, scale=1.0):
            out[...] = argmax_rows(x) * scale

    def maybe(x, out=None):
        out[...] = argmax_rows(x)

    for op in (pt.Op(cfg(), 5, 5, writes), pt.Op(cfg(), 5, 5, Writer()), pt.Op(cfg(), 5, 5, maybe, writes_out=True)):
        assert np.array_equal(op.forward(THETA), reference())
    assert np.array_equal(pt.Op(cfg(), 5, 5, lambda x, out=None: argmax_rows(x), writes_out=False).forward(THETA),
                          reference())


@pytest.mark.parametrize("result, words", [
    (lambda x: argmax_rows(x).T.copy(), "returned shape [5, "),          # transposed
    (lambda x: argmax_rows(x)[:, :4], "returned shape"),                  # too few per row
    (lambda x: argmax_rows(x)[:-1], "returned shape"),                    # a row short
    (lambda x: None, "returned None"),
    (lambda x: np.array(["a"] * x.shape[0]), "not an array of numbers"),
])
def test_a_result_of_another_shape_is_refused(result, words):
    op = pt.Op(cfg(), 5, 5, result)
    with pytest.raises(pt.SolverFailedError) as e:
        op.forward(THETA)
    assert words in str(e.value) and isinstance(e.value, RuntimeError)
    # the same values flat are accepted
    flat = pt.Op(cfg(), 5, 5, lambda x: argmax_rows(x).ravel())
    assert np.array_equal(flat.forward(THETA), reference())


def test_outputs_never_written_are_detected():
    def returns(x, out):
        return argmax_rows(x)

    with pytest.raises(pt.SolverFailedError, match="returned its solutions instead of writing them"):
        pt.Op(cfg(), 5, 5, returns).forward(THETA)

    def partly(x, out):
        out[:, :4] = 0.0

    with pytest.raises(pt.SolverFailedError, match="unwritten"):
        pt.Op(cfg(), 5, 5, partly).forward(THETA)


def test_per_worker_solvers_run_only_on_their_worker_and_see_where_their_rows_are():
    made, seen = {}, []
    lock = threading.Lock()

    class Model:  # a solver that is not thread-safe: one per worker
        def __init__(self, worker):
            self.worker, self.thread, self.busy = worker, threading.get_ident(), False

        def __call__(self, x, info):
            assert threading.get_ident() == self.thread and not self.busy and info.worker == self.worker
            self.busy = True
            with lock:
                seen.append((info.first_row, x.shape[0], info.num_samples, info.clean))
            y = argmax_rows(x)
            self.busy = False
            return y

    def make(worker):
        assert worker not in made  # once per worker over the op's life
        made[worker] = threading.get_ident()
        return Model(worker)

    op = pt.Op.with_workers(cfg(threads=2, num_samples=4096), 5, 5, make)
    y = op.forward(THETA)
    first_call = list(seen)
    assert op.forward(THETA).shape == (2, 5)
    # (the workers take blocks as they come: a Python solver holding the GIL may leave one idle)
    assert set(made) <= {0, 1} and len(set(made.values())) == len(made)
    assert threading.get_ident() not in made.values()
    assert np.array_equal(y, pt.Op.builtin(cfg(num_samples=4096), "argmax", 5).forward(THETA))
    rows = sorted(first_call)
    assert sum(count for _, count, _, _ in rows) == 2 * 4096 and all(n == 4096 for _, _, n, _ in rows)
    assert [first for first, _, _, _ in rows] == list(np.cumsum([0] + [c for _, c, _, _ in rows[:-1]]))
    op.close()

    def failing(worker):
        raise LookupError("no licence")

    with pytest.raises(LookupError, match="no licence"):
        pt.Op.with_workers(cfg(threads=2), 5, 5, failing).forward(THETA)


def test_op_solve_is_the_plain_solver_on_every_kind_of_op():
    """Op.solve(x) (pert_op_solve): y*(x) with no noise, the same kind of array back, for
    a Python solver on 1 and 2 threads and the built-in; it draws no noise."""
    import torch

    want = argmax_rows(THETA)
    for threads in (1, 2):
        for op in (pt.Op(cfg(threads=threads), 5, 5, argmax_rows), pt.Op.builtin(cfg(threads=threads), "argmax", 5)):
            np.testing.assert_array_equal(op.solve(THETA), want)
            t = op.solve(torch.tensor(THETA))
            assert isinstance(t, torch.Tensor)
            np.testing.assert_array_equal(t.numpy(), want)
            assert op.solve(THETA[0]).shape == (5,)  # unbatched
    op = pt.Op(cfg(), 5, 5, argmax_rows)
    op.solve(THETA)
    np.testing.assert_array_equal(op.forward(THETA), reference())  # no noise was drawn
    with pytest.raises(ValueError, match="x"):
        op.solve(np.full((2, 5), np.nan, dtype=np.float32))
    with pytest.raises(ValueError):
        op.solve(np.zeros((2, 4), dtype=np.float32))
