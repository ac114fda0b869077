"""Python against C for one training step (issue 28): the Fenchel-Young loss forward and
backward (perturbations.torch.fenchel_young(..., reduction="mean").backward()) and
perturbed + backward, per batch of 32 problems of 40 edge costs, against the same library
calls made from C (bench/loss_step.c), for the built-in argmax and the grid shortest-path C
solver (a ctypes function pointer from Python), N = 1 and 10. Medians of 400 steps after
100 of warm-up (C: of 400 calls after 100), in the same process order on one machine.

    python bench/python_vs_c.py LOSS_STEP_BINARY GRID_SOLVER_SO
"""

import ctypes
import statistics
import subprocess
import sys
import time

import torch

import perturbations as pt
import perturbations.torch as ptt

BATCH, D, CALLS = 32, 40, 400


def median_ms(step):
    for _ in range(CALLS // 4):
        step()
    times = []
    for _ in range(CALLS):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def python_step(kind, n, mode, grid):
    sense = "minimize" if kind else "maximize"
    cfg = pt.Config(num_samples=n, sigma=1.0, device="cpu", sense=sense)
    op = pt.Op(cfg, D, D, grid) if kind else pt.Op.builtin(cfg, "argmax", D)
    i = torch.arange(BATCH * D, dtype=torch.float64)
    theta = (0.5 + (i * 7919 % 1000) / 1000).float().reshape(BATCH, D).requires_grad_(True)
    if kind:
        y = torch.empty(BATCH, D)
        grid(None, ctypes.c_void_p(theta.data_ptr()), BATCH, ctypes.c_void_p(y.data_ptr()))
    else:
        y = torch.nn.functional.one_hot(theta.detach().argmax(1), D).float()
    g = torch.ones(BATCH, D)

    def fy():
        ptt.fenchel_young(op, theta, y, reduction="mean").backward()

    def vjp():
        ptt.perturbed(op, theta).backward(g)

    return median_ms(fy if mode == "fy" else vjp)


def main():
    binary, solver_so = sys.argv[1], sys.argv[2]
    grid = ctypes.CDLL(solver_so).grid_shortest_path
    grid.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    grid.restype = ctypes.c_int32
    rows = []
    for kind, name in ((0, "built-in argmax"), (1, "C shortest path")):
        for mode, what in (("fy", "Fenchel-Young loss + backward"), ("vjp", "perturbed + backward")):
            for n in (1, 10):
                c = float(subprocess.run([binary, str(BATCH), str(n), str(kind), mode, str(CALLS)],
                                         capture_output=True, text=True, check=True).stdout)
                p = python_step(kind, n, mode, grid)
                rows.append(f"| {name} | {what} | {n} | {c:.3f} ms | {p:.3f} ms | {p / c:.2f}x |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("| solver | step | N | C | Python | Python / C |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
