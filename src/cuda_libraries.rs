//! libtorch's CUDA libraries, loaded on first need.
//!
//! The shared library does not link libtorch_cuda: a CPU-only process would map it and its
//! CUDA dependencies (hundreds of MiB of resident memory, a slower start) for nothing. It
//! is loaded with `dlopen` from the folder of the libtorch_cpu already loaded, the first
//! time CUDA matters: when a CUDA device is asked for, when `"auto"` or a config is made on
//! a machine with a CUDA driver, or when the devices are counted. A machine without a
//! driver (no `libcuda.so.1`) never loads it.
//!
//! libtorch decides once per process whether CUDA exists: the first question about CUDA
//! (a device count, a pinned-memory check) fixes the answer. Loading therefore happens
//! before anything this library asks libtorch about CUDA, and a process that asked before
//! (without libtorch_cuda loaded) gets a message saying so instead of a silent CPU.

use once_cell::race::OnceBox;
use std::ffi::{CStr, CString};

/// What loading found.
#[derive(Debug, Clone)]
pub(crate) enum Loaded {
    /// No CUDA driver on this machine: nothing was loaded.
    NoDriver,
    /// libtorch_cuda is loaded (or was already, by the application).
    Yes,
    /// A driver exists but libtorch's CUDA libraries could not be loaded: why.
    Failed(String),
}

/// Loads libtorch_cuda if this machine has a CUDA driver (once per process; later calls
/// return the first answer).
pub(crate) fn load() -> &'static Loaded {
    // no lock: threads that race each load (dlopen counts references), the first answer
    // is kept; a process forked while another thread loads never waits for it
    static LOADED: OnceBox<Loaded> = OnceBox::new();
    LOADED.get_or_init(|| {
        if !driver_present() {
            return Box::new(Loaded::NoDriver);
        }
        Box::new(match torch_lib_folder() {
            None => Loaded::Failed("libtorch_cpu.so is not loaded from a folder".into()),
            Some(folder) => match library_in(&folder, "libtorch_cuda.so") {
                None => Loaded::Failed(format!(
                    "this libtorch has no CUDA support (no libtorch_cuda.so in {})",
                    folder.display()
                )),
                Some(path) => open_global(&path.to_string_lossy()),
            },
        })
    })
}

/// Whether this machine has a CUDA driver: `libcuda.so.1` can be loaded (the handle is
/// kept: libtorch loads the same library), the NVIDIA kernel driver is there (its library
/// may be reachable only from the CUDA libraries' own search paths), or the application
/// already loaded libtorch_cuda.
pub(crate) fn driver_present() -> bool {
    static PRESENT: OnceBox<bool> = OnceBox::new(); // (no lock, as in `load`)
    *PRESENT.get_or_init(|| {
        // SAFETY: dlopen of system libraries by name; handles are never closed (NOLOAD
        // takes a reference only to a library already loaded, which stays loaded anyway).
        let loadable = unsafe {
            !libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL).is_null()
                || !libc::dlopen(
                    c"libtorch_cuda.so".as_ptr(),
                    libc::RTLD_LAZY | libc::RTLD_NOLOAD,
                )
                .is_null()
        };
        Box::new(
            loadable
                || ["/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg"]
                    .iter()
                    .any(|p| std::path::Path::new(p).exists()),
        )
    })
}

/// `cudaGetDeviceCount` of the CUDA runtime libtorch_cuda brought (None when it is not
/// loaded): the count, or the runtime's error code.
pub(crate) fn runtime_device_count() -> Option<Result<usize, i32>> {
    type Count = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: libtorch_cuda is loaded RTLD_GLOBAL, so the runtime's functions are found by
    // name; cudaGetDeviceCount has this signature in every CUDA version.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"cudaGetDeviceCount".as_ptr());
        if f.is_null() {
            return None;
        }
        let f = std::mem::transmute::<*mut libc::c_void, Count>(f);
        let mut n = 0i32;
        Some(match f(&mut n) {
            0 => Ok(n.max(0) as usize),
            code => Err(code),
        })
    }
}

