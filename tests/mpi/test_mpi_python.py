"""perturbations.mpi over 3 ranks (mpirun -np 3 python tests/mpi/test_mpi_python.py): one
library in the process; the spread op equals Op.with_workers in one process (forward and
its gradient through perturbations.torch); the solver is told global rows; a Python
solver's exception on rank 2 fails root's call naming the rank and the exception."""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

import perturbations as pt
import perturbations.mpi
import perturbations.torch as ptt

comm = MPI.COMM_WORLD
D, N = 5, 8


def make_solver(worker):
    def solve(x, info):
        rows = info.first_row + np.arange(len(x))
        problems = rows if info.clean else rows // info.num_samples
        assert np.all(np.abs(x[:, 0] - (100 + 10 * problems)) < 5), "not the global rows"
        if np.any(x[:, 1] == -777):
            if comm.rank == 2:
                raise ValueError("poisoned on rank 2")
            # the other ranks take their time with such rows, so that rank 2 asks for some
            # too however the machine's load spreads the blocks (without it, ranks 0 and 1
            # could solve them all before rank 2 asked: no failure to check)
            time.sleep(0.2)
        y = np.zeros_like(x)
        y[np.arange(len(x)), 1 + np.argmax(x[:, 1:], axis=1)] = 1
        return y
    return solve


def failing_maker(worker):
    """Rank 2 cannot build its solver: root's call fails with make_solver's exception
    (the other ranks take their time, so that rank 2 gets blocks)."""
    if comm.rank == 2:
        raise RuntimeError("rank 2 cannot build its model")
    solve = make_solver(worker)

    def slow(x, info):
        time.sleep(0.05)
        return solve(x, info)
    return slow


def problems(batch, marker=0.0):
    theta = np.random.default_rng(1).normal(size=(batch, D)).astype(np.float32)
    theta[:, 0] = 100 + 10 * np.arange(batch)
    theta[:, 1] = marker if marker else theta[:, 1]
    return theta


def root_checks(op):
    cfg = pt.Config(num_samples=N, sigma=0.5, seed=5, device="cpu", threads=2)
    alone = pt.Op.with_workers(cfg, D, D, make_solver)
    for batch in (1, 7, 30):
        theta = torch.tensor(problems(batch), requires_grad=True)
        y1 = ptt.perturbed(op, theta)
        g1, = torch.autograd.grad(y1[:, 2].sum(), theta)
        y2 = ptt.perturbed(alone, theta)
        g2, = torch.autograd.grad(y2[:, 2].sum(), theta)
        assert torch.equal(y1, y2) and torch.equal(g1, g2), batch
        assert np.array_equal(op.solve(problems(batch)), alone.solve(problems(batch)))
    try:
        op.solve(problems(40, -777.0))
        raise AssertionError("rank 2's exception did not fail the call")
    except pt.SolverFailedError as e:
        assert "rank 2 failed" in str(e) and "ValueError: poisoned on rank 2" in str(e), str(e)
    alone.close()


def failing_rank_is_named(op):
    try:
        op.solve(problems(40))
        raise AssertionError("rank 2's make_solver exception did not fail the call")
    except pt.SolverFailedError as e:
        assert "rank 2" in str(e) and "RuntimeError: rank 2 cannot build its model" in str(e), str(e)


def on_ranks(op, checks):
    """checks(op) on root, then closes the op; the other ranks serve it until then.
    Whether root's checks passed."""
    ok = True
    if comm.rank == 0:
        try:
            checks(op)
        except AssertionError as e:
            print("FAILED:", e, file=sys.stderr)
            ok = False
        op.close()
    else:
        perturbations.mpi.serve(op)
        op.close()
    return ok


def main():
    cfg = pt.Config(num_samples=N, sigma=0.5, seed=5, device="cpu", threads=1 + comm.rank % 2)
    op = perturbations.mpi.op(cfg, D, D, make_solver, comm, root=0)
    maps = open("/proc/self/maps").read()
    copies = {line.split()[-1] for line in maps.splitlines() if "libperturbations" in line}
    assert len(copies) == 2, copies  # the component and one libperturbations: the package's
    ok = on_ranks(op, root_checks)
    # an exception of make_solver on a serving rank reaches root's message, type and text
    ok = on_ranks(perturbations.mpi.op(cfg, D, D, failing_maker, comm, root=0), failing_rank_is_named) and ok
    ok = comm.allreduce(int(not ok)) == 0
    if comm.rank == 0:
        print(f"perturbations.mpi over {comm.size} ranks:", "all checks passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
