"""Arrays in and out: numpy arrays, array-likes or torch tensors in; results of the same
kind (numpy, or a tensor on the input's device), in the input's floating dtype (float32
for integer and boolean inputs)."""

import math
import sys

import numpy as np

from .errors import InvalidArgumentError


def _functorch_wrapped(torch, x):
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(x)
    except AttributeError:  # pragma: no cover - older torch
        return False


def as_host(x, what):
    """(a float32, C-contiguous, aligned numpy array of x's values, back), where back(r)
    turns a float32 result into the caller's kind: a tensor on x's device and dtype, or a
    numpy array of x's floating dtype."""
    torch = sys.modules.get("torch")  # a tensor can only come from an imported torch
    if torch is not None and isinstance(x, torch.Tensor):
        if _functorch_wrapped(torch, x):
            raise InvalidArgumentError(2, f"{what} is a tensor of a torch.func transform (vmap, grad, jvp): "
                                          "the Op's own methods, the decision-focused methods (spo_plus, "
                                          "blackbox, ...) and the pool losses take plain tensors; "
                                          "perturbations.torch.perturbed / fenchel_young (and the modules "
                                          "Perturbed / FenchelYoungLoss) support the transforms")
        if x.dtype.is_complex:
            raise InvalidArgumentError(2, f"{what} must hold real numbers, got a tensor of {x.dtype}")
        device = x.device
        if device.type == "cuda":
            # refused here, as the library would refuse the call (a CUDA graph capture on
            # the current stream, another library's CUDA context current), before any CUDA
            # work of this package's (the copy below would fail in the capture, or run in
            # the wrong context)
            from . import cuda_check_thread
            cuda_check_thread(device.index)  # (a CUDA tensor's device has its index)
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        x = x.detach().resolve_neg()  # (a negative view's values, not its memory's)
        if x.dtype == torch.float32 and device.type == "cpu":
            # the common case: the tensor's own memory (or a contiguous copy), no conversion back
            host = (x if x.is_contiguous() else x.contiguous()).numpy()
            if host.ctypes.data % 4 == 0:
                return host, torch.from_numpy
        host = np.require(x.to("cpu", torch.float32).contiguous().numpy(), np.float32, ["C", "A"])

        def back(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        return host, back
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise InvalidArgumentError(2, f"{what} must hold numbers, got an array of {a.dtype}")
    dtype = a.dtype if a.dtype.kind == "f" else np.dtype(np.float32)
    host = np.require(a, np.float32, ["C", "A"])  # a view at an odd offset is copied
    if dtype == np.float32:
        return host, (lambda r: r)
    return host, (lambda r: r.astype(dtype))


def _plain_tensor(torch, x):
    """x detached when the library can read and write it where it is: a strided CPU float32
    tensor, C-contiguous at an aligned address, that no torch.func transform wraps and
    that is not a negative view (torch._neg_view: its memory holds -x); else None."""
    if (x.dtype is not torch.float32 or x.device.type != "cpu" or x.layout is not torch.strided
            or _functorch_wrapped(torch, x) or x.is_neg() or not x.is_contiguous()):
        return None
    try:
        at = x.data_ptr()
    except RuntimeError:  # (a tensor without storage: as_host says what it is)
        return None
    if at % 4 or (at == 0 and x.numel()):  # (a wrapper subclass or a zero tensor holds no data)
        return None
    return x.detach()


def _same(r):
    return r


def _tensor_room(shape):
    # (on the CPU whatever torch's default device: the library writes it from the host)
    return sys.modules["torch"].empty(shape, dtype=sys.modules["torch"].float32, device="cpu")


def _array_room(shape):
    return np.empty(shape, dtype=np.float32)


def host_rows(x, inner, what):
    """(batch_shape, rows, back, room) for x of shape [*batch_shape, *inner]: rows holds x's
    values as float32 [batch, *inner], C-contiguous on the host; room(shape) makes a
    float32 result of the same kind as rows, and back(r) turns such a result into the
    caller's kind (as_host's). A contiguous CPU float32 tensor is used as it is: rows is a
    view of it, results are tensors made by room, and back gives them as they are (no
    numpy array in between)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t = _plain_tensor(torch, x)
        if t is not None:
            batch_shape, flat = split_batch(t, inner, what)
            return batch_shape, flat, _same, _tensor_room
    return array_rows(x, inner, what) + (_array_room,)


def array_rows(x, inner, what):
    """(batch_shape, rows, back) for x of shape [*batch_shape, *inner]: rows a float32
    C-contiguous numpy array [batch, *inner] of x's values, back as as_host's."""
    a, back = as_host(x, what)
    batch_shape, flat = split_batch(a, inner, what)
    return batch_shape, np.ascontiguousarray(flat), back


def split_batch(a, inner, what):
    """(batch_shape, a viewed as [batch, *inner]) for a of shape [*batch_shape, *inner]."""
    k = len(inner)
    if a.ndim < k or tuple(a.shape[a.ndim - k:]) != tuple(inner):
        want = ", ".join(["*batch"] + [str(s) for s in inner])
        raise InvalidArgumentError(2, f"{what} must have shape [{want}], got {list(a.shape)}")
    batch_shape = tuple(a.shape[:a.ndim - k])
    return batch_shape, a.reshape((math.prod(batch_shape),) + tuple(inner))


def shape_of(shape, what):
    """A shape given as an int or a sequence of ints, as a tuple."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InvalidArgumentError(2, f"{what} must be an int or a sequence of ints, got {shape!r}") from None
    if any(s != t for s, t in zip(out, shape)):
        raise InvalidArgumentError(2, f"{what} must hold ints, got {shape!r}")
    return out


def address(x):
    """The address of a numpy array's or a tensor's data, for the library's pointer
    arguments (None when empty); anything else as it is."""
    if isinstance(x, np.ndarray):
        return ptr(x)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.data_ptr() if x.numel() else None
    return x


def ptr(a):
    """The address of a's data (the library's float pointers are declared void pointers,
    which take addresses as ints: no ctypes object per argument), or None when empty."""
    return a.ctypes.data if a.size else None
