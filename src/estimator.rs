//! The Monte-Carlo estimator: what a forward call accumulates over its samples, and the
//! Jacobian, objective and objective gradient computed from it once all samples are in.
//!
//! With Y_n the solutions, s_n the scores (∇ν(Z_n) for the additive model, Z_n for the
//! multiplicative one) and N samples, the Jacobian estimate per problem is
//!
//! | baseline    | J                                               | extra solves |
//! |-------------|-------------------------------------------------|--------------|
//! | none        | Σ Y_n s_nᵀ / (Nσ)                               | 0            |
//! | sample mean | Σ (Y_n − Ȳ) s_nᵀ / ((N−1)σ)                     | 0            |
//! | clean input | Σ (Y_n − y*(θ)) s_nᵀ / (Nσ)                     | 1 per problem|
//!
//! each divided by θ column-wise for the multiplicative model (0 where θ = 0). All are
//! unbiased since E[s] = 0. With antithetic pairs (Z, −Z) the scores of a pair cancel, so
//! any constant baseline drops out: J = Σ Y_n s_nᵀ / (Nσ) exactly, whatever the baseline,
//! and no extra solve is made.
//!
//! Memory: per problem, either the sums Σ Y_n s_nᵀ (output_numel × input_numel) are
//! streamed, or the samples are kept (at most N × (output_numel + input_numel) floats);
//! [`TapeForm::choose`] picks one from their sizes and costs. A CPU tape of samples keeps
//! only the Y_n, sparse ones as index-value pairs, and draws the s_n again from the call's
//! stream for each product (module `replay`); a CUDA tape keeps both.

use crate::builtin::Solutions;
use crate::error::{Error, Result};
use crate::perturbation::Perturbation;
use crate::replay::{Redraw, Replay, SolutionRows};
use crate::tape::JacobianData;
use tch::{Device, Kind, Tensor};

/// The variance-reduction baseline of the gradient estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Baseline {
    /// The plain score-function estimator (C: `PERT_BASELINE_NONE = 0`).
    None = 0,
    /// Subtract the mean of the samples; no extra solve, needs N ≥ 2
    /// (C: `PERT_BASELINE_SAMPLE_MEAN = 1`). The default.
    #[default]
    SampleMean = 1,
    /// Subtract the solution at the clean input y*(θ); one extra solve per problem
    /// (C: `PERT_BASELINE_CLEAN_INPUT = 2`).
    CleanInput = 2,
}

impl Baseline {
    /// The baseline with this C number.
    pub fn from_u32(value: u32) -> Result<Baseline> {
        match value {
            0 => Ok(Baseline::None),
            1 => Ok(Baseline::SampleMean),
            2 => Ok(Baseline::CleanInput),
            _ => Err(Error::invalid(format!(
                "baseline must be PERT_BASELINE_NONE (0), PERT_BASELINE_SAMPLE_MEAN (1) or PERT_BASELINE_CLEAN_INPUT (2), got {value}"
            ))),
        }
    }
}

/// How a tape keeps what the Jacobian needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapeForm {
    /// Σ Y_n s_nᵀ per problem: output_numel × input_numel floats.
    Sums,
    /// The samples: Y_n and s_n of each, N × (output_numel + input_numel) floats per
    /// problem at most (on the CPU only the Y_n are kept; see module `replay`).
    Samples,
}

impl TapeForm {
    /// The form for N samples of problems with d inputs and o outputs, and its size in
    /// floats per problem. Accumulating the sums costs o·d per sample where keeping the
    /// samples costs o + d, so the samples are kept while they take at most twice the
    /// memory of the sums; past that the sums win (their size does not grow with N).
    /// `limit` (floats per problem, 0: none) rules out a form that does not fit.
    pub fn choose(n: usize, d: usize, o: usize, limit: u128) -> (TapeForm, u128) {
        let sums = o as u128 * d as u128;
        let samples = n as u128 * (o as u128 + d as u128);
        let fits = |size: u128| limit == 0 || size <= limit;
        if samples <= 2 * sums && fits(samples) || !fits(sums) && samples < sums {
            (TapeForm::Samples, samples)
        } else {
            (TapeForm::Sums, sums)
        }
    }
}

