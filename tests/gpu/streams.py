"""The GPU check of issue 33's streams, graph capture, contexts and device hiding, run by
scripts/gpu-check.sh on a machine with a CUDA device (python3 with torch; the package
from bindings/python, the library from PERTURBATIONS_LIB). Each check prints one line;
the exit status is the number of checks that failed (0: all passed).

  stream     a call on a side stream gives the default stream's bits, and waits for no
             other stream (another stream's long kernel is still running when it returns)
  capture    a call during CUDA graph capture fails cleanly (DEVICE_UNAVAILABLE naming the
             capture, nothing enqueued), the capture still ends, and CUDA works after it
  threads    threads on their own streams racing on their own ops give the sequential bits;
             a fresh thread that has done no CUDA work gets the same bits; a long call
             (run by the Python package on a helper thread) runs on the caller's stream
             and is refused under capture as a short one
  context    in a child process, with a non-primary CUDA context current (as PyCUDA makes):
             a call is refused (DEVICE_UNAVAILABLE naming the context), a CUDA theta before
             its copy to the host too, and a long call (the package checks the calling
             thread before it hands the call to its helper thread)
  hidden     with CUDA_VISIBLE_DEVICES="", a "cuda" op fails naming the variable, and the
             device report says why no device is seen
"""

import os
import subprocess
import sys
import threading
import time

import torch

import perturbations as pt
import perturbations.torch as ptt

B, D, N = 64, 100, 1000  # 6.4 M noise values a call: the fused kernel's size
FAILED = []


def check(name, ok, detail):
    print(f"{'ok' if ok else 'FAILED'}: {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def make_op(seed=7):
    """An op whose calls the Python package makes on the calling thread (a short call)."""
    cfg = pt.Config(num_samples=N, sigma=0.5, noise="normal", seed=seed, device="cuda")
    op = pt.Op.builtin(cfg, "argmax", D)
    op._seconds_per_row = 1e-15  # (the package's estimate of a call's time, kept short)
    return op


SLEEP_CYCLES = 4_000_000_000  # torch.cuda._sleep: a few seconds of one GPU thread spinning


def sleep_seconds():
    """How long torch.cuda._sleep(SLEEP_CYCLES) takes on this GPU."""
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
    s.synchronize()
    return time.perf_counter() - t0


def waits_for_own_stream(name, make, sleep):
    """A call with host theta on a side stream that sleeps first must wait for the sleep:
    the call's copy of theta to the device is ordered after it on that stream (on any
    other stream it would not be: torch's side streams do not synchronize with others)."""
    theta = theta_on("cpu")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ptt.perturbed(make(), theta)  # warm-up
    side.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        ptt.perturbed(make(), theta)
    took = time.perf_counter() - t0
    check("stream", took >= 0.8 * sleep,
          f"{name} runs on the caller's stream: it waited for that stream's work ({took:.2f} s, "
          f"the work {sleep:.2f} s)")


def theta_on(device):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, D, generator=g).to(device)


def stream_check():
    reference = ptt.perturbed(make_op(), theta_on("cuda")).cpu()
    op = make_op()
    theta = theta_on("cuda")
    side, busy = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(side):
        ptt.perturbed(make_op(), theta)  # warm-up: the allocator's blocks for this stream
    torch.cuda.synchronize()
    with torch.cuda.stream(busy):
        torch.cuda._sleep(SLEEP_CYCLES)
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        y = ptt.perturbed(op, theta)
        side.synchronize()
    took = time.perf_counter() - t0
    still_busy = not busy.query()
    busy.synchronize()
    check("stream", torch.equal(y.cpu(), reference),
          f"side stream equals the default stream's bits: {torch.equal(y.cpu(), reference)}")
    check("stream", still_busy,
          f"the call ({took:.3f} s) returned while another stream's kernel still ran: {still_busy}")
    sleep = sleep_seconds()
    waits_for_own_stream("a call", make_op, sleep)
    waits_for_own_stream("a long call (the package's helper thread)", long_op, sleep)


