//! The plain batched solve (`pert_op_solve`) and the decision-focused learning methods over
//! it (SPO+, DBB, NID, PG): the C entry points of `PerturbedOp::solve` and
//! `crate::methods`. Each checks its op, sizes and inputs, runs on the caller's buffers as
//! host rows (borrowed for the call; no tensor is made for a host solver), and writes its
//! outputs only once everything has succeeded.

use super::boundary::{self, guard, guard_or, slice};
use super::handle::Handle;
use super::op::pert_op;
use super::status::pert_status;
use crate::error::Result;
use crate::methods::Rows;
use crate::op::{PerturbedOp, PoolAddition};
use crate::shape::checked_product;

/// `batch` rows of the op's input shape at `ptr`, borrowed and checked finite
/// (NULL_ARGUMENT, NON_FINITE_INPUT naming `name`).
///
/// # Safety
/// `ptr` must point to `batch * input_numel` readable floats that nothing writes during the
/// call (as every input of the C API).
unsafe fn rows<'a>(
    op: &PerturbedOp,
    ptr: *const f32,
    batch: usize,
    name: &str,
) -> Result<&'a [f32]> {
    let values = unsafe { unchecked_rows(ptr, op, batch, name) }?;
    shape(op, batch).check_finite(values, name)?;
    Ok(values)
}

/// The `batch` rows of input values at `ptr`, borrowed for the call, not yet checked
/// finite (the method checks them as it reads them).
unsafe fn unchecked_rows<'a>(
    ptr: *const f32,
    op: &PerturbedOp,
    batch: usize,
    name: &str,
) -> Result<&'a [f32]> {
    unsafe { slice(ptr, input_len(op, batch)?, name) }
}

/// `batch * input_numel`, or INVALID_ARGUMENT when it overflows.
pub(super) fn input_len(op: &PerturbedOp, batch: usize) -> Result<usize> {
    checked_product(&[batch, op.input_numel()], "batch * input_numel")
}

/// The `grad_theta` output of a call on `batch` problems (`batch * input_numel` floats).
///
/// # Safety
/// A non-NULL `ptr` must point to that many writable floats for the call.
unsafe fn grad_theta_output(
    op: &PerturbedOp,
    ptr: *mut f32,
    batch: usize,
) -> Result<boundary::Output> {
    unsafe { boundary::output(ptr, input_len(op, batch)?, "grad_theta") }
}

/// The host rows of a call on `batch` problems of `op`.
pub(super) fn shape(op: &PerturbedOp, batch: usize) -> Rows {
    Rows::new(batch, op.input_numel())
}

/// Writes a loss and its gradient (when asked for), staged together, once the solutions
/// have joined the op's pool (nothing written or added when any step fails).
pub(super) fn write(
    op: &PerturbedOp,
    outputs: &(boundary::Output, Option<boundary::Output>),
    (loss, grad, addition): (Vec<f32>, Vec<f32>, PoolAddition),
) -> Result<()> {
    let loss = outputs.0.stage_host(loss)?;
    let grad = outputs
        .1
        .as_ref()
        .map(|out| out.stage_host(grad))
        .transpose()?;
    boundary::write_staged([Some(loss), grad], || addition.commit(op))
}

/// The op of a call of `method`, which needs a linear objective (output shape = input
/// shape), checked before any buffer is read.
///
/// # Safety
/// `op` must be NULL or an op of this library.
pub(super) unsafe fn method_op<'a>(op: *mut pert_op, method: &str) -> Result<&'a PerturbedOp> {
    let op = unsafe { pert_op::borrow(op, "op") }?;
    op.require_square(method)?;
    Ok(op)
}

