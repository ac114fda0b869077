//! Built-in solvers: no callback. On CUDA they run in libtorch on the device, with no host
//! round trip; on the CPU in Rust, on all cores (the argmax in a fused kernel, see
//! [`crate::kernels::fused_argmax`]). Each works along the last dimension of the input; the output
//! has the input's shape.

use super::largest::{first_max, ordered, top_k, top_k_above, top_k_by_selection, AboveScratch};
use crate::error::{Error, Result};
use crate::tuning::{RADIX_MIN, RANKS_COUNTED_UP_TO};
use tch::{Kind, Tensor};

/// A built-in solver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// One-hot of the largest entry along the last dimension (C: `PERT_BUILTIN_ARGMAX = 0`).
    /// Its statistics are accumulated as counts of winners, not one-hot products.
    Argmax,
    /// Indicator of the k largest entries along the last dimension
    /// (C: `PERT_BUILTIN_TOPK = 1`).
    TopK(i64),
    /// 1-based ranks along the last dimension, the smallest entry ranked 1
    /// (C: `PERT_BUILTIN_RANKS = 2`).
    Ranks,
}

/// Solutions of a chunk of perturbed problems.
pub(crate) enum Solutions {
    /// `[rows, output_numel]` float32.
    Dense(Tensor),
    /// 0/1 solutions given by the flat positions of their ones, `[rows, m]` int64, distinct
    /// within a row (argmax: one per slice along the last dimension; top-k: k per slice).
    Indicator(Tensor),
}

impl Builtin {
    /// The built-in with this C number; `k` is used by top-k only.
    pub fn from_u32(id: u32, k: i64) -> Result<Builtin> {
        match id {
            0 => Ok(Builtin::Argmax),
            1 => Ok(Builtin::TopK(k)),
            2 => Ok(Builtin::Ranks),
            _ => Err(Error::invalid(format!(
                "builtin must be PERT_BUILTIN_ARGMAX (0), PERT_BUILTIN_TOPK (1) or PERT_BUILTIN_RANKS (2), got {id}"
            ))),
        }
    }

    /// Checks that the built-in applies to problems of `input_shape`.
    pub fn check(self, input_shape: &[i64]) -> Result<()> {
        let last = *input_shape.last().ok_or_else(|| {
            Error::invalid(
                "built-in solvers work along the last dimension: input_rank must be >= 1, got 0",
            )
        })?;
        if let Builtin::TopK(k) = self {
            if k < 1 || k > last {
                return Err(Error::invalid(format!(
                    "top-k needs 1 <= k <= the last dimension ({last}), got k = {k}"
                )));
            }
        }
        Ok(())
    }

    /// Solves the problems `x` `[rows, *input_shape]`, with `last` the size of the last
    /// dimension.
    pub(crate) fn solve(self, x: &Tensor, last: i64) -> Result<Solutions> {
        let size = x.size();
        let (rows, numel) = (size[0], size[1..].iter().product::<i64>());
        // sizes spelt out (no -1): a view of 0 rows has no inferable dimension
        let flat = x.f_view([rows, numel / last, last])?; // [rows, groups, last]
                                                          // the host kernels' tie rules (see `largest`), whatever libtorch's kernels do with
                                                          // ties: argmax (and top-1) the first largest entry by IEEE comparison (libtorch's
                                                          // argmax documents the first); top-k and ranks by unique integer keys in the order
                                                          // of `f32::total_cmp`, ties to the first position
        Ok(match self {
            Builtin::Argmax | Builtin::TopK(1) => {
                let index = flat.f_argmax(2, true)?; // [rows, groups, 1]
                Solutions::Indicator(flat_positions(&index, last)?)
            }
            Builtin::TopK(k) => {
                let (_, index) = tie_keys(&flat, last, true)?.f_topk(k, 2, true, false)?;
                Solutions::Indicator(flat_positions(&index, last)?) // [rows, groups, k]
            }
            Builtin::Ranks => {
                let order = tie_keys(&flat, last, false)?.f_argsort(2, false)?;
                let ranks = order
                    .f_argsort(2, false)?
                    .f_to_kind(Kind::Float)?
                    .f_add_scalar_(1.0)?;
                Solutions::Dense(ranks.f_view([rows, numel])?)
            }
        })
    }
}

