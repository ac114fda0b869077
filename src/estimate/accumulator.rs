//! The running sums of one forward call over its samples, and the estimates made from them
//! once all samples are in (see [`crate::estimate`] for the estimators).

use crate::error::Result;
use crate::estimate::form::TapeForm;
use crate::estimate::jacobian::JacobianData;
use crate::estimate::replay::{Redraw, Replay, SolutionRows};
use crate::kernels::builtin::Solutions;
use crate::kernels::sums::ProblemSums;
use crate::perturbation::Perturbation;
use crate::settings::Baseline;
use crate::tensors::{host_floats, host_slice};
use crate::tuning::{DENSE_BELOW_OUTPUTS, KEEP_SCORES_BYTES};
use tch::{Device, Kind, Tensor};

mod host_finish;
mod host_sums;
mod objective;

pub(crate) use host_sums::HostSlices;
pub(crate) use objective::Objective;

/// What one forward call estimated.
pub(crate) struct Estimate {
    /// y_σ(θ), `[batch, output_numel]` float32 on the op's device.
    pub mean: Tensor,
    /// What the tape keeps, when asked for.
    pub jacobian: Option<JacobianData>,
    /// F_σ(θ) and what its gradient is made from, when output shape = input shape.
    pub objective: Option<Objective>,
}

enum JacobianSums {
    Sums {
        sum_s: Tensor,
        sum_ys: Tensor,
    },
    Samples {
        y: Tensor,
        s: Tensor,
    },
    /// The samples' solutions, added block by block in order, and their scores `[b, N, d]`
    /// when small enough to keep (written by the pipeline; else drawn again later).
    Replay {
        rows: SolutionRows,
        redraw: Redraw,
        scores: Option<Vec<f32>>,
    },
}

/// Running sums of one forward call, on the op's device.
pub(crate) struct Accumulator {
    o: i64,
    perturbation: Perturbation,
    sigma: f64,
    sum_y: Tensor,
    jacobian: Option<JacobianSums>,
    /// Σ ⟨x_n, Y_n⟩ `[batch]`, Σ exp(σZ_n − σ²/2) ⊙ Y_n `[batch, d]` (multiplicative, else
    /// `[batch, 0]`) and Σ x_n `[batch, d]` (when asked for, else `[batch, 0]`).
    objective: Option<(Tensor, Tensor, Tensor)>,
}

