"""`Op` (a perturbed optimizer over a solver), its `Tape` and the two-phase `Draw`."""

import ctypes
import inspect
import itertools
import math
import os
import sys
import _thread
import threading
import time
import warnings
import weakref

import numpy as np

from . import _native
from ._arrays import _array_room, address, array_rows, as_host, host_rows, ptr, shape_of
from ._native import P, lib
from .config import Config, choice
from .errors import Error, InvalidArgumentError, SenseWarning, SolverFailedError, _check, _last_error

__all__ = ["Op", "Tape", "Draw", "Pool"]

BUILTIN = {"argmax": 0, "topk": 1, "ranks": 2}
_M64 = (1 << 64) - 1


class _Handle:
    """A library handle, freed by close(), `with`, or garbage collection. Its lock (one
    call at a time; close waits for it) is made again in a forked child, where a lock held
    by a thread of the parent would never be released."""

    _free = None

    def __init__(self, handle):
        self._h = handle
        self._pid = os.getpid()
        self._lock_ = threading.Lock()

    @property
    def _lock(self):
        if self._pid != os.getpid():
            self._lock_, self._pid = threading.Lock(), os.getpid()
        return self._lock_

    def close(self):
        """Frees the library's memory now; later calls raise InvalidArgumentError."""
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
        except Exception:  # noqa: BLE001 - nothing can be raised from __del__
            pass

    def __copy__(self):
        raise TypeError(f"a {type(self).__name__} owns a library handle and cannot be copied")

    def __deepcopy__(self, memo):
        return self.__copy__()

    def __reduce_ex__(self, protocol):
        raise TypeError(f"a {type(self).__name__} cannot be pickled: it owns memory of the library (and an Op "
                        f"its solver). Make it in the process that uses it (in a spawned worker, say), or use "
                        f"the fork start method, under which each worker re-keys an Op it inherits")

    @property
    def handle(self):
        if not self._h:
            raise InvalidArgumentError(2, f"the {type(self).__name__} was closed")
        return self._h


# ---- solution pools ---------------------------------------------------------------------

class Pool(_Handle):
    """A pool of at most `capacity` distinct solutions of `output_shape` (pert_pool_new), for
    ops whose solver is expensive (`Op.set_pool`) and for the pool-based losses
    (`perturbations.torch.nce`, `cmap`, `ltr_pointwise`, `ltr_pairwise`, `ltr_listwise`).

    Memory is bounded by the capacity. First in, first out: a solution the pool holds
    already (every entry equal, -0 and +0 alike) is not added again and keeps its place;
    when additions take the pool beyond its capacity, its oldest solutions leave first. A
    pool may be shared by ops and threads; an op given it keeps it alive, so the pool may be
    closed while ops use it."""

    _free = staticmethod(lambda h: lib.pert_pool_free(h))

    def __init__(self, output_shape, capacity):
        from .config import unsigned
        shape = shape_of(output_shape, "output_shape")
        capacity = unsigned(capacity, 64, "capacity")
        dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        h = P()
        _check(lib.pert_pool_new(dims, len(shape), capacity, ctypes.byref(h)))
        super().__init__(h)
        self.output_shape, self.capacity = shape, capacity

    def add(self, solutions):
        """Adds solutions [count, *output_shape] (numpy or torch; finite): those the pool does
        not hold join as its newest members, each once, in the order of their last
        occurrence, then its oldest leave down to its capacity. All or nothing. Returns the
        pool."""
        _, flat, _ = array_rows(solutions, self.output_shape, "solutions")
        with self._lock:
            _check(lib.pert_pool_add(self.handle, ptr(flat), flat.shape[0]))
        return self

    def __len__(self):
        with self._lock:
            return int(lib.pert_pool_size(self.handle))

    def __repr__(self):
        size = len(self) if self._h else "closed"
        return f"Pool(output_shape={list(self.output_shape)}, capacity={self.capacity}, size={size})"


# ---- tapes ------------------------------------------------------------------------------

class Tape(_Handle):
    """What a forward call keeps for its gradients: products with its Jacobian estimate,
    with no further solver call. `batch_shape` is the forward call's batch dimensions."""

    _free = staticmethod(lambda h: lib.pert_tape_free(h))

    def __init__(self, handle, input_shape, output_shape, batch_shape, back, room=_array_room):
        super().__init__(handle)
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        self.batch_shape = tuple(batch_shape)
        self.batch = math.prod(self.batch_shape)
        self._back, self._room = back, room

    def _run(self, fn, arg, in_shape, out_shape, what):
        lead, a, back, room = host_rows(arg, in_shape, what)
        if lead not in (self.batch_shape, (self.batch,)):
            raise InvalidArgumentError(2, f"{what} must have shape {list(self.batch_shape + tuple(in_shape))}, "
                                          f"got {list(lead + tuple(in_shape))}")
        out = room((self.batch,) + tuple(out_shape))
        with self._lock:
            _check(fn(self.handle, address(a), address(out)))
        return back(out.reshape(lead + tuple(out_shape)))

    def vjp(self, grad_output):
        """Jᵀg per problem: grad_output [*batch_shape, *output_shape] -> [*batch_shape, *input_shape]."""
        return self._run(lib.pert_tape_vjp, grad_output, self.output_shape, self.input_shape, "grad_output")

    def jvp(self, tangent):
        """J t per problem: tangent [*batch_shape, *input_shape] -> [*batch_shape, *output_shape]."""
        return self._run(lib.pert_tape_jvp, tangent, self.input_shape, self.output_shape, "tangent")

    def jacobian(self):
        """The Jacobian estimates, [*batch_shape, output_numel, input_numel]."""
        o, d = math.prod(self.output_shape), math.prod(self.input_shape)
        out = self._room((self.batch, o, d))
        with self._lock:
            _check(lib.pert_tape_jacobian(self.handle, address(out)))
        return self._back(out.reshape(self.batch_shape + (o, d)))

    def objective(self):
        """F_sigma(theta) per problem, [*batch_shape] (output shape = input shape)."""
        out = self._room((self.batch,))
        with self._lock:
            _check(lib.pert_tape_objective(self.handle, address(out)))
        return self._back(out.reshape(self.batch_shape))


# ---- Python solvers ----------------------------------------------------------------------

def _required_positionals(f, but=()):
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values()
               if p.kind in kinds and p.default is p.empty and p.name not in but)


