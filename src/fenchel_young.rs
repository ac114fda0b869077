//! The Fenchel-Young loss, for learning θ from target solutions y.
//!
//! - Maximization: L(θ; y) = F_σ(θ) − ⟨θ, y⟩, ∇L = ∇F_σ(θ) − y.
//! - Minimization: L(θ; y) = ⟨θ, y⟩ − F_σ^min(θ), ∇L = y − ∇F_σ^min(θ).
//!
//! F_σ(θ) = E[⟨perturbed θ, y*(perturbed θ)⟩] and ∇F_σ(θ) is y_σ(θ) for the additive
//! model, E[exp(σZ − σ²/2) ⊙ y*(η)] for the multiplicative one. Unlike the squared distance
//! the original code returns, this is the true loss value: L ≥ 0 for a feasible y, up to
//! Monte-Carlo error, so loss curves mean something.
//!
//! **The bound.** For an exact solver and a feasible target, each sample's solution does at
//! least as well as the target on its own perturbed input x_n: ⟨x_n, Y_n⟩ ≥ ⟨x_n, y⟩
//! (maximizing; ≤ minimizing). Averaged over the call's samples, the estimated loss is at
//! least sign·⟨x̄ − θ, y⟩ (x̄ the mean perturbed input: θ + σZ̄ for the additive model),
//! for every draw, not only in expectation. A loss below this bound, beyond rounding, means
//! the sense is wrong (a wrong sense gives the reverse inequality), the solver is not exact,
//! or the target is infeasible.

use crate::error::{Error, Result};
use crate::estimate::Estimate;
use crate::settings::Sense;
use tch::{Kind, Tensor};

/// Checks targets `y_true` against theta's shape `[batch, *input_shape]` (and finiteness).
pub(crate) fn check_targets(theta_size: &[i64], y_true: &Tensor) -> Result<()> {
    if y_true.size() != theta_size {
        return Err(Error::invalid(format!(
            "y_true must have the shape of theta {theta_size:?}, got {:?}",
            y_true.size()
        )));
    }
    crate::input::check_floats(y_true, "y_true")
}

/// The loss `[batch]` and its gradient `[batch, d]` from the estimate of a forward call on
/// `theta` `[batch, d]` (on the op's device) that kept the objective, against targets with
/// theta's number of elements.
/// With the call's mean perturbed input (a call that kept Σ x_n), also the bound `[batch]`
/// (see the module's documentation).
pub(crate) fn from_estimate(
    sense: Sense,
    theta: &Tensor,
    y_true: &Tensor,
    estimate: Estimate,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let objective = estimate
        .objective
        .expect("square ops estimate the objective");
    let (grad_objective, input_mean) = (objective.grad()?, objective.input_mean()?);
    let y = y_true
        .f_to_device(theta.device())?
        .f_reshape(theta.size())?;
    let (loss, grad) = loss_and_grad(sense, theta, &y, &objective.value, &grad_objective)?;
    let bound = match input_mean {
        Some(mean) => Some(bound(sense, theta, &y, &mean)?),
        None => None,
    };
    Ok((loss, grad, bound))
}

/// sign·⟨x̄ − θ, y⟩ per problem `[batch]` (float32), from x̄ `[batch, d]` (float64).
fn bound(sense: Sense, theta: &Tensor, y_true: &Tensor, input_mean: &Tensor) -> Result<Tensor> {
    let sign = match sense {
        Sense::Maximize => 1.0,
        Sense::Minimize => -1.0,
    };
    let _serial = crate::intraop::serial_on(theta.device()); // (same bits for any threads)
    let shift = input_mean.f_sub(&theta.f_to_kind(Kind::Double)?)?;
    Ok(shift
        .f_mul(&y_true.f_to_kind(Kind::Double)?)?
        .f_sum_dim_intlist(1, false, Kind::Double)?
        .f_mul_scalar(sign)?
        .f_to_kind(Kind::Float)?)
}

/// The loss `[batch]` and its gradient `[batch, d]` (float32) from θ and targets
/// `[batch, d]`, F_σ `[batch]` and ∇F_σ `[batch, d]` (float64), all on one device.
pub(crate) fn loss_and_grad(
    sense: Sense,
    theta: &Tensor,
    y_true: &Tensor,
    objective: &Tensor,
    grad_objective: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let sign = match sense {
        Sense::Maximize => 1.0,
        Sense::Minimize => -1.0,
    };
    let _serial = crate::intraop::serial_on(theta.device()); // (same bits for any threads)
    let y = y_true.f_to_kind(Kind::Double)?;
    let dot = theta
        .f_to_kind(Kind::Double)?
        .f_mul(&y)?
        .f_sum_dim_intlist(1, false, Kind::Double)?;
    let loss = objective
        .f_sub(&dot)?
        .f_mul_scalar(sign)?
        .f_to_kind(Kind::Float)?;
    let grad = grad_objective
        .f_sub(&y)?
        .f_mul_scalar(sign)?
        .f_to_kind(Kind::Float)?;
    Ok((loss, grad))
}
