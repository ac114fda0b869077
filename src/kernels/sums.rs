//! The sums over a problem's samples that the estimator needs (Σ Y_n, Σ s_n, Σ Y_n s_nᵀ, the
//! objective), made on the host from blocks of samples: float32 tiles, vectorized row
//! updates, only the outputs a block touched. The same sums, bit for bit, on every CPU.

use super::listed::{Entries, ListedRows, RowEntries};
use super::nonzero::RowsNonZero;
use super::row_vectors::{add_scaled, copy_padded, dot, nonzero_mask, prefetch};
#[cfg(target_arch = "x86_64")]
use super::row_vectors::{add_scaled_avx2, copy_padded_avx2};
use crate::tuning::{SUM_PREFETCH_FLOATS, SUM_TILE};

/// The sums over the samples of one problem that the estimator needs, made on the host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProblemSums {
    /// Σ Y_n, `[o]`.
    pub sum_y: Vec<f64>,
    /// Σ s_n, `[d]` (empty without Jacobian sums).
    pub sum_s: Vec<f64>,
    /// Σ Y_n s_nᵀ, `[o, d]` row-major (empty without Jacobian sums).
    pub sum_ys: Vec<f64>,
    /// Σ ⟨x_n, Y_n⟩ (output shape = input shape only).
    pub objective: f64,
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n, `[d]` (multiplicative model with output shape = input
    /// shape only, else empty).
    pub sum_wy: Vec<f64>,
    /// Whether output i was ever non-zero: the rows of `sum_y`, `sum_ys` and `sum_wy` of
    /// other outputs are zero, and adding these sums skips them (sparse solutions such as
    /// one-hot or top-k indicators touch few of many outputs).
    pub touched: Vec<bool>,
    /// Σ x_n, the perturbed inputs, `[d]` (for the Fenchel-Young loss's bound, see
    /// [`crate::fenchel_young`]; else empty).
    pub sum_x: Vec<f64>,
}

impl ProblemSums {
    /// Zero sums for `d` inputs and `o` outputs.
    pub fn zeros(d: usize, o: usize, jacobian: bool, multiplicative: bool) -> ProblemSums {
        ProblemSums {
            sum_y: vec![0.0; o],
            sum_s: if jacobian { vec![0.0; d] } else { Vec::new() },
            sum_ys: if jacobian {
                vec![0.0; o * d]
            } else {
                Vec::new()
            },
            objective: 0.0,
            sum_wy: if multiplicative && o == d {
                vec![0.0; d]
            } else {
                Vec::new()
            },
            touched: vec![false; o],
            sum_x: Vec::new(),
        }
    }

    /// These sums back to zero (their shape kept): the rows of the outputs touched (the
    /// others are zero: see [`ProblemSums::touched`]; a sparse solution's sums of o·d
    /// entries cost what it touched), Σ s_n, Σ x_n and the objective.
    pub fn reset(&mut self) {
        let d = self.sum_s.len();
        for (i, touched) in self.touched.iter_mut().enumerate() {
            if std::mem::take(touched) {
                self.sum_y[i] = 0.0;
                if let Some(v) = self.sum_wy.get_mut(i) {
                    *v = 0.0;
                }
                if let Some(row) = self.sum_ys.get_mut(i * d..(i + 1) * d) {
                    row.fill(0.0);
                }
            }
        }
        self.sum_s.fill(0.0);
        self.sum_x.fill(0.0);
        self.objective = 0.0;
    }

    /// These sums with Σ x_n over `d` inputs as well, when `wanted`.
    pub fn with_input_sums(mut self, d: usize, wanted: bool) -> ProblemSums {
        if wanted {
            self.sum_x = vec![0.0; d];
        }
        self
    }

    /// Adds `other`, element by element (its untouched outputs cost nothing).
    pub fn add(&mut self, other: &ProblemSums) {
        let d = self.sum_s.len();
        for (i, _) in other.touched.iter().enumerate().filter(|(_, &t)| t) {
            self.touched[i] = true;
            self.sum_y[i] += other.sum_y[i];
            if let (Some(a), Some(b)) = (self.sum_wy.get_mut(i), other.sum_wy.get(i)) {
                *a += b;
            }
            if !self.sum_ys.is_empty() {
                let row = i * d..(i + 1) * d;
                for (a, b) in self.sum_ys[row.clone()].iter_mut().zip(&other.sum_ys[row]) {
                    *a += b;
                }
            }
        }
        for (a, b) in self.sum_s.iter_mut().zip(&other.sum_s) {
            *a += b;
        }
        for (a, b) in self.sum_x.iter_mut().zip(&other.sum_x) {
            *a += b;
        }
        self.objective += other.objective;
    }

