//! Sum-of-Gamma noise (Niepert et al., "Implicit MLE", NeurIPS 2021), the noise of I-MLE:
//! (Σᵢ₌₁ˢ Gamma(1/κ, κ/i) − log s) / κ, whose sum over κ independent draws tends to a
//! Gumbel as s grows. Its element e is a pure function of (stream, e), as every noise's:
//! term i's Gamma variate comes from blocks 16·(e·s + i − 1) + a of the stream, a = 0, 1,
//! ... the attempts of Marsaglia and Tsang's rejection method (one block each: a
//! Box-Muller normal, the acceptance uniform, and the uniform that lowers the shape below
//! 1); acceptance is above 95%, and after 16 rejected attempts (probability below 10⁻²⁰)
//! the last candidate is taken. It has no score, so no Jacobian estimate: it serves the
//! Fenchel-Young loss, forward calls without a tape, draws and I-MLE.

use crate::error::{Error, Result};
use crate::rng::{unit, Stream};

/// The error of a call that needs the score of Sum-of-Gamma noise (a Jacobian estimate).
pub(crate) fn no_score() -> Error {
    Error::invalid(
        "Sum-of-Gamma noise has no closed-form density, so no Jacobian estimate (no tape, VJP or JVP): use it for the Fenchel-Young loss, forward calls without a tape, draws, or I-MLE",
    )
}

/// The parameters of Sum-of-Gamma noise: κ (`kappa`, the number of draws whose sum is
/// about Gumbel; PyEPO's default 5) and the number of terms s (`terms`, PyEPO's default 10).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SumOfGamma {
    kappa: f64,
    terms: u32,
}

/// At most this many terms (keeps every counter of a call within the stream's 2⁶⁴ blocks).
pub const SUM_OF_GAMMA_MAX_TERMS: u32 = 1000;

/// The attempts of the rejection method per Gamma variate.
const GAMMA_ATTEMPTS: u64 = 16;

impl SumOfGamma {
    /// The parameters, checked: κ finite and > 0, 1 to [`SUM_OF_GAMMA_MAX_TERMS`] terms.
    pub(crate) fn new(kappa: f64, terms: u32) -> Result<SumOfGamma> {
        if !(kappa.is_finite() && kappa > 0.0) {
            return Err(Error::invalid(format!(
                "the Sum-of-Gamma kappa must be finite and > 0, got {kappa}"
            )));
        }
        if !(1..=SUM_OF_GAMMA_MAX_TERMS).contains(&terms) {
            return Err(Error::invalid(format!(
                "the Sum-of-Gamma number of terms must be 1 to {SUM_OF_GAMMA_MAX_TERMS}, got {terms}"
            )));
        }
        Ok(SumOfGamma { kappa, terms })
    }

    /// κ.
    pub fn kappa(self) -> f64 {
        self.kappa
    }
    /// The number of terms s.
    pub fn terms(self) -> u32 {
        self.terms
    }

    /// Element `e` of the noise of `stream`.
    pub(crate) fn value(self, stream: &Stream, e: u64) -> f32 {
        let alpha = 1.0 / self.kappa;
        let mut sum = 0.0f64;
        for i in 1..=u64::from(self.terms) {
            let first = (e.wrapping_mul(u64::from(self.terms)).wrapping_add(i - 1))
                .wrapping_mul(GAMMA_ATTEMPTS);
            sum += gamma(stream, first, alpha) * self.kappa / i as f64;
        }
        ((sum - f64::from(self.terms).ln()) / self.kappa) as f32
    }
}

