"""Predict-then-optimize on the synthetic shortest-path benchmark of decision-focused
learning, from Python: a torch.nn.Linear (5 features -> 40 edge costs) trained with every
method of the library over one C shortest-path solver, loaded with ctypes and handed to
the library as a C function pointer (it runs with the GIL released):

    fy-n1, fy-n10  the Fenchel-Young loss of the perturbed solver (sigma 1, N = 1 or 10)
    dpo-n10        the perturbed optimizer (DPO, N = 10) under the decision's true cost <c, y_sigma(c^)>
    spo+           the SPO+ loss (one exact solve per instance)
    dbb            the differentiable black box (lambda 10) under the decision's true cost <c, y*(c^)>
    nid            the negative identity under the same loss
    pg             the perturbation-gradient loss (two-sided, sigma 1)
    imle, aimle    I-MLE (lambda 10) and AI-MLE (adaptive lambda) with Sum-of-Gamma noise (kappa 5,
                   10 terms, sigma 1, N = 10) under the decision's true cost <c, y_sigma(c^)>

The data: a 5x5 grid (40 edges, moves right or down, top-left to bottom-right), features
x ~ N(0, I_5), costs c_j = [(1/3.5^deg) ((B x)_j / sqrt(5) + 3)^deg + 1] * eps_j with B a
fixed Bernoulli(0.5) 40x5 matrix and eps_j ~ U[0.5, 1.5]; 1000 training and 1000 test
instances. Minimization sense; Adam (lr 0.01), batch 32.
Printed per epoch: the test set's normalized regret
    sum_i (c_i . w(c^_i) - c_i . w*(c_i)) / sum_i c_i . w*(c_i)
where w(c^) is the path for the predicted costs, and the seconds the epoch took.

    python examples/python/shortest_path_training.py [--solver PATH.so] [--epochs E] [--deg D ...] [--method M ...]

The solver library is examples/c/grid_shortest_path.c, built by `make python-example` into
target/examples/libgrid_shortest_path.so.
"""

import argparse
import ctypes
import os
import time

import numpy as np
import torch

import perturbations as pt
import perturbations.torch as ptt

FEATURES, EDGES = 5, 40


def make_data(n, deg, rng, B, noise_half_width=0.5):
    x = rng.standard_normal((n, FEATURES))
    eps = rng.uniform(1 - noise_half_width, 1 + noise_half_width, (n, EDGES))
    c = ((x @ B.T / np.sqrt(FEATURES) + 3) ** deg / 3.5 ** deg + 1) * eps
    return x.astype(np.float32), c.astype(np.float32)


class Solver:
    """The C solver loaded with ctypes: `fn` for the library, `solve` for batches here."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.fn = self.lib.grid_shortest_path
        self.fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                            ctypes.POINTER(ctypes.c_float)]
        self.fn.restype = ctypes.c_int32
        assert self.lib.grid_edges() == EDGES

    def solve(self, costs):
        costs = np.ascontiguousarray(costs, dtype=np.float32)
        out = np.empty_like(costs)
        f = ctypes.POINTER(ctypes.c_float)
        if self.fn(None, costs.ctypes.data_as(f), costs.shape[0], out.ctypes.data_as(f)) != 0:
            raise RuntimeError("the solver refused a cost vector")
        return out


def regret(solver, model, x, c, w_star):
    with torch.no_grad():
        c_hat = model(torch.from_numpy(x)).numpy()
    w_hat = solver.solve(c_hat)
    return float(((c * w_hat).sum() - (c * w_star).sum()) / (c * w_star).sum())


def decision_cost(y, c):
    """The decision's true cost <c, y> per instance (the regret up to a constant)."""
    return (y * c).sum(-1)


