//! libtorch's current CUDA stream, which the library's own CUDA work (the fused noise
//! kernel) is ordered on, as libtorch orders its operations: no device-wide
//! synchronization, so a call waits for nothing but its own stream's earlier work, and the
//! rest of the process (other streams, other threads) runs on.
//!
//! libtorch gives its current stream only through C++ (`c10::cuda::getCurrentCUDAStream`
//! and `c10::cuda::CUDAStream::stream`, in libc10_cuda.so). This module calls those two
//! functions by their symbols, with the C layout of their types in libtorch 2.11 (the
//! version this crate is built for; `tests/c/test_c10_stream_abi.cpp` compiles libtorch's
//! own header against this layout and checks the symbols). Where they are not found, the
//! kernel falls back to the legacy default stream with device synchronizations around it.
//!
//! The call goes through a C++ shim (src/cuda_stream_shim.cpp) that catches libtorch's
//! exceptions, which must not unwind into Rust.
//!
//! A stream capturing a CUDA graph is refused before anything is enqueued on it (a call
//! reads results on the host and calls host solvers, which a graph cannot hold), and so is
//! a thread where another library made its own CUDA context current ([`check_usable`]).

use crate::cuda_libraries::symbol;
use crate::error::{Error, Result, Status};
use once_cell::race::OnceBox;
use std::ffi::{c_int, c_void};
use tch::Device;

/// A `cudaStream_t` / `CUstream` (NULL: the legacy default stream).
pub(crate) type CuStream = *mut c_void;

/// `c10::cuda::CUDAStream` as C sees it: a `c10::Stream`, that is a `c10::Device`
/// (`DeviceType`, `DeviceIndex`: two int8) and a `StreamId` (int64). Trivially copyable
/// and 16 bytes, so returned by value in two registers, as this C struct is.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct C10Stream {
    device_type: i8,
    device_index: i8,
    id: i64,
}

/// `c10::cuda::getCurrentCUDAStream(DeviceIndex)`, mangled.
pub(crate) const CURRENT_STREAM_SYMBOL: &std::ffi::CStr = c"_ZN3c104cuda20getCurrentCUDAStreamEa";
/// `c10::cuda::CUDAStream::stream() const`, mangled.
pub(crate) const STREAM_HANDLE_SYMBOL: &std::ffi::CStr = c"_ZNK3c104cuda10CUDAStream6streamEv";

/// libtorch's two stream functions, and the driver's.
struct Functions {
    current: unsafe extern "C" fn(i8) -> C10Stream,
    handle: unsafe extern "C" fn(*const C10Stream) -> CuStream,
    driver: &'static crate::cuda_libraries::DriverApi,
}

// SAFETY: plain function pointers.
unsafe impl Send for Functions {}
unsafe impl Sync for Functions {}

extern "C" {
    /// src/cuda_stream_shim.cpp: `handle(&current(index))` with libtorch's exceptions
    /// caught (1: it threw). (Not in the C header: cbindgen.toml excludes it.)
    fn perturbations_shim_current_stream(
        current: unsafe extern "C" fn(i8) -> C10Stream,
        handle: unsafe extern "C" fn(*const C10Stream) -> CuStream,
        index: i8,
        out: *mut CuStream,
    ) -> c_int;
}

/// The functions, once libc10_cuda.so is loaded (None before, and asked again then, as
/// libtorch_cuda may be loaded later; once it is loaded, the answer is kept, a symbol
/// missing included: the look-up is not repeated on every call).
fn functions() -> Option<&'static Functions> {
    // (no lock, as the library's other look-ups: a child forked during another thread's
    // look-up never waits)
    static FUNCTIONS: OnceBox<Option<Functions>> = OnceBox::new();
    if let Some(f) = FUNCTIONS.get() {
        return f.as_ref();
    }
    // SAFETY: dlopen only finds a library already loaded (libtorch_cuda's dependency);
    // handles are never closed. libtorch's symbols have these C signatures, by the layout
    // above (the member function takes `this` first).
    let c10 = unsafe {
        libc::dlopen(
            c"libc10_cuda.so".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_NOLOAD,
        )
    };
    if c10.is_null() {
        return None;
    }
    // SAFETY: as above.
    let found = unsafe {
        (|| {
            Some(Functions {
                current: symbol(c10, CURRENT_STREAM_SYMBOL)?,
                handle: symbol(c10, STREAM_HANDLE_SYMBOL)?,
                driver: crate::cuda_libraries::driver_api()?,
            })
        })()
    };
    FUNCTIONS.get_or_init(|| Box::new(found)).as_ref()
}

