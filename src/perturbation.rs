//! How noise enters the input: additively, θ + σZ, or multiplicatively,
//! θ ⊙ exp(σZ − σ²/2), which keeps the sign of each entry and has E\[η\] = θ.

use crate::error::{Error, Result};
use crate::noise::Noise;
use tch::Tensor;

/// The perturbation model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Perturbation {
    /// θ + σZ (C: `PERT_PERTURBATION_ADDITIVE = 0`). The default.
    #[default]
    Additive = 0,
    /// θ ⊙ exp(σZ − σ²/2) with Normal Z (C: `PERT_PERTURBATION_MULTIPLICATIVE = 1`), for
    /// inputs whose sign must be kept (costs). A zero entry stays zero, with gradient 0.
    Multiplicative = 1,
}

impl Perturbation {
    /// The perturbation with this C number.
    pub fn from_u32(value: u32) -> Result<Perturbation> {
        match value {
            0 => Ok(Perturbation::Additive),
            1 => Ok(Perturbation::Multiplicative),
            _ => Err(Error::invalid(format!(
                "perturbation must be PERT_PERTURBATION_ADDITIVE (0) or PERT_PERTURBATION_MULTIPLICATIVE (1), got {value}"
            ))),
        }
    }

    /// The perturbed inputs `[rows, d]` for θ `[1, d]` and noise `z` `[rows, d]`.
    pub fn perturb(self, theta: &Tensor, z: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(match self {
            Perturbation::Additive => z.f_mul_scalar(sigma)?.f_add_(theta)?,
            Perturbation::Multiplicative => self.weight(z, sigma)?.f_mul_(theta)?,
        })
    }

    /// As [`Perturbation::perturb`], on the host: rows of `z` (each `theta.len()` long)
    /// into `x`.
    pub fn perturb_host(self, theta: &[f32], z: &[f32], sigma: f32, x: &mut [f32]) {
        let shift = 0.5 * sigma * sigma;
        for (xr, zr) in x
            .chunks_exact_mut(theta.len())
            .zip(z.chunks_exact(theta.len()))
        {
            for ((xv, &zv), &tv) in xr.iter_mut().zip(zr).zip(theta) {
                *xv = match self {
                    Perturbation::Additive => tv + sigma * zv,
                    Perturbation::Multiplicative => tv * (sigma * zv - shift).exp(),
                };
            }
        }
    }

    /// exp(σz − σ²/2), the factor of the multiplicative model (mean 1).
    pub fn weight(self, z: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(z.f_mul_scalar(sigma)?
            .f_sub_scalar_(0.5 * sigma * sigma)?
            .f_exp_()?)
    }

    /// The per-sample factor of the gradient estimator before the division by σ (and, for
    /// the multiplicative model, by θ, applied once at the end): ∇ν(z) for the additive
    /// model, z for the multiplicative one. Both have mean 0, which the baselines rely on.
    pub fn score(self, noise: Noise, z: &Tensor) -> Result<Tensor> {
        match self {
            Perturbation::Additive => noise.score(z),
            Perturbation::Multiplicative => Ok(z.shallow_clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Stream;

    #[test]
    fn multiplicative_keeps_the_mean_and_the_sign() {
        // E[θ exp(σZ − σ²/2)] = θ: the ½ matters (a known bug elsewhere dropped it).
        let n = 200_000;
        let sigma = 0.5;
        let z = Noise::Normal
            .sample(&Stream::new(3, 0), 0, n, 2)
            .unwrap()
            .view([-1, 1]);
        let theta = Tensor::from_slice(&[-2.0f32, 0.0]).view([1, 2]);
        let x = Perturbation::Multiplicative
            .perturb(&theta, &z.repeat([1, 2]), sigma)
            .unwrap();
        let x: Vec<Vec<f32>> = Vec::try_from(x).unwrap();
        assert!(x.iter().all(|r| r[0] < 0.0 && r[1] == 0.0));
        let mean = x.iter().map(|r| f64::from(r[0])).sum::<f64>() / n as f64;
        // s.d. of one draw: 2 sqrt(e^{σ²} − 1) ≈ 1.07; without the ½ the mean would be −2.27
        let sd = 2.0 * ((0.25f64).exp() - 1.0).sqrt() / (n as f64).sqrt();
        assert!((mean + 2.0).abs() < 5.0 * sd, "{mean}");
    }
}
