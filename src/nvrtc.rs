//! NVRTC, CUDA's run-time compiler, found and loaded without linking it: already loaded
//! (by torch or the application), beside libtorch (the pip wheels' nvidia folder, or
//! through libcaffe2_nvrtc.so), or on the system; its builtins library loaded first from
//! its own folder. It compiles CUDA source to PTX or to a device's CUBIN, also on machines
//! without a GPU (the library's noise kernel, `cuda_noise`, is checked so everywhere).

use crate::cuda_libraries::symbol;
use once_cell::race::OnceBox;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

type NvrtcProgram = *mut c_void;

/// An NVRTC function that gives a size (`size_t *`), or copies a result, of a compiled
/// program (nvrtcGetPTXSize, nvrtcGetPTX, nvrtcGetCUBINSize, nvrtcGetCUBIN).
type Getter = unsafe extern "C" fn(NvrtcProgram, *mut c_void) -> c_int;

/// NVRTC's functions (also used alone, to compile the source on machines without a GPU).
pub(crate) struct Nvrtc {
    create: unsafe extern "C" fn(
        *mut NvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int,
    ptx_size: Getter,
    ptx: Getter,
    /// nvrtcGetCUBINSize and nvrtcGetCUBIN (NVRTC 11.1 and later).
    cubin: Option<(Getter, Getter)>,
    /// nvrtcVersion.
    version: Option<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>,
    /// The folder of the NVRTC library found.
    folder: Option<std::path::PathBuf>,
    /// The architectures it compiles for (nvrtcGetSupportedArchs, NVRTC 11.2 and later:
    /// 90 for sm_90), ascending.
    archs: Vec<c_int>,
    log_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    log: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut NvrtcProgram) -> c_int,
}

/// A handle to NVRTC: already loaded, beside libtorch (the pip wheels' nvidia folder, or
/// through libcaffe2_nvrtc.so, which links it in standalone libtorch), or on the system.
fn nvrtc_handle() -> Option<*mut c_void> {
    let open = |path: &str, flags: c_int| -> Option<*mut c_void> {
        let c = CString::new(path).ok()?;
        // SAFETY: dlopen of a library by path or name; handles are never closed.
        let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
        (!h.is_null()).then_some(h)
    };
    let names = ["libnvrtc.so.13", "libnvrtc.so.12"];
    // NVRTC opens its builtins library by name when it compiles, and a wheel's folder is
    // on no search path: the builtins beside the NVRTC found are loaded first, so that the
    // name finds them (also when torch or the application loaded that NVRTC)
    let with_builtins = |h: *mut c_void, folder: Option<std::path::PathBuf>| {
        if let Some(Ok(entries)) = folder.map(std::fs::read_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("libnvrtc-builtins.so.") {
                    open(
                        &entry.path().to_string_lossy(),
                        libc::RTLD_NOW | libc::RTLD_LOCAL,
                    );
                }
            }
        }
        h
    };
    if let Some(h) = names
        .iter()
        .find_map(|n| open(n, libc::RTLD_NOW | libc::RTLD_NOLOAD))
    {
        return Some(with_builtins(h, folder_of(h, c"nvrtcVersion")));
    }
    if let Some(folder) = crate::cuda_libraries::torch_lib_folder() {
        let wheel = folder.join("../../nvidia");
        for sub in ["cu13/lib/libnvrtc.so.13", "cuda_nvrtc/lib/libnvrtc.so.12"] {
            let path = wheel.join(sub);
            if let Some(h) = open(&path.to_string_lossy(), libc::RTLD_NOW | libc::RTLD_LOCAL) {
                return Some(with_builtins(h, path.parent().map(Into::into)));
            }
        }
        // dlsym on this handle searches its dependencies, NVRTC among them
        if let Some(h) = open(
            &folder.join("libcaffe2_nvrtc.so").to_string_lossy(),
            libc::RTLD_NOW | libc::RTLD_LOCAL,
        ) {
            return Some(h);
        }
    }
    names
        .iter()
        .find_map(|n| open(n, libc::RTLD_NOW | libc::RTLD_LOCAL))
}

