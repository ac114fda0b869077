//! The methods' passes over host rows, fused and vectorized: the library's share of a
//! method call beyond its solves is a few passes over `batch × d` floats, which cost about
//! as much as a cheap solver (a shortest path on a small grid takes about 90 ns a problem),
//! so each pass computes what it can and checks what it writes and reads on the way, and
//! the separate checks (which name the first bad value) run only when a pass finds one.
//!
//! Each kernel runs compiled for the widest vectors the CPU has
//! ([`crate::vectorized`]), with the same bits on every CPU.

use crate::error::Result;
use crate::vectorized::{vectorized, Kernel, Vectors};
use std::mem::MaybeUninit;

/// 1 if `v` is NaN or infinite (all exponent bits set), else 0: or-ed over a pass, a
/// vectorizable reduction.
#[inline(always)]
fn non_finite(v: f32) -> u32 {
    const EXPONENT: u32 = 0x7f80_0000;
    u32::from(v.to_bits() & EXPONENT == EXPONENT)
}

/// `f(a[i], b[i])` for every `i` in a new buffer, and whether those values and every
/// value of the slices `also` (each as long as `a`) are finite: one pass. `a` and `b`
/// have the same length.
pub(super) fn map2_checked<const K: usize>(
    a: &[f32],
    b: &[f32],
    also: [&[f32]; K],
    f: impl Fn(f32, f32) -> f32,
) -> Result<(Vec<f32>, bool)> {
    let n = a.len();
    assert!(b.len() == n && also.iter().all(|s| s.len() == n));
    let mut out = crate::tensors::host_room(n, "a method's values")?;
    let finite = vectorized(Map2 {
        a,
        b,
        also,
        out: &mut out.spare_capacity_mut()[..n],
        f,
    });
    // SAFETY: Map2 wrote each of the first n elements (all of `out` it was given).
    unsafe { out.set_len(n) };
    Ok((out, finite))
}

/// Writes `f(a[i], b[i])` into `out[i]` for every `i < out.len()`; whether those and
/// `also`'s values are finite.
struct Map2<'a, F, const K: usize> {
    a: &'a [f32],
    b: &'a [f32],
    also: [&'a [f32]; K],
    out: &'a mut [MaybeUninit<f32>],
    f: F,
}

impl<F: Fn(f32, f32) -> f32, const K: usize> Kernel for Map2<'_, F, K> {
    type Output = bool;

    #[inline(always)]
    fn run<V: Vectors>(self, _: V) -> bool {
        map2_into(self.a, self.b, self.also, self.out, &self.f) == 0
    }
}

/// [`Map2`]'s loop (one loop over the slices, which the compiler vectorizes): the
/// non-finite flag.
#[inline(always)]
fn map2_into<const K: usize>(
    a: &[f32],
    b: &[f32],
    also: [&[f32]; K],
    out: &mut [MaybeUninit<f32>],
    f: &impl Fn(f32, f32) -> f32,
) -> u32 {
    let n = out.len();
    let (a, b, also) = (&a[..n], &b[..n], also.map(|s| &s[..n]));
    let mut flag = 0;
    for i in 0..n {
        let v = f(a[i], b[i]);
        out[i].write(v);
        flag |= non_finite(v);
        for s in &also {
            flag |= non_finite(s[i]);
        }
    }
    flag
}

/// SPO+'s results from its solve (rows of `d` values; `obj` one per problem): per problem
/// `i`, the loss `sign · (−⟨q, w_q⟩ + 2⟨ĉ, w⟩ − z)` with the dots in f64 ([`crate::dot::dot`]'s
/// bits), and the gradient row `(sign · 2) · (w − w_q)`;
/// and whether every loss and gradient value is finite.
#[allow(clippy::too_many_arguments)]
pub(super) fn spo_plus_results(
    d: usize,
    q: &[f32],
    w_q: &[f32],
    pred: &[f32],
    sol: &[f32],
    obj: &[f32],
    sign: f32,
) -> Result<(Vec<f32>, Vec<f32>, bool)> {
    let (batch, n) = (obj.len(), q.len());
    assert!(batch * d == n && [w_q, pred, sol].iter().all(|s| s.len() == n));
    let twice = sign * 2.0;
    losses_and_gradient(
        (d, batch),
        [(q, w_q), (pred, sol)],
        |i, [q_wq, pred_w]| (f64::from(sign) * (-q_wq + 2.0 * pred_w - f64::from(obj[i]))) as f32,
        [sol, w_q],
        |w, w_q| twice * (w - w_q),
        "the SPO+ results",
    )
}

