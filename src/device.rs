//! Where the sampling, perturbation and reductions run.

use crate::cuda_libraries::{self, Loaded};
use crate::error::{Error, Result, Status};
use crate::tuning::AUTO_CPU_VALUES_PER_CORE;
use std::fmt;
use tch::Device;

/// The device an op computes on, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// Built-in and device solvers: CUDA device 0 when a GPU is present, else the CPU;
    /// small calls of built-in ops (under 32 768 perturbed values per core the op may use)
    /// then run on the CPU, where they are faster or as fast. Host solvers (callbacks, two-phase): the CPU (see
    /// [`DeviceSpec::resolve_for`]).
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device with this index.
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `"auto"`, `"cpu"`, `"cuda"` (device 0) or `"cuda:N"`.
    /// Whether the device exists is checked by [`DeviceSpec::resolve`], not here.
    pub fn parse(text: &str) -> Result<DeviceSpec> {
        let bad = || {
            Error::invalid(format!(
                "device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got \"{text}\""
            ))
        };
        match text {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let index = text.strip_prefix("cuda:").ok_or_else(bad)?;
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                index
                    .parse::<usize>()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| bad())
            }
        }
    }

    /// The libtorch device this spec names on this machine for a built-in or device solver
    /// (and whether it exists, for `set_device`).
    /// A CUDA device that does not exist gives [`Status::DeviceUnavailable`].
    pub fn resolve(self) -> Result<Device> {
        self.resolve_for(false)
    }

    /// The device of an op: `host_solver` when its solutions come from the host (a
    /// callback, a solver with workers, the two-phase API). `"auto"` puts such ops on the
    /// CPU whatever the machine has: their rows would otherwise go to the host and back
    /// for every chunk, without the host pipeline, and their results would depend on
    /// whether the machine has a GPU. Built-ins go to CUDA device 0 when there is one.
    pub fn resolve_for(self, host_solver: bool) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            // host solvers never need CUDA: counting would load libtorch_cuda
            DeviceSpec::Auto if host_solver => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(auto_device(host_solver, cuda_device_count())),
            DeviceSpec::Cuda(index) => {
                let count = cuda_device_count();
                if index < count {
                    Ok(Device::Cuda(index))
                } else {
                    Err(Error::new(
                        Status::DeviceUnavailable,
                        format!(
                            "device \"{self}\" requested, but this machine has {count} CUDA device(s){}",
                            why_no_cuda(count)
                        ),
                    ))
                }
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

type CudaGetDevice = unsafe extern "C" fn(*mut std::ffi::c_int) -> std::ffi::c_int;
type CudaSetDevice = unsafe extern "C" fn(std::ffi::c_int) -> std::ffi::c_int;

/// `cudaGetDevice` and `cudaSetDevice` of the CUDA runtime libtorch loaded, if any.
fn cuda_runtime() -> Option<(CudaGetDevice, CudaSetDevice)> {
    // (no lock: threads that race each look them up, the first answer is kept, so a child
    // forked during another thread's look-up never waits)
    static FOUND: once_cell::race::OnceBox<Option<(CudaGetDevice, CudaSetDevice)>> =
        once_cell::race::OnceBox::new();
    *FOUND.get_or_init(|| Box::new(find_cuda_runtime()))
}

/// [`cuda_runtime`]'s look-up.
fn find_cuda_runtime() -> Option<(CudaGetDevice, CudaSetDevice)> {
    {
        // libtorch_cuda is loaded RTLD_GLOBAL (cuda_libraries), so its CUDA runtime is in the
        // global scope whatever its file is called (standalone libtorch hashes the name)
        // SAFETY: lookups of the CUDA runtime's functions, with their documented signatures.
        unsafe {
            let get = libc::dlsym(libc::RTLD_DEFAULT, c"cudaGetDevice".as_ptr());
            let set = libc::dlsym(libc::RTLD_DEFAULT, c"cudaSetDevice".as_ptr());
            if !get.is_null() && !set.is_null() {
                return Some((
                    std::mem::transmute::<*mut libc::c_void, CudaGetDevice>(get),
                    std::mem::transmute::<*mut libc::c_void, CudaSetDevice>(set),
                ));
            }
        }
        [
            "libcudart.so.13",
            "libcudart.so.12",
            "libcudart.so.11.0",
            "libcudart.so",
        ]
        .iter()
        .find_map(|name| {
            let name = std::ffi::CString::new(*name).ok()?;
            // SAFETY: looks up symbols of an already loaded library (RTLD_NOLOAD); they
            // have the CUDA runtime's documented signatures.
            unsafe {
                let lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
                if lib.is_null() {
                    return None;
                }
                let get = libc::dlsym(lib, c"cudaGetDevice".as_ptr());
                let set = libc::dlsym(lib, c"cudaSetDevice".as_ptr());
                (!get.is_null() && !set.is_null()).then(|| {
                    (
                        std::mem::transmute::<*mut libc::c_void, CudaGetDevice>(get),
                        std::mem::transmute::<*mut libc::c_void, CudaSetDevice>(set),
                    )
                })
            }
        })
    }
}

/// Runs `f` with CUDA device `index` current on this thread (when `index` is given and the
/// CUDA runtime is loaded), and the previous current device back after.
pub(crate) fn with_current_cuda_device<R>(index: Option<usize>, f: impl FnOnce() -> R) -> R {
    // (looked up only for a CUDA op, whose CUDA libraries are loaded)
    let Some(index) = index else {
        return f();
    };
    let Some((get, set)) = cuda_runtime() else {
        return f();
    };
    let mut previous: std::ffi::c_int = 0;
    // SAFETY: CUDA runtime calls on this thread's current device.
    let switched = unsafe { get(&mut previous) } == 0
        && previous as usize != index
        && unsafe { set(index as std::ffi::c_int) } == 0;
    struct Restore(Option<(CudaSetDevice, std::ffi::c_int)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some((set, previous)) = self.0 {
                // SAFETY: as above.
                unsafe { set(previous) };
            }
        }
    }
    let _restore = Restore(switched.then_some((set, previous)));
    f()
}