def long_op(seed=7):
    """An op whose calls the Python package runs on a helper thread (a long call)."""
    op = make_op(seed)
    op._seconds_per_row = 1.0
    return op


def capture_check():
    op = make_op()
    theta = theta_on("cpu")  # host input: the library copies it to the device
    reference = ptt.perturbed(make_op(), theta)
    theta_cuda = theta.to("cuda")
    leaf = theta.clone().requires_grad_(True)
    y = ptt.perturbed(make_op(), leaf)  # a tape, for a VJP under capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    raised = {}
    try:
        with torch.cuda.graph(graph):
            for name, call in (("forward", lambda: ptt.perturbed(op, theta)),
                               ("long forward", lambda: ptt.perturbed(long_op(), theta)),
                               ("forward of a CUDA theta", lambda: ptt.perturbed(op, theta_cuda)),
                               ("VJP", lambda: y.backward(torch.ones_like(y)))):
                try:
                    call()
                    raised[name] = None
                except pt.Error as e:
                    raised[name] = e
            # (a CUDA op's output, so that the graph is not empty)
            _ = torch.zeros(4, device="cuda") + 1
    except Exception as e:  # the capture must still end
        check("capture", False, f"the capture did not end cleanly: {type(e).__name__}: {e}")
        return
    for name, e in raised.items():
        check("capture", isinstance(e, pt.DeviceUnavailableError) and "CUDA graph" in str(e),
              f"{name} refused with {type(e).__name__}: {e}")
    graph.replay()
    torch.cuda.synchronize()
    after = ptt.perturbed(make_op(), theta)
    check("capture", torch.equal(after, reference), "CUDA works after the capture, with the same bits")


