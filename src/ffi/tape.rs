//! `pert_tape`: what a forward call keeps for its gradient.

use super::boundary::{guard, guard_or, output, slice};
use super::handle::{handle, Handle};
use super::status::pert_status;
use crate::shape::{batched, checked_product};
use crate::tape::Tape;

/// The record of one `pert_forward` call, from which gradients are computed without
/// calling the solver again.
///
/// Made by `pert_forward`, freed by `pert_tape_free`. It owns its data: it stays valid
/// after its op is freed, and may be freed on any thread. It keeps the Jacobian's sums or
/// the samples (see `pert_config_set_max_tape_bytes`); a CPU tape of samples (but those of
/// device solvers) keeps their solutions, and their scores while those take at most 16 MiB
/// (larger ones are drawn again, on all cores, for each product).
/// Threads: the functions taking `const pert_tape *` may be called concurrently on the
/// same tape.
pub struct pert_tape {
    pub(crate) inner: Tape,
}

handle!(pert_tape, Tape);

/// batch, input_numel and output_numel of a tape (their products were checked when the
/// forward call made it).
fn sizes(tape: &Tape) -> crate::Result<(usize, usize, usize)> {
    let d = crate::shape::numel(tape.input_shape(), "input_shape")?;
    let o = crate::shape::numel(tape.output_shape(), "output_shape")?;
    checked_product(&[tape.batch(), d.max(o)], "batch * numel")?;
    Ok((tape.batch(), d, o))
}

/// The vector-Jacobian product J^T g, per problem: what backpropagation needs.
///
/// @param grad_output  `batch * output_numel` floats `[batch, *output_shape]` (the batch of
///                     the forward call), finite; borrowed.
/// @param grad_input   Receives `batch * input_numel` floats `[batch, *input_shape]`; may
///                     overlap grad_output (it is read first).
/// @return `PERT_STATUS_NON_FINITE_INPUT` for NaN/Inf in grad_output; on error grad_input
///         is untouched.
#[no_mangle]
pub unsafe extern "C" fn pert_tape_vjp(
    tape: *const pert_tape,
    grad_output: *const f32,
    grad_input: *mut f32,
) -> pert_status {
    guard(|| {
        let tape = unsafe { pert_tape::borrow(tape, "tape") }?;
        let (b, d, o) = sizes(tape)?;
        let out = unsafe { output(grad_input, b * d, "grad_input") }?;
        // viewed in place and read before anything is written (grad_input may overlap
        // grad_output): the product is a new tensor
        let g = unsafe { slice(grad_output, b * o, "grad_output") }?;
        let product = crate::tensors::with_view(g, |g| {
            tape.vjp(&g.f_reshape(batched(b, tape.output_shape()))?)
        })?;
        out.stage(&product)?.write();
        Ok(())
    })
}

/// The Jacobian-vector product J t, per problem (forward-mode differentiation).
///
/// @param tangent_input   `batch * input_numel` floats `[batch, *input_shape]`, finite.
/// @param tangent_output  Receives `batch * output_numel` floats `[batch, *output_shape]`;
///                        may overlap tangent_input (it is read first).
/// @return `PERT_STATUS_NON_FINITE_INPUT` for NaN/Inf in tangent_input; on error
///         tangent_output is untouched.
#[no_mangle]
pub unsafe extern "C" fn pert_tape_jvp(
    tape: *const pert_tape,
    tangent_input: *const f32,
    tangent_output: *mut f32,
) -> pert_status {
    guard(|| {
        let tape = unsafe { pert_tape::borrow(tape, "tape") }?;
        let (b, d, o) = sizes(tape)?;
        let out = unsafe { output(tangent_output, b * o, "tangent_output") }?;
        // viewed in place and read before anything is written (tangent_output may overlap
        // tangent_input): the product is a new tensor
        let t = unsafe { slice(tangent_input, b * d, "tangent_input") }?;
        let product = crate::tensors::with_view(t, |t| {
            tape.jvp(&t.f_reshape(batched(b, tape.input_shape()))?)
        })?;
        out.stage(&product)?.write();
        Ok(())
    })
}

/// The perturbed objective F_sigma(theta) of every problem, from the forward call's draws:
/// the mean over samples of <theta + sigma Z, Y> (additive) or <eta, Y> (multiplicative).
/// Its gradient is y_sigma(theta) (additive). With Gumbel noise and a one-hot argmax,
/// F_sigma = sigma logsumexp(theta / sigma) + sigma * 0.5772 (Euler's gamma).
///
/// @param value  Receives `batch` floats.
/// @return `PERT_STATUS_INVALID_ARGUMENT` when the op's output shape differs from its input
///         shape (there is no linear objective <theta, y> then).
#[no_mangle]
pub unsafe extern "C" fn pert_tape_objective(
    tape: *const pert_tape,
    value: *mut f32,
) -> pert_status {
    guard(|| {
        let tape = unsafe { pert_tape::borrow(tape, "tape") }?;
        let out = unsafe { output(value, tape.batch(), "value") }?;
        out.stage(&tape.objective()?)?.write();
        Ok(())
    })
}

/// The Jacobian estimate J = d y_sigma / d theta of every problem.
///
/// @param jacobian  Receives `batch * output_numel * input_numel` floats, row-major
///                  `[batch, output_numel, input_numel]`.
#[no_mangle]
pub unsafe extern "C" fn pert_tape_jacobian(
    tape: *const pert_tape,
    jacobian: *mut f32,
) -> pert_status {
    guard(|| {
        let tape = unsafe { pert_tape::borrow(tape, "tape") }?;
        let (b, d, o) = sizes(tape)?;
        let len = checked_product(&[b, o, d], "batch * output_numel * input_numel")?;
        let out = unsafe { output(jacobian, len, "jacobian") }?;
        out.stage(&tape.jacobian()?)?.write();
        Ok(())
    })
}

/// The number of problems of the forward call that made the tape; 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_tape_batch(tape: *const pert_tape) -> usize {
    guard_or(0, || unsafe { pert_tape::get(tape) }.map_or(0, Tape::batch))
}

/// Frees a tape, on any thread. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn pert_tape_free(tape: *mut pert_tape) {
    guard_or((), || {
        // SAFETY: a non-NULL tape comes from `pert_forward` and is freed once.
        unsafe { pert_tape::free(tape) }
    })
}
