"""Training with solves spread over an MPI job, from Python (mpi4py).

A linear model (torch.nn.Linear) learns the item values of 0-1 knapsacks from features by
the perturbed Fenchel-Young loss; the perturbed knapsacks are solved by a Python dynamic
program on the workers of every rank. Root trains; the other ranks serve.

    make mpi                                   # the MPI component, with your MPI
    pip install mpi4py
    mpirun -np 4 python examples/python/mpi_training.py [--epochs 3]

Prints the test regret before training and after each epoch; exits non-zero when it did
not fall (make test runs it over 3 ranks).
"""

import argparse
import time

import numpy as np
import torch
from mpi4py import MPI

import perturbations as pt
import perturbations.mpi
import perturbations.torch as ptt

ITEMS, CAPACITY, FEATURES = 16, 40, 5
WEIGHTS = np.array([7, 3, 9, 4, 6, 8, 2, 5, 10, 3, 7, 6, 4, 9, 5, 8])


def knapsack(values):
    """The 0-1 knapsack's best items for `values` (exact dynamic program)."""
    best = np.zeros((ITEMS + 1, CAPACITY + 1))
    for j in range(1, ITEMS + 1):
        w, v = WEIGHTS[j - 1], values[j - 1]
        best[j] = best[j - 1]
        best[j, w:] = np.maximum(best[j - 1, w:], best[j - 1, :-w] + v)
    x, c = np.zeros(ITEMS, dtype=np.float32), CAPACITY
    for j in range(ITEMS, 0, -1):
        if best[j, c] != best[j - 1, c]:
            x[j - 1], c = 1.0, c - WEIGHTS[j - 1]
    return x


def make_solver(worker):
    """Each worker's solver (one per worker thread, on every rank): a batch of rows."""
    return lambda values: np.stack([knapsack(v) for v in values])


def data(n, rng, b):
    feats = rng.normal(size=(n, FEATURES)).astype(np.float32)
    costs = ((feats @ b.T) / np.sqrt(FEATURES) + 3) ** 4 / 3.5**4 + 0.5
    costs = (costs * rng.uniform(0.75, 1.25, size=costs.shape)).astype(np.float32)
    return torch.from_numpy(feats), costs, np.stack([knapsack(c) for c in costs])


def regret(model, feats, costs, sols):
    with torch.no_grad():
        pred = model(feats).numpy()
    chosen = np.stack([knapsack(p) for p in pred])
    opt = (costs * sols).sum()
    return float((opt - (costs * chosen).sum()) / opt)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    cfg = pt.Config(num_samples=10, sigma=1.0, seed=7, device="cpu", threads=1, remote_timeout=120)
    op = perturbations.mpi.op(cfg, ITEMS, ITEMS, make_solver, comm, root=0)
    if comm.rank != 0:
        perturbations.mpi.serve(op)  # until root closes its op
        op.close()
        return 0

    rng = np.random.default_rng(0)
    b = rng.integers(0, 2, size=(ITEMS, FEATURES)).astype(np.float32)
    train_x, _, train_y = data(200, rng, b)
    test = data(100, rng, b)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, ITEMS)
    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    before = regret(model, *test)
    print(f"knapsack training over {comm.size} ranks (a Python DP on each): test regret {before:.4f}")
    targets = torch.from_numpy(train_y)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for s in range(0, 200, 20):
            loss = ptt.fenchel_young(op, model(train_x[s:s + 20]), targets[s:s + 20], reduction="mean")
            adam.zero_grad()
            loss.backward()
            adam.step()
        print(f"epoch {epoch + 1}: {time.perf_counter() - start:.2f} s, test regret {regret(model, *test):.4f}")
    after = regret(model, *test)
    op.close()  # ends the service on every rank
    return 0 if after < 0.5 * before else 1


if __name__ == "__main__":
    raise SystemExit(main())
