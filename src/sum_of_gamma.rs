//! Sum-of-Gamma noise (Niepert et al., "Implicit MLE", NeurIPS 2021), the noise of I-MLE:
//! (Σᵢ₌₁ˢ Gamma(1/κ, κ/i) − log s) / κ, whose sum over κ independent draws tends to a
//! Gumbel as s grows. Its element e is a pure function of (stream, e), as every noise's:
//! term i's Gamma variate comes from the blocks ((i − 1)·16 + a)·2⁴⁰ + e of the stream,
//! a = 0, 1, ... the attempts of Marsaglia and Tsang's rejection method (one block each: a
//! Box-Muller normal, the acceptance uniform, and the uniform that lowers the shape below
//! 1). So the first attempts of sixteen consecutive elements are sixteen consecutive
//! blocks, made abreast and transformed lane by lane (vectorized, with the float32
//! functions of `fastmath`); the few rejected lanes (about 2%) try again one by one, with
//! the same arithmetic, so the values do not depend on the grouping. After 16 rejected
//! attempts (probability below 10⁻²⁰) the last candidate is taken. A call may draw at most
//! 2⁴⁰ values (checked when it starts). It has no score, so no Jacobian estimate: it serves
//! the Fenchel-Young loss, forward calls without a tape, draws and I-MLE.

use crate::error::{Error, Result};
use crate::fastmath::{exp_nonpositive, has_avx2, ln, sincos_2pi};
use crate::rng::{unit, Stream, Words64, LANES64};
use std::mem::MaybeUninit;

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

/// At most this many terms (keeps every counter of a call within the stream's 2⁶⁴ blocks;
/// C: `PERT_SUM_OF_GAMMA_MAX_TERMS`).
pub(crate) const SUM_OF_GAMMA_MAX_TERMS: u32 = 1000;

/// κ from `KAPPA_RANGE.0` to `KAPPA_RANGE.1`: the variates are made in float32, where
/// κ, 1/κ and the shape's constants must stay well inside the range (beyond about 100 the
/// smallest Gamma values are rounded to 0 more and more often; C: `PERT_SUM_OF_GAMMA_MIN_KAPPA`,
/// `PERT_SUM_OF_GAMMA_MAX_KAPPA`).
pub(crate) const KAPPA_RANGE: (f64, f64) = (1e-3, 1e3);

/// The attempts of the rejection method per Gamma variate.
const GAMMA_ATTEMPTS: u64 = 16;