/// Unique int64 keys of the float32 entries `flat` `[rows, groups, last]` in the order of
/// `f32::total_cmp`, equal entries told apart by their position: the earlier position has
/// the larger key when `first_largest` (top-k: ties to the first), the smaller otherwise
/// (ranks: ties ranked in the order of their positions). Key = total-order value · 2³² +
/// position term, which fits in an int64.
fn tie_keys(flat: &Tensor, last: i64, first_largest: bool) -> Result<Tensor> {
    if u32::try_from(last).is_err() {
        return Err(Error::invalid(format!(
            "built-in top-k and ranks take a last dimension below 2^32 on this path, got {last}"
        )));
    }
    // the bits as int32; negative floats get their lower 31 bits flipped, which puts every
    // float in the total order as a signed integer
    let bits = flat.f_contiguous()?.f_view_dtype(Kind::Int)?;
    let flip = bits
        .f_bitwise_right_shift_tensor_scalar(31)?
        .f_bitwise_and(0x7fff_ffffi64)?;
    let value = bits.f_bitwise_xor_tensor(&flip)?.f_to_kind(Kind::Int64)?;
    let position = Tensor::f_arange(last, (Kind::Int64, flat.device()))?;
    let position = if first_largest {
        position.f_neg()?.f_add_scalar((1i64 << 32) - 1)?
    } else {
        position
    };
    Ok(value.f_mul_scalar(1i64 << 32)?.f_add(&position)?)
}

impl Builtin {
    /// The ones of each slice's solution for 0/1 built-ins (argmax: 1, top-k: k), or None
    /// (ranks).
    pub(crate) fn ones_per_slice(self) -> Option<usize> {
        match self {
            Builtin::Argmax => Some(1),
            Builtin::TopK(k) => Some(k as usize),
            Builtin::Ranks => None,
        }
    }

