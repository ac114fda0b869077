"""Ctrl-C during a long call (issue 28): KeyboardInterrupt within about 0.1 s, for
built-ins, per-worker solvers and Python solvers (a C solver runs on the calling thread,
as the C API says: its call ends first); the op keeps working after it, also after a
failed call. Each case runs in its own process, which sends itself SIGINT while the call
runs; the calls would take minutes, and the bound (2 s from the signal) leaves room for a
loaded machine. Also: errors of calls run on the helper thread keep their message, a
signal handler's own exception waits for the call, and a solver cannot close its op."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, os, signal, sys, threading, time
    import numpy as np
    import perturbations as pt

    kind = sys.argv[1]
    d = 64
    cfg = pt.Config(num_samples=2 ** 31 if kind == "builtin" else 2 ** 28, device="cpu", sigma=0.5)
    def argmax(x):
        y = np.zeros_like(x); y[np.arange(len(x)), x.argmax(1)] = 1; return y
    if kind == "builtin":
        op = pt.Op.builtin(cfg, "argmax", d)
    elif kind == "c":
        op = pt.Op(cfg, d, d, ctypes.CDLL(sys.argv[2]).argmax64)
    elif kind == "workers":
        op = pt.Op.with_workers(cfg.set("threads", 2), d, d, lambda w: argmax)
    else:
        op = pt.Op(cfg, d, d, argmax)
    theta = np.linspace(-1, 1, 2 * d, dtype=np.float32).reshape(2, d)
    try:  # a failed (fast) call first: the next long call must still be interruptible
        op.forward(np.full((2, d), np.nan, np.float32))
    except pt.NonFiniteInputError:
        pass
    sent = []
    def ctrl_c():
        time.sleep(0.5)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        op.forward(theta)
        print("FINISHED")
    except KeyboardInterrupt:
        print("LATENCY", time.perf_counter() - sent[0])
    small = pt.Op.builtin(pt.Config(num_samples=10, device="cpu"), "argmax", d)
    print("AFTER", small.forward(theta).shape)
""")


@pytest.fixture(scope="module")
def c_solver(tmp_path_factory):
    from conftest import c_argmax
    return c_argmax(tmp_path_factory.mktemp("c"), 64)


@pytest.mark.parametrize("kind", ["builtin", "workers", "python"])
def test_ctrl_c_interrupts_a_long_call(kind, c_solver):
    out = subprocess.run([sys.executable, "-c", SCRIPT, kind, c_solver], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.split("\n") if line)
    assert "LATENCY" in lines, out.stdout + out.stderr
    assert float(lines["LATENCY"]) < 2.0, lines
    assert lines["AFTER"] == "(2, 64)"
    print(kind, "latency", lines["LATENCY"])


def test_op_interrupt_from_another_thread_raises_interrupted_call_error():
    import threading
    import time

    import numpy as np

    import perturbations as pt
    op = pt.Op.builtin(pt.Config(num_samples=2 ** 31, device="cpu"), "argmax", 64)
    done = threading.Event()

    def stop():
        while not done.wait(0.02):
            op.interrupt()

    threading.Thread(target=stop, daemon=True).start()
    start = time.perf_counter()
    with pytest.raises(pt.InterruptedCallError) as e:
        op.forward(np.zeros((2, 64), np.float32))
    done.set()
    assert isinstance(e.value, RuntimeError) and time.perf_counter() - start < 60


def test_a_c_solver_runs_on_the_calling_thread(c_solver, tmp_path):
    import ctypes
    import threading

    import numpy as np

    import perturbations as pt
    from conftest import compile_c
    so = compile_c(tmp_path, (
        "#define _GNU_SOURCE\n#include <stddef.h>\n#include <stdint.h>\n#include <unistd.h>\n"
        "#include <sys/syscall.h>\nlong last_tid;\n"
        "int32_t zero(void *u, const float *x, size_t n, float *y) {\n"
        "  (void)u; (void)x; last_tid = (long)syscall(SYS_gettid);\n"
        "  for (size_t i = 0; i < n; i++) y[i] = 0.0f;\n  return 0; }\n"), name="libtid.so")
    lib = ctypes.CDLL(so)
    op = pt.Op(pt.Config(num_samples=2 ** 20, device="cpu"), 1, 1, lib.zero)  # a first call, and long
    op.forward(np.zeros((1, 1), np.float32))
    assert ctypes.c_long.in_dll(lib, "last_tid").value == threading.get_native_id()


def test_errors_of_helper_thread_calls_keep_their_message():
    import numpy as np

    import perturbations as pt
    op = pt.Op.builtin(pt.Config(num_samples=2 ** 31, device="cpu"), "argmax", 64)
    theta = np.zeros((2, 64), np.float32)
    theta[1, 3] = np.inf
    with pytest.raises(pt.NonFiniteInputError, match=r"theta\[1\]\[3\] is inf"):
        op.forward(theta)


