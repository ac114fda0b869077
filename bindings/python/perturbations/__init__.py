"""Differentiable perturbed optimizers (Berthet et al., NeurIPS 2020) over the C API of
libperturbations, in Python (ctypes).

    import perturbations as pt
    cfg = pt.Config(num_samples=10000, sigma=0.5, noise="gumbel", seed=3, device="cpu")
    op = pt.Op(cfg, 5, 5, solver)                # solver(x: [count, 5]) -> [count, 5]
    op = pt.Op.builtin(cfg, "argmax", 5)         # "argmax" | "topk" (k=...) | "ranks"
    y = op.forward(theta)                        # numpy or torch, [*batch, 5] -> same kind
    y, tape = op.forward_with_tape(theta); g = tape.vjp(grad_y)
    loss, grad = op.fenchel_young(theta, y_true)

For PyTorch: `perturbations.torch` (autograd, the modules `Perturbed` and
`FenchelYoungLoss`, torch.func and torch.compile support).

The library is the one `pip install` bundled with the package, or `PERTURBATIONS_LIB` (a
path) when set (see `library_path`). Errors raise subclasses of `Error`, one per status;
wrong arguments are also `ValueError`, the rest `RuntimeError`. Handles own library
memory: `close()` or `with` frees it at once, garbage collection otherwise.
"""

import sys

from . import _native
from ._native import library_path as _library_path
from .config import Config
from .errors import (DeviceUnavailableError, Error, InterruptedCallError, InvalidArgumentError,
                     NonFiniteInputError, NullArgumentError, PanicError, SenseWarning, SolverFailedError,
                     TorchError)
from .op import AimleState, Draw, ImleRecord, Op, Pool, SolveInfo, Tape

__all__ = ["Config", "Op", "Tape", "Draw", "SolveInfo", "ImleRecord", "AimleState", "Pool", "Error", "NullArgumentError", "InvalidArgumentError",
           "NonFiniteInputError", "SolverFailedError", "DeviceUnavailableError", "TorchError", "PanicError",
           "InterruptedCallError", "SenseWarning", "library_path", "version", "device_report",
           "cuda_check_thread"]
__version__ = "0.1.0"
LIBRARY_VERSION = _native.LIBRARY_VERSION


def library_path():
    """The path of the library this package loaded."""
    return _native.path


def version():
    """The library's version string."""
    return _native.lib.pert_version().decode()


def cuda_check_thread(device):
    """Raises DeviceUnavailableError unless a call on CUDA device `device` (an index) can run
    on this thread now (pert_cuda_check_thread): the device exists, this is not a child
    forked after CUDA started, torch's current stream of it on this thread is not capturing
    a CUDA graph, and no CUDA context other than a device's primary one (PyCUDA's, a torch
    green context) is current here. The package
    checks this itself before it copies a CUDA tensor to the host for a call."""
    from .errors import DeviceUnavailableError, InvalidArgumentError, _check
    device = int(device)
    if device < -2**31:
        raise InvalidArgumentError(2, f"device must be a CUDA device index >= 0, got {device}")
    if device >= 2**31:  # (as the library says of any index beyond its devices)
        raise DeviceUnavailableError(5, f"CUDA device {device} does not exist")
    torch = sys.modules.get("torch")
    if device >= 0 and torch is not None and torch.cuda._is_in_bad_fork():
        # (torch started CUDA in the parent; the library knows of forks after its own start)
        raise DeviceUnavailableError(5, "this process was forked from one that had started CUDA, and CUDA "
                                        "cannot be used in such a child (make CUDA ops and tensors in the "
                                        "child, or start it with spawn)")
    _check(_native.lib.pert_cuda_check_thread(device))


def device_report():
    """What this process found of CUDA and how each device draws its noise
    (pert_device_report), one `name: value` line per item: the CUDA driver and runtime, the
    devices libtorch sees (and why fewer than the driver), NVRTC, and for each CUDA device
    `fused kernel` or `libtorch operations (the slow path)` and why. Where the fused kernel
    is unavailable the library also says so once on stderr, unless PERTURBATIONS_QUIET=1."""
    import ctypes
    from .errors import _check
    size = ctypes.c_size_t(0)
    _check(_native.lib.pert_device_report(None, ctypes.byref(size)))
    while True:
        room = size.value + 1
        buf = ctypes.create_string_buffer(room)
        size = ctypes.c_size_t(room)
        _check(_native.lib.pert_device_report(buf, ctypes.byref(size)))
        if size.value < room:
            return buf.value.decode(errors="replace")


del _library_path
