//! `pert_imle`: I-MLE and AI-MLE (the record of a forward call, and the backward passes).

use super::boundary::{self, guard, guard_or, slice};
use super::handle::{handle, Handle};
use super::op::pert_op;
use super::status::pert_status;
use crate::methods::{AimleState, ImleRecord, Rows};
use crate::shape::{batched, checked_product};

/// The record of an I-MLE forward call (`pert_imle_forward`): its perturbed inputs and their
/// solutions, 2 * batch * num_samples * input_numel floats, for the backward passes
/// `pert_imle_vjp` and `pert_aimle_vjp` with the same op. Freed by `pert_imle_free`.
/// Threads: the functions taking `const pert_imle *` may run concurrently on one record.
pub struct pert_imle {
    inner: ImleRecord,
}

handle!(pert_imle, ImleRecord);

/// The state of AI-MLE's adaptive step (PyEPO's `adaptiveImplicitMLE`): the step is
/// lambda = alpha * |theta| / |grad_output| (norms over the whole batch); after each
/// backward pass, grad_norm_avg = 0.9 grad_norm_avg + 0.1 (the fraction of gradient entries
/// above 1e-8 in magnitude), and alpha += step while grad_norm_avg < 1, else alpha -= step
/// (not below 0). Start from `pert_aimle_state_default()`; keep one per layer.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pert_aimle_state {
    /// The step's magnitude relative to |theta| / |grad_output|; default 1.
    pub alpha: f64,
    /// The moving average of the fraction of non-zero gradient entries; default 1.
    pub grad_norm_avg: f64,
    /// How much alpha moves per backward pass; default 0.001.
    pub step: f64,
}

/// The default AI-MLE state: alpha 1, grad_norm_avg 1, step 0.001.
#[no_mangle]
pub extern "C" fn pert_aimle_state_default() -> pert_aimle_state {
    let s = AimleState::default();
    pert_aimle_state {
        alpha: s.alpha,
        grad_norm_avg: s.grad_norm_avg,
        step: s.step,
    }
}

/// I-MLE's forward pass (Niepert et al. 2021; PyEPO's `implicitMLE`): y_sigma(theta), the
/// mean over the op's num_samples of y*(theta + sigma Z) with the op's noise (Sum-of-Gamma
/// noise, `PERT_NOISE_SUM_OF_GAMMA`, is the paper's; any noise works, as no score is
/// needed), from one call's draws (the same as `pert_forward`'s), and the record of that
/// call's perturbed inputs and solutions for the backward pass. The solver sees the rows as
/// a forward call's (problem and sample in `pert_solve_info`). The op's output shape must
/// equal its input shape.
///
/// @param theta   `batch * input_numel` floats, finite.
/// @param batch   Number of problems. 0: `PERT_STATUS_OK`, nothing is written to output
///                (theta and output may then be NULL), no noise is drawn (the call does
///                not count), and `*record` receives a valid empty record whose backward
///                passes succeed and write nothing.
/// @param output  Receives `batch * input_numel` floats; may overlap theta.
/// @param record  Receives the record on success (free it with `pert_imle_free`); untouched
///                on error.
/// @return `PERT_STATUS_INVALID_ARGUMENT` (output shape differs from input shape, sizes
///         overflow), `PERT_STATUS_NULL_ARGUMENT`, and the statuses of
///         `pert_forward`. On error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_imle_forward(
    op: *mut pert_op,
    theta: *const f32,
    batch: usize,
    output: *mut f32,
    record: *mut *mut pert_imle,
) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        op.require_square("I-MLE")?;
        let record = unsafe { boundary::arg_mut(record, "record") }?;
        op.check_batch(batch)?;
        let d = op.input_numel();
        let len = checked_product(&[batch, d], "batch * input_numel")?;
        let out = unsafe { boundary::output(output, len, "output") }?;
        let values = unsafe { slice(theta, len, "theta") }?;
        let rows = Rows { batch, d };
        rows.check_finite(values, "theta")?;
        let tensor =
            crate::tensors::from_slice(values)?.f_reshape(batched(batch, op.input_shape()))?;
        let (mean, inner, additions) = op.imle_forward_rows(rows, values.to_vec(), &tensor)?;
        out.check_finite(&mean)?;
        let staged = out.stage_host(mean)?;
        let handle = pert_imle::boxed(inner);
        additions.commit()?; // (the last step that can fail: a failed call adds nothing)
        staged.write();
        *record = handle.into_raw();
        Ok(())
    })
}

