"""Ctrl-C during a long call (issue 28): KeyboardInterrupt within about 0.1 s, for
built-ins, C function pointer solvers, per-worker solvers and Python solvers; the op keeps
working after it. Each case runs in its own process, which sends itself SIGINT while the
call runs; the calls would take minutes, and the bound (2 s from the signal) leaves room
for a loaded machine."""

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
    import shutil
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("c")
    (d / "a.c").write_text(
        "#include <stddef.h>\n#include <stdint.h>\n"
        "int32_t argmax64(void *u, const float *x, size_t n, float *y) {\n"
        "  (void)u; for (size_t r = 0; r < n; r++) { size_t b = 0;\n"
        "    for (size_t i = 1; i < 64; i++) if (x[64*r+i] > x[64*r+b]) b = i;\n"
        "    for (size_t i = 0; i < 64; i++) y[64*r+i] = i == b ? 1.0f : 0.0f; }\n  return 0; }\n")
    so = d / "liba.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(d / "a.c"), "-o", str(so)], check=True)
    return str(so)


@pytest.mark.parametrize("kind", ["builtin", "c", "workers", "python"])
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
