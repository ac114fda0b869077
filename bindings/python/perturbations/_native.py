"""Finding and loading libperturbations (ctypes), and the signatures of its functions.

The library is, in this order: `PERTURBATIONS_LIB` (a path) when set; the copy that
`pip install` bundled next to this file; the repository's build tree
(`target/release/libperturbations.so`) when the package runs from a checkout; the
installation prefix of this Python (`sys.prefix/lib`, where `make install
PREFIX=$VIRTUAL_ENV` puts it); and last the dynamic loader's own search
(`LD_LIBRARY_PATH`, the system's folders). Its major.minor must be this package's.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

LIBRARY_VERSION = (0, 1)
_NAME = "libperturbations.so"

P = ctypes.c_void_p
F = ctypes.POINTER(ctypes.c_float)
SOLVER = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, F, ctypes.c_size_t, F)


class SolveInfo(ctypes.Structure):
    """`pert_solve_info`: where the rows of one solver call sit in its forward call."""
    _fields_ = [("struct_size", ctypes.c_uint32), ("worker", ctypes.c_uint32), ("clean", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32), ("first_row", ctypes.c_uint64), ("num_samples", ctypes.c_uint64),
                ("batch", ctypes.c_size_t), ("device", ctypes.c_int32), ("pool_best", ctypes.c_void_p),
                ("pool", ctypes.c_void_p)]


# pert_pool_best_fn: the pool's best solution for an input row, during a solver call
POOL_BEST = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.POINTER(SolveInfo), ctypes.POINTER(ctypes.c_float),
                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_float))


SOLVER_EX = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(SolveInfo), F, ctypes.c_size_t, F)
WORKER_INIT = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint32)
WORKER_FINI = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _bundled():
    return os.path.join(_HERE, _NAME)


def _checkout_build():
    root = os.path.normpath(os.path.join(_HERE, "..", "..", ".."))
    if os.path.isfile(os.path.join(root, "Cargo.toml")):
        return os.path.join(root, "target", "release", _NAME)
    return None


def library_path():
    """The library this package loads: a path, or the bare file name that the dynamic
    loader looks up (see the module's documentation)."""
    from_env = os.environ.get("PERTURBATIONS_LIB")
    if from_env:
        return from_env
    for path in (_bundled(), _checkout_build(), os.path.join(sys.prefix, "lib", _NAME)):
        if path and os.path.isfile(path):
            return path
    return _NAME + ".0"


def _check_torch(path):
    """A bundled library was built against one torch: refuse another before loading it
    (its libtorch would not match the symbols the library needs), then load that torch's
    libtorch, wherever it is installed (its RUNPATH, $ORIGIN/../torch/lib, covers a torch
    in the same folder only), without importing torch."""
    if path != _bundled():
        return
    try:
        from . import _build_info
    except ImportError:
        return
    built = _build_info.TORCH_VERSION
    try:
        have = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"perturbations: this package was built against torch {built}, and no torch is "
                          f"installed in this environment: pip install torch=={built}") from None
    if have.split("+")[0].split(".")[:2] != built.split("+")[0].split(".")[:2]:
        raise ImportError(f"perturbations: this package was built against torch {built}, but this environment "
                          f"has torch {have}; install torch=={built.split('+')[0]}, or rebuild the package "
                          f"against this torch (pip install --force-reinstall --no-cache-dir perturbations, "
                          f"which needs a torch version the library supports)")
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        folder = os.path.join(os.path.dirname(spec.origin), "lib")
        for name in ("libc10.so", "libtorch_cpu.so"):
            if os.path.isfile(os.path.join(folder, name)):
                ctypes.CDLL(os.path.join(folder, name))


