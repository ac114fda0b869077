"""The Python package over the C library: closed forms, errors, solvers (Python and C),
tapes, the two-phase API and PyTorch autograd. Tolerances are 5 standard deviations of the
estimator (MATH.md)."""

import math
import os
import traceback

import numpy as np
import pytest

import perturbations as pt

SIGMA = 0.5
THETA = np.array([[-0.6, 1.9, -0.2, 1.1, -1.0], [-0.6, 1.0, -0.2, 1.8, -1.0]], dtype=np.float32)


def softmax(v):
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def argmax_solver(x):
    y = np.zeros_like(x)
    y[np.arange(x.shape[0]), x.argmax(axis=1)] = 1.0
    return y


def test_device_report():
    report = pt.device_report()
    lines = dict(line.split(": ", 1) for line in report.splitlines())
    assert lines["perturbations"] == pt.version()
    for name in ("CUDA driver", "CUDA runtime", "CUDA devices seen by libtorch", "NVRTC", "noise on the CPU"):
        assert name in lines, report
    devices = int(lines["CUDA devices seen by libtorch"].split()[0])
    assert sum(name.startswith("noise on cuda:") for name in lines) == devices


def test_cuda_check_thread():
    """OK for each device seen here; a device that does not exist (every one without a
    GPU) is DeviceUnavailableError, a negative index InvalidArgumentError (a ValueError)."""
    devices = _cuda_devices()
    for d in range(devices):
        pt.cuda_check_thread(d)
    with pytest.raises(pt.DeviceUnavailableError, match="does not exist"):
        pt.cuda_check_thread(devices)
    with pytest.raises(pt.InvalidArgumentError, match="got -1"):
        pt.cuda_check_thread(-1)
    with pytest.raises(pt.DeviceUnavailableError, match="4294967296 does not exist"):
        pt.cuda_check_thread(2**32)  # (not cut to 0 on its way to C)


def _cuda_devices():
    lines = dict(line.split(": ", 1) for line in pt.device_report().splitlines())
    return int(lines["CUDA devices seen by libtorch"].split()[0])


def test_version_and_errors():
    assert pt.version().startswith("0.1.")
    with pytest.raises(pt.Error) as e:
        pt.Config(sigma=-1)
    assert e.value.status == "PERT_STATUS_INVALID_ARGUMENT"
    assert "sigma must be finite and > 0, got -1" in e.value.message
    with pytest.raises(ValueError):
        pt.Config(noise="cauchy")
    with pytest.raises(TypeError):
        pt.Config(colour=1)
    with pytest.raises(pt.Error):
        pt.Config(device="gpu")


def test_gumbel_argmax_is_softmax_for_python_and_builtin_solvers():
    n = 100_000
    cfg = pt.Config(num_samples=n, sigma=SIGMA, noise="gumbel", seed=3, device="cpu", threads=1)
    for op in (pt.Op(cfg, (5,), (5,), argmax_solver), pt.Op.builtin(cfg, "argmax", (5,))):
        with op:
            y, tape = op.forward_with_tape(THETA)
            p = softmax(THETA / SIGMA)
            assert np.all(np.abs(y - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-6)
            j = tape.jacobian()
            for b in range(2):
                exact = (np.diag(p[b]) - np.outer(p[b], p[b])) / SIGMA
                assert np.abs(j[b] - exact).max() < 5 / (SIGMA * math.sqrt(n))
            g = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=np.float32)
            assert np.allclose(tape.vjp(g), np.einsum("bod,bo->bd", j, g), atol=1e-5)
            assert np.allclose(tape.jvp(g), np.einsum("bod,bd->bo", j, g), atol=1e-5)
            assert tape.objective().shape == (2,)
            tape.close()


def test_a_solver_may_write_into_its_output_and_its_exception_is_reraised():
    cfg = pt.Config(num_samples=50, device="cpu")

    def writes(x, y=None):
        return argmax_solver(x)

    op = pt.Op(cfg, (3,), (3,), writes)
    assert op.forward(np.zeros((2, 3), np.float32)).shape == (2, 3)

    class Infeasible(Exception):
        pass

    def fails(x):
        raise Infeasible("no path")

    bad = pt.Op(cfg, (3,), (3,), fails)
    with pytest.raises(Infeasible) as e:
        bad.forward(np.zeros((1, 3), np.float32))
    assert "fails" in "".join(traceback.format_tb(e.value.__traceback__))  # the solver's frame
    assert op.forward(np.zeros((1, 3), np.float32)).shape == (1, 3)  # the library keeps working


def test_a_python_solver_is_correct_with_several_threads():
    one = pt.Op(pt.Config(num_samples=2000, device="cpu", seed=1, threads=1), (4,), (4,), argmax_solver)
    two = pt.Op(pt.Config(num_samples=2000, device="cpu", seed=1, threads=2), (4,), (4,), argmax_solver)
    theta = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    assert np.array_equal(one.forward(theta), two.forward(theta))