def _takes_info(f):
    try:
        p = inspect.signature(f).parameters.get("info")
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class SolveInfo:
    """Where the rows of one solver call sit (for per-worker solvers that take `info=`):
    `worker`, `clean` (True: the rows are the unperturbed theta of problems `first_row ..`,
    for the clean-input baseline), `first_row` (else: row r is row first_row + r of the
    call, problem (first_row + r) // num_samples), `num_samples`, `batch`; and for warm
    starts `pool_best(x)` (during the solver call only)."""

    __slots__ = ("worker", "clean", "first_row", "num_samples", "batch", "_c")

    def __init__(self, worker, clean, first_row, num_samples, batch, _c=None):
        self.worker, self.clean, self.first_row = worker, clean, first_row
        self.num_samples, self.batch = num_samples, batch
        self._c = _c  # the C struct of the running call, when it offers its pool

    def pool_best(self, x):
        """For warm starts: the op's pool's solution of best <x, y> in the op's sense for
        input row `x` (one row: the input's size), or None when the call has no pool, the
        pool is empty or `x` is not one row. Only during the solver call that got this
        info (afterwards: None)."""
        if self._c is None:
            return None
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out = np.empty_like(x)
        fn = _native.POOL_BEST(self._c.contents.pool_best)
        f32 = ctypes.POINTER(ctypes.c_float)
        got = fn(self._c, x.ctypes.data_as(f32), x.size, out.ctypes.data_as(f32))
        return out if got == 1 else None

    def __repr__(self):
        return (f"SolveInfo(worker={self.worker}, clean={self.clean}, first_row={self.first_row}, "
                f"num_samples={self.num_samples}, batch={self.batch})")