/// Whether a call of `values` perturbed values (batch × N × input_numel) of a built-in op
/// that `"auto"` put on a GPU runs on the CPU instead, with `cores` cores for the library.
pub(crate) fn small_for_the_gpu(values: u128, cores: usize) -> bool {
    values < AUTO_CPU_VALUES_PER_CORE * cores.max(1) as u128
}

/// Where `"auto"` puts an op, given the CUDA devices present.
fn auto_device(host_solver: bool, cuda_devices: usize) -> Device {
    if host_solver || cuda_devices == 0 {
        Device::Cpu
    } else {
        Device::Cuda(0)
    }
}

/// Whether a call on CUDA device `index` can run on this thread now: fails
/// (DEVICE_UNAVAILABLE) when there is no such device, in a child forked after its parent
/// started CUDA through this library (`cuda_libraries::forked_after_cuda`), when libtorch's current stream of that device on this thread is capturing
/// a CUDA graph (or in an invalidated capture), or when a CUDA context other than a
/// device's primary context is current on this thread (PyCUDA's, a torch green
/// context's); TORCH_ERROR when libtorch cannot give its current stream. On a machine with
/// a CUDA driver this loads libtorch's CUDA libraries (as [`cuda_device_count`]); it
/// starts no CUDA context. Every call on a CUDA op checks this itself before it enqueues anything; a
/// binding that copies a CUDA tensor to the host for a call (as the Python package and the
/// C++ adapter do) checks it first, so that the copy is not what fails, or runs in the
/// wrong context.
pub fn check_cuda_thread(index: usize) -> Result<()> {
    if cuda_libraries::forked_after_cuda() {
        return Err(Error::new(
            Status::DeviceUnavailable,
            format!(
                "{} (an \"auto\" built-in op made before the fork runs its calls on the CPU; \
                 make CUDA ops in the child, or start it with spawn)",
                cuda_libraries::FORKED_AFTER_CUDA
            ),
        ));
    }
    let count = cuda_device_count();
    if index >= count {
        return Err(Error::new(
            Status::DeviceUnavailable,
            format!(
                "CUDA device {index} does not exist: libtorch sees {count} CUDA device(s){}",
                why_no_cuda(count)
            ),
        ));
    }
    crate::cuda_stream::check_usable(Device::Cuda(index))
}

