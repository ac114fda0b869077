//! `pert_op`: a solver callback turned into a perturbed optimizer, and its forward call.

use super::boundary::{self, arg_mut, guard, guard_or, slice};
use super::config::pert_config;
pub use super::free_hook::pert_free_hook;
use super::free_hook::FreeHook;
use super::handle::Handle;
pub use super::solver::pert_solver_fn; // its home before `ffi::solver`
use super::solver::{
    pert_device_solver_fn, pert_solver_ex, pert_worker_fini, pert_worker_init, CallbackSolver,
    DeviceCallbackSolver, ExCallbackSolver,
};
use super::status::pert_status;
use super::tape::pert_tape;
use crate::error::{Error, Result};
use crate::kernels::builtin::Builtin;
use crate::op::PerturbedOp;
use crate::shape::checked_product;
use std::ffi::c_void;

/// A perturbed optimizer: y_sigma(theta) = E[solver(theta + sigma Z)] and its gradient.
///
/// Made by `pert_op_new` (or `_ex`, `_device`, `_builtin`, `_external`), freed by `pert_op_free`. It
/// holds a copy of its config. Threads: `pert_forward`, `pert_fenchel_young` and
/// `pert_draw_new` may be called on one op from several threads at once (each call draws
/// its own noise; the solver then runs for several calls at once, except an op of
/// `pert_op_new_ex`, whose calls take turns on its workers); `pert_op_free` only once no
/// call runs. Ops are independent of each other.
pub struct pert_op {
    pub(crate) inner: PerturbedOp,
    /// The hook of `pert_op_on_free`: dropped after `inner` (fields drop in order), so it
    /// runs once the op's workers have stopped and their fini hooks have run.
    on_free: FreeHook,
}

impl Handle for pert_op {
    type Inner = PerturbedOp;
    fn wrap(inner: PerturbedOp) -> Self {
        pert_op {
            inner,
            on_free: FreeHook::default(),
        }
    }
    fn inner(&self) -> &PerturbedOp {
        &self.inner
    }
    fn inner_mut(&mut self) -> &mut PerturbedOp {
        &mut self.inner
    }
}

impl pert_op {
    /// Wraps an op of the safe API as a C handle, for Rust hosts that hand ops to C code
    /// (and for tests of the C boundary with Rust solvers). Free it with `pert_op_free`.
    pub fn into_raw(op: PerturbedOp) -> *mut pert_op {
        <pert_op as Handle>::into_raw(op)
    }
}

/// Reads a C shape (`rank` dimensions at `dims`, which may be NULL when `rank` is 0).
pub(crate) unsafe fn shape(dims: *const i64, rank: usize, name: &str) -> Result<Vec<i64>> {
    if rank == 0 {
        return Ok(Vec::new());
    }
    if rank > 64 {
        return Err(Error::invalid(format!(
            "{name} rank must be at most 64, got {rank}"
        )));
    }
    Ok(unsafe { slice(dims, rank, name) }?.to_vec())
}

/// The arguments every op constructor takes, checked: the config, the two shapes, and
/// where the op goes.
struct OpArgs<'a> {
    config: &'a crate::Config,
    input_shape: Vec<i64>,
    output_shape: Vec<i64>,
    out: &'a mut *mut pert_op,
}

/// Checks and reads the arguments of an op constructor (`output_shape` None: the output
/// shape is the input shape, as for built-ins).
unsafe fn op_args<'a, T>(
    config: *const pert_config,
    input_shape: (*const i64, usize),
    output_shape: Option<(*const i64, usize)>,
    out: *mut *mut pert_op,
    solver: impl FnOnce() -> Result<T>,
) -> Result<(OpArgs<'a>, T)> {
    // in this order: config, out, the solver, the shapes
    let config = unsafe { pert_config::borrow(config, "config") }?;
    let out = unsafe { arg_mut(out, "out") }?;
    let solver = solver()?;
    let input = unsafe { shape(input_shape.0, input_shape.1, "input_shape") }?;
    let output = match output_shape {
        Some((dims, rank)) => unsafe { shape(dims, rank, "output_shape") }?,
        None => input.clone(),
    };
    Ok((
        OpArgs {
            config,
            input_shape: input,
            output_shape: output,
            out,
        },
        solver,
    ))
}

/// NULL_ARGUMENT for a NULL solver.
fn solver_or_null<F>(solver: Option<F>) -> Result<F> {
    solver.ok_or_else(|| Error::new(crate::Status::NullArgument, "solver is NULL"))
}