/// How the noise kernel is ordered, for the device report: on libtorch's current stream,
/// or (its functions not found) on the legacy default stream with device synchronizations.
pub(crate) fn ordering() -> &'static str {
    if functions().is_some() {
        "libtorch's current stream (no device-wide synchronization)"
    } else {
        "the legacy default stream with device synchronizations (libtorch's stream functions \
         c10::cuda::getCurrentCUDAStream and CUDAStream::stream, or the driver's stream \
         functions, were not found)"
    }
}

/// libtorch's current stream on CUDA device `index` for this thread (what its next
/// operation on that device runs on; NULL: the legacy default stream, libtorch's default),
/// or None when libtorch's stream functions are not found. Only for a device that libtorch
/// uses already (a tensor on it, an op made for it): the call would start CUDA otherwise.
/// Fails (TORCH_ERROR) where libtorch throws: its first use of its streams could not start
/// CUDA on the device.
pub(crate) fn current(index: usize) -> Result<Option<CuStream>> {
    let Some(f) = functions() else {
        return Ok(None);
    };
    let device = i8::try_from(index)
        .map_err(|_| Error::invalid(format!("CUDA device index {index} is out of range")))?;
    let mut stream: CuStream = std::ptr::null_mut();
    // the device's primary context current around the call, where it is active: libtorch's
    // first use of its streams starts the CUDA runtime, which would otherwise take (and
    // start) the primary context of this thread's current device
    let primary = Primary::active(f, index);
    let pushed = primary.as_ref().map(Primary::push).transpose()?;
    // SAFETY: libtorch's functions with their C signatures (module doc), called by the
    // shim, which catches what they throw; `stream` is one handle for it to write.
    let code =
        unsafe { perturbations_shim_current_stream(f.current, f.handle, device, &mut stream) };
    drop(pushed);
    drop(primary);
    match code {
        0 => Ok(Some(stream)),
        _ => Err(Error::new(
            Status::TorchError,
            format!(
                "libtorch could not give its current CUDA stream of cuda:{index} (its streams \
                 could not start CUDA on the device: held by another process in exclusive \
                 mode, or out of memory?)"
            ),
        )),
    }
}

/// The CUDA context a device pointer's memory belongs to, or None when the driver cannot
/// tell.
pub(crate) fn context_of_pointer(pointer: u64) -> Option<*mut c_void> {
    let f = functions()?;
    let mut context: *mut c_void = std::ptr::null_mut();
    // CU_POINTER_ATTRIBUTE_CONTEXT = 1: writes a CUcontext
    // SAFETY: the attribute's documented output type, a pointer-sized handle.
    let code = unsafe {
        (f.driver.cu_pointer_get_attribute)((&mut context as *mut *mut c_void).cast(), 1, pointer)
    };
    (code == 0 && !context.is_null()).then_some(context)
}

/// The CUDA context of `stream` (None: the legacy or per-thread default stream, NULL,
/// 0x1 or 0x2, whose context is the current one, or the driver cannot tell).
pub(crate) fn context_of_stream(stream: CuStream) -> Option<*mut c_void> {
    if (stream as usize) <= 2 {
        return None; // (NULL and the pseudo-handles resolve in the current context)
    }
    let f = functions()?;
    let mut context: *mut c_void = std::ptr::null_mut();
    // SAFETY: a stream handle libtorch gave; the output is one CUcontext.
    let code = unsafe { (f.driver.cu_stream_get_ctx)(stream, &mut context) };
    (code == 0 && !context.is_null()).then_some(context)
}

