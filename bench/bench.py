"""`make bench`: this library against the seed's algorithm (seed_algorithm.py), side by
side on the same machine, each case in a fresh process, printing a table of times, ratios
and peak extra memory.

    python bench.py [--quick] [--out FILE]

Peak extra memory is the process's peak resident set size during the timed call minus its
resident size just before (after a warm-up call), so it counts what the call allocates.
"""

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# PERT_BENCH_LIB: another build of the library to time (an A/B comparison of two builds)
LIB = os.environ.get("PERT_BENCH_LIB") or os.path.join(ROOT, "target", "release", "libperturbations.so")
SOLVERS = os.path.join(ROOT, "target", "bench", "libbench_solvers.so")
ADAPTER = os.path.join(ROOT, "target", "bench", "adapter_bench")

THETA = [[-0.6, 1.9, -0.2, 1.1, -1.0], [-0.6, 1.0, -0.2, 1.8, -1.0]]
DEVICE = os.environ.get("PERT_BENCH_DEVICE", "cpu")  # --device sets it for the case processes


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---- this library through its C API -------------------------------------------------

class Lib:
    def __init__(self):
        self.c = ctypes.CDLL(LIB)
        c = self.c
        P = ctypes.c_void_p
        for name, args in {
            "pert_config_new": [ctypes.POINTER(P)],
            "pert_config_set_num_samples": [P, ctypes.c_uint64],
            "pert_config_set_sigma": [P, ctypes.c_double],
            "pert_config_set_noise": [P, ctypes.c_uint32],
            "pert_config_set_seed": [P, ctypes.c_uint64],
            "pert_config_set_device": [P, ctypes.c_char_p],
            "pert_config_set_threads": [P, ctypes.c_uint32],
            "pert_op_new_builtin": [P, ctypes.c_uint32, ctypes.c_int64, P, ctypes.c_size_t, ctypes.POINTER(P)],
            "pert_op_new": [P, P, ctypes.c_size_t, P, ctypes.c_size_t, P, P, ctypes.POINTER(P)],
            "pert_forward": [P, P, ctypes.c_size_t, P, ctypes.POINTER(P)],
            "pert_tape_vjp": [P, P, P],
        }.items():
            getattr(c, name).argtypes = args
            getattr(c, name).restype = ctypes.c_uint32
        for name in ["pert_config_free", "pert_op_free", "pert_tape_free"]:
            getattr(c, name).argtypes = [P]
            getattr(c, name).restype = None
        c.pert_last_error.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        c.pert_last_error.restype = ctypes.c_size_t

    def ok(self, status):
        if status != 0:
            buf = ctypes.create_string_buffer(512)
            self.c.pert_last_error(buf, 512)
            raise RuntimeError(buf.value.decode())

    def op(self, n, sigma, noise, seed=0, threads=1, builtin=None, k=0, shape=None, solver=None):
        c = self.c
        cfg = ctypes.c_void_p()
        self.ok(c.pert_config_new(ctypes.byref(cfg)))
        self.ok(c.pert_config_set_num_samples(cfg, n))
        self.ok(c.pert_config_set_sigma(cfg, sigma))
        self.ok(c.pert_config_set_noise(cfg, {"normal": 0, "gumbel": 1}[noise]))
        self.ok(c.pert_config_set_seed(cfg, seed))
        self.ok(c.pert_config_set_device(cfg, DEVICE.encode()))
        self.ok(c.pert_config_set_threads(cfg, threads))
        dims = (ctypes.c_int64 * len(shape))(*shape)
        op = ctypes.c_void_p()
        if builtin is not None:
            self.ok(c.pert_op_new_builtin(cfg, builtin, k, dims, len(shape), ctypes.byref(op)))
        else:
            self.ok(c.pert_op_new(cfg, dims, len(shape), dims, len(shape), solver, None, ctypes.byref(op)))
        c.pert_config_free(cfg)
        return op

    def forward_vjp(self, op, theta, batch, numel, grad=None):
        """Forward with a tape, then the VJP of grad (default: the output itself)."""
        c = self.c
        y = (ctypes.c_float * (batch * numel))()
        tape = ctypes.c_void_p()
        self.ok(c.pert_forward(op, theta, batch, y, ctypes.byref(tape)))
        g = (ctypes.c_float * (batch * numel))()
        self.ok(c.pert_tape_vjp(tape, grad if grad is not None else y, g))
        c.pert_tape_free(tape)
        return list(y), list(g)


def floats(values):
    return (ctypes.c_float * len(values))(*values)


# ---- the cases ----------------------------------------------------------------------