impl OpArgs<'_> {
    /// Makes the op with `make(config, input_shape, output_shape)` and hands it out.
    fn make(
        self,
        make: impl FnOnce(&crate::Config, &[i64], &[i64]) -> Result<PerturbedOp>,
    ) -> Result<()> {
        let inner = make(self.config, &self.input_shape, &self.output_shape)?;
        *self.out = <pert_op as Handle>::into_raw(inner);
        Ok(())
    }
}

/// Makes a perturbed op over a solver callback.
///
/// @param config        Settings, copied: the config may be freed afterwards.
/// @param input_shape   The shape of one problem's input theta (`input_rank` dimensions,
///                      each >= 1; may be NULL when `input_rank` is 0, a scalar input).
/// @param output_shape  The shape of one problem's solution (`output_rank` dimensions, each
///                      >= 1; may be NULL when `output_rank` is 0: one scalar per problem).
/// @param solver        The solver callback; see `pert_solver_fn`. It runs on the thread
///                      that calls `pert_forward` when the config has threads = 1; with
///                      threads > 1 it runs concurrently on that many threads (each call on
///                      a disjoint slice of the problems) and must be thread-safe.
/// @param user_data     Passed to every solver call untouched; must stay valid while the
///                      op exists.
/// @param out           Receives the op on success; untouched on error.
/// @return `PERT_STATUS_NULL_ARGUMENT` (config, solver, out, or a shape with rank > 0),
///         `PERT_STATUS_INVALID_ARGUMENT` (a dimension < 1, rank > 64, sizes overflow, or
///         settings that do not go together: Gumbel noise with the multiplicative
///         perturbation or antithetic pairs, antithetic pairs with an odd num_samples),
///         `PERT_STATUS_DEVICE_UNAVAILABLE` (the config's CUDA device is missing).
#[no_mangle]
pub unsafe extern "C" fn pert_op_new(
    config: *const pert_config,
    input_shape: *const i64,
    input_rank: usize,
    output_shape: *const i64,
    output_rank: usize,
    solver: pert_solver_fn,
    user_data: *mut c_void,
    out: *mut *mut pert_op,
) -> pert_status {
    guard(|| {
        let (args, solve) = unsafe {
            op_args(
                config,
                (input_shape, input_rank),
                Some((output_shape, output_rank)),
                out,
                || solver_or_null(solver),
            )
        }?;
        // the C layer copies theta into a tensor of its own for every call
        args.make(|c, i, o| {
            PerturbedOp::new_with_private_theta(c, (i, o), CallbackSolver { solve, user_data })
        })
    })
}

/// Makes a perturbed op over a solver that keeps state per worker thread and learns where
/// its rows sit: for solvers from real codebases (a MILP model object, a graph, a warm
/// start) that are costly to build and not thread-safe.
///
/// The op owns `threads` worker threads (the config's; 0: one per core, within
/// `max_threads`), started here and stopped by `pert_op_free`. Worker w is always the same
/// OS thread; `init(user_data, w)` runs on it once over the op's life, before its first
/// solve (if it fails, that call and every later one fails: make a new op), and
/// `fini(user_data, w)` runs on it at `pert_op_free` for each worker whose init ran.
/// Every solve runs on a worker, never on the thread that called `pert_forward` (which
/// waits), and a worker runs one solve at a time: concurrent `pert_forward` calls on one
/// op take turns on its workers (make one op per thread to solve in parallel). Each
/// solver call gets consecutive rows of the call in problem-major order, which may span
/// several problems; together the calls cover every (problem, sample) once (plus the
/// unperturbed rows, flagged `clean`, under the clean-input baseline). Results are the
/// same for any number of threads, bit for bit. The init hooks of different workers may
/// run at the same time (as may their solves), and the fini hooks all run at once at
/// `pert_op_free`: serialize inside them what is not thread-safe. A solver or hook must
/// not call `pert_op_free` on its own op, nor `pert_forward` on an op whose solver calls
/// back into this one (each would wait for the other); `pert_forward` on its own op is
/// refused with `PERT_STATUS_INVALID_ARGUMENT`. An op's workers do not survive `fork()`:
/// in a child process its calls fail with `PERT_STATUS_INVALID_ARGUMENT` (make the op
/// there), and `pert_op_free` there returns at once, whatever other threads of the parent
/// were doing at the fork (no fini runs in the child; the parent's op is unaffected).
///
/// @param solver     The solver; see `pert_solver_ex`.
/// @param user_data  Passed to every callback untouched; must stay valid while the op
///                   exists (until `pert_op_free` has returned).
/// @param init       May be NULL (no per-worker set-up).
/// @param fini       May be NULL.
/// @return the errors of `pert_op_new`; `PERT_STATUS_INVALID_ARGUMENT` when the config's
///         `max_threads` is below its threads; `PERT_STATUS_TORCH_ERROR` when the worker
///         threads cannot be started.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn pert_op_new_ex(
    config: *const pert_config,
    input_shape: *const i64,
    input_rank: usize,
    output_shape: *const i64,
    output_rank: usize,
    solver: pert_solver_ex,
    user_data: *mut c_void,
    init: pert_worker_init,
    fini: pert_worker_fini,
    out: *mut *mut pert_op,
) -> pert_status {
    guard(|| {
        let (args, solve) = unsafe {
            op_args(
                config,
                (input_shape, input_rank),
                Some((output_shape, output_rank)),
                out,
                || solver_or_null(solver),
            )
        }?;
        let solver = ExCallbackSolver {
            solve,
            init,
            fini,
            user_data,
        };
        args.make(|c, i, o| PerturbedOp::with_workers_private_theta(c, (i, o), solver))
    })
}

