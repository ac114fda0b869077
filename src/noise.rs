//! Noise distributions: sampling from a counter-based stream, and the score ∇ν(z).
//!
//! | noise  | sample                        | score ∇ν(z)  |
//! |--------|-------------------------------|--------------|
//! | Normal | Box-Muller on two uniforms    | z            |
//! | Gumbel | z = −log(−log u), u ~ U(0,1)  | 1 − e^{−z}   |
//!
//! Element e of a call's noise is a pure function of (stream, e): uniform word e of the
//! stream (Gumbel) or words 2⌊e/2⌋ and 2⌊e/2⌋+1 (Normal, a Box-Muller pair). The words are
//! made on the CPU by [`crate::rng`] (in parallel), the transforms run in libtorch. The
//! uniforms have 24 bits, so |Normal| < 5.9 and Gumbel ∈ (−2.9, 17.4): the truncated tails
//! have probability below 4·10⁻⁹.

use crate::error::{Error, Result};
use crate::rng::Stream;
use tch::{Device, Kind, Tensor};

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

    /// Elements `first .. first + count` of the noise of `stream`, a float32 tensor
    /// `[count]` on the CPU; `threads` threads make the random words.
    pub fn sample(self, stream: &Stream, first: u64, count: usize, threads: usize) -> Result<Tensor> {
        let start = first & !1; // Normal pairs start at even elements
        let end = (first + count as u64 + 1) & !1;
        let m = (end - start) as usize;
        let mut u = Tensor::f_empty([m as i64], (Kind::Float, Device::Cpu))?;
        // SAFETY: `u` is a fresh contiguous float32 CPU tensor of m elements, owned here.
        let words = unsafe { std::slice::from_raw_parts_mut(u.data_ptr() as *mut f32, m) };
        let per = m.div_ceil(threads.max(1)).max(1 << 14);
        std::thread::scope(|scope| {
            for (i, part) in words.chunks_mut(per).enumerate() {
                let offset = start + (i * per) as u64;
                scope.spawn(move || stream.fill_uniform(offset, part));
            }
        });
        let z = match self {
            Noise::Gumbel => u.f_log_()?.f_neg_()?.f_log_()?.f_neg_()?,
            Noise::Normal => {
                let pairs = u.f_view([(m / 2) as i64, 2])?;
                let r = pairs.f_select(1, 0)?.f_log()?.f_mul_scalar(-2.0)?.f_sqrt_()?;
                let mut angle = pairs.f_select(1, 1)?.f_mul_scalar(std::f64::consts::TAU)?;
                let cos = r.f_mul(&angle.f_cos()?)?;
                let sin = r.f_mul(&angle.f_sin_()?)?;
                Tensor::f_stack(&[cos, sin], 1)?.f_view([m as i64])?
            }
        };
        Ok(z.f_narrow(0, (first - start) as i64, count as i64)?)
    }

    /// The score ∇ν(z), elementwise.
    pub fn score(self, z: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Noise::Normal => z.shallow_clone(),
            Noise::Gumbel => z.f_neg()?.f_exp_()?.f_neg_()?.f_add_scalar_(1.0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(noise: Noise, first: u64, n: usize, threads: usize) -> Vec<f64> {
        let z = noise.sample(&Stream::new(11, 0), first, n, threads).unwrap();
        Vec::<f64>::try_from(z.to_kind(Kind::Double)).unwrap()
    }

    #[test]
    fn normal_has_mean_0_variance_1() {
        let n = 400_000;
        let z = values(Noise::Normal, 0, n, 2);
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 5.0 * (1.0 / n as f64).sqrt(), "{mean}");
        // s.d. of the sample variance of N(0,1): sqrt(2/n)
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(), "{var}");
    }

    #[test]
    fn gumbel_has_euler_gamma_mean_and_zero_mean_score() {
        let n = 400_000;
        let z = values(Noise::Gumbel, 0, n, 2);
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let gamma = 0.577_215_664_901_532_9;
        let pi2_6 = std::f64::consts::PI.powi(2) / 6.0;
        assert!((mean - gamma).abs() < 5.0 * (pi2_6 / n as f64).sqrt(), "{mean}");
        // μ4 = 5.4 σ⁴ for a Gumbel: s.d. of the sample variance ≈ sqrt(4.4/n) σ²
        assert!((var - pi2_6).abs() < 5.0 * 4.4f64.sqrt() * pi2_6 / (n as f64).sqrt(), "{var}");
        // E[1 − e^{−Z}] = 0 and Var = 1
        let s = Noise::Gumbel.score(&Tensor::from_slice(&z)).unwrap();
        let score_mean = f64::try_from(s.mean(Kind::Double)).unwrap();
        assert!(score_mean.abs() < 5.0 / (n as f64).sqrt(), "{score_mean}");
    }

    #[test]
    fn draws_do_not_depend_on_chunking_or_threads() {
        for noise in [Noise::Normal, Noise::Gumbel] {
            let whole = values(noise, 3, 101, 1);
            assert_eq!(whole, values(noise, 3, 101, 3));
            for split in [1usize, 2, 7, 50, 100] {
                let mut parts = values(noise, 3, split, 1);
                parts.extend(values(noise, 3 + split as u64, 101 - split, 1));
                for (a, b) in whole.iter().zip(&parts) {
                    // the same element may take a scalar or a vector path of libtorch's
                    // kernels depending on where it sits: equal up to float rounding
                    assert!((a - b).abs() <= 1e-6 * (1.0 + a.abs()), "{noise:?} split {split}: {a} vs {b}");
                }
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