def case_argmax(impl, n, repeats):
    theta_flat = [v for row in THETA for v in row]
    if impl == "ours":
        lib = Lib()
        theta = floats(theta_flat)
        def make(n):
            op = lib.op(n, 0.5, "gumbel", builtin=0, shape=[5])
            return lambda: lib.forward_vjp(op, theta, 2, 5)
    else:
        import torch
        import seed_algorithm as seed
        theta = torch.tensor(THETA, device=DEVICE)
        def make(n):
            def run():
                y, saved = seed.perturbed_forward(seed.argmax, theta, n, 0.5, "gumbel", DEVICE)
                return seed.perturbed_backward(saved, y, n, 0.5)
            return run
    return measure(make, n, repeats)


def case_callback(impl, n, repeats, threads=1, solver="bench_shortest_path"):
    solvers = ctypes.CDLL(SOLVERS)
    solvers.bench_edges.restype = ctypes.c_size_t
    edges = solvers.bench_edges()
    solvers.bench_costs.restype = ctypes.POINTER(ctypes.c_float)
    costs = [solvers.bench_costs()[i] for i in range(edges)]
    fn = ctypes.cast(getattr(solvers, solver), ctypes.c_void_p)
    if impl == "ours":
        lib = Lib()
        theta = floats(costs)
        def make(n):
            op = lib.op(n, 0.05, "normal", threads=threads, shape=[edges], solver=fn)
            return lambda: lib.forward_vjp(op, theta, 1, edges)
    else:
        import torch
        import seed_algorithm as seed
        solve = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)(
            ctypes.cast(fn, ctypes.c_void_p).value)
        def func(x):  # one vectorized call of the same C solver on all N x B rows
            x = x.contiguous()
            y = torch.empty_like(x)
            if solve(None, x.data_ptr(), x.shape[0], y.data_ptr()) != 0:
                raise RuntimeError("solver failed")
            return y
        theta = torch.tensor([costs])  # the callback gets host memory: the seed's solve runs on the CPU
        def make(n):
            def run():
                y, saved = seed.perturbed_forward(func, theta, n, 0.05, "normal", "cpu")
                return seed.perturbed_backward(saved, y, n, 0.05)
            return run
    return measure(make, n, repeats)


def case_overhead(impl, n, repeats):
    """The per-row cost of everything but the solver: a nearly free C solver (one-hot of
    the largest of 13 costs) on N perturbed rows, 1 thread, forward + VJP, minus the time
    of the solver alone on N rows."""
    solvers = ctypes.CDLL(SOLVERS)
    solvers.bench_one_hot_alone.restype = ctypes.c_double
    solvers.bench_one_hot_alone.argtypes = [ctypes.c_size_t, ctypes.c_int]
    r = case_callback(impl, n, repeats, threads=1, solver="bench_one_hot")
    r["alone"] = solvers.bench_one_hot_alone(n, repeats)
    r["ns_per_row"] = (r["time"] - r["alone"]) / n * 1e9
    return r


def case_topk(impl, n, repeats, b=64, d=1000, k=10):
    import random
    rng = random.Random(0)
    theta_flat = [rng.gauss(0.0, 1.0) for _ in range(b * d)]
    if impl == "ours":
        lib = Lib()
        theta = floats(theta_flat)
        def make(n):
            op = lib.op(n, 0.5, "normal", builtin=1, k=k, shape=[d])
            return lambda: lib.forward_vjp(op, theta, b, d)
    else:
        import torch
        import seed_algorithm as seed
        theta = torch.tensor(theta_flat, device=DEVICE).reshape(b, d)
        solve = seed.topk_indicator(k)
        def make(n):
            def run():
                y, saved = seed.perturbed_forward(solve, theta, n, 0.5, "normal", DEVICE)
                return seed.perturbed_backward(saved, y, n, 0.5)
            return run
    return measure(make, n, repeats)