/// Makes a perturbed op over a solver that works on the op's device memory (see
/// `pert_device_solver_fn`): for solvers written in CUDA or libtorch C++, which take the
/// perturbed rows where they were drawn and leave the solutions there, with no copy to the
/// host. Chunks of samples (see `pert_config_set_chunk_bytes`) are drawn, solved and summed
/// on the op's device; under "auto" such an op runs on CUDA device 0 when a GPU is present.
/// On a CPU op the same pipeline passes host memory (a CPU build of the solver, or a test
/// of it); draws for the two-phase API on such an op come from that pipeline too. The
/// solver is called from the thread that calls `pert_forward`, one chunk at a time per
/// call (concurrent calls on the op call it concurrently); the config's `threads` does not
/// apply.
///
/// Parameters and errors as for `pert_op_new`.
#[no_mangle]
pub unsafe extern "C" fn pert_op_new_device(
    config: *const pert_config,
    input_shape: *const i64,
    input_rank: usize,
    output_shape: *const i64,
    output_rank: usize,
    solver: pert_device_solver_fn,
    user_data: *mut c_void,
    out: *mut *mut pert_op,
) -> pert_status {
    guard(|| {
        let (args, solve) = unsafe {
            op_args(
                config,
                (input_shape, input_rank),
                Some((output_shape, output_rank)),
                out,
                || solver_or_null(solver),
            )
        }?;
        args.make(|c, i, o| {
            PerturbedOp::new_device(c, i, o, DeviceCallbackSolver { solve, user_data })
        })
    })
}

/// One-hot of the largest entry along the last dimension: the first of equal largest
/// entries (IEEE comparison: -0 equals +0). Its statistics are accumulated as counts of
/// winners (no one-hot products).
pub const PERT_BUILTIN_ARGMAX: u32 = 0;
/// Indicator (1.0 / 0.0) of the k largest entries along the last dimension, in the total
/// order of floats (-0 below +0), equal entries taken first to last; with k = 1, the
/// argmax's rule. Perturbed samples and the unperturbed theta of the clean-input baseline,
/// on the CPU and on CUDA, follow the same rule.
pub const PERT_BUILTIN_TOPK: u32 = 1;
/// 1-based ranks along the last dimension, the smallest entry ranked 1, in the total order
/// of floats (-0 below +0), equal entries ranked in the order of their positions
/// (everywhere, as top-k).
pub const PERT_BUILTIN_RANKS: u32 = 2;

