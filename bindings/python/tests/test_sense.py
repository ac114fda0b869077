"""A wrong sense must not fail silently (issue 28): the Fenchel-Young loss of an exact
solver against a feasible target is never below the bound of the call's own draws; below
it, a SenseWarning (a RuntimeWarning) names the likely cause. No false alarm when the
sense is right, whatever the noise, perturbation, sizes or solver."""

import warnings

import numpy as np
import pytest

import perturbations as pt
from conftest import argmax_rows


def argmin_rows(x):
    return argmax_rows(-x)


def cfg(**kw):
    return pt.Config(**{"num_samples": 100, "sigma": 1.0, "seed": 3, "device": "cpu", **kw})


def problems(batch, d, seed):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(batch, d)).astype(np.float32)
    y = np.eye(d, dtype=np.float32)[rng.integers(0, d, size=batch)]
    return theta, y


def test_a_minimizing_solver_with_the_default_sense_warns():
    theta, y = problems(32, 40, 0)
    op = pt.Op(cfg(), 40, 40, argmin_rows)  # sense="maximize" forgotten
    with pytest.warns(pt.SenseWarning, match="sense='minimize'") as record:
        loss, _ = op.fenchel_young(theta, y)
    assert issubclass(record[0].category, RuntimeWarning)
    warning = record[0].message
    assert "is below the lower bound" in str(warning) and len(warning.problems) >= 16
    assert (warning.loss < warning.bound).all() and (warning.loss < -1).any()
    # the reverse: a maximizing solver declared as minimizing
    with pytest.warns(pt.SenseWarning, match="sense='maximize'"):
        pt.Op(cfg(sense="minimize"), 40, 40, argmax_rows).fenchel_young(theta, y)
    # two-phase solutions of the wrong sense
    with pt.Op.external(cfg(), 40, 40).draw(theta) as draw:
        with pytest.warns(pt.SenseWarning, match="solutions are not optimal"):
            draw.fenchel_young(argmin_rows(draw.inputs()), y)


@pytest.mark.parametrize("settings", [
    {}, {"noise": "gumbel"}, {"perturbation": "multiplicative"}, {"antithetic": True},
    {"num_samples": 1}, {"num_samples": 20000, "sigma": 0.05}, {"sense": "minimize"}, {"threads": 2},
])
def test_no_false_alarm_when_the_sense_is_right(settings):
    c = cfg(**settings)
    solver = argmin_rows if c.sense == "minimize" else argmax_rows
    with warnings.catch_warnings():
        warnings.simplefilter("error", pt.SenseWarning)
        for seed in range(5):
            theta, y = problems(16, 12, seed)
            theta = theta * 10.0 ** (seed - 2)  # magnitudes from 0.01 to 100
            pt.Op(c, 12, 12, solver).fenchel_young(theta, y)
            if c.sense == "maximize":
                pt.Op.builtin(c, "argmax", 12).fenchel_young(theta, y)
            # a target that is also an optimum of every sample: loss = bound exactly
            pt.Op(c, 12, 12, solver).fenchel_young(theta, solver(theta))


def test_the_torch_loss_warns_too():
    torch = pytest.importorskip("torch")
    import perturbations.torch as ptt
    theta, y = problems(8, 10, 1)
    loss_fn = ptt.FenchelYoungLoss(pt.Op(cfg(), 10, 10, argmin_rows))
    with pytest.warns(pt.SenseWarning):
        loss_fn(torch.tensor(theta, requires_grad=True), torch.tensor(y)).backward()