/// What one forward call estimated.
pub(crate) struct Estimate {
    /// y_σ(θ), `[batch, output_numel]` float32 on the op's device.
    pub mean: Tensor,
    /// What the tape keeps, when asked for.
    pub jacobian: Option<JacobianData>,
    /// F_σ(θ) = E[⟨perturbed input, Y⟩] `[batch]` and its gradient `[batch, input_numel]`
    /// (float64), when output shape = input shape.
    pub objective: Option<(Tensor, Tensor)>,
}

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
        }
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
        self.objective += other.objective;
    }

    /// Adds samples: noise `z`, perturbed inputs `x`, scores `s` (`[rows, d]`; `s` may be
    /// empty without Jacobian sums) and solutions `y` (`[rows, o]`); zero solution entries
    /// cost nothing. Tiles of [`SUM_TILE`] rows are summed in float32 (vectorized), then
    /// added into the float64 sums; the result depends on the rows given, never on threads.
    pub fn add_rows(&mut self, d: usize, z: &[f32], x: &[f32], s: &[f32], y: &[f32], sigma: f32) {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.add_rows_avx2(d, z, x, s, y, sigma) };
        }
        self.add_rows_impl(d, z, x, s, y, sigma, add_scaled)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add_rows_avx2(
        &mut self,
        d: usize,
        z: &[f32],
        x: &[f32],
        s: &[f32],
        y: &[f32],
        sigma: f32,
    ) {
        self.add_rows_impl(d, z, x, s, y, sigma, |a, v, b| add_scaled_avx2(a, v, b))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn add_rows_impl(
        &mut self,
        d: usize,
        z: &[f32],
        x: &[f32],
        s: &[f32],
        y: &[f32],
        sigma: f32,
        add_scaled: impl Fn(&mut [f32], f32, &[f32]),
    ) {
        let o = self.sum_y.len();
        let shift = 0.5 * sigma * sigma;
        let square = d == o;
        let (jacobian, weighted) = (!self.sum_ys.is_empty(), !self.sum_wy.is_empty());
        let rows = y.len() / o;
        // float32 sums of one tile; rows of the Jacobian sums padded to whole 8-float
        // vectors (`dp`), and each row's scores copied into a padded row, so that the
        // inner loop is whole vectors; only the outputs a tile touched are flushed
        let dp = d.div_ceil(8) * 8;
        let mut tile_y = vec![0f32; o];
        let mut tile_s = vec![0f32; if jacobian { dp } else { 0 }];
        let mut tile_ys = vec![0f32; if jacobian { o * dp } else { 0 }];
        let mut tile_wy = vec![0f32; if weighted { d } else { 0 }];
        let (mut tile_rows, mut tile_mark) = (Vec::new(), vec![false; o]);
        let mut padded = vec![0f32; dp];
        for r0 in (0..rows).step_by(SUM_TILE) {
            let r1 = (r0 + SUM_TILE).min(rows);
            let mut tile_objective = 0f32;
            for r in r0..r1 {
                let yr = &y[r * o..(r + 1) * o];
                if jacobian {
                    for (p, &v) in padded.iter_mut().zip(&s[r * d..(r + 1) * d]) {
                        *p = v;
                    }
                    add_scaled(&mut tile_s, 1.0, &padded);
                }
                // the non-zero entries, 8 at a time as a bit mask (a vector compare), so
                // that sparse solutions cost one test per 8 entries and no branch per entry
                let nonzero = yr.chunks(8).enumerate().flat_map(|(c, run)| {
                    let mut mask = nonzero_mask(run);
                    std::iter::from_fn(move || {
                        (mask != 0).then(|| {
                            let j = mask.trailing_zeros() as usize;
                            mask &= mask - 1;
                            (8 * c + j, run[j])
                        })
                    })
                });
                for (i, yv) in nonzero {
                    if !tile_mark[i] {
                        tile_mark[i] = true;
                        tile_rows.push(i);
                    }
                    tile_y[i] += yv;
                    if jacobian {
                        add_scaled(&mut tile_ys[i * dp..(i + 1) * dp], yv, &padded);
                    }
                    if square {
                        tile_objective += x[r * d + i] * yv;
                        if weighted {
                            tile_wy[i] += (sigma * z[r * d + i] - shift).exp() * yv;
                        }
                    }
                }
            }
            self.objective += f64::from(tile_objective);
            for &i in &tile_rows {
                self.touched[i] = true;
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
}

/// Bit j set when `values[j]` (j < 8) is not ±0.
#[inline(always)]
fn nonzero_mask(values: &[f32]) -> u32 {
    values
        .iter()
        .enumerate()
        .fold(0u32, |mask, (j, v)| mask | (u32::from(*v != 0.0) << j))
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

/// The elements of a contiguous CPU tensor whose kind is `T`, to change in place (the
/// accumulator's own tensors; anything else is a bug of this crate).
fn host_slice<T: tch::kind::Element>(t: &mut Tensor) -> &mut [T] {
    assert!(
        t.device() == Device::Cpu && t.is_contiguous() && t.kind() == T::KIND,
        "host sums need a contiguous CPU {:?} tensor, got {:?} on {:?}",
        T::KIND,
        t.kind(),
        t.device()
    );
    // SAFETY: a contiguous CPU tensor of numel() elements of kind T, borrowed mutably for
    // the slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) }
}

/// Rows summed in float32 before they join the float64 sums: short enough that the float32
/// rounding (at most `SUM_TILE` · 2⁻²⁴ relative) stays far below the Monte-Carlo error of
/// any estimate, long enough to amortize the float64 additions.
const SUM_TILE: usize = 64;

enum JacobianSums {
    Sums {
        sum_s: Tensor,
        sum_ys: Tensor,
    },
    Samples {
        y: Tensor,
        s: Tensor,
    },
    /// The samples' solutions, added block by block in order; scores drawn again later.
    Replay {
        rows: SolutionRows,
        redraw: Redraw,
    },
}

/// Running sums of one forward call, on the op's device.
pub(crate) struct Accumulator {
    o: i64,
    perturbation: Perturbation,
    sigma: f64,
    sum_y: Tensor,
    jacobian: Option<JacobianSums>,
    /// Σ ⟨x_n, Y_n⟩ `[batch]` and Σ exp(σZ_n − σ²/2) ⊙ Y_n `[batch, d]` (multiplicative).
    objective: Option<(Tensor, Tensor)>,
}

impl Accumulator {
    /// Sums for `batch` problems of `n` samples; `form` when a Jacobian is wanted;
    /// `square` when output shape = input shape (the objective is then estimated too).
    /// With `redraw`, a tape that keeps samples keeps only their solutions (added with
    /// [`Accumulator::add_solutions`]) and draws the scores again from the stream.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        n: usize,
        d: usize,
        o: usize,
        perturbation: Perturbation,
        sigma: f64,
        form: Option<TapeForm>,
        redraw: Option<Redraw>,
        square: bool,
        device: Device,
    ) -> Result<Accumulator> {
        let replay = match (form, redraw) {
            (Some(TapeForm::Samples), Some(redraw)) => Some(JacobianSums::Replay {
                rows: SolutionRows::new(o),
                redraw,
            }),
            _ => None,
        };
        let (b, n, d, o) = (batch as i64, n as i64, d as i64, o as i64);
        let f64s = (Kind::Double, device);
        let f32s = (Kind::Float, device);
        let jacobian = match form {
            None => None,
            Some(TapeForm::Sums) => Some(JacobianSums::Sums {
                sum_s: Tensor::f_zeros([b, d], f64s)?,
                sum_ys: Tensor::f_zeros([b, o, d], f32s)?,
            }),
            Some(TapeForm::Samples) => match replay {
                Some(replay) => Some(replay),
                None => Some(JacobianSums::Samples {
                    y: Tensor::f_empty([b, n, o], f32s)?,
                    s: Tensor::f_empty([b, n, d], f32s)?,
                }),
            },
        };
        let objective = if square {
            let wy = if perturbation == Perturbation::Multiplicative {
                d
            } else {
                0
            };
            Some((Tensor::f_zeros([b], f64s)?, Tensor::f_zeros([b, wy], f64s)?))
        } else {
            None
        };
        Ok(Accumulator {
            o,
            perturbation,
            sigma,
            sum_y: Tensor::f_zeros([b, o], f64s)?,
            jacobian,
            objective,
        })
    }

    /// Whether the scores are needed.
    pub fn wants_scores(&self) -> bool {
        self.jacobian.is_some()
    }

    /// Adds samples `n0 .. n0 + rows` of problem `b`: noise `z` and perturbed inputs `x`
    /// `[rows, d]`, scores `s` (when wanted) and solutions `y`.
    pub fn add(
        &mut self,
        b: i64,
        n0: i64,
        z: &Tensor,
        x: &Tensor,
        s: Option<&Tensor>,
        y: &Solutions,
    ) -> Result<()> {
        let rows = z.size()[0];
        // the dense solutions, made at most once (samples tape, multiplicative objective)
        let mut dense_cache: Option<Tensor> = None;
        let mut dense = || -> Result<Tensor> {
            if dense_cache.is_none() {
                dense_cache = Some(y.dense(self.o)?);
            }
            Ok(dense_cache.as_ref().expect("just set").shallow_clone())
        };
        match y {
            Solutions::Dense(y) => {
                let _ =
                    self.sum_y
                        .f_get(b)?
                        .f_add_(&y.f_sum_dim_intlist(0, false, Kind::Double)?)?;
            }
            Solutions::Indicator(index) => {
                let ones = Tensor::f_ones([index.numel() as i64], (Kind::Double, index.device()))?;
                let _ = self
                    .sum_y
                    .f_get(b)?
                    .f_index_add_(0, &index.f_flatten(0, -1)?, &ones)?;
            }
        }
        match (&mut self.jacobian, s) {
            (Some(JacobianSums::Sums { sum_s, sum_ys }), Some(s)) => {
                let _ = sum_s
                    .f_get(b)?
                    .f_add_(&s.f_sum_dim_intlist(0, false, Kind::Double)?)?;
                let mut target = sum_ys.f_get(b)?;
                match y {
                    Solutions::Dense(y) => {
                        let _ = target.f_addmm_(&y.f_tr()?, s)?;
                    }
                    Solutions::Indicator(index) => {
                        // Σ_n Y_n s_nᵀ with 0/1 Y_n: add each s_n to the rows of its ones.
                        let m = index.size()[1];
                        let src = if m == 1 {
                            s.shallow_clone()
                        } else {
                            s.f_repeat_interleave_self_int(m, 0, None)?
                        };
                        let _ = target.f_index_add_(0, &index.f_flatten(0, -1)?, &src)?;
                    }
                }
            }
            (Some(JacobianSums::Samples { y: ys, s: ss }), Some(s)) => {
                ys.f_get(b)?.f_narrow(0, n0, rows)?.f_copy_(&dense()?)?;
                ss.f_get(b)?.f_narrow(0, n0, rows)?.f_copy_(s)?;
            }
            (Some(JacobianSums::Replay { .. }), Some(_)) => {
                unreachable!("tapes of solutions only are made by the host pipeline")
            }
            (Some(_), None) => unreachable!("scores are computed when a Jacobian is wanted"),
            (None, _) => {}
        }
        if let Some((objective, sum_wy)) = &mut self.objective {
            let value = match y {
                Solutions::Dense(y) => x.f_mul(y)?.f_sum(Kind::Double)?,
                Solutions::Indicator(index) => x.f_gather(1, index, false)?.f_sum(Kind::Double)?,
            };
            let _ = objective.f_get(b)?.f_add_(&value)?;
            if self.perturbation == Perturbation::Multiplicative {
                let w = self.perturbation.weight(z, self.sigma)?;
                let wy = w
                    .f_mul(&dense()?)?
                    .f_sum_dim_intlist(0, false, Kind::Double)?;
                let _ = sum_wy.f_get(b)?.f_add_(&wy)?;
            }
        }
        Ok(())
    }

    /// Whether the tape keeps the samples' solutions only (see [`Accumulator::new`]).
    pub fn keeps_solutions(&self) -> bool {
        matches!(self.jacobian, Some(JacobianSums::Replay { .. }))
    }

    /// Appends the solutions of the next samples, in sample order, problem by problem.
    pub fn add_solutions(&mut self, more: SolutionRows) -> Result<()> {
        match &mut self.jacobian {
            Some(JacobianSums::Replay { rows, .. }) => rows.append(more),
            _ => Ok(()),
        }
    }

    /// The tape form, when a Jacobian is wanted.
    pub fn form(&self) -> Option<TapeForm> {
        match self.jacobian {
            None => None,
            Some(JacobianSums::Sums { .. }) => Some(TapeForm::Sums),
            Some(JacobianSums::Samples { .. } | JacobianSums::Replay { .. }) => {
                Some(TapeForm::Samples)
            }
        }
    }

    /// Adds the sums over all samples of problem `b`, made on the host, to this CPU
    /// accumulator: in place, with no libtorch operation (so none of its parallel regions
    /// runs while solver threads work), and only over the outputs the sums touched.
    pub fn add_sums(&mut self, b: i64, sums: &ProblemSums) -> Result<()> {
        let (b, o) = (b as usize, self.o as usize);
        let d = sums.sum_s.len();
        let sum_y = &mut host_slice::<f64>(&mut self.sum_y)[b * o..(b + 1) * o];
        let mut jacobian = match &mut self.jacobian {
            Some(JacobianSums::Sums { sum_s, sum_ys }) => {
                for (a, v) in host_slice::<f64>(sum_s)[b * d..(b + 1) * d]
                    .iter_mut()
                    .zip(&sums.sum_s)
                {
                    *a += v;
                }
                Some(&mut host_slice::<f32>(sum_ys)[b * o * d..(b + 1) * o * d])
            }
            Some(JacobianSums::Samples { .. } | JacobianSums::Replay { .. }) | None => None,
        };
        let mut weighted = match &mut self.objective {
            Some((objective, sum_wy)) => {
                host_slice::<f64>(objective)[b] += sums.objective;
                let w = sum_wy.size()[1] as usize;
                Some(&mut host_slice::<f64>(sum_wy)[b * w..(b + 1) * w]).filter(|s| !s.is_empty())
            }
            None => None,
        };
        for (i, _) in sums.touched.iter().enumerate().filter(|(_, &t)| t) {
            sum_y[i] += sums.sum_y[i];
            if let Some(target) = jacobian.as_deref_mut() {
                for (a, v) in target[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(&sums.sum_ys[i * d..(i + 1) * d])
                {
                    *a += *v as f32;
                }
            }
            if let Some(target) = weighted.as_deref_mut() {
                target[i] += sums.sum_wy[i];
            }
        }
        Ok(())
    }

    /// The estimates from `n` samples. `baseline` is the effective one (None under
    /// antithetic pairs); `clean` holds y*(θ) `[batch, o]` for the clean-input baseline;
    /// `theta` `[batch, d]` (on the device) is needed by the multiplicative model.
    pub fn finish(
        self,
        n: usize,
        baseline: Baseline,
        clean: Option<&Tensor>,
        theta: &Tensor,
    ) -> Result<Estimate> {
        let nf = n as f64;
        let mean = self.sum_y.f_div_scalar(nf)?.f_to_kind(Kind::Float)?;
        // the baseline only enters the Jacobian: forward calls without a tape make no
        // extra solve, and have no y*(θ)
        let (center, scale) = match (baseline, clean) {
            (Baseline::None, _) => (None, 1.0 / (nf * self.sigma)),
            // the centre may be kept by the tape: its own copy, never the storage of the
            // output handed to the caller
            (Baseline::SampleMean, _) => (
                Some(crate::tape::copy(&mean)?),
                1.0 / ((nf - 1.0) * self.sigma),
            ),
            (Baseline::CleanInput, Some(clean)) => {
                (Some(clean.shallow_clone()), 1.0 / (nf * self.sigma))
            }
            (Baseline::CleanInput, None) => {
                assert!(
                    self.jacobian.is_none(),
                    "the clean-input baseline needs y*(theta) for a Jacobian"
                );
                (None, 1.0 / (nf * self.sigma))
            }
        };
        let col_scale = match self.perturbation {
            Perturbation::Additive => None,
            Perturbation::Multiplicative => {
                let zero = theta.f_eq(0.0)?;
                let inv = theta
                    .f_where_scalarother(&zero.f_logical_not()?, 1.0)?
                    .f_reciprocal()?;
                Some(inv.f_masked_fill(&zero, 0.0)?.f_to_kind(Kind::Float)?)
            }
        };
        let jacobian = match self.jacobian {
            None => None,
            Some(JacobianSums::Sums { sum_s, sum_ys }) => {
                // Σ (Y_n − c) s_nᵀ = Σ Y_n s_nᵀ − c (Σ s_n)ᵀ, in place (the tape's memory)
                let mut j = sum_ys;
                if let Some(c) = &center {
                    let s = sum_s.f_to_kind(Kind::Float)?.f_unsqueeze(1)?; // [b, 1, d]
                    let _ = j.f_baddbmm_(&c.f_neg()?.f_unsqueeze(2)?, &s)?;
                }
                let _ = j.f_mul_scalar_(scale)?;
                if let Some(cs) = &col_scale {
                    let _ = j.f_mul_(&cs.f_unsqueeze(1)?)?;
                }
                Some(JacobianData::Dense(j))
            }
            Some(JacobianSums::Replay { mut rows, redraw }) => {
                rows.shrink();
                let batch = mean.size()[0] as usize;
                assert_eq!(rows.len(), batch * n, "every sample's solution is kept");
                let center = match &center {
                    Some(c) => crate::op::host_floats(c)?,
                    None => vec![0f32; mean.numel()],
                };
                let col_scale = col_scale.as_ref().map(crate::op::host_floats).transpose()?;
                Some(JacobianData::Replay(Replay {
                    rows,
                    redraw,
                    batch,
                    center,
                    col_scale,
                    scale,
                }))
            }
            Some(JacobianSums::Samples { y, s }) => {
                let center = match center {
                    Some(c) => c,
                    None => mean.f_zeros_like()?,
                };
                Some(JacobianData::Samples {
                    y,
                    s,
                    center,
                    col_scale,
                    scale,
                })
            }
        };
        let objective = match self.objective {
            None => None,
            Some((objective, sum_wy)) => {
                let grad = match self.perturbation {
                    Perturbation::Additive => self.sum_y.f_div_scalar(nf)?,
                    Perturbation::Multiplicative => sum_wy.f_div_scalar(nf)?,
                };
                Some((objective.f_div_scalar(nf)?, grad))
            }
        };
        Ok(Estimate {
            mean,
            jacobian,
            objective,
        })
    }
}