    /// These sums to add rows into.
    pub fn view(&mut self) -> SumsMut<'_> {
        SumsMut {
            sum_y: &mut self.sum_y,
            sum_s: &mut self.sum_s,
            sum_ys: &mut self.sum_ys,
            objective: &mut self.objective,
            sum_wy: &mut self.sum_wy,
            touched: &mut self.touched,
            sum_x: &mut self.sum_x,
        }
    }
}

/// Float64 sums that rows of samples are added into: a [`ProblemSums`], or a problem's own
/// entries of a call's sums (whole problems: no per-problem copy to add later).
pub(crate) struct SumsMut<'a> {
    /// Σ Y_n, `[o]`.
    pub sum_y: &'a mut [f64],
    /// Σ s_n, `[d]` (empty without Jacobian sums).
    pub sum_s: &'a mut [f64],
    /// Σ Y_n s_nᵀ, `[o, d]` (empty without Jacobian sums).
    pub sum_ys: &'a mut [f64],
    /// Σ ⟨x_n, Y_n⟩ (made when d = o).
    pub objective: &'a mut f64,
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n, `[d]` (empty but for the multiplicative objective).
    pub sum_wy: &'a mut [f64],
    /// Marks of the outputs ever non-zero, `[o]` (empty: not kept).
    pub touched: &'a mut [bool],
    /// Σ x_n, `[d]` (empty: not kept).
    pub sum_x: &'a mut [f64],
}

impl SumsMut<'_> {
    /// Adds the perturbed inputs `x` (rows of `d`) to Σ x_n, when it is kept.
    pub fn add_inputs(&mut self, d: usize, x: &[f32]) {
        if self.sum_x.is_empty() {
            return;
        }
        for row in x.chunks_exact(d) {
            for (a, &v) in self.sum_x.iter_mut().zip(row) {
                *a += f64::from(v);
            }
        }
    }
}

/// The float32 tiles of [`SumsMut::add_rows`], kept between calls on one thread (all zero
/// between calls) so that adding a few rows allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct SumScratch {
    tile_y: Vec<f32>,
    tile_s: Vec<f32>,
    tile_ys: Vec<f32>,
    tile_wy: Vec<f32>,
    tile_rows: Vec<usize>,
    tile_mark: Vec<bool>,
    padded: Vec<f32>,
    /// The positions of the non-zero entries of the row being added (neither scanned nor
    /// listed before).
    found: Vec<u32>,
}

impl SumScratch {
    /// Zero tiles for `o` outputs and `d` inputs (`dp` padded).
    fn fit(&mut self, o: usize, d: usize, jacobian: bool, weighted: bool) {
        let dp = d.div_ceil(8) * 8;
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.tile_y, o);
        grow(&mut self.tile_s, if jacobian { dp } else { 0 });
        grow(&mut self.tile_ys, if jacobian { o * dp } else { 0 });
        grow(&mut self.tile_wy, if weighted { d } else { 0 });
        if self.tile_mark.len() < o {
            self.tile_mark.resize(o, false);
        }
        // the padding after d stays zero (rows are copied into the first d)
        if self.padded.len() != dp {
            self.padded.clear();
            self.padded.resize(dp, 0.0);
        }
    }
}

