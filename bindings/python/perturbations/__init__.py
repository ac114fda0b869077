"""Differentiable perturbed optimizers (Berthet et al., NeurIPS 2020) over the C API of
libperturbations, in pure Python (ctypes).

    import perturbations as pt
    cfg = pt.Config(num_samples=10000, sigma=0.5, noise="gumbel", seed=3, device="cpu")
    op = pt.Op(cfg, (5,), (5,), solver)          # solver(x: [count, 5]) -> [count, 5]
    op = pt.Op.builtin(cfg, "argmax", (5,))      # "argmax" | "topk" (k=...) | "ranks"
    y = op.forward(theta)                        # numpy or torch, [batch, 5] -> same kind
    y, tape = op.forward_with_tape(theta); g = tape.vjp(grad_y)
    loss, grad = op.fenchel_young(theta, y_true)

The library is `PERTURBATIONS_LIB` (a path) when set, else `libperturbations.so` next to
this package, else the repository's build tree (`target/release`); its major.minor must be
the one this package was written for. Errors of the library raise `Error` (`.status`, the
status name, and `.message`). Handles own library memory: use `close()` or `with`.
"""

import ctypes
import inspect
import os
import sys
import threading

import numpy as np

__all__ = ["Config", "Op", "Tape", "Draw", "Error", "library_path", "version"]
__version__ = "0.1.0"
LIBRARY_VERSION = (0, 1)

_P = ctypes.c_void_p
_F = ctypes.POINTER(ctypes.c_float)
_SOLVER = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, _F, ctypes.c_size_t, _F)

_NOISE = {"normal": 0, "gumbel": 1}
_PERTURBATION = {"additive": 0, "multiplicative": 1}
_BASELINE = {"none": 0, "sample_mean": 1, "clean_input": 2}
_SENSE = {"maximize": 0, "minimize": 1}
_BUILTIN = {"argmax": 0, "topk": 1, "ranks": 2}


def library_path():
    """The path of the library this package loads (see the module's documentation)."""
    from_env = os.environ.get("PERTURBATIONS_LIB")
    if from_env:
        return from_env
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(here, "libperturbations.so"),
        os.path.normpath(os.path.join(here, "..", "..", "..", "target", "release", "libperturbations.so")),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ImportError(
        "perturbations: cannot find libperturbations.so; set PERTURBATIONS_LIB to its path "
        "(built by `make build` in the repository, or installed by `make install`)")


