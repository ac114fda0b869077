"""The installed package (issue 28): the library pip bundled is found with no variable set,
PERTURBATIONS_LIB still overrides it, and a torch of another version than the one the
library was built against is a clear ImportError naming both."""

import os
import shutil
import subprocess
import sys

import pytest

import perturbations as pt

PKG = os.path.dirname(pt.__file__)
BUNDLED = os.path.join(PKG, "libperturbations.so")
needs_bundle = pytest.mark.skipif(not os.path.isfile(os.path.join(PKG, "_build_info.py")),
                                  reason="the package runs from the source tree (not installed with pip)")


def run(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "PERTURBATIONS_LIB"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, cwd="/")


@needs_bundle
def test_the_bundled_library_is_found_without_a_variable_and_the_variable_overrides_it():
    out = run("import perturbations as pt; print(pt.library_path())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == BUNDLED
    out = run("import perturbations", PERTURBATIONS_LIB="/nonexistent/libperturbations.so")
    assert "cannot load /nonexistent/libperturbations.so" in out.stderr


@needs_bundle
def test_another_torch_than_the_one_built_against_is_named(tmp_path):
    from perturbations import _build_info
    copy = tmp_path / "perturbations"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "_build_info.py").write_text('TORCH_VERSION = "2.10.0"\n')
    out = run("import perturbations", PYTHONPATH=str(tmp_path))
    assert out.returncode != 0
    import importlib.metadata
    have = importlib.metadata.version("torch")
    assert "built against torch 2.10.0" in out.stderr and f"has torch {have}" in out.stderr, out.stderr
    assert _build_info.TORCH_VERSION.split(".")[:2] == have.split(".")[:2]
