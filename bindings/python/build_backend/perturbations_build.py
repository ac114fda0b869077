"""The build backend of the perturbations Python package (PEP 517, in-tree).

`pip install ./bindings/python` and `pip wheel ./bindings/python` compile the library with
cargo against the torch installed in the environment pip installs into, and bundle
`libperturbations.so` in the wheel with a RUNPATH of `$ORIGIN/../torch/lib` (the libtorch of
the torch beside it). Nothing is written into the source tree: cargo builds in a cache
folder (`$PERTURBATIONS_CARGO_TARGET_DIR`, else `$XDG_CACHE_HOME/perturbations/pip-build`,
one folder per torch), and the wheel is assembled in memory.

Needs: cargo (rustup.rs) on PATH or in ~/.cargo/bin, and torch 2.11 in the target
environment (the version tch 0.24 binds). The crate is the checkout's (this folder's
../..), or the sdist's copy in rust/, or `$PERTURBATIONS_CRATE_DIR`.
"""

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)  # bindings/python, or the unpacked sdist
TORCH_SERIES = (2, 11)  # the libtorch tch 0.24.0 binds
CRATE_FILES = ("Cargo.toml", "Cargo.lock", "build.rs", "cbindgen.toml")
CRATE_DIRS = ("src", "include")


def _project():
    text = open(os.path.join(PROJECT, "pyproject.toml"), encoding="utf-8").read()

    def field(name):
        m = re.search(rf'^{name}\s*=\s*"([^"]*)"', text, re.M)
        return m.group(1)

    return field("name"), field("version"), field("description"), field("requires-python")


def _crate_dir():
    for d in (os.environ.get("PERTURBATIONS_CRATE_DIR"), os.path.join(PROJECT, "rust"),
              os.path.normpath(os.path.join(PROJECT, "..", ".."))):
        if d and os.path.isfile(os.path.join(d, "Cargo.toml")):
            with open(os.path.join(d, "Cargo.toml"), encoding="utf-8") as f:
                if re.search(r'^name\s*=\s*"perturbations"', f.read(), re.M):
                    return d
    raise RuntimeError("perturbations: the Rust crate was not found (build from the repository's "
                       "bindings/python, from the sdist, or set PERTURBATIONS_CRATE_DIR)")


def _clean_env():
    """The environment without pip's build isolation: the interpreter pip runs this
    backend with is the target environment's; isolation only hides its site-packages."""
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "LIBTORCH", "LIBTORCH_LIB", "LIBTORCH_INCLUDE",
              "LIBTORCH_CXX11_ABI", "LIBTORCH_STATIC"):
        env.pop(k, None)
    return env


def _target_torch():
    """(version, folder) of the torch in the environment being installed into."""
    probe = "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))"
    out = subprocess.run([sys.executable, "-c", probe], env=_clean_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"perturbations: building the library needs torch "
                           f"{TORCH_SERIES[0]}.{TORCH_SERIES[1]} installed in the environment "
                           f"({sys.executable}): pip install torch=={TORCH_SERIES[0]}.{TORCH_SERIES[1]}.0 "
                           f"first. (pip install / pip wheel find the environment they install into; "
                           f"`python -m build` and uv build in a separate one: use "
                           f"`python -m build --no-isolation` there.)\n{out.stderr.strip()}")
    version, folder = out.stdout.split("\n")[:2]
    have = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if have != TORCH_SERIES:
        raise RuntimeError(f"perturbations: the library binds torch {TORCH_SERIES[0]}.{TORCH_SERIES[1]} "
                           f"(tch 0.24), but this environment has torch {version}: install "
                           f"torch=={TORCH_SERIES[0]}.{TORCH_SERIES[1]}.0")
    return version, folder


def _cargo():
    found = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    if not os.path.isfile(found):
        raise RuntimeError("perturbations: building the library needs Rust's cargo (https://rustup.rs), "
                           "on PATH or in ~/.cargo/bin")
    return found