    /// The 0/1 solutions of argmax and top-k as the positions of their ones: for each row
    /// of `x` (rows of `d` floats, slices of `last`), its [`Builtin::ones_per_slice`] ones
    /// per slice, positions within the row in increasing order, into `ones` (cleared
    /// first). The solutions of [`Builtin::solve_host`], without writing their zeros.
    pub(crate) fn ones_host(self, x: &[f32], d: usize, last: usize, ones: &mut Vec<u32>) {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.ones_host_avx2(x, d, last, ones) };
        }
        self.ones_host_impl(x, d, last, ones)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn ones_host_avx2(self, x: &[f32], d: usize, last: usize, ones: &mut Vec<u32>) {
        self.ones_host_impl(x, d, last, ones)
    }

    #[inline(always)]
    fn ones_host_impl(self, x: &[f32], d: usize, last: usize, ones: &mut Vec<u32>) {
        let mut order: Vec<usize> = Vec::new();
        let mut above = AboveScratch::default();
        ones.clear();
        let slices = d / last;
        // per slice of a row: the bar of the same slice of the row before (the rows of a
        // problem's samples are alike)
        let mut bars = vec![
            0u32;
            if matches!(self, Builtin::TopK(_)) {
                slices
            } else {
                0
            }
        ];
        for (s, xs) in x.chunks_exact(last).enumerate() {
            let at = (s % slices) * last; // the slice's first position within its row
            match self {
                Builtin::Argmax => ones.push((at + first_max(xs)) as u32),
                Builtin::TopK(1) => ones.push((at + first_max(xs)) as u32),
                Builtin::TopK(k) => {
                    if (k as usize) * 64 <= last || u32::try_from(last).is_err() {
                        top_k(xs, k as usize, &mut order);
                        order.sort_unstable();
                        ones.extend(order.iter().map(|&i| (at + i) as u32));
                    } else {
                        let bar = &mut bars[s % slices];
                        top_k_above(xs, k as usize, bar, at as u32, ones, &mut above);
                    }
                }
                Builtin::Ranks => unreachable!("ranks are not 0/1"),
            }
        }
    }

    /// The solutions of `x` (rows of `d` floats, slices of `last` along each row) into `y`,
    /// on the host: the CPU path of top-k and ranks (argmax has its own fused kernel).
    pub(crate) fn solve_host(self, x: &[f32], last: usize, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.solve_host_avx2(x, last, y) };
        }
        self.solve_host_impl(x, last, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn solve_host_avx2(self, x: &[f32], last: usize, y: &mut [f32]) {
        self.solve_host_impl(x, last, y)
    }

    #[inline(always)]
    fn solve_host_impl(self, x: &[f32], last: usize, y: &mut [f32]) {
        let mut order: Vec<usize> = Vec::with_capacity(last);
        let mut values: Vec<u64> = Vec::new();
        let mut keys: Vec<u64> = Vec::new();
        let mut spare: Vec<u64> = Vec::new();
        for (xs, ys) in x.chunks_exact(last).zip(y.chunks_exact_mut(last)) {
            match self {
                Builtin::Argmax => {
                    let best = first_max(xs);
                    ys.fill(0.0);
                    ys[best] = 1.0;
                }
                Builtin::TopK(1) => {
                    ys.fill(0.0);
                    // the first of equal largest entries (as top_k, except that −0 and +0
                    // are equal here, and a NaN never wins: argmax's rule)
                    ys[first_max(xs)] = 1.0;
                }
                Builtin::TopK(k) => {
                    ys.fill(0.0);
                    if (k as usize) * 64 <= last || u32::try_from(last).is_err() {
                        top_k(xs, k as usize, &mut order);
                    } else {
                        top_k_by_selection(xs, k as usize, &mut order, &mut values);
                    }
                    order.iter().for_each(|&i| ys[i] = 1.0);
                }
                Builtin::Ranks if u32::try_from(last).is_err() => {
                    order.clear();
                    order.extend(0..last);
                    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
                    for (rank, &i) in order.iter().enumerate() {
                        ys[i] = (rank + 1) as f32;
                    }
                }
                Builtin::Ranks => {
                    // (value as an ordered integer, position) in one word: a plain integer
                    // sort, ties in the order of their positions
                    keys.clear();
                    keys.extend(
                        xs.iter()
                            .enumerate()
                            .map(|(i, &v)| (u64::from(ordered(v)) << 32) | i as u64),
                    );
                    if last <= RANKS_COUNTED_UP_TO {
                        // short rows: each entry's rank counted (no branches, as
                        // comparisons of vectors)
                        for (y, &key) in ys.iter_mut().zip(&keys) {
                            let below: u32 = keys.iter().map(|&other| u32::from(other < key)).sum();
                            *y = (below + 1) as f32;
                        }
                        continue;
                    }
                    if last >= RADIX_MIN {
                        radix_sort_high(&mut keys, &mut spare);
                    } else {
                        keys.sort_unstable();
                    }
                    for (rank, &key) in keys.iter().enumerate() {
                        ys[key as u32 as usize] = (rank + 1) as f32;
                    }
                }
            }
        }
    }
}

/// Sorts `keys` by their upper 32 bits, stably (a least-significant-digit radix sort, a
/// byte a pass; passes where every key has the same byte are skipped), with `spare` as
/// room. Keys whose lower 32 bits increase with their position come out as
/// `sort_unstable` leaves them.
fn radix_sort_high(keys: &mut [u64], spare: &mut Vec<u64>) {
    let n = keys.len();
    spare.clear();
    spare.resize(n, 0);
    let mut counts = [[0usize; 256]; 4];
    for &k in keys.iter() {
        for (p, count) in counts.iter_mut().enumerate() {
            count[(k >> (32 + 8 * p)) as usize & 255] += 1;
        }
    }
    let (mut from, mut to) = (&mut keys[..], &mut spare[..]);
    let mut in_spare = false;
    for (p, count) in counts.iter().enumerate() {
        if count.contains(&n) {
            continue; // one byte value for all: nothing moves
        }
        let mut at = [0usize; 256];
        let mut sum = 0;
        for (a, &c) in at.iter_mut().zip(count) {
            *a = sum;
            sum += c;
        }
        for &k in from.iter() {
            let b = (k >> (32 + 8 * p)) as usize & 255;
            to[at[b]] = k;
            at[b] += 1;
        }
        std::mem::swap(&mut from, &mut to);
        in_spare = !in_spare;
    }
    if in_spare {
        keys.copy_from_slice(spare);
    }
}

