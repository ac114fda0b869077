//! Noise distributions: sampling from a counter-based stream, and the score ∇ν(z).
//!
//! | noise  | sample                    | score ∇ν(z)  |
//! |--------|---------------------------|--------------|
//! | Normal | z ~ N(0, 1)               | z            |
//! | Gumbel | z = −log(−log u), u ~ U(0,1) | 1 − e^{−z} |

use crate::error::{Error, Result};
use crate::rng::Stream;
use std::f64::consts::TAU;

/// The distribution of the i.i.d. noise coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Noise {
    /// Standard normal noise (C: `PERT_NOISE_NORMAL = 0`).
    #[default]
    Normal = 0,
    /// Standard Gumbel noise (C: `PERT_NOISE_GUMBEL = 1`).
    Gumbel = 1,
}

impl Noise {
    /// The noise with this C number.
    pub fn from_u32(value: u32) -> Result<Noise> {
        match value {
            0 => Ok(Noise::Normal),
            1 => Ok(Noise::Gumbel),
            _ => Err(Error::invalid(format!(
                "noise must be PERT_NOISE_NORMAL (0) or PERT_NOISE_GUMBEL (1), got {value}"
            ))),
        }
    }

    /// Writes the draws with element indices `first .. first + out.len()` of `stream`.
    /// Element `e` is a pure function of (stream, e): the draws of a call do not depend on
    /// how the caller splits them into chunks.
    pub fn fill(self, stream: &Stream, first: u64, out: &mut [f32]) {
        let mut e = first;
        let rest = if e % 2 == 1 && !out.is_empty() {
            let (head, tail) = out.split_at_mut(1);
            head[0] = self.pair(stream, e / 2)[1];
            e += 1;
            tail
        } else {
            out
        };
        let mut pairs = rest.chunks_exact_mut(2);
        for pair in &mut pairs {
            pair.copy_from_slice(&self.pair(stream, e / 2));
            e += 2;
        }
        if let [last] = pairs.into_remainder() {
            *last = self.pair(stream, e / 2)[0];
        }
    }

    /// Elements 2·block and 2·block + 1.
    #[inline]
    fn pair(self, stream: &Stream, block: u64) -> [f32; 2] {
        let (u, v) = stream.uniform_pair(block);
        match self {
            Noise::Normal => {
                let r = (-2.0 * u.ln()).sqrt();
                let (s, c) = (TAU * v).sin_cos();
                [(r * c) as f32, (r * s) as f32]
            }
            Noise::Gumbel => [(-(-u.ln()).ln()) as f32, (-(-v.ln()).ln()) as f32],
        }
    }

    /// The score ∇ν(z) of one value.
    pub fn score(self, z: f64) -> f64 {
        match self {
            Noise::Normal => z,
            Noise::Gumbel => 1.0 - (-z).exp(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(noise: Noise, n: usize) -> (f64, f64, f64) {
        let mut z = vec![0f32; n];
        noise.fill(&Stream::new(11, 0), 0, &mut z);
        let mean = z.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = z.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n as f64;
        let score_mean = z.iter().map(|&x| noise.score(f64::from(x))).sum::<f64>() / n as f64;
        (mean, var, score_mean)
    }

    #[test]
    fn normal_has_mean_0_variance_1() {
        let n = 400_000;
        let (mean, var, score) = moments(Noise::Normal, n);
        let sd_mean = (1.0 / n as f64).sqrt(); // 1.6e-3
        assert!(mean.abs() < 5.0 * sd_mean, "{mean}");
        // s.d. of the sample variance of N(0,1): sqrt(2/n)
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(), "{var}");
        assert_eq!(score, mean);
    }

    #[test]
    fn gumbel_has_euler_gamma_mean_and_zero_mean_score() {
        let n = 400_000;
        let (mean, var, score) = moments(Noise::Gumbel, n);
        let gamma = 0.577_215_664_901_532_9;
        let pi2_6 = std::f64::consts::PI.powi(2) / 6.0;
        assert!((mean - gamma).abs() < 5.0 * (pi2_6 / n as f64).sqrt(), "{mean}");
        // Var of a Gumbel is π²/6; its 4th central moment is 27/5·(π²/6)²... s.d. of the
        // sample variance ≈ sqrt((μ4 − σ⁴)/n) with μ4 = 5.4 σ⁴.
        assert!((var - pi2_6).abs() < 5.0 * (4.4f64).sqrt() * pi2_6 / (n as f64).sqrt(), "{var}");
        // E[1 − e^{−Z}] = 0 and Var = 1.
        assert!(score.abs() < 5.0 / (n as f64).sqrt(), "{score}");
    }

    #[test]
    fn draws_do_not_depend_on_chunking() {
        let s = Stream::new(5, 9);
        for noise in [Noise::Normal, Noise::Gumbel] {
            let mut whole = vec![0f32; 101];
            noise.fill(&s, 3, &mut whole);
            for split in [1, 2, 7, 50, 100] {
                let mut parts = vec![0f32; 101];
                let (a, b) = parts.split_at_mut(split);
                noise.fill(&s, 3, a);
                noise.fill(&s, 3 + split as u64, b);
                assert_eq!(whole, parts, "{noise:?} split at {split}");
            }
        }
    }

    #[test]
    fn rejects_unknown_numbers() {
        assert_eq!(Noise::from_u32(1).unwrap(), Noise::Gumbel);
        let err = Noise::from_u32(2).unwrap_err();
        assert!(err.message().contains("got 2"));
    }
}
