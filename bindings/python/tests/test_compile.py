"""torch.compile(fullgraph=True) of models using perturbations.torch (issue 28): no graph
break and no warning, for built-ins, C function pointer solvers and Python solvers; the
compiled model gives the eager model's values and gradients (same seeds); tapes are freed
after backward and kept under retain_graph."""

import ctypes
import gc
import warnings

import pytest

import perturbations as pt
from conftest import argmax_rows

torch = pytest.importorskip("torch")
import perturbations.torch as ptt  # noqa: E402
from perturbations import _compile  # noqa: E402


def cfg(**kw):
    return pt.Config(**{"num_samples": 200, "sigma": 0.5, "seed": 4, "device": "cpu", **kw})


class Model(torch.nn.Module):
    def __init__(self, make_op):
        super().__init__()
        self.lin = torch.nn.Linear(3, 5)
        self.pert = ptt.Perturbed(make_op())
        self.loss = ptt.FenchelYoungLoss(make_op(), reduction="sum")

    def forward(self, x, y):
        theta = self.lin(x)
        return (self.pert(theta) * torch.arange(5.0)).sum() + self.loss(theta, y)


@pytest.fixture(scope="module")
def c_argmax(tmp_path_factory):
    from conftest import c_argmax as build
    return ctypes.CDLL(build(tmp_path_factory.mktemp("c"), 5)).argmax5


def makers(c_argmax):
    return {
        "builtin": lambda: pt.Op.builtin(cfg(), "argmax", 5),
        "c": lambda: pt.Op(cfg(), 5, 5, c_argmax),
        "python": lambda: pt.Op(cfg(), 5, 5, argmax_rows),
    }


def pair(make):
    torch.manual_seed(0)
    eager = Model(make)
    torch.manual_seed(0)
    return eager, Model(make)


@pytest.mark.parametrize("kind", ["builtin", "c", "python"])
def test_fullgraph_compile_matches_eager(kind, c_argmax):
    make = makers(c_argmax)[kind]
    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.eye(5)[[0, 1, 2, 3]]
    explained = torch._dynamo.explain(Model(make))(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager, model = pair(make)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the second step reuses the compiled graph (its op at call 1)
            want, got = eager(x, y), compiled(x, y)
            want.backward()
            got.backward()
            assert torch.allclose(want, got, atol=1e-5)
            assert torch.allclose(eager.lin.weight.grad, model.lin.weight.grad, atol=1e-5)
    gc.collect()
    assert not _compile._TAPES  # every tape freed after its backward


def test_inductor_and_retained_graphs():
    eager, model = pair(lambda: pt.Op.builtin(cfg(), "argmax", 5))
    compiled = torch.compile(model, fullgraph=True)  # inductor: C++ kernels around the custom ops
    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)), torch.eye(5)[[4, 1, 2, 3]]
    want, got = eager(x, y), compiled(x, y)
    assert torch.allclose(want, got, atol=1e-5)
    want.backward(retain_graph=True)
    got.backward(retain_graph=True)
    assert _compile._TAPES  # kept for a second backward
    want.backward()
    got.backward()
    assert torch.allclose(eager.lin.weight.grad, model.lin.weight.grad, atol=1e-5)
    del got
    gc.collect()
    assert not _compile._TAPES
    with torch.no_grad():  # no tape at all without grad
        assert compiled(x, y).shape == ()
    assert not _compile._TAPES


def test_two_calls_on_one_input_stay_two_draws_when_compiled():
    op = pt.Op.builtin(pt.Config(num_samples=10, sigma=1.0, device="cpu", seed=0), "argmax", 5)
    module = ptt.Perturbed(op)

    def twice(t):
        return module(t) - module(t)

    theta = torch.zeros(2, 5, requires_grad=True)
    assert twice(theta).abs().sum() > 0  # eager: two draws
    compiled = torch.compile(twice, backend="aot_eager", fullgraph=True)
    assert compiled(theta).abs().sum() > 0  # not merged into one call
    with torch.no_grad():
        assert compiled(theta).abs().sum() > 0
