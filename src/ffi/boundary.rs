//! The boundary every exported function runs inside: panics are caught, errors become a
//! status and this thread's last error message; plus pointer checks shared by all calls.

use super::status::{pert_status, PERT_STATUS_OK};
use crate::error::{Error, Result, Status};
use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::Tensor;

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
        .or_else(|| {
            payload
                .downcast_ref::<crate::kernels::workers::WorkerGone>()
                .map(|_| crate::kernels::workers::WorkerGone::MESSAGE.to_string())
        })
        .unwrap_or_else(|| "unknown payload".to_string());
    if out_of_memory(&what) {
        format!("out of memory: {what}")
    } else {
        format!("internal panic (please report it): {what}")
    }
}

/// Whether a panic's text is an allocation that failed (a Rust allocation in the
/// fault-injection build, or libtorch's `bad_alloc` met by an infallible tch method).
fn out_of_memory(what: &str) -> bool {
    [
        "memory allocation of",
        "bad_alloc",
        "not enough memory",
        "can't allocate memory",
    ]
    .iter()
    .any(|m| what.contains(m))
}

/// Runs a fallible body, after this thread's libtorch set-up (`intraop::prepare_thread`,
/// for forks): OK on success; otherwise the error's status, with its message as
/// this thread's last error. A panic becomes `PERT_STATUS_PANIC` (`PERT_STATUS_TORCH_ERROR`
/// when it is an allocation that failed).
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> pert_status {
    #[cfg(pert_fault_injection)]
    panic_on_failed_allocations();
    let call = || {
        crate::intraop::prepare_thread(); // (before any libtorch work: see there)
        f()
    };
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => PERT_STATUS_OK,
        Ok(Err(err)) => {
            set_last_error(err.message());
            err.status() as pert_status
        }
        Err(payload) => {
            let message = panic_message(&*payload);
            set_last_error(&message);
            panic_status(&message) as pert_status
        }
    }
}

/// The status of a caught panic's message: out of memory is `PERT_STATUS_TORCH_ERROR`, as
/// libtorch's own; anything else is a bug of the library, `PERT_STATUS_PANIC`.
fn panic_status(message: &str) -> Status {
    if message.starts_with("out of memory") {
        Status::TorchError
    } else {
        Status::Panic
    }
}

/// In the fault-injection build: a failed allocation panics (the boundary turns it into
/// an error status) instead of aborting the process.
#[cfg(pert_fault_injection)]
fn panic_on_failed_allocations() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        std::alloc::set_alloc_error_hook(|layout| {
            panic!("memory allocation of {} bytes failed", layout.size())
        })
    });
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

/// A borrowed input buffer of `len` elements (NULL is accepted when `len` is 0), or
/// NULL_ARGUMENT naming `name`;
/// INVALID_ARGUMENT when it would span more than `isize::MAX` bytes (checked before the
/// slice is formed).
///
/// # Safety
/// A non-NULL `ptr` must point to `len` readable elements that nothing writes while the
/// slice is used. Output buffers of the same call may overlap it: they are written through
/// [`Output`] only, after the call's last use of its inputs.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]); // an empty buffer may be NULL
    }
    if ptr.is_null() {
        return Err(null(name));
    }
    check_bytes::<T>(len, name)?;
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// INVALID_ARGUMENT naming the size when `len` elements of `T` take more than `isize::MAX`
/// bytes (more than any buffer can hold).
pub(crate) fn check_bytes<T>(len: usize, name: &str) -> Result<()> {
    let size = std::mem::size_of::<T>();
    match len.checked_mul(size) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => Err(Error::invalid(format!(
            "{name} would hold {len} elements of {size} bytes, more than the {} bytes a buffer can span",
            isize::MAX
        ))),
    }
}

/// A caller's output buffer of `len` floats, checked (NULL, size in bytes) when a call
/// starts and written when it ends. No Rust reference to it is ever formed: the values are
/// staged first ([`Output::stage`], every fallible step), then copied ([`Staged::write`],
/// infallible), after the call has read all of its inputs. So outputs may overlap the
/// call's inputs (`output == theta`), and a call that fails writes nothing.
pub(crate) struct Output {
    ptr: *mut f32,
    len: usize,
    /// The parameter's name, for the messages.
    name: &'static str,
}

/// The values of one output, ready to be copied into the caller's buffer.
pub(crate) struct Staged<'a> {
    out: &'a Output,
    values: Values,
}

/// The values of a staged output: a contiguous float32 CPU tensor, or host floats.
enum Values {
    Tensor(Tensor),
    Host(Vec<f32>),
}

