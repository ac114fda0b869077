//! `pert_draw`: the two-phase API, for solvers that cannot be called back.

use super::boundary::{self, guard, guard_or, slice};
use super::handle::{handle, Handle};
use super::op::pert_op;
use super::status::pert_status;
use super::tape::pert_tape;
use crate::shape::{batched, checked_product};
use crate::two_phase::Draw;

/// The perturbed inputs of one call, waiting for their solutions (two-phase API).
///
/// Made by `pert_draw_new`, freed by `pert_draw_free`. It keeps what it needs of its op and
/// stays valid after the op is freed. Threads: the functions taking `const pert_draw *` may
/// run concurrently on one draw.
pub struct pert_draw {
    inner: Draw,
}

handle!(pert_draw, Draw);

/// Draws the perturbed inputs of one call on `op` (any op: callback, built-in or external),
/// for `batch` problems theta `[batch, *input_shape]`. Solve the rows of
/// `pert_draw_inputs` anywhere, in any order or place, then pass their solutions to
/// `pert_draw_finish`. With the same seed and number of earlier calls on the op, and the
/// solutions the op's solver would give (a built-in's by its documented tie rule), the
/// results equal those of `pert_forward` on that op bit for bit: y, the loss, and every
/// product of the tape. (A draw of another op, an external one say, equals a CPU
/// `PERT_BUILTIN_ARGMAX` op's forward call in y bit for bit and in the loss and the tape's
/// products up to the rounding of float32 sums: that op sums its samples in a fused
/// kernel of its own, as its own draws do.) Counts as one forward call of the op.
///
/// Rows `b * num_samples .. (b + 1) * num_samples - 1` are problem b's perturbed inputs;
/// with the clean-input baseline (without antithetic pairs) `batch` more rows follow,
/// holding theta itself.
///
/// @param out  Receives the draw on success; untouched on error.
/// @return The errors of `pert_forward` for theta; `PERT_STATUS_INVALID_ARGUMENT` for
///         batch 0 (there is nothing to draw).
#[no_mangle]
pub unsafe extern "C" fn pert_draw_new(
    op: *mut pert_op,
    theta: *const f32,
    batch: usize,
    out: *mut *mut pert_draw,
) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        let out = unsafe { super::boundary::arg_mut(out, "out") }?;
        if batch == 0 {
            return Err(crate::Error::invalid(
                "batch must be >= 1 for a draw, got 0",
            ));
        }
        op.check_batch(batch)?;
        let d = op.input_numel();
        let theta = unsafe {
            slice(
                theta,
                checked_product(&[batch, d], "batch * input_numel")?,
                "theta",
            )
        }?;
        let theta =
            crate::tensors::from_slice(theta)?.f_reshape(batched(batch, op.input_shape()))?;
        let inner = op.draw(&theta)?;
        *out = pert_draw::into_raw(inner);
        Ok(())
    })
}

/// The number of rows of `pert_draw_inputs` (problems to solve); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_draw_count(draw: *const pert_draw) -> usize {
    guard_or(0, || unsafe { pert_draw::get(draw) }.map_or(0, Draw::count))
}

/// The perturbed inputs, `pert_draw_count(draw) * input_numel` floats, row-major
/// `[count, *input_shape]`, owned by the draw and valid until `pert_draw_free`; NULL for
/// NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_draw_inputs(draw: *const pert_draw) -> *const f32 {
    guard_or(std::ptr::null(), || {
        unsafe { pert_draw::get(draw) }.map_or(std::ptr::null(), |d| d.inputs().as_ptr())
    })
}

/// Completes a draw: y_sigma(theta) and, when `tape` is not NULL, the tape, from the
/// solutions of every row of `pert_draw_inputs`. May be called more than once.
///
/// @param solutions  `pert_draw_count(draw) * output_numel` floats, row i the solution of
///                   input row i; finite.
/// @param output     Receives `batch * output_numel` floats; may overlap `solutions`.
/// @param tape       NULL, or receives a new tape on success.
/// @return `PERT_STATUS_NON_FINITE_INPUT` for NaN/Inf in solutions; on error nothing is
///         written.
#[no_mangle]
pub unsafe extern "C" fn pert_draw_finish(
    draw: *const pert_draw,
    solutions: *const f32,
    output: *mut f32,
    tape: *mut *mut pert_tape,
) -> pert_status {
    guard(|| {
        let draw = unsafe { pert_draw::borrow(draw, "draw") }?;
        let o = draw.output_numel();
        let out_len = checked_product(&[draw.batch(), o], "batch * output_numel")?;
        let output = unsafe { boundary::output(output, out_len, "output") }?;
        let rows = checked_product(&[draw.count(), o], "count * output_numel")?;
        // the solutions are last read here, before anything is written: output may
        // overlap them
        let (y, t) = draw.finish(
            unsafe { slice(solutions, rows, "solutions") }?,
            !tape.is_null(),
        )?;
        // everything that can fail (allocations included) before anything is written
        let staged = output.stage(&y)?; // (float32 tile sums of solutions near its limit can overflow)
        let t = t.map(pert_tape::boxed);
        staged.write();
        if let Some(t) = t {
            // SAFETY: `tape` is non-NULL when a tape was made; written only on success.
            unsafe { *tape = t.into_raw() };
        }
        Ok(())
    })
}

