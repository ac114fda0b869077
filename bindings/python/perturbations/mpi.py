"""Solves spread over an MPI job, with mpi4py: the MPI component (bindings/mpi) from Python.

Every rank of the communicator makes the op together; root trains with it (an ordinary
`perturbations.Op`: forward, tapes, Fenchel-Young, `perturbations.torch`), the other ranks
lend it their solvers until root closes it:

    from mpi4py import MPI              # MPI_THREAD_MULTIPLE by default: enough
    import perturbations as pt
    import perturbations.mpi

    cfg = pt.Config(num_samples=100, sigma=0.5, threads=2)   # threads: workers per rank
    op = perturbations.mpi.op(cfg, 24, 24, make_solver, MPI.COMM_WORLD, root=0)
    if MPI.COMM_WORLD.rank == 0:
        ...                             # train with op
        op.close()                      # ends the service on every rank
    else:
        perturbations.mpi.serve(op)
        op.close()

`make_solver(worker)` runs on each worker thread of each rank and returns that worker's
solver, called as for `Op.with_workers` (one with a parameter `info` gets a `SolveInfo`
whose rows are root's call's: global problems and samples). Results are bit for bit those
of the same op in one process. A solver's exception on any rank fails root's call with
`SolverFailedError` naming the rank and the exception; a rank that does not answer within
the config's `remote_timeout` (seconds) fails it naming the rank. Ctrl-C on root
interrupts a call once the solves of the chunk being spread have returned (a solver call
is never cut short) and raises KeyboardInterrupt. Close the op before the interpreter
exits (mpi4py finalizes MPI at exit).

The component is compiled against your MPI (`make mpi` in the repository): its library is
`PERTURBATIONS_MPI_LIB` when set, else `libperturbations_mpi.so` beside the library this
package loaded, or in the repository's target/release. The library must be the same one
this package loaded (the component then uses it: one library in the process).
"""

import ctypes
import os
import threading

from . import _native
from ._arrays import shape_of
from ._native import P
from .config import Config
from .errors import _check
from .op import Op

_NAME = "libperturbations_mpi.so"
_LOCK = threading.Lock()
_COMPONENT = None


def component_path():
    """The component's library: `PERTURBATIONS_MPI_LIB`, beside the loaded library, or in
    the repository's build folder."""
    env = os.environ.get("PERTURBATIONS_MPI_LIB")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(_native.path)) if os.sep in _native.path else ""
    checkout = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "target", "release"))
    for folder in (here, checkout):
        if folder and os.path.isfile(os.path.join(folder, _NAME)):
            return os.path.join(folder, _NAME)
    raise FileNotFoundError(f"{_NAME} not found: build it with `make mpi` in the perturbations repository "
                            f"(with your MPI) and set PERTURBATIONS_MPI_LIB to its path")


def component():
    """The component's library, loaded once (ctypes releases the GIL during its calls)."""
    global _COMPONENT
    with _LOCK:
        if _COMPONENT is None:
            c = ctypes.CDLL(component_path(), mode=ctypes.RTLD_GLOBAL)
            c.pert_mpi_op_new_f.argtypes = [P, P, ctypes.c_size_t, P, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                            P, P, P, P, ctypes.POINTER(P)]
            c.pert_mpi_op_new_f.restype = ctypes.c_uint32
            c.pert_mpi_serve.argtypes = [P]
            c.pert_mpi_serve.restype = ctypes.c_uint32
            _COMPONENT = c
        return _COMPONENT


def op(config, input_shape, output_shape, make_solver, comm=None, root=0, *, writes_out=None):
    """Collective: the op of every rank of `comm` (an mpi4py communicator; default
    COMM_WORLD), whose solves are spread over the ranks (see the module's documentation).
    On root an ordinary `Op`; on the others the handle for `serve`."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a perturbations.Config, got {type(config).__name__}")
    if not callable(make_solver):
        raise TypeError("make_solver must be callable: make_solver(worker) -> solver")
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    result = Op.__new__(Op)
    result._start(config, shape_of(input_shape, "input_shape"), shape_of(output_shape, "output_shape"),
                  ("mpi", make_solver, writes_out, int(comm.py2f()), int(root)))
    return result


def serve(op):
    """On a rank other than root: solves root's blocks until root closes its op (at once
    when called again after that). The service cannot be left before: Ctrl-C on a serving
    rank is raised once root has closed its op (end the job from root, or kill it)."""
    if not isinstance(op, Op) or op._recipe[0] != "mpi":
        raise TypeError("serve takes an op of perturbations.mpi.op")
    try:
        _check(component().pert_mpi_serve(op._h))
    finally:
        op._errors.clear()  # (a solver's exception went to root)
