//! Differentiable calls for tch users: the results carry libtorch autograd history, so a
//! model trains with `loss.backward()` and an optimizer, nothing else.
//!
//! tch has no custom autograd functions, so each result is built as
//! `value.detach() + ⟨gradient.detach(), θ − θ.detach()⟩`: its value is exactly the
//! estimate (the second term is 0) and its gradient with respect to θ is exactly the
//! estimator's (the tape's Jᵀg, or the Fenchel-Young gradient).

use crate::error::Result;
use crate::op::PerturbedOp;
use tch::Tensor;

/// y_σ(θ) for `theta` `[batch, *input_shape]`, differentiable: backward gives the perturbed
/// VJP Jᵀg from this call's samples (no further solver call).
pub fn perturbed(op: &PerturbedOp, theta: &Tensor) -> Result<Tensor> {
    let (y, tape) = op.forward_with_tape(&theta.f_detach()?)?;
    let batch = tape.batch() as i64;
    let jacobian = tape.jacobian()?.f_to_device(theta.device())?; // [b, o, d]
    let delta = theta.f_sub(&theta.f_detach()?)?.f_reshape([batch, -1, 1])?; // [b, d, 1]
    let linear = jacobian.f_matmul(&delta)?.f_reshape(y.size())?;
    Ok(y.f_add(&linear)?)
}

/// The Fenchel-Young loss `[batch]` of `theta` against `y_true` (both
/// `[batch, *input_shape]`), differentiable with respect to theta.
pub fn fenchel_young_loss(op: &PerturbedOp, theta: &Tensor, y_true: &Tensor) -> Result<Tensor> {
    let (loss, grad) = op.fenchel_young(&theta.f_detach()?, &y_true.f_detach()?)?;
    let batch = loss.size()[0];
    let delta = theta.f_sub(&theta.f_detach()?)?;
    let linear = grad
        .f_mul(&delta)?
        .f_reshape([batch, -1])?
        .f_sum_dim_intlist(1, false, tch::Kind::Float)?;
    Ok(loss.f_add(&linear)?)
}
