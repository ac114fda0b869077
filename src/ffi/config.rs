//! `pert_config`: the settings an op copies when it is made.

use super::boundary::{arg, arg_mut, guard, guard_or};
use super::status::pert_status;
use crate::config::Config;
use crate::device::DeviceSpec;
use crate::error::Error;
use crate::noise::Noise;
use std::ffi::{c_char, CStr};

/// Normal noise N(0, 1): score z. The default.
pub const PERT_NOISE_NORMAL: u32 = 0;
/// Gumbel noise: score 1 - exp(-z).
pub const PERT_NOISE_GUMBEL: u32 = 1;

/// The largest value `pert_config_set_threads` accepts.
pub const PERT_MAX_THREADS: u32 = 1024;

/// Settings for ops: number of samples, sigma, noise, seed, device and solver threads.
///
/// Made by `pert_config_new`, freed by `pert_config_free`. An op copies the config when it
/// is made, so a config may be changed or freed right after `pert_op_new`.
/// Threads: a config may be read (by `pert_op_new`) from several threads at once, but must
/// not be changed while another thread uses it.
pub struct pert_config {
    pub(crate) inner: Config,
}

/// Makes a config with the defaults: num_samples 1000, sigma 0.05, noise
/// `PERT_NOISE_NORMAL`, seed 0, device "auto", threads 1.
///
/// @param out  Receives the new config on success; untouched on error.
/// @return `PERT_STATUS_OK`, or `PERT_STATUS_NULL_ARGUMENT` when `out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_config_new(out: *mut *mut pert_config) -> pert_status {
    guard(|| {
        let out = unsafe { arg_mut(out, "out") }?;
        *out = Box::into_raw(Box::new(pert_config { inner: Config::new() }));
        Ok(())
    })
}

/// Frees a config made by `pert_config_new`. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn pert_config_free(config: *mut pert_config) {
    guard_or((), || {
        if !config.is_null() {
            // SAFETY: a non-NULL config comes from `pert_config_new` and is freed once.
            drop(unsafe { Box::from_raw(config) });
        }
    })
}

fn set(config: *mut pert_config, f: impl FnOnce(&mut Config) -> Result<(), Error>) -> pert_status {
    guard(|| f(&mut unsafe { arg_mut(config, "config") }?.inner))
}

/// Sets the number of perturbed samples N per problem (default 1000).
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` when `num_samples` is 0 or above INT64_MAX.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_num_samples(config: *mut pert_config, num_samples: u64) -> pert_status {
    set(config, |c| c.set_num_samples(num_samples).map(|_| ()))
}

/// Sets the noise scale sigma (default 0.05).
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` unless `sigma` is finite and > 0.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_sigma(config: *mut pert_config, sigma: f64) -> pert_status {
    set(config, |c| c.set_sigma(sigma).map(|_| ()))
}

/// Sets the noise distribution: `PERT_NOISE_NORMAL` (default) or `PERT_NOISE_GUMBEL`.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` for any other number.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_noise(config: *mut pert_config, noise: u32) -> pert_status {
    set(config, |c| {
        c.set_noise(Noise::from_u32(noise)?);
        Ok(())
    })
}

/// Sets the seed of the random stream (default 0). An op's draws are a pure function of
/// (seed, number of earlier forward calls on that op); the library never reads or reseeds
/// libtorch's global generator.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_seed(config: *mut pert_config, seed: u64) -> pert_status {
    set(config, |c| {
        c.set_seed(seed);
        Ok(())
    })
}

/// Sets the device that samples, perturbs and reduces: "auto" (default: CUDA device 0 when
/// a GPU is present, else the CPU), "cpu", "cuda" (device 0) or "cuda:N". Solver callbacks
/// always receive host memory, whatever the device.
///
/// @param device  A NUL-terminated string, borrowed for the call.
/// @return `PERT_STATUS_INVALID_ARGUMENT` for another string,
///         `PERT_STATUS_DEVICE_UNAVAILABLE` for a CUDA device this machine does not have.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_device(config: *mut pert_config, device: *const c_char) -> pert_status {
    set(config, |c| {
        let text = unsafe { arg(device, "device") }?;
        // SAFETY: the caller passes a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(text) };
        let text = text
            .to_str()
            .map_err(|_| Error::invalid(format!("device must be UTF-8, got {text:?}")))?;
        let spec = DeviceSpec::parse(text)?;
        spec.resolve()?;
        c.set_device(spec);
        Ok(())
    })
}

/// Sets how many threads call the solver in one forward call (default 1; 0: one per core).
/// With more than one, the solver is called concurrently on disjoint slices of the
/// perturbed problems and must be thread-safe. Results do not depend on this number.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` above 1024.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_threads(config: *mut pert_config, threads: u32) -> pert_status {
    set(config, |c| c.set_threads(threads).map(|_| ()))
}