def _build_library(crate, torch_version, torch_dir):
    """Compiles the library; returns the path of libperturbations.so."""
    # one folder per torch (cargo rebuilds what changed in any checkout or sdist there)
    key = hashlib.sha256(f"{torch_dir}\n{torch_version}".encode()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    target = os.environ.get("PERTURBATIONS_CARGO_TARGET_DIR") or os.path.join(cache, "perturbations",
                                                                               "pip-build", key)
    env = _clean_env()
    with tempfile.TemporaryDirectory() as shims:
        # tch's build script asks `python` / `python3` for torch: this environment's (a
        # script, not a link: a venv's interpreter finds its environment from its own path)
        for name in ("python", "python3"):
            shim = os.path.join(shims, name)
            with open(shim, "w", encoding="utf-8") as f:
                f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
            os.chmod(shim, 0o755)
        env.pop("VIRTUAL_ENV", None)
        env.update(PATH=shims + os.pathsep + env.get("PATH", ""), LIBTORCH_USE_PYTORCH="1",
                   CARGO_TARGET_DIR=target, PERTURBATIONS_RPATH="$ORIGIN/../torch/lib")
        cmd = [_cargo(), "build", "--release", "--lib", "--locked", "--manifest-path",
               os.path.join(crate, "Cargo.toml")]
        print(f"perturbations: {' '.join(cmd)} (CARGO_TARGET_DIR={target})", file=sys.stderr, flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)
    return os.path.join(target, "release", "libperturbations.so")


def _package_files():
    pkg = os.path.join(PROJECT, "perturbations")
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py") and name != "_build_info.py":
            yield f"perturbations/{name}", os.path.join(pkg, name)


def _metadata():
    name, version, summary, requires_python = _project()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", f"Summary: {summary}",
             "License: Apache-2.0", f"Requires-Python: {requires_python}", "Requires-Dist: numpy",
             f"Requires-Dist: torch=={TORCH_SERIES[0]}.{TORCH_SERIES[1]}.*"]
    lines += ["Provides-Extra: test", "Requires-Dist: pytest; extra == \"test\"",
              "Description-Content-Type: text/markdown", ""]
    readme = os.path.join(PROJECT, "README.md")
    body = open(readme, encoding="utf-8").read() if os.path.isfile(readme) else ""
    return "\n".join(lines) + "\n" + body


def _record_line(arc, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arc},sha256={digest},{len(data)}"


def _tag():
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"py3-none-{plat}"


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    """The metadata alone (no compilation): it names the torch the wheel will need."""
    name, version, _, _ = _project()
    _target_torch()  # the same clear error as build_wheel's, before any work
    dist_info = os.path.join(metadata_directory, f"{name}-{version}.dist-info")
    os.makedirs(dist_info, exist_ok=True)
    with open(os.path.join(dist_info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(_metadata())
    with open(os.path.join(dist_info, "WHEEL"), "w", encoding="utf-8") as f:
        f.write(f"Wheel-Version: 1.0\nGenerator: perturbations_build\nRoot-Is-Purelib: false\nTag: {_tag()}\n")
    return os.path.basename(dist_info)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name, version, _, _ = _project()
    torch_version, torch_dir = _target_torch()
    so = _build_library(_crate_dir(), torch_version, torch_dir)
    tag = _tag()
    dist_info = f"{name}-{version}.dist-info"
    files = [(arc, open(path, "rb").read()) for arc, path in _package_files()]
    files.append(("perturbations/_build_info.py",
                  f'"""Written by the build: the torch the bundled library was built against."""\n'
                  f'TORCH_VERSION = "{torch_version}"\n'.encode()))
    files.append(("perturbations/libperturbations.so", open(so, "rb").read()))
    files.append((f"{dist_info}/METADATA", _metadata().encode()))
    files.append((f"{dist_info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: perturbations_build\n"
                                        f"Root-Is-Purelib: false\nTag: {tag}\n".encode()))
    files.append((f"{dist_info}/top_level.txt", b"perturbations\n"))
    record = [_record_line(arc, data) for arc, data in files] + [f"{dist_info}/RECORD,,"]
    wheel_name = f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel_name), "w", zipfile.ZIP_DEFLATED) as z:
        for arc, data in files:
            info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if arc.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel_name


def build_sdist(sdist_directory, config_settings=None):
    """The Python package, this backend and the Rust crate (in rust/)."""
    name, version, _, _ = _project()
    base = f"{name}-{version}"
    crate = _crate_dir()
    entries = [("pyproject.toml", os.path.join(PROJECT, "pyproject.toml")),
               ("README.md", os.path.join(PROJECT, "README.md")),
               ("build_backend/perturbations_build.py", os.path.abspath(__file__))]
    entries += list(_package_files())
    for f in CRATE_FILES:
        if os.path.isfile(os.path.join(crate, f)):
            entries.append((f"rust/{f}", os.path.join(crate, f)))
    for d in CRATE_DIRS:
        for root, dirs, names in os.walk(os.path.join(crate, d)):
            dirs.sort()
            for n in sorted(names):
                full = os.path.join(root, n)
                entries.append(("rust/" + os.path.relpath(full, crate), full))
    sdist = f"{base}.tar.gz"
    with tarfile.open(os.path.join(sdist_directory, sdist), "w:gz", format=tarfile.PAX_FORMAT) as tar:
        pkg_info = _metadata().encode()
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        info.size, info.mtime = len(pkg_info), 1577836800
        tar.addfile(info, io.BytesIO(pkg_info))
        for arc, path in entries:
            data = open(path, "rb").read()
            info = tarfile.TarInfo(f"{base}/{arc}")
            info.size, info.mtime, info.mode = len(data), 1577836800, 0o644
            tar.addfile(info, io.BytesIO(data))
    return sdist
