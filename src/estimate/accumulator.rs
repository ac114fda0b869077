//! The running sums of one forward call over its samples, and the estimates made from them
//! once all samples are in (see [`crate::estimate`] for the estimators).
//!
//! Two halves: [`tensor`] adds chunks of samples as libtorch tensors (the chunk pipeline:
//! CUDA ops, CPU ops of device solvers) and finishes on the op's device; [`host`] takes
//! the sums that the CPU's host paths made in Rust and finishes in Rust (the OpenMP rule
//! of [`crate::tuning`]). [`Accumulator::finish`] is the one place that turns sums into
//! the estimate: the mean, the centering of the Jacobian, what the tape keeps, and the
//! objective (but for host runs of whole problems, whose blocks make their problems'
//! means from their own sums: see [`Accumulator::take_host_sums`]).

use crate::error::Result;
use crate::estimate::centering::Centering;
use crate::estimate::kept::{kept_scores, Kept, TapeForm};
use crate::estimate::replay::{Redraw, Replay, SolutionRows};
use crate::perturbation::Perturbation;
use crate::settings::{Baseline, Path};
use tch::{Device, Kind, Tensor};

mod host;
mod objective;
mod tensor;

pub(crate) use host::{means_of_sums, HostSlices};
pub(crate) use objective::Objective;

/// What one forward call estimated.
pub(crate) struct Estimate {
    /// y_σ(θ), `[batch, output_numel]` float32 on the op's device.
    pub mean: Tensor,
    /// What the tape keeps, when asked for.
    pub kept: Option<Kept>,
    /// F_σ(θ) and what its gradient is made from, when output shape = input shape.
    pub objective: Option<Objective>,
    /// The path the call took (set by `OpSpec::run`; kept by the tape, for tests).
    pub path: Option<Path>,
}

/// The sums of the objective, float64 on the op's device: Σ ⟨x_n, Y_n⟩ `[batch]`,
/// Σ exp(σZ_n − σ²/2) ⊙ Y_n `[batch, d]` (multiplicative, else `[batch, 0]`) and Σ x_n
/// `[batch, d]` (when asked for, else `[batch, 0]`).
pub(crate) struct ObjectiveSums {
    pub value: Tensor,
    pub weighted: Tensor,
    pub inputs: Tensor,
}

/// Running sums of one forward call, on the op's device.
pub(crate) struct Accumulator {
    o: i64,
    perturbation: Perturbation,
    sigma: f64,
    /// Σ Y_n `[batch, o]`, float64.
    sum_y: Tensor,
    /// Σ s_n `[batch, d]`, float64, for a tape of sums (its centering).
    sum_s: Option<Tensor>,
    /// What the tape keeps, while it is filled.
    kept: Option<Kept>,
    objective: Option<ObjectiveSums>,
    /// Σ Y_n and the objective's sums are not written yet (CPU: zeroed at their first use,
    /// or by the blocks of whole problems they are handed to, see
    /// [`Accumulator::take_host_sums`]).
    unzeroed: bool,
    /// y_σ(θ), made by the blocks of whole problems of a host run from their own sums
    /// (see [`Accumulator::put_host_sums`]); else made from Σ Y_n when finishing.
    mean: Option<Tensor>,
}