/// Completes a draw with the Fenchel-Young loss instead of the output: for a batch solved
/// elsewhere, the loss of theta against targets `y_true` and its gradient with respect to
/// theta, from the solutions of every row of `pert_draw_inputs` (what
/// `pert_fenchel_young` gives on that op for the same seed and call count, bit for bit;
/// see `pert_draw_new` for a draw of another op). May be called more than once, and mixed
/// with `pert_draw_finish`.
///
/// @param solutions   `pert_draw_count(draw) * output_numel` floats, finite.
/// @param y_true      `batch * input_numel` floats (the op's output shape must equal its
///                    input shape), finite.
/// @param loss        Receives `batch` floats.
/// @param grad_theta  NULL, or receives `batch * input_numel` floats. The outputs may
///                    overlap the inputs (all are read first), not each other.
/// @return `PERT_STATUS_INVALID_ARGUMENT` when the output shape differs from the input
///         shape; `PERT_STATUS_NON_FINITE_INPUT` for NaN/Inf in solutions or y_true. On
///         error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_draw_fenchel_young(
    draw: *const pert_draw,
    solutions: *const f32,
    y_true: *const f32,
    loss: *mut f32,
    grad_theta: *mut f32,
) -> pert_status {
    // SAFETY: the caller's contract, as documented; no bound is asked for
    unsafe {
        pert_draw_fenchel_young_with_bound(
            draw,
            solutions,
            y_true,
            loss,
            grad_theta,
            std::ptr::null_mut(),
        )
    }
}

/// `pert_draw_fenchel_young`, and the lower bound of each problem's loss for exact
/// solutions and feasible targets (see `pert_fenchel_young_with_bound`): a loss below it
/// means the solutions are not optimal for the op's sense, or y_true is infeasible.
///
/// @param bound  NULL, or receives `batch` floats (not overlapping the other outputs).
#[no_mangle]
pub unsafe extern "C" fn pert_draw_fenchel_young_with_bound(
    draw: *const pert_draw,
    solutions: *const f32,
    y_true: *const f32,
    loss: *mut f32,
    grad_theta: *mut f32,
    bound: *mut f32,
) -> pert_status {
    guard(|| {
        let draw = unsafe { pert_draw::borrow(draw, "draw") }?;
        let (batch, d, o) = (draw.batch(), draw.input_numel(), draw.output_numel());
        if d != o {
            return Err(crate::Error::invalid(format!(
                "the Fenchel-Young loss needs output_numel == input_numel (a linear objective <theta, y>), got {o} and {d}"
            )));
        }
        let len = checked_product(&[batch, d], "batch * input_numel")?;
        let outputs = unsafe {
            boundary::loss_and_grad_outputs(loss, batch, (grad_theta, len, "grad_theta"))
        }?;
        let bound = unsafe { boundary::bound_output(bound, batch) }?;
        let rows = checked_product(&[draw.count(), o], "count * output_numel")?;
        // every input is read before anything is written: outputs may overlap them
        let y_true = crate::tensors::from_slice(unsafe { slice(y_true, len, "y_true") }?)?
            .f_reshape(batched(batch, draw.input_shape()))?;
        let solutions = unsafe { slice(solutions, rows, "solutions") }?;
        match &bound {
            Some(out) => {
                let (l, g, b) = draw.fenchel_young_with_bound(solutions, &y_true)?;
                boundary::write_loss_and_grad(&outputs, &l, &g, Some((out, &b)), || Ok(()))
            }
            None => {
                let (l, g) = draw.fenchel_young(solutions, &y_true)?;
                boundary::write_loss_and_grad(&outputs, &l, &g, None, || Ok(()))
            }
        }
    })
}

/// Frees a draw, on any thread. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn pert_draw_free(draw: *mut pert_draw) {
    guard_or((), || {
        // SAFETY: a non-NULL draw comes from `pert_draw_new` and is freed once.
        unsafe { pert_draw::free(draw) }
    })
}
