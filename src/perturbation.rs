//! How noise enters the input: additively, θ + σZ, or multiplicatively,
//! θ ⊙ exp(σZ − σ²/2), which keeps the sign of each entry and has E[η] = θ.

use crate::error::{Error, Result};
use crate::noise::Noise;

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

    /// Perturbs the rows of `z` (each `theta.len()` long) into `x`.
    pub fn perturb(self, theta: &[f32], z: &[f32], sigma: f32, x: &mut [f32]) {
        let d = theta.len();
        let shift = 0.5 * sigma * sigma;
        for (xr, zr) in x.chunks_exact_mut(d).zip(z.chunks_exact(d)) {
            for ((xv, &zv), &tv) in xr.iter_mut().zip(zr).zip(theta) {
                *xv = match self {
                    Perturbation::Additive => tv + sigma * zv,
                    Perturbation::Multiplicative => tv * (sigma * zv - shift).exp(),
                };
            }
        }
    }

    /// The per-sample factor of the gradient estimator before the division by σ (and, for
    /// the multiplicative model, by θ, applied once at the end): ∇ν(z) for the additive
    /// model, z for the multiplicative one. Both have mean 0, which the baselines rely on.
    pub fn score(self, noise: Noise, z: &[f32], out: &mut [f32]) {
        match self {
            Perturbation::Additive => {
                for (o, &zv) in out.iter_mut().zip(z) {
                    *o = noise.score(f64::from(zv)) as f32;
                }
            }
            Perturbation::Multiplicative => out.copy_from_slice(z),
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
        let sigma = 0.5f32;
        let mut z = vec![0f32; n];
        Noise::Normal.fill(&Stream::new(3, 0), 0, &mut z);
        let theta = [-2.0f32];
        let mut x = vec![0f32; n];
        Perturbation::Multiplicative.perturb(&theta, &z, sigma, &mut x);
        assert!(x.iter().all(|&v| v < 0.0));
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        // s.d. of one draw: 2 sqrt(e^{σ²} − 1) ≈ 1.07; of the mean ≈ 2.4e-3
        let sd = 2.0 * ((0.25f64).exp() - 1.0).sqrt() / (n as f64).sqrt();
        assert!((mean + 2.0).abs() < 5.0 * sd, "{mean}");
        // without the ½ the mean would be −2 e^{σ²/2} ≈ −2.27: far outside
        let zero = [0.0f32];
        let mut x0 = vec![1f32; 4];
        Perturbation::Multiplicative.perturb(&zero, &z[..4], sigma, &mut x0);
        assert!(x0.iter().all(|&v| v == 0.0));
    }
}
