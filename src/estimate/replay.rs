//! A tape that keeps the solutions of the samples, and their scores while they are small
//! ([`crate::tuning::KEEP_SCORES_BYTES`]); larger scores are drawn again when a gradient is asked.
//!
//! The noise of a forward call is a pure function of its counter-based stream (see
//! [`crate::noise`]), so the scores s_n need not be stored: they can be drawn again, bit
//! for bit, from the same stream elements. Drawing them costs as much as the forward
//! call's noise, reading them back far less, so a tape keeps them up to
//! `KEEP_SCORES_BYTES` (the products are the same bit for bit either way). The solutions are stored row by row, a row's
//! non-zero entries as (index, value) pairs when at most half of them are non-zero (one-hot,
//! top-k and path indicators: a few entries of many), the whole row otherwise. Such a tape
//! never takes more memory than the samples themselves, and usually far less.
//!
//! The products are computed on the CPU, one problem per block of work on all cores, in
//! float64, in a fixed order: the results do not depend on the number of threads.

use crate::error::{Error, Result, Status};
use crate::estimate::centering::Centering;
use crate::kernels::blocks::{run_blocks, slots, take};
use crate::kernels::nonzero::{nonzeros, RowsNonZero};
use crate::noise::{Noise, NoiseAt, Sampler};
use crate::rng::Stream;
use crate::tuning::{PRODUCT_WORK, REPLAY_TILE};
use std::mem::MaybeUninit;
use tch::Tensor;

/// How to draw the scores of a forward call's samples again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Redraw {
    pub stream: Stream,
    pub noise: Noise,
    pub antithetic: bool,
    /// The multiplicative model's score is z itself.
    pub score_is_z: bool,
    /// Samples per problem.
    pub n: usize,
    /// Inputs per problem.
    pub d: usize,
    /// Threads for the work of a product (the config's cap on a call's threads).
    pub threads: usize,
    /// The config's limit on a tape's bytes (0: none), within which kept scores must fit.
    pub max_tape_bytes: u64,
}

impl Redraw {
    /// The noise `z` and scores `s` of samples `n0 .. n0 + z.len() / d` of problem `b`,
    /// equal to those of the forward call.
    fn scores(&self, b: usize, n0: usize, z: &mut [f32], s: &mut [f32]) {
        let at = NoiseAt {
            problem: b,
            sample: n0,
            samples: self.n,
            width: self.d,
        };
        if self.noise == Noise::Normal && !self.antithetic {
            // the score of Normal noise is z itself (both models): draw it straight into s
            return self.noise.fill(&self.stream, at.first_value(), s);
        }
        let sampler = Sampler {
            noise: self.noise,
            stream: &self.stream,
            antithetic: self.antithetic,
            score_is_z: self.score_is_z,
        };
        sampler.draw(at, z, s, 1);
    }
}

/// Bit 63 of a row's end: the row is stored whole.
const DENSE: u64 = 1 << 63;

/// Solutions `[rows, o]`, row by row: a sparse row is its non-zero indices then their
/// values (as float bits), a dense row its `o` values.
#[derive(Debug, Default)]
pub(crate) struct SolutionRows {
    o: usize,
    /// Where each row ends in `words`, with [`DENSE`] set for whole rows.
    ends: Vec<u64>,
    words: Vec<u32>,
}

impl SolutionRows {
    /// No rows of `o` outputs (`o` must fit in 32 bits).
    pub fn new(o: usize) -> SolutionRows {
        assert!(
            u32::try_from(o).is_ok(),
            "output_numel {o} does not fit in 32 bits"
        );
        SolutionRows {
            o,
            ends: Vec::new(),
            words: Vec::new(),
        }
    }

    /// Appends the rows of `y` `[rows, o]` (tests; the host pipeline scans its rows once
    /// for the tape and the sums: see [`SolutionRows::push_scanned`]).
    #[cfg(test)]
    pub fn push(&mut self, y: &[f32]) -> Result<()> {
        let mut scan = crate::kernels::nonzero::NonZeros::default();
        if self.o > 0 {
            scan.scan(y, self.o, self.o / 2);
        }
        self.push_scanned(y, scan.rows(0..y.len() / self.o.max(1)))
    }

