"""What a Python user expects of the package (issue 28): one exception type per mistake,
getters and a repr on Config, shapes as ints, extra batch dimensions, broadcast targets,
the input's dtype back, copies and pickling."""

import copy
import multiprocessing
import pickle

import numpy as np
import pytest

import perturbations as pt
from conftest import SIGMA, THETA, argmax_rows


def test_the_same_mistake_gives_the_same_type_wherever_it_is_caught():
    for bad in (0, -5, 2 ** 64, 1.5, "many"):
        with pytest.raises(pt.InvalidArgumentError) as e:
            pt.Config(num_samples=bad)
        assert isinstance(e.value, ValueError) and isinstance(e.value, pt.Error)
    with pytest.raises(pt.InvalidArgumentError):
        pt.Config(noise="cauchy")
    with pytest.raises(pt.InvalidArgumentError):
        pt.Config(noise=7)
    with pytest.raises(pt.DeviceUnavailableError if pt.Config().device else ValueError):
        pt.Config(device="cuda:99")
    op = pt.Op.builtin(pt.Config(num_samples=10, device="cpu"), "argmax", 5)
    with pytest.raises(pt.InvalidArgumentError):
        op.forward(np.zeros((2, 4), np.float32))       # caught in Python
    with pytest.raises(pt.NonFiniteInputError) as e:
        op.forward(np.full((1, 5), np.nan, np.float32))  # caught by the library
    assert isinstance(e.value, ValueError)
    with pytest.raises(pt.InvalidArgumentError):
        pt.Op(pt.Config(), 0, 5, argmax_rows)            # a dimension < 1, caught by the library
    assert issubclass(pt.SolverFailedError, RuntimeError) and issubclass(pt.TorchError, RuntimeError)
    assert pt.Error(4, "x").__class__ is pt.SolverFailedError
    with pytest.raises(TypeError):
        pt.Config(colour=1)


def test_config_getters_setters_repr_and_copies():
    cfg = pt.Config(num_samples=64, sigma=0.25, noise=1, sense="minimize")
    assert (cfg.num_samples, cfg.sigma, cfg.noise, cfg.sense, cfg.seed, cfg.baseline) == \
        (64, 0.25, "gumbel", "minimize", 0, "sample_mean")
    cfg.seed = 9
    assert cfg.seed == 9 and "seed=9" in repr(cfg) and repr(cfg).startswith("Config(num_samples=64")
    with pytest.raises(ValueError):
        cfg.sigma = -1.0
    assert cfg.sigma == 0.25  # unchanged by a refused value
    for other in (copy.copy(cfg), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert other == cfg and other is not cfg
    assert eval("pt." + repr(cfg)) == cfg


def test_int_shapes_batch_dimensions_broadcast_targets_and_dtypes():
    cfg = pt.Config(num_samples=200, sigma=SIGMA, noise="gumbel", seed=3, device="cpu")
    flat = pt.Op.builtin(cfg, "argmax", 5).forward(THETA)
    grid = np.stack([THETA, THETA[::-1]])  # [2, 2, 5]: two batch dimensions
    y = pt.Op.builtin(cfg, "argmax", 5).forward(grid)
    assert y.shape == (2, 2, 5) and np.array_equal(y[0], flat)
    y1 = pt.Op.builtin(cfg, "argmax", 5).forward(THETA[0])  # no batch dimension
    assert y1.shape == (5,) and np.array_equal(y1, flat[0])
    y64 = pt.Op.builtin(cfg, "argmax", 5).forward(THETA.astype(np.float64))
    assert y64.dtype == np.float64 and np.array_equal(y64, flat)
    assert pt.Op.builtin(cfg, "argmax", 5).forward(THETA.tolist()).shape == (2, 5)
    # a target that broadcasts: one one-hot for every problem
    loss, grad = pt.Op.builtin(cfg, "argmax", 5).fenchel_young(grid, np.eye(5)[1])
    want, want_grad = pt.Op.builtin(cfg, "argmax", 5).fenchel_young(grid, np.broadcast_to(np.eye(5)[1], grid.shape))
    assert loss.shape == (2, 2) and np.array_equal(loss, want) and np.array_equal(grad, want_grad)
    with pytest.raises(pt.InvalidArgumentError, match="does not broadcast"):
        pt.Op.builtin(cfg, "argmax", 5).fenchel_young(grid, np.ones(3))
    _, tape = pt.Op.builtin(cfg, "argmax", 5).forward_with_tape(grid)
    assert tape.batch_shape == (2, 2) and tape.vjp(np.ones((2, 2, 5))).shape == (2, 2, 5)
    assert tape.jacobian().shape == (2, 2, 5, 5) and tape.objective().shape == (2, 2)


def test_deepcopy_makes_a_new_op_with_the_same_settings_and_solver():
    cfg = pt.Config(num_samples=300, sigma=SIGMA, noise="gumbel", seed=5, device="cpu")
    for op in (pt.Op(cfg, 5, 5, argmax_rows), pt.Op.builtin(cfg, "argmax", 5)):
        first = op.forward(THETA)
        twin = copy.deepcopy(op)
        assert twin is not op and twin.handle != op.handle and twin._recipe[1] is op._recipe[1]
        assert np.array_equal(twin.forward(THETA), first)   # its own stream, at call 0
        op.close()
        assert twin.forward(THETA).shape == (2, 5)           # independent of the original


def test_ops_and_tapes_refuse_pickling_with_a_clear_type_error():
    op = pt.Op.builtin(pt.Config(num_samples=10, device="cpu"), "argmax", 5)
    _, tape = op.forward_with_tape(THETA)
    for thing in (op, tape, op.draw(THETA)):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(thing)
    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(TypeError, match="cannot be pickled"):
        ctx.Process(target=print, args=(op,)).start()