/// Makes a perturbed op over a built-in solver: no callback; on CUDA it runs in libtorch on
/// the device (no host round trip), on the CPU in the library's own code on all cores. The output shape is the input shape; the
/// solver works along the last dimension.
///
/// @param builtin      `PERT_BUILTIN_ARGMAX`, `PERT_BUILTIN_TOPK` or `PERT_BUILTIN_RANKS`.
/// @param k            For top-k: 1 <= k <= the last dimension; ignored otherwise.
/// @param input_shape  `input_rank` >= 1 dimensions, each >= 1.
/// @param out          Receives the op on success; untouched on error.
/// The built-ins maximize <theta, y> (top-k: the k largest entries; ranks: the largest
/// entry ranked highest): the config's sense must be `PERT_SENSE_MAXIMIZE` (to minimize,
/// negate theta, or give a solver callback).
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` for an unknown builtin, a bad k, rank 0, a
///         config whose sense is `PERT_SENSE_MINIMIZE`, and the errors of `pert_op_new`.
#[no_mangle]
pub unsafe extern "C" fn pert_op_new_builtin(
    config: *const pert_config,
    builtin: u32,
    k: i64,
    input_shape: *const i64,
    input_rank: usize,
    out: *mut *mut pert_op,
) -> pert_status {
    guard(|| {
        let (args, builtin) = unsafe {
            op_args(config, (input_shape, input_rank), None, out, || {
                Builtin::from_u32(builtin, k)
            })
        }?;
        args.make(|c, i, _| PerturbedOp::new_builtin(c, builtin, i))
    })
}

/// Makes a perturbed op whose problems are solved outside the library, through the
/// two-phase API (`pert_draw_new`, then `pert_draw_finish`): for solvers that cannot be
/// called back (another process, a cluster job, a GPU batch solver). `pert_forward` and
/// `pert_fenchel_young` on it fail with `PERT_STATUS_INVALID_ARGUMENT`.
///
/// Parameters and errors as for `pert_op_new`, without the solver.
#[no_mangle]
pub unsafe extern "C" fn pert_op_new_external(
    config: *const pert_config,
    input_shape: *const i64,
    input_rank: usize,
    output_shape: *const i64,
    output_rank: usize,
    out: *mut *mut pert_op,
) -> pert_status {
    guard(|| {
        let (args, ()) = unsafe {
            op_args(
                config,
                (input_shape, input_rank),
                Some((output_shape, output_rank)),
                out,
                || Ok(()),
            )
        }?;
        args.make(PerturbedOp::new_external)
    })
}

/// Frees an op. NULL is accepted and ignored. Tapes made by the op stay valid.
#[no_mangle]
pub unsafe extern "C" fn pert_op_free(op: *mut pert_op) {
    guard_or((), || {
        // SAFETY: a non-NULL op comes from `pert_op_new` and is freed once.
        unsafe { pert_op::free(op) }
    })
}

/// Registers `hook(data)` to run once when the op is freed: inside `pert_op_free`, on the
/// thread that calls it, after the op's workers have stopped and their fini hooks have run
/// (no callback of the op runs after it). For code built on the op that keeps state of its
/// own: the `user_data` of its callbacks, a service to end (the MPI component). A forked
/// child's `pert_op_free` runs it too, in the child, where no worker or fini hook runs
/// (the workers did not survive the fork). A hook set before is replaced (and
/// does not run); a NULL hook removes it. The hook must not call back into this op.
///
/// @param data  Passed to the hook untouched.
/// @return `PERT_STATUS_NULL_ARGUMENT` when `op` is NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_op_on_free(
    op: *mut pert_op,
    hook: pert_free_hook,
    data: *mut c_void,
) -> pert_status {
    guard(|| {
        // SAFETY: a non-NULL op is a live handle; only its hook's mutex is touched, so
        // calls running on the op from other threads are not disturbed
        let op = unsafe { op.as_ref() }.ok_or_else(|| super::boundary::null("op"))?;
        op.on_free.set(hook, data);
        Ok(())
    })
}
/// Interrupts the calls running on `op`, from any thread: each `pert_forward`,
/// `pert_fenchel_young` and `pert_op_solve` call running on it now returns
/// `PERT_STATUS_INTERRUPTED` at its
/// next block of samples (within about one block's time, or when the solver call that
/// runs returns: solver calls are not cut short), having written nothing: no output, no
/// tape. Calls that start afterwards are not affected; to stop a call that may not have
/// started yet, call again while it runs. Safe in a signal handler (one atomic increment:
/// no lock, no allocation, no error message) and while the op's calls run. NULL is
/// ignored. Draws (`pert_draw_new`, `pert_draw_finish`) are not interrupted.
#[no_mangle]
pub unsafe extern "C" fn pert_op_interrupt(op: *const pert_op) {
    // SAFETY: a non-NULL op is a live handle (the caller's contract, as everywhere); only
    // an atomic of it is touched, which no panic can come from
    if let Some(op) = unsafe { pert_op::get(op) } {
        op.interrupt();
    }
}

/// The number of floats in one problem's input (the product of `input_shape`); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_op_input_numel(op: *const pert_op) -> usize {
    guard_or(0, || {
        unsafe { pert_op::get(op) }.map_or(0, PerturbedOp::input_numel)
    })
}

/// The number of floats in one problem's output (the product of `output_shape`, 1 for rank
/// 0); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_op_output_numel(op: *const pert_op) -> usize {
    guard_or(0, || {
        unsafe { pert_op::get(op) }.map_or(0, PerturbedOp::output_numel)
    })
}

/// The perturbed solution y_sigma(theta) = mean over num_samples of solver(theta + sigma Z),
/// for a batch of problems, and optionally the tape for its gradient.
///
/// Each call draws fresh noise; the draws are a pure function of (seed, number of earlier
/// forward calls on this op; calls with batch 0 do not count), and the results do not
/// depend on the number of threads.
///
/// @param op      The op.
/// @param theta   `batch * input_numel` floats, row-major `[batch, *input_shape]`, finite;
///                borrowed for the call: read in place (not copied), so it must not change
///                until the call returns (not from the callback, not from another thread).
/// @param batch   Number of problems. 0: `PERT_STATUS_OK`, nothing is written to output
///                (theta and output may then be NULL), and a tape, when asked for, is a
///                valid empty tape whose products succeed and write nothing.
/// @param output  Receives `batch * output_numel` floats, `[batch, *output_shape]`; may
///                overlap theta (theta is read first).
/// @param tape    NULL when no gradient is needed; else receives a new tape on success
///                (free it with `pert_tape_free`). A tape holds at most about
///                `2 * batch * output_numel * input_numel` floats, and usually much
///                less (see `pert_config_set_max_tape_bytes`).
/// @return `PERT_STATUS_NON_FINITE_INPUT` (NaN/Inf in theta), `PERT_STATUS_SOLVER_FAILED`
///         (a callback returned non-zero or wrote a non-finite value),
///         `PERT_STATUS_INVALID_ARGUMENT` (sizes overflow), `PERT_STATUS_TORCH_ERROR`
///         (e.g. out of memory), `PERT_STATUS_INTERRUPTED` (`pert_op_interrupt` while it
///         ran). On error `output` is untouched and `*tape` is not written.
#[no_mangle]
pub unsafe extern "C" fn pert_forward(
    op: *mut pert_op,
    theta: *const f32,
    batch: usize,
    output: *mut f32,
    tape: *mut *mut pert_tape,
) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        if batch == 0 && tape.is_null() {
            return Ok(()); // nothing to compute (batch 0 with a tape gives an empty tape)
        }
        op.check_batch(batch)?;
        // (sizes, then NULLs, in this order; SAFETY of both: the caller's contract, the
        // buffers valid for these sizes during the call)
        let input_len = checked_product(&[batch, op.input_numel()], "batch * input_numel")?;
        let output_len = checked_product(&[batch, op.output_numel()], "batch * output_numel")?;
        let output = unsafe { boundary::output(output, output_len, "output") }?;
        let theta = unsafe { slice(theta, input_len, "theta") }?;
        let shape = crate::shape::batched(batch, op.input_shape());
        // theta is read in place, borrowed for the call (its contract); the output, which
        // may overlap it, is written once it is no longer read, and once everything that
        // can fail (allocations, the pool's additions) has succeeded.
        // SAFETY: the tape and the additions hold no tensor that shares theta's memory (the
        // call makes its own: tests/c/test_overlap.c); with_view_and checks the mean.
        let (y, (t, additions)) = unsafe {
            crate::tensors::with_view_and(theta, |view| {
                let theta = view.f_reshape(&shape)?;
                Ok(if tape.is_null() {
                    let (y, additions) = op.forward_deferred(&theta)?;
                    (y, (None, additions))
                } else {
                    let (y, t, additions) = op.forward_with_tape_deferred(&theta)?;
                    (y, (Some(t), additions))
                })
            })
        }?;
        let staged = output.stage(&y)?; // (float32 tile sums of solutions near its limit can overflow)
        let t = t.map(pert_tape::boxed);
        additions.commit()?;
        staged.write();
        if let Some(t) = t {
            // SAFETY: non-NULL (t is made only then); written only on success.
            unsafe { *tape = t.into_raw() };
        }
        Ok(())
    })
}

/// The Fenchel-Young loss of theta against target solutions y_true, and its gradient,
/// from one forward call's draws (one call's worth of fresh noise, like `pert_forward`).
///
/// - `PERT_SENSE_MAXIMIZE`: loss = F_sigma(theta) - <theta, y_true>, grad = y_sigma(theta) - y_true.
/// - `PERT_SENSE_MINIMIZE`: loss = <theta, y_true> - F_sigma(theta), grad = y_true - y_sigma(theta).
///
/// (For the multiplicative perturbation y_sigma is replaced by E[exp(sigma Z - sigma^2/2) * y*(eta)].)
/// This is the true loss value, >= 0 up to Monte-Carlo error when y_true is feasible, not
/// the squared distance the original code returned.
///
/// @param theta       `batch * input_numel` floats, finite.
/// @param y_true      `batch * input_numel` floats (output shape = input shape), finite.
/// @param loss        Receives `batch` floats.
/// @param grad_theta  Receives `batch * input_numel` floats; may be NULL. `loss` and
///                    `grad_theta` may overlap theta or y_true (both are read first), not
///                    each other.
/// @return `PERT_STATUS_INVALID_ARGUMENT` when the op's output shape differs from its input
///         shape; `PERT_STATUS_NON_FINITE_INPUT` for NaN/Inf in theta or y_true; the
///         statuses of `pert_forward`. On error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_fenchel_young(
    op: *mut pert_op,
    theta: *const f32,
    y_true: *const f32,
    batch: usize,
    loss: *mut f32,
    grad_theta: *mut f32,
) -> pert_status {
    // SAFETY: the caller's contract, as documented; no bound is asked for
    unsafe {
        pert_fenchel_young_with_bound(
            op,
            theta,
            y_true,
            batch,
            loss,
            grad_theta,
            std::ptr::null_mut(),
        )
    }
}

/// `pert_fenchel_young`, and a check of its inputs: the lower bound of each problem's loss
/// that the call's own draws give for an exact solver and a feasible target,
/// sign * <mean perturbed input - theta, y_true> (sign 1 maximizing, -1 minimizing; the
/// mean perturbed input is theta + sigma * mean Z for the additive perturbation). Each
/// sample's solution does at least as well as y_true on its own perturbed input, so the
/// estimated loss is never below this bound, for every draw. The bound written is lowered by
/// an allowance for the rounding of the loss, 1e-4 * (|F_sigma(theta)| + |<theta, y_true>| +
/// sigma * sum |y_true|), so that a loss below it means that the sense is wrong (a
/// minimizing solver with `PERT_SENSE_MAXIMIZE` gives the reverse inequality), the solver
/// is not exact, or y_true is not a feasible solution. Keeping the bound costs one sum of
/// the perturbed inputs per problem.
///
/// @param bound  NULL (then as `pert_fenchel_young`), or receives `batch` floats; must not
///               overlap the other outputs (it may overlap the inputs).
/// @return the statuses of `pert_fenchel_young`. On error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_fenchel_young_with_bound(
    op: *mut pert_op,
    theta: *const f32,
    y_true: *const f32,
    batch: usize,
    loss: *mut f32,
    grad_theta: *mut f32,
    bound: *mut f32,
) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        op.require_square("the Fenchel-Young loss")?;
        if batch == 0 {
            return Ok(());
        }
        op.check_batch(batch)?;
        let d = op.input_numel();
        let len = checked_product(&[batch, d], "batch * input_numel")?;
        let outputs = unsafe {
            boundary::loss_and_grad_outputs(loss, batch, (grad_theta, len, "grad_theta"))
        }?;
        let bound = unsafe { boundary::bound_output(bound, batch) }?;
        // the inputs are copied before anything is written: outputs may overlap them
        let shape = crate::shape::batched(batch, op.input_shape());
        let theta = crate::tensors::from_slice(unsafe { slice(theta, len, "theta") }?)?
            .f_reshape(&shape)?;
        let y_true = crate::tensors::from_slice(unsafe { slice(y_true, len, "y_true") }?)?
            .f_reshape(&shape)?;
        let (l, g, b, additions) = op.fenchel_young_call(&theta, &y_true, bound.is_some())?;
        let bound = bound.as_ref().zip(b.as_ref());
        // (the pool's additions once every output is staged, before any is written)
        boundary::write_loss_and_grad(&outputs, &l, &g, bound, || additions.commit())
    })
}