_SIG = {
    "pert_version": ([], ctypes.c_char_p),
    "pert_status_name": ([ctypes.c_uint32], ctypes.c_char_p),
    "pert_last_error": ([ctypes.c_char_p, ctypes.c_size_t], ctypes.c_size_t),
    "pert_cuda_device_count": ([], ctypes.c_int32),
    "pert_cuda_check_thread": ([ctypes.c_int32], ctypes.c_uint32),
    "pert_device_report": ([ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)], ctypes.c_uint32),
    "pert_config_new": ([ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_config_free": ([P], None),
    "pert_config_set_num_samples": ([P, ctypes.c_uint64], ctypes.c_uint32),
    "pert_config_set_sigma": ([P, ctypes.c_double], ctypes.c_uint32),
    "pert_config_set_noise": ([P, ctypes.c_uint32], ctypes.c_uint32),
    "pert_config_set_sum_of_gamma": ([P, ctypes.c_double, ctypes.c_uint32], ctypes.c_uint32),
    "pert_config_set_seed": ([P, ctypes.c_uint64], ctypes.c_uint32),
    "pert_config_set_device": ([P, ctypes.c_char_p], ctypes.c_uint32),
    "pert_config_set_threads": ([P, ctypes.c_uint32], ctypes.c_uint32),
    "pert_config_set_max_threads": ([P, ctypes.c_uint32], ctypes.c_uint32),
    "pert_config_set_perturbation": ([P, ctypes.c_uint32], ctypes.c_uint32),
    "pert_config_set_baseline": ([P, ctypes.c_uint32], ctypes.c_uint32),
    "pert_config_set_antithetic": ([P, ctypes.c_bool], ctypes.c_uint32),
    "pert_config_set_sense": ([P, ctypes.c_uint32], ctypes.c_uint32),
    "pert_config_set_chunk_bytes": ([P, ctypes.c_uint64], ctypes.c_uint32),
    "pert_config_set_max_tape_bytes": ([P, ctypes.c_uint64], ctypes.c_uint32),
    "pert_config_set_solve_ratio": ([P, ctypes.c_double], ctypes.c_uint32),
    "pert_config_set_linear_objective": ([P, ctypes.c_bool], ctypes.c_uint32),
    "pert_config_set_remote_timeout": ([P, ctypes.c_double], ctypes.c_uint32),
    "pert_pool_new": ([P, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_pool_add": ([P, P, ctypes.c_size_t], ctypes.c_uint32),
    "pert_pool_size": ([P], ctypes.c_size_t),
    "pert_pool_free": ([P], None),
    "pert_op_set_pool": ([P, P], ctypes.c_uint32),
    "pert_op_solver_calls": ([P, ctypes.POINTER(ctypes.c_uint64)], ctypes.c_uint32),
    "pert_nce": ([P, P, P, ctypes.c_size_t, P, P], ctypes.c_uint32),
    "pert_cmap": ([P, P, P, ctypes.c_size_t, P, P], ctypes.c_uint32),
    "pert_ltr_pointwise": ([P, P, P, ctypes.c_size_t, P, P], ctypes.c_uint32),
    "pert_ltr_pairwise": ([P, P, P, ctypes.c_size_t, P, P], ctypes.c_uint32),
    "pert_ltr_listwise": ([P, P, P, ctypes.c_size_t, P, P], ctypes.c_uint32),
    "pert_op_new": ([P, P, ctypes.c_size_t, P, ctypes.c_size_t, P, P, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_op_new_ex": ([P, P, ctypes.c_size_t, P, ctypes.c_size_t, P, P, P, P, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_op_new_builtin": ([P, ctypes.c_uint32, ctypes.c_int64, P, ctypes.c_size_t, ctypes.POINTER(P)],
                            ctypes.c_uint32),
    "pert_op_new_external": ([P, P, ctypes.c_size_t, P, ctypes.c_size_t, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_op_free": ([P], None),
    "pert_op_interrupt": ([P], None),
    "pert_op_input_numel": ([P], ctypes.c_size_t),
    "pert_op_output_numel": ([P], ctypes.c_size_t),
    "pert_forward": ([P, P, ctypes.c_size_t, P, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_op_solve": ([P, P, ctypes.c_size_t, P], ctypes.c_uint32),
    "pert_spo_plus": ([P, P, P, P, P, ctypes.c_size_t, P, P], ctypes.c_uint32),
    "pert_blackbox_vjp": ([P, P, P, P, ctypes.c_size_t, ctypes.c_double, P], ctypes.c_uint32),
    "pert_negative_identity_vjp": ([P, P, ctypes.c_size_t, P], ctypes.c_uint32),
    "pert_imle_forward": ([P, P, ctypes.c_size_t, P, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_imle_vjp": ([P, P, P, ctypes.c_double, ctypes.c_int32, P], ctypes.c_uint32),
    "pert_aimle_vjp": ([P, P, P, ctypes.c_int32, P, P], ctypes.c_uint32),
    "pert_imle_batch": ([P], ctypes.c_size_t),
    "pert_imle_free": ([P], None),
    "pert_perturbation_gradient": ([P, P, P, ctypes.c_size_t, ctypes.c_double, ctypes.c_int32, P, P],
                                   ctypes.c_uint32),
    "pert_fenchel_young": ([P, P, P, ctypes.c_size_t, P, P], ctypes.c_uint32),
    "pert_fenchel_young_with_bound": ([P, P, P, ctypes.c_size_t, P, P, P], ctypes.c_uint32),
    "pert_tape_vjp": ([P, P, P], ctypes.c_uint32),
    "pert_tape_jvp": ([P, P, P], ctypes.c_uint32),
    "pert_tape_jacobian": ([P, P], ctypes.c_uint32),
    "pert_tape_objective": ([P, P], ctypes.c_uint32),
    "pert_tape_batch": ([P], ctypes.c_size_t),
    "pert_tape_free": ([P], None),
    "pert_draw_new": ([P, P, ctypes.c_size_t, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_draw_count": ([P], ctypes.c_size_t),
    "pert_draw_inputs": ([P], F),
    "pert_draw_finish": ([P, P, P, ctypes.POINTER(P)], ctypes.c_uint32),
    "pert_draw_free": ([P], None),
    "pert_draw_fenchel_young": ([P, P, P, P, P], ctypes.c_uint32),
    "pert_draw_fenchel_young_with_bound": ([P, P, P, P, P, P], ctypes.c_uint32),
    "pert_solver_set_error": ([ctypes.c_char_p], None),
}


def load():
    path = library_path()
    _check_torch(path)
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        if path == _NAME + ".0":
            raise ImportError(
                "perturbations: cannot find libperturbations.so: install the package with pip (which builds "
                "it), or set PERTURBATIONS_LIB to its path (made by `make build` in the repository, or "
                f"installed by `make install`): {e}") from e
        raise ImportError(f"perturbations: cannot load {path}: {e}") from e
    v = lib.pert_version
    v.restype = ctypes.c_char_p
    version = v().decode()
    if tuple(int(x) for x in version.split(".")[:2]) != LIBRARY_VERSION:
        raise ImportError(f"perturbations: {path} is version {version}; this package needs "
                          f"{LIBRARY_VERSION[0]}.{LIBRARY_VERSION[1]}.x")
    for name, (args, res) in _SIG.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise ImportError(f"perturbations: {path} (version {version}) lacks {name}: it is older than "
                              f"this package; rebuild it") from None
        fn.argtypes = args
        fn.restype = res
    return lib, path


lib, path = load()
