//! Decision-focused learning over the op's exact solver: the methods of PyEPO's family
//! that need only y*(x), the plain solve ([`PerturbedOp::solve`]), sometimes called again
//! in backward. Each returns results per problem of a batch:
//!
//! | method | forward | gradient | solves |
//! |---|---|---|---|
//! | SPO+ ([`PerturbedOp::spo_plus`]) | the loss | 2(w*(c) − w*(2ĉ − c)), mirrored when maximizing | 1 per problem |
//! | DBB ([`PerturbedOp::blackbox_vjp`]) | y*(θ) | (y*(θ + λg) − y*(θ)) / λ, mirrored when maximizing | 1 per problem in backward |
//! | NID ([`PerturbedOp::negative_identity_vjp`]) | y*(θ) | −g minimizing, g maximizing | none in backward |
//! | PG ([`PerturbedOp::perturbation_gradient`]) | the finite-difference loss | (w₊ − w₋) / (2σ) or (w − w₋) / σ, signed | 2 per problem |
//! | I-MLE ([`PerturbedOp::imle_forward`], [`PerturbedOp::imle_vjp`]) | y_σ(θ) | s·mean(y*(x_k + sλg) − y*(x_k)) / λ over the forward's samples x_k | N per problem, and N (2N two-sided) in backward |
//! | AI-MLE ([`PerturbedOp::aimle_vjp`]) | y_σ(θ) | I-MLE's with λ = α‖θ‖/‖g‖, α adapted | as I-MLE |
//!
//! The signs follow PyEPO 2.2 (`pyepo.func`: `SPOPlus`, `blackboxOpt`, `negativeIdentity`,
//! `perturbationGradient`), where `sign` is +1 for minimize and −1 for maximize. Every
//! method needs a linear objective ⟨c, w⟩ (the op's output shape equal to its input shape).
//!
//! The solves run as [`PerturbedOp::solve`] runs them (the op's threads, workers and
//! device); the rest is done on the host per problem, its dot products summed in f64 in
//! index order: the results are the same bit for bit for any number of threads.

mod blackbox;
mod imle;
mod perturbation_gradient;
mod spo_plus;

pub use imle::{AimleState, ImleRecord};

use crate::error::{Error, Result, Status};
use crate::op::PerturbedOp;
use crate::settings::Sense;
use crate::tensors::host_floats;
use tch::{Device, Tensor};

/// The problems of one method call on the host: `batch` rows of `d` values each (the C
/// layer's borrowed buffers, or the tensor API's host copies).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    pub batch: usize,
    pub d: usize,
}

impl Rows {
    /// Problem `i`'s row of `values`.
    fn row(self, values: &[f32], i: usize) -> &[f32] {
        &values[i * self.d..(i + 1) * self.d]
    }

    /// NON_FINITE_INPUT naming the first non-finite value of `values` (`name[problem][index]`).
    pub(crate) fn check_finite(self, values: &[f32], name: &str) -> Result<()> {
        self.first_non_finite(values).map_or(Ok(()), |(p, j, v)| {
            Err(Error::new(
                Status::NonFiniteInput,
                format!("{name}[{p}][{j}] is {v}; {name} must be finite"),
            ))
        })
    }

    /// The input of a solve made from the call's inputs (2ĉ − c, θ + sλg, ĉ ± σc), checked:
    /// finite inputs can still overflow float32.
    fn check_derived(self, values: &[f32], what: &str) -> Result<()> {
        self.first_non_finite(values).map_or(Ok(()), |(p, j, v)| {
            Err(Error::new(
                Status::NonFiniteInput,
                format!(
                    "{what} is {v} at [{p}][{j}] (it overflows float32): the costs are too large"
                ),
            ))
        })
    }

    /// A result (a loss per problem when `per_problem`, else a gradient) checked: finite
    /// inputs can give a result beyond float32's range (costs near its limit, a tiny λ or
    /// σ), which is refused (INVALID_ARGUMENT naming `what`) rather than returned as inf.
    fn check_result(self, values: &[f32], what: &str) -> Result<()> {
        self.first_non_finite(values).map_or(Ok(()), |(p, j, v)| {
            Err(Error::invalid(format!(
                "{what} is {v} at [{p}][{j}] (it overflows float32): the inputs are too large, or the step too small"
            )))
        })
    }