impl SumsMut<'_> {
    /// Adds samples: noise `z`, perturbed inputs `x`, scores `s` (`[rows, d]`; `s` may be
    /// empty without Jacobian sums) and solutions `y` (`[rows, o]`), whose non-zero
    /// entries `entries` gives when they were scanned or listed with their values (else
    /// they are found here row by row; rows with more non-zero entries than zeros are
    /// summed as whole vectors unless Jacobian or weighted sums need their entries one by
    /// one); zero solution entries cost nothing. Tiles of [`SUM_TILE`] rows are
    /// summed in float32 (vectorized), then added into the float64 sums; the result
    /// depends on the rows given, never on threads.
    pub fn add_rows(
        self,
        scratch: &mut SumScratch,
        d: usize,
        rows: (&[f32], &[f32], &[f32], &[f32]),
        entries: Entries<'_>,
        sigma: f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.add_rows_avx2(scratch, d, rows, entries, sigma) };
        }
        let kernels = (add_scaled, copy_padded);
        self.add_entries(scratch, d, rows, entries, sigma, kernels)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add_rows_avx2(
        self,
        scratch: &mut SumScratch,
        d: usize,
        rows: (&[f32], &[f32], &[f32], &[f32]),
        entries: Entries<'_>,
        sigma: f32,
    ) {
        let kernels = (
            |a: &mut [f32], v, b: &[f32]| add_scaled_avx2(a, v, b),
            |p: &mut [f32], rest: &[f32], d| copy_padded_avx2(p, rest, d),
        );
        self.add_entries(scratch, d, rows, entries, sigma, kernels)
    }

    /// [`SumsMut::add_rows_impl`] with the source `entries` gives: a walk of the listed
    /// entries, or the scanned ones (found row by row when unknown). Scanned and unknown
    /// entries take one instantiation, and one inlined copy of the loop.
    #[inline(always)]
    fn add_entries(
        self,
        scratch: &mut SumScratch,
        d: usize,
        rows: (&[f32], &[f32], &[f32], &[f32]),
        entries: Entries<'_>,
        sigma: f32,
        kernels: (
            impl Fn(&mut [f32], f32, &[f32]),
            impl Fn(&mut [f32], &[f32], usize),
        ),
    ) {
        let nonzero = match entries {
            Entries::Listed(rows_listed) => {
                let walk = ListedWalk(rows_listed, 0);
                return self.add_rows_impl(scratch, d, rows, walk, sigma, kernels);
            }
            Entries::Scanned(nonzero) => Some(nonzero),
            Entries::Unknown => None,
        };
        self.add_rows_impl(scratch, d, rows, nonzero, sigma, kernels)
    }

    /// [`SumsMut::add_rows`] with each row's non-zero entries from `source` (found or
    /// scanned, or listed with their values: one loop, compiled for each).
    #[inline(always)]
    fn add_rows_impl<S: RowSource>(
        mut self,
        scratch: &mut SumScratch,
        d: usize,
        (z, x, s, y): (&[f32], &[f32], &[f32], &[f32]),
        mut source: S,
        sigma: f32,
        (add_scaled, copy_padded): (
            impl Fn(&mut [f32], f32, &[f32]),
            impl Fn(&mut [f32], &[f32], usize),
        ),
    ) {
        let o = self.sum_y.len();
        let shift = 0.5 * sigma * sigma;
        let square = d == o;
        let (jacobian, weighted) = (!self.sum_ys.is_empty(), !self.sum_wy.is_empty());
        let rows = y.len() / o;
        source.check(rows, o, square);
        // rows with more non-zero entries are summed whole, unless the sums need them one
        // by one
        let most = if jacobian || weighted { o } else { o / 2 };
        // float32 sums of one tile; rows of the Jacobian sums padded to whole 8-float
        // vectors (`dp`), and each row's scores copied into a padded row, so that the
        // inner loop is whole vectors; only the outputs a tile touched are flushed
        let dp = d.div_ceil(8) * 8;
        scratch.fit(o, d, jacobian, weighted);
        for r0 in (0..rows).step_by(SUM_TILE) {
            let r1 = (r0 + SUM_TILE).min(rows);
            let mut tile_objective = 0f32;
            // whether a dense row came: every output's tile sum is flushed then
            let mut tile_all = false;
            let SumScratch {
                tile_y,
                tile_s,
                tile_ys,
                tile_wy,
                tile_rows,
                tile_mark,
                padded,
                found,
            } = &mut *scratch;
            for r in r0..r1 {
                let yr = &y[r * o..(r + 1) * o];
                let Some(row) = source.row(r, yr, most, found) else {
                    // mostly non-zero (ranks, dense callbacks): whole vectors, no marks
                    for (t, &v) in tile_y[..o].iter_mut().zip(yr) {
                        *t += v;
                    }
                    if square {
                        tile_objective += dot(&x[r * d..(r + 1) * d], yr);
                    }
                    tile_all = true;
                    continue;
                };
                if jacobian {
                    if S::LISTED {
                        prefetch(s, r * d + SUM_PREFETCH_FLOATS);
                    }
                    copy_padded(padded, &s[r * d..], d);
                    add_scaled(&mut tile_s[..dp], 1.0, padded);
                }
                // the non-zero entries alone (listed: with their values and inputs)
                if S::LISTED {
                    // (cut from one range by the list; said here so that the reads below
                    // need no bound checks)
                    assert!(
                        row.y.len() == row.pos.len() && (!square || row.x.len() == row.pos.len()),
                        "values and inputs for every listed entry"
                    );
                }
                for (k, &p) in row.pos.iter().enumerate() {
                    let i = (p - row.base) as usize;
                    let yv = if S::LISTED { row.y[k] } else { yr[i] };
                    if !tile_mark[i] {
                        tile_mark[i] = true;
                        tile_rows.push(i);
                    }
                    tile_y[i] += yv;
                    if jacobian {
                        add_scaled(&mut tile_ys[i * dp..(i + 1) * dp], yv, padded);
                    }
                    if square {
                        let xv = if S::LISTED { row.x[k] } else { x[r * d + i] };
                        tile_objective += xv * yv;
                        if weighted {
                            tile_wy[i] += (sigma * z[r * d + i] - shift).exp() * yv;
                        }
                    }
                }
            }
            *self.objective += f64::from(tile_objective);
            self.flush_tile(scratch, d, tile_all);
        }
    }

    /// Adds a tile's float32 sums into the float64 sums, and zeroes them: every output's
    /// when a dense row came (`all`), else only those the tile touched.
    #[inline(always)]
    fn flush_tile(&mut self, scratch: &mut SumScratch, d: usize, all: bool) {
        let dp = d.div_ceil(8) * 8;
        let (jacobian, weighted) = (!self.sum_ys.is_empty(), !self.sum_wy.is_empty());
        let SumScratch {
            tile_y,
            tile_s,
            tile_ys,
            tile_wy,
            tile_rows,
            tile_mark,
            ..
        } = scratch;
        if all {
            // (no Jacobian or weighted sums here)
            for &i in tile_rows.iter() {
                tile_mark[i] = false;
            }
            tile_rows.clear();
            for (i, (a, t)) in self.sum_y.iter_mut().zip(tile_y.iter_mut()).enumerate() {
                if *t != 0.0 {
                    if let Some(mark) = self.touched.get_mut(i) {
                        *mark = true;
                    }
                }
                *a += f64::from(std::mem::take(t));
            }
        }
        for &i in tile_rows.iter() {
            if let Some(t) = self.touched.get_mut(i) {
                *t = true;
            }
            tile_mark[i] = false;
            self.sum_y[i] += f64::from(std::mem::take(&mut tile_y[i]));
            if weighted {
                self.sum_wy[i] += f64::from(std::mem::take(&mut tile_wy[i]));
            }
            if jacobian {
                let (total, tile) = (
                    &mut self.sum_ys[i * d..(i + 1) * d],
                    &mut tile_ys[i * dp..(i + 1) * dp],
                );
                for (a, t) in total.iter_mut().zip(tile.iter_mut()) {
                    *a += f64::from(std::mem::take(t));
                }
            }
        }
        tile_rows.clear();
        for (a, t) in self.sum_s.iter_mut().zip(tile_s.iter_mut()) {
            *a += f64::from(std::mem::take(t));
        }
    }
}

