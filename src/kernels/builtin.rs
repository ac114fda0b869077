//! Built-in solvers: no callback. On CUDA they run in libtorch on the device, with no host
//! round trip; on the CPU in Rust, on all cores (the argmax in a fused kernel, see
//! [`crate::kernels::fused_argmax`]). Each works along the last dimension of the input; the output
//! has the input's shape.

use crate::error::{Error, Result};
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
        Ok(match self {
            Builtin::Argmax => {
                let index = flat.f_argmax(2, true)?; // [rows, groups, 1]
                Solutions::Indicator(flat_positions(&index, last)?)
            }
            Builtin::TopK(k) => {
                let (_, index) = flat.f_topk(k, 2, true, false)?; // [rows, groups, k]
                Solutions::Indicator(flat_positions(&index, last)?)
            }
            Builtin::Ranks => {
                let order = flat.f_argsort(2, false)?;
                let ranks = order
                    .f_argsort(2, false)?
                    .f_to_kind(Kind::Float)?
                    .f_add_scalar_(1.0)?;
                Solutions::Dense(ranks.f_view([rows, numel])?)
            }
        })
    }
}

impl Builtin {
    /// The solutions of `x` (rows of `d` floats, slices of `last` along each row) into `y`,
    /// on the host: the CPU path of top-k and ranks (argmax has its own fused kernel).
    pub(crate) fn solve_host(self, x: &[f32], last: usize, y: &mut [f32]) {
        let mut order: Vec<usize> = Vec::with_capacity(last);
        let mut values: Vec<f32> = Vec::new();
        for (xs, ys) in x.chunks_exact(last).zip(y.chunks_exact_mut(last)) {
            match self {
                Builtin::Argmax => {
                    let best = (1..last).fold(0, |b, i| if xs[i] > xs[b] { i } else { b });
                    ys.iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = (i == best) as u8 as f32);
                }
                Builtin::TopK(k) => {
                    ys.fill(0.0);
                    if (k as usize) * 64 <= last {
                        top_k(xs, k as usize, &mut order);
                    } else {
                        top_k_by_selection(xs, k as usize, &mut order, &mut values);
                    }
                    order.iter().for_each(|&i| ys[i] = 1.0);
                }
                Builtin::Ranks => {
                    order.clear();
                    order.extend(0..last);
                    order.sort_unstable_by(|&a, &b| xs[a].total_cmp(&xs[b]));
                    for (rank, &i) in order.iter().enumerate() {
                        ys[i] = (rank + 1) as f32;
                    }
                }
            }
        }
    }
}

/// The positions of the `k` largest entries of `xs` (1 <= k <= xs.len()) into `out`, in
/// no particular order; of equal entries the first wins. One pass with a min-heap of the
/// best k so far: most entries only meet the heap's root, so this costs about one
/// comparison per entry when k is much smaller than the slice (O(n log k) at worst).
fn top_k(xs: &[f32], k: usize, out: &mut Vec<usize>) {
    // a worse than b: smaller, or equal and later
    let worse = |a: usize, b: usize| match xs[a].total_cmp(&xs[b]) {
        std::cmp::Ordering::Equal => a > b,
        order => order == std::cmp::Ordering::Less,
    };
    let sift_down = |heap: &mut [usize], mut i: usize| loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut worst = i;
        if l < heap.len() && worse(heap[l], heap[worst]) {
            worst = l;
        }
        if r < heap.len() && worse(heap[r], heap[worst]) {
            worst = r;
        }
        if worst == i {
            return;
        }
        heap.swap(i, worst);
        i = worst;
    };
    out.clear();
    out.extend(0..k);
    for i in (0..k / 2).rev() {
        sift_down(out, i);
    }
    // a later entry enters only when strictly larger than the root (the worst kept)
    let mut bar = xs[out[0]];
    for (i, &v) in xs.iter().enumerate().skip(k) {
        if v.total_cmp(&bar) == std::cmp::Ordering::Greater {
            out[0] = i;
            sift_down(out, 0);
            bar = xs[out[0]];
        }
    }
}

/// [`top_k`] for a larger k: the k-th largest value by selection on a copy of the values
/// (O(n) comparisons of floats), then the positions of the larger values and of the first
/// equal ones, in increasing order. The same set as [`top_k`].
fn top_k_by_selection(xs: &[f32], k: usize, out: &mut Vec<usize>, values: &mut Vec<f32>) {
    values.clear();
    values.extend_from_slice(xs);
    let (_, &mut kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let above = xs.iter().filter(|v| v.total_cmp(&kth).is_gt()).count();
    let mut equal = k - above; // the first `equal` entries equal to the k-th are kept
    out.clear();
    for (i, v) in xs.iter().enumerate() {
        match v.total_cmp(&kth) {
            std::cmp::Ordering::Greater => out.push(i),
            std::cmp::Ordering::Equal if equal > 0 => {
                equal -= 1;
                out.push(i);
            }
            _ => {}
        }
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

    #[test]
    fn top_k_by_selection_gives_the_heap_s_set() {
        let mut order = Vec::new();
        let mut other = Vec::new();
        let mut values = Vec::new();
        for n in [1usize, 2, 7, 64, 1000] {
            for seed in 0..20u32 {
                // values with many ties
                let xs: Vec<f32> = (0..n)
                    .map(|i| {
                        ((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) % 13) as f32
                    })
                    .collect();
                for k in [1, n / 3 + 1, n] {
                    top_k(&xs, k, &mut order);
                    top_k_by_selection(&xs, k, &mut other, &mut values);
                    order.sort_unstable();
                    assert_eq!(order, other, "n {n} k {k} seed {seed}");
                }
            }
        }
    }
}
