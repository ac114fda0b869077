import shutil
import subprocess

import numpy as np
import pytest

SIGMA = 0.5
THETA = np.array([[-0.6, 1.9, -0.2, 1.1, -1.0], [-0.6, 1.0, -0.2, 1.8, -1.0]], dtype=np.float32)


def argmax_rows(x):
    y = np.zeros_like(x)
    y[np.arange(x.shape[0]), x.argmax(axis=1)] = 1.0
    return y


@pytest.fixture
def theta():
    return THETA.copy()


def compile_c(directory, source, name="lib.so"):
    """A shared library compiled from C `source` in `directory` (the test is skipped without
    a C compiler); its path."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = directory / (name + ".c")
    src.write_text(source)
    so = directory / name
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(so), "-lm"], check=True)
    return str(so)


def c_argmax(directory, d):
    """A library with `int32_t argmax<d>(void *, const float *x, size_t n, float *y)`: the
    one-hot argmax of each row of d; its path."""
    return compile_c(directory, (
        "#include <stddef.h>\n#include <stdint.h>\n"
        f"int32_t argmax{d}(void *u, const float *x, size_t n, float *y) {{\n"
        "  (void)u; for (size_t r = 0; r < n; r++) { size_t b = 0;\n"
        f"    for (size_t i = 1; i < {d}; i++) if (x[{d}*r+i] > x[{d}*r+b]) b = i;\n"
        f"    for (size_t i = 0; i < {d}; i++) y[{d}*r+i] = i == b ? 1.0f : 0.0f; }}\n  return 0; }}\n"),
        name=f"libargmax{d}.so")