def case_accuracy(impl, n, seeds):
    """RMSE of the VJP against the exact softmax VJP, over seeds, and the time per call."""
    sigma = 0.5
    g = [1.0, -0.5, 0.25, 0.0, 0.75, -1.0, 0.5, 0.0, 0.25, 0.5]
    exact = []
    for b in range(2):
        e = [math.exp(v / sigma) for v in THETA[b]]
        p = [v / sum(e) for v in e]
        gb = g[5 * b:5 * b + 5]
        dot = sum(pi * gi for pi, gi in zip(p, gb))
        exact += [pi * (gi - dot) / sigma for pi, gi in zip(p, gb)]
    theta_flat = [v for row in THETA for v in row]
    errors, times = [], []
    if impl == "ours":
        lib = Lib()
        theta = floats(theta_flat)
        grad = floats(g)
        lib.forward_vjp(lib.op(1000, sigma, "gumbel", builtin=0, shape=[5]), theta, 2, 5, grad)  # warm-up
        for s in range(seeds):
            op = lib.op(n, sigma, "gumbel", seed=s, builtin=0, shape=[5])
            t = time.perf_counter()
            _, v = lib.forward_vjp(op, theta, 2, 5, grad)
            times.append(time.perf_counter() - t)
            errors.append(sum((a - b) ** 2 for a, b in zip(v, exact)))
    else:
        import torch
        import seed_algorithm as seed
        theta = torch.tensor(THETA, device=DEVICE)
        gt = torch.tensor(g, device=DEVICE).reshape(2, 5)
        seed.perturbed_forward(seed.argmax, theta, 1000, sigma, "gumbel", DEVICE)  # warm-up
        for s in range(seeds):
            torch.manual_seed(s)
            t = time.perf_counter()
            y, saved = seed.perturbed_forward(seed.argmax, theta, n, sigma, "gumbel", DEVICE)
            v = seed.perturbed_backward(saved, gt, n, sigma).reshape(-1).tolist()
            times.append(time.perf_counter() - t)
            errors.append(sum((a - b) ** 2 for a, b in zip(v, exact)))
    return {"rmse": math.sqrt(sum(errors) / len(errors)), "time": min(times)}


