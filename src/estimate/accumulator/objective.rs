//! The perturbed objective F_σ(θ) of a call, and what its gradient and the Fenchel-Young
//! loss's bound are made from.

use crate::error::Result;
use tch::Tensor;

/// The perturbed objective of a call: F_σ(θ) = E[⟨perturbed input, Y⟩] `[batch]` (float64),
/// and its gradient on demand (only the Fenchel-Young loss needs it).
pub(crate) struct Objective {
    pub value: Tensor,
    /// Σ Y_n (additive) or Σ exp(σZ_n − σ²/2) ⊙ Y_n (multiplicative), `[batch, d]` float64.
    pub(super) sum: Tensor,
    /// Σ x_n, the perturbed inputs, `[batch, d]` float64, when asked for.
    pub(super) sum_x: Option<Tensor>,
    pub(super) n: f64,
}

impl Objective {
    /// ∇F_σ(θ) `[batch, d]` (float64): the sum over N.
    pub fn grad(&self) -> Result<Tensor> {
        Ok(self.sum.f_div_scalar(self.n)?)
    }

    /// F_σ(θ), ∇F_σ(θ) and the mean perturbed input (when kept) on the host, as float64.
    pub fn on_host(&self) -> Result<HostObjective> {
        let means = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(crate::tensors::host_doubles(t)?
                .into_iter()
                .map(|s| s / self.n)
                .collect())
        };
        Ok(HostObjective {
            value: crate::tensors::host_doubles(&self.value)?,
            grad: means(&self.sum)?,
            input_mean: self.sum_x.as_ref().map(means).transpose()?,
        })
    }

    /// The mean perturbed input `[batch, d]` (float64), when the call kept its sum.
    pub fn input_mean(&self) -> Result<Option<Tensor>> {
        Ok(match &self.sum_x {
            Some(sum_x) => Some(sum_x.f_div_scalar(self.n)?),
            None => None,
        })
    }
}

/// An [`Objective`] on the host, float64.
pub(crate) struct HostObjective {
    /// F_σ(θ), `[batch]`.
    pub value: Vec<f64>,
    /// ∇F_σ(θ), `[batch · d]`.
    pub grad: Vec<f64>,
    /// The mean perturbed input, `[batch · d]`, when the call kept its sum.
    pub input_mean: Option<Vec<f64>>,
}
