//! Status codes, error messages, version and device queries.

use crate::error::Status;
use std::ffi::c_char;

// The constants below are spelled out for the header generator; `crate::error::Status` is
// the one list of statuses (numbers and names), and the test below checks them against it.

/// The result of every fallible function: `PERT_STATUS_OK` (0) or an error class.
/// The numbers are stable and never reused.
pub type pert_status = u32;

/// Success.
pub const PERT_STATUS_OK: pert_status = 0;
/// A required pointer argument was NULL.
pub const PERT_STATUS_NULL_ARGUMENT: pert_status = 1;
/// An argument was outside its documented range, or sizes overflowed.
pub const PERT_STATUS_INVALID_ARGUMENT: pert_status = 2;
/// An input buffer held NaN or an infinity.
pub const PERT_STATUS_NON_FINITE_INPUT: pert_status = 3;
/// The solver callback returned non-zero, or wrote a non-finite value (or nothing).
pub const PERT_STATUS_SOLVER_FAILED: pert_status = 4;
/// The requested device does not exist on this machine, or this call cannot use it now: a
/// process forked after CUDA started, a CUDA graph capture on the current stream, or a
/// CUDA context other than a primary one current on the thread (`pert_cuda_check_thread`).
pub const PERT_STATUS_DEVICE_UNAVAILABLE: pert_status = 5;
/// libtorch reported an error, or memory could not be allocated (the message says which).
pub const PERT_STATUS_TORCH_ERROR: pert_status = 6;
/// An internal panic was caught; the library stays usable.
pub const PERT_STATUS_PANIC: pert_status = 7;
/// The call was interrupted by `pert_op_interrupt` before it finished; nothing was written.
pub const PERT_STATUS_INTERRUPTED: pert_status = 8;

/// Major version of this header; equal to `pert_version()`'s first number.
pub const PERT_VERSION_MAJOR: u32 = 0;
/// Minor version of this header.
pub const PERT_VERSION_MINOR: u32 = 1;
/// Patch version of this header.
pub const PERT_VERSION_PATCH: u32 = 0;

/// The library's version, "MAJOR.MINOR.PATCH": a static string, never NULL.
#[no_mangle]
pub extern "C" fn pert_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static name for `status`, such as "PERT_STATUS_NULL_ARGUMENT";
/// "PERT_STATUS_UNKNOWN" for a number that is not a status. Never NULL.
#[no_mangle]
pub extern "C" fn pert_status_name(status: pert_status) -> *const c_char {
    match Status::from_u32(status) {
        Some(status) => status.c_name().as_ptr(),
        None => c"PERT_STATUS_UNKNOWN".as_ptr(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn constants_match_the_rust_enum_and_names() {
        let consts = [
            PERT_STATUS_OK,
            PERT_STATUS_NULL_ARGUMENT,
            PERT_STATUS_INVALID_ARGUMENT,
            PERT_STATUS_NON_FINITE_INPUT,
            PERT_STATUS_SOLVER_FAILED,
            PERT_STATUS_DEVICE_UNAVAILABLE,
            PERT_STATUS_TORCH_ERROR,
            PERT_STATUS_PANIC,
            PERT_STATUS_INTERRUPTED,
        ];
        assert_eq!(consts.len(), Status::ALL.len(), "a C constant per status");
        for (c, s) in consts.iter().zip(Status::ALL) {
            assert_eq!(*c, s as u32);
            let name = unsafe { CStr::from_ptr(pert_status_name(*c)) }
                .to_str()
                .unwrap();
            assert_eq!(name, format!("PERT_STATUS_{}", s.name()));
        }
        let unknown = unsafe { CStr::from_ptr(pert_status_name(9)) };
        assert_eq!(unknown.to_str().unwrap(), "PERT_STATUS_UNKNOWN");
        assert_eq!(
            super::super::config::PERT_NOISE_NORMAL,
            crate::Noise::Normal.code()
        );
        assert_eq!(
            super::super::config::PERT_NOISE_GUMBEL,
            crate::Noise::Gumbel.code()
        );
        assert_eq!(
            super::super::config::PERT_NOISE_SUM_OF_GAMMA,
            crate::Noise::from_u32(2).unwrap().code()
        );
        assert_eq!(
            super::super::config::PERT_SUM_OF_GAMMA_MAX_TERMS,
            crate::sum_of_gamma::SUM_OF_GAMMA_MAX_TERMS
        );
        assert_eq!(
            (
                super::super::config::PERT_SUM_OF_GAMMA_MIN_KAPPA,
                super::super::config::PERT_SUM_OF_GAMMA_MAX_KAPPA
            ),
            crate::sum_of_gamma::KAPPA_RANGE
        );
        assert_eq!(
            super::super::config::PERT_MAX_THREADS,
            crate::config::MAX_THREADS
        );
    }
}