/// What the CUDA driver says about itself and its devices.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Driver {
    /// `cuDriverGetVersion` (13000 for CUDA 13.0), if it answered.
    pub version: Option<i32>,
    /// The devices, or why the driver did not start.
    pub devices: Result<Vec<CudaDevice>, String>,
}

/// A CUDA device as the driver names it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CudaDevice {
    /// `cuDeviceGetName`.
    pub name: String,
    /// The compute capability (major, minor).
    pub capability: (i32, i32),
}

/// The CUDA driver's account of itself (None without a driver).
pub(crate) fn driver() -> Option<Driver> {
    if !driver_present() {
        return None;
    }
    if forked_after_cuda() {
        // (the driver is not called: in such a child it fails, or waits for a lock of the
        // parent's start)
        return Some(Driver {
            version: None,
            devices: Err(format!(
                "not started here: {FORKED_AFTER_CUDA} (make the op in the child, or start it \
                 with spawn)"
            )),
        });
    }
    Some(query_driver())
}

/// [`driver`]'s questions to the driver (present, in a process that may call it).
fn query_driver() -> Driver {
    type IntOut = unsafe extern "C" fn(*mut i32) -> i32;
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuName = unsafe extern "C" fn(*mut libc::c_char, i32, i32) -> i32;
    type CuAttribute = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
    type CuErrorText = unsafe extern "C" fn(i32, *mut *const libc::c_char) -> i32;
    // SAFETY: the driver is loaded (driver_present); RTLD_NOLOAD only finds it (else it is
    // loaded by name, as driver_present did). These functions have these C signatures in
    // every CUDA driver API version (CUdevice is an int, the ordinal, as cuDeviceGet gives
    // it); cuInit may be called any number of times, from any thread; the error texts
    // are static strings.
    unsafe {
        let Some(lib) = driver_library() else {
            return Driver {
                version: None,
                devices: Err("libcuda.so.1 cannot be loaded".into()),
            };
        };
        let find = |name: &CStr| {
            let f = libc::dlsym(lib, name.as_ptr());
            (!f.is_null()).then_some(f)
        };
        let version = find(c"cuDriverGetVersion").and_then(|f| {
            let mut v = 0;
            (std::mem::transmute::<*mut libc::c_void, IntOut>(f)(&mut v) == 0).then_some(v)
        });
        let text = |code: i32| {
            let describe = |name: &CStr| {
                let f = find(name)?;
                let mut out: *const libc::c_char = std::ptr::null();
                let ok = std::mem::transmute::<*mut libc::c_void, CuErrorText>(f)(code, &mut out);
                (ok == 0 && !out.is_null()).then(|| CStr::from_ptr(out).to_string_lossy())
            };
            match (describe(c"cuGetErrorName"), describe(c"cuGetErrorString")) {
                (Some(name), Some(what)) => format!("{name} ({code}: {what})"),
                (Some(name), None) => format!("{name} ({code})"),
                _ => format!("CUDA error {code}"),
            }
        };
        let devices = match (
            find(c"cuInit"),
            find(c"cuDeviceGetCount"),
            find(c"cuDeviceGetName"),
            find(c"cuDeviceGetAttribute"),
        ) {
            (Some(init), Some(count), Some(name), Some(attribute)) => {
                let init = std::mem::transmute::<*mut libc::c_void, CuInit>(init);
                let count = std::mem::transmute::<*mut libc::c_void, IntOut>(count);
                let name = std::mem::transmute::<*mut libc::c_void, CuName>(name);
                let attribute = std::mem::transmute::<*mut libc::c_void, CuAttribute>(attribute);
                let mut n = 0;
                mark_cuda_started();
                match init(0) {
                    0 => match count(&mut n) {
                        0 => Ok((0..n)
                            .map(|d| {
                                let mut buf = [0 as libc::c_char; 256];
                                let named = name(buf.as_mut_ptr(), 255, d) == 0;
                                let (mut major, mut minor) = (0, 0);
                                // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
                                attribute(&mut major, 75, d);
                                attribute(&mut minor, 76, d);
                                let name = if named {
                                    CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
                                } else {
                                    "(no name)".into()
                                };
                                CudaDevice {
                                    name,
                                    capability: (major, minor),
                                }
                            })
                            .collect()),
                        code => Err(format!("cuDeviceGetCount returned {}", text(code))),
                    },
                    code => Err(why_init_failed(&text(code), forked_after_cuda())),
                }
            }
            _ => Err("the driver lacks cuInit, cuDeviceGetCount, cuDeviceGetName or cuDeviceGetAttribute".into()),
        };
        Driver { version, devices }
    }
}