/// The folder of the loaded library that defines `name` in the scope of handle `h`.
fn folder_of(h: *mut c_void, name: &CStr) -> Option<std::path::PathBuf> {
    // SAFETY: dlsym on a live handle; dladdr fills `info` for an address of a loaded
    // object, whose file name is a NUL-terminated string that lives as long as the object.
    unsafe {
        let symbol = libc::dlsym(h, name.as_ptr());
        let mut info: libc::Dl_info = std::mem::zeroed();
        if symbol.is_null() || libc::dladdr(symbol, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let file = CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned();
        let folder = std::path::Path::new(&file).parent()?;
        Some(std::fs::canonicalize(folder).unwrap_or_else(|_| folder.into()))
    }
}

/// The architectures the NVRTC of handle `h` compiles for, ascending (empty when it does not
/// say).
fn supported_archs(h: *mut c_void) -> Vec<c_int> {
    type Count = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: NVRTC's documented signatures: the count, then that many ints written.
    unsafe {
        let (Some(count), Some(list)) = (
            symbol::<Count>(h, c"nvrtcGetNumSupportedArchs"),
            symbol::<Count>(h, c"nvrtcGetSupportedArchs"),
        ) else {
            return Vec::new();
        };
        let mut n: c_int = 0;
        if count(&mut n) != 0 || n <= 0 || n > 1024 {
            return Vec::new();
        }
        let mut archs = vec![0 as c_int; n as usize];
        if list(archs.as_mut_ptr()) != 0 {
            return Vec::new();
        }
        archs.sort_unstable();
        archs
    }
}

/// The architecture to build PTX for, for a device of architecture `device` (90 for
/// sm_90): the newest that NVRTC supports and the device runs (the driver compiles PTX of
/// an older architecture for a newer device), or `device` itself when NVRTC does not say.
pub(crate) fn ptx_arch(supported: &[c_int], device: c_int) -> Option<c_int> {
    if supported.is_empty() {
        return Some(device);
    }
    supported.iter().copied().filter(|&a| a <= device).max()
}

/// NVRTC's functions, loaded once (None when it cannot be found). No lock: threads that
/// race each look NVRTC up (dlopen counts references) and the first answer is kept, so a
/// child forked while another thread looks it up never waits for that thread.
pub(crate) fn nvrtc() -> Option<&'static Nvrtc> {
    static NVRTC: OnceBox<Option<Nvrtc>> = OnceBox::new();
    NVRTC
        .get_or_init(|| {
            let h = nvrtc_handle();
            // SAFETY: NVRTC's documented C signatures.
            Box::new(h.and_then(|h| unsafe {
                Some(Nvrtc {
                    create: symbol(h, c"nvrtcCreateProgram")?,
                    compile: symbol(h, c"nvrtcCompileProgram")?,
                    ptx_size: symbol(h, c"nvrtcGetPTXSize")?,
                    ptx: symbol(h, c"nvrtcGetPTX")?,
                    cubin: symbol::<Getter>(h, c"nvrtcGetCUBINSize")
                        .zip(symbol::<Getter>(h, c"nvrtcGetCUBIN")),
                    version: symbol(h, c"nvrtcVersion"),
                    folder: folder_of(h, c"nvrtcCompileProgram"),
                    archs: supported_archs(h),
                    log_size: symbol(h, c"nvrtcGetProgramLogSize")?,
                    log: symbol(h, c"nvrtcGetProgramLog")?,
                    destroy: symbol(h, c"nvrtcDestroyProgram")?,
                })
            }))
        })
        .as_ref()
}

