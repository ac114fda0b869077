//! Errors of the safe API: a stable status class and a message that names the
//! argument, the problem and the offending value.

use std::fmt;

/// The statuses, one list: each variant's number, its name (the C constant without its
/// `PERT_STATUS_` prefix) and its doc. `Status`, `Status::ALL`, `Status::name` and
/// `Status::c_name` (`pert_status_name`) are made from it; the C constants of
/// `ffi/status.rs` are spelled out for the header generator and checked against it.
macro_rules! statuses {
    ($($(#[doc = $doc:literal])* $variant:ident = $number:literal, $name:literal;)*) => {
        /// The class of an error. The numbers are the C API's `pert_status` values and are
        /// stable: a number is never reused for another meaning.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum Status {
            $($(#[doc = $doc])* $variant = $number,)*
        }

        impl Status {
            /// Every status, in numeric order.
            pub const ALL: [Status; [$($number),*].len()] = [$(Status::$variant),*];
        }

        // the numbers are 0, 1, 2, ... in the list's order (`from_u32` indexes `ALL`)
        const _: () = {
            let mut i = 0;
            while i < Status::ALL.len() {
                assert!(Status::ALL[i] as usize == i, "statuses are numbered in order");
                i += 1;
            }
        };

        impl Status {

            /// A static, upper-case name, the C constant without its `PERT_STATUS_` prefix.
            pub fn name(self) -> &'static str {
                match self {
                    $(Status::$variant => $name,)*
                }
            }

            /// The C constant's name, such as `PERT_STATUS_NULL_ARGUMENT`.
            pub fn c_name(self) -> &'static std::ffi::CStr {
                match self {
                    $(Status::$variant => {
                        const NAME: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
                            concat!("PERT_STATUS_", $name, "\0").as_bytes(),
                        ) {
                            Ok(name) => name,
                            Err(_) => panic!("a status name holds no NUL"),
                        };
                        NAME
                    })*
                }
            }
        }
    };
}

statuses! {
    /// Success.
    Ok = 0, "OK";
    /// A required pointer was NULL.
    NullArgument = 1, "NULL_ARGUMENT";
    /// An argument was out of its documented range, or sizes did not fit.
    InvalidArgument = 2, "INVALID_ARGUMENT";
    /// An input (theta, a gradient, a target) held NaN or an infinity.
    NonFiniteInput = 3, "NON_FINITE_INPUT";
    /// The solver returned non-zero or wrote non-finite values.
    SolverFailed = 4, "SOLVER_FAILED";
    /// The requested device does not exist on this machine, or this call cannot use it (a
    /// process forked after CUDA started; a CUDA graph capture on the current stream; a
    /// CUDA context other than a primary one current on the thread).
    DeviceUnavailable = 5, "DEVICE_UNAVAILABLE";
    /// libtorch reported an error, or memory could not be allocated.
    TorchError = 6, "TORCH_ERROR";
    /// A panic was caught at the C boundary.
    Panic = 7, "PANIC";
    /// The call was interrupted (`PerturbedOp::interrupt`) before it finished.
    Interrupted = 8, "INTERRUPTED";
}

impl Status {
    /// The status with this number, if there is one.
    pub fn from_u32(value: u32) -> Option<Status> {
        Status::ALL.get(value as usize).copied()
    }
}

/// An error of the library: a status class and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    /// An error of class `status` with `message`.
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }

    /// An [`Status::InvalidArgument`] error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidArgument, message)
    }

    /// The error's class.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The error's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.name(), self.message)
    }
}

impl std::error::Error for Error {}

impl From<tch::TchError> for Error {
    fn from(err: tch::TchError) -> Error {
        let text = match &err {
            tch::TchError::Torch(what) => what.clone(),
            other => other.to_string(),
        };
        Error::new(
            Status::TorchError,
            format!("libtorch: {}", first_line(&text)),
        )
    }
}

/// The most bytes of a libtorch message kept in an error (its first meaningful line).
const TORCH_MESSAGE_BYTES: usize = 512;

/// The first meaningful line of a libtorch message, which goes on with the C++ call stack
/// ("Exception raised from ... (most recent call first):", then one line per frame): the
/// first non-empty line before that part, at most [`TORCH_MESSAGE_BYTES`] bytes (cut at a
/// character boundary).
fn first_line(what: &str) -> &str {
    let head = what.split("Exception raised from").next().unwrap_or("");
    let line = head
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no message)");
    let mut end = line.len().min(TORCH_MESSAGE_BYTES);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// A number as a message shows it: as written (`-1`, `0.5`) at ordinary magnitudes, in
/// scientific notation beyond them (`1e300`, not three hundred digits).
pub(crate) fn number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || (1e-4..1e16).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// The result type of the safe API.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(number(-1.0), "-1");
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(1e300), "1e300");
        assert_eq!(number(-1e-300), "-1e-300");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(0.0), "0");
    }

    #[test]
    fn libtorch_messages_keep_their_first_line_only() {
        let what = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: \
                    you tried to allocate 4398046511104 bytes.\n\
                    Exception raised from computeStorageNbytesContiguous at /pytorch/aten/src/ATen/EmptyTensor.cpp:49 \
                    (most recent call first):\nframe #0: c10::Error::Error(...) + 0x9c (0x7f in libc10.so)\n"
            .to_string()
            + &"frame #1: something + 0x1 (0x7f in libtorch_cpu.so)\n".repeat(100);
        let err = Error::from(tch::TchError::Torch(what));
        assert_eq!(err.status(), Status::TorchError);
        assert_eq!(
            err.message(),
            "libtorch: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 4398046511104 bytes."
        );
        // a message that starts with the stack, and a huge one line message
        let err = Error::from(tch::TchError::Torch("\n\nException raised from x".into()));
        assert_eq!(err.message(), "libtorch: (no message)");
        let err = Error::from(tch::TchError::Torch("é".repeat(5000)));
        assert!(err.message().len() < 1024, "{}", err.message().len());
        assert!(err.message().starts_with("libtorch: éé"));
    }
}