    /// Appends the rows of `y` `[rows, o]`, whose non-zero entries a scan has listed
    /// (`nonzero`, one entry per row of `y`): a row with more non-zero entries than zeros
    /// is stored whole, listed or not, another as its listed positions and their values.
    /// Memory grows with what the rows take (sparse rows take a few words), never by a
    /// worst case; TORCH_ERROR when it cannot.
    pub fn push_scanned(&mut self, y: &[f32], nonzero: RowsNonZero<'_>) -> Result<()> {
        let rows = y.len() / self.o.max(1);
        assert_eq!(nonzero.len(), rows, "a scan of these rows");
        let o = self.o;
        let listed = |r: usize| nonzero.row(r).filter(|p| 2 * p.len() <= o);
        let words: usize = (0..rows)
            .map(|r| listed(r).map_or(self.o, |p| 2 * p.len()))
            .sum();
        self.reserve(rows, words)?;
        for (r, row) in y.chunks_exact(self.o.max(1)).take(rows).enumerate() {
            match listed(r) {
                None => {
                    self.words.extend(row.iter().map(|v| v.to_bits()));
                    self.ends.push(self.words.len() as u64 | DENSE);
                }
                // the indices, then the values
                Some(positions) => {
                    self.words.extend_from_slice(positions);
                    self.words
                        .extend(positions.iter().map(|&i| row[i as usize].to_bits()));
                    self.ends.push(self.words.len() as u64);
                }
            }
        }
        Ok(())
    }

    /// Appends 0/1 rows given by the positions of their ones (`per_row` increasing
    /// positions a row): the rows [`SolutionRows::push_scanned`] makes of them written
    /// out.
    pub fn push_ones(&mut self, ones: &[u32], per_row: usize) -> Result<()> {
        let rows = ones.len() / per_row.max(1);
        let dense = 2 * per_row > self.o;
        let per_words = if dense { self.o } else { 2 * per_row };
        self.reserve(rows, rows.saturating_mul(per_words))?;
        let one = 1f32.to_bits();
        for row in ones.chunks_exact(per_row.max(1)).take(rows) {
            if dense {
                let start = self.words.len();
                self.words.resize(start + self.o, 0);
                for &i in row {
                    self.words[start + i as usize] = one;
                }
                self.ends.push(self.words.len() as u64 | DENSE);
            } else {
                self.words.extend_from_slice(row);
                self.words.extend(std::iter::repeat_n(one, per_row));
                self.ends.push(self.words.len() as u64);
            }
        }
        Ok(())
    }

    /// Appends the rows of `other` (same `o`); TORCH_ERROR when memory runs out.
    pub fn append(&mut self, other: SolutionRows) -> Result<()> {
        self.reserve(other.ends.len(), other.words.len())?;
        let base = self.words.len() as u64;
        self.ends.extend(
            other
                .ends
                .iter()
                .map(|&e| ((e & !DENSE) + base) | (e & DENSE)),
        );
        self.words.extend(other.words);
        Ok(())
    }

    /// Room for `rows` more ends and `words` more words, growing geometrically (so that
    /// appending costs amortized O(1) a word), or TORCH_ERROR.
    fn reserve(&mut self, rows: usize, words: usize) -> Result<()> {
        let fail = |what: &str, more: usize, have: usize| {
            Error::new(
                Status::TorchError,
                format!("cannot allocate the tape: {what} for {more} more after {have}"),
            )
        };
        let bytes =
            |len: usize, more: usize, size: usize| (len as u128 + more as u128) * size as u128;
        if !crate::tensors::fits_in_memory(
            bytes(self.ends.len(), rows, std::mem::size_of::<u64>())
                + bytes(self.words.len(), words, std::mem::size_of::<u32>()),
        ) {
            return Err(fail(
                "more than this machine's memory",
                rows,
                self.ends.len(),
            ));
        }
        self.ends
            .try_reserve(rows)
            .map_err(|_| fail("no memory for row ends", rows, self.ends.len()))?;
        self.words
            .try_reserve(words)
            .map_err(|_| fail("no memory for solution words", words, self.words.len()))
    }