def measure(make, n, repeats):
    """Warms up with a small N (libtorch's kernels, thread pools; a tenth of N at most, so
    that the warm-up's own peak does not hide the call's), makes one untimed call at N
    whose peak resident memory above the resident size before it is the peak extra memory,
    then times `repeats` calls at N (the best is kept: both sides at steady state)."""
    if DEVICE.startswith("cuda"):  # time finished GPU work, not queued kernels
        import torch
        unsynced = make
        make = lambda n: (lambda f: (lambda: (f(), torch.cuda.synchronize())))(unsynced(n))
    make(max(2, min(n // 10, 1000)))()
    run = make(n)
    before = rss_kib()
    run()
    peak = peak_kib() - before
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"time": min(times), "peak_mib": max(peak, 0) / 1024}


CASES = {
    "argmax_1e6": lambda impl, q: case_argmax(impl, 10**6 if not q else 10**5, 5),
    "argmax_1e7": lambda impl, q: case_argmax(impl, 10**7 if not q else 10**6, 1),
    "callback_t1": lambda impl, q: case_callback(impl, 10**5 if not q else 10**4, 25, threads=1),
    "callback_t2": lambda impl, q: case_callback(impl, 10**5 if not q else 10**4, 25, threads=2),
    "overhead": lambda impl, q: case_overhead(impl, 10**6 if not q else 10**5, 9),
    "topk_n100": lambda impl, q: case_topk(impl, 100, 5),
    "topk_n1000": lambda impl, q: case_topk(impl, 1000 if not q else 200, 1),
    "accuracy": lambda impl, q: case_accuracy(impl, 10**5, 10 if not q else 3),
}


def run_case(name, impl, quick):
    """Runs one case in a fresh process and returns its JSON result."""
    cmd = [sys.executable, __file__, "--one", name, impl] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(f"{name}/{impl} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine():
    """The CPU model and its widest vector instructions (the two CPU kinds this project is
    measured on differ there), the cores, torch and the device."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = [line for line in info.splitlines() if line.startswith("model name")]
        if model:
            cpu = model[0].split(":", 1)[1].strip()
        flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                          if line.startswith("flags")), []))
        cpu += ", AVX-512" if "avx512f" in flags else ", AVX2" if "avx2" in flags else ""
    except OSError:
        pass
    import torch
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if DEVICE.startswith("cuda") else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, device {DEVICE}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--only", choices=["training"], help="run only the training-regime table")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where both sides compute")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    os.environ["PERT_BENCH_DEVICE"] = a.device
    if a.one:
        name, impl = a.one
        sys.path.insert(0, HERE)
        if name.startswith("training:"):
            import training
            point = training.POINTS[int(name.split(":")[1])]
            result = training.ours(point, Lib, SOLVERS) if impl == "ours" else training.seed(point)
            print(json.dumps(result))
            return
        print(json.dumps(CASES[name](impl, a.quick)))
        return
    sys.path.insert(0, HERE)
    import training
    train = {}
    for i, point in enumerate(training.POINTS):
        for impl in ("seed", "ours"):
            train[(point, impl)] = run_case(f"training:{i}", impl, a.quick)
            print(f"  training {point} {impl:5s} {json.dumps(train[(point, impl)])}", file=sys.stderr, flush=True)
    train_lines = [
        "",
        "Training regime: many problems, few samples (forward + VJP, Normal noise sigma 0.1, median of "
        f"{training.CALLS} calls after {training.WARMUP} of warm-up; top-k with k = D/10; the C callbacks are a "
        "one-hot argmax, hand-vectorized (bench_argmax) and a plain loop (bench_argmax_plain), compared with the "
        "seed's argmax; the last column draws the perturbed inputs alone, pert_draw_new):",
        "",
    ] + training.table(train)
    if a.only == "training":
        text = "\n".join([f"Machine: {machine()}"] + train_lines)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
        return
    r = {}
    for name in CASES:
        for impl in ("seed", "ours"):
            if name == "callback_t2" and impl == "seed":
                continue  # the seed's algorithm has no solver threads
            r[(name, impl)] = run_case(name, impl, a.quick)
            print(f"  {name:12s} {impl:5s} {json.dumps(r[(name, impl)])}", file=sys.stderr, flush=True)
    lines = []
    w = lines.append
    w(f"Machine: {machine()}")
    w("")
    w("| case | seed's algorithm | perturbations | speed-up | seed peak extra MiB | ours peak extra MiB | memory ratio |")
    w("|---|---|---|---|---|---|---|")
    labels = {
        "argmax_1e6": "argmax, Gumbel, B=2 D=5 N=1e6, forward+VJP",
        "argmax_1e7": "argmax, Gumbel, B=2 D=5 N=1e7, forward+VJP",
        "callback_t1": "C shortest-path callback, 13 edges, N=1e5, 1 thread",
        "topk_n100": "top-10, Normal, B=64 D=1000 N=100, forward+VJP",
        "topk_n1000": "top-10, Normal, B=64 D=1000 N=1000, forward+VJP",
    }
    if a.quick:
        labels = {k: v + " (quick: smaller N)" for k, v in labels.items()}
    for name, label in labels.items():
        s, o = r[(name, "seed")], r[(name, "ours")]
        mib = lambda m: f"{m:.0f}" if m >= 1 else "< 1"
        ratio = s["peak_mib"] / max(o["peak_mib"], 1.0)
        ratio = f"{ratio:.0f}x" if o["peak_mib"] >= 1 else f"> {ratio:.0f}x"
        w(f"| {label} | {s['time']*1000:.0f} ms | {o['time']*1000:.0f} ms | {s['time']/o['time']:.1f}x | "
          f"{mib(s['peak_mib'])} | {mib(o['peak_mib'])} | {ratio} |")
    t1, t2 = r[("callback_t1", "ours")]["time"], r[("callback_t2", "ours")]["time"]
    w("")
    w(f"C callback, threads 2 vs 1: {t1*1000:.0f} ms -> {t2*1000:.0f} ms ({t1/t2:.2f}x).")
    s, o = r[("overhead", "seed")], r[("overhead", "ours")]
    w(f"Per-row cost beyond the solver (13-entry one-hot C solver, N={'1e6' if not a.quick else '1e5'}, "
      f"1 thread, forward+VJP, minus the solver alone): seed {s['ns_per_row']:.0f} ns, "
      f"ours {o['ns_per_row']:.0f} ns (solver alone {o['alone'] / (10**6 if not a.quick else 10**5) * 1e9:.0f} ns).")
    s, o = r[("accuracy", "seed")], r[("accuracy", "ours")]
    equal_time = o["rmse"] * math.sqrt(o["time"] / s["time"])  # error ~ 1/sqrt(N) ~ 1/sqrt(time)
    w(f"Accuracy per unit of time (argmax VJP vs the exact softmax VJP, N=1e5, RMSE over seeds): "
      f"seed {s['rmse']:.4f} in {s['time']*1000:.0f} ms; ours {o['rmse']:.4f} in {o['time']*1000:.0f} ms "
      f"(sample-mean baseline); at equal time ours would be {equal_time:.4f}, "
      f"{s['rmse']/equal_time:.1f}x smaller than the seed's.")
    adapter = {mode: json.loads(subprocess.run([ADAPTER, mode], capture_output=True, text=True, check=True).stdout)
               for mode in ("tape", "adapter")}
    tape_r, adapter_r = adapter["tape"], adapter["adapter"]
    w("")
    w(f"libtorch C++ adapter (pert::autograd::perturbed, forward + backward) against the tape it keeps "
      f"(forward_with_tape + vjp), built-in argmax d=2000 batch 64 N=100: {adapter_r['time']*1000:.0f} ms vs "
      f"{tape_r['time']*1000:.0f} ms ({adapter_r['time']/tape_r['time']:.2f}x), peak extra memory "
      f"{adapter_r['peak_mib']:.1f} MiB vs {tape_r['peak_mib']:.1f} MiB.")
    lines += train_lines
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