/// The record's grad_output, checked (the record from `op`, `batch * input_numel` finite
/// floats).
///
/// # Safety
/// As the callers' contracts.
unsafe fn record_and_grad<'a>(
    op: *mut pert_op,
    record: *const pert_imle,
    grad_output: *const f32,
    grad_theta: *mut f32,
) -> crate::error::Result<(
    &'a crate::PerturbedOp,
    &'a ImleRecord,
    &'a [f32],
    boundary::Output,
)> {
    let op = unsafe { pert_op::borrow(op, "op") }?;
    let record = unsafe { pert_imle::borrow(record, "record") }?;
    op.check_record(record)?;
    let rows = Rows {
        batch: record.batch(),
        d: op.input_numel(),
    };
    let len = checked_product(&[rows.batch, rows.d], "batch * input_numel")?;
    let out = unsafe { boundary::output(grad_theta, len, "grad_theta") }?;
    let g = unsafe { slice(grad_output, len, "grad_output") }?;
    rows.check_finite(g, "grad_output")?;
    Ok((op, record, g, out))
}

/// I-MLE's backward pass: the gradient with respect to theta of a loss whose gradient with
/// respect to the forward's output is `grad_output` (`record`'s batch * input_numel floats).
/// With x_k the forward's perturbed inputs and s = +1 for `PERT_SENSE_MINIMIZE`, -1 for
/// `PERT_SENSE_MAXIMIZE` (PyEPO's `implicitMLE`):
///
/// - one-sided: s * mean_k (y*(x_k + s lambda g) - y*(x_k)) / lambda (the target
///   distribution theta - lambda g when maximizing): one solve per sample;
/// - two-sided: mean_k (y*(x_k + lambda g) - y*(x_k - lambda g)) / (2 lambda): two.
///
/// With a solution pool (`pert_op_set_pool`), a moved sample is answered from the pool
/// (as it was when this call began) where the forward answered x_k from it, and solved
/// where the forward solved x_k: each difference is of two solves or of two answers. The
/// new solutions join the pool once the call has succeeded.
///
/// @param op         The op whose `pert_imle_forward` made `record` (another op is refused).
/// @param lambda     The step, finite and > 0.
/// @param two_sided  Non-zero for central differences.
/// @param grad_theta Receives `batch * input_numel` floats; may overlap grad_output.
/// @return `PERT_STATUS_INVALID_ARGUMENT` (a bad lambda, a record of another op, a gradient
///         beyond float32's range), `PERT_STATUS_NULL_ARGUMENT`,
///         `PERT_STATUS_NON_FINITE_INPUT`, and the statuses of `pert_op_solve`. On error
///         nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_imle_vjp(
    op: *mut pert_op,
    record: *const pert_imle,
    grad_output: *const f32,
    lambda: f64,
    two_sided: i32,
    grad_theta: *mut f32,
) -> pert_status {
    guard(|| {
        crate::methods::check_step(lambda, "lambda")?;
        let (op, record, g, out) = unsafe { record_and_grad(op, record, grad_output, grad_theta) }?;
        let (grad, additions) = op.imle_vjp_rows(record, g, lambda, two_sided != 0)?;
        let staged = out.stage_host(grad)?;
        additions.commit()?;
        staged.write();
        Ok(())
    })
}

/// AI-MLE's backward pass (Minervini et al. 2023; PyEPO's `adaptiveImplicitMLE`):
/// `pert_imle_vjp` with lambda = state->alpha * |theta| / |grad_output| (no solve and a
/// zero gradient when that is 0), then `state` updated (see `pert_aimle_state`). `state` is
/// read and written only on success; one state must not be used by two calls at once. A
/// record of batch 0 gives `PERT_STATUS_OK` with nothing written and `state` unchanged
/// (there is no step to adapt).
///
/// @return the statuses of `pert_imle_vjp`; `PERT_STATUS_INVALID_ARGUMENT` for a state
///         holding a negative or non-finite value. On error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_aimle_vjp(
    op: *mut pert_op,
    record: *const pert_imle,
    grad_output: *const f32,
    two_sided: i32,
    state: *mut pert_aimle_state,
    grad_theta: *mut f32,
) -> pert_status {
    guard(|| {
        let state = unsafe { boundary::arg_mut(state, "state") }?;
        let (op, record, g, out) = unsafe { record_and_grad(op, record, grad_output, grad_theta) }?;
        let mut s = AimleState {
            alpha: state.alpha,
            grad_norm_avg: state.grad_norm_avg,
            step: state.step,
        };
        let (grad, additions) = op.aimle_vjp_rows(record, g, two_sided != 0, &mut s)?;
        let staged = out.stage_host(grad)?;
        additions.commit()?;
        staged.write();
        *state = pert_aimle_state {
            alpha: s.alpha,
            grad_norm_avg: s.grad_norm_avg,
            step: s.step,
        };
        Ok(())
    })
}

/// The number of problems of an I-MLE record (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn pert_imle_batch(record: *const pert_imle) -> usize {
    guard_or(0, || {
        unsafe { pert_imle::get(record) }.map_or(0, ImleRecord::batch)
    })
}

/// Frees an I-MLE record, on any thread. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn pert_imle_free(record: *mut pert_imle) {
    guard_or((), || {
        // SAFETY: a non-NULL record comes from `pert_imle_forward` and is freed once.
        unsafe { pert_imle::free(record) }
    })
}