impl Accumulator {
    /// Sums for `batch` problems of `n` samples; `form` when a Jacobian is wanted;
    /// `square` when output shape = input shape (the objective is then estimated too,
    /// and with `input_sums` the sum of the perturbed inputs). With `redraw`, a tape of
    /// samples keeps their solutions (added with [`Accumulator::add_solutions`]), and
    /// their scores when [`kept_scores`] allows (filled by the pipeline, see
    /// [`Accumulator::take_scores`]; else drawn again from the stream).
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
        let (b, ni, di, oi) = (batch as i64, n as i64, d as i64, o as i64);
        let f64s = (Kind::Double, device);
        let f32s = (Kind::Float, device);
        let kept = match (form, redraw) {
            (None, _) => None,
            (Some(TapeForm::Sums), _) => Some(Kept::Sums(zeros(&[b, oi, di], f32s)?)),
            (Some(TapeForm::Samples), Some(redraw)) => Some(Kept::Solutions(Replay {
                rows: SolutionRows::new(o),
                redraw,
                scores: kept_scores(batch, n, (d, o), redraw.max_tape_bytes),
                batch,
                centering: Centering::none(),
            })),
            (Some(TapeForm::Samples), None) => Some(Kept::Samples {
                y: Tensor::f_empty([b, ni, oi], f32s)?,
                s: Tensor::f_empty([b, ni, di], f32s)?,
                centering: Centering::none(),
            }),
        };
        let sum_s = match form {
            Some(TapeForm::Sums) => Some(zeros(&[b, di], f64s)?),
            _ => None,
        };
        // the sums of every call: on the CPU left unwritten until their first use (blocks
        // of whole problems zero their own, in cache), elsewhere zeros
        let on_host = device == Device::Cpu;
        let sums = |size: &[i64]| -> Result<Tensor> {
            if on_host {
                Ok(Tensor::f_empty(size, f64s)?)
            } else {
                zeros(size, f64s)
            }
        };
        let objective = if square {
            let w = if perturbation == Perturbation::Multiplicative {
                di
            } else {
                0
            };
            Some(ObjectiveSums {
                value: sums(&[b])?,
                weighted: sums(&[b, w])?,
                inputs: sums(&[b, if input_sums { di } else { 0 }])?,
            })
        } else {
            None
        };
        Ok(Accumulator {
            o: oi,
            perturbation,
            sigma,
            sum_y: sums(&[b, oi])?,
            sum_s,
            kept,
            objective,
            unzeroed: on_host,
            mean: None,
        })
    }

    /// Zeroes Σ Y_n and the objective's sums, unless they are written already: the first
    /// thing every use of them does (but blocks of whole problems, which zero their own).
    fn zero_sums(&mut self) {
        if std::mem::take(&mut self.unzeroed) {
            host_slice_uninit_fill::<f64>(&mut self.sum_y);
            if let Some(sums) = &mut self.objective {
                for t in [&mut sums.value, &mut sums.weighted, &mut sums.inputs] {
                    host_slice_uninit_fill::<f64>(t);
                }
            }
        }
    }

    /// Whether the scores are needed.
    pub fn wants_scores(&self) -> bool {
        self.kept.is_some()
    }

    /// The tape form, when a Jacobian is wanted.
    pub fn form(&self) -> Option<TapeForm> {
        self.kept.as_ref().map(Kept::form)
    }

    /// Whether the call keeps Σ x_n (see [`Accumulator::new`]).
    pub fn keeps_input_sums(&self) -> bool {
        matches!(&self.objective, Some(sums) if sums.inputs.size()[1] > 0)
    }

    /// Whether the tape keeps the samples' solutions (see [`Accumulator::new`]).
    pub fn keeps_solutions(&self) -> bool {
        matches!(self.kept, Some(Kept::Solutions(_)))
    }

    /// The buffer for the scores `[batch, N, d]` of a tape that keeps them, taken out so
    /// that the pipeline can fill it while the accumulator takes sums: empty, with room
    /// for every score (not zeroed: the pipeline writes each value once); give it back,
    /// all written, with [`Accumulator::put_scores`] (a tape whose scores are not all
    /// there draws them again).
    pub fn take_scores(&mut self) -> Option<Vec<f32>> {
        match &mut self.kept {
            Some(Kept::Solutions(replay)) => replay.scores.take(),
            _ => None,
        }
    }

    /// Gives back the scores taken with [`Accumulator::take_scores`], all written.
    pub fn put_scores(&mut self, kept: Vec<f32>) {
        if let Some(Kept::Solutions(replay)) = &mut self.kept {
            replay.scores = Some(kept);
        }
    }

    /// Appends the solutions of the next samples, in sample order, problem by problem.
    pub fn add_solutions(&mut self, more: &SolutionRows) -> Result<()> {
        match &mut self.kept {
            Some(Kept::Solutions(replay)) => replay.rows.append(more),
            _ => Ok(()),
        }
    }

    /// The estimates from `n` samples. `baseline` is the effective one (None under
    /// antithetic pairs); `clean` holds y*(θ) `[batch, o]` for the clean-input baseline;
    /// `theta` `[batch, d]` (on the device) is needed by the multiplicative model. On the
    /// CPU in Rust, on other devices with libtorch.
    pub fn finish(
        mut self,
        n: usize,
        baseline: Baseline,
        clean: Option<&Tensor>,
        theta: &Tensor,
    ) -> Result<Estimate> {
        let nf = n as f64;
        self.zero_sums(); // (a call with no samples written)
        let on_host = self.sum_y.device() == Device::Cpu;
        let mean = if on_host {
            self.host_mean(n)?
        } else {
            self.tensor_mean(nf)?
        };
        // the baseline only enters the Jacobian: forward calls without a tape make no
        // extra solve, and have no y*(θ)
        let (center, scale) = self.center_and_scale(baseline, nf, clean.is_some());
        let col_scale = self.col_scale_of(theta);
        let centering = if on_host {
            Centerings::Host(host::centering(center, scale, &mean, clean, col_scale)?)
        } else {
            Centerings::Device(tensor::centering(center, scale, &mean, clean, col_scale)?)
        };
        let batch = mean.size()[0];
        let (o, d) = (self.o, theta.size()[1]);
        let kept = match self.kept.take() {
            None => None,
            Some(Kept::Sums(sum_ys)) => {
                let sum_s = self.sum_s.take().expect("a tape of sums has Σ s_n");
                Some(Kept::Sums(centering.jacobian_of_sums(
                    &sum_s,
                    sum_ys,
                    [batch, o, d],
                )?))
            }
            Some(Kept::Samples { y, s, .. }) => Some(Kept::Samples {
                y,
                s,
                centering: centering.on_device([batch, o, d], &mean)?,
            }),
            Some(Kept::Solutions(mut replay)) => {
                replay.rows.shrink();
                assert_eq!(
                    replay.rows.len(),
                    batch as usize * n,
                    "every sample's solution is kept"
                );
                // scores that are not all there (none were drawn into the room) are drawn
                // again
                let all = batch as usize * n * replay.redraw.d;
                replay.scores = replay.scores.filter(|s| s.len() == all);
                replay.centering = centering.on_host()?;
                Some(Kept::Solutions(replay))
            }
        };
        let objective = self.objective(nf, on_host)?;
        Ok(Estimate {
            mean,
            kept,
            objective,
            path: None,
        })
    }

    /// The column scale of the Jacobian: none for the additive model, 1/θ (0 where θ = 0)
    /// for the multiplicative one.
    fn col_scale_of<'t>(&self, theta: &'t Tensor) -> Option<&'t Tensor> {
        (self.perturbation == Perturbation::Multiplicative).then_some(theta)
    }

    /// The center and the scale of the Jacobian estimate of `n` (`nf`) samples under the
    /// effective `baseline`; `clean` when y*(θ) was solved (calls with a tape).
    fn center_and_scale(&self, baseline: Baseline, nf: f64, clean: bool) -> (Center, f64) {
        match baseline {
            Baseline::None => (Center::Zero, 1.0 / (nf * self.sigma)),
            Baseline::SampleMean => (Center::Mean, 1.0 / ((nf - 1.0) * self.sigma)),
            Baseline::CleanInput if clean => (Center::Clean, 1.0 / (nf * self.sigma)),
            Baseline::CleanInput => {
                // forward calls without a tape make no extra solve, and have no y*(θ)
                assert!(
                    self.kept.is_none(),
                    "the clean-input baseline needs y*(theta) for a Jacobian"
                );
                (Center::Zero, 1.0 / (nf * self.sigma))
            }
        }
    }

    /// F_σ(θ) and what its gradient is made from, when the objective is estimated.
    fn objective(&mut self, nf: f64, on_host: bool) -> Result<Option<Objective>> {
        let Some(sums) = self.objective.take() else {
            return Ok(None);
        };
        let value = if on_host {
            host::mean_of(sums.value, nf)?
        } else {
            sums.value.f_div_scalar(nf)?
        };
        Ok(Some(Objective {
            value,
            sum: match self.perturbation {
                Perturbation::Additive => std::mem::replace(&mut self.sum_y, Tensor::new()),
                Perturbation::Multiplicative => sums.weighted,
            },
            sum_x: (sums.inputs.size()[1] > 0).then_some(sums.inputs),
            n: nf,
        }))
    }
}

