//! The sums over a problem's samples that the estimator needs (Σ Y_n, Σ s_n, Σ Y_n s_nᵀ, the
//! objective), made on the host from blocks of samples: float32 tiles, vectorized row
//! updates, only the outputs a block touched. The same sums, bit for bit, on every CPU.

use super::listed::Entries;
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
    /// The positions of the non-zero entries of the row being added (not scanned before).
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
    /// entries `entries` gives (scanned or listed before, else found here row by row;
    /// rows with more non-zero entries than zeros are summed as whole vectors unless
    /// Jacobian or weighted sums need their entries one by one); zero solution entries
    /// cost nothing. Tiles of [`SUM_TILE`] rows are
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
        self.add_rows_impl(scratch, d, rows, entries, sigma, add_scaled, copy_padded)
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
        self.add_rows_impl(
            scratch,
            d,
            rows,
            entries,
            sigma,
            |a, v, b| add_scaled_avx2(a, v, b),
            |p, rest, d| copy_padded_avx2(p, rest, d),
        )
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn add_rows_impl(
        mut self,
        scratch: &mut SumScratch,
        d: usize,
        (z, x, s, y): (&[f32], &[f32], &[f32], &[f32]),
        entries: Entries<'_>,
        sigma: f32,
        add_scaled: impl Fn(&mut [f32], f32, &[f32]),
        copy_padded: impl Fn(&mut [f32], &[f32], usize),
    ) {
        let o = self.sum_y.len();
        let shift = 0.5 * sigma * sigma;
        let square = d == o;
        let (jacobian, weighted) = (!self.sum_ys.is_empty(), !self.sum_wy.is_empty());
        let rows = y.len() / o;
        match entries {
            Entries::Scanned(nonzero) => assert_eq!(nonzero.len(), rows, "a scan of these rows"),
            Entries::Listed(listed) => assert!(!square || listed.with_inputs()),
            Entries::Unknown => {}
        }
        // the next listed entry (rows in order)
        let mut next = 0;
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
                let Some(listed) = entries.row(r, yr, most, &mut next, found) else {
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
                    prefetch(s, r * d + SUM_PREFETCH_FLOATS);
                    copy_padded(padded, &s[r * d..], d);
                    add_scaled(&mut tile_s[..dp], 1.0, padded);
                }
                // the non-zero entries alone: entry i, its value and perturbed input
                let mut add = |i: usize, yv: f32, xv: f32| {
                    if !tile_mark[i] {
                        tile_mark[i] = true;
                        tile_rows.push(i);
                    }
                    tile_y[i] += yv;
                    if jacobian {
                        add_scaled(&mut tile_ys[i * dp..(i + 1) * dp], yv, padded);
                    }
                    if square {
                        tile_objective += xv * yv;
                        if weighted {
                            tile_wy[i] += (sigma * z[r * d + i] - shift).exp() * yv;
                        }
                    }
                };
                let input = |i: usize| if square { x[r * d + i] } else { 0.0 };
                match (listed.y, listed.x) {
                    (Some(ys), Some(xs)) => {
                        for ((&p, &yv), &xv) in listed.pos.iter().zip(ys).zip(xs) {
                            add((p - listed.base) as usize, yv, xv);
                        }
                    }
                    (Some(ys), None) => {
                        for (&p, &yv) in listed.pos.iter().zip(ys) {
                            let i = (p - listed.base) as usize;
                            add(i, yv, input(i));
                        }
                    }
                    (None, _) => {
                        for &i in listed.pos {
                            let i = i as usize;
                            add(i, yr[i], input(i));
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

/// ⟨a, b⟩ in float32, in 8 lanes (vectorized).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, at) = a.as_chunks::<8>();
    let (bc, bt) = b.as_chunks::<8>();
    for (a, b) in ac.iter().zip(bc) {
        for j in 0..8 {
            lanes[j] += a[j] * b[j];
        }
    }
    let tail: f32 = at.iter().zip(bt).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Asks for the cache line of `values[at]` (nothing past the end): the scores of rows
/// ahead, which the hardware's prefetchers fetch too late for short rows.
#[inline(always)]
fn prefetch(values: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(ahead) = values.get(at) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch (of an element of the slice) reads nothing
        unsafe { _mm_prefetch::<_MM_HINT_T0>((ahead as *const f32).cast()) };
    }
}

/// `row` into the first `row.len()` floats of `padded` (the rest stays as it is: zero).
fn copy_padded(padded: &mut [f32], rest: &[f32], d: usize) {
    padded[..d].copy_from_slice(&rest[..d]);
}

/// [`copy_padded`] in whole 8-float vectors (the padding of the last one written as the
/// zeros it holds), so that the vector loads of the padded row that follow get their data
/// from the stores at once (a vector load of several narrower stores waits for them to
/// reach the cache).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn copy_padded_avx2(padded: &mut [f32], rest: &[f32], d: usize) {
    use std::arch::x86_64::*;
    let row = &rest[..d];
    let (chunks, tail) = row.as_chunks::<8>();
    let (out, spare) = padded.as_chunks_mut::<8>();
    debug_assert!(spare.is_empty());
    assert!(
        out.len() >= row.len().div_ceil(8),
        "a padded row holds the row"
    );
    for (o, c) in out.iter_mut().zip(chunks) {
        // SAFETY: arrays of 8 floats (32 bytes)
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_loadu_ps(c.as_ptr())) };
    }
    if !tail.is_empty() {
        let (v, _) = tail_vector(rest, d - tail.len(), tail.len());
        // SAFETY: one array of 8 floats
        unsafe { _mm256_storeu_ps(out[chunks.len()].as_mut_ptr(), v) };
    }
}

