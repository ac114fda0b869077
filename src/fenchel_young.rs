//! The Fenchel-Young loss, for learning θ from target solutions y.
//!
//! - Maximization: L(θ; y) = F_σ(θ) − ⟨θ, y⟩, ∇L = ∇F_σ(θ) − y.
//! - Minimization: L(θ; y) = ⟨θ, y⟩ − F_σ^min(θ), ∇L = y − ∇F_σ^min(θ).
//!
//! F_σ(θ) = E[⟨perturbed θ, y*(perturbed θ)⟩] and ∇F_σ(θ) is y_σ(θ) for the additive
//! model, E[exp(σZ − σ²/2) ⊙ y*(η)] for the multiplicative one. Unlike the squared distance
//! the original code returns, this is the true loss value: L ≥ 0 for a feasible y, up to
//! Monte-Carlo error, so loss curves mean something.

use crate::error::{Error, Result};

/// Whether the solver maximizes or minimizes ⟨θ, y⟩.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sense {
    /// y*(θ) = argmax ⟨θ, y⟩ (C: `PERT_SENSE_MAXIMIZE = 0`). The default.
    #[default]
    Maximize = 0,
    /// y*(θ) = argmin ⟨θ, y⟩, e.g. shortest paths over costs (C: `PERT_SENSE_MINIMIZE = 1`).
    Minimize = 1,
}

impl Sense {
    /// The sense with this C number.
    pub fn from_u32(value: u32) -> Result<Sense> {
        match value {
            0 => Ok(Sense::Maximize),
            1 => Ok(Sense::Minimize),
            _ => Err(Error::invalid(format!(
                "sense must be PERT_SENSE_MAXIMIZE (0) or PERT_SENSE_MINIMIZE (1), got {value}"
            ))),
        }
    }
}

/// The loss `[batch]` and its gradient `[batch * d]` from F_σ `[batch]` and ∇F_σ
/// `[batch * d]`, for θ and targets `[batch * d]`.
pub(crate) fn loss_and_grad(
    sense: Sense,
    theta: &[f32],
    y_true: &[f32],
    objective: &[f64],
    grad_objective: &[f64],
) -> (Vec<f32>, Vec<f32>) {
    let d = theta.len() / objective.len();
    let sign = match sense {
        Sense::Maximize => 1.0,
        Sense::Minimize => -1.0,
    };
    let loss = objective
        .iter()
        .enumerate()
        .map(|(b, &f)| {
            let rows = b * d..(b + 1) * d;
            let dot: f64 = theta[rows.clone()].iter().zip(&y_true[rows]).map(|(&t, &y)| f64::from(t) * f64::from(y)).sum();
            (sign * (f - dot)) as f32
        })
        .collect();
    let grad = grad_objective.iter().zip(y_true).map(|(&g, &y)| (sign * (g - f64::from(y))) as f32).collect();
    (loss, grad)
}
