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