/// The op's solver on each of `batch` problems, with no noise: y*(x) (a plain batched
/// solve, for methods that need the exact solution, such as SPO+ or a clean evaluation).
/// It runs as a forward call's solves do: on the op's solver threads, its persistent
/// workers (`pert_op_new_ex`, with `pert_solve_info.clean` set and `first_row` counting
/// the problems), its device, or the built-in solver; the results do not depend on the
/// number of threads. It draws no noise: later forward calls draw what they would have.
///
/// The batch is solved at once (spread over the solver threads or workers, not cut into
/// chunks); `pert_op_interrupt` during it makes it return `PERT_STATUS_INTERRUPTED`,
/// having written nothing, once the solver calls running return.
///
/// @param op      The op (not one of `pert_op_new_external`, which has no solver).
/// @param x       `batch * input_numel` floats, row-major `[batch, *input_shape]`, finite;
///                borrowed for the call.
/// @param batch   Number of problems. 0: `PERT_STATUS_OK`, nothing is written (x and
///                output may then be NULL).
/// @param output  Receives `batch * output_numel` floats, `[batch, *output_shape]`; may
///                overlap x (x is read first).
/// @return `PERT_STATUS_NON_FINITE_INPUT` (NaN/Inf in x), `PERT_STATUS_SOLVER_FAILED` (the
///         solver returned non-zero or wrote a non-finite value), `PERT_STATUS_INVALID_ARGUMENT`
///         (sizes overflow, an op without a solver, or a solver on the op's own workers
///         calling it),
///         `PERT_STATUS_TORCH_ERROR`, `PERT_STATUS_INTERRUPTED`. On error `output` is
///         untouched.
#[no_mangle]
pub unsafe extern "C" fn pert_op_solve(
    op: *mut pert_op,
    x: *const f32,
    batch: usize,
    output: *mut f32,
) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        if batch == 0 {
            return Ok(());
        }
        // the solutions are the library's own until they are written: output may overlap x
        let out_len = checked_product(&[batch, op.output_numel()], "batch * output_numel")?;
        let output = unsafe { boundary::output(output, out_len, "output") }?;
        let x = unsafe { rows(op, x, batch, "x") }?;
        // a host solver runs on the rows in place (no tensor is made)
        let y = op.solve_host_rows(x, batch)?;
        output.stage_host(y)?.write();
        Ok(())
    })
}

/// The SPO+ loss of predicted costs against true costs, solutions and objectives, and its
/// gradient with respect to the predicted costs (Elmachtoub & Grigas 2022), per problem.
/// One solve per problem, at q = 2 * pred_cost - true_cost, by the op's solver in its sense
/// (its threads, workers and device, as `pert_op_solve`); signs as PyEPO's `SPOPlus`:
///
/// - `PERT_SENSE_MINIMIZE`: loss = -<q, y*(q)> + 2 <pred_cost, true_sol> - true_obj,
///   grad = 2 (true_sol - y*(q));
/// - `PERT_SENSE_MAXIMIZE`: loss = <q, y*(q)> - 2 <pred_cost, true_sol> + true_obj,
///   grad = 2 (y*(q) - true_sol).
///
/// For an exact solver, true_sol optimal for true_cost and true_obj = <true_cost, true_sol>,
/// the loss is >= 0 (up to the float32 rounding of q), and 0 when pred_cost = true_cost.
/// Dot products are summed in double precision in a fixed order: the results do not depend
/// on the number of threads. The op's output shape must equal its input shape. The inputs
/// are borrowed for the call (true_sol is read after the solve: nothing may write them
/// meanwhile).
///
/// @param pred_cost  `batch * input_numel` floats, finite.
/// @param true_cost  `batch * input_numel` floats, finite.
/// @param true_sol   `batch * input_numel` floats, finite.
/// @param true_obj   `batch` floats, finite.
/// @param batch      Number of problems. 0: `PERT_STATUS_OK`, nothing is written.
/// @param loss       Receives `batch` floats.
/// @param grad       Receives `batch * input_numel` floats; may be NULL. `loss` and `grad`
///                   may overlap the inputs (all are read first), not each other.
/// @return `PERT_STATUS_INVALID_ARGUMENT` (output shape differs from input shape, sizes
///         overflow, an op without a solver, a loss, or a gradient asked for, beyond
///         float32's range),
///         `PERT_STATUS_NULL_ARGUMENT`, `PERT_STATUS_NON_FINITE_INPUT` (NaN/Inf in an input,
///         or 2 * pred_cost - true_cost overflowing float32), and the statuses of
///         `pert_op_solve`. On error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_spo_plus(
    op: *mut pert_op,
    pred_cost: *const f32,
    true_cost: *const f32,
    true_sol: *const f32,
    true_obj: *const f32,
    batch: usize,
    loss: *mut f32,
    grad: *mut f32,
) -> pert_status {
    guard(|| {
        let op = unsafe { method_op(op, "SPO+") }?;
        if batch == 0 {
            return Ok(());
        }
        let len = input_len(op, batch)?;
        let outputs = unsafe { boundary::loss_and_grad_outputs(loss, batch, (grad, len, "grad")) }?;
        // (checked finite by spo_plus_rows)
        let pred = unsafe { unchecked_rows(pred_cost, op, batch, "pred_cost") }?;
        let cost = unsafe { unchecked_rows(true_cost, op, batch, "true_cost") }?;
        let sol = unsafe { unchecked_rows(true_sol, op, batch, "true_sol") }?;
        let obj = unsafe { slice(true_obj, batch, "true_obj") }?;
        let results = op.spo_plus_rows(shape(op, batch), pred, cost, sol, obj, !grad.is_null())?;
        write(op, &outputs, results)
    })
}