    /// Gives back the room that growth left unused.
    pub fn shrink(&mut self) {
        self.words.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Calls `f(i, y_ri)` for the non-zero entries of row `r` (all entries of a dense row).
    #[inline]
    fn for_each(&self, r: usize, mut f: impl FnMut(usize, f32)) {
        let start = if r == 0 { 0 } else { self.ends[r - 1] & !DENSE } as usize;
        let end = self.ends[r];
        let words = &self.words[start..(end & !DENSE) as usize];
        if end & DENSE != 0 {
            words
                .iter()
                .enumerate()
                .for_each(|(i, &w)| f(i, f32::from_bits(w)));
        } else {
            let (index, value) = words.split_at(words.len() / 2);
            index
                .iter()
                .zip(value)
                .for_each(|(&i, &w)| f(i as usize, f32::from_bits(w)));
        }
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.ends.len() * 8 + self.words.len() * 4
    }
}

/// The Jacobian J = scale · Σ_n (Y_n − c) s_nᵀ ⊙ col_scale of every problem of a forward
/// call, from its solutions and its stream.
#[derive(Debug)]
pub(crate) struct Replay {
    pub rows: SolutionRows,
    pub redraw: Redraw,
    /// The scores `[batch, N, d]`, when kept (else drawn again).
    pub scores: Option<Vec<f32>>,
    pub batch: usize,
    /// Set by the accumulator's finish.
    pub centering: Centering<Vec<f32>>,
}

impl Replay {
    pub(crate) fn o(&self) -> usize {
        self.rows.o
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.rows.bytes()
            + 4 * (self.centering.center.as_ref().map_or(0, Vec::len)
                + self.centering.col_scale.as_ref().map_or(0, Vec::len)
                + self.scores.as_ref().map_or(0, Vec::len))
    }

