//! Solver callbacks: the plain `pert_solver_fn`, the `pert_solver_ex` form that learns
//! where its rows sit (`pert_solve_info`) and keeps state per worker (`pert_worker_init`,
//! `pert_worker_fini`), the `pert_device_solver_fn` form that works on device memory, and
//! `pert_solver_set_error`, a solver's own failure message.

use super::boundary::guard_or;
use crate::solver::{DeviceSolver, PoolView, SolveInfo, Solver, WorkerSolver};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};

/// A black-box solver: solves `count` perturbed problems at once.
///
/// @param user_data  The pointer given to `pert_op_new`, passed through untouched.
/// @param inputs     `count * input_numel` floats, row-major `[count, *input_shape]`,
///                   host memory, valid only during the call; read-only (unperturbed
///                   rows, of the clean-input baseline and of `pert_op_solve`, may be
///                   the caller's own theta or x, read in place). Finite, but where
///                   theta + sigma Z (or theta exp(sigma Z - sigma^2 / 2)) overflows
///                   float32 (theta or sigma near its limit): such entries are +-inf (a
///                   call whose loss or objective such a sample reaches then fails with
///                   `PERT_STATUS_INVALID_ARGUMENT`).
/// @param count      Number of problems in this call (at least 1): consecutive perturbed
///                   problems of the call (rows of one or of several problems, see
///                   `pert_solve_info`), or of the unperturbed batch (the clean-input
///                   baseline).
/// @param outputs    Room for `count * output_numel` floats, row-major
///                   `[count, *output_shape]`; every entry must be written, finite.
/// @return 0 on success; any other value aborts the forward call with
///         `PERT_STATUS_SOLVER_FAILED` (its message names the rows; a message set with
///         `pert_solver_set_error` is added).
///
/// The callback must not throw C++ exceptions or longjmp through the library.
pub type pert_solver_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        inputs: *const f32,
        count: usize,
        outputs: *mut f32,
    ) -> i32,
>;

/// Where the rows of one `pert_solver_ex` call sit in its forward call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pert_solve_info {
    /// `sizeof(pert_solve_info)` as the library was built: fields are only ever appended,
    /// so a solver compiled against an older header reads the fields it knows.
    pub struct_size: u32,
    /// The worker running the call, `0 .. threads - 1`; a worker index always runs on the
    /// same OS thread for the op's life.
    pub worker: u32,
    /// 1: the rows are unperturbed problems `first_row .. first_row + count - 1` (the
    /// clean-input baseline's theta, or the x of `pert_op_solve`); 0: perturbed rows.
    pub clean: u32,
    /// Zero.
    pub reserved: u32,
    /// When `clean` is 0: row r of the call is global row `first_row + r` of the forward
    /// call, in problem-major order: problem `(first_row + r) / num_samples`, sample
    /// `(first_row + r) % num_samples`.
    pub first_row: u64,
    /// N of the op.
    pub num_samples: u64,
    /// Problems in this call (forward, Fenchel-Young, draw or `pert_op_solve`).
    pub batch: usize,
    /// Where `inputs` and `outputs` are: -1 for host memory, N for CUDA device N (only
    /// for device solvers of CUDA ops, see `pert_device_solver_fn`).
    pub device: i32,
    /// Warm starts: `pool_best(info, x, n, out)` writes into `out` the solution of the
    /// op's pool (`pert_op_set_pool`) of best <x, y> in the op's sense for an input row `x`,
    /// the pool as this call sees it, and returns 1. `x` and `out` are host memory of `n`
    /// floats each, `n` the input's numel (which the pool's linear objective makes the
    /// output's); another `n`, or an empty pool, returns 0 and writes nothing. A MILP solver
    /// can start from it (an incumbent). Set for the solver calls of the perturbed samples
    /// of an op with a pool (forward and Fenchel-Young calls; not for a device solver's
    /// rows on a GPU), NULL for others (read it only when `struct_size` covers it). Valid
    /// during the solver call only (the `info` of that call), from any thread.
    pub pool_best: pert_pool_best_fn,
    /// The library's, for `pool_best`.
    pub pool: *const c_void,
}

/// See `pert_solve_info.pool_best`.
pub type pert_pool_best_fn = Option<
    unsafe extern "C" fn(
        info: *const pert_solve_info,
        x: *const f32,
        n: usize,
        out: *mut f32,
    ) -> i32,
>;