impl Accumulator {
    /// Sums for `batch` problems of `n` samples; `form` when a Jacobian is wanted;
    /// `square` when output shape = input shape (the objective is then estimated too,
    /// and with `input_sums` the sum of the perturbed inputs). With `redraw`, a tape that keeps samples keeps their solutions (added with
    /// [`Accumulator::add_solutions`]), and their scores up to [`KEEP_SCORES_BYTES`] (filled
    /// by the pipeline, see [`Accumulator::take_scores`]; else drawn again from the stream).
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
        (square, input_sums): (bool, bool),
        device: Device,
    ) -> Result<Accumulator> {
        let replay = match (form, redraw) {
            (Some(TapeForm::Samples), Some(redraw)) => Some(JacobianSums::Replay {
                rows: SolutionRows::new(o),
                redraw,
                scores: kept_scores(batch, n, (d, o), redraw.max_tape_bytes),
            }),
            _ => None,
        };
        let (b, n, d, o) = (batch as i64, n as i64, d as i64, o as i64);
        let f64s = (Kind::Double, device);
        let f32s = (Kind::Float, device);
        let jacobian = match form {
            None => None,
            Some(TapeForm::Sums) => Some(JacobianSums::Sums {
                sum_s: zeros(&[b, d], f64s)?,
                sum_ys: zeros(&[b, o, d], f32s)?,
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
            let xw = if input_sums { d } else { 0 };
            Some((
                zeros(&[b], f64s)?,
                zeros(&[b, wy], f64s)?,
                zeros(&[b, xw], f64s)?,
            ))
        } else {
            None
        };
        Ok(Accumulator {
            o,
            perturbation,
            sigma,
            sum_y: zeros(&[b, o], f64s)?,
            jacobian,
            objective,
        })
    }

    /// Whether the scores are needed.
    pub fn wants_scores(&self) -> bool {
        self.jacobian.is_some()
    }

    /// Adds samples `n0 .. n0 + rows` of problems `b .. b + nb` (several problems only with
    /// all their samples): noise `z` and perturbed inputs `x` `[nb · rows, d]`, problem by
    /// problem, scores `s` (when wanted) and solutions `y`.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        b: i64,
        nb: i64,
        n0: i64,
        z: &Tensor,
        x: &Tensor,
        s: Option<&Tensor>,
        y: &Solutions,
    ) -> Result<()> {
        let _serial = crate::intraop::serial_on(self.sum_y.device()); // (same bits for any threads)
        let rows = z.size()[0] / nb; // per problem
        let o = self.o;
        // few outputs: the positions of the ones would all land on a few entries of the
        // sums (atomic adds that serialize on a GPU); dense rows are summed by reductions
        let small = match y {
            Solutions::Indicator(_) if o <= DENSE_BELOW_OUTPUTS => {
                Some(Solutions::Dense(y.dense(o)?))
            }
            _ => None,
        };
        let y = small.as_ref().unwrap_or(y);
        // the dense solutions, made at most once (samples tape, multiplicative objective)
        let mut dense_cache: Option<Tensor> = None;
        let mut dense = || -> Result<Tensor> {
            if dense_cache.is_none() {
                dense_cache = Some(y.dense(o)?);
            }
            Ok(dense_cache.as_ref().expect("just set").shallow_clone())
        };
        // [nb · rows, w] as [nb, rows, w]
        let per_problem = |t: &Tensor| -> Result<Tensor> {
            let w = t.size()[1];
            Ok(t.f_view([nb, rows, w])?)
        };
        // the flat positions, in a [batch, w] tensor, of entries `index` [nb · rows, m]
        // (columns of their row's problem)
        let flat_in_problems = |index: &Tensor, w: i64| -> Result<Tensor> {
            let first = Tensor::f_arange_start(b, b + nb, (Kind::Int64, index.device()))?
                .f_mul_scalar(w)?
                .f_repeat_interleave_self_int(rows, 0, None)?
                .f_unsqueeze(1)?;
            Ok(index.f_add(&first)?.f_flatten(0, -1)?)
        };
        match y {
            Solutions::Dense(y) => {
                let _ = self
                    .sum_y
                    .f_narrow(0, b, nb)?
                    .f_add_(&per_problem(y)?.f_sum_dim_intlist(1, false, Kind::Double)?)?;
            }
            Solutions::Indicator(index) => {
                let ones = Tensor::f_ones([index.numel() as i64], (Kind::Double, index.device()))?;
                let _ = self.sum_y.f_view([-1])?.f_index_add_(
                    0,
                    &flat_in_problems(index, o)?,
                    &ones,
                )?;
            }
        }
        match (&mut self.jacobian, s) {
            (Some(JacobianSums::Sums { sum_s, sum_ys }), Some(s)) => {
                let _ = sum_s
                    .f_narrow(0, b, nb)?
                    .f_add_(&per_problem(s)?.f_sum_dim_intlist(1, false, Kind::Double)?)?;
                match y {
                    Solutions::Dense(y) => {
                        // Σ_n Y_n s_nᵀ per problem: [nb, o, rows] × [nb, rows, d]
                        let _ = sum_ys
                            .f_narrow(0, b, nb)?
                            .f_baddbmm_(&per_problem(y)?.f_transpose(1, 2)?, &per_problem(s)?)?;
                    }
                    Solutions::Indicator(index) => {
                        // Σ_n Y_n s_nᵀ with 0/1 Y_n: add each s_n to the rows of its ones
                        // (rows of the [batch · o, d] view).
                        let m = index.size()[1];
                        let src = if m == 1 {
                            s.shallow_clone()
                        } else {
                            s.f_repeat_interleave_self_int(m, 0, None)?
                        };
                        let d = s.size()[1];
                        let _ = sum_ys.f_view([-1, d])?.f_index_add_(
                            0,
                            &flat_in_problems(index, o)?,
                            &src,
                        )?;
                    }
                }
            }
            (Some(JacobianSums::Samples { y: ys, s: ss }), Some(s)) => {
                ys.f_narrow(0, b, nb)?
                    .f_narrow(1, n0, rows)?
                    .f_copy_(&per_problem(&dense()?)?)?;
                ss.f_narrow(0, b, nb)?
                    .f_narrow(1, n0, rows)?
                    .f_copy_(&per_problem(s)?)?;
            }
            (Some(JacobianSums::Replay { .. }), Some(_)) => {
                unreachable!("tapes of solutions only are made by the host pipeline")
            }
            (Some(_), None) => unreachable!("scores are computed when a Jacobian is wanted"),
            (None, _) => {}
        }
        if let Some((objective, sum_wy, sum_x)) = &mut self.objective {
            if sum_x.size()[1] > 0 {
                let xs = per_problem(x)?.f_sum_dim_intlist(1, false, Kind::Double)?;
                let _ = sum_x.f_narrow(0, b, nb)?.f_add_(&xs)?;
            }
            let products = match y {
                Solutions::Dense(y) => x.f_mul(y)?,
                Solutions::Indicator(index) => x.f_gather(1, index, false)?,
            };
            let value = products
                .f_view([nb, -1])?
                .f_sum_dim_intlist(1, false, Kind::Double)?;
            let _ = objective.f_narrow(0, b, nb)?.f_add_(&value)?;
            if self.perturbation == Perturbation::Multiplicative {
                let w = self.perturbation.weight(z, self.sigma)?;
                let wy =
                    per_problem(&w.f_mul(&dense()?)?)?.f_sum_dim_intlist(1, false, Kind::Double)?;
                let _ = sum_wy.f_narrow(0, b, nb)?.f_add_(&wy)?;
            }
        }
        Ok(())
    }

    /// Whether the call keeps Σ x_n (see [`Accumulator::new`]).
    pub fn keeps_input_sums(&self) -> bool {
        matches!(&self.objective, Some((_, _, sum_x)) if sum_x.size()[1] > 0)
    }

    /// Whether the tape keeps the samples' solutions only (see [`Accumulator::new`]).
    pub fn keeps_solutions(&self) -> bool {
        matches!(self.jacobian, Some(JacobianSums::Replay { .. }))
    }

    /// The buffer for the scores `[batch, N, d]` of a tape that keeps them, taken out so
    /// that the pipeline can fill it while the accumulator takes sums: empty, with room
    /// for every score (not zeroed: the pipeline writes each value once); give it back,
    /// all written, with [`Accumulator::put_scores`] (a tape whose scores are not all
    /// there draws them again).
    pub fn take_scores(&mut self) -> Option<Vec<f32>> {
        match &mut self.jacobian {
            Some(JacobianSums::Replay { scores, .. }) => scores.take(),
            _ => None,
        }
    }

    /// Gives back the scores taken with [`Accumulator::take_scores`], all written.
    pub fn put_scores(&mut self, kept: Vec<f32>) {
        if let Some(JacobianSums::Replay { scores, .. }) = &mut self.jacobian {
            *scores = Some(kept);
        }
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
    /// accumulator: in place, with no libtorch operation (the OpenMP rule of
    /// [`crate::tuning`]), and only over the outputs the sums touched.
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
            Some((objective, sum_wy, sum_x)) => {
                host_slice::<f64>(objective)[b] += sums.objective;
                let xw = sum_x.size()[1] as usize;
                let target = &mut host_slice::<f64>(sum_x)[b * xw..(b + 1) * xw];
                for (a, v) in target.iter_mut().zip(&sums.sum_x) {
                    *a += v;
                }
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
        if self.sum_y.device() == Device::Cpu {
            return self.finish_on_host(n, baseline, clean, theta);
        }
        let nf = n as f64;
        let mean = self.sum_y.f_div_scalar(nf)?.f_to_kind(Kind::Float)?;
        // the baseline only enters the Jacobian: forward calls without a tape make no
        // extra solve, and have no y*(θ)
        let (center, scale) = match self.centre_and_scale(baseline, nf, clean.is_some()) {
            // the centre may be kept by the tape: its own copy, never the storage of the
            // output handed to the caller
            (Centre::Mean, scale) => (Some(crate::tensors::copy(&mean)?), scale),
            (Centre::Clean, scale) => (clean.map(Tensor::shallow_clone), scale),
            (Centre::Zero, scale) => (None, scale),
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
            Some(JacobianSums::Sums { sum_s, sum_ys }) => Some(JacobianData::Dense(
                dense_jacobian(&sum_s, sum_ys, center.as_ref(), scale, col_scale.as_ref())?,
            )),
            Some(JacobianSums::Replay {
                mut rows,
                redraw,
                scores,
            }) => {
                rows.shrink();
                let batch = mean.size()[0] as usize;
                assert_eq!(rows.len(), batch * n, "every sample's solution is kept");
                let center = center.as_ref().map(host_floats).transpose()?;
                let col_scale = col_scale.as_ref().map(host_floats).transpose()?;
                // scores that are not all there are drawn again
                let scores = scores.filter(|s| s.len() == batch * n * redraw.d);
                Some(JacobianData::Replay(Replay {
                    rows,
                    redraw,
                    scores,
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
            Some((objective, sum_wy, sum_x)) => Some(Objective {
                value: objective.f_div_scalar(nf)?,
                sum: match self.perturbation {
                    Perturbation::Additive => self.sum_y,
                    Perturbation::Multiplicative => sum_wy,
                },
                sum_x: (sum_x.size()[1] > 0).then_some(sum_x),
                n: nf,
            }),
        };
        Ok(Estimate {
            mean,
            jacobian,
            objective,
        })
    }
}

/// What the Jacobian estimate subtracts from the solutions (see [`crate::estimate`]).
enum Centre {
    Zero,
    Mean,
    Clean,
}

impl Accumulator {
    /// The centre and the scale of the Jacobian estimate of `n` (`nf`) samples under the
    /// effective `baseline`; `clean` when y*(θ) was solved (calls with a tape).
    fn centre_and_scale(&self, baseline: Baseline, nf: f64, clean: bool) -> (Centre, f64) {
        match baseline {
            Baseline::None => (Centre::Zero, 1.0 / (nf * self.sigma)),
            Baseline::SampleMean => (Centre::Mean, 1.0 / ((nf - 1.0) * self.sigma)),
            Baseline::CleanInput if clean => (Centre::Clean, 1.0 / (nf * self.sigma)),
            Baseline::CleanInput => {
                // forward calls without a tape make no extra solve, and have no y*(θ)
                assert!(
                    self.jacobian.is_none(),
                    "the clean-input baseline needs y*(theta) for a Jacobian"
                );
                (Centre::Zero, 1.0 / (nf * self.sigma))
            }
        }
    }
}

/// Room (an empty buffer) for the scores `[batch, n, d]` of a tape of solutions, when they take at most
/// [`KEEP_SCORES_BYTES`], the tape still fits in `max_tape_bytes` (0: no limit) whatever
/// its solutions take (dense rows of `o` values and their ends, the centre), and memory
/// allows; else None (they are drawn again).
fn kept_scores(
    batch: usize,
    n: usize,
    (d, o): (usize, usize),
    max_tape_bytes: u64,
) -> Option<Vec<f32>> {
    let len = batch.checked_mul(n)?.checked_mul(d)?;
    if len == 0 || len.checked_mul(4)? > KEEP_SCORES_BYTES {
        return None;
    }
    if max_tape_bytes > 0 {
        // scores, dense rows with their 8-byte ends, centre and column scale, objective
        let rows = batch.checked_mul(n)?;
        let floats = len
            .checked_add(rows.checked_mul(o.checked_add(2)?)?)?
            .checked_add(batch.checked_mul(o.checked_add(d)?.checked_add(2)?)?)?;
        if floats.checked_mul(4)? as u64 > max_tape_bytes {
            return None;
        }
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    Some(v)
}

/// The Jacobian from its sums, with libtorch: Σ (Y_n − c) s_nᵀ = Σ Y_n s_nᵀ − c (Σ s_n)ᵀ,
/// scaled, times the column scale, in place in `sum_ys` (which becomes the tape's memory).
fn dense_jacobian(
    sum_s: &Tensor,
    sum_ys: Tensor,
    center: Option<&Tensor>,
    scale: f64,
    col_scale: Option<&Tensor>,
) -> Result<Tensor> {
    let _serial = crate::intraop::serial_on(sum_ys.device()); // (same bits for any threads)
    let mut j = sum_ys;
    if let Some(c) = center {
        let s = sum_s.f_to_kind(Kind::Float)?.f_unsqueeze(1)?; // [b, 1, d]
        let _ = j.f_baddbmm_(&c.f_neg()?.f_unsqueeze(2)?, &s)?;
    }
    let _ = j.f_mul_scalar_(scale)?;
    if let Some(cs) = col_scale {
        let _ = j.f_mul_(&cs.f_unsqueeze(1)?)?;
    }
    Ok(j)
}

/// A zero tensor of `size`: on the CPU filled in Rust (libtorch's fill is a parallel kernel
/// for large tensors; the OpenMP rule of [`crate::tuning`]).
fn zeros(size: &[i64], options: (Kind, Device)) -> Result<Tensor> {
    if options.1 != Device::Cpu {
        return Ok(Tensor::f_zeros(size, options)?);
    }
    let mut t = Tensor::f_empty(size, options)?;
    match options.0 {
        Kind::Double => host_slice_uninit_fill::<f64>(&mut t),
        _ => host_slice_uninit_fill::<f32>(&mut t),
    }
    Ok(t)
}

/// Zeroes a fresh contiguous CPU tensor of kind `T` through a raw pointer (its memory is
/// uninitialized: no slice is formed over it before it is written).
fn host_slice_uninit_fill<T: tch::kind::Element>(t: &mut Tensor) {
    assert!(t.device() == Device::Cpu && t.is_contiguous() && t.kind() == T::KIND);
    if t.numel() == 0 {
        return; // no memory (the pointer may be NULL)
    }
    // SAFETY: a contiguous CPU tensor of numel() elements of kind T, owned here; all-zero
    // bits are 0.0 for f32 and f64.
    unsafe { std::ptr::write_bytes(t.data_ptr() as *mut T, 0, t.numel()) };
}