/// Where [`SumsMut::add_rows`] takes each row's non-zero entries from, rows in order.
pub(super) trait RowSource {
    /// The entries come with their values, and their inputs when d = o ([`RowEntries`]);
    /// the scores of rows ahead are asked for ([`SUM_PREFETCH_FLOATS`]: lists are made in
    /// two-stage runs, whose blocks' scores were drawn two hand-overs before their sums).
    const LISTED: bool;

    /// Asserts that the source gives `rows` rows of `o` outputs (with their inputs when
    /// `square`).
    fn check(&self, rows: usize, o: usize, square: bool);

    /// Row r's entries (`yr`, its solution; `found`, room to find them), or None when the
    /// row is summed whole: more than `most` non-zero entries.
    fn row<'r>(
        &'r mut self,
        r: usize,
        yr: &[f32],
        most: usize,
        found: &'r mut Vec<u32>,
    ) -> Option<RowEntries<'r>>;
}

/// A scan of the rows (`Some`), or none: each row's entries found here.
impl RowSource for Option<RowsNonZero<'_>> {
    const LISTED: bool = false;

    fn check(&self, rows: usize, _: usize, _: bool) {
        if let Some(nonzero) = self {
            assert_eq!(nonzero.len(), rows, "a scan of these rows");
        }
    }

    #[inline(always)]
    fn row<'r>(
        &'r mut self,
        r: usize,
        yr: &[f32],
        most: usize,
        found: &'r mut Vec<u32>,
    ) -> Option<RowEntries<'r>> {
        let scanned = self.map(|nonzero| nonzero.row(r));
        let view = |pos| RowEntries {
            pos,
            base: 0,
            y: &[],
            x: &[],
        };
        let o = yr.len();
        match scanned {
            Some(Some(listed)) if listed.len() <= most => Some(view(listed)),
            Some(Some(_)) => None,
            Some(None) if most < o => None,
            // not scanned, or dense where the sums need its entries one by one
            _ if most < o && 2 * yr.iter().filter(|v| **v != 0.0).count() > o => None,
            _ => {
                // 8 at a time as a bit mask (a vector compare), so that sparse solutions cost
                // one test per 8 entries and no branch per entry
                found.clear();
                for (c, run) in yr.chunks(8).enumerate() {
                    let mut mask = nonzero_mask(run);
                    while mask != 0 {
                        found.push(8 * c as u32 + mask.trailing_zeros());
                        mask &= mask - 1;
                    }
                }
                Some(view(&found[..]))
            }
        }
    }
}