/// The cause of a failed cuInit (`error`, the driver's name and text of it), with what
/// makes it so where this process can tell: CUDA_VISIBLE_DEVICES, a fork after the parent
/// had started CUDA.
fn why_init_failed(error: &str, forked_after_cuda: bool) -> String {
    let mut why = format!("cuInit returned {error}");
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if v.trim().is_empty() => {
            why += "; CUDA_VISIBLE_DEVICES is empty, which hides every device"
        }
        Ok(v) => why += &format!("; CUDA_VISIBLE_DEVICES is {v:?}"),
        Err(_) => {}
    }
    if forked_after_cuda {
        why += &format!("; {FORKED_AFTER_CUDA} (make the op in the child, or start it with spawn)");
    }
    why
}

/// `dlsym(lib, name)` as a function pointer of type `F`, or None.
///
/// # Safety
/// `F` must be the C signature of the symbol `name`.
pub(crate) unsafe fn symbol<F: Copy>(lib: *mut std::ffi::c_void, name: &CStr) -> Option<F> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut std::ffi::c_void>()) };
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    // SAFETY: F is a function pointer type (the caller's contract), the size of a pointer.
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut std::ffi::c_void, F>(&p) })
}

/// The CUDA driver library (`libcuda.so.1`) as loaded (RTLD_NOLOAD finds it wherever it
/// came from), else loaded by name; None when it cannot be loaded.
pub(crate) fn driver_library() -> Option<*mut std::ffi::c_void> {
    // SAFETY: dlopen of the system's CUDA driver by name; handles are never closed.
    unsafe {
        let mut lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if lib.is_null() {
            lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        }
        (!lib.is_null()).then_some(lib)
    }
}

/// A CUDA driver API status (`CUresult`: 0 is success).
pub(crate) type CuResult = std::ffi::c_int;
/// A CUDA driver handle (`CUcontext`, `CUmodule`, `CUfunction`, `CUstream`).
pub(crate) type CuHandle = *mut std::ffi::c_void;

/// The CUDA driver API functions the library calls, with their documented C signatures
/// (the `_v2` names are the current ABI of the context functions; `CUdevice` is an int).
pub(crate) struct DriverApi {
    pub cu_init: unsafe extern "C" fn(std::ffi::c_uint) -> CuResult,
    pub cu_device_get: unsafe extern "C" fn(*mut std::ffi::c_int, std::ffi::c_int) -> CuResult,
    pub cu_device_get_attribute:
        unsafe extern "C" fn(*mut std::ffi::c_int, std::ffi::c_int, std::ffi::c_int) -> CuResult,
    pub cu_primary_ctx_retain: unsafe extern "C" fn(*mut CuHandle, std::ffi::c_int) -> CuResult,
    pub cu_primary_ctx_release: unsafe extern "C" fn(std::ffi::c_int) -> CuResult,
    pub cu_primary_ctx_state: unsafe extern "C" fn(
        std::ffi::c_int,
        *mut std::ffi::c_uint,
        *mut std::ffi::c_int,
    ) -> CuResult,
    pub cu_ctx_push: unsafe extern "C" fn(CuHandle) -> CuResult,
    pub cu_ctx_pop: unsafe extern "C" fn(*mut CuHandle) -> CuResult,
    pub cu_ctx_get_current: unsafe extern "C" fn(*mut CuHandle) -> CuResult,
    pub cu_ctx_get_device: unsafe extern "C" fn(*mut std::ffi::c_int) -> CuResult,
    pub cu_ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    pub cu_module_load_data:
        unsafe extern "C" fn(*mut CuHandle, *const std::ffi::c_void) -> CuResult,
    pub cu_module_get_function:
        unsafe extern "C" fn(*mut CuHandle, CuHandle, *const std::ffi::c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    pub cu_launch_kernel: unsafe extern "C" fn(
        CuHandle,
        std::ffi::c_uint,
        std::ffi::c_uint,
        std::ffi::c_uint,
        std::ffi::c_uint,
        std::ffi::c_uint,
        std::ffi::c_uint,
        std::ffi::c_uint,
        CuHandle,
        *mut *mut std::ffi::c_void,
        *mut *mut std::ffi::c_void,
    ) -> CuResult,
    /// `cuStreamIsCapturing(CUstream, CUstreamCaptureStatus *)`.
    pub cu_stream_is_capturing: unsafe extern "C" fn(CuHandle, *mut std::ffi::c_int) -> CuResult,
    /// `cuStreamGetCtx(CUstream, CUcontext *)`.
    pub cu_stream_get_ctx: unsafe extern "C" fn(CuHandle, *mut CuHandle) -> CuResult,
    /// `cuPointerGetAttribute(void *, CUpointer_attribute, CUdeviceptr)`.
    pub cu_pointer_get_attribute:
        unsafe extern "C" fn(*mut std::ffi::c_void, std::ffi::c_int, u64) -> CuResult,
}

// SAFETY: plain function pointers.
unsafe impl Send for DriverApi {}
unsafe impl Sync for DriverApi {}

/// The driver's functions, looked up once (None without a driver, or where one is
/// missing: every function here is in the CUDA 12 driver API).
pub(crate) fn driver_api() -> Option<&'static DriverApi> {
    // (no lock, as the library's other look-ups: a child forked during another thread's
    // look-up never waits)
    static API: OnceBox<Option<DriverApi>> = OnceBox::new();
    API.get_or_init(|| Box::new(find_driver_api())).as_ref()
}

