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
//! The products are computed on the CPU, in blocks of whole problems on all cores, in
//! float64, each problem in a fixed order: the results do not depend on the number of
//! threads.

use crate::error::{Error, Result, Status};
use crate::estimate::centering::Centering;
pub(crate) use crate::estimate::solution_rows::SolutionRows;
use crate::kernels::blocks::{run_blocks, slots, take};
use crate::kernels::nonzero::nonzeros;
use crate::noise::{Noise, NoiseAt, Sampler};
use crate::rng::Stream;
use crate::tuning::{PRODUCT_WORK, REPLAY_BLOCK_WORK, REPLAY_TILE};
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
        // blocks of `group` whole problems: about REPLAY_BLOCK_WORK entries of the sums
        // each (a block's hand-over stays small against its work), while every thread
        // still has a few blocks to balance; each problem writes its own results
        let per_problem = n.saturating_mul(width.max(d)).max(1);
        let group = (REPLAY_BLOCK_WORK / per_problem)
            .min(self.batch.div_ceil(4 * threads))
            .max(1);
        let blocks = self.batch.div_ceil(group);
        let count = |k: usize| group.min(self.batch - k * group);
        let rows = slots(out, (0..blocks).map(|k| count(k) * out_width));
        run_blocks::<_, _, Error>(
            blocks,
            &mut scratch,
            |k, (z, s, acc)| {
                let out = take(&rows, k).expect("a part per block");
                #[cfg(target_arch = "x86_64")]
                let avx2 = crate::fastmath::has_avx2();
                for i in 0..count(k) {
                    let (b, out) = (k * group + i, &mut out[i * out_width..(i + 1) * out_width]);
                    acc.fill(0.0);
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: the CPU has AVX2 and FMA.
                        unsafe { self.problem_avx2(b, (z, s, acc), (&f, &write_out), out) };
                    } else {
                        self.problem(b, (z, s, acc), (&f, &write_out), out);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    self.problem(b, (z, s, acc), (&f, &write_out), out);
                }
                Ok(())
            },
            |_, ()| Ok(()),
        )?;
        drop(rows);
        Ok(out_tensor)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn problem_avx2<F, W>(
        &self,
        b: usize,
        room: (&mut [f32], &mut [f32], &mut [f64]),
        fw: (&F, &W),
        out: &mut [MaybeUninit<f32>],
    ) where
        F: Fn(usize, usize, &[f32], &mut [f64]),
        W: Fn(usize, &[f64], &mut [MaybeUninit<f32>]),
    {
        self.problem(b, room, fw, out)
    }

    /// `f` for every sample of problem `b` (its scores drawn a tile at a time into the
    /// room's `z`, `s` when they are not kept) into its sums `acc`, then `write_out`.
    #[inline(always)]
    fn problem<F, W>(
        &self,
        b: usize,
        (z, s, acc): (&mut [f32], &mut [f32], &mut [f64]),
        (f, write_out): (&F, &W),
        out: &mut [MaybeUninit<f32>],
    ) where
        F: Fn(usize, usize, &[f32], &mut [f64]),
        W: Fn(usize, &[f64], &mut [MaybeUninit<f32>]),
    {
        let (n, d) = (self.redraw.n, self.redraw.d);
        for n0 in (0..n).step_by(REPLAY_TILE) {
            let rows = REPLAY_TILE.min(n - n0);
            let s = self.scores_of(b, (n0, rows), z, s);
            for (k, sr) in s.chunks_exact(d).enumerate() {
                f(b, b * n + n0 + k, sr, acc);
            }
        }
        write_out(b, acc, out);
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
        // ⟨Y_n, g_b⟩ − ⟨c_b, g_b⟩ of row r of problem b
        let weight = |b: usize, r: usize| {
            let mut w = -cg[b];
            self.rows
                .for_each(r, |i, v| w += f64::from(v) * f64::from(g[b * o + i]));
            w
        };
        let scale = self.centering.scale;
        let col = |b: usize| {
            self.centering
                .col_scale
                .as_ref()
                .map(|cs| &cs[b * d..(b + 1) * d])
        };
        if let (1, Some(kept)) = (self.redraw.n, &self.scores) {
            // one sample a problem, its scores kept: w·s written straight out, with the
            // operations of the sums below (0 + w·s, then the scale: the same bits)
            return self.per_sample(
                0,
                d,
                |_, _, _, _| {},
                |b, _, out| {
                    let (w, s) = (weight(b, b), &kept[b * d..(b + 1) * d]);
                    write_scaled(
                        out,
                        s.iter().map(|&sv| 0.0 + w * f64::from(sv)),
                        scale,
                        col(b),
                    );
                },
            );
        }
        self.per_sample(
            d,
            d,
            |b, r, sr, acc| {
                let w = weight(b, r);
                for (a, &sv) in acc.iter_mut().zip(sr) {
                    *a += w * f64::from(sv);
                }
            },
            |b, acc, out| write_scaled(out, acc.iter().copied(), scale, col(b)),
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

/// `out` = `values` · scale (· the column scale `col`, when there is one), as float32.
#[inline]
fn write_scaled(
    out: &mut [MaybeUninit<f32>],
    values: impl Iterator<Item = f64>,
    scale: f64,
    col: Option<&[f32]>,
) {
    match col {
        None => {
            for (o, v) in out.iter_mut().zip(values) {
                o.write((v * scale) as f32);
            }
        }
        Some(cs) => {
            for ((o, v), &c) in out.iter_mut().zip(values).zip(cs) {
                o.write((v * (scale * f64::from(c))) as f32);
            }
        }
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

    /// The VJP of one sample a problem from kept scores (written straight out) has the
    /// bits of the general product over the same scores drawn again: with and without a
    /// center and a column scale, gradients with zeros and negative zeros.
    #[test]
    fn one_sample_products_from_kept_scores_equal_those_drawn_again() {
        let (batch, d) = (5usize, 37usize);
        let redraw = Redraw {
            stream: Stream::new(11, 3),
            noise: Noise::Normal,
            antithetic: false,
            score_is_z: false,
            n: 1,
            d,
            threads: 2,
            max_tape_bytes: 0,
        };
        let y: Vec<f32> = (0..batch * d)
            .map(|k| match k {
                _ if k % 7 == 0 => 1.0,
                _ if k % 11 == 0 && k / d != 2 => -0.5,
                _ => 0.0,
            })
            .collect();
        let mut kept = vec![0f32; batch * d];
        let mut z = vec![0f32; d];
        for b in 0..batch {
            redraw.scores(b, 0, &mut z, &mut kept[b * d..(b + 1) * d]);
        }
        let g: Vec<f32> = (0..batch * d)
            .map(|k| match k % 5 {
                // problem 2: ⟨Y, g⟩ = −0 (without a center, w·s is a signed zero)
                _ if k / d == 2 => -0.0,
                0 => 0.0,
                1 => -0.0,
                _ => (k as f32 * 0.37).sin(),
            })
            .collect();
        let center: Vec<f32> = (0..batch * d).map(|k| (k % 3) as f32 * 0.25).collect();
        let cols: Vec<f32> = (0..batch * d).map(|k| 1.0 / (1.0 + k as f32)).collect();
        for (center, col_scale) in [
            (None, None),
            (Some(center.clone()), None),
            (None, Some(cols.clone())),
            (Some(center), Some(cols)),
        ] {
            let replay = |scores: Option<Vec<f32>>| Replay {
                rows: SolutionRows::new(d),
                redraw,
                scores,
                batch,
                centering: Centering {
                    center: center.clone(),
                    col_scale: col_scale.clone(),
                    scale: 1.0 / 0.3,
                },
            };
            let (mut fast, mut drawn) = (replay(Some(kept.clone())), replay(None));
            fast.rows.push(&y).unwrap();
            drawn.rows.push(&y).unwrap();
            let bits = |t: Tensor| {
                Vec::<f32>::try_from(t)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(fast.vjp(&g).unwrap()), bits(drawn.vjp(&g).unwrap()));
        }
    }
}
