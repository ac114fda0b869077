"""The README's edge orders: the repository's C grid solver on PyEPO-ordered costs through
the README's permutation finds the paths of a solver in PyEPO's order."""

import ctypes
import os

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TO_C = [9 * i + j for i in range(5) for j in range(4)] + [9 * i + 4 + j for i in range(4) for j in range(5)]

ARCS = []
for i in range(5):
    ARCS += [(5 * i + j, 5 * i + j + 1) for j in range(4)]
    ARCS += [(5 * i + j, 5 * i + j + 5) for j in range(5)] if i < 4 else []


def pyepo_order_shortest_path(costs):
    paths = np.zeros_like(costs)
    for r, c in enumerate(costs):
        best, via = np.full(25, np.inf), np.zeros(25, dtype=int)
        best[0] = 0.0
        for e, (u, v) in enumerate(ARCS):
            if best[u] + c[e] < best[v]:
                best[v], via[v] = best[u] + c[e], e
        v = 24
        while v:
            paths[r, via[v]], v = 1.0, ARCS[via[v]][0]
    return paths


def test_the_permutation_maps_pyepo_edges_to_the_c_solver(tmp_path):
    from conftest import compile_c
    source = open(os.path.join(ROOT, "examples/c/grid_shortest_path.c")).read()
    grid = ctypes.CDLL(compile_c(tmp_path, source, name="libgrid.so")).grid_shortest_path
    grid.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    rng = np.random.default_rng(0)
    c = rng.uniform(0.1, 2.0, (200, 40)).astype(np.float32)
    want = pyepo_order_shortest_path(c)
    c_order = np.ascontiguousarray(c[:, TO_C])
    out = np.zeros_like(c_order)
    assert grid(None, c_order.ctypes.data, 200, out.ctypes.data) == 0
    back = np.zeros_like(out)
    back[:, TO_C] = out
    assert np.array_equal(back, want)
    assert not np.array_equal(out, want)  # without the permutation the paths differ