/// Listed rows, with the next row's first entry.
struct ListedWalk<'a>(ListedRows<'a>, usize);

impl RowSource for ListedWalk<'_> {
    const LISTED: bool = true;

    fn check(&self, rows: usize, o: usize, square: bool) {
        assert_eq!(
            (self.0.rows(), self.0.width()),
            (rows, o),
            "a list of these rows"
        );
        assert!(
            !square || self.0.with_inputs(),
            "the inputs listed with the entries"
        );
    }

    #[inline(always)]
    fn row<'r>(
        &'r mut self,
        r: usize,
        _: &[f32],
        most: usize,
        _: &'r mut Vec<u32>,
    ) -> Option<RowEntries<'r>> {
        let row = self.0.row(r, &mut self.1);
        (row.pos.len() <= most).then_some(row)
    }
}

impl SumsMut<'_> {
    /// Adds 0/1 solutions given by the positions of their ones (`per_row` increasing
    /// positions a row, `ones`), with their perturbed inputs `x` `[rows, d]`: the sums
    /// [`SumsMut::add_rows`] makes of the same solutions written out, bit for bit, without
    /// reading their zeros. Only for sums without Jacobian or weighted entries, and rows
    /// with at most as many ones as zeros (`add_rows` sums denser rows as whole vectors).
    pub fn add_ones(
        self,
        scratch: &mut SumScratch,
        d: usize,
        x: &[f32],
        ones: &[u32],
        per_row: usize,
    ) {
        assert!(self.sum_ys.is_empty() && self.sum_wy.is_empty());
        assert!(2 * per_row <= self.sum_y.len(), "rows of ones are sparse");
        let o = self.sum_y.len();
        let square = d == o;
        let rows = ones.len() / per_row.max(1);
        scratch.fit(o, d, false, false);
        let SumScratch {
            tile_y,
            tile_rows,
            tile_mark,
            ..
        } = scratch;
        for r0 in (0..rows).step_by(SUM_TILE) {
            let r1 = (r0 + SUM_TILE).min(rows);
            let mut tile_objective = 0f32;
            for r in r0..r1 {
                for &i in &ones[r * per_row..(r + 1) * per_row] {
                    let i = i as usize;
                    if !tile_mark[i] {
                        tile_mark[i] = true;
                        tile_rows.push(i);
                    }
                    tile_y[i] += 1.0;
                    if square {
                        tile_objective += x[r * d + i] * 1.0;
                    }
                }
            }
            *self.objective += f64::from(tile_objective);
            for &i in tile_rows.iter() {
                if let Some(t) = self.touched.get_mut(i) {
                    *t = true;
                }
                tile_mark[i] = false;
                self.sum_y[i] += f64::from(std::mem::take(&mut tile_y[i]));
            }
            tile_rows.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::listed::Listed;

    /// The sums of rows whose entries were scanned, or listed with their values and inputs,
    /// equal bit for bit those of the same rows found by the sums themselves, for every kind
    /// of sums (Jacobian, weighted, neither; d = o, d > o, d < o), tiles mixing sparse,
    /// empty, dense, −0 and half-full rows (o/2 and o/2 + 1 entries: where the sums take a
    /// row whole without Jacobian or weighted sums), through the portable kernels and
    /// through `add_rows` (AVX2 where the CPU has it). The listed rows are summed with
    /// their solutions and inputs spoilt (NaN) wherever the list stands for them: the
    /// values must come from the list.
    #[test]
    fn scanned_and_listed_rows_give_the_sums_of_the_rows_themselves() {
        let sigma = 0.7f32;
        let value =
            |k: usize, salt: usize| ((k * 7919 + salt * 104_729) % 1000) as f32 / 250.0 - 2.0;
        for (d, o) in [(10, 10), (12, 6), (3, 3), (17, 17), (4, 9)] {
            let rows = 150; // three tiles, the last one short
            let (z, x, s): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..rows * d).map(|k| value(k, 1)).collect(),
                (0..rows * d).map(|k| value(k, 2)).collect(),
                (0..rows * d).map(|k| value(k, 3)).collect(),
            );
            let y: Vec<f32> = (0..rows * o)
                .map(|k| {
                    let (r, i) = (k / o, k % o);
                    match r % 7 {
                        0 => value(k, 4) + 3.0, // dense
                        1 => 0.0,               // empty
                        2 => f32::from(i == r % o),
                        3 if i == 1 => -0.0,
                        4 => f32::from(i < o / 2) * 2.0, // o/2 entries
                        5 => f32::from(i <= o / 2) * -1.5, // o/2 + 1 entries
                        _ => f32::from(i == 0 || i == r % o) * 0.5,
                    }
                })
                .collect();
            for (jacobian, multiplicative) in
                [(true, false), (false, false), (false, true), (true, true)]
            {
                if multiplicative && cfg!(miri) {
                    continue; // Miri's exp rounds each call its own way: weighted sums differ
                }
                let zeros = || ProblemSums::zeros(d, o, jacobian, multiplicative);
                let most = if jacobian || (multiplicative && d == o) {
                    o
                } else {
                    o / 2
                };
                let mut scan = crate::kernels::nonzero::NonZeros::default();
                assert!(scan.scan(&y, o, most));
                let mut listed = Listed::default();
                assert!(listed.list(&y, o, (o == d).then_some(&x[..])));
                // the rows the list stands for (at most `most` entries) spoilt
                let (mut y_spoilt, mut x_spoilt) = (y.clone(), x.clone());
                for r in 0..rows {
                    if y[r * o..(r + 1) * o].iter().filter(|v| **v != 0.0).count() <= most {
                        y_spoilt[r * o..(r + 1) * o].fill(f32::NAN);
                        if d == o {
                            x_spoilt[r * d..(r + 1) * d].fill(f32::NAN);
                        }
                    }
                }
                let spoilt = (&z[..], &x_spoilt[..], &s[..], &y_spoilt[..]);
                let samples = (&z[..], &x[..], &s[..], &y[..]);
                let kernels = (add_scaled, copy_padded);
                // 0: found, 1: scanned, 2: listed (portable), 3: listed through add_rows
                let sums = |how: usize| {
                    let (mut sums, scratch) = (zeros(), &mut SumScratch::default());
                    let view = sums.view();
                    let walk = ListedWalk(listed.rows(0..rows), 0);
                    match how {
                        0 => view.add_rows_impl(
                            scratch,
                            d,
                            samples,
                            None::<RowsNonZero<'_>>,
                            sigma,
                            kernels,
                        ),
                        1 => view.add_rows_impl(
                            scratch,
                            d,
                            samples,
                            Some(scan.rows(0..rows)),
                            sigma,
                            kernels,
                        ),
                        2 => view.add_rows_impl(scratch, d, spoilt, walk, sigma, kernels),
                        _ => view.add_rows(scratch, d, spoilt, Entries::Listed(walk.0), sigma),
                    }
                    // (Debug tells −0 from +0)
                    format!("{sums:?}")
                };
                let want = sums(0);
                let what =
                    format!("d {d}, o {o}, Jacobian {jacobian}, multiplicative {multiplicative}");
                for how in 1..4 {
                    assert_eq!(sums(how), want, "{what}: way {how}");
                }
            }
        }
    }
}
