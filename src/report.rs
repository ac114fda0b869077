//! The device report (`pert_device_report`): what this process found of CUDA (driver,
//! runtime, devices, NVRTC) and which noise path each device uses.

use crate::cuda_libraries::{self, Loaded};
use std::fmt::Write;

/// A CUDA version number (13000) as "13.0".
fn version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// `cudaRuntimeGetVersion` of the runtime libtorch_cuda brought (None when not loaded).
fn runtime_version() -> Option<i32> {
    type IntOut = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: libtorch_cuda is loaded RTLD_GLOBAL (cuda_libraries), so its runtime's
    // functions are found by name; cudaRuntimeGetVersion writes one int.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"cudaRuntimeGetVersion".as_ptr());
        if f.is_null() {
            return None;
        }
        let mut v = 0;
        (std::mem::transmute::<*mut libc::c_void, IntOut>(f)(&mut v) == 0).then_some(v)
    }
}

/// The report: one `name: value` line per item, in this order: the library's version, the
/// libtorch folder, the CUDA driver (version, or why there is none or why it did not
/// start), libtorch's CUDA libraries and runtime, the CUDA devices libtorch sees (and why
/// fewer than the driver), NVRTC, the noise path of each CUDA device (`fused kernel`
/// with the form of its code, or `libtorch operations (the slow path)` and why), the
/// stream the kernel is ordered on (where it runs on a device), and the CPU's. On a
/// machine with a CUDA driver, making it loads libtorch's CUDA libraries and the noise
/// kernel on each device, as the first CUDA op would.
pub fn device_report() -> String {
    let mut out = String::new();
    let mut line = |name: &str, value: &str| {
        let _ = writeln!(out, "{name}: {value}");
    };
    line("perturbations", env!("CARGO_PKG_VERSION"));
    line(
        "libtorch",
        &cuda_libraries::torch_lib_folder()
            .map_or("(folder unknown)".into(), |f| f.display().to_string()),
    );
    let driver = cuda_libraries::driver();
    line(
        "CUDA driver",
        &match &driver {
            None => {
                "none (libcuda.so.1 cannot be loaded and no NVIDIA kernel driver is present)".into()
            }
            Some(d) => {
                let v = d.version.map_or("version unknown".into(), version);
                match &d.devices {
                    Ok(devices) => format!("{v}, {} device(s)", devices.len()),
                    Err(why) => format!("{v}, did not start: {why}"),
                }
            }
        },
    );
    line(
        "CUDA runtime",
        &match cuda_libraries::load() {
            Loaded::NoDriver => "not loaded (no CUDA driver)".into(),
            Loaded::Failed(why) => format!("not loaded: {why}"),
            Loaded::Yes => runtime_version().map_or_else(
                || "libtorch_cuda loaded, runtime version unknown".into(),
                |v| format!("{}, from libtorch_cuda", version(v)),
            ),
        },
    );
    let count = crate::device::cuda_device_count();
    line(
        "CUDA devices seen by libtorch",
        &format!("{count}{}", crate::device::why_no_cuda(count)),
    );
    line(
        "NVRTC",
        &match crate::nvrtc::nvrtc() {
            None => "not found (CUDA noise would take the slow path)".into(),
            Some(n) => format!(
                "{}{}",
                n.version().unwrap_or_else(|| "version unknown".into()),
                n.folder()
                    .map_or(String::new(), |f| format!(", in {}", f.display()))
            ),
        },
    );
    let devices = driver.and_then(|d| d.devices.ok()).unwrap_or_default();
    let mut kernel_somewhere = false;
    for index in 0..count {
        let what = devices.get(index).map_or(String::new(), |d| {
            format!(" ({}, sm_{}{})", d.name, d.capability.0, d.capability.1)
        });
        // (in a child forked after CUDA started, the kernel's state is the parent's: not
        // looked at, nor waited for)
        let path = if crate::cuda_libraries::forked_after_cuda() {
            format!(
                "none: {} (\"auto\" built-in ops run on the CPU)",
                crate::cuda_libraries::FORKED_AFTER_CUDA
            )
        } else {
            match crate::cuda_noise::status(index) {
                Ok(form) => {
                    kernel_somewhere = true;
                    format!("fused kernel, {form}")
                }
                Err(why) => format!("libtorch operations (the slow path): {why}"),
            }
        };
        line(&format!("noise on cuda:{index}{what}"), &path);
    }
    if kernel_somewhere {
        line("CUDA noise kernel runs on", crate::cuda_stream::ordering());
    }
    let simd = if crate::fastmath::has_avx512() {
        "AVX-512"
    } else if crate::fastmath::has_avx2() {
        "AVX2 and FMA"
    } else {
        "scalar"
    };
    line(
        "noise on the CPU",
        &format!("the library's own sampler ({simd})"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_every_item() {
        let report = device_report();
        for name in [
            "perturbations: ",
            "libtorch: ",
            "CUDA driver: ",
            "CUDA runtime: ",
            "CUDA devices seen by libtorch: ",
            "NVRTC: ",
            "noise on the CPU: the library's own sampler (",
        ] {
            assert!(report.contains(name), "{name:?} in {report}");
        }
        let count = crate::device::cuda_device_count();
        assert_eq!(report.matches("noise on cuda:").count(), count, "{report}");
        assert_eq!(version(13000), "13.0");
        assert_eq!(version(12080), "12.8");
    }
}