@pytest.fixture(scope="module")
def c_argmax(tmp_path_factory):
    import ctypes
    from conftest import c_argmax as build
    return ctypes.CDLL(build(tmp_path_factory.mktemp("c"), 4)).argmax4


def test_a_c_function_pointer_solver_equals_the_python_one(c_argmax):
    cfg = pt.Config(num_samples=3000, device="cpu", seed=2, threads=2)
    theta = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    from_c = pt.Op(cfg, (4,), (4,), c_argmax).forward(theta)
    from_py = pt.Op(cfg, (4,), (4,), argmax_solver).forward(theta)
    assert np.array_equal(from_c, from_py)


def test_fenchel_young_and_two_phase():
    cfg = pt.Config(num_samples=500, sigma=SIGMA, noise="gumbel", seed=4, device="cpu")
    op = pt.Op(cfg, (5,), (5,), argmax_solver)
    twin = pt.Op(cfg, (5,), (5,), argmax_solver)
    y_true = np.eye(5, dtype=np.float32)[[1, 3]]
    loss, grad = op.fenchel_young(THETA, y_true)
    assert np.allclose(grad, twin.forward(THETA) - y_true, atol=1e-6)
    assert loss.shape == (2,)
    external = pt.Op.external(cfg, (5,), (5,))
    with external.draw(THETA) as draw:
        y, tape = draw.finish(argmax_solver(draw.inputs()))
    assert np.array_equal(y, pt.Op(cfg, (5,), (5,), argmax_solver).forward(THETA))
    assert tape.vjp(y).shape == (2, 5)
    # the two-phase Fenchel-Young loss equals the callback op's, same seed and call count
    with pt.Op.external(cfg, (5,), (5,)).draw(THETA) as draw:
        two_loss, two_grad = draw.fenchel_young(argmax_solver(draw.inputs()), y_true)
    fy_loss, fy_grad = pt.Op(cfg, (5,), (5,), argmax_solver).fenchel_young(THETA, y_true)
    assert np.array_equal(two_loss, fy_loss) and np.array_equal(two_grad, fy_grad)


def test_tapes_cannot_be_copied_and_close_is_final():
    import copy
    op = pt.Op.builtin(pt.Config(device="cpu"), "ranks", (3,))
    _, tape = op.forward_with_tape(np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError):
        copy.deepcopy(tape)
    op.close()
    op.close()
    with pytest.raises(pt.Error):
        op.forward(np.zeros((1, 3), np.float32))


def test_one_sample_with_the_default_baseline():
    op = pt.Op.builtin(pt.Config(num_samples=1, device="cpu"), "argmax", (5,))
    y, tape = op.forward_with_tape(THETA)
    assert np.allclose(y.sum(axis=1), 1.0)
    assert np.isfinite(tape.vjp(y)).all()


def test_a_library_that_cannot_be_loaded_is_a_clear_import_error():
    import subprocess
    import sys
    env = dict(os.environ, PERTURBATIONS_LIB="/nonexistent/libperturbations.so")
    out = subprocess.run([sys.executable, "-c", "import perturbations"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "cannot load /nonexistent/libperturbations.so" in out.stderr


def test_solvers_get_their_own_inputs_and_may_write_their_outputs():
    seen = []

    def keeps_and_mutates(x):
        seen.append(x)
        y = argmax_solver(x)
        x -= 10.0  # its own copy: the library's inputs are unchanged
        return y

    cfg = pt.Config(num_samples=100, sigma=SIGMA, noise="gumbel", seed=7, device="cpu")
    loss, _ = pt.Op(cfg, (5,), (5,), keeps_and_mutates).fenchel_young(THETA, np.eye(5, dtype=np.float32)[[1, 3]])
    want, _ = pt.Op(cfg, (5,), (5,), argmax_solver).fenchel_young(THETA, np.eye(5, dtype=np.float32)[[1, 3]])
    assert np.array_equal(loss, want)
    assert float(seen[0].sum()) != 0.0  # still readable after the call

    def two(x, y):
        y[...] = 0.0  # every entry written, as for a C solver
        y[np.arange(x.shape[0]), x.argmax(axis=1)] = 1.0

    assert np.array_equal(pt.Op(cfg, (5,), (5,), two).forward(THETA), pt.Op(cfg, (5,), (5,), argmax_solver).forward(THETA))


def test_inputs_of_any_alignment_and_bad_settings():
    op = pt.Op.builtin(pt.Config(num_samples=100, device="cpu"), "argmax", (5,))
    odd = np.frombuffer(bytearray(41), np.float32, offset=1).reshape(2, 5)
    assert op.forward(odd).shape == (2, 5)
    for key in ("seed", "chunk_bytes", "max_tape_bytes", "threads", "num_samples"):
        with pytest.raises(ValueError):
            pt.Config(**{key: -1})