/// The number of CUDA devices libtorch sees (0 without a GPU or without CUDA libraries).
/// On a machine with a CUDA driver this loads libtorch's CUDA libraries first (see
/// `cuda_libraries`): Rust programs that ask tch about CUDA before making any
/// [`crate::Config`] should call this first, or link libtorch_cuda themselves.
pub fn cuda_device_count() -> usize {
    // (no lock: threads that race each count, the first answer is kept, so a child forked
    // during another thread's count never waits)
    static COUNT: once_cell::race::OnceBox<usize> = once_cell::race::OnceBox::new();
    if let Some(&count) = COUNT.get() {
        return count;
    }
    // a child forked during its parent's first count: libtorch's count (a C++ static whose
    // initializer was running) and the driver would wait forever; CUDA cannot be used here
    if cuda_libraries::forked_after_cuda() {
        return 0;
    }
    *COUNT.get_or_init(|| {
        if matches!(cuda_libraries::load(), Loaded::NoDriver) {
            return Box::new(0); // no driver: libtorch would find no device either
        }
        // (cudaGetDeviceCount starts the driver: marked before, so that a child forked
        // meanwhile knows)
        cuda_libraries::mark_cuda_started();
        Box::new(usize::try_from(tch::Cuda::device_count()).unwrap_or(0))
    })
}

/// Why libtorch sees fewer CUDA devices than the driver (appended to DEVICE_UNAVAILABLE
/// messages), or "".
pub(crate) fn why_no_cuda(count: usize) -> String {
    match cuda_libraries::load() {
        Loaded::NoDriver => " (no CUDA driver: libcuda.so.1 cannot be loaded)".into(),
        Loaded::Failed(why) => format!(" (libtorch's CUDA libraries: {why})"),
        Loaded::Yes => {
            let driver = match cuda_libraries::driver().map(|d| d.devices) {
                Some(Err(why)) => return format!(" (the CUDA driver did not start: {why})"),
                Some(Ok(devices)) => devices.len(),
                None => 0,
            };
            if driver <= count {
                return String::new();
            }
            match cuda_libraries::runtime_device_count() {
                Some(Ok(runtime)) if runtime > count => format!(
                    " while the CUDA runtime has {runtime}: libtorch was asked about CUDA in \
                     this process before libtorch_cuda was loaded (call \
                     pert_cuda_device_count() or make a config before any other libtorch CUDA \
                     query, or link libtorch_cuda)"
                ),
                Some(Err(code)) => format!(
                    " while the CUDA driver has {driver}: the CUDA runtime of this libtorch \
                     cannot use them (cudaGetDeviceCount error {code}; is the driver older \
                     than this libtorch's CUDA?)"
                ),
                _ => format!(" while the CUDA driver has {driver}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        for bad in ["", "CPU", "cuda:", "cuda:-1", "cuda:x", "gpu", "cuda:1 "] {
            let err = DeviceSpec::parse(bad).unwrap_err();
            assert_eq!(err.status(), Status::InvalidArgument, "{bad:?}");
            assert!(
                err.message().contains(&format!("\"{bad}\"")),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn auto_keeps_host_solvers_on_the_cpu_and_builtins_on_the_gpu() {
        // a machine with two GPUs and one without
        assert_eq!(auto_device(true, 2), Device::Cpu);
        assert_eq!(auto_device(false, 2), Device::Cuda(0));
        assert_eq!(auto_device(true, 0), Device::Cpu);
        assert_eq!(auto_device(false, 0), Device::Cpu);
        // here: a host solver under "auto" is on the CPU whatever the machine has
        assert_eq!(DeviceSpec::Auto.resolve_for(true).unwrap(), Device::Cpu);
    }

    #[test]
    fn auto_sends_small_builtin_calls_to_the_cpu() {
        // the measured points of the H100 machine (16 cores): CPU below, GPU above
        assert!(small_for_the_gpu(32 * 10 * 1000, 16));
        assert!(small_for_the_gpu(64 * 1000 * 2, 16));
        assert!(!small_for_the_gpu(1024 * 100 * 10, 16));
        assert!(!small_for_the_gpu(128 * 1000 * 10, 16));
        // fewer cores: less goes to the CPU; no core count still sends tiny calls there
        assert!(!small_for_the_gpu(32 * 10 * 1000, 2));
        assert!(small_for_the_gpu(100, 0));
    }

    #[test]
    fn missing_cuda_device_is_unavailable() {
        let count = cuda_device_count();
        let err = DeviceSpec::Cuda(count).resolve().unwrap_err();
        assert_eq!(err.status(), Status::DeviceUnavailable);
        assert_eq!(DeviceSpec::Cpu.resolve().unwrap(), Device::Cpu);
    }
}