/// `pert_solve_info.pool_best`: the pool view that `info.pool` points to, searched for `x`.
unsafe extern "C" fn pool_best(
    info: *const pert_solve_info,
    x: *const f32,
    n: usize,
    out: *mut f32,
) -> i32 {
    guard_or(0, || {
        // SAFETY: `info` is the struct the library passed to the solver, during its call:
        // its `pool` points to the call's PoolView (see `c_info`); x and out hold a row
        let Some(info) = (unsafe { info.as_ref() }) else {
            return 0;
        };
        let Some(view) = (unsafe { info.pool.cast::<PoolView>().as_ref() }) else {
            return 0;
        };
        if x.is_null() || out.is_null() || n != view.numel() {
            return 0;
        }
        let x = unsafe { std::slice::from_raw_parts(x, n) };
        match view.best(x) {
            Some(best) if best.len() == n => {
                unsafe { std::ptr::copy_nonoverlapping(best.as_ptr(), out, n) };
                1
            }
            _ => 0,
        }
    })
}

/// A solver that is told which rows it solves (`info`, valid during the call) and runs on
/// the op's persistent workers. Parameters and return as for `pert_solver_fn`.
pub type pert_solver_ex = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        info: *const pert_solve_info,
        inputs: *const f32,
        count: usize,
        outputs: *mut f32,
    ) -> i32,
>;

/// Builds worker `worker`'s state (a model object, say), on that worker's thread, before
/// its first solve; it runs once over the op's life. Non-zero fails the forward call as
/// `PERT_STATUS_SOLVER_FAILED` (with the message set by `pert_solver_set_error`, if any),
/// and every later call of the op too: free it and make a new one. The init hooks of
/// different workers may run at the same time.
pub type pert_worker_init =
    Option<unsafe extern "C" fn(user_data: *mut c_void, worker: u32) -> i32>;

/// Frees worker `worker`'s state, on that worker's thread, at `pert_op_free`: once for
/// each worker whose init ran, whether it succeeded or not (without an init hook: each
/// worker that solved). The fini hooks of all workers run at the same time.
pub type pert_worker_fini = Option<unsafe extern "C" fn(user_data: *mut c_void, worker: u32)>;

/// The longest solver message kept, in bytes.
const MESSAGE_BYTES: usize = 1024;