def _load():
    path = library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ImportError(f"perturbations: cannot load {path}: {e}") from e
    sig = {
        "pert_version": ([], ctypes.c_char_p),
        "pert_status_name": ([ctypes.c_uint32], ctypes.c_char_p),
        "pert_last_error": ([ctypes.c_char_p, ctypes.c_size_t], ctypes.c_size_t),
        "pert_cuda_device_count": ([], ctypes.c_int32),
        "pert_config_new": ([ctypes.POINTER(_P)], ctypes.c_uint32),
        "pert_config_free": ([_P], None),
        "pert_config_set_num_samples": ([_P, ctypes.c_uint64], ctypes.c_uint32),
        "pert_config_set_sigma": ([_P, ctypes.c_double], ctypes.c_uint32),
        "pert_config_set_noise": ([_P, ctypes.c_uint32], ctypes.c_uint32),
        "pert_config_set_seed": ([_P, ctypes.c_uint64], ctypes.c_uint32),
        "pert_config_set_device": ([_P, ctypes.c_char_p], ctypes.c_uint32),
        "pert_config_set_threads": ([_P, ctypes.c_uint32], ctypes.c_uint32),
        "pert_config_set_max_threads": ([_P, ctypes.c_uint32], ctypes.c_uint32),
        "pert_config_set_perturbation": ([_P, ctypes.c_uint32], ctypes.c_uint32),
        "pert_config_set_baseline": ([_P, ctypes.c_uint32], ctypes.c_uint32),
        "pert_config_set_antithetic": ([_P, ctypes.c_bool], ctypes.c_uint32),
        "pert_config_set_sense": ([_P, ctypes.c_uint32], ctypes.c_uint32),
        "pert_config_set_chunk_bytes": ([_P, ctypes.c_uint64], ctypes.c_uint32),
        "pert_config_set_max_tape_bytes": ([_P, ctypes.c_uint64], ctypes.c_uint32),
        "pert_op_new": ([_P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, _P, _P, ctypes.POINTER(_P)], ctypes.c_uint32),
        "pert_op_new_builtin": ([_P, ctypes.c_uint32, ctypes.c_int64, _P, ctypes.c_size_t, ctypes.POINTER(_P)],
                                ctypes.c_uint32),
        "pert_op_new_external": ([_P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, ctypes.POINTER(_P)], ctypes.c_uint32),
        "pert_op_free": ([_P], None),
        "pert_op_input_numel": ([_P], ctypes.c_size_t),
        "pert_op_output_numel": ([_P], ctypes.c_size_t),
        "pert_forward": ([_P, _F, ctypes.c_size_t, _F, ctypes.POINTER(_P)], ctypes.c_uint32),
        "pert_fenchel_young": ([_P, _F, _F, ctypes.c_size_t, _F, _F], ctypes.c_uint32),
        "pert_tape_vjp": ([_P, _F, _F], ctypes.c_uint32),
        "pert_tape_jvp": ([_P, _F, _F], ctypes.c_uint32),
        "pert_tape_jacobian": ([_P, _F], ctypes.c_uint32),
        "pert_tape_objective": ([_P, _F], ctypes.c_uint32),
        "pert_tape_batch": ([_P], ctypes.c_size_t),
        "pert_tape_free": ([_P], None),
        "pert_draw_new": ([_P, _F, ctypes.c_size_t, ctypes.POINTER(_P)], ctypes.c_uint32),
        "pert_draw_count": ([_P], ctypes.c_size_t),
        "pert_draw_inputs": ([_P], _F),
        "pert_draw_finish": ([_P, _F, _F, ctypes.POINTER(_P)], ctypes.c_uint32),
        "pert_draw_free": ([_P], None),
        "pert_draw_fenchel_young": ([_P, _F, _F, _F, _F], ctypes.c_uint32),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    v = lib.pert_version().decode()
    if tuple(int(x) for x in v.split(".")[:2]) != LIBRARY_VERSION:
        raise ImportError(f"perturbations: {path} is version {v}; this package needs "
                          f"{LIBRARY_VERSION[0]}.{LIBRARY_VERSION[1]}.x")
    return lib


_lib = _load()


def version():
    """The library's version string."""
    return _lib.pert_version().decode()


class Error(Exception):
    """An error of the library: `.status` (its name, e.g. "PERT_STATUS_INVALID_ARGUMENT"),
    `.code` (its number) and `.message`."""

    def __init__(self, code, message):
        self.code = code
        self.status = _lib.pert_status_name(code).decode()
        self.message = message
        super().__init__(f"{self.status}: {message}")


def _last_error():
    n = _lib.pert_last_error(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    _lib.pert_last_error(buf, n + 1)
    return buf.value.decode(errors="replace")


def _check(code):
    if code != 0:
        raise Error(code, _last_error())


def _unsigned(value, bits, what):
    v = int(value)
    if not 0 <= v < 1 << bits:
        raise ValueError(f"{what} must be in 0 .. 2^{bits} - 1, got {v}")
    return v


def _choice(table, value, what):
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"unknown {what} {value!r}; one of {', '.join(sorted(table))}")
        return table[value]
    return int(value)


class _Handle:
    """A library handle, freed by close() (or at garbage collection)."""

    _free = None

    def __init__(self, handle):
        self._h = handle
        self._lock = threading.Lock()  # one C call at a time; close waits for it

    def close(self):
        with self._lock:
            h, self._h = self._h, None
        if h:
            type(self)._free(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            h, self._h = self._h, None  # no call can run: no lock needed
            if h:
                type(self)._free(h)
        except Exception:
            pass

    def __copy__(self):
        raise TypeError(f"a {type(self).__name__} owns a library handle and cannot be copied")

    __deepcopy__ = lambda self, memo: self.__copy__()  # noqa: E731

    @property
    def handle(self):
        if not self._h:
            raise Error(1, f"the {type(self).__name__} was closed")
        return self._h


class Config(_Handle):
    """Settings of ops, every C setting as a keyword (validated by the library):
    num_samples, sigma, noise ("normal" | "gumbel"), seed, device ("cpu", "cuda", "cuda:1",
    "auto"), threads, max_threads, perturbation ("additive" | "multiplicative"), baseline ("none" |
    "sample_mean" | "clean_input"), antithetic, sense ("maximize" | "minimize"),
    chunk_bytes, max_tape_bytes. An op copies its config."""

    _free = staticmethod(lambda h: _lib.pert_config_free(h))

    def __init__(self, **settings):
        h = _P()
        _check(_lib.pert_config_new(ctypes.byref(h)))
        super().__init__(h)
        self.sense = "maximize"
        for key, value in settings.items():
            self.set(key, value)

    def set(self, key, value):
        h = self.handle
        if key == "num_samples":
            _check(_lib.pert_config_set_num_samples(h, _unsigned(value, 64, key)))
        elif key == "sigma":
            _check(_lib.pert_config_set_sigma(h, float(value)))
        elif key == "noise":
            _check(_lib.pert_config_set_noise(h, _choice(_NOISE, value, "noise")))
        elif key == "seed":
            _check(_lib.pert_config_set_seed(h, _unsigned(value, 64, key)))
        elif key == "device":
            _check(_lib.pert_config_set_device(h, str(value).encode()))
        elif key == "threads":
            _check(_lib.pert_config_set_threads(h, _unsigned(value, 32, key)))
        elif key == "max_threads":
            _check(_lib.pert_config_set_max_threads(h, _unsigned(value, 32, key)))
        elif key == "perturbation":
            _check(_lib.pert_config_set_perturbation(h, _choice(_PERTURBATION, value, "perturbation")))
        elif key == "baseline":
            _check(_lib.pert_config_set_baseline(h, _choice(_BASELINE, value, "baseline")))
        elif key == "antithetic":
            _check(_lib.pert_config_set_antithetic(h, bool(value)))
        elif key == "sense":
            code = _choice(_SENSE, value, "sense")
            _check(_lib.pert_config_set_sense(h, code))
            self.sense = "maximize" if code == 0 else "minimize"
        elif key == "chunk_bytes":
            _check(_lib.pert_config_set_chunk_bytes(h, _unsigned(value, 64, key)))
        elif key == "max_tape_bytes":
            _check(_lib.pert_config_set_max_tape_bytes(h, _unsigned(value, 64, key)))
        else:
            raise TypeError(f"unknown Config setting {key!r}")
        return self


# ---- arrays: numpy arrays or torch tensors in, the same kind out -------------------------

def _as_host(x, what):
    """(float32 C-contiguous numpy array, a function giving the caller's kind back)."""
    torch = sys.modules.get("torch")  # a tensor can only come from an imported torch
    if torch is not None and isinstance(x, torch.Tensor):
        device = x.device
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        host = np.require(x.detach().to("cpu", torch.float32).contiguous().numpy(), np.float32, ["C", "A"])
        back = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)  # noqa: E731
        return host, back
    # C-contiguous and aligned float32 (a view at an odd offset is copied)
    return np.require(np.asarray(x, dtype=np.float32), np.float32, ["C", "A"]), (lambda r: r)


def _ptr(a):
    return a.ctypes.data_as(_F) if a.size else None


class Tape(_Handle):
    """What a forward call keeps for its gradients (no further solver call)."""

    _free = staticmethod(lambda h: _lib.pert_tape_free(h))

    def __init__(self, handle, input_shape, output_shape, batch, back):
        super().__init__(handle)
        self.input_shape, self.output_shape, self.batch = input_shape, output_shape, batch
        self._back = back

    def _run(self, fn, arg, in_shape, out_shape, what):
        a, back = _as_host(arg, what)
        want = (self.batch,) + tuple(in_shape)
        if a.shape != want:
            raise ValueError(f"{what} must have shape {want}, got {a.shape}")
        out = np.empty((self.batch,) + tuple(out_shape), dtype=np.float32)
        with self._lock:
            _check(fn(self.handle, _ptr(a), _ptr(out)))
        return back(out)

    def vjp(self, grad_output):
        """Jᵀg per problem: grad_output [batch, *output_shape] -> [batch, *input_shape]."""
        return self._run(_lib.pert_tape_vjp, grad_output, self.output_shape, self.input_shape, "grad_output")

    def jvp(self, tangent):
        """J t per problem: tangent [batch, *input_shape] -> [batch, *output_shape]."""
        return self._run(_lib.pert_tape_jvp, tangent, self.input_shape, self.output_shape, "tangent")

    def jacobian(self):
        """[batch, output_numel, input_numel]."""
        o, d = int(np.prod(self.output_shape)), int(np.prod(self.input_shape))
        out = np.empty((self.batch, o, d), dtype=np.float32)
        with self._lock:
            _check(_lib.pert_tape_jacobian(self.handle, _ptr(out)))
        return self._back(out)

    def objective(self):
        """F_sigma(theta) per problem [batch] (output shape = input shape)."""
        out = np.empty((self.batch,), dtype=np.float32)
        with self._lock:
            _check(_lib.pert_tape_objective(self.handle, _ptr(out)))
        return self._back(out)


def _trampoline(solver, input_shape, output_shape, errors):
    """The C callback of a Python solver: its own copy of the inputs, the solutions copied
    into the library's buffer, an exception kept in `errors` for the call to re-raise. It
    holds no reference to the op (which would then only be freed by the cycle collector)."""
    two = len(inspect.signature(solver).parameters) >= 2 if _has_signature(solver) else False

    def call(_user_data, x, count, y):
        try:
            xs = np.ctypeslib.as_array(x, shape=(count,) + input_shape).copy()
            ys = np.ctypeslib.as_array(y, shape=(count,) + output_shape)
            if two:
                out = np.zeros((count,) + output_shape, dtype=np.float32)
                solver(xs, out)
            else:
                out = np.asarray(solver(xs), dtype=np.float32).reshape(ys.shape)
            ys[...] = out
            return 0
        except BaseException as e:  # noqa: BLE001 - re-raised by the call that ran it
            if not errors:
                errors.append(e)
            return 1

    return call


def _has_signature(f):
    try:
        inspect.signature(f)
        return True
    except (TypeError, ValueError):
        return False


class Op(_Handle):
    """A perturbed optimizer over `solver`: a Python callable receiving the perturbed
    problems as a float32 numpy array [count, *input_shape] (its own copy) and returning
    [count, *output_shape], or, when it takes two arguments, writing them into the second;
    or a ctypes C function pointer `int32_t solve(void *user_data, const float *x,
    size_t count, float *y)` (with its `user_data`, kept alive by the op), which runs with
    the GIL released. A Python solver's exception is re-raised by the call that ran it,
    with its traceback. With threads > 1 the solver is called from several threads; a
    Python solver holds the GIL except where it releases it (numpy, I/O), so it must be
    thread-safe. Calls of one op take turns (a lock per op); a solver must not call its
    own op."""

    _free = staticmethod(lambda h: _lib.pert_op_free(h))

    def __init__(self, config, input_shape, output_shape, solver, user_data=None):
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        self.sense = config.sense
        self._errors = []  # the running call's solver exception (calls take turns)
        ins = (ctypes.c_int64 * max(len(self.input_shape), 1))(*self.input_shape)
        outs = (ctypes.c_int64 * max(len(self.output_shape), 1))(*self.output_shape)
        if isinstance(solver, ctypes._CFuncPtr):
            self._callback = solver
            self._user_data = user_data  # must stay valid while the op exists
            fn = ctypes.cast(solver, _P)
            data = user_data
        elif callable(solver):
            if user_data is not None:
                raise TypeError("user_data is for C function pointer solvers")
            self._callback = _SOLVER(_trampoline(solver, self.input_shape, self.output_shape, self._errors))
            fn = ctypes.cast(self._callback, _P)
            data = None
        else:
            raise TypeError("solver must be a Python callable or a ctypes C function pointer")
        h = _P()
        _check(_lib.pert_op_new(config.handle, ins, len(self.input_shape), outs, len(self.output_shape),
                                fn, data, ctypes.byref(h)))
        super().__init__(h)
        self._owner = threading.local()

    @classmethod
    def builtin(cls, config, which, input_shape, k=0):
        """A built-in solver ("argmax", "topk" with k, "ranks") along the last dimension."""
        op = cls.__new__(cls)
        op.input_shape = op.output_shape = tuple(input_shape)
        op.sense, op._errors = config.sense, []
        ins = (ctypes.c_int64 * len(op.input_shape))(*op.input_shape)
        h = _P()
        _check(_lib.pert_op_new_builtin(config.handle, _choice(_BUILTIN, which, "builtin"), int(k), ins,
                                        len(op.input_shape), ctypes.byref(h)))
        _Handle.__init__(op, h)
        op._owner = threading.local()
        return op

    @classmethod
    def external(cls, config, input_shape, output_shape):
        """An op whose problems are solved elsewhere: only `draw` works on it."""
        op = cls.__new__(cls)
        op.input_shape, op.output_shape = tuple(input_shape), tuple(output_shape)
        op.sense, op._errors = config.sense, []
        ins = (ctypes.c_int64 * max(len(op.input_shape), 1))(*op.input_shape)
        outs = (ctypes.c_int64 * max(len(op.output_shape), 1))(*op.output_shape)
        h = _P()
        _check(_lib.pert_op_new_external(config.handle, ins, len(op.input_shape), outs, len(op.output_shape),
                                         ctypes.byref(h)))
        _Handle.__init__(op, h)
        op._owner = threading.local()
        return op

    def _call(self, fn, *args):
        if self._lock.locked() and getattr(self._owner, "value", False):
            raise RuntimeError("a solver cannot call its own op (the op runs one call at a time)")
        with self._lock:
            self._owner.value = True
            try:
                self._errors.clear()
                code = fn(self.handle, *args)
                if self._errors:
                    raise self._errors.pop()
                _check(code)
            finally:
                self._errors.clear()
                self._owner.value = False

    def _theta(self, theta):
        a, back = _as_host(theta, "theta")
        if a.shape[1:] != self.input_shape or a.ndim != len(self.input_shape) + 1:
            raise ValueError(f"theta must have shape [batch, {', '.join(map(str, self.input_shape))}], got {a.shape}")
        return a, back

    def forward(self, theta):
        """y_sigma(theta) for theta [batch, *input_shape]: [batch, *output_shape]."""
        a, back = self._theta(theta)
        out = np.empty((a.shape[0],) + self.output_shape, dtype=np.float32)
        self._call(_lib.pert_forward, _ptr(a), a.shape[0], _ptr(out), None)
        return back(out)

    def forward_with_tape(self, theta):
        """y_sigma(theta) and the Tape of the call."""
        a, back = self._theta(theta)
        out = np.empty((a.shape[0],) + self.output_shape, dtype=np.float32)
        t = _P()
        self._call(_lib.pert_forward, _ptr(a), a.shape[0], _ptr(out), ctypes.byref(t))
        return back(out), Tape(t, self.input_shape, self.output_shape, a.shape[0], back)

    def fenchel_young(self, theta, y_true):
        """The Fenchel-Young loss [batch] of theta against y_true, and its gradient with
        respect to theta (y_sigma(theta) - y_true when maximizing, the negation when
        minimizing), from one call's draws."""
        a, back = self._theta(theta)
        y, _ = _as_host(y_true, "y_true")
        if y.shape != a.shape:
            raise ValueError(f"y_true must have the shape of theta {a.shape}, got {y.shape}")
        loss = np.empty((a.shape[0],), dtype=np.float32)
        grad = np.empty(a.shape, dtype=np.float32)
        self._call(_lib.pert_fenchel_young, _ptr(a), _ptr(y), a.shape[0], _ptr(loss), _ptr(grad))
        return back(loss), back(grad)

    def draw(self, theta):
        """The two-phase API: a Draw of the perturbed inputs of one call."""
        return Draw(self, theta)


class Draw(_Handle):
    """The perturbed inputs of one call (`inputs()`, [count, *input_shape]); solve them
    anywhere and `finish(solutions)` gives y_sigma(theta) and a tape."""

    _free = staticmethod(lambda h: _lib.pert_draw_free(h))

    def __init__(self, op, theta):
        a, self._back = op._theta(theta)
        self.op, self.batch = op, a.shape[0]
        h = _P()
        op._call(_lib.pert_draw_new, _ptr(a), a.shape[0], ctypes.byref(h))  # takes its turn
        super().__init__(h)

    def inputs(self):
        """A copy of the perturbed inputs, [count, *input_shape]."""
        with self._lock:
            count = _lib.pert_draw_count(self.handle)
            p = _lib.pert_draw_inputs(self.handle)
            return np.ctypeslib.as_array(p, shape=(count,) + self.op.input_shape).copy()

    def finish(self, solutions):
        """y_sigma(theta) and the Tape, from the solutions of every row of inputs()."""
        s, _ = _as_host(solutions, "solutions")
        count = _lib.pert_draw_count(self.handle)
        if s.shape != (count,) + self.op.output_shape:
            raise ValueError(f"solutions must have shape {(count,) + self.op.output_shape}, got {s.shape}")
        out = np.empty((self.batch,) + self.op.output_shape, dtype=np.float32)
        t = _P()
        with self._lock:
            _check(_lib.pert_draw_finish(self.handle, _ptr(s), _ptr(out), ctypes.byref(t)))
        return self._back(out), Tape(t, self.op.input_shape, self.op.output_shape, self.batch, self._back)

    def fenchel_young(self, solutions, y_true):
        """The Fenchel-Young loss [batch] of the draw's theta against y_true and its
        gradient with respect to theta, from the solutions of every row of inputs() (what
        Op.fenchel_young gives for the same seed and call count)."""
        s, _ = _as_host(solutions, "solutions")
        y, _ = _as_host(y_true, "y_true")
        count = _lib.pert_draw_count(self.handle)
        if s.shape != (count,) + self.op.output_shape:
            raise ValueError(f"solutions must have shape {(count,) + self.op.output_shape}, got {s.shape}")
        if y.shape != (self.batch,) + self.op.input_shape:
            raise ValueError(f"y_true must have shape {(self.batch,) + self.op.input_shape}, got {y.shape}")
        loss = np.empty((self.batch,), dtype=np.float32)
        grad = np.empty((self.batch,) + self.op.input_shape, dtype=np.float32)
        with self._lock:
            _check(_lib.pert_draw_fenchel_young(self.handle, _ptr(s), _ptr(y), _ptr(loss), _ptr(grad)))
        return self._back(loss), self._back(grad)