impl Nvrtc {
    /// PTX of `source` for compute capability `major.minor` (NUL-terminated, as
    /// cuModuleLoadData wants; the driver compiles it for the device, which needs a driver
    /// at least as new as this NVRTC), or the compiler's log.
    pub(crate) fn ptx(
        &self,
        source: &str,
        major: c_int,
        minor: c_int,
    ) -> std::result::Result<Vec<u8>, String> {
        let arch = format!("compute_{major}{minor}");
        self.compile(source, &arch, self.ptx_size, self.ptx, "nvrtcGetPTX")
    }

    /// The CUBIN (device code, run as it is: no JIT in the driver) of `source` for the
    /// architecture sm_`major``minor`, or why not (an NVRTC without CUBIN output, or one
    /// that does not know the architecture).
    pub(crate) fn cubin(
        &self,
        source: &str,
        major: c_int,
        minor: c_int,
    ) -> std::result::Result<Vec<u8>, String> {
        let (size, get) = self.cubin.ok_or("this NVRTC has no nvrtcGetCUBIN")?;
        self.compile(
            source,
            &format!("sm_{major}{minor}"),
            size,
            get,
            "nvrtcGetCUBIN",
        )
    }

    /// The folder of the NVRTC library in use (None when the loader does not say).
    pub(crate) fn folder(&self) -> Option<&std::path::Path> {
        self.folder.as_deref()
    }

    /// The architecture of the PTX to build for a device of compute capability
    /// `major.minor` (see [`ptx_arch`]), as (major, minor); None when NVRTC supports none
    /// that the device runs.
    pub(crate) fn ptx_target(&self, major: c_int, minor: c_int) -> Option<(c_int, c_int)> {
        ptx_arch(&self.archs, major * 10 + minor).map(|a| (a / 10, a % 10))
    }

    /// NVRTC's version, "major.minor" (None when it does not say).
    pub(crate) fn version(&self) -> Option<String> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion writes two ints.
        let f = self.version?;
        (unsafe { f(&mut major, &mut minor) } == 0).then(|| format!("{major}.{minor}"))
    }

    /// `source` compiled for `--gpu-architecture=arch`, its result read by `size` and
    /// `get` (named `what` in errors), or the compiler's log.
    fn compile(
        &self,
        source: &str,
        arch: &str,
        size: Getter,
        get: Getter,
        what: &str,
    ) -> std::result::Result<Vec<u8>, String> {
        let source = CString::new(source).map_err(|_| "a NUL in the source".to_string())?;
        let arch = CString::new(format!("--gpu-architecture={arch}")).expect("no NUL");
        let options = [arch.as_ptr()];
        let mut program: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: NVRTC calls with valid NUL-terminated strings and out-pointers, and
        // result buffers of the size NVRTC gave; the program is destroyed on every path
        // after its creation.
        unsafe {
            let code = (self.create)(
                &mut program,
                source.as_ptr(),
                c"pert_noise.cu".as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if code != 0 {
                return Err(format!("nvrtcCreateProgram failed ({code})"));
            }
            let compiled = (self.compile)(program, options.len() as c_int, options.as_ptr());
            let result = if compiled != 0 {
                let mut size = 0usize;
                let mut log = Vec::new();
                if (self.log_size)(program, &mut size) == 0 && size > 0 {
                    log = vec![0u8; size];
                    if (self.log)(program, log.as_mut_ptr().cast()) != 0 {
                        log.clear();
                    }
                }
                Err(format!(
                    "nvrtcCompileProgram failed ({compiled}): {}",
                    String::from_utf8_lossy(&log).trim_end_matches('\0')
                ))
            } else {
                let mut bytes = 0usize;
                let sized = size(program, (&mut bytes as *mut usize).cast()) == 0 && bytes > 0;
                let mut image = vec![0u8; bytes];
                if sized && get(program, image.as_mut_ptr().cast()) == 0 {
                    Ok(image)
                } else {
                    Err(format!("{what} failed"))
                }
            };
            (self.destroy)(&mut program);
            result
        }
    }
}