    /// (problem, index, value as text) of the first non-finite value, if any (one
    /// vectorized pass when all are finite).
    fn first_non_finite(self, values: &[f32]) -> Option<(usize, usize, String)> {
        if crate::input::all_finite(values) {
            return None;
        }
        let i = values.iter().position(|v| !v.is_finite())?;
        let d = self.d.max(1);
        let v = values[i];
        let text = if v.is_nan() {
            "NaN".to_string()
        } else {
            v.to_string()
        };
        Some((i / d, i % d, text))
    }
}

/// The tensors of a method call, on the host: where its results go.
struct Call {
    rows: Rows,
    /// The device of the call's first argument, where its results are returned.
    device: Device,
    shape: Vec<i64>,
}

impl Call {
    /// The call whose first argument is `first` (`[batch, *input_shape]`), for `method`,
    /// which needs a linear objective; `first` on the host.
    fn of(op: &PerturbedOp, method: &str, first: &Tensor, name: &str) -> Result<(Call, Vec<f32>)> {
        op.require_square(method)?;
        let size = first.size();
        let inner = op.input_shape();
        if size.len() != inner.len() + 1 || size[1..] != inner[..] {
            return Err(Error::invalid(format!(
                "{name} must have shape [batch, {}], got {size:?}",
                inner
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let call = Call {
            rows: Rows {
                batch: size[0] as usize,
                d: op.input_numel(),
            },
            device: first.device(),
            shape: size,
        };
        let values = host(first, name)?;
        Ok((call, values))
    }

    /// Another argument of the call, of the first's shape, on the host.
    fn rows(&self, t: &Tensor, name: &str) -> Result<Vec<f32>> {
        if t.size() != self.shape {
            return Err(Error::invalid(format!(
                "{name} must have the shape of the call's first argument {:?}, got {:?}",
                self.shape,
                t.size()
            )));
        }
        host(t, name)
    }

    /// One value per problem, `[batch]`, on the call's device.
    fn per_problem(&self, values: &[f32]) -> Result<Tensor> {
        Ok(crate::tensors::from_slice(values)?.f_to_device(self.device)?)
    }

    /// Rows of the call's shape on the call's device.
    fn like_first(&self, values: &[f32]) -> Result<Tensor> {
        Ok(crate::tensors::from_slice(values)?
            .f_reshape(&self.shape)?
            .f_to_device(self.device)?)
    }
}

/// A float32 tensor's values on the host, checked finite.
fn host(t: &Tensor, name: &str) -> Result<Vec<f32>> {
    crate::input::check_floats(t, name)?;
    host_floats(t)
}

/// `f(a[i], b[i])` for every `i` (the input of a solve made from two of the call's inputs,
/// or a result from two arrays), in a buffer reserved fallibly ([`filled`]).
fn derived(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Result<Vec<f32>> {
    filled(a.len(), a.iter().zip(b).map(|(&x, &y)| f(x, y)))
}

/// The `n` values of `values` in a buffer reserved fallibly (TORCH_ERROR instead of an
/// abort when memory runs out).
fn filled(n: usize, values: impl Iterator<Item = f32>) -> Result<Vec<f32>> {
    let mut out = crate::tensors::host_room(n, "a method's values")?;
    out.extend(values);
    Ok(out)
}

/// PyEPO's sign of a sense: +1 minimizing, −1 maximizing.
fn pyepo_sign(sense: Sense) -> f32 {
    match sense {
        Sense::Minimize => 1.0,
        Sense::Maximize => -1.0,
    }
}

/// ⟨a, b⟩ in f64, in a fixed order (eight lanes by index mod 8 over whole groups of eight,
/// combined pairwise, then the tail in order): the same bits on every machine and thread
/// count, and vectorizable (one chain of dependent additions would cost four cycles an
/// entry). With AVX2 the same loop runs compiled for it, with the same bits (Rust never
/// fuses a multiply and an add).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { dots_avx2([(a, b)]) }[0];
    }
    dot_lanes(a, b)
}

/// (⟨a, b⟩, ⟨c, e⟩), each as [`dot`] gives it, in one loop (the two chains of additions
/// overlap).
fn dot2(a: &[f32], b: &[f32], c: &[f32], e: &[f32]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        let [x, y] = unsafe { dots_avx2([(a, b), (c, e)]) };
        return (x, y);
    }
    (dot_lanes(a, b), dot_lanes(c, e))
}

/// [`dot_lanes`] of each pair in AVX, the pairs in one loop (over the shortest pair's whole
/// groups of eight; each pair's own remaining groups after it): lanes 0-3 in one register,
/// 4-7 in another, each a multiply then an add (no fused multiply-add), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const K: usize>(pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
    use std::arch::x86_64::*;
    let lens = pairs.map(|(a, b)| a.len().min(b.len()));
    let common = lens.iter().copied().min().unwrap_or(0) / 8 * 8;
    let mut acc = [[_mm256_setzero_pd(); 2]; K];
    // one group of eight of pair k at i (i + 8 <= lens[k])
    let group = |acc: &mut [__m256d; 2], (a, b): (&[f32], &[f32]), i: usize| {
        // SAFETY: i + 8 <= both lengths (the callers' bounds).
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        let x_low = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
        let y_low = _mm256_cvtps_pd(_mm256_castps256_ps128(y));
        let x_high = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x));
        let y_high = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(y));
        acc[0] = _mm256_add_pd(acc[0], _mm256_mul_pd(x_low, y_low));
        acc[1] = _mm256_add_pd(acc[1], _mm256_mul_pd(x_high, y_high));
    };
    let mut i = 0;
    while i < common {
        for k in 0..K {
            group(&mut acc[k], pairs[k], i);
        }
        i += 8;
    }
    let mut out = [0.0; K];
    for k in 0..K {
        let whole = lens[k] / 8 * 8;
        let mut j = common;
        while j < whole {
            group(&mut acc[k], pairs[k], j);
            j += 8;
        }
        let mut lanes = [0.0f64; 8];
        // SAFETY: lanes holds 8 doubles.
        unsafe {
            _mm256_storeu_pd(lanes.as_mut_ptr(), acc[k][0]);
            _mm256_storeu_pd(lanes.as_mut_ptr().add(4), acc[k][1]);
        }
        let (a, b) = pairs[k];
        out[k] = combine(&lanes, &a[whole..lens[k]], &b[whole..lens[k]]);
    }
    out
}