/// The `len` (< 8) floats of `rest` from `at` in a vector whose other lanes are zero, and
/// whether it took one plain load over the floats that follow them (the next row's),
/// cleared in the register (a masked load stalls on some CPUs): when 8 floats are left
/// from `at`, else (the last row of its slice) a masked load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn tail_vector(rest: &[f32], at: usize, len: usize) -> (std::arch::x86_64::__m256, bool) {
    use std::arch::x86_64::*;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lanes);
    match rest.get(at..at + 8) {
        // SAFETY: a slice of 8 floats
        Some(eight) => (
            unsafe { _mm256_and_ps(_mm256_loadu_ps(eight.as_ptr()), _mm256_castsi256_ps(keep)) },
            true,
        ),
        // SAFETY: the masked load reads only the lanes below `len`, which are in `rest`
        // (the others neither read nor fault)
        None => (
            unsafe { _mm256_maskload_ps(rest[at..at + len].as_ptr(), keep) },
            false,
        ),
    }
}

/// a += v · b over whole 8-float vectors (lengths multiples of 8).
fn add_scaled(a: &mut [f32], v: f32, b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a += v * b;
    }
}

/// [`add_scaled`] one AVX vector at a time (the compiler vectorizes across vectors, which
/// leaves the short rows of small problems scalar); a multiply then an add, as there, so
/// the sums are the same bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_scaled_avx2(a: &mut [f32], v: f32, b: &[f32]) {
    use std::arch::x86_64::*;
    let v = _mm256_set1_ps(v);
    for (a, b) in a
        .as_chunks_mut::<8>()
        .0
        .iter_mut()
        .zip(b.as_chunks::<8>().0)
    {
        // SAFETY: a and b are arrays of 8 floats (32 bytes)
        unsafe {
            let sum = _mm256_add_ps(
                _mm256_loadu_ps(a.as_ptr()),
                _mm256_mul_ps(v, _mm256_loadu_ps(b.as_ptr())),
            );
            _mm256_storeu_ps(a.as_mut_ptr(), sum);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A row copied into its padded vectors holds the row, then zeros up to the next
    /// multiple of 8, whatever follows it (NaN and infinities of the next row included),
    /// for a row followed by others and for the last row of its slice.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn padded_rows_hold_the_row_then_zeros_whatever_follows() {
        if !crate::fastmath::has_avx2() {
            return;
        }
        for d in 1..=20usize {
            let dp = d.div_ceil(8) * 8;
            let rows = 3;
            let s: Vec<f32> = (0..rows * d)
                .map(|k| match k % d {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    j => j as f32 - 7.5,
                })
                .collect();
            for r in 0..rows {
                let mut padded = vec![f32::NAN; dp];
                // SAFETY: this CPU has AVX2
                unsafe { super::copy_padded_avx2(&mut padded, &s[r * d..], d) };
                let want: Vec<u32> = s[r * d..(r + 1) * d]
                    .iter()
                    .map(|v| v.to_bits())
                    .chain(std::iter::repeat_n(0, dp - d))
                    .collect();
                let got: Vec<u32> = padded.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "d {d}, row {r}");
                // a row with 8 floats from its tail on takes the plain load, the last row
                // of its slice (or one whose tail is 8 floats from the end) the masked one
                let (tail, at) = (d % 8, r * d + d - d % 8);
                if tail > 0 {
                    // SAFETY: this CPU has AVX2
                    let (v, plain) = unsafe { super::tail_vector(&s, at, tail) };
                    assert_eq!(plain, at + 8 <= s.len(), "d {d}, row {r}");
                    let mut lanes = [0f32; 8];
                    // SAFETY: an array of 8 floats; this CPU has AVX2
                    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                    let bits: Vec<u32> = lanes.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(bits, want[d - tail..d - tail + 8], "d {d}, row {r}");
                }
            }
        }
    }
}