/// PG's results from its two solves (rows of `d` values): per problem `i`, the loss
/// `sign · (⟨x₊, w₊⟩ − ⟨x₋, w₋⟩) / width` with the dots in f64 ([`crate::dot::dot`]'s
/// bits), and the gradient row `sign · (w₊ − w₋) / width`; and whether every loss and
/// gradient value is finite.
pub(super) fn pg_results(
    d: usize,
    [plus, minus]: [&[f32]; 2],
    [w_plus, w_minus]: [&[f32]; 2],
    sign: f32,
    width: f32,
) -> Result<(Vec<f32>, Vec<f32>, bool)> {
    let n = plus.len();
    let batch = n.checked_div(d).unwrap_or(0);
    assert!(batch * d == n && [minus, w_plus, w_minus].iter().all(|s| s.len() == n));
    losses_and_gradient(
        (d, batch),
        [(plus, w_plus), (minus, w_minus)],
        |_, [up, down]| (f64::from(sign) * (up - down) / f64::from(width)) as f32,
        [w_plus, w_minus],
        |a, b| sign * (a - b) / width,
        "the PG results",
    )
}

/// A method's results from its solves: per problem `i` (rows of `d`), the loss
/// `value(i, dots)` ([`losses`]), and the gradient `f(g₀[k], g₁[k])` of `[g₀, g₁]`;
/// and whether every loss and gradient value is finite.
fn losses_and_gradient(
    (d, batch): (usize, usize),
    pairs: [(&[f32], &[f32]); 2],
    value: impl Fn(usize, [f64; 2]) -> f32,
    [g0, g1]: [&[f32]; 2],
    f: impl Fn(f32, f32) -> f32,
    what: &str,
) -> Result<(Vec<f32>, Vec<f32>, bool)> {
    let loss = losses(d, batch, pairs, value, what)?;
    let (grad, finite) = map2_checked(g0, g1, [], f)?;
    let finite = finite && crate::input::all_finite(&loss);
    Ok((loss, grad, finite))
}

/// `value(i, [⟨a₀, b₀⟩, ⟨a₁, b₁⟩])` for each problem `i` of `batch` (their losses), the
/// dots of row `i` of each pair `(a, b)` of `pairs` (rows of `d` values) in f64
/// ([`crate::dot::dot`]'s bits), in a buffer reserved fallibly: the loop compiled for the
/// widest vectors the CPU has, the dot products inlined into it.
fn losses(
    d: usize,
    batch: usize,
    pairs: [(&[f32], &[f32]); 2],
    value: impl Fn(usize, [f64; 2]) -> f32,
    what: &str,
) -> Result<Vec<f32>> {
    assert!(pairs
        .iter()
        .all(|(a, b)| a.len() == batch * d && b.len() == batch * d));
    let mut out = crate::tensors::host_room(batch, what)?;
    vectorized(Losses {
        d,
        pairs,
        out: &mut out.spare_capacity_mut()[..batch],
        value,
    });
    // SAFETY: Losses wrote each of the first `batch` elements (all it was given).
    unsafe { out.set_len(batch) };
    Ok(out)
}

/// [`losses`]' kernel: writes every element of `out`, one per problem.
struct Losses<'a, F> {
    d: usize,
    pairs: [(&'a [f32], &'a [f32]); 2],
    out: &'a mut [MaybeUninit<f32>],
    value: F,
}

impl<F: Fn(usize, [f64; 2]) -> f32> Kernel for Losses<'_, F> {
    type Output = ();

    #[inline(always)]
    fn run<V: Vectors>(self, vectors: V) {
        let d = self.d;
        let [(a0, b0), (a1, b1)] = self.pairs;
        // two problems at a time: four independent chains of additions (one problem's
        // two chains and its loss are too short to keep the CPU busy)
        let (pairs, last) = self.out.as_chunks_mut::<2>();
        for (k, out) in pairs.iter_mut().enumerate() {
            let (i, j) = (2 * k, 2 * k + 1);
            let [x0, x1, y0, y1] = vectors.dots([
                (rows(d, a0, i), rows(d, b0, i)),
                (rows(d, a1, i), rows(d, b1, i)),
                (rows(d, a0, j), rows(d, b0, j)),
                (rows(d, a1, j), rows(d, b1, j)),
            ]);
            out[0].write((self.value)(i, [x0, x1]));
            out[1].write((self.value)(j, [y0, y1]));
        }
        if let [out] = last {
            let i = 2 * pairs.len();
            let dots = vectors.dots([
                (rows(d, a0, i), rows(d, b0, i)),
                (rows(d, a1, i), rows(d, b1, i)),
            ]);
            out.write((self.value)(i, dots));
        }
    }
}