/// Positions `[rows, groups, m]` within each slice of length `last` as flat positions
/// `[rows, groups · m]` within the row.
fn flat_positions(index: &Tensor, last: i64) -> Result<Tensor> {
    let groups = index.size()[1];
    let offsets =
        Tensor::f_arange_start_step(0, groups * last, last, (Kind::Int64, index.device()))?;
    Ok(index
        .f_add(&offsets.f_view([1, groups, 1])?)?
        .f_flatten(1, 2)?)
}

impl Solutions {
    /// The dense `[rows, output_numel]` float32 form.
    pub(crate) fn dense(&self, output_numel: i64) -> Result<Tensor> {
        match self {
            Solutions::Dense(y) => Ok(y.shallow_clone()),
            Solutions::Indicator(index) => {
                let rows = index.size()[0];
                let mut y = Tensor::f_zeros([rows, output_numel], (Kind::Float, index.device()))?;
                Ok(y.f_scatter_value_(1, index, 1.0)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: Builtin, x: &[f32], shape: &[i64]) -> Vec<f32> {
        let last = *shape.last().unwrap();
        let n: i64 = shape.iter().product();
        let t = Tensor::from_slice(x)
            .view(crate::shape::batched(x.len() / n as usize, shape).as_slice());
        let y = b.solve(&t, last).unwrap().dense(n).unwrap();
        Vec::try_from(y.flatten(0, -1)).unwrap()
    }

    /// The tensor kernels (CUDA ops, clean inputs) break ties as the host kernels do
    /// (perturbed samples on the CPU): rows of few distinct values, −0 and +0 among them.
    #[test]
    fn tensor_and_host_kernels_break_ties_alike() {
        let values = [0.0f32, -0.0, 1.0, -1.0, 0.5, f32::MIN_POSITIVE / 4.0];
        let mut state = 7u32;
        for (last, rows) in [(18usize, 40usize), (130, 6), (5, 100)] {
            let mut x: Vec<f32> = (0..rows * last)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    values[(state >> 24) as usize % values.len()]
                })
                .collect();
            x.extend(std::iter::repeat_n(0.0f32, last)); // all equal: topk(zeros, k)
            let ks = [1, 2, (last / 2) as i64, last as i64];
            let builtins = ks
                .iter()
                .map(|&k| Builtin::TopK(k))
                .chain([Builtin::Argmax, Builtin::Ranks]);
            for b in builtins {
                let tensor = run(b, &x, &[last as i64]);
                let mut host = vec![0f32; x.len()];
                b.solve_host(&x, last, &mut host);
                assert_eq!(tensor, host, "{b:?}, last {last}");
            }
        }
    }

    #[test]
    fn argmax_topk_and_ranks_along_the_last_dimension() {
        let x = [0.1f32, 3.0, -1.0, 2.0, 5.0, 4.0];
        assert_eq!(run(Builtin::Argmax, &x, &[3]), [0., 1., 0., 0., 1., 0.]);
        assert_eq!(run(Builtin::Argmax, &x, &[2, 3]), [0., 1., 0., 0., 1., 0.]);
        assert_eq!(run(Builtin::Argmax, &x, &[6]), [0., 0., 0., 0., 1., 0.]);
        assert_eq!(run(Builtin::TopK(2), &x, &[3]), [1., 1., 0., 0., 1., 1.]);
        assert_eq!(run(Builtin::Ranks, &x, &[3]), [2., 3., 1., 1., 3., 2.]);
    }

    #[test]
    fn ordered_integers_follow_total_cmp_and_ties_rank_by_position() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -f32::MIN_POSITIVE,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::INFINITY,
        ];
        for a in v {
            for b in v {
                assert_eq!(ordered(a).cmp(&ordered(b)), a.total_cmp(&b), "{a} {b}");
            }
        }
        let mut y = [0f32; 5];
        Builtin::Ranks.solve_host(&[2.0, -1.0, 2.0, 0.5, -1.0], 5, &mut y);
        assert_eq!(y, [4.0, 1.0, 5.0, 3.0, 2.0]);
    }

    #[test]
    fn ones_are_the_positions_of_the_dense_solutions() {
        let x: Vec<f32> = (0..600)
            .map(|i| ((i * 7919) % 37) as f32 * 0.25 - 3.0)
            .collect();
        for (b, last) in [
            (Builtin::Argmax, 10),
            (Builtin::Argmax, 300),
            (Builtin::TopK(3), 10),
            (Builtin::TopK(2), 100),
            (Builtin::TopK(150), 300),
        ] {
            let mut y = vec![0f32; 600];
            b.solve_host(&x, last, &mut y);
            let mut ones = Vec::new();
            b.ones_host(&x, 300, last, &mut ones);
            let want: Vec<u32> = (0..600u32)
                .filter(|&i| y[i as usize] == 1.0)
                .map(|i| i % 300)
                .collect();
            assert_eq!(ones, want, "{b:?} {last}");
            assert!(y.iter().all(|&v| v == 0.0 || v == 1.0));
        }
    }

    #[test]
    fn radix_ranks_equal_the_comparison_sort() {
        for len in [64usize, 100, 1000, 4097] {
            let xs: Vec<f32> = (0..len)
                .map(|i| match i % 7 {
                    0 => -(((i * 7919) % 101) as f32) * 1e3,
                    1 => 0.0,
                    2 => -0.0,
                    _ => ((i * 104_729) % 997) as f32 * 1e-3 - 0.4,
                })
                .collect();
            let mut keys: Vec<u64> = xs
                .iter()
                .enumerate()
                .map(|(i, &v)| (u64::from(ordered(v)) << 32) | i as u64)
                .collect();
            let mut want = keys.clone();
            want.sort_unstable();
            radix_sort_high(&mut keys, &mut Vec::new());
            assert_eq!(keys, want, "{len}");
        }
    }

    #[test]
    fn host_solutions_equal_the_libtorch_ones() {
        let x: Vec<f32> = (0..60)
            .map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.0 + i as f32 * 1e-3)
            .collect();
        for b in [
            Builtin::Argmax,
            Builtin::TopK(3),
            Builtin::Ranks,
            Builtin::TopK(6),
        ] {
            let mut y = vec![0f32; 60];
            b.solve_host(&x, 6, &mut y);
            assert_eq!(y, run(b, &x, &[6]), "{b:?}");
        }
        // longer slices: the heap of the best k against libtorch's topk, and ties
        let x: Vec<f32> = (0..2000)
            .map(|i| ((i * 7919) % 1009) as f32 * 0.01)
            .collect();
        for k in [1, 2, 10, 99, 100] {
            let mut y = vec![0f32; 2000];
            Builtin::TopK(k).solve_host(&x, 100, &mut y);
            assert_eq!(y, run(Builtin::TopK(k), &x, &[100]), "k = {k}");
        }
        let ties = [1.0f32, 2.0, 2.0, 0.0, 2.0];
        let mut y = [0f32; 5];
        Builtin::TopK(2).solve_host(&ties, 5, &mut y);
        assert_eq!(y, [0., 1., 1., 0., 0.], "the first of equal entries wins");
        Builtin::Ranks.solve_host(&ties, 5, &mut y);
        assert_eq!(y, [2., 3., 4., 1., 5.], "equal entries ranked by position");
        // ranks counted (short rows) and sorted (longer) agree, ties and -0 included
        let x: Vec<f32> = (0..130 * 64)
            .map(|i| [0.0, -0.0, 1.5, -2.0, f32::INFINITY][i * 7 % 5] * ((i % 3) as f32))
            .collect();
        for last in [1, 2, 10, 16, 17, 64, 130] {
            let mut y = vec![0f32; x.len() / last * last];
            let x = &x[..y.len()];
            Builtin::Ranks.solve_host(x, last, &mut y);
            for (xs, ys) in x.chunks(last).zip(y.chunks(last)) {
                let mut order: Vec<usize> = (0..last).collect();
                order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b])); // stable: ties by position
                for (rank, &i) in order.iter().enumerate() {
                    assert_eq!(ys[i], (rank + 1) as f32, "last {last}");
                }
            }
        }
    }

    #[test]
    fn checks_k_and_rank() {
        assert!(Builtin::TopK(0).check(&[4]).is_err());
        assert_eq!(
            Builtin::TopK(5).check(&[4]).unwrap_err().message(),
            "top-k needs 1 <= k <= the last dimension (4), got k = 5"
        );
        assert!(Builtin::Argmax.check(&[]).is_err());
        assert!(Builtin::from_u32(3, 0).is_err());
        Builtin::TopK(4).check(&[2, 4]).unwrap();
    }
}