/// An output buffer of `len` floats, or NULL_ARGUMENT / INVALID_ARGUMENT naming `name`
/// (NULL is accepted when `len` is 0).
///
/// # Safety
/// A non-NULL `ptr` must point to `len` writable floats for the rest of the call.
pub(crate) unsafe fn output(ptr: *mut f32, len: usize, name: &'static str) -> Result<Output> {
    if ptr.is_null() && len > 0 {
        return Err(null(name));
    }
    check_bytes::<f32>(len, name)?;
    Ok(Output { ptr, len, name })
}

impl Output {
    /// `t` (float32, any device, `len` elements) as the contiguous host values to write,
    /// checked finite: every input of a call is finite, and a result that they take beyond
    /// float32's range, or whose float32 partial sums overflow it (theta or the solutions
    /// near its limit; a sigma small enough for the Jacobian's 1/sigma to) is refused
    /// (INVALID_ARGUMENT) rather than written: a call that returns OK wrote numbers.
    pub fn stage(&self, t: &Tensor) -> Result<Staged<'_>> {
        let values = t
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(tch::Kind::Float)?
            .f_contiguous()?;
        if values.numel() != self.len {
            return Err(Error::new(
                Status::Panic,
                format!(
                    "internal error (please report it): an output of {} floats got {} values",
                    self.len,
                    values.numel()
                ),
            ));
        }
        if self.len > 0 {
            // SAFETY: `values` is a contiguous float32 CPU tensor of `len` elements (made
            // and checked above), alive for this borrow.
            let host =
                unsafe { std::slice::from_raw_parts(values.data_ptr() as *const f32, self.len) };
            self.check_finite(host)?;
        }
        Ok(Staged {
            out: self,
            values: Values::Tensor(values),
        })
    }

    /// INVALID_ARGUMENT naming the first value of `values` beyond float32's range (or NaN:
    /// an overflow met another, inf − inf), if any.
    pub fn check_finite(&self, values: &[f32]) -> Result<()> {
        if crate::input::all_finite(values) {
            return Ok(());
        }
        let i = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
        Err(Error::invalid(format!(
            "{}[{i}] would be {:?}, beyond float32's range (from finite inputs: theta, the \
             solutions or sigma near its limit, whose sums overflow it, or sigma too small); \
             nothing was written",
            self.name, values[i]
        )))
    }

    /// Host values (`len` of them) to write, which the caller has checked (or that are
    /// finite by their making).
    pub fn stage_host(&self, values: Vec<f32>) -> Result<Staged<'_>> {
        if values.len() != self.len {
            return Err(Error::new(
                Status::Panic,
                format!(
                    "internal error (please report it): an output of {} floats got {} values",
                    self.len,
                    values.len()
                ),
            ));
        }
        Ok(Staged {
            out: self,
            values: Values::Host(values),
        })
    }
}

