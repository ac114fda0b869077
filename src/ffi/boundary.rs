//! The boundary every exported function runs inside: panics are caught, errors become a
//! status and this thread's last error message; plus pointer checks shared by all calls.

use super::status::{pert_status, PERT_STATUS_OK};
use crate::error::{Error, Result, Status};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `message` as this thread's last error.
pub(crate) fn set_last_error(message: &str) {
    LAST_ERROR.with(|m| {
        let mut m = m.borrow_mut();
        m.clear();
        m.push_str(message);
    });
}

/// Runs `f` with this thread's last error message.
pub(crate) fn with_last_error<R>(f: impl FnOnce(&str) -> R) -> R {
    LAST_ERROR.with(|m| f(&m.borrow()))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown payload".to_string());
    format!("internal panic (please report it): {what}")
}

/// Runs a fallible body: OK on success; otherwise the error's status, with its message as
/// this thread's last error. A panic becomes `PERT_STATUS_PANIC`.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> pert_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => PERT_STATUS_OK,
        Ok(Err(err)) => {
            set_last_error(err.message());
            err.status() as pert_status
        }
        Err(payload) => {
            set_last_error(&panic_message(&*payload));
            Status::Panic as pert_status
        }
    }
}

/// Runs an infallible body, giving `fallback` if it panics.
pub(crate) fn guard_or<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        set_last_error(&panic_message(&*payload));
        fallback
    })
}

/// `ptr` as a reference, or NULL_ARGUMENT naming `name`.
///
/// # Safety
/// A non-NULL `ptr` must point to a live `T` for the duration of the call.
pub(crate) unsafe fn arg<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    ptr.as_ref().ok_or_else(|| null(name))
}

/// `ptr` as a mutable reference, or NULL_ARGUMENT naming `name`.
///
/// # Safety
/// A non-NULL `ptr` must point to a live `T`, not aliased for the duration of the call.
pub(crate) unsafe fn arg_mut<'a, T>(ptr: *mut T, name: &str) -> Result<&'a mut T> {
    ptr.as_mut().ok_or_else(|| null(name))
}

/// A borrowed input buffer of `len` elements, or NULL_ARGUMENT naming `name`.
///
/// # Safety
/// A non-NULL `ptr` must point to `len` readable elements.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T]> {
    if ptr.is_null() {
        return Err(null(name));
    }
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// A borrowed output buffer of `len` elements, or NULL_ARGUMENT naming `name`.
///
/// # Safety
/// A non-NULL `ptr` must point to `len` writable elements.
pub(crate) unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize, name: &str) -> Result<&'a mut [T]> {
    if ptr.is_null() {
        return Err(null(name));
    }
    Ok(std::slice::from_raw_parts_mut(ptr, len))
}

fn null(name: &str) -> Error {
    Error::new(Status::NullArgument, format!("{name} is NULL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_a_status_and_a_message() {
        let status = guard(|| panic!("forced for the test"));
        assert_eq!(status, Status::Panic as pert_status);
        with_last_error(|m| assert!(m.contains("forced for the test"), "{m}"));
        // the boundary keeps working afterwards
        assert_eq!(guard(|| Ok(())), PERT_STATUS_OK);
        assert_eq!(guard_or(5, || -> i32 { panic!("again") }), 5);
    }

    #[test]
    fn errors_set_the_message() {
        let status = guard(|| Err(Error::invalid("x must be > 0, got -1")));
        assert_eq!(status, Status::InvalidArgument as pert_status);
        with_last_error(|m| assert_eq!(m, "x must be > 0, got -1"));
    }
}
