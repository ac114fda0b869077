"""The training-regime table of `make bench`: many problems, few samples (batch 32 to 1024,
D 10 to 1000, N 1 to 1000), forward + VJP, Normal noise sigma 0.1, the median of 31 calls
after 20 calls of warm-up, this library (built-in argmax, top-k, ranks; a C argmax
callback on 1 and 2 threads) against the seed's algorithm (seed_algorithm.py, with torch's argmax, top-k and
ranks; the C callbacks hand-vectorized and plain) and against drawing the perturbed inputs alone (pert_draw_new). Each point runs in
a fresh process per side."""

import ctypes
import json
import statistics
import time

POINTS = [  # (batch, D, N)
    (32, 40, 10),
    (64, 1000, 1),
    (64, 1000, 2),
    (128, 1000, 10),
    (256, 100, 100),
    (1024, 10, 1000),
    (1024, 100, 10),
    (32, 10, 1000),
]
SIGMA = 0.1
CALLS = 31


def k_of(d):
    return max(1, d // 10)


WARMUP = 20


def median_time(run, calls=CALLS):
    # a training loop makes thousands of calls: the steady state after warm-up (the
    # allocator's first calls map fresh pages), the same for both sides
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def theta_values(b, d):
    import random
    rng = random.Random(b * 7919 + d)
    return [rng.gauss(0.0, 1.0) for _ in range(b * d)]


def ours(point, lib_class, solvers_path):
    b, d, n = point
    lib = lib_class()
    c = lib.c
    vals = theta_values(b, d)
    theta = (ctypes.c_float * (b * d))(*vals)
    y = (ctypes.c_float * (b * d))()
    g = (ctypes.c_float * (b * d))()
    solvers = ctypes.CDLL(solvers_path)
    argmax_fn = ctypes.cast(solvers.bench_argmax, ctypes.c_void_p)
    plain_fn = ctypes.cast(solvers.bench_argmax_plain, ctypes.c_void_p)
    width = ctypes.c_size_t(d)
    c.pert_draw_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    c.pert_draw_new.restype = ctypes.c_uint32
    c.pert_draw_free.argtypes = [ctypes.c_void_p]
    c.pert_draw_free.restype = None
    c.pert_op_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]

    def op(builtin=None, k=0, threads=1, solver=argmax_fn):
        cfg = ctypes.c_void_p()
        lib.ok(c.pert_config_new(ctypes.byref(cfg)))
        lib.ok(c.pert_config_set_num_samples(cfg, n))
        lib.ok(c.pert_config_set_sigma(cfg, SIGMA))
        lib.ok(c.pert_config_set_device(cfg, b"cpu"))
        lib.ok(c.pert_config_set_threads(cfg, threads))
        dims = (ctypes.c_int64 * 1)(d)
        o = ctypes.c_void_p()
        if builtin is None:
            lib.ok(c.pert_op_new(cfg, dims, 1, dims, 1, solver, ctypes.byref(width), ctypes.byref(o)))
        else:
            lib.ok(c.pert_op_new_builtin(cfg, builtin, k, dims, 1, ctypes.byref(o)))
        c.pert_config_free(cfg)
        return o

    def forward_vjp(o):
        def run():
            tape = ctypes.c_void_p()
            lib.ok(c.pert_forward(o, theta, b, y, ctypes.byref(tape)))
            lib.ok(c.pert_tape_vjp(tape, y, g))
            c.pert_tape_free(tape)
        return run

    def draw_alone(o):
        def run():
            dr = ctypes.c_void_p()
            lib.ok(c.pert_draw_new(o, theta, b, ctypes.byref(dr)))
            c.pert_draw_free(dr)
        return run

    out = {}
    out["argmax"] = median_time(forward_vjp(op(builtin=0)))
    out["topk"] = median_time(forward_vjp(op(builtin=1, k=k_of(d))))
    out["ranks"] = median_time(forward_vjp(op(builtin=2)))
    out["callback_t1"] = median_time(forward_vjp(op(threads=1)))
    out["callback_t2"] = median_time(forward_vjp(op(threads=2)))
    out["plain_t1"] = median_time(forward_vjp(op(threads=1, solver=plain_fn)))
    out["plain_t2"] = median_time(forward_vjp(op(threads=2, solver=plain_fn)))
    out["noise"] = median_time(draw_alone(op(builtin=0)))
    return out


def seed(point):
    import torch
    import seed_algorithm as s
    b, d, n = point
    theta = torch.tensor(theta_values(b, d)).reshape(b, d)

    def ranks(x):
        return (torch.argsort(torch.argsort(x, dim=-1), dim=-1) + 1).float()

    def run_for(solve):
        def run():
            y, saved = s.perturbed_forward(solve, theta, n, SIGMA, "normal", "cpu")
            return s.perturbed_backward(saved, y, n, SIGMA)
        return run

    return {
        "argmax": median_time(run_for(s.argmax)),
        "topk": median_time(run_for(s.topk_indicator(k_of(d)))),
        "ranks": median_time(run_for(ranks)),
    }


def table(results):
    """Markdown rows from {(point, side): result}."""
    def ms(t):
        return f"{t * 1000:.2f}" if t < 0.01 else f"{t * 1000:.1f}"

    lines = [
        "| batch | D | N | seed argmax | ours argmax | seed top-k | ours top-k | seed ranks | ours ranks "
        "| C callback 1 thread | C callback 2 threads | plain C callback 1 thread | plain C callback 2 threads "
        "| perturbed inputs alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in POINTS:
        s, o = results[(p, "seed")], results[(p, "ours")]
        ratio = lambda kind, mine: f"{ms(o[mine])} ms ({s[kind] / o[mine]:.1f}x)"
        lines.append(
            f"| {p[0]} | {p[1]} | {p[2]} | {ms(s['argmax'])} ms | {ratio('argmax', 'argmax')} | "
            f"{ms(s['topk'])} ms | {ratio('topk', 'topk')} | {ms(s['ranks'])} ms | {ratio('ranks', 'ranks')} | "
            f"{ratio('argmax', 'callback_t1')} | {ratio('argmax', 'callback_t2')} | "
            f"{ratio('argmax', 'plain_t1')} | {ratio('argmax', 'plain_t2')} | {ms(o['noise'])} ms |")
    return lines


if __name__ == "__main__":
    print(json.dumps("run through bench.py --only training"))