/// A Gamma(alpha, 1) variate from blocks `first ..` of `stream` (Marsaglia & Tsang, "A
/// simple method for generating gamma variables", 2000; for alpha < 1 a Gamma(alpha + 1)
/// variate times u^(1/alpha)).
fn gamma(stream: &Stream, first: u64, alpha: f64) -> f64 {
    let boost = alpha < 1.0;
    let a = if boost { alpha + 1.0 } else { alpha };
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    let mut candidate = d;
    for attempt in 0..GAMMA_ATTEMPTS {
        let [w0, w1, w2, w3] = stream.block(first.wrapping_add(attempt));
        let (u0, u1) = (f64::from(unit(w0)), f64::from(unit(w1)));
        let x = (-2.0 * u0.ln()).sqrt() * (std::f64::consts::TAU * u1).cos();
        let t = 1.0 + c * x;
        if t <= 0.0 {
            continue;
        }
        let v = t * t * t;
        candidate = d * v;
        let u = f64::from(unit(w2));
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            if boost {
                candidate *= f64::from(unit(w3)).powf(1.0 / alpha);
            }
            return candidate;
        }
    }
    if boost {
        candidate *= 0.5f64.powf(1.0 / alpha);
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::Noise;
    use tch::{Device, Kind, Tensor};

    fn sog(noise: Noise) -> SumOfGamma {
        match noise {
            Noise::SumOfGamma(s) => s,
            _ => unreachable!(),
        }
    }

    /// Gamma(alpha, 1) has mean alpha and variance alpha, below and above shape 1.
    #[test]
    fn gamma_has_its_moments() {
        let stream = Stream::new(17, 2);
        let n = 200_000u64;
        for alpha in [0.2f64, 1.0, 2.5] {
            let g: Vec<f64> = (0..n)
                .map(|e| gamma(&stream, e * GAMMA_ATTEMPTS, alpha))
                .collect();
            let mean = g.iter().sum::<f64>() / n as f64;
            let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            // s.e. of the mean sqrt(alpha / n); of the variance sqrt((6 alpha + 2 alpha^2) / n)
            assert!(
                (mean - alpha).abs() < 5.0 * (alpha / n as f64).sqrt(),
                "alpha {alpha}: mean {mean}"
            );
            let se = ((6.0 * alpha + 2.0 * alpha * alpha) / n as f64).sqrt();
            assert!(
                (var - alpha).abs() < 5.0 * se,
                "alpha {alpha}: variance {var}"
            );
            assert!(g.iter().all(|&x| x > 0.0 && x.is_finite()));
        }
    }
    /// Sum-of-Gamma(κ, s) has mean (H_s − log s)/κ and variance (Σ 1/i²)/κ (MATH: each
    /// term Gamma(1/κ, κ/i) has mean 1/i and variance κ/i²).
    #[test]
    fn sum_of_gamma_has_the_papers_moments() {
        for (kappa, terms) in [(5.0f64, 10u32), (1.0, 3), (20.0, 50)] {
            let noise = Noise::sum_of_gamma(kappa, terms).unwrap();
            let n = 100_000;
            let z: Vec<f64> = (0..n as u64)
                .map(|e| f64::from(sog(noise).value(&Stream::new(11, 0), 7 + e)))
                .collect();
            let h: f64 = (1..=terms).map(|i| 1.0 / f64::from(i)).sum();
            let q2: f64 = (1..=terms).map(|i| 1.0 / f64::from(i).powi(2)).sum();
            let q4: f64 = (1..=terms).map(|i| 1.0 / f64::from(i).powi(4)).sum();
            let (want_mean, want_var) = ((h - f64::from(terms).ln()) / kappa, q2 / kappa);
            let mean = z.iter().sum::<f64>() / n as f64;
            let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            // the fourth cumulant 6 Σ 1/i⁴ / κ: s.e. of the variance sqrt((κ4 + 2σ⁴)/n)
            let k4 = 6.0 * q4 / kappa;
            let se_var = ((k4 + 2.0 * want_var * want_var) / n as f64).sqrt();
            assert!(
                (mean - want_mean).abs() < 5.0 * (want_var / n as f64).sqrt(),
                "{kappa} {terms}: mean {mean} vs {want_mean}"
            );
            assert!(
                (var - want_var).abs() < 5.0 * se_var,
                "{kappa} {terms}: variance {var} vs {want_var}"
            );
        }
        assert!(Noise::sum_of_gamma(0.0, 10).is_err());
        assert!(Noise::sum_of_gamma(f64::NAN, 10).is_err());
        assert!(Noise::sum_of_gamma(5.0, 0).is_err());
        assert!(Noise::sum_of_gamma(5.0, SUM_OF_GAMMA_MAX_TERMS + 1).is_err());
        assert_eq!(
            Noise::from_u32(2).unwrap(),
            Noise::sum_of_gamma(5.0, 10).unwrap()
        );
        assert!(Noise::from_u32(2)
            .unwrap()
            .score(&Tensor::zeros([1], (Kind::Float, Device::Cpu)))
            .is_err());
    }
}