/// Problem `i`'s row of `values` (rows of `d`).
#[inline(always)]
fn rows(d: usize, values: &[f32], i: usize) -> &[f32] {
    &values[i * d..(i + 1) * d]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vectorized::Portable;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 100.0
            })
            .collect()
    }

    /// Map2 on the widest vectors and as plain code: the scalar formula bit for bit, and a
    /// NaN or infinity anywhere in the result or in `also` (lanes and tails of every
    /// length) is found.
    #[test]
    fn map2_computes_each_value_and_finds_every_non_finite_one() {
        let f = |a: f32, b: f32| 2.0 * a - b;
        // (under Miri, which checks the unsafe code, lengths around the vector widths)
        let lengths: Vec<usize> = if cfg!(miri) {
            vec![0, 1, 7, 8, 9, 17, 33]
        } else {
            (0..70).collect()
        };
        for n in lengths {
            let (a, b, c) = (values(n, 1), values(n, 2), values(n, 3));
            let want: Vec<u32> = a.iter().zip(&b).map(|(&x, &y)| f(x, y).to_bits()).collect();
            let (out, finite) = map2_checked(&a, &b, [&c], f).unwrap();
            assert!(finite, "n {n}");
            assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
            let mut plain = vec![MaybeUninit::uninit(); n];
            let kernel = Map2 {
                a: &a,
                b: &b,
                also: [&c],
                out: &mut plain,
                f,
            };
            assert!(kernel.run(Portable), "n {n}");
            // SAFETY: the kernel wrote every element.
            let plain: Vec<u32> = plain
                .iter()
                .map(|v| unsafe { v.assume_init() }.to_bits())
                .collect();
            assert_eq!(plain, want, "n {n}");
            for at in 0..n {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    for which in 0..3 {
                        let (mut a, mut b, mut c) = (a.clone(), b.clone(), c.clone());
                        [&mut a, &mut b, &mut c][which][at] = bad;
                        let (_, finite) = map2_checked(&a, &b, [&c], f).unwrap();
                        assert!(!finite, "n {n} at {at} input {which} {bad}");
                    }
                }
                // finite inputs whose result overflows
                let (mut a, b) = (a.clone(), b.clone());
                a[at] = f32::MAX;
                let (_, finite) = map2_checked(&a, &b, [], |x, y| x * 4.0 + y).unwrap();
                assert!(!finite, "n {n} at {at} overflow");
            }
        }
    }

    /// The losses are the formula over `crate::dot::dot`, bit for bit, for odd and even
    /// batches (two problems at a time, then the last), on the widest vectors and as plain
    /// code.
    #[test]
    fn losses_are_the_formula_over_the_dots() {
        for d in [1, 7, 8, 40, 41] {
            for batch in 0..if cfg!(miri) { 4 } else { 6 } {
                let n = batch * d;
                let [a0, b0, a1, b1] = [4, 5, 6, 7].map(|s| values(n, s));
                let row = |v: &[f32], i: usize| v[i * d..(i + 1) * d].to_vec();
                let value = |i: usize, [x, y]: [f64; 2]| (x - 2.0 * y + i as f64) as f32;
                let want: Vec<u32> = (0..batch)
                    .map(|i| {
                        let x = crate::dot::dot(&row(&a0, i), &row(&b0, i));
                        let y = crate::dot::dot(&row(&a1, i), &row(&b1, i));
                        value(i, [x, y]).to_bits()
                    })
                    .collect();
                let got = losses(d, batch, [(&a0, &b0), (&a1, &b1)], value, "test").unwrap();
                assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
                let mut plain = vec![MaybeUninit::uninit(); batch];
                let kernel = Losses {
                    d,
                    pairs: [(&a0, &b0), (&a1, &b1)],
                    out: &mut plain,
                    value,
                };
                kernel.run(Portable);
                // SAFETY: the kernel wrote every element.
                let plain: Vec<u32> = plain
                    .iter()
                    .map(|v| unsafe { v.assume_init() }.to_bits())
                    .collect();
                assert_eq!(plain, want, "d {d} batch {batch}");
            }
        }
    }
}