    /// The scores of samples `n0 .. n0 + z.len() / d` of problem `b`: the kept ones, or
    /// drawn again into `s` (with `z` as scratch).
    fn scores_of<'a>(
        &'a self,
        b: usize,
        (n0, rows): (usize, usize),
        z: &mut [f32],
        s: &'a mut [f32],
    ) -> &'a [f32] {
        let d = self.redraw.d;
        match &self.scores {
            Some(kept) => {
                let first = (b * self.redraw.n + n0) * d;
                &kept[first..first + rows * d]
            }
            None => {
                let (z, s) = (&mut z[..rows * d], &mut s[..rows * d]);
                self.redraw.scores(b, n0, z, s);
                s
            }
        }
    }

    /// The samples made dense: the solutions `[batch, N, o]` and the scores
    /// `[batch, N, d]` (drawn again), or TORCH_ERROR when memory runs out.
    pub fn dense_samples(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (n, d, o) = (self.redraw.n, self.redraw.d, self.o());
        let rows = self
            .batch
            .checked_mul(n)
            .ok_or_else(|| no_memory(usize::MAX))?;
        let mut y = zeros::<f32>(rows.checked_mul(o).ok_or_else(|| no_memory(usize::MAX))?)?;
        let mut s = zeros::<f32>(rows.checked_mul(d).ok_or_else(|| no_memory(usize::MAX))?)?;
        let mut z = zeros::<f32>(REPLAY_TILE * d)?;
        for r in 0..rows {
            self.rows.for_each(r, |i, v| y[r * o + i] = v);
        }
        for b in 0..self.batch {
            for n0 in (0..n).step_by(REPLAY_TILE) {
                let count = REPLAY_TILE.min(n - n0);
                let first = (b * n + n0) * d;
                match &self.scores {
                    Some(kept) => {
                        s[first..first + count * d].copy_from_slice(&kept[first..first + count * d])
                    }
                    None => self.redraw.scores(
                        b,
                        n0,
                        &mut z[..count * d],
                        &mut s[first..first + count * d],
                    ),
                }
            }
        }
        Ok((y, s))
    }

    /// Runs `f(b, row, s_row, acc_b)` for every sample of every problem into float64 sums
    /// `acc_b` of `width` entries, then `write_out(b, acc_b, out_b)` into the `out_width`
    /// float32 results of problem b; problems spread over all cores. Returns the results
    /// `[batch, out_width]` (a flat CPU float32 tensor), or TORCH_ERROR when memory runs
    /// out (every buffer is allocated fallibly, so a product too large for memory is an
    /// error, not an abort).
    fn per_sample(
        &self,
        width: usize,
        out_width: usize,
        f: impl Fn(usize, usize, &[f32], &mut [f64]) + Sync,
        write_out: impl Fn(usize, &[f64], &mut [MaybeUninit<f32>]) + Sync,
    ) -> Result<Tensor> {
        let (n, d) = (self.redraw.n, self.redraw.d);
        // a thread for at least PRODUCT_WORK entries of the sums (a smaller share costs
        // less than handing it over), and for at most one problem
        let work = self.batch.saturating_mul(n).saturating_mul(width.max(d));
        let threads = self
            .redraw
            .threads
            .min(work / PRODUCT_WORK)
            .clamp(1, self.batch.max(1));
        // room to draw a tile's scores again (none when they are kept), and the sums of
        // one problem
        let tile = if self.scores.is_some() {
            0
        } else {
            REPLAY_TILE * d
        };
        let mut scratch = Vec::new();
        for _ in 0..threads {
            scratch.push((
                zeros::<f32>(tile)?,
                zeros::<f32>(tile)?,
                zeros::<f64>(width)?,
            ));
        }
        let total = self
            .batch
            .checked_mul(out_width)
            .ok_or_else(|| no_memory(usize::MAX))?;
        // the results straight into the tensor handed back (no copy of them)
        let out_tensor = uninit_floats(total)?;
        let out: &mut [MaybeUninit<f32>] = if total == 0 {
            &mut []
        } else {
            // SAFETY: a fresh contiguous CPU float32 tensor of `total` elements, not aliased
            // while this slice lives, as uninitialized floats (each problem's `write_out`
            // writes all of its row; on an error the tensor is dropped unread)
            unsafe {
                std::slice::from_raw_parts_mut(
                    out_tensor.data_ptr() as *mut MaybeUninit<f32>,
                    total,
                )
            }
        };
        // each problem writes its own results
        let rows = slots(out, (0..self.batch).map(|_| out_width));
        run_blocks::<_, _, Error>(
            self.batch,
            &mut scratch,
            |b, (z, s, acc)| {
                acc.fill(0.0);
                #[cfg(target_arch = "x86_64")]
                if crate::fastmath::has_avx2() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    unsafe { self.problem_avx2(b, z, s, acc, &f) };
                } else {
                    self.problem(b, z, s, acc, &f);
                }
                #[cfg(not(target_arch = "x86_64"))]
                self.problem(b, z, s, acc, &f);
                write_out(b, acc, take(&rows, b).expect("a row per problem"));
                Ok(())
            },
            |_, ()| Ok(()),
        )?;
        drop(rows);
        Ok(out_tensor)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn problem_avx2<F: Fn(usize, usize, &[f32], &mut [f64])>(
        &self,
        b: usize,
        z: &mut [f32],
        s: &mut [f32],
        acc: &mut [f64],
        f: &F,
    ) {
        self.problem(b, z, s, acc, f)
    }

    /// `f` for every sample of problem `b`, its scores drawn a tile at a time into `z`, `s`.
    #[inline(always)]
    fn problem<F: Fn(usize, usize, &[f32], &mut [f64])>(
        &self,
        b: usize,
        z: &mut [f32],
        s: &mut [f32],
        acc: &mut [f64],
        f: &F,
    ) {
        let (n, d) = (self.redraw.n, self.redraw.d);
        for n0 in (0..n).step_by(REPLAY_TILE) {
            let rows = REPLAY_TILE.min(n - n0);
            let s = self.scores_of(b, (n0, rows), z, s);
            for (k, sr) in s.chunks_exact(d).enumerate() {
                f(b, b * n + n0 + k, sr, acc);
            }
        }
    }

    /// Entry k of the center `[batch, o]`.
    fn center(&self, k: usize) -> f64 {
        self.centering
            .center
            .as_ref()
            .map_or(0.0, |c| f64::from(c[k]))
    }

    /// The factor of input j of problem b: scale · col_scale.
    fn column(&self, b: usize, j: usize) -> f64 {
        let d = self.redraw.d;
        self.centering.scale
            * self
                .centering
                .col_scale
                .as_ref()
                .map_or(1.0, |cs| f64::from(cs[b * d + j]))
    }

    /// Jᵀg per problem: `g` `[batch, o]` → `[batch, d]`.
    pub fn vjp(&self, g: &[f32]) -> Result<Tensor> {
        let (o, d) = (self.o(), self.redraw.d);
        // ⟨c_b, g_b⟩, subtracted from every sample's ⟨Y_n, g_b⟩
        let mut positions = Vec::new();
        let cg: Vec<f64> = (0..self.batch)
            .map(|b| {
                let range = b * o..(b + 1) * o;
                self.centering.center.as_ref().map_or(0.0, |center| {
                    // the non-zero entries in order (a one-hot or top-k mean has few,
                    // found 8 to 32 at a time): the sum of all the products, without a
                    // dependent addition per zero
                    let (c, g) = (&center[range.clone()], &g[range]);
                    nonzeros(c, &mut positions)
                        .iter()
                        .map(|&i| f64::from(c[i as usize]) * f64::from(g[i as usize]))
                        .sum()
                })
            })
            .collect();
        self.per_sample(
            d,
            d,
            |b, r, sr, acc| {
                let mut w = -cg[b];
                self.rows
                    .for_each(r, |i, v| w += f64::from(v) * f64::from(g[b * o + i]));
                for (a, &sv) in acc.iter_mut().zip(sr) {
                    *a += w * f64::from(sv);
                }
            },
            |b, acc, out| match &self.centering.col_scale {
                None => {
                    for (o, &v) in out.iter_mut().zip(acc) {
                        o.write((v * self.centering.scale) as f32);
                    }
                }
                Some(cs) => {
                    for ((o, &v), &c) in out.iter_mut().zip(acc).zip(&cs[b * d..(b + 1) * d]) {
                        o.write((v * (self.centering.scale * f64::from(c))) as f32);
                    }
                }
            },
        )
    }

    /// J t per problem: `t` `[batch, d]` → `[batch, o]`.
    pub fn jvp(&self, t: &[f32]) -> Result<Tensor> {
        let (o, d) = (self.o(), self.redraw.d);
        // t ⊙ scale · col_scale, so that each sample needs ⟨s_n, t'⟩ only
        let t: Vec<f64> = t
            .iter()
            .enumerate()
            .map(|(k, &v)| f64::from(v) * self.column(k / d, k % d))
            .collect();
        // per problem: Σ_n Y_n ⟨s_n, t'⟩ in the first o entries, Σ_n ⟨s_n, t'⟩ in the last
        self.per_sample(
            o + 1,
            o,
            |b, r, sr, acc| {
                let a: f64 = sr
                    .iter()
                    .zip(&t[b * d..(b + 1) * d])
                    .map(|(&sv, &tv)| f64::from(sv) * tv)
                    .sum();
                self.rows.for_each(r, |i, v| acc[i] += f64::from(v) * a);
                acc[o] += a;
            },
            |b, acc, out| {
                for (i, y) in out.iter_mut().enumerate() {
                    y.write((acc[i] - self.center(b * o + i) * acc[o]) as f32);
                }
            },
        )
    }

    /// J per problem, `[batch, o, d]`.
    pub fn jacobian(&self) -> Result<Tensor> {
        let (o, d) = (self.o(), self.redraw.d);
        // per problem: Σ_n Y_n s_nᵀ in the first o·d entries, Σ_n s_n in the last d
        self.per_sample(
            o * d + d,
            o * d,
            |_, r, sr, acc| {
                self.rows.for_each(r, |i, v| {
                    for (a, &sv) in acc[i * d..(i + 1) * d].iter_mut().zip(sr) {
                        *a += f64::from(v) * f64::from(sv);
                    }
                });
                for (a, &sv) in acc[o * d..].iter_mut().zip(sr) {
                    *a += f64::from(sv);
                }
            },
            |b, acc, out| {
                for (k, y) in out.iter_mut().enumerate() {
                    let (i, j) = (k / d, k % d);
                    let c = self.center(b * o + i);
                    y.write(((acc[k] - c * acc[o * d + j]) * self.column(b, j)) as f32);
                }
            },
        )
    }
}