thread_local! {
    static SOLVER_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Sets the message of the `PERT_STATUS_SOLVER_FAILED` that follows: call it from inside a
/// solver callback or a `pert_worker_init` hook, on the thread that runs it (not from
/// threads of the solver's own), before returning non-zero. The text is copied (up to 1024 bytes; invalid UTF-8 replaced) and
/// kept per thread until that callback returns; NULL clears it. Outside a callback it has
/// no effect on anything.
#[no_mangle]
pub unsafe extern "C" fn pert_solver_set_error(message: *const c_char) {
    guard_or((), || {
        let text = (!message.is_null()).then(|| {
            // SAFETY: the caller passes a NUL-terminated string, read during the call.
            let bytes = unsafe { CStr::from_ptr(message) }.to_bytes();
            let mut end = bytes.len().min(MESSAGE_BYTES);
            let mut text = String::from_utf8_lossy(&bytes[..end]).into_owned();
            // cut at a character boundary of the converted text, within the limit
            while text.len() > MESSAGE_BYTES {
                end -= 1;
                text = String::from_utf8_lossy(&bytes[..end]).into_owned();
            }
            text
        });
        SOLVER_MESSAGE.with(|m| *m.borrow_mut() = text);
    })
}

/// Runs a C callback with this thread's solver message cleared, and turns a non-zero
/// return into the error text: the solver's message, or what it returned.
fn call_c(what: &str, f: impl FnOnce() -> i32) -> Result<(), String> {
    // a callback may run inside another callback on this thread (a solver calling another
    // op): the outer one's message is put back afterwards
    let outer = SOLVER_MESSAGE.with(|m| m.borrow_mut().take());
    let rc = f();
    let message = SOLVER_MESSAGE.with(|m| std::mem::replace(&mut *m.borrow_mut(), outer));
    match (rc, message) {
        (0, _) => Ok(()),
        (rc, Some(message)) => Err(format!("{message} ({what} returned {rc})")),
        (rc, None) => Err(format!("{what} returned {rc}")),
    }
}

/// A `pert_solver_fn` with its user data.
pub(crate) struct CallbackSolver {
    pub solve: unsafe extern "C" fn(*mut c_void, *const f32, usize, *mut f32) -> i32,
    pub user_data: *mut c_void,
}

// SAFETY: the header requires a solver used with threads > 1 to be thread-safe; with one
// thread the callback runs on the thread that called `pert_forward`.
unsafe impl Send for CallbackSolver {}
unsafe impl Sync for CallbackSolver {}

impl Solver for CallbackSolver {
    fn solve(&self, inputs: &[f32], count: usize, outputs: &mut [f32]) -> Result<(), String> {
        // SAFETY: the buffers hold `count` rows each, as the callback's contract says.
        call_c("the solver callback", || unsafe {
            (self.solve)(self.user_data, inputs.as_ptr(), count, outputs.as_mut_ptr())
        })
    }
}

/// A `pert_solver_ex` with its hooks and user data.
pub(crate) struct ExCallbackSolver {
    pub solve: unsafe extern "C" fn(
        *mut c_void,
        *const pert_solve_info,
        *const f32,
        usize,
        *mut f32,
    ) -> i32,
    pub init: pert_worker_init,
    pub fini: pert_worker_fini,
    pub user_data: *mut c_void,
}

// SAFETY: the header says the callbacks run on the op's worker threads (one solve at a
// time per worker, several workers at once when threads > 1) and must be safe for that;
// user_data is only passed through.
unsafe impl Send for ExCallbackSolver {}
unsafe impl Sync for ExCallbackSolver {}

impl WorkerSolver for ExCallbackSolver {
    fn init(&self, worker: usize) -> Result<(), String> {
        match self.init {
            // SAFETY: a hook of the caller's, called as its contract says.
            Some(init) => call_c("the worker init hook", || unsafe {
                init(self.user_data, worker as u32)
            }),
            None => Ok(()),
        }
    }

    fn solve(
        &self,
        info: &SolveInfo,
        inputs: &[f32],
        count: usize,
        outputs: &mut [f32],
    ) -> Result<(), String> {
        let c_info = c_info(info);
        // SAFETY: the buffers hold `count` rows each and `c_info` outlives the call, as the
        // callback's contract says.
        call_c("the solver callback", || unsafe {
            (self.solve)(
                self.user_data,
                &c_info,
                inputs.as_ptr(),
                count,
                outputs.as_mut_ptr(),
            )
        })
    }

    fn fini(&self, worker: usize) {
        if let Some(fini) = self.fini {
            // SAFETY: a hook of the caller's, called as its contract says.
            unsafe { fini(self.user_data, worker as u32) }
        }
    }
}

/// A solver that works where the op's data lives: for a CUDA op, `inputs` and `outputs`
/// are CUDA device pointers on the op's device (`info->device`), which is the current
/// device during the call; for a CPU op they are host pointers (`info->device` is -1).
/// `stream` is NULL (the legacy default stream): the library synchronizes the op's device
/// before the call (the inputs are written) and after it (the solver's work is done), so
/// the solver may queue its work on any stream of that device, or on none. The library
/// never copies the rows to the host (except to name a non-finite output in an error).
/// `info->worker` is 0; the solver runs on the thread that called `pert_forward` (on
/// several threads at once when several calls run on the op). Otherwise as
/// `pert_solver_fn`: every output written, finite; non-zero fails the call. A CUDA fault
/// in the solver's work makes the call fail, and CUDA keeps such errors for the process.
pub type pert_device_solver_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        info: *const pert_solve_info,
        inputs: *const f32,
        count: usize,
        outputs: *mut f32,
        stream: *mut c_void,
    ) -> i32,
>;

/// A `pert_device_solver_fn` with its user data.
pub(crate) struct DeviceCallbackSolver {
    pub solve: unsafe extern "C" fn(
        *mut c_void,
        *const pert_solve_info,
        *const f32,
        usize,
        *mut f32,
        *mut c_void,
    ) -> i32,
    pub user_data: *mut c_void,
}

// SAFETY: as `CallbackSolver`: the header says when the callback runs; user_data is only
// passed through.
unsafe impl Send for DeviceCallbackSolver {}
unsafe impl Sync for DeviceCallbackSolver {}

impl DeviceSolver for DeviceCallbackSolver {
    unsafe fn solve(
        &self,
        info: &SolveInfo,
        inputs: *const f32,
        count: usize,
        outputs: *mut f32,
        stream: *mut c_void,
    ) -> Result<(), String> {
        let c_info = c_info(info);
        // SAFETY: the caller guarantees the pointers (see `DeviceSolver::solve`); `c_info`
        // outlives the call.
        call_c("the solver callback", || unsafe {
            (self.solve)(self.user_data, &c_info, inputs, count, outputs, stream)
        })
    }
}

fn c_info(info: &SolveInfo) -> pert_solve_info {
    pert_solve_info {
        struct_size: std::mem::size_of::<pert_solve_info>() as u32,
        worker: info.worker as u32,
        clean: u32::from(info.clean),
        reserved: 0,
        first_row: info.first_row,
        num_samples: info.num_samples,
        batch: info.batch,
        device: info.cuda_device.map_or(-1, |i| i as i32),
        pool_best: info.pool.as_ref().map(|_| pool_best as _),
        pool: info
            .pool
            .as_ref()
            .map_or(std::ptr::null(), |view| (view as *const PoolView).cast()),
    }
}