# method: (num_samples of the op, loss(op, c_hat, c, w, z))
METHODS = {
    "fy-n1": (1, lambda op, c_hat, c, w, z: ptt.fenchel_young(op, c_hat, w)),
    "fy-n10": (10, lambda op, c_hat, c, w, z: ptt.fenchel_young(op, c_hat, w)),
    "dpo-n10": (10, lambda op, c_hat, c, w, z: decision_cost(ptt.perturbed(op, c_hat), c)),
    "spo+": (1, lambda op, c_hat, c, w, z: ptt.spo_plus(op, c_hat, c, w, z, reduction="none")),
    "dbb": (1, lambda op, c_hat, c, w, z: decision_cost(ptt.blackbox(op, c_hat, 10.0), c)),
    "nid": (1, lambda op, c_hat, c, w, z: decision_cost(ptt.negative_identity(op, c_hat), c)),
    "pg": (1, lambda op, c_hat, c, w, z: ptt.perturbation_gradient(op, c_hat, c, 1.0, reduction="none")),
    "imle": (10, lambda op, c_hat, c, w, z: decision_cost(ptt.imle(op, c_hat, 10.0), c)),
    "aimle": (10, lambda op, c_hat, c, w, z: decision_cost(ptt.aimle(op, c_hat, state=AIMLE_STATE), c)),
}
# AI-MLE's adaptive state, kept across the steps of a training (reset for each)
AIMLE_STATE = pt.AimleState()
# I-MLE's noise: Sum-of-Gamma (kappa 5, 10 terms: PyEPO's defaults); the others Normal
NOISE = {"imle": "sum_of_gamma", "aimle": "sum_of_gamma"}


def train(solver, deg, method, epochs, seed=0, batch_size=32, lr=0.01, log=print):
    """(the test regret per epoch, from before training; the mean seconds of an epoch)."""
    num_samples, loss_of = METHODS[method]
    rng = np.random.default_rng(seed)
    B = rng.binomial(1, 0.5, (EDGES, FEATURES)).astype(np.float64)
    x_train, c_train = make_data(1000, deg, rng, B)
    x_test, c_test = make_data(1000, deg, rng, B)
    w_train, w_test = solver.solve(c_train), solver.solve(c_test)
    z_train = (c_train.astype(np.float64) * w_train).sum(-1).astype(np.float32)

    torch.manual_seed(seed)
    model = torch.nn.Linear(FEATURES, EDGES)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # the default settings (sample-mean baseline) work with N = 1 too
    cfg = pt.Config(num_samples=num_samples, sigma=1.0, noise=NOISE.get(method, "normal"), sense="minimize",
                    seed=seed, device="cpu")
    AIMLE_STATE.__init__()
    curve = [regret(solver, model, x_test, c_test, w_test)]
    log(f"deg {deg} {method:>7}  epoch  0  test regret {curve[0]:.4f}")
    total = 0.0
    with cfg, pt.Op(cfg, (EDGES,), (EDGES,), solver.fn) as op:
        xt, ct, wt, zt = (torch.from_numpy(a) for a in (x_train, c_train, w_train, z_train))
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            order = torch.from_numpy(rng.permutation(len(xt)))
            for i in range(0, len(xt), batch_size):
                idx = order[i:i + batch_size]
                loss = loss_of(op, model(xt[idx]), ct[idx], wt[idx], zt[idx]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            seconds = time.perf_counter() - start
            total += seconds
            curve.append(regret(solver, model, x_test, c_test, w_test))
            log(f"deg {deg} {method:>7}  epoch {epoch:2d}  test regret {curve[-1]:.4f}  ({seconds:.3f} s)")
    return curve, total / epochs


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_solver = os.path.join(here, "..", "..", "target", "examples", "libgrid_shortest_path.so")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solver", default=default_solver)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--deg", type=int, nargs="+", default=[1, 4, 6])
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()
    solver = Solver(args.solver)
    rows = []
    for method in args.method:
        for deg in args.deg:
            curve, seconds = train(solver, deg, method, args.epochs)
            rows.append((method, deg, curve[0], curve[-1], seconds))
    print(f"\nnormalized test regret, untrained -> trained ({args.epochs} epochs), seconds per epoch:")
    for method, deg, first, last, seconds in rows:
        print(f"  {method:>7}  deg {deg}: {first:.4f} -> {last:.4f}  ({seconds:.3f} s/epoch)")
    for method, deg, first, last, _ in rows:
        if not last < first:
            raise SystemExit(f"training did not lower the regret ({method}, deg {deg})")


if __name__ == "__main__":
    main()