/// Fails (DEVICE_UNAVAILABLE, nothing enqueued) when `device` is a CUDA device and
/// - a CUDA context other than a device's primary context is current on this thread
///   (another library made its own context current: libtorch and this library work in
///   the primary contexts, and libtorch would run the call's operations in the other), or
/// - libtorch's current stream of the device on this thread is capturing a CUDA graph (or
///   in a capture that was invalidated).
///
/// Not seen: a capture on a stream that is not this thread's current one, or on another
/// thread (libtorch's default, the legacy stream, cannot capture; a call while another
/// thread captures in CUDA's global mode fails in libtorch and ends that capture). A
/// process where libtorch's stream functions are not found, and a child forked after CUDA
/// started (whose calls fail or run on the CPU: `PerturbedOp::spec_here`), pass.
pub(crate) fn check_usable(device: Device) -> Result<()> {
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    if crate::cuda_libraries::forked_after_cuda() {
        return Ok(()); // (CUDA is not called in such a child: the call fails as it says)
    }
    let Some(f) = functions() else {
        return Ok(());
    };
    if let Some(context) = foreign_context(f) {
        return Err(Error::new(
            Status::DeviceUnavailable,
            format!(
                "a CUDA context other than a device's primary context is current on this \
                 thread ({context:?}: another library's, PyCUDA's say, or a torch green \
                 context): libtorch and this library work in the devices' primary contexts, \
                 so nothing was enqueued; make the call where no such context is current \
                 (pop it around the call, or leave the green context)"
            ),
        ));
    }
    // a device whose primary context has not started has no stream of libtorch's on it
    // (and is not started here)
    let Some(primary) = Primary::active(f, index) else {
        return Ok(());
    };
    let Some(stream) = current(index)? else {
        return Ok(());
    };
    // the legacy default stream (NULL, or the pseudo-handle cudaStreamLegacy, 0x1) never
    // captures; the per-thread default stream (cudaStreamPerThread, 0x2, which
    // torch.cuda.ExternalStream may wrap) can, and is resolved in the current context
    if (stream as usize) <= 1 {
        return Ok(());
    }
    let mut status: c_int = 0;
    let pushed = ((stream as usize) == 2)
        .then(|| primary.push())
        .transpose()?;
    // SAFETY: a stream handle libtorch gave (the per-thread one with its device's primary
    // context current); the output is one CUstreamCaptureStatus.
    let code = unsafe { (f.driver.cu_stream_is_capturing)(stream, &mut status) };
    drop(pushed);
    drop(primary);
    // CU_STREAM_CAPTURE_STATUS_NONE = 0, _ACTIVE = 1, _INVALIDATED = 2
    let why = match (code, status) {
        (0, 0) => return Ok(()),
        (0, 1) => "is capturing a CUDA graph",
        (0, _) => "is in a CUDA graph capture that was invalidated",
        (code, _) => {
            return Err(Error::new(
                Status::TorchError,
                format!(
                    "cuStreamIsCapturing on the current stream of cuda:{index} returned CUDA error {code}"
                ),
            ))
        }
    };
    Err(Error::new(
        Status::DeviceUnavailable,
        format!(
            "the current CUDA stream of cuda:{index} {why}: a perturbations call cannot be \
             captured (it reads results on the host and calls host solvers), and nothing \
             was enqueued; make the call outside the capture"
        ),
    ))
}

/// The context current on this thread when it is not its device's primary context (None:
/// none is current, or the primary one, or the driver cannot tell).
fn foreign_context(f: &Functions) -> Option<*mut c_void> {
    let mut context: *mut c_void = std::ptr::null_mut();
    // SAFETY: driver calls with valid out-pointers, each writing one value of its type.
    unsafe {
        if (f.driver.cu_ctx_get_current)(&mut context) != 0 || context.is_null() {
            return None;
        }
        let mut device: c_int = 0;
        if (f.driver.cu_ctx_get_device)(&mut device) != 0 {
            return None;
        }
        let (mut flags, mut active): (std::ffi::c_uint, c_int) = (0, 0);
        if (f.driver.cu_primary_ctx_state)(device, &mut flags, &mut active) != 0 {
            return None;
        }
        if active == 0 {
            return Some(context); // (the primary context is not even started)
        }
        let primary = Primary::active(f, usize::try_from(device).ok()?)?;
        (primary.context != context).then_some(context)
    }
}