/// `len` zeros, or TORCH_ERROR when memory runs out.
fn zeros<T: Clone + Default>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    if !crate::tensors::fits_in_memory(len as u128 * std::mem::size_of::<T>() as u128) {
        return Err(no_memory(len));
    }
    v.try_reserve_exact(len).map_err(|_| no_memory(len))?;
    v.resize(len, T::default());
    Ok(v)
}

/// A flat CPU float32 tensor of `len` values, not initialized (to be written in full), or
/// TORCH_ERROR when memory runs out.
fn uninit_floats(len: usize) -> Result<Tensor> {
    if !crate::tensors::fits_in_memory(len as u128 * 4) {
        return Err(no_memory(len));
    }
    Tensor::f_empty([len as i64], (tch::Kind::Float, tch::Device::Cpu)).map_err(|_| no_memory(len))
}

fn no_memory(len: usize) -> Error {
    Error::new(
        Status::TorchError,
        format!("cannot allocate {len} values for a product of the tape"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_ones_equal_the_rows_written_out() {
        for (o, per_row) in [(6usize, 1usize), (6, 2), (6, 4), (1, 1)] {
            let ones: Vec<u32> = (0..3)
                .flat_map(|r| (0..per_row).map(move |j| ((r + j * 2) % o) as u32))
                .collect::<Vec<_>>()
                .chunks(per_row)
                .flat_map(|c| {
                    let mut c = c.to_vec();
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect();
            if ones.len() != 3 * per_row {
                continue; // a row with repeated positions is not a 0/1 row
            }
            let mut dense = vec![0f32; 3 * o];
            for (r, row) in ones.chunks(per_row).enumerate() {
                for &i in row {
                    dense[r * o + i as usize] = 1.0;
                }
            }
            let (mut a, mut b) = (SolutionRows::new(o), SolutionRows::new(o));
            a.push(&dense).unwrap();
            b.push_ones(&ones, per_row).unwrap();
            assert_eq!(
                (a.ends, a.words),
                (b.ends, b.words),
                "o {o} per row {per_row}"
            );
        }
    }

    #[test]
    fn rows_keep_their_values_sparse_or_whole() {
        let y = [
            0.0f32, 1.0, 0.0, 0.0, // sparse
            2.0, -1.0, 3.0, 0.5, // whole
            0.0, 0.0, 0.0, 0.0, // empty
        ];
        let mut a = SolutionRows::new(4);
        a.push(&y[..4]).unwrap();
        let mut b = SolutionRows::new(4);
        b.push(&y[4..]).unwrap();
        a.append(b).unwrap();
        assert_eq!(a.len(), 3);
        let mut back = vec![0f32; 12];
        for r in 0..3 {
            a.for_each(r, |i, v| back[r * 4 + i] = v);
        }
        assert_eq!(back, y);
        // 1 sparse entry (2 words) + 4 whole + 0, and 3 ends
        assert_eq!(a.bytes(), 3 * 8 + 6 * 4);
    }

    #[test]
    fn sparse_rows_find_every_non_zero_in_runs_and_tail() {
        // rows over several 8-entry runs and a tail, with -0.0 (a zero) and NaN (not one)
        for o in [1usize, 7, 8, 9, 17, 40, 1003] {
            let mut y = vec![0f32; 3 * o];
            for (r, at) in [(0, 0), (0, o - 1), (1, o / 2), (2, o - 1)] {
                y[r * o + at] = 1.0 + at as f32;
            }
            y[o / 3] = -0.0;
            if o > 2 {
                y[2 * o + 1] = f32::NAN;
            }
            let mut rows = SolutionRows::new(o);
            rows.push(&y).unwrap();
            let mut back = vec![0f32; 3 * o];
            for r in 0..3 {
                rows.for_each(r, |i, v| back[r * o + i] = v);
            }
            for (i, (&a, &b)) in back.iter().zip(&y).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0),
                    "o {o} at {i}"
                );
            }
        }
    }
}