impl SumOfGamma {
    /// The parameters, checked: κ in [`KAPPA_RANGE`], 1 to [`SUM_OF_GAMMA_MAX_TERMS`] terms.
    pub(crate) fn new(kappa: f64, terms: u32) -> Result<SumOfGamma> {
        if !(KAPPA_RANGE.0..=KAPPA_RANGE.1).contains(&kappa) {
            return Err(Error::invalid(format!(
                "the Sum-of-Gamma kappa must be from {} to {}, got {kappa}",
                KAPPA_RANGE.0, KAPPA_RANGE.1
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

    /// Element `e` of the noise of `stream` (one at a time, the reference of the tests;
    /// [`SumOfGamma::fill`] gives the same values faster).
    #[cfg(test)]
    pub(crate) fn value(self, stream: &Stream, e: u64) -> f32 {
        let k = Consts::of(self);
        let mut sum = 0.0f32;
        for i in 0..self.terms {
            let (g, ok) = k.candidate(stream.block(block_index(i, 0, e)));
            let g = if ok { g } else { k.retry(stream, i, e) };
            sum += g * k.weights[i as usize];
        }
        k.finish(sum)
    }

    /// Writes elements `first .. first + out.len()` of the noise of `stream`.
    pub(crate) fn fill(self, stream: &Stream, first: u64, out: &mut [MaybeUninit<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.fill_avx2(stream, first, out) };
        }
        self.fill_impl(stream, first, out, Stream::words64)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_avx2(self, stream: &Stream, first: u64, out: &mut [MaybeUninit<f32>]) {
        self.fill_impl(stream, first, out, |s: &Stream, g, w: &mut Words64| {
            s.words64_avx2(g, w)
        })
    }

    #[inline(always)]
    fn fill_impl(
        self,
        stream: &Stream,
        first: u64,
        out: &mut [MaybeUninit<f32>],
        words64: impl Fn(&Stream, u64, &mut Words64),
    ) {
        let k = Consts::of(self);
        let lanes = LANES64 as u64;
        let mut e0 = first - first % lanes;
        let mut done = 0;
        while done < out.len() {
            let values = k.group(stream, e0, &words64);
            let offset = (first + done as u64 - e0) as usize;
            let take = (LANES64 - offset).min(out.len() - done);
            for (o, &v) in out[done..done + take]
                .iter_mut()
                .zip(&values[offset..offset + take])
            {
                o.write(v);
            }
            done += take;
            e0 += lanes;
        }
    }
}

/// The largest number of values a call may draw (element indices below 2⁴⁰: see the module).
pub(crate) const SUM_OF_GAMMA_MAX_VALUES: u64 = 1 << 40;

/// The block of attempt `a` of term `i` (from 0) of element `e`.
#[inline(always)]
fn block_index(i: u32, a: u64, e: u64) -> u64 {
    ((u64::from(i) * GAMMA_ATTEMPTS + a) << 40) | (e & (SUM_OF_GAMMA_MAX_VALUES - 1))
}

/// What the lanes share: Marsaglia and Tsang's constants for the shape, and the terms'
/// weights κ/i.
struct Consts {
    /// Whether the shape 1/κ is below 1 (a Gamma(1/κ + 1) variate times u^κ).
    boost: bool,
    inv_alpha: f32,
    d: f32,
    c: f32,
    weights: Vec<f32>,
    kappa: f32,
    log_terms: f32,
}

impl Consts {
    fn of(sog: SumOfGamma) -> Consts {
        let alpha = 1.0 / sog.kappa;
        let boost = alpha < 1.0;
        let a = if boost { alpha + 1.0 } else { alpha };
        let d = a - 1.0 / 3.0;
        Consts {
            boost,
            inv_alpha: sog.kappa as f32,
            d: d as f32,
            c: (1.0 / (9.0 * d).sqrt()) as f32,
            weights: (1..=sog.terms)
                .map(|i| (sog.kappa / f64::from(i)) as f32)
                .collect(),
            kappa: sog.kappa as f32,
            log_terms: f64::from(sog.terms).ln() as f32,
        }
    }

    /// One attempt from one block: (the Gamma(1/κ) candidate, whether it is accepted).
    /// Branch-free float32 arithmetic (the same bits in every lane and one by one).
    #[inline(always)]
    fn candidate(&self, [w0, w1, w2, w3]: [u32; 4]) -> (f32, bool) {
        let (d, c) = (self.d, self.c);
        let r = (-2.0 * ln(unit(w0))).sqrt();
        let (_, cos) = sincos_2pi(unit(w1));
        let x = r * cos;
        let t = c.mul_add(x, 1.0);
        let v = t * t * t;
        let u = unit(w2);
        let x2 = x * x;
        let squeeze = u < (-0.0331 * x2).mul_add(x2, 1.0);
        let exact = ln(u) < 0.5f32.mul_add(x2, d) - d * v + d * ln(v.max(f32::MIN_POSITIVE));
        let boost = if self.boost {
            exp_nonpositive(ln(unit(w3)) * self.inv_alpha)
        } else {
            1.0
        };
        (d * v * boost, t > 0.0 && (squeeze || exact))
    }

    /// Term `i` of element `e` from attempts 1 .. 16, one at a time (for a lane whose first
    /// attempt was rejected): the first accepted candidate, else the last one (or d·u^κ at
    /// u = ½ when none was positive). Inlined into the vectorized fill (hardware FMA there).
    #[inline(always)]
    fn retry(&self, stream: &Stream, i: u32, e: u64) -> f32 {
        let mut last = None;
        for a in 1..GAMMA_ATTEMPTS {
            let (g, ok) = self.candidate(stream.block(block_index(i, a, e)));
            if ok {
                return g;
            }
            if g > 0.0 {
                last = Some(g);
            }
        }
        last.unwrap_or_else(|| {
            self.d
                * if self.boost {
                    exp_nonpositive(-std::f32::consts::LN_2 * self.inv_alpha)
                } else {
                    1.0
                }
        })
    }

    /// The noise value of a lane's weighted sum of terms.
    #[inline(always)]
    fn finish(&self, sum: f32) -> f32 {
        (sum - self.log_terms) / self.kappa
    }

    /// The values of elements `e0 .. e0 + 16` (e0 a multiple of 16).
    #[inline(always)]
    fn group(
        &self,
        stream: &Stream,
        e0: u64,
        words64: &impl Fn(&Stream, u64, &mut Words64),
    ) -> [f32; LANES64] {
        let mut words: Words64 = [[0; LANES64]; 4];
        let mut sum = [0.0f32; LANES64];
        let mut g = [0.0f32; LANES64];
        let mut ok = [false; LANES64];
        for (i, &w) in self.weights.iter().enumerate() {
            // the first attempts of the sixteen elements: sixteen consecutive blocks
            words64(
                stream,
                block_index(i as u32, 0, e0) / LANES64 as u64,
                &mut words,
            );
            for lane in 0..LANES64 {
                (g[lane], ok[lane]) = self.candidate([
                    words[0][lane],
                    words[1][lane],
                    words[2][lane],
                    words[3][lane],
                ]);
            }
            for lane in 0..LANES64 {
                if !ok[lane] {
                    g[lane] = self.retry(stream, i as u32, e0 + lane as u64);
                }
                sum[lane] += g[lane] * w;
            }
        }
        sum.map(|s| self.finish(s))
    }
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

    /// The Gamma(1/κ) variates (a term before its weight) have mean and variance 1/κ, for
    /// shapes below and above 1; the grouped fill and one value at a time agree bit for bit.
    #[test]
    fn gamma_has_its_moments_and_fill_equals_value() {
        let stream = Stream::new(17, 2);
        let n = 200_000u64;
        for kappa in [5.0f64, 1.0, 0.4, 1e-3] {
            let alpha = 1.0 / kappa;
            let k = Consts::of(SumOfGamma::new(kappa, 1).unwrap());
            let g: Vec<f64> = (0..n)
                .map(|e| {
                    let (g, ok) = k.candidate(stream.block(block_index(0, 0, e)));
                    f64::from(if ok { g } else { k.retry(&stream, 0, e) })
                })
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
            assert!(g.iter().all(|&x| x >= 0.0 && x.is_finite()));
        }
        let sog = SumOfGamma::new(5.0, 10).unwrap();
        for first in [0u64, 3, 16, 37] {
            let mut out = vec![MaybeUninit::<f32>::uninit(); 53];
            sog.fill(&stream, first, &mut out);
            for (j, o) in out.iter().enumerate() {
                // SAFETY: fill writes every element
                let v = unsafe { o.assume_init() };
                assert_eq!(
                    v.to_bits(),
                    sog.value(&stream, first + j as u64).to_bits(),
                    "{first} + {j}"
                );
            }
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
        assert!(Noise::sum_of_gamma(1e-40, 10).is_err());
        assert!(Noise::sum_of_gamma(1e300, 10).is_err());
        assert!(Noise::sum_of_gamma(1e-3, 10).is_ok() && Noise::sum_of_gamma(1e3, 10).is_ok());
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