/// What the Jacobian estimate subtracts from the solutions (see [`crate::estimate`]).
#[derive(Debug, Clone, Copy)]
enum Center {
    Zero,
    Mean,
    Clean,
}

/// A call's centering, made where its sums are: on the host (Rust) or on the device
/// (libtorch).
enum Centerings {
    Host(Centering<Vec<f32>>),
    Device(Centering<Tensor>),
}

impl Centerings {
    /// J from the Jacobian sums Σ s_n `[b, d]` and Σ Y_n s_nᵀ `[b, o, d]` (`size`):
    /// scale · (Σ Y_n s_nᵀ − c (Σ s_n)ᵀ) ⊙ col_scale, in place in `sum_ys` (which becomes
    /// the tape's memory). On the host in Rust up to HOST_FINISH_ENTRIES, else with
    /// libtorch.
    fn jacobian_of_sums(&self, sum_s: &Tensor, sum_ys: Tensor, size: [i64; 3]) -> Result<Tensor> {
        match self {
            Centerings::Host(c) if host::finishes_in_rust(size) => {
                host::jacobian_of_sums(sum_s, sum_ys, c)
            }
            Centerings::Host(c) => {
                tensor::jacobian_of_sums(sum_s, sum_ys, &host::to_tensors(c, size)?)
            }
            Centerings::Device(c) => tensor::jacobian_of_sums(sum_s, sum_ys, c),
        }
    }

    /// The centering as tensors on the op's device, with a center always there (zeros
    /// like `mean` when there is none).
    fn on_device(self, size: [i64; 3], mean: &Tensor) -> Result<Centering<Tensor>> {
        let mut c = match self {
            Centerings::Host(c) => host::to_tensors(&c, size)?,
            Centerings::Device(c) => c,
        };
        if c.center.is_none() {
            c.center = Some(mean.f_zeros_like()?);
        }
        Ok(c)
    }

    /// The centering as host vectors (tapes of solutions, made on the host only).
    fn on_host(self) -> Result<Centering<Vec<f32>>> {
        match self {
            Centerings::Host(c) => Ok(c),
            Centerings::Device(_) => unreachable!("tapes of solutions are made on the host"),
        }
    }
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

/// Zeroes a fresh contiguous CPU tensor of kind `T` (its memory seen as uninitialized
/// until written).
fn host_slice_uninit_fill<T: tch::kind::Element>(t: &mut Tensor) {
    let v = crate::tensors::host_slice_uninit::<T>(t);
    // SAFETY: the tensor's own memory, `v.len()` elements of T; all-zero bits are 0.0 for
    // f32 and f64
    unsafe { std::ptr::write_bytes(v.as_mut_ptr(), 0, v.len()) };
}