def test_a_signal_handlers_exception_waits_for_the_call():
    script = textwrap.dedent("""
        import signal, threading, time, numpy as np, perturbations as pt
        def on_alarm(*_): raise TimeoutError("step took too long")
        signal.signal(signal.SIGALRM, on_alarm)
        op = pt.Op.builtin(pt.Config(num_samples=3_000_000, sigma=0.5, device="cpu"), "argmax", 50)
        theta = np.random.randn(4, 50).astype(np.float32)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        try:
            op.forward(theta)  # about a second of work: the alarm comes first
            print("FINISHED")
        except TimeoutError:
            free = op._lock.acquire(timeout=0)  # the turn was given back: the call ended
            print("TIMEOUT", free)
            if free:
                op._lock.release()
        print("AFTER", op.forward(theta[:1]).shape)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TIMEOUT True" in out.stdout, out.stdout
    assert "AFTER (1, 50)" in out.stdout


def test_a_solver_cannot_close_its_own_op():
    import numpy as np

    import perturbations as pt
    box = {}

    def closes(x):
        box["op"].close()

    box["op"] = op = pt.Op(pt.Config(num_samples=4, device="cpu"), 3, 3, closes)
    with pytest.raises(RuntimeError, match="cannot close its own op"):
        op.forward(np.zeros((1, 3), np.float32))
    op.close()


def test_a_per_worker_solver_cannot_call_or_close_its_own_op():
    import numpy as np

    import perturbations as pt
    box = {}

    def make(worker):
        def solve(x):
            box["op"].close()
        return solve

    box["op"] = op = pt.Op.with_workers(pt.Config(num_samples=4, device="cpu", threads=2), 3, 3, make)
    with pytest.raises(RuntimeError, match="cannot close its own op"):
        op.forward(np.zeros((1, 3), np.float32))
    op.close()


def test_concurrent_long_calls_keep_their_own_solver_exceptions():
    import threading

    import numpy as np

    import perturbations as pt

    def make(worker):
        def solve(x):
            if x[0, 0] > 500:
                raise ValueError("the solver of the large problems")
            return (x == x.max(-1, keepdims=True)).astype(np.float32)
        return solve

    op = pt.Op.with_workers(pt.Config(num_samples=2, sigma=0.01, device="cpu", threads=1), 3, 3, make)
    wrong = []

    def caller(theta, expect_error):
        for _ in range(150):
            try:
                op.forward(theta)
                if expect_error:
                    wrong.append("no error")
            except ValueError:
                if not expect_error:
                    wrong.append("another call's error")
            except pt.Error as e:
                wrong.append(repr(e))

    threads = [threading.Thread(target=caller, args=(np.full((1, 3), 1000.0, np.float32), True)),
               threading.Thread(target=caller, args=(np.zeros((1, 3), np.float32), False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:5]


def test_a_helper_that_cannot_start_gives_the_turn_back(monkeypatch):
    import numpy as np

    import perturbations as pt
    from perturbations import op as op_module
    op = pt.Op.builtin(pt.Config(num_samples=2 ** 31, device="cpu"), "argmax", 64)

    def no_start(*_):
        raise KeyboardInterrupt  # as a signal would, before the thread exists

    monkeypatch.setattr(op_module._thread, "start_new_thread", no_start)
    with pytest.raises(KeyboardInterrupt):
        op.forward(np.zeros((1, 64), np.float32))
    monkeypatch.undo()
    assert op._lock.acquire(timeout=5)  # the turn was given back
    op._lock.release()
    op.close()


def _late_start(delay, ran):
    """A start_new_thread whose thread begins `delay` seconds late, after which Ctrl-C
    reaches the calling thread (as a signal would, right after the thread was asked for)."""
    import threading
    import time

    def start(fn, args):
        def late():
            time.sleep(delay)
            ran.append(True)
            fn(*args)
        threading.Thread(target=late, daemon=True).start()
        raise KeyboardInterrupt
    return start


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_ctrl_c_as_the_helper_starts_gives_the_turn_back_once(monkeypatch, delay):
    import time

    import numpy as np

    import perturbations as pt
    from perturbations import op as op_module
    op = pt.Op.builtin(pt.Config(num_samples=4, device="cpu"), "argmax", 8)
    monkeypatch.setattr(op, "_long", lambda work: True)  # every call on a helper thread
    ran = []
    monkeypatch.setattr(op_module._thread, "start_new_thread", _late_start(delay, ran))
    with pytest.raises(KeyboardInterrupt):
        op.forward(np.zeros((1, 8), np.float32))
    # the turn comes back (from the caller if the helper had not begun, else from the helper
    # once its call has ended), and it is taken here
    assert op._lock.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while not ran and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # a helper that begins late must neither run nor give back a turn it never had
    assert op._lock.locked(), "the turn was given back twice"
    op._lock.release()
    monkeypatch.undo()
    y = op.forward(np.zeros((1, 8), np.float32))
    assert y.shape == (1, 8) and abs(float(y.sum()) - 1.0) < 1e-5
    op.close()
