//! Differentiable calls for tch users: the results carry libtorch autograd history, so a
//! model trains with `loss.backward()` and an optimizer, nothing else.
//!
//! tch has no custom autograd functions, so each result is built as
//! `value.detach() + L(θ − θ.detach())` with L linear: its value is exactly the estimate
//! (the second term is 0) and its gradient with respect to θ is exactly the estimator's.
//! For the perturbed op L is J δ made from what the call's tape keeps (the Jacobian of a
//! tape of sums, or the samples of a tape of samples; never a dense Jacobian the tape does
//! not hold), so the graph holds what the tape holds. When no gradient can be asked (grad
//! mode off, or θ does not require grad) no tape is made at all. The backward pass is
//! libtorch's own (its matrix products under the thread counts in force when it runs):
//! for gradients that are the same bits under every thread setting, use the tape's VJP.

use crate::error::Result;
use crate::op::PerturbedOp;
use crate::settings::Sense;
use tch::Tensor;

/// y_σ(θ) for `theta` `[batch, *input_shape]`, differentiable: backward gives the perturbed
/// VJP Jᵀg from this call's samples (no further solver call).
pub fn perturbed(op: &PerturbedOp, theta: &Tensor) -> Result<Tensor> {
    let delta = theta.f_sub(&theta.f_detach()?)?; // 0, with θ's gradient path
    if !delta.requires_grad() {
        return op.forward(&theta.f_detach()?);
    }
    let (y, tape) = op.forward_with_tape(&theta.f_detach()?)?;
    let batch = tape.batch() as i64;
    let d = op.input_numel() as i64;
    let linear = tape.linear(&delta.f_reshape([batch, d])?)?; // [b, o]
    Ok(y.f_add(&linear.f_reshape(y.size())?.f_to_device(y.device())?)?)
}

/// The Fenchel-Young loss `[batch]` of `theta` against `y_true` (both
/// `[batch, *input_shape]`), differentiable with respect to theta (its gradient
/// y_σ(θ) − y_true, or the negation for minimization) and to y_true (−θ for maximization,
/// +θ for minimization).
pub fn fenchel_young_loss(op: &PerturbedOp, theta: &Tensor, y_true: &Tensor) -> Result<Tensor> {
    let theta_value = theta.f_detach()?;
    let (loss, grad) = op.fenchel_young(&theta_value, &y_true.f_detach()?)?;
    let batch = loss.size()[0];
    let sign = match op.config().sense() {
        Sense::Maximize => -1.0,
        Sense::Minimize => 1.0,
    };
    let per_problem = |t: Tensor| -> Result<Tensor> {
        Ok(t.f_reshape([batch, op.input_numel() as i64])?
            .f_sum_dim_intlist(1, false, tch::Kind::Float)?)
    };
    let d_theta = grad.f_mul(&theta.f_sub(&theta_value)?)?;
    let d_y = theta_value
        .f_mul(&y_true.f_sub(&y_true.f_detach()?)?)?
        .f_mul_scalar(sign)?;
    Ok(loss
        .f_add(&per_problem(d_theta)?.f_to_device(loss.device())?)?
        .f_add(&per_problem(d_y)?.f_to_device(loss.device())?)?)
}
