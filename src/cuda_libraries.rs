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

use once_cell::sync::OnceCell;
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
    static LOADED: OnceCell<Loaded> = OnceCell::new();
    LOADED.get_or_init(|| {
        if !driver_present() {
            return Loaded::NoDriver;
        }
        match torch_lib_folder() {
            None => Loaded::Failed("libtorch_cpu.so is not loaded from a folder".into()),
            Some(folder) => {
                let path = folder.join("libtorch_cuda.so");
                if !path.exists() {
                    return Loaded::Failed(format!(
                        "this libtorch has no CUDA support ({} does not exist)",
                        path.display()
                    ));
                }
                open_global(&path.to_string_lossy())
            }
        }
    })
}

/// Whether a CUDA driver is installed (`libcuda.so.1` can be loaded). The handle is kept:
/// libtorch loads the same library when it initializes CUDA.
pub(crate) fn driver_present() -> bool {
    static PRESENT: OnceCell<bool> = OnceCell::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: dlopen of a system library by name; the handle is never closed.
        !unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }
            .is_null()
    })
}

/// The CUDA devices the driver reports (0 without a driver or when it fails to start).
pub(crate) fn driver_device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: the driver is loaded (driver_present); RTLD_NOLOAD only finds it. cuInit and
    // cuDeviceGetCount have these signatures in every CUDA driver API version; cuInit may
    // be called any number of times, from any thread.
    unsafe {
        let lib = libc::dlopen(
            c"libcuda.so.1".as_ptr(),
            libc::RTLD_LAZY | libc::RTLD_NOLOAD,
        );
        if lib.is_null() {
            return 0;
        }
        let init = libc::dlsym(lib, c"cuInit".as_ptr());
        let count = libc::dlsym(lib, c"cuDeviceGetCount".as_ptr());
        let found = if init.is_null() || count.is_null() {
            0
        } else {
            let init = std::mem::transmute::<*mut libc::c_void, CuInit>(init);
            let count = std::mem::transmute::<*mut libc::c_void, CuDeviceGetCount>(count);
            let mut n = 0i32;
            if init(0) == 0 && count(&mut n) == 0 {
                n.max(0) as usize
            } else {
                0
            }
        };
        libc::dlclose(lib); // drops the reference RTLD_NOLOAD took, not the library
        found
    }
}

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

/// The folder of the loaded libtorch_cpu.so.
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
        if path.file_name().is_some_and(|f| f == "libtorch_cpu.so") {
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