def threads_check():
    thetas = [theta_on("cuda") * (1 + k) for k in range(4)]
    want = [ptt.perturbed(make_op(seed=k), thetas[k]).cpu() for k in range(4)]
    got, errors = [None] * 4, []

    def run(k):
        try:
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                op = make_op(seed=k)
                for _ in range(3):
                    y = ptt.perturbed(op, thetas[k])
                    op = make_op(seed=k)
                got[k] = y.cpu()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = not errors and all(torch.equal(got[k], want[k]) for k in range(4))
    check("threads", same, f"4 threads on 4 streams equal the sequential bits: {same} {errors}")

    # a thread that has done no CUDA work (no context current there), host input
    theta = theta_on("cpu")
    reference = ptt.perturbed(make_op(), theta)
    fresh = {}

    def fresh_call():
        try:
            fresh["y"] = ptt.perturbed(make_op(), theta)
        except Exception as e:  # noqa: BLE001 (reported below)
            fresh["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=fresh_call)
    t.start()
    t.join()
    ok = "y" in fresh and torch.equal(fresh["y"], reference)
    check("threads", ok, f"a fresh thread's call gives the same bits: {ok} {fresh.get('error', '')}")

    # a long call (on the package's helper thread) on a side stream, while another stream
    # is busy: the same bits, and no wait for the busy stream
    side, busy = torch.cuda.Stream(), torch.cuda.Stream()
    theta_cuda = theta_on("cuda")
    want = ptt.perturbed(make_op(), theta_cuda).cpu()
    with torch.cuda.stream(side):
        ptt.perturbed(long_op(), theta_cuda)  # warm-up
    torch.cuda.synchronize()
    with torch.cuda.stream(busy):
        torch.cuda._sleep(SLEEP_CYCLES)
    with torch.cuda.stream(side):
        y = ptt.perturbed(long_op(), theta_cuda)
        side.synchronize()
    still_busy = not busy.query()
    busy.synchronize()
    check("threads", torch.equal(y.cpu(), want) and still_busy,
          f"a long call on a side stream: the same bits {torch.equal(y.cpu(), want)}, "
          f"no wait for another stream {still_busy}")


CONTEXT_CHILD = """
import ctypes, torch
import perturbations as pt, perturbations.torch as ptt
cuda = ctypes.CDLL("libcuda.so.1")
theta = torch.randn(8, 100)


def op(seconds_per_row):
    o = pt.Op.builtin(pt.Config(num_samples=1000, sigma=0.5, device="cuda"), "argmax", 100)
    o._seconds_per_row = seconds_per_row  # short: this thread; long: the package's helper
    return o


reference = ptt.perturbed(op(1e-15), theta)  # (CUDA started, in the primary context)
theta_cuda = theta.to("cuda")  # (made before the other context is current)
torch.cuda.synchronize()
ctx, dev = ctypes.c_void_p(), ctypes.c_int()
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
create = getattr(cuda, "cuCtxCreate_v4", None)
code = (create(ctypes.byref(ctx), None, 0, dev) if create is not None
        else cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev))
assert code == 0, f"cuCtxCreate returned {code}"
for name, call in (("SHORT", lambda: ptt.perturbed(op(1e-15), theta)),
                   ("CUDA", lambda: ptt.perturbed(op(1e-15), theta_cuda))):
    try:
        call()
        print(name, "values")
    except Exception as e:
        print(name, type(e).__name__, e)
try:
    print("LONG", torch.equal(ptt.perturbed(op(1.0), theta), reference))
except Exception as e:
    print("LONG", type(e).__name__, e)
popped = ctypes.c_void_p()
cuda.cuCtxPopCurrent_v2(ctypes.byref(popped))  # (not destroyed: torch may hold its memory)
print("AFTER", torch.equal(ptt.perturbed(op(1e-15), theta), reference))
"""


def context_check():
    out = subprocess.run([sys.executable, "-c", CONTEXT_CHILD], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    lines = {line.split(" ", 1)[0]: line for line in text.splitlines() if line.split(" ", 1)[0] in
             ("SHORT", "CUDA", "LONG", "AFTER")}
    for name, what in (("SHORT", "a call (host theta)"), ("CUDA", "a call of a CUDA theta (before its copy)")):
        line = lines.get(name, "")
        check("context", "DeviceUnavailableError" in line and "context" in line,
              f"with a non-primary context current, {what} is refused: {line or text[-600:]}")
    line = lines.get("LONG", "")
    check("context", "DeviceUnavailableError" in line and "context" in line,
          f"a long call (made by the package's helper thread) is refused as well: {line or text[-600:]}")
    check("context", lines.get("AFTER") == "AFTER True", "calls work again once that context is popped")


def hidden_check():
    code = (
        "import perturbations as pt\n"
        "print(pt.device_report())\n"
        "try:\n"
        "    pt.Op.builtin(pt.Config(device='cuda'), 'argmax', 5)\n"
        "    print('MADE')\n"
        "except pt.Error as e:\n"
        "    print('ERROR', type(e).__name__, e)\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    error = [line for line in text.splitlines() if line.startswith("ERROR")]
    check("hidden", out.returncode == 0 and bool(error) and "CUDA_VISIBLE_DEVICES" in error[0],
          f"a cuda op fails naming the variable: {error[0] if error else text[-400:]}")
    seen = [line for line in text.splitlines() if line.startswith("CUDA devices seen by libtorch")]
    check("hidden", bool(seen) and "CUDA_VISIBLE_DEVICES" in seen[0],
          f"the report says why: {seen[0] if seen else text[-400:]}")


def main():
    if not torch.cuda.is_available():
        print("FAILED: torch sees no CUDA device")
        return 1
    report = pt.device_report()
    print(report, flush=True)
    check("report", "CUDA noise kernel runs on: libtorch's current stream" in report,
          "the kernel runs on libtorch's current stream")
    for f in (stream_check, capture_check, threads_check, hidden_check, context_check):
        try:
            f()
        except Exception as e:  # noqa: BLE001 (a check that raises fails)
            check(f.__name__, False, f"raised {type(e).__name__}: {e}")
    print(f"== streams: {len(FAILED)} failed: {FAILED}" if FAILED else "== streams: all passed")
    return min(len(FAILED), 100)


if __name__ == "__main__":
    sys.exit(main())