/// The outputs of a loss call (Fenchel-Young, SPO+, PG): the loss (`batch` floats) and, when its pointer is
/// not NULL, the gradient (`grad_len` floats), checked when the call starts.
///
/// # Safety
/// As [`output`] for each pointer.
pub(crate) unsafe fn loss_and_grad_outputs(
    loss: *mut f32,
    batch: usize,
    (grad, grad_len, grad_name): (*mut f32, usize, &'static str),
) -> Result<(Output, Option<Output>)> {
    let loss = unsafe { output(loss, batch, "loss") }?;
    let grad = if grad.is_null() {
        None
    } else {
        Some(unsafe { output(grad, grad_len, grad_name) }?)
    };
    Ok((loss, grad))
}

/// Stages the outputs of a Fenchel-Young call (the loss, the gradient and the bound when
/// asked for), runs `before_writing` (the pool's additions), then writes them (nothing is
/// written when staging or `before_writing` fails).
pub(crate) fn write_loss_and_grad(
    (loss, grad): &(Output, Option<Output>),
    l: &Tensor,
    g: &Tensor,
    bound: Option<(&Output, &Tensor)>,
    before_writing: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let loss = loss.stage(l)?;
    let grad = grad.as_ref().map(|out| out.stage(g)).transpose()?;
    let bound = bound.map(|(out, b)| out.stage(b)).transpose()?;
    write_staged([Some(loss), grad, bound], before_writing)
}

/// Writes outputs staged before (all of a call's), once `before_writing` (the pool's
/// additions) has succeeded: nothing is written when it fails.
pub(crate) fn write_staged<const N: usize>(
    staged: [Option<Staged<'_>>; N],
    before_writing: impl FnOnce() -> Result<()>,
) -> Result<()> {
    before_writing()?;
    for out in staged.into_iter().flatten() {
        out.write();
    }
    Ok(())
}

/// The optional `bound` output of a Fenchel-Young call: `batch` floats, or None for NULL.
///
/// # Safety
/// A non-NULL `bound` must point to `batch` writable floats for the rest of the call.
pub(crate) unsafe fn bound_output(bound: *mut f32, batch: usize) -> Result<Option<Output>> {
    if bound.is_null() {
        return Ok(None);
    }
    Ok(Some(unsafe { output(bound, batch, "bound") }?))
}

impl Staged<'_> {
    /// Copies the values into the caller's buffer.
    pub fn write(self) {
        if self.out.len == 0 {
            return; // an empty buffer may be NULL
        }
        let from = match &self.values {
            Values::Tensor(t) => t.data_ptr() as *const f32,
            Values::Host(v) => v.as_ptr(),
        };
        // SAFETY: `values` holds `len` floats, contiguous (a float32 CPU tensor or a Vec;
        // checked in `stage` / `stage_host`); the caller's buffer holds `len` writable
        // floats (the contract of `output`). `copy` allows any overlap, though values of
        // the library's own never overlap it.
        unsafe { std::ptr::copy(from, self.out.ptr, self.out.len) }
    }
}

pub(crate) fn null(name: &str) -> Error {
    Error::new(Status::NullArgument, format!("{name} is NULL"))
}

/// Copies the calling thread's last error message into `buf`.
///
/// The message is that of the most recent call on this thread that returned an error
/// (successful calls leave it unchanged); it is empty before any error.
///
/// @param buf      Where to copy the message; may be NULL when `buf_len` is 0.
/// @param buf_len  Size of `buf` in bytes. At most `buf_len - 1` bytes are copied and the
///                 copy is always NUL-terminated when `buf_len > 0`.
/// @return The full length of the message in bytes, without the NUL: a return value
///         `>= buf_len` means the copy was truncated.
#[no_mangle]
pub unsafe extern "C" fn pert_last_error(buf: *mut c_char, buf_len: usize) -> usize {
    // SAFETY: the caller's promise, passed on
    guard_or(0, || {
        with_last_error(|message| unsafe { copy_text(message, buf, buf_len) })
    })
}

/// Copies `text` into the C buffer `buf` of `buf_len` bytes as a NUL-terminated string, cut
/// to `buf_len - 1` bytes (nothing when `buf` is NULL or `buf_len` is 0), and returns its
/// full length in bytes.
///
/// # Safety
/// A non-NULL `buf` has `buf_len` writable bytes.
pub(crate) unsafe fn copy_text(text: &str, buf: *mut c_char, buf_len: usize) -> usize {
    if !buf.is_null() && buf_len > 0 {
        let n = text.len().min(buf_len - 1);
        // SAFETY: the caller gives `buf_len` writable bytes at `buf`.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, n);
            *buf.add(n) = 0;
        }
    }
    text.len()
}

/// Records `message` as this thread's last error (what `pert_last_error` gives next) and
/// returns `status`: for code built on this library, such as the MPI component
/// (bindings/mpi), whose own functions follow its error conventions.
///
/// @param status   Returned unchanged.
/// @param message  A NUL-terminated string, copied (invalid UTF-8 replaced); NULL records
///                 the name of `status`.
#[no_mangle]
pub unsafe extern "C" fn pert_set_last_error(
    status: pert_status,
    message: *const c_char,
) -> pert_status {
    guard_or(status, || {
        let text = if message.is_null() {
            // SAFETY: pert_status_name gives a static NUL-terminated string
            unsafe { std::ffi::CStr::from_ptr(super::status::pert_status_name(status)) }
                .to_string_lossy()
                .into_owned()
        } else {
            // SAFETY: the caller passes a NUL-terminated string, read during the call
            unsafe { std::ffi::CStr::from_ptr(message) }
                .to_string_lossy()
                .into_owned()
        };
        set_last_error(&text);
        status
    })
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
    fn buffers_beyond_isize_max_bytes_are_refused_before_a_slice_is_formed() {
        let p = std::ptr::NonNull::<f32>::dangling().as_ptr();
        let len = (isize::MAX as usize) / 4 + 1;
        let err = unsafe { slice(p as *const f32, len, "theta") }.unwrap_err();
        assert_eq!(err.status(), Status::InvalidArgument);
        assert!(
            err.message().contains("theta would hold"),
            "{}",
            err.message()
        );
        let err = unsafe { output(p, len, "output") }.err().unwrap();
        assert_eq!(err.status(), Status::InvalidArgument);
    }

    #[test]
    fn errors_set_the_message() {
        let status = guard(|| Err(Error::invalid("x must be > 0, got -1")));
        assert_eq!(status, Status::InvalidArgument as pert_status);
        with_last_error(|m| assert_eq!(m, "x must be > 0, got -1"));
    }
}