fn dot_lanes(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let (mut xs, mut ys) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut xs).zip(&mut ys) {
        for k in 0..8 {
            lanes[k] += f64::from(x[k]) * f64::from(y[k]);
        }
    }
    combine(&lanes, xs.remainder(), ys.remainder())
}

/// The eight lanes combined pairwise, plus the tail's products summed in order.
fn combine(lanes: &[f64; 8], a: &[f32], b: &[f32]) -> f64 {
    let tail: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        + tail
}

/// A step (λ, σ) checked: finite, > 0, and > 0 as float32.
pub(crate) fn check_step(value: f64, name: &str) -> Result<()> {
    step(value, name).map(|_| ())
}

fn step(value: f64, name: &str) -> Result<f32> {
    let f = value as f32;
    if !(value.is_finite() && value > 0.0 && f > 0.0 && f.is_finite()) {
        return Err(Error::invalid(format!(
            "{name} must be finite and > 0 (and within float32's range), got {value}"
        )));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX dot is the portable one, bit for bit, for every length and sign mix.
    #[test]
    fn dot_is_the_same_with_and_without_avx() {
        let mut s = 12345u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 1e3
        };
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let want = dot_lanes(&a, &b);
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "n {n}");
            let naive: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            assert!((want - naive).abs() <= 1e-9 * (1.0 + naive.abs()), "n {n}");
            // two pairs in one loop, of this length and of every other
            for m in [0, 1, 7, 8, 9, 17, 40, n] {
                let c: Vec<f32> = (0..m).map(|_| next()).collect();
                let e: Vec<f32> = (0..m).map(|_| next()).collect();
                let (x, y) = dot2(&a, &b, &c, &e);
                let other = dot_lanes(&c, &e);
                assert_eq!(
                    (x.to_bits(), y.to_bits()),
                    (want.to_bits(), other.to_bits()),
                    "n {n}, m {m}"
                );
            }
        }
    }
}
