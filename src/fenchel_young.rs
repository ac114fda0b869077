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
//! or the target is infeasible. The bound handed out is lowered by an allowance for the
//! rounding of the loss itself, 10⁻⁴ × (|F_σ(θ)| + |⟨θ, y⟩| + σ‖y‖₁): a loss
//! below it is a finding, not float noise.

use crate::error::{Error, Result};
use crate::estimate::{Estimate, Objective};
use crate::settings::Sense;
use crate::tensors::{from_slice, HostFloats};
use tch::{Device, Kind, Tensor};

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

/// +1 when maximizing, −1 when minimizing: the loss is sign·(F_σ(θ) − ⟨θ, y⟩).
fn sign(sense: Sense) -> f64 {
    match sense {
        Sense::Maximize => 1.0,
        Sense::Minimize => -1.0,
    }
}

/// The relative allowance for rounding taken off the bound: F_σ is summed in float32 tiles
/// of samples (a relative error up to about 1.5e-5 of the terms' size), the loss is float32.
/// (The C API documents its value; tests/fenchel_young_bound.rs uses it.)
pub(crate) const BOUND_ROUNDING: f64 = 1e-4;

/// The loss `[batch]` and its gradient `[batch, d]` from the estimate of a forward call on
/// `theta` `[batch, d]` (on the op's device) that kept the objective, against targets with
/// theta's number of elements; with the call's mean perturbed input (a call that kept
/// Σ x_n), also the bound `[batch]` (see the module's documentation) for noise scale
/// `sigma`.
pub(crate) fn from_estimate(
    (sense, sigma): (Sense, f64),
    theta: &Tensor,
    y_true: &Tensor,
    estimate: Estimate,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let objective = estimate
        .objective
        .expect("square ops estimate the objective");
    let y = y_true
        .f_to_device(theta.device())?
        .f_reshape(theta.size())?;
    if theta.device() == Device::Cpu {
        return on_host((sense, sigma), theta, &y, &objective);
    }
    let (grad_objective, input_mean) = (objective.grad()?, objective.input_mean()?);
    let (loss, grad) = loss_and_grad(sense, theta, &y, &objective.value, &grad_objective)?;
    let bound = match input_mean {
        Some(mean) => Some(bound((sense, sigma), theta, &y, &mean, &objective.value)?),
        None => None,
    };
    Ok((loss, grad, bound))
}

/// [`from_estimate`] of a CPU call, in Rust on the host (a few small libtorch operations
/// cost more than this arithmetic), in the same float64 formulas.
fn on_host(
    (sense, sigma): (Sense, f64),
    theta: &Tensor,
    y_true: &Tensor,
    objective: &Objective,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let sign = sign(sense);
    let (theta_values, y_values) = (HostFloats::of(theta)?, HostFloats::of(y_true)?);
    let host = objective.on_host()?;
    let (value, grad_objective, input_mean) = (host.value, host.grad, host.input_mean);
    let batch = value.len();
    let d = theta_values.len() / batch.max(1);
    let mut loss = Vec::with_capacity(batch);
    let mut grad = Vec::with_capacity(batch * d);
    let mut bound = Vec::with_capacity(if input_mean.is_some() { batch } else { 0 });
    for (b, &f) in value.iter().enumerate() {
        let row = b * d..(b + 1) * d;
        let (t, y) = (&theta_values[row.clone()], &y_values[row.clone()]);
        let dot: f64 = t
            .iter()
            .zip(y)
            .map(|(&t, &y)| f64::from(t) * f64::from(y))
            .sum();
        loss.push((sign * (f - dot)) as f32);
        grad.extend(
            grad_objective[row.clone()]
                .iter()
                .zip(y)
                .map(|(&g, &y)| (sign * (g - f64::from(y))) as f32),
        );
        if let Some(mean) = &input_mean {
            let shifted: f64 = mean[row]
                .iter()
                .zip(y)
                .map(|(&m, &y)| m * f64::from(y))
                .sum();
            let l1: f64 = y.iter().map(|&y| f64::from(y).abs()).sum();
            let allowance = BOUND_ROUNDING * (f.abs() + dot.abs() + sigma * l1);
            bound.push((sign * (shifted - dot) - allowance) as f32);
        }
    }
    let bound = match input_mean {
        Some(_) => Some(from_slice(&bound)?),
        None => None,
    };
    Ok((from_slice(&loss)?, from_slice(&grad)?, bound))
}

/// sign·⟨x̄ − θ, y⟩ per problem `[batch]` (float32), from x̄ `[batch, d]` (float64), less
/// the rounding allowance for F_σ `[batch]` (float64).
fn bound(
    (sense, sigma): (Sense, f64),
    theta: &Tensor,
    y_true: &Tensor,
    input_mean: &Tensor,
    objective: &Tensor,
) -> Result<Tensor> {
    let sign = sign(sense);
    let _serial = crate::intraop::serial_on(theta.device()); // (same bits for any threads)
    let (theta, y) = (
        theta.f_to_kind(Kind::Double)?,
        y_true.f_to_kind(Kind::Double)?,
    );
    let per_problem = |t: Tensor| t.f_sum_dim_intlist(1, false, Kind::Double);
    let dot = per_problem(theta.f_mul(&y)?)?;
    let bound = per_problem(input_mean.f_mul(&y)?)?
        .f_sub(&dot)?
        .f_mul_scalar(sign)?;
    let allowance = objective
        .f_abs()?
        .f_add(&dot.f_abs()?)?
        .f_add(&per_problem(y.f_abs()?)?.f_mul_scalar(sigma)?)?
        .f_mul_scalar(BOUND_ROUNDING)?;
    Ok(bound.f_sub(&allowance)?.f_to_kind(Kind::Float)?)
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
    let sign = sign(sense);
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