/// The backward pass of the differentiable black box (DBB, Vlastelica et al. 2020), whose
/// forward pass is `pert_op_solve` (y = y*(theta)): the gradient with respect to theta of a
/// loss whose gradient with respect to y is `grad_output`. One solve per problem, at
/// theta' = theta + s * lambda * grad_output; the result is s * (y*(theta') - y) / lambda,
/// with s = +1 for `PERT_SENSE_MINIMIZE` and -1 for `PERT_SENSE_MAXIMIZE` (PyEPO's
/// `blackboxOpt`), computed in float32 as written. The op's output shape must equal its
/// input shape. The inputs are borrowed for the call (y is read after the solve).
///
/// @param theta        `batch * input_numel` floats, finite: the forward's input.
/// @param y            `batch * input_numel` floats, finite: the forward's solutions.
/// @param grad_output  `batch * input_numel` floats, finite.
/// @param batch        Number of problems. 0: `PERT_STATUS_OK`, nothing is written.
/// @param lambda       The interpolation step, finite and > 0 (PyEPO recommends 10 to 20,
///                     in the units of theta).
/// @param grad_theta   Receives `batch * input_numel` floats; may overlap the inputs.
/// @return `PERT_STATUS_INVALID_ARGUMENT` (output shape differs from input shape, a bad
///         lambda, sizes overflow, a gradient beyond float32's range: lambda too small),
///         `PERT_STATUS_NULL_ARGUMENT`,
///         `PERT_STATUS_NON_FINITE_INPUT`, and the statuses of `pert_op_solve`. On error
///         nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_blackbox_vjp(
    op: *mut pert_op,
    theta: *const f32,
    y: *const f32,
    grad_output: *const f32,
    batch: usize,
    lambda: f64,
    grad_theta: *mut f32,
) -> pert_status {
    guard(|| {
        let op = unsafe { method_op(op, "the black-box gradient (DBB)") }?;
        crate::methods::check_step(lambda, "lambda")?;
        if batch == 0 {
            return Ok(());
        }
        let out = unsafe { grad_theta_output(op, grad_theta, batch) }?;
        // (checked finite by blackbox_vjp_rows)
        let theta = unsafe { unchecked_rows(theta, op, batch, "theta") }?;
        let y = unsafe { unchecked_rows(y, op, batch, "y") }?;
        let g = unsafe { unchecked_rows(grad_output, op, batch, "grad_output") }?;
        let (grad, addition) = op.blackbox_vjp_rows(shape(op, batch), theta, y, g, lambda)?;
        boundary::write_staged([Some(out.stage_host(grad)?)], || addition.commit(op))
    })
}

/// The backward pass of the negative identity (NID, Sahoo et al. 2023), whose forward pass
/// is `pert_op_solve`: the gradient with respect to theta of a loss whose gradient with
/// respect to y*(theta) is `grad_output`: -grad_output for `PERT_SENSE_MINIMIZE`,
/// grad_output for `PERT_SENSE_MAXIMIZE` (PyEPO's `negativeIdentity`). No solve. The op's
/// output shape must equal its input shape.
///
/// @param grad_output  `batch * input_numel` floats, finite.
/// @param batch        Number of problems. 0: `PERT_STATUS_OK`, nothing is written.
/// @param grad_theta   Receives `batch * input_numel` floats; may overlap grad_output.
/// @return `PERT_STATUS_INVALID_ARGUMENT` (output shape differs from input shape, sizes
///         overflow), `PERT_STATUS_NULL_ARGUMENT`, `PERT_STATUS_NON_FINITE_INPUT`,
///         `PERT_STATUS_TORCH_ERROR`. On error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_negative_identity_vjp(
    op: *mut pert_op,
    grad_output: *const f32,
    batch: usize,
    grad_theta: *mut f32,
) -> pert_status {
    guard(|| {
        let op = unsafe { method_op(op, "the negative identity (NID)") }?;
        if batch == 0 {
            return Ok(());
        }
        let out = unsafe { grad_theta_output(op, grad_theta, batch) }?;
        // (checked finite by negative_identity_vjp_rows)
        let g = unsafe { unchecked_rows(grad_output, op, batch, "grad_output") }?;
        let grad = op.negative_identity_vjp_rows(shape(op, batch), g)?;
        out.stage_host(grad)?.write();
        Ok(())
    })
}

