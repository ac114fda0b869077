"""The GPU table (issue 15): this library's CUDA ops against the seed's algorithm on the
same GPU (its noise drawn on the CPU and copied, as the seed does), in one process.

    python bench/gpu.py [--quick] [--out FILE]

Needs a CUDA device, the files of `make bench` (target/release/libperturbations.so,
target/bench/libbench_solvers.so) and target/release/examples/noise_rate. Times are of
finished GPU work (torch.cuda.synchronize after each call). Peak GPU memory is the
caching allocator's peak during one call minus what was allocated before it; the
library allocates through the same libtorch, so it counts both sides alike.
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

DEV = os.environ.get("PERT_GPU_BENCH_DEVICE", "cuda")  # "cpu": a dry run of the script here
os.environ["PERT_BENCH_DEVICE"] = DEV
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench  # noqa: E402
import seed_algorithm as seed  # noqa: E402
import training  # noqa: E402

NOISE_RATE = os.path.join(bench.ROOT, "target", "release", "examples", "noise_rate")
SECONDS_PER_CELL = 2.0  # a cell stops calling once this is spent (at least 3 calls)


def synced(f):
    def run():
        f()
        if DEV == "cuda":
            torch.cuda.synchronize()
    return run


def median_time(run, warmup=5, calls=training.CALLS):
    for _ in range(warmup):
        run()
    times, start = [], time.perf_counter()
    while len(times) < calls and (len(times) < 3 or time.perf_counter() - start < SECONDS_PER_CELL):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_and_peak(run, repeats, warm=True):
    """Best time of `repeats` calls after one call whose GPU peak (above the memory
    allocated before it) is returned in MiB; with repeats 0, that call's time (after a
    warm-up call when `warm`)."""
    if warm:
        run()
    if DEV != "cuda":  # a dry run: no GPU memory to count
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        peak = 0.0
    else:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    times = [] if repeats else [first]
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times), peak


class Ours:
    def __init__(self):
        self.lib = bench.Lib()
        c = self.lib.c
        c.pert_draw_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
        c.pert_draw_new.restype = ctypes.c_uint32
        c.pert_draw_free.argtypes = [ctypes.c_void_p]
        c.pert_draw_free.restype = None
        c.pert_cuda_device_count.restype = ctypes.c_int32

    def op(self, device, n, sigma, noise, shape, builtin=None, k=0, solver=None, threads=1):
        bench.DEVICE = device
        return self.lib.op(n, sigma, noise, threads=threads, builtin=builtin, k=k, shape=shape, solver=solver)

    def forward_vjp(self, op, theta, batch, numel):
        c, ok = self.lib.c, self.lib.ok
        y = (ctypes.c_float * (batch * numel))()
        g = (ctypes.c_float * (batch * numel))()

        def run():
            tape = ctypes.c_void_p()
            ok(c.pert_forward(op, theta, batch, y, ctypes.byref(tape)))
            ok(c.pert_tape_vjp(tape, y, g))
            c.pert_tape_free(tape)
        return synced(run)


def seed_run(solve, theta, n, sigma, noise):
    def run():
        y, saved = seed.perturbed_forward(solve, theta, n, sigma, noise, DEV)
        seed.perturbed_backward(saved, y, n, sigma)
    return synced(run)


def ms(t):
    return f"{t * 1000:.2f} ms" if t < 0.01 else f"{t * 1000:.1f} ms"


def mib(m):
    return f"{m:.0f}" if m >= 1 else "< 1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU table needs one")
        return 1
    ours = Ours()
    lines, log = [], lambda *s: print(*s, file=sys.stderr, flush=True)
    w = lines.append
    card = "no GPU (dry run)"
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB)"
    w(f"GPU: {card}, "
      f"pert_cuda_device_count() = {ours.lib.c.pert_cuda_device_count()}, torch {torch.__version__}, "
      f"{time.strftime('%Y-%m-%d')}")
    w("")

    # ---- built-in argmax, N = 1e6 .. 1e8, and top-k B=64 D=1000 -----------------------
    w("| case | seed's algorithm on the GPU | ours (CUDA op) | speed-up | seed peak GPU MiB | ours peak GPU MiB | "
      "ours on this machine's CPU |")
    w("|---|---|---|---|---|---|---|")
    theta_flat = [v for row in bench.THETA for v in row]
    theta_c = bench.floats(theta_flat)
    theta_t = torch.tensor(bench.THETA, device=DEV)
    sizes = [10**6, 10**7] if a.quick else [10**6, 10**7, 10**8]
    for n in sizes:
        op = ours.op(DEV, n, 0.5, "gumbel", [5], builtin=0)
        big = n >= 10**8  # one call (after the smaller sizes have warmed up both sides)
        t_o, p_o = best_and_peak(ours.forward_vjp(op, theta_c, 2, 5), 0 if big else 3, warm=not big)
        ours.lib.c.pert_op_free(op)
        op = ours.op("cpu", n, 0.5, "gumbel", [5], builtin=0)
        t_cpu, _ = best_and_peak(ours.forward_vjp(op, theta_c, 2, 5), 0 if big else 3, warm=not big)
        ours.lib.c.pert_op_free(op)
        try:
            t_s, p_s = best_and_peak(seed_run(seed.argmax, theta_t, n, 0.5, "gumbel"), 0 if big else 3, warm=not big)
            seed_cells = f"{ms(t_s)} | {ms(t_o)} | {t_s / t_o:.1f}x | {mib(p_s)}"
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            log(f"seed at N={n}: {e}")
            seed_cells = f"out of memory | {ms(t_o)} | - | -"
        if DEV == "cuda":
            torch.cuda.empty_cache()
        w(f"| argmax, Gumbel, B=2 D=5 N={n:.0e}, forward+VJP | {seed_cells} | {mib(p_o)} | {ms(t_cpu)} |")
        log(lines[-1])
    import random
    rng = random.Random(0)
    b, d, k = 64, 1000, 10
    tk_flat = [rng.gauss(0.0, 1.0) for _ in range(b * d)]
    tk_c, tk_t = bench.floats(tk_flat), torch.tensor(tk_flat, device=DEV).reshape(b, d)
    for n in (100, 1000):
        op = ours.op(DEV, n, 0.5, "normal", [d], builtin=1, k=k)
        t_o, p_o = best_and_peak(ours.forward_vjp(op, tk_c, b, d), 3)
        ours.lib.c.pert_op_free(op)
        op = ours.op("cpu", n, 0.5, "normal", [d], builtin=1, k=k)
        t_cpu, _ = best_and_peak(ours.forward_vjp(op, tk_c, b, d), 3)
        ours.lib.c.pert_op_free(op)
        t_s, p_s = best_and_peak(seed_run(seed.topk_indicator(k), tk_t, n, 0.5, "normal"), 3)
        if DEV == "cuda":
            torch.cuda.empty_cache()
        w(f"| top-10, Normal, B=64 D=1000 N={n}, forward+VJP | {ms(t_s)} | {ms(t_o)} | {t_s / t_o:.1f}x | "
          f"{mib(p_s)} | {mib(p_o)} | {ms(t_cpu)} |")
        log(lines[-1])

    # ---- a host callback on a CUDA op --------------------------------------------------
    solvers = ctypes.CDLL(bench.SOLVERS)
    solvers.bench_edges.restype = ctypes.c_size_t
    edges = solvers.bench_edges()
    solvers.bench_costs.restype = ctypes.POINTER(ctypes.c_float)
    costs = bench.floats([solvers.bench_costs()[i] for i in range(edges)])
    path = ctypes.cast(solvers.bench_shortest_path, ctypes.c_void_p)
    n = 10**4 if a.quick else 10**5
    cb = {}
    for device in (DEV, "auto"):
        op = ours.op(device, n, 0.05, "normal", [edges], solver=path)
        cb[device], _ = best_and_peak(ours.forward_vjp(op, costs, 1, edges), 3)
        ours.lib.c.pert_op_free(op)
    w("")
    w(f"C shortest-path callback (13 edges, N={n:.0e}, 1 thread, forward+VJP): on a CUDA op (rows staged "
      f"to the host and back) {ms(cb[DEV])}; under \"auto\" (the host pipeline) {ms(cb['auto'])}.")
    log(lines[-1])

    # ---- noise rate against the card's bandwidth ---------------------------------------
    rate = json.loads(subprocess.run([NOISE_RATE, DEV, str(10**7 if a.quick else 10**8)],
                                     capture_output=True, text=True, check=True).stdout)
    w("")
    w(f"Noise on the GPU ({rate['values']:.0e} values): Normal {rate['normal_per_s'] / 1e9:.2f} G/s, Gumbel "
      f"{rate['gumbel_per_s'] / 1e9:.2f} G/s; Normal float32 written at {rate['normal_bytes_per_s'] / 1e9:.0f} GB/s, "
      f"{100 * rate['normal_fraction_of_copy']:.1f}% of the card's measured copy bandwidth "
      f"({rate['copy_bytes_per_s'] / 1e9:.0f} GB/s read + written); fused kernel: {rate['fused_kernel']}; "
      f"the libtorch operations it replaces: Normal {rate['libtorch_ops_normal_per_s'] / 1e9:.2f} G/s.")
    log(lines[-1])

    # ---- the training regime -----------------------------------------------------------
    w("")
    w("Training regime on the GPU (forward + VJP, Normal sigma 0.1, median of up to "
      f"{training.CALLS} calls after 5 of warm-up; seed and ours both on cuda; "
      "the C callback is a one-hot argmax on a CUDA op; \"CPU\": ours on this machine's CPU, device \"cpu\"; \"auto\": small calls on the CPU, large ones on the GPU):")
    w("")
    w("| batch | D | N | seed argmax | ours argmax | CPU argmax | \"auto\" argmax | seed top-k | ours top-k | CPU top-k | "
      "seed ranks | ours ranks | CPU ranks | C callback on a CUDA op |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    argmax_fn = ctypes.cast(solvers.bench_argmax, ctypes.c_void_p)

    def ranks(x):
        return (torch.argsort(torch.argsort(x, dim=-1), dim=-1) + 1).float()

    for (b, d, n) in training.POINTS:
        vals = training.theta_values(b, d)
        th_c, th_t = bench.floats(vals), torch.tensor(vals, device=DEV).reshape(b, d)
        k = training.k_of(d)
        cell = {}
        for name, builtin, kk, solve in (("argmax", 0, 0, seed.argmax), ("topk", 1, k, seed.topk_indicator(k)),
                                         ("ranks", 2, 0, ranks)):
            op = ours.op(DEV, n, training.SIGMA, "normal", [d], builtin=builtin, k=kk)
            cell[name] = median_time(ours.forward_vjp(op, th_c, b, d))
            ours.lib.c.pert_op_free(op)
            op = ours.op("cpu", n, training.SIGMA, "normal", [d], builtin=builtin, k=kk)
            cell["cpu_" + name] = median_time(ours.forward_vjp(op, th_c, b, d))
            ours.lib.c.pert_op_free(op)
            if name == "argmax":
                op = ours.op("auto", n, training.SIGMA, "normal", [d], builtin=builtin, k=kk)
                cell["auto_" + name] = median_time(ours.forward_vjp(op, th_c, b, d))
                ours.lib.c.pert_op_free(op)
            cell["seed_" + name] = median_time(seed_run(solve, th_t, n, training.SIGMA, "normal"))
        width = ctypes.c_size_t(d)
        dims = (ctypes.c_int64 * 1)(d)
        cfg = ctypes.c_void_p()
        c = ours.lib.c
        ours.lib.ok(c.pert_config_new(ctypes.byref(cfg)))
        ours.lib.ok(c.pert_config_set_num_samples(cfg, n))
        ours.lib.ok(c.pert_config_set_sigma(cfg, training.SIGMA))
        ours.lib.ok(c.pert_config_set_device(cfg, DEV.encode()))
        o = ctypes.c_void_p()
        ours.lib.ok(c.pert_op_new(cfg, dims, 1, dims, 1, argmax_fn, ctypes.byref(width), ctypes.byref(o)))
        c.pert_config_free(cfg)
        cell["callback"] = median_time(ours.forward_vjp(o, th_c, b, d))
        c.pert_op_free(o)
        r = lambda kind: f"{ms(cell[kind])} ({cell['seed_' + kind] / cell[kind]:.1f}x)"
        w(f"| {b} | {d} | {n} | {ms(cell['seed_argmax'])} | {r('argmax')} | {ms(cell['cpu_argmax'])} | "
          f"{ms(cell['auto_argmax'])} | "
          f"{ms(cell['seed_topk'])} | {r('topk')} | {ms(cell['cpu_topk'])} | "
          f"{ms(cell['seed_ranks'])} | {r('ranks')} | {ms(cell['cpu_ranks'])} | {ms(cell['callback'])} |")
        log(lines[-1])

    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
