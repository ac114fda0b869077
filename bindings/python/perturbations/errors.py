"""The exceptions of the package: one class per status of the C library.

`Error` is the base (`.code`, the status number; `.status`, its name; `.message`). Each
status has its own subclass; the statuses of a wrong argument (NULL, out of range,
NaN or infinite input) are also `ValueError`, the others `RuntimeError`. A mistake caught
by the Python layer raises the class the library would have raised for it, so that
`except ValueError` (or `except pt.InvalidArgumentError`) catches it either way.
"""

__all__ = [
    "Error", "NullArgumentError", "InvalidArgumentError", "NonFiniteInputError", "SolverFailedError",
    "DeviceUnavailableError", "TorchError", "PanicError", "InterruptedCallError", "SenseWarning",
]

_NAMES = {
    0: "PERT_STATUS_OK",
    1: "PERT_STATUS_NULL_ARGUMENT",
    2: "PERT_STATUS_INVALID_ARGUMENT",
    3: "PERT_STATUS_NON_FINITE_INPUT",
    4: "PERT_STATUS_SOLVER_FAILED",
    5: "PERT_STATUS_DEVICE_UNAVAILABLE",
    6: "PERT_STATUS_TORCH_ERROR",
    7: "PERT_STATUS_PANIC",
    8: "PERT_STATUS_INTERRUPTED",
}


class Error(Exception):
    """An error of the library: `.code` (the `pert_status` number), `.status` (its name,
    e.g. "PERT_STATUS_INVALID_ARGUMENT") and `.message`. `Error(code, message)` gives the
    subclass of that status."""

    code = None

    def __new__(cls, code=None, message=""):
        if cls is Error and code in _BY_CODE:
            cls = _BY_CODE[code]
        return super().__new__(cls)

    def __init__(self, code=None, message=""):
        if code is None:
            code = type(self).code
        self.code = code
        self.status = _NAMES.get(code, "PERT_STATUS_UNKNOWN")
        self.message = message
        super().__init__(f"{self.status}: {message}")

    def __reduce__(self):
        return (Error, (self.code, self.message))


class NullArgumentError(Error, ValueError):
    """A required argument was missing (PERT_STATUS_NULL_ARGUMENT)."""
    code = 1


class InvalidArgumentError(Error, ValueError):
    """An argument was out of its range, of the wrong shape, or settings did not go
    together (PERT_STATUS_INVALID_ARGUMENT)."""
    code = 2


class NonFiniteInputError(Error, ValueError):
    """An input held NaN or an infinity (PERT_STATUS_NON_FINITE_INPUT)."""
    code = 3


class SolverFailedError(Error, RuntimeError):
    """The solver failed: a C solver returned non-zero, or a solver's output was missing,
    of the wrong shape or not finite (PERT_STATUS_SOLVER_FAILED)."""
    code = 4


class DeviceUnavailableError(Error, RuntimeError):
    """The device asked for does not exist here, or cannot be used by this call now: a
    process forked after CUDA started, a CUDA graph capture on the current stream, or a CUDA
    context other than a primary one current on the thread (PERT_STATUS_DEVICE_UNAVAILABLE)."""
    code = 5


class TorchError(Error, RuntimeError):
    """libtorch failed, or memory ran out (PERT_STATUS_TORCH_ERROR)."""
    code = 6


class PanicError(Error, RuntimeError):
    """An internal error of the library was caught; the library stays usable
    (PERT_STATUS_PANIC)."""
    code = 7


class InterruptedCallError(Error, RuntimeError):
    """The call was interrupted by `Op.interrupt()` from another thread
    (PERT_STATUS_INTERRUPTED); a Ctrl-C during a call raises `KeyboardInterrupt` itself."""
    code = 8


_BY_CODE = {c.code: c for c in (NullArgumentError, InvalidArgumentError, NonFiniteInputError, SolverFailedError,
                                DeviceUnavailableError, TorchError, PanicError, InterruptedCallError)}


class SenseWarning(RuntimeWarning):
    """A Fenchel-Young loss fell below the lower bound that the call's own draws give for
    an exact solver and a feasible target: the sense is likely wrong (a minimizing solver
    with sense="maximize", or the reverse), or the solver is not exact, or the target is
    not feasible."""


def _last_error():
    import ctypes

    from ._native import lib
    n = lib.pert_last_error(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.pert_last_error(buf, n + 1)
    return buf.value.decode(errors="replace")


def _check(code):
    """Raises the error of a failed library call (its message is this thread's last)."""
    if code != 0:
        raise Error(code, _last_error())