/// A device's primary context, retained for the guard's life (released when dropped): a
/// handle held no longer than a call, so that an application's reset of the context
/// (`cudaDeviceReset`) leaves no stale handle here.
struct Primary<'a> {
    f: &'a Functions,
    device: c_int,
    context: *mut c_void,
}

impl<'a> Primary<'a> {
    /// CUDA device `index`'s primary context when it is active (started), else None (also
    /// where the driver cannot tell or refuses). The driver's device numbers are the
    /// runtime's. Nothing is started: an inactive context is left so.
    fn active(f: &'a Functions, index: usize) -> Option<Primary<'a>> {
        let device = c_int::try_from(index).ok()?;
        let (mut flags, mut active): (std::ffi::c_uint, c_int) = (0, 0);
        let mut context: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointers, each written with one value of its type; the
        // context is active, so retaining it counts a reference (released by Drop).
        unsafe {
            if (f.driver.cu_primary_ctx_state)(device, &mut flags, &mut active) != 0 || active == 0
            {
                return None;
            }
            if (f.driver.cu_primary_ctx_retain)(&mut context, device) != 0 || context.is_null() {
                return None;
            }
        }
        Some(Primary { f, device, context })
    }

    /// The context made current on this thread until the guard returned is dropped
    /// (TORCH_ERROR when the driver refuses).
    fn push(&self) -> Result<Pushed<'a>> {
        // SAFETY: a retained (so live) context; current on this thread until the pop.
        match unsafe { (self.f.driver.cu_ctx_push)(self.context) } {
            0 => Ok(Pushed(self.f)),
            code => Err(Error::new(
                Status::TorchError,
                format!(
                    "cuCtxPushCurrent of a device's primary context returned CUDA error {code}"
                ),
            )),
        }
    }
}

impl Drop for Primary<'_> {
    fn drop(&mut self) {
        // SAFETY: releases the reference `active` took.
        unsafe { (self.f.driver.cu_primary_ctx_release)(self.device) };
    }
}

/// A context pushed on this thread ([`Primary::push`]), popped when dropped.
struct Pushed<'a>(&'a Functions);

impl Drop for Pushed<'_> {
    fn drop(&mut self) {
        let mut popped: *mut c_void = std::ptr::null_mut();
        // SAFETY: pops the context this guard's push made current on this thread.
        unsafe { (self.0.driver.cu_ctx_pop)(&mut popped) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without libtorch's CUDA libraries loaded (a machine without a driver), nothing is
    /// found, and a CUDA device is never refused for a capture that cannot exist.
    #[test]
    fn without_cuda_there_is_no_stream_and_nothing_is_refused() {
        if crate::cuda_libraries::driver_present() {
            return; // (a GPU machine: gpu-check.sh's streams test covers it there)
        }
        assert!(matches!(current(0), Ok(None)));
        assert!(context_of_pointer(0x1000).is_none());
        assert!(context_of_stream(0x1000 as CuStream).is_none());
        assert!(check_usable(Device::Cuda(0)).is_ok());
        assert!(check_usable(Device::Cpu).is_ok());
    }

    /// The C++ test that holds libtorch's declarations to this module's layout checks the
    /// names this module looks up.
    #[test]
    fn the_abi_test_checks_these_symbols() {
        let test = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/c/test_c10_stream_abi.cpp"),
        )
        .unwrap();
        for name in [CURRENT_STREAM_SYMBOL, STREAM_HANDLE_SYMBOL] {
            let name = name.to_str().unwrap();
            assert!(
                test.contains(&format!("\"{name}\"")),
                "{name} in the C++ test"
            );
        }
    }
}