/// [`driver_api`]'s look-up.
fn find_driver_api() -> Option<DriverApi> {
    if !driver_present() {
        return None;
    }
    let lib = driver_library()?;
    // SAFETY: each symbol has the C signature of its field (see DriverApi).
    unsafe {
        Some(DriverApi {
            cu_init: symbol(lib, c"cuInit")?,
            cu_device_get: symbol(lib, c"cuDeviceGet")?,
            cu_device_get_attribute: symbol(lib, c"cuDeviceGetAttribute")?,
            cu_primary_ctx_retain: symbol(lib, c"cuDevicePrimaryCtxRetain")?,
            cu_primary_ctx_release: symbol(lib, c"cuDevicePrimaryCtxRelease_v2")?,
            cu_primary_ctx_state: symbol(lib, c"cuDevicePrimaryCtxGetState")?,
            cu_ctx_push: symbol(lib, c"cuCtxPushCurrent_v2")?,
            cu_ctx_pop: symbol(lib, c"cuCtxPopCurrent_v2")?,
            cu_ctx_get_current: symbol(lib, c"cuCtxGetCurrent")?,
            cu_ctx_get_device: symbol(lib, c"cuCtxGetDevice")?,
            cu_ctx_synchronize: symbol(lib, c"cuCtxSynchronize")?,
            cu_module_load_data: symbol(lib, c"cuModuleLoadData")?,
            cu_module_get_function: symbol(lib, c"cuModuleGetFunction")?,
            cu_launch_kernel: symbol(lib, c"cuLaunchKernel")?,
            cu_stream_is_capturing: symbol(lib, c"cuStreamIsCapturing")?,
            cu_stream_get_ctx: symbol(lib, c"cuStreamGetCtx")?,
            cu_pointer_get_attribute: symbol(lib, c"cuPointerGetAttribute")?,
        })
    }
}

/// What a child forked after its parent started CUDA is told, wherever it asks for CUDA.
pub(crate) const FORKED_AFTER_CUDA: &str =
    "this process was forked from one that had started CUDA, and CUDA cannot be used in such a child";

/// Whether this process is a child forked after its parent (or an ancestor) started the
/// CUDA driver through this library (cuInit, or the runtime's device count, which calls
/// it): CUDA cannot be used in such a child. Loading libtorch_cuda alone does not count.
pub(crate) fn forked_after_cuda() -> bool {
    let started_in = STARTED_IN.load(std::sync::atomic::Ordering::Relaxed);
    started_in != 0 && started_in != std::process::id()
}