class _PySolver:
    """A Python solver and how it is called: solver(x) -> solutions, or solver(x, out)
    writing them (asked for with writes_out=True, or when it has a second required
    positional parameter); with info=SolveInfo when it takes `info` (per-worker solvers)."""

    def __init__(self, solver, writes_out, input_shape, output_shape, info_ok=False):
        if not callable(solver):
            raise TypeError("a solver must be callable (or a ctypes C function pointer)")
        self.solver = solver
        self.info = info_ok and _takes_info(solver)
        self.two = bool(writes_out) if writes_out is not None else \
            _required_positionals(solver, ("info",) if self.info else ()) >= 2
        self.input_shape, self.output_shape = input_shape, output_shape
        self.output_numel = math.prod(output_shape)

    def solve(self, x, count, y, info=None):
        """Solves `count` rows at x into y (the library's buffers); raises on any defect."""
        xs = np.ctypeslib.as_array(x, shape=(count * math.prod(self.input_shape),)).reshape(
            (count,) + self.input_shape).copy()  # the solver's own copy
        ys = np.ctypeslib.as_array(y, shape=(count * self.output_numel,)).reshape((count,) + self.output_shape)
        kw = {"info": info} if self.info else {}
        want = (count,) + self.output_shape
        if self.two:
            out = np.full(want, np.nan, dtype=np.float32)
            returned = self.solver(xs, out, **kw)
            missing = int(np.isnan(out).sum())
            if missing:
                if missing == out.size and returned is not None:
                    raise SolverFailedError(4, "the solver is called as solver(x, out) (it has a second "
                                               "required parameter, or writes_out=True) but returned its "
                                               "solutions instead of writing them into out: write out[...] = "
                                               "..., or make the Op with writes_out=False")
                raise SolverFailedError(4, f"the solver left {missing} of the {out.size} entries of out "
                                           f"{list(want)} unwritten (or wrote NaN)")
            ys[...] = out
            return
        r = self.solver(xs, **kw)
        if r is None:
            raise SolverFailedError(4, f"the solver returned None: it must return the solutions, shape "
                                       f"{list(want)} (or take a second parameter `out` to write them into)")
        try:
            r = np.asarray(r, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise SolverFailedError(4, f"the solver's result is not an array of numbers: {e}") from None
        if r.shape != want and r.shape != (count * self.output_numel,):
            raise SolverFailedError(4, f"the solver returned shape {list(r.shape)}; it must return one solution "
                                       f"per row of its input, shape {list(want)} (or those "
                                       f"{count * self.output_numel} values flat)")
        ys[...] = r.reshape(want)


def _keep_error(errors, e):
    if not errors:
        errors.append(e)


def _unraisable(hook):
    """sys.unraisablehook: an exception raised in one of our callbacks before its `try`
    (a KeyboardInterrupt delivered at the callback's first instruction), which ctypes
    would print and drop, is kept for the call to raise; others go to `hook`."""

    def keep(unraisable):
        errors = getattr(unraisable.object, "_pert_errors", None)
        if errors is not None and unraisable.exc_value is not None:
            _keep_error(errors, unraisable.exc_value)
        else:
            hook(unraisable)

    return keep


sys.unraisablehook = _unraisable(sys.unraisablehook)


def _callback(kind, f, errors):
    """A ctypes callback of `f`, whose exceptions raised before its own `try` are kept in
    `errors` too (see _unraisable)."""
    f._pert_errors = errors
    return kind(f)


# the ops (by the id of their error list) whose solver code runs on this thread: a solver
# calling or closing its own op, on whatever thread the library runs it, is refused
_SOLVING = threading.local()


class _Solving:
    """Marks this thread as running a solver of the op whose error list is `errors`."""

    def __init__(self, errors):
        self.key = id(errors)

    def __enter__(self):
        keys = getattr(_SOLVING, "keys", None)
        if keys is None:
            keys = _SOLVING.keys = []
        keys.append(self.key)

    def __exit__(self, *exc):
        _SOLVING.keys.pop()


def _solving(errors):
    return id(errors) in getattr(_SOLVING, "keys", ())


def _solver_callback(py, errors):
    """The C callback (pert_solver_fn) of a Python solver: an exception is kept in `errors`
    for the call to raise. It holds no reference to the op."""

    def call(_user_data, x, count, y):
        try:
            with _Solving(errors):
                py.solve(x, count, y)
            return 0
        except BaseException as e:  # noqa: BLE001 - re-raised by the call that ran it
            _keep_error(errors, e)
            return 1

    return _callback(_native.SOLVER, call, errors)


def _set_solver_error(e):
    """The exception's type and text as the library's message of the failing callback
    (an exception whose str() raises gives its type alone: the callback still fails)."""
    try:
        text = f"{type(e).__name__}: {e}"
    except BaseException:  # noqa: BLE001
        text = type(e).__name__
    lib.pert_solver_set_error(text.encode("utf-8", "replace"))


class _Workers:
    """The callbacks of a per-worker Python solver (pert_op_new_ex): make_solver(w) runs on
    worker w's own thread before its first solve, and its solver is used only there."""

    def __init__(self, make_solver, writes_out, input_shape, output_shape, errors):
        self.make_solver, self.writes_out = make_solver, writes_out
        self.shapes = (input_shape, output_shape)
        self.solvers = {}

        def init(_u, w):
            try:
                with _Solving(errors):
                    self.solvers[w] = _PySolver(make_solver(w), writes_out, *self.shapes, info_ok=True)
                return 0
            except BaseException as e:  # noqa: BLE001
                _keep_error(errors, e)
                # (its text for the library's message: the MPI component sends it to root)
                _set_solver_error(e)
                return 1

        def fini(_u, w):
            self.solvers.pop(w, None)

        def solve(_u, info, x, count, y):
            try:
                i = info.contents
                py = self.solvers[i.worker]
                # (pool_best only where the library's struct has it, and only during the call)
                warm = info if i.struct_size >= ctypes.sizeof(_native.SolveInfo) and i.pool_best else None
                at = (SolveInfo(i.worker, bool(i.clean), i.first_row, i.num_samples, i.batch, warm)
                      if py.info else None)
                try:
                    with _Solving(errors):
                        py.solve(x, count, y, at)
                finally:
                    if at is not None:
                        at._c = None
                return 0
            except BaseException as e:  # noqa: BLE001
                _keep_error(errors, e)
                # the text for the library's message (which the MPI component sends to root)
                _set_solver_error(e)
                return 1

        self.c_init = _callback(_native.WORKER_INIT, init, errors)
        self.c_fini = _callback(_native.WORKER_FINI, fini, [])
        self.c_solve = _callback(_native.SOLVER_EX, solve, errors)


# every live op by its id (torch custom ops take ops by id)
BY_ID = weakref.WeakValueDictionary()
_IDS = itertools.count(1)
_ID_LOCK = threading.Lock()

# ops with worker threads, closed before the interpreter finalizes (their fini hooks need it)
_WORKER_OPS = weakref.WeakSet()


def _close_worker_ops():
    for op in list(_WORKER_OPS):
        op.close()


import atexit  # noqa: E402

atexit.register(_close_worker_ops)


# ---- ops ----------------------------------------------------------------------------------

def _mix(seed, key):
    """A 64-bit seed from (seed, key): SplitMix64's finalizer over both."""
    def fin(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        return z ^ (z >> 31)

    return fin((seed + fin((key + 0x9E3779B97F4A7C15) & _M64)) & _M64)


def _child_key():
    """The key of this (forked) process: a DataLoader worker's seed (which torch derives
    from the parent's generator and the worker's index: repeatable under
    torch.manual_seed), else the process id."""
    data = sys.modules.get("torch.utils.data")
    if data is not None:
        info = data.get_worker_info()
        if info is not None:
            return int(info.seed) & _M64
    return os.getpid()


def _dims(shape):
    return (ctypes.c_int64 * max(len(shape), 1))(*shape)


class Op(_Handle):
    """A perturbed optimizer y_sigma(theta) = E[solver(theta + sigma Z)] and its gradients.

    `solver` is a Python callable or a ctypes C function pointer
    `int32_t solve(void *user_data, const float *x, size_t count, float *y)` (with its
    `user_data`, kept alive by the op; it runs with the GIL released). A Python solver gets
    the perturbed problems as a float32 numpy array [count, *input_shape] (its own copy)
    and returns the solutions [count, *output_shape] (or those values flat), or, called as
    solver(x, out), writes them into out: that form is used when `writes_out=True`, or when
    the solver has a second *required* positional parameter (a defaulted one, as in
    `def argmax(x, axis=-1)`, does not count). A result of another shape, an entry left
    unwritten, or None raises `SolverFailedError`; a solver's own exception is re-raised
    by the call that ran it, with its traceback.

    Shapes are ints or tuples of ints. theta has shape [*batch, *input_shape] (any number
    of leading batch dimensions, none included); results keep those dimensions.
    With threads > 1 the solver is called from several threads at once: it must be
    thread-safe (or use `Op.with_workers`). Calls of one op take turns; a solver must not
    call its own op. In a forked child process (a DataLoader worker, say) an op made in the
    parent re-keys itself at its first call: its seed becomes a mix of its seed and the
    worker's torch seed (repeatable under torch.manual_seed; the process id outside
    DataLoader workers), its call count restarts at 0, so processes never share noise.
    `copy.deepcopy` gives a new op with the same settings and solver (its call count at
    0); pickling raises TypeError.
    """

    _free = staticmethod(lambda h: lib.pert_op_free(h))

    def __init__(self, config, input_shape, output_shape, solver, user_data=None, *, writes_out=None):
        if isinstance(solver, ctypes._CFuncPtr):
            recipe = ("c", solver, user_data)
        else:
            if user_data is not None:
                raise TypeError("user_data is for C function pointer solvers")
            if not callable(solver):
                raise TypeError("solver must be a Python callable or a ctypes C function pointer")
            recipe = ("python", solver, writes_out)
        self._start(config, shape_of(input_shape, "input_shape"), shape_of(output_shape, "output_shape"), recipe)

    @classmethod
    def builtin(cls, config, which, input_shape, k=0):
        """A built-in solver along the last dimension: "argmax", "topk" (with k) or "ranks".
        The output shape is the input shape. The built-ins maximize <theta, y>: the config's
        sense must be "maximize" (InvalidArgumentError otherwise; to minimize, negate theta
        or give a solver)."""
        shape = shape_of(input_shape, "input_shape")
        code, _ = choice(BUILTIN, which, "builtin")
        op = cls.__new__(cls)
        op._start(config, shape, shape, ("builtin", code, int(k)))
        return op

    @classmethod
    def external(cls, config, input_shape, output_shape):
        """An op whose problems are solved elsewhere: only `draw` works on it."""
        op = cls.__new__(cls)
        op._start(config, shape_of(input_shape, "input_shape"), shape_of(output_shape, "output_shape"),
                  ("external",))
        return op

    @classmethod
    def with_workers(cls, config, input_shape, output_shape, make_solver, *, writes_out=None):
        """An op whose `threads` workers (the config's; 0: one per core) each have a solver
        of their own: `make_solver(worker)` runs on worker `worker`'s thread before its
        first solve and returns the solver used only on that thread (one Gurobi model per
        worker, say). Solvers are called as for `Op`; one that takes a parameter `info`
        gets a `SolveInfo` (its worker, where its rows sit in the call). Every solve runs
        on a worker; results are the same for any number of workers, bit for bit."""
        if not callable(make_solver):
            raise TypeError("make_solver must be callable: make_solver(worker) -> solver")
        op = cls.__new__(cls)
        op._start(config, shape_of(input_shape, "input_shape"), shape_of(output_shape, "output_shape"),
                  ("workers", make_solver, writes_out))
        return op

    def _start(self, config, input_shape, output_shape, recipe):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a perturbations.Config, got {type(config).__name__}")
        self.input_shape, self.output_shape = input_shape, output_shape
        self._recipe = recipe
        self._settings = config.settings()
        self.sense = self._settings["sense"]
        self._errors = []  # the running call's solver exception (calls take turns)
        self._owner = threading.local()
        self._keyed_pid = os.getpid()
        self._seconds_per_row = None
        self._interrupt_lock = threading.RLock()  # (a signal handler may interrupt during close)
        super().__init__(self._make(config))
        with _ID_LOCK:  # the op's id for torch custom ops (perturbations.torch under torch.compile)
            self.id = next(_IDS)
            BY_ID[self.id] = self

    def _make(self, config):
        """A new C op of this op's recipe from `config`."""
        kind, h = self._recipe[0], P()
        ins, outs = _dims(self.input_shape), _dims(self.output_shape)
        ri, ro = len(self.input_shape), len(self.output_shape)
        if kind == "builtin":
            _check(lib.pert_op_new_builtin(config.handle, self._recipe[1], self._recipe[2], ins, ri,
                                           ctypes.byref(h)))
        elif kind == "external":
            _check(lib.pert_op_new_external(config.handle, ins, ri, outs, ro, ctypes.byref(h)))
        elif kind in ("workers", "mpi"):
            w = _Workers(self._recipe[1], self._recipe[2], self.input_shape, self.output_shape, self._errors)
            self._callbacks = w
            fns = (ctypes.cast(w.c_solve, P), None, ctypes.cast(w.c_init, P), ctypes.cast(w.c_fini, P))
            if kind == "mpi":  # collective: every rank of the communicator makes its op
                from .mpi import component
                comm, root = self._recipe[3], self._recipe[4]
                _check(component().pert_mpi_op_new_f(config.handle, ins, ri, outs, ro, comm, root, *fns,
                                                     ctypes.byref(h)))
            else:
                _check(lib.pert_op_new_ex(config.handle, ins, ri, outs, ro, *fns, ctypes.byref(h)))
            _WORKER_OPS.add(self)
        else:
            if kind == "c":
                self._callbacks = self._recipe[1]
                fn, data = ctypes.cast(self._recipe[1], P), self._recipe[2]
            else:
                py = _PySolver(self._recipe[1], self._recipe[2], self.input_shape, self.output_shape)
                self._callbacks = _solver_callback(py, self._errors)
                fn, data = ctypes.cast(self._callbacks, P), None
            _check(lib.pert_op_new(config.handle, ins, ri, outs, ro, fn, data, ctypes.byref(h)))
        return h

    def config(self):
        """A Config with this op's settings (a copy)."""
        return Config(**self._settings)

    def __repr__(self):
        kind = {"c": "C solver", "python": "Python solver", "builtin": "built-in", "external": "external",
                "workers": "per-worker solvers", "mpi": "solves spread over MPI ranks"}[self._recipe[0]]
        return f"<perturbations.Op {kind} {list(self.input_shape)} -> {list(self.output_shape)}>"

    def __copy__(self):
        return self.__deepcopy__({})

    def __deepcopy__(self, memo):
        """A new op with the same settings and solver (the same Python callable or C
        function, not a copy of it), its call count at 0."""
        if self._recipe[0] == "mpi":
            raise TypeError("an op of perturbations.mpi cannot be copied: every rank makes it together")
        op = type(self).__new__(type(self))
        with Config(**self._settings) as cfg:
            op._start(cfg, self.input_shape, self.output_shape, self._recipe)
        memo[id(self)] = op
        return op

    def _rekey_if_forked(self):
        """In a forked child, a fresh C op keyed for this process (see the class docs)."""
        if self._keyed_pid == os.getpid():
            return
        if self._recipe[0] == "mpi":
            raise RuntimeError("an op of perturbations.mpi does not work in a forked child: it is not a rank")
        with _FORK_LOCK:
            if self._keyed_pid == os.getpid():
                return
            settings = dict(self._settings, seed=_mix(self._settings["seed"], _child_key()))
            with Config(**settings) as cfg:
                # the parent's C op is left alone: it is the parent's memory, and one of its
                # threads may have been using it at the fork
                self._h = self._make(cfg)
            pool = getattr(self, "_pool", None)
            if pool is not None:  # (the child's copy of the pool: its additions stay in the child)
                if pool._h:
                    _check(lib.pert_op_set_pool(self._h, pool._h))
                else:  # closed in the parent: the child's op cannot reach it
                    self._pool = None
                    warnings.warn("perturbations: this op's Pool was closed before the fork: in the child the "
                                  "op has no pool (every sample is solved)", RuntimeWarning, stacklevel=3)
            self._lock_, self._owner, self._errors[:] = threading.Lock(), threading.local(), []
            self._interrupt_lock = threading.RLock()
            self._pid = self._keyed_pid = os.getpid()

    def _call(self, fn, *args, work=0, pace=True):
        """Runs fn(handle, *args) as this op's turn (numpy arrays and tensors in args are
        passed as their addresses, and kept alive until the call has ended); `work` is the call's
        perturbed problems (batch x num_samples), for the choice below. Raises the
        solver's exception or the library's error. A call of a built-in expected to take
        long (from this op's earlier calls and its size) and every call of per-worker
        solvers (and of an MPI op's, perturbations.mpi) runs on a helper thread while this
        one waits, so that Ctrl-C interrupts it
        (pert_op_interrupt) within about a block of samples and raises KeyboardInterrupt:
        no code of the caller's runs on that thread (per-worker solvers run on their
        workers anyway). Callbacks run on this thread, as the C API says: Ctrl-C reaches a
        Python solver directly; a C solver's call ends before it is seen."""
        self._rekey_if_forked()
        if getattr(self._owner, "value", False) or _solving(self._errors):
            raise RuntimeError("a solver cannot call its own op (the op runs one call at a time)")
        raw = tuple(address(x) for x in args)
        lock = self._lock
        # who gives the turn back after a long call: whichever of this thread (when it leaves
        # before the helper began) and the helper (when it begins) takes `claim` first; the
        # other leaves the turn alone, with no wait and no timing to get wrong
        claim = threading.Lock()
        long_call = False
        lock.acquire()
        try:
            self._owner.value = True
            self._errors.clear()
            h = self.handle
            start = time.perf_counter()
            long_call = self._long(work)
            if long_call:
                code, message, errors = _run_interruptibly(self, h, fn, raw, args, lock, claim)
            else:
                code = fn(h, *raw)
                message = _last_error() if code else None
                errors = self._errors
            if errors:
                raise errors[0]
            if code:
                raise Error(code, message)
            if work and pace:  # the pace of a perturbed call that ran to its end
                self._seconds_per_row = (time.perf_counter() - start) / work
        finally:
            self._owner.value = False
            # the helper of a long call gives the turn back itself if it began (it may still
            # be starting: an exception can come at any point here); if it had not, it never
            # will, and the turn is this thread's to give back
            if not long_call or claim.acquire(False):
                try:
                    self._errors.clear()
                finally:
                    lock.release()

    def _long(self, work):
        kind = self._recipe[0]
        if kind in ("workers", "mpi"):  # (solves on workers, or on other ranks: Ctrl-C waits for none)
            return bool(work)
        if kind != "builtin" or not work:
            return False
        rate = self._seconds_per_row or 3e-9 * math.prod(self.input_shape)
        return rate * work > _LONG_CALL_SECONDS

    def interrupt(self):
        """Stops the calls running on this op now, from any thread: each raises
        `InterruptedCallError` at its next block of samples, having written nothing
        (Ctrl-C does this for the calling thread's own call, raising KeyboardInterrupt)."""
        with self._interrupt_lock:  # close() frees the handle under it
            h = self._h
            if h:
                lib.pert_op_interrupt(h)

    def close(self):
        """Frees the library's memory now (after the running call); later calls raise
        InvalidArgumentError. A solver cannot close its own op (RuntimeError)."""
        if getattr(self._owner, "value", False) or _solving(self._errors):
            raise RuntimeError("a solver cannot close its own op while the op runs its call")
        with self._lock:
            with self._interrupt_lock:
                h, self._h = self._h, None
        if h:
            type(self)._free(h)

    def _work(self, a):
        return a.shape[0] * self._settings["num_samples"]

    def _theta(self, theta):
        return array_rows(theta, self.input_shape, "theta")

    def forward(self, theta):
        """y_sigma(theta) for theta [*batch, *input_shape]: [*batch, *output_shape]."""
        batch_shape, a, back, room = host_rows(theta, self.input_shape, "theta")
        out = room((a.shape[0],) + self.output_shape)
        self._call(lib.pert_forward, a, a.shape[0], out, None, work=self._work(a))
        return back(out.reshape(batch_shape + self.output_shape))

    def solve(self, x):
        """y*(x): the op's solver on each problem of x [*batch, *input_shape], with no
        noise (its threads and workers, as a forward call's solves): [*batch,
        *output_shape], the same kind of array as x. Draws no noise."""
        batch_shape, flat, back, room = host_rows(x, self.input_shape, "x")
        out = room((flat.shape[0],) + self.output_shape)
        self._call(lib.pert_op_solve, flat, flat.shape[0], out, work=flat.shape[0], pace=False)
        return back(out.reshape(batch_shape + self.output_shape))

    # ---- decision-focused methods over the exact solver (pert_spo_plus, ...) ----------
    # Each takes arrays of shape [*batch, *input_shape] (the others broadcast to the
    # first's shape) and gives results per problem, the same kind of array as the first.

    def _method_args(self, first, what, *others):
        batch_shape, a, back = array_rows(first, self.input_shape, what)
        full = batch_shape + self.input_shape
        rest = [self._broadcast(x, full, name).reshape(a.shape) for x, name in others]
        return batch_shape, a, back, rest

    @staticmethod
    def _broadcast(x, full_shape, what):
        y, _ = as_host(x, what)
        try:
            return np.ascontiguousarray(np.broadcast_to(y, full_shape))
        except ValueError:
            raise InvalidArgumentError(2, f"{what} of shape {list(y.shape)} does not broadcast to the shape "
                                          f"{list(full_shape)}") from None

    def spo_plus(self, pred_cost, true_cost, true_sol, true_obj):
        """The SPO+ loss [*batch] of pred_cost against true_cost, its optimal solutions
        true_sol and objectives true_obj ([*batch] or [*batch, 1], as PyEPO keeps them), and
        its gradient with respect to pred_cost: one solve per problem at 2 pred_cost -
        true_cost (pert_spo_plus; PyEPO's SPOPlus signs per sense)."""
        batch_shape, a, back, (c, w) = self._method_args(pred_cost, "pred_cost", (true_cost, "true_cost"),
                                                         (true_sol, "true_sol"))
        z, _ = as_host(true_obj, "true_obj")
        if z.shape not in (batch_shape, batch_shape + (1,)):
            raise InvalidArgumentError(2, f"true_obj must have shape {list(batch_shape)} or "
                                          f"{list(batch_shape + (1,))} (one objective per problem), got "
                                          f"{list(z.shape)}")
        z = np.ascontiguousarray(z.reshape(a.shape[0]))
        loss = np.empty((a.shape[0],), dtype=np.float32)
        grad = np.empty(a.shape, dtype=np.float32)
        self._call(lib.pert_spo_plus, a, c, w, z, a.shape[0], loss, grad, work=a.shape[0], pace=False)
        return back(loss.reshape(batch_shape)), back(grad.reshape(batch_shape + self.input_shape))

    # ---- solution pools (pert_op_set_pool, pert_nce, ...) ------------------------------

    def set_pool(self, pool):
        """Gives the op a solution pool (None: takes it away; pert_op_set_pool). Its forward
        and Fenchel-Young calls, and I-MLE's and AI-MLE's samples (forward and backward),
        then answer each perturbed sample from the pool with
        probability 1 - solve_ratio (a Config setting; decided by the op's own stream, so
        the same for any number of threads): the pool's solution y of best <x, y> for the
        sample x in the op's sense, exact whenever the pool holds x's optimum; the others are
        solved, and every solve adds its solution to the pool. The objective must be linear:
        a built-in, or a solver declared with Config(linear_objective=True)."""
        if pool is not None and not isinstance(pool, Pool):
            raise TypeError(f"pool must be a perturbations.Pool or None, got {type(pool).__name__}")

        def set_it(h):
            if pool is None:
                return lib.pert_op_set_pool(h, None)
            with pool._lock:  # (after the op's turn: the order every thread takes them in)
                return lib.pert_op_set_pool(h, pool.handle)

        self._call(set_it)
        self._pool = pool

    @property
    def pool(self):
        """The op's solution pool (`set_pool`), or None."""
        return getattr(self, "_pool", None)

    @property
    def solver_calls(self):
        """The rows the op's solver has solved so far (pert_op_solver_calls): perturbed
        samples not answered from a pool, clean-input rows, and plain solves."""
        self._rekey_if_forked()
        rows = ctypes.c_uint64(0)
        with self._interrupt_lock:  # close() frees the handle under it
            _check(lib.pert_op_solver_calls(self.handle, ctypes.byref(rows)))
        return rows.value

    def _pool_loss(self, fn, pred_cost, target, target_name):
        batch_shape, a, back, (t,) = self._method_args(pred_cost, "pred_cost", (target, target_name))
        loss = np.empty((a.shape[0],), dtype=np.float32)
        grad = np.empty(a.shape, dtype=np.float32)
        self._call(fn, a, t, a.shape[0], loss, grad, work=a.shape[0], pace=False)
        return back(loss.reshape(batch_shape)), back(grad.reshape(batch_shape + self.input_shape))

    def nce(self, pred_cost, true_sol):
        """The NCE loss [*batch] of pred_cost against the true solutions over the op's pool,
        and its gradient with respect to pred_cost (pert_nce; PyEPO's NCE): mean over w in
        the pool of s (<pred_cost, true_sol> - <pred_cost, w>), s = +1 minimizing, -1
        maximizing. With probability solve_ratio the batch is solved first (adding to the
        pool)."""
        return self._pool_loss(lib.pert_nce, pred_cost, true_sol, "true_sol")

    def cmap(self, pred_cost, true_sol):
        """The CMAP loss (pert_cmap; PyEPO's CMAP): as `nce` with the largest margin."""
        return self._pool_loss(lib.pert_cmap, pred_cost, true_sol, "true_sol")

    def ltr_pointwise(self, pred_cost, true_cost):
        """The pointwise learning-to-rank loss (pert_ltr_pointwise; PyEPO's pointwiseLTR):
        mean over w in the pool of <true_cost - pred_cost, w>^2."""
        return self._pool_loss(lib.pert_ltr_pointwise, pred_cost, true_cost, "true_cost")

    def ltr_pairwise(self, pred_cost, true_cost):
        """The pairwise learning-to-rank loss (pert_ltr_pairwise; PyEPO's pairwiseLTR):
        hinges of the pool's best solution for true_cost over the others, in pred_cost."""
        return self._pool_loss(lib.pert_ltr_pairwise, pred_cost, true_cost, "true_cost")

    def ltr_listwise(self, pred_cost, true_cost):
        """The listwise learning-to-rank loss (pert_ltr_listwise; PyEPO's listwiseLTR): the
        cross-entropy of the pool's softmax rankings by pred_cost against true_cost's."""
        return self._pool_loss(lib.pert_ltr_listwise, pred_cost, true_cost, "true_cost")

    def blackbox_vjp(self, theta, y, grad_output, lambd):
        """DBB's gradient with respect to theta from y = solve(theta) and the gradient
        with respect to y: s (y*(theta + s lambd grad_output) - y) / lambd, s = +1
        minimizing, -1 maximizing (pert_blackbox_vjp; PyEPO's blackboxOpt)."""
        batch_shape, a, back, (ys, g) = self._method_args(theta, "theta", (y, "y"), (grad_output, "grad_output"))
        out = np.empty(a.shape, dtype=np.float32)
        self._call(lib.pert_blackbox_vjp, a, ys, g, a.shape[0], float(lambd), out, work=a.shape[0], pace=False)
        return back(out.reshape(batch_shape + self.input_shape))

    def negative_identity_vjp(self, grad_output):
        """NID's gradient with respect to theta: -grad_output minimizing, grad_output
        maximizing (pert_negative_identity_vjp; PyEPO's negativeIdentity)."""
        batch_shape, g, back, _ = self._method_args(grad_output, "grad_output")
        out = np.empty(g.shape, dtype=np.float32)
        self._call(lib.pert_negative_identity_vjp, g, g.shape[0], out)
        return back(out.reshape(batch_shape + self.input_shape))

    def perturbation_gradient(self, pred_cost, true_cost, sigma, two_sided=True):
        """The perturbation-gradient loss [*batch] of pred_cost along true_cost and its
        gradient with respect to pred_cost (pert_perturbation_gradient; PyEPO's
        perturbationGradient; central differences when two_sided)."""
        batch_shape, a, back, (c,) = self._method_args(pred_cost, "pred_cost", (true_cost, "true_cost"))
        loss = np.empty((a.shape[0],), dtype=np.float32)
        grad = np.empty(a.shape, dtype=np.float32)
        self._call(lib.pert_perturbation_gradient, a, c, a.shape[0], float(sigma), 1 if two_sided else 0, loss,
                   grad, work=2 * a.shape[0], pace=False)
        return back(loss.reshape(batch_shape)), back(grad.reshape(batch_shape + self.input_shape))

    # ---- I-MLE and AI-MLE (pert_imle_forward, pert_imle_vjp, pert_aimle_vjp) ----------

    def imle_forward(self, theta):
        """I-MLE's forward: y_sigma(theta) [*batch, *input_shape] (the mean over the op's
        samples of y*(theta + sigma Z), from one call's draws, with any of the op's noises,
        Sum-of-Gamma included), and the `ImleRecord` of its perturbed inputs and solutions
        for `imle_vjp` / `aimle_vjp` on this op."""
        batch_shape, a, back = self._theta(theta)
        out = np.empty(a.shape, dtype=np.float32)
        h = P()
        self._call(lib.pert_imle_forward, a, a.shape[0], out, ctypes.byref(h), work=self._work(a))
        return back(out.reshape(batch_shape + self.input_shape)), ImleRecord(h, self, batch_shape)

    def _record_grad(self, record, grad_output):
        if not isinstance(record, ImleRecord):
            raise TypeError(f"record must be an ImleRecord (from imle_forward), got {type(record).__name__}")
        full = record.batch_shape + self.input_shape
        g, back = as_host(grad_output, "grad_output")
        if tuple(g.shape) != full:
            raise InvalidArgumentError(2, f"grad_output must have shape {list(full)}, got {list(g.shape)}")
        return np.ascontiguousarray(g.reshape((-1,) + self.input_shape)), back

    def imle_vjp(self, record, grad_output, lambd, two_sided=False):
        """I-MLE's gradient with respect to theta from the forward's record and the
        gradient with respect to y_sigma(theta): s mean_k (y*(x_k + s lambd g) - y*(x_k)) /
        lambd (s = +1 minimizing, -1 maximizing), or the central difference when
        two_sided (pert_imle_vjp; PyEPO's implicitMLE)."""
        g, back = self._record_grad(record, grad_output)
        out = np.empty(g.shape, dtype=np.float32)
        with record._lock:
            self._call(lib.pert_imle_vjp, record.handle, g, float(lambd), 1 if two_sided else 0, out,
                       work=g.shape[0] * record.samples, pace=False)
        return back(out.reshape(record.batch_shape + self.input_shape))

    def aimle_vjp(self, record, grad_output, state, two_sided=False):
        """AI-MLE's gradient: `imle_vjp` with lambda = state.alpha |theta| / |g|, then
        `state` (an `AimleState`) updated (pert_aimle_vjp; PyEPO's adaptiveImplicitMLE)."""
        if not isinstance(state, AimleState):
            raise TypeError(f"state must be a perturbations.AimleState, got {type(state).__name__}")
        g, back = self._record_grad(record, grad_output)
        out = np.empty(g.shape, dtype=np.float32)
        with record._lock:
            self._call(lib.pert_aimle_vjp, record.handle, g, 1 if two_sided else 0, ctypes.addressof(state), out,
                       work=g.shape[0] * record.samples, pace=False)
        return back(out.reshape(record.batch_shape + self.input_shape))

    def forward_with_tape(self, theta):
        """y_sigma(theta) and the Tape of the call."""
        batch_shape, a, back, room = host_rows(theta, self.input_shape, "theta")
        out = room((a.shape[0],) + self.output_shape)
        t = P()
        self._call(lib.pert_forward, a, a.shape[0], out, ctypes.byref(t), work=self._work(a))
        return back(out.reshape(batch_shape + self.output_shape)), \
            Tape(t, self.input_shape, self.output_shape, batch_shape, back, room)

    def _targets(self, y_true, full_shape):
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(y_true, torch.Tensor) and y_true.dim() <= len(full_shape):
            try:  # (a tensor that broadcasts: the copy below when it is not plain already)
                y = y_true.detach().expand(full_shape)
            except RuntimeError:
                pass
            else:
                _, rows, _, _ = host_rows(y if y.is_contiguous() else y.contiguous(), (), "y_true")
                return rows.reshape(full_shape)
        y, _ = as_host(y_true, "y_true")
        try:
            return np.ascontiguousarray(np.broadcast_to(y, full_shape))
        except ValueError:
            raise InvalidArgumentError(2, f"y_true of shape {list(y.shape)} does not broadcast to theta's shape "
                                          f"{list(full_shape)}") from None

    def fenchel_young(self, theta, y_true):
        """The Fenchel-Young loss [*batch] of theta against y_true (any array that
        broadcasts to theta's shape), and its gradient with respect to theta
        (y_sigma(theta) - y_true when maximizing, the negation when minimizing), from one
        call's draws."""
        batch_shape, a, back, room = host_rows(theta, self.input_shape, "theta")
        y = self._targets(y_true, batch_shape + self.input_shape).reshape(a.shape)
        loss = room((a.shape[0],))
        grad = room(a.shape)
        bound = room((a.shape[0],))
        self._call(lib.pert_fenchel_young_with_bound, a, y, a.shape[0], loss, grad, bound,
                   work=self._work(a))
        _check_sense(loss, bound, self.sense, True)
        return back(loss.reshape(batch_shape)), back(grad.reshape(batch_shape + self.input_shape))

    def draw(self, theta):
        """The two-phase API: a Draw of the perturbed inputs of one call."""
        return Draw(self, theta)


_FORK_LOCK = threading.Lock()
_LONG_CALL_SECONDS = 0.02


def _check_sense(loss, bound, sense, solved_by_op):
    """Warns (SenseWarning) when a problem's Fenchel-Young loss is below the bound its own
    draws give for exact solutions and a feasible target (the library's bound allows for
    rounding already). The message stays the same from call to call, so that Python's
    warning filters show it once per place; the instance carries `problems`, `loss` and
    `bound`."""
    below = loss < bound
    if not below.any():
        return
    loss, bound, below = np.asarray(loss), np.asarray(bound), np.asarray(below)
    other = "minimize" if sense == "maximize" else "maximize"
    exact = "an exact solver" if solved_by_op else "optimal solutions"
    cause = "the solver is not exact" if solved_by_op else "the solutions are not optimal"
    warning = SenseWarning(
        f"perturbations: a Fenchel-Young loss is below the lower bound that its call's own draws give for "
        f"{exact} and a feasible target. The op's sense is {sense!r}: if the problems are to be {other}d, make "
        f"the Config with sense={other!r}; else {cause}, or y_true is not a feasible solution.")
    warning.problems = np.flatnonzero(below)
    warning.loss, warning.bound = loss[below], bound[below]
    warnings.warn(warning, stacklevel=3)


def _run_interruptibly(op, h, fn, raw, keep, lock, claim):
    """(status, message, solver exceptions) of fn(h, *raw) run on a helper thread, all
    read there, before the turn is given back. The helper owns the op's turn from when it
    takes `claim` (if the caller, leaving early, took it first, the helper runs nothing:
    the caller gave the turn back): it releases `lock` when the call has ended, and `keep` (the caller's
    buffers) and `op` (whose handle the call uses) live until then, so that whatever
    leaves this function early leaves nothing in use behind. This thread waits for the
    call; the first exception raised here meanwhile (a KeyboardInterrupt of Ctrl-C, or
    what another signal handler raises) interrupts the op's calls, again every 5 ms until
    this one has ended (it may not have started yet), and is raised after."""
    # the checks the library makes of the calling thread (a CUDA graph capture, another
    # library's CUDA context current), made here: the helper thread is not this one
    cuda = _cuda_index(op)
    if cuda is not None:
        from . import cuda_check_thread
        cuda_check_thread(cuda)
    box = {}
    done = threading.Lock()  # held while the call runs: released by the helper at its end
    done.acquire()
    streams = _current_cuda_streams()

    def run():
        if not claim.acquire(False):
            return  # the caller left before this thread began, and gave the turn back
        try:
            _set_cuda_streams(streams)
            code = fn(h, *raw)
            box["result"] = (code, _last_error() if code else None, list(op._errors))
        except BaseException as e:  # noqa: BLE001 - raised on the calling thread
            box["error"] = e
        finally:
            op._errors.clear()
            # the call has returned: the caller interrupts the op no more (another thread's
            # call, which may take the turn below, is not this one's to stop)
            box["returned"] = True
            # the turn first: the caller, once it sees the call finished, may raise and
            # its caller take the turn at once (an exception that waited for the call)
            lock.release()
            box["finished"] = keep is not None  # (keep referenced until the call has ended)
            done.release()

    _thread.start_new_thread(run, ())
    pending = None
    while "finished" not in box:
        # (the inner loop's test and back-edge inside the try as well: an exception raised
        # there cannot leave while the call still reads the caller's buffers)
        try:
            while "finished" not in box:
                try:
                    if pending is not None and "returned" not in box:
                        op.interrupt()
                    if done.acquire(timeout=-1 if pending is None else 0.005):
                        done.release()
                except BaseException as e:  # noqa: BLE001 - kept until the call has ended
                    if pending is None:
                        pending = e
        except BaseException as e:  # noqa: BLE001 - as above
            if pending is None:
                pending = e
    if pending is not None:
        raise pending
    if "error" in box:
        raise box["error"]
    return box["result"]


def _cuda_index(op):
    """The CUDA device a long call of `op` computes on (None for an op on the CPU): "cuda"
    or "cuda:N" ops; and "auto" built-ins where torch has started CUDA in this process,
    which go to CUDA device 0 when there is one (a long call of theirs is usually not one
    of the small calls that run on the CPU, but may be: such a call is then refused under
    a capture or another context, as one on CUDA would be)."""
    device = str(op._settings.get("device", "auto"))
    if device.startswith("cuda"):
        return int(device.split(":", 1)[1]) if ":" in device else 0
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    if device == "auto" and op._recipe[0] == "builtin" and lib.pert_cuda_device_count() > 0:
        return 0
    return None


def _current_cuda_streams():
    """This thread's current CUDA streams other than the default ones, where torch has
    started CUDA (else none): a call run on a helper thread runs on the caller's streams, as
    it would here (and is refused as it would be here while one of them captures a CUDA
    graph). Default streams are left out: the helper's are those, and setting one would
    start CUDA on its device."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return ()
    streams = (torch.cuda.current_stream(i) for i in range(torch.cuda.device_count()))
    # (the legacy stream's handles, 0 and 0x1, and the per-thread default stream, 0x2, which
    # on the helper would be the helper's own: there the legacy stream, which is ordered
    # with every thread's per-thread default stream, stands for them)
    return tuple(s for s in streams if s.cuda_stream not in (0, 1, 2))


def _set_cuda_streams(streams):
    """Makes `streams` (from _current_cuda_streams) this thread's current ones."""
    for stream in streams:
        sys.modules["torch"].cuda.set_stream(stream)


def _after_fork_in_child():
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ImleRecord(_Handle):
    """The record of an I-MLE forward call (`Op.imle_forward`): its perturbed inputs and
    their solutions, for `Op.imle_vjp` and `Op.aimle_vjp` on the same op."""

    _free = staticmethod(lambda h: lib.pert_imle_free(h))

    def __init__(self, h, op, batch_shape):
        super().__init__(h)
        self.batch_shape = batch_shape
        self.samples = op._settings["num_samples"]


class AimleState(ctypes.Structure):
    """The state of AI-MLE's adaptive step (pert_aimle_state): alpha (1), grad_norm_avg (1)
    and step (0.001); `Op.aimle_vjp` updates it (only when it succeeds). Keep one per layer;
    two calls must not update one state at once (from two threads)."""

    _fields_ = [("alpha", ctypes.c_double), ("grad_norm_avg", ctypes.c_double), ("step", ctypes.c_double)]

    def __init__(self, alpha=1.0, grad_norm_avg=1.0, step=1e-3):
        super().__init__(float(alpha), float(grad_norm_avg), float(step))

    def __repr__(self):
        return f"AimleState(alpha={self.alpha!r}, grad_norm_avg={self.grad_norm_avg!r}, step={self.step!r})"


class Draw(_Handle):
    """The perturbed inputs of one call (`inputs()`, [count, *input_shape]); solve them
    anywhere and `finish(solutions)` gives y_sigma(theta) and a tape."""

    _free = staticmethod(lambda h: lib.pert_draw_free(h))

    def __init__(self, op, theta):
        self.batch_shape, a, self._back = op._theta(theta)
        self.op, self.batch = op, a.shape[0]
        h = P()
        op._call(lib.pert_draw_new, a, a.shape[0], ctypes.byref(h))  # takes its turn
        super().__init__(h)

    def inputs(self):
        """A copy of the perturbed inputs, [count, *input_shape]."""
        with self._lock:
            count = lib.pert_draw_count(self.handle)
            p = lib.pert_draw_inputs(self.handle)
            n = count * math.prod(self.op.input_shape)
            return np.ctypeslib.as_array(p, shape=(n,)).reshape((count,) + self.op.input_shape).copy()

    def _solutions(self, solutions):
        s, _ = as_host(solutions, "solutions")
        count = lib.pert_draw_count(self.handle)
        if s.shape != (count,) + self.op.output_shape:
            raise InvalidArgumentError(2, f"solutions must have shape {[count, *self.op.output_shape]}, "
                                          f"got {list(s.shape)}")
        return s

    def finish(self, solutions):
        """y_sigma(theta) and the Tape, from the solutions of every row of inputs()."""
        with self._lock:
            s = self._solutions(solutions)
            out = np.empty((self.batch,) + self.op.output_shape, dtype=np.float32)
            t = P()
            _check(lib.pert_draw_finish(self.handle, ptr(s), ptr(out), ctypes.byref(t)))
        return self._back(out.reshape(self.batch_shape + self.op.output_shape)), \
            Tape(t, self.op.input_shape, self.op.output_shape, self.batch_shape, self._back)

    def fenchel_young(self, solutions, y_true):
        """The Fenchel-Young loss [*batch] of the draw's theta against y_true (broadcast to
        theta's shape) and its gradient with respect to theta, from the solutions of every
        row of inputs() (what Op.fenchel_young gives for the same seed and call count)."""
        full = (self.batch,) + self.op.input_shape
        y = self.op._targets(y_true, self.batch_shape + self.op.input_shape).reshape(full)
        with self._lock:
            s = self._solutions(solutions)
            loss = np.empty((self.batch,), dtype=np.float32)
            grad = np.empty(full, dtype=np.float32)
            bound = np.empty((self.batch,), dtype=np.float32)
            _check(lib.pert_draw_fenchel_young_with_bound(self.handle, address(s), address(y), address(loss),
                                                          address(grad), address(bound)))
        _check_sense(loss, bound, self.op.sense, False)
        return self._back(loss.reshape(self.batch_shape)), \
            self._back(grad.reshape(self.batch_shape + self.op.input_shape))