/// The perturbation-gradient loss (PG, Huang & Gupta 2024) of predicted costs along the
/// true costs, and its gradient with respect to the predicted costs (the solutions held
/// fixed), per problem; signs as PyEPO's `perturbationGradient`, s = +1 for
/// `PERT_SENSE_MINIMIZE`, -1 for `PERT_SENSE_MAXIMIZE`:
///
/// - two-sided: w+ = y*(pred + sigma true), w- = y*(pred - sigma true);
///   loss = s (<pred + sigma true, w+> - <pred - sigma true, w->) / (2 sigma),
///   grad = s (w+ - w-) / (2 sigma);
/// - one-sided: w = y*(pred), w- = y*(pred - sigma true);
///   loss = s (<pred, w> - <pred - sigma true, w->) / sigma, grad = s (w - w-) / sigma.
///
/// As sigma -> 0 the loss tends to s <true, y*(pred)>: the true cost of the predicted
/// decision when minimizing, its negation when maximizing. Two solves per problem, made as
/// two solves of the batch (each as `pert_op_solve`). PyEPO divides by sigma + 1e-8 (or
/// 2 sigma + 1e-8); this divides by sigma (or 2 sigma). The op's output shape must equal
/// its input shape.
///
/// @param pred_cost  `batch * input_numel` floats, finite.
/// @param true_cost  `batch * input_numel` floats, finite.
/// @param batch      Number of problems. 0: `PERT_STATUS_OK`, nothing is written.
/// @param sigma      The finite-difference width, finite and > 0.
/// @param two_sided  Non-zero: central differences; 0: backward differences.
/// @param loss       Receives `batch` floats.
/// @param grad       Receives `batch * input_numel` floats; may be NULL. `loss` and `grad`
///                   may overlap the inputs, not each other.
/// @return `PERT_STATUS_INVALID_ARGUMENT` (output shape differs from input shape, a bad
///         sigma, sizes overflow, a loss, or a gradient asked for, beyond float32's
///         range),
///         `PERT_STATUS_NULL_ARGUMENT`,
///         `PERT_STATUS_NON_FINITE_INPUT`, and the statuses of `pert_op_solve`. On error
///         nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_perturbation_gradient(
    op: *mut pert_op,
    pred_cost: *const f32,
    true_cost: *const f32,
    batch: usize,
    sigma: f64,
    two_sided: i32,
    loss: *mut f32,
    grad: *mut f32,
) -> pert_status {
    guard(|| {
        let op = unsafe { method_op(op, "the perturbation gradient (PG)") }?;
        crate::methods::check_step(sigma, "sigma")?;
        if batch == 0 {
            return Ok(());
        }
        let len = input_len(op, batch)?;
        let outputs = unsafe { boundary::loss_and_grad_outputs(loss, batch, (grad, len, "grad")) }?;
        // (checked finite by perturbation_gradient_rows)
        let pred = unsafe { unchecked_rows(pred_cost, op, batch, "pred_cost") }?;
        let cost = unsafe { unchecked_rows(true_cost, op, batch, "true_cost") }?;
        let results = op.perturbation_gradient_rows(
            shape(op, batch),
            pred,
            cost,
            sigma,
            two_sided != 0,
            !grad.is_null(),
        )?;
        write(op, &outputs, results)
    })
}

/// The number of threads that call `op`'s solver callback in a call: its config's threads,
/// with 0 taken as one per core the process may use (within max_threads); for an op of
/// `pert_op_new_ex`, its number of workers. 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_op_solver_threads(op: *const pert_op) -> usize {
    guard_or(0, || {
        // SAFETY: a non-NULL op is a live handle (the caller's contract)
        unsafe { pert_op::get(op) }.map_or(0, |op| op.config().effective_threads())
    })
}