/// Records, before the call that may start the CUDA driver, that this process starts it
/// (see [`forked_after_cuda`]: a child forked during that call must not call CUDA either);
/// a process that inherited the mark keeps its parent's. The mark stays where the call
/// then started nothing (no device): taking it back could erase another thread's start,
/// and such a child has no CUDA to use anyway.
pub(crate) fn mark_cuda_started() {
    let _ = STARTED_IN.compare_exchange(
        0,
        std::process::id(),
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
}

/// The process that started the CUDA driver through this library (0: none did).
static STARTED_IN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`: global, so that the CUDA kernels and hooks it
/// registers are seen by libtorch_cpu.
fn open_global(path: &str) -> Loaded {
    let Ok(c_path) = CString::new(path) else {
        return Loaded::Failed(format!("a NUL in the path {path:?}"));
    };
    // SAFETY: dlopen of libtorch's own CUDA library (its static initializers register
    // libtorch's CUDA backend); dlerror is read on this thread right after the failure.
    unsafe {
        if !libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL).is_null() {
            return Loaded::Yes;
        }
        let why = libc::dlerror();
        let why = if why.is_null() {
            "unknown error".to_string()
        } else {
            CStr::from_ptr(why).to_string_lossy().into_owned()
        };
        Loaded::Failed(format!("cannot load {path}: {why}"))
    }
}

/// The library `name` in `folder`, or one whose name is `name` and a version
/// (`libtorch_cuda.so.2.11`, as some packages install it).
fn library_in(folder: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    let plain = folder.join(name);
    if plain.exists() {
        return Some(plain);
    }
    let versioned = format!("{name}.");
    std::fs::read_dir(folder)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&versioned))
        })
}

/// The folder of the loaded libtorch_cpu.so (or libtorch_cpu.so.VERSION).
pub(crate) fn torch_lib_folder() -> Option<std::path::PathBuf> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        found: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info whose name is NUL-terminated (or
        // null), and `found` is the Option<PathBuf> given below, alive during the call.
        let name = unsafe { (*info).dlpi_name };
        if name.is_null() {
            return 0;
        }
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
        let path = std::path::Path::new(name.as_ref());
        let libtorch_cpu = |f: &std::ffi::OsStr| {
            let f = f.to_string_lossy();
            f == "libtorch_cpu.so" || f.starts_with("libtorch_cpu.so.")
        };
        if path.file_name().is_some_and(libtorch_cpu) {
            if let Some(folder) = path.parent() {
                let folder = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.into());
                unsafe { *(found as *mut Option<std::path::PathBuf>) = Some(folder) };
                return 1;
            }
        }
        0
    }
    let mut found: Option<std::path::PathBuf> = None;
    // SAFETY: the callback only reads the entries it is given and writes `found`.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut found as *mut _ as *mut libc::c_void) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_folder_of_libtorch() {
        let folder = torch_lib_folder().expect("libtorch_cpu.so is loaded by the test binary");
        assert!(
            folder.join("libtorch_cpu.so").exists(),
            "{}",
            folder.display()
        );
    }

    #[test]
    fn a_failed_cuinit_says_why() {
        let error = "CUDA_ERROR_NO_DEVICE (100: no CUDA-capable device is detected)";
        let why = why_init_failed(error, true);
        assert!(
            why.starts_with(&format!("cuInit returned {error}")),
            "{why}"
        );
        assert!(
            why.contains("forked from one that had started CUDA"),
            "{why}"
        );
        assert!(!why_init_failed(error, false).contains("forked"));
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if v.trim().is_empty() => assert!(why.contains("hides every device")),
            Ok(v) => assert!(why.contains(&format!("{v:?}")), "{why}"),
            Err(_) => assert!(!why.contains("CUDA_VISIBLE_DEVICES"), "{why}"),
        }
    }

    #[test]
    fn loads_only_with_a_driver() {
        match load() {
            Loaded::NoDriver => assert!(!driver_present()),
            Loaded::Yes => assert!(driver_present()),
            // only a CPU-only libtorch may fail to load with a driver present
            Loaded::Failed(why) => assert!(
                !torch_lib_folder()
                    .unwrap()
                    .join("libtorch_cuda.so")
                    .exists(),
                "{why}"
            ),
        }
    }
}
