//! The two-phase API, for solvers that cannot be called back (another process, a cluster
//! job, a GPU batch solver, a host language that cannot take calls from foreign threads):
//! draw the perturbed inputs, solve them anywhere, hand the solutions back. The results
//! equal those of a forward call with the same seed and call count.

use crate::error::{Error, Result};
use crate::interrupt::Stop;
use crate::noise::{NoiseAt, Sampler};
use crate::pipeline::Wants;
use crate::pipeline::{OpSpec, Source};
use crate::rng::Stream;
use crate::settings::{Baseline, Path};
use crate::shape::checked_product;
use crate::tape::output_and_tape;
use crate::tape::Tape;
use crate::tensors::host_floats;
use std::sync::Arc;
use tch::{Device, Tensor};

/// The perturbed inputs of one call, waiting for their solutions.
///
/// Rows `b·N .. (b+1)·N` hold the N perturbed inputs of problem b; with the clean-input
/// baseline (and no antithetic pairs) `batch` more rows follow, holding θ itself, whose
/// solutions y*(θ) the baseline needs. A draw keeps what it needs of its op: it stays valid
/// after the op is dropped.
pub struct Draw {
    spec: Arc<OpSpec>,
    theta: Tensor,
    call: u64,
    inputs: Vec<f32>,
    rows: usize,
    output_device: Device,
}

// SAFETY: a draw's tensors and buffers are written only while it is built and are read-only
// after; libtorch allows concurrent reads of a tensor.
unsafe impl Sync for Draw {}

impl Draw {
    pub(crate) fn new(spec: Arc<OpSpec>, theta: Tensor, call: u64) -> Result<Draw> {
        let batch = theta.size()[0] as usize;
        let (d, n) = (spec.input_numel, spec.config.num_samples() as usize);
        let c = &spec.config;
        let clean = c.baseline() == Baseline::CleanInput && !c.antithetic();
        let rows = batch * n + if clean { batch } else { 0 };
        let len = checked_product(&[rows, d], "the drawn inputs (rows * input_numel)")?;
        let mut inputs = crate::tensors::host_room(len, "the drawn inputs")?;
        let stream = Stream::new(c.seed(), call);
        // the draws of the path that the solutions will take (the host paths draw on the
        // host), so that the call sees exactly these inputs
        let path = spec.path(&Source::Provided(&[]), None, false)?;
        if matches!(path, Path::Host | Path::FusedArgmax) {
            inputs.resize(batch * n * d, 0.0);
            let theta_host = host_floats(&theta)?;
            let sampler = Sampler {
                noise: c.noise(),
                stream: &stream,
                antithetic: c.antithetic(),
                score_is_z: c.perturbation() == crate::perturbation::Perturbation::Multiplicative,
            };
            let threads = c.library_threads();
            let per = spec.rows_per_chunk();
            let mut z = vec![0f32; per * d];
            for (b, theta_b) in theta_host.chunks_exact(d).enumerate() {
                for n0 in (0..n).step_by(per) {
                    let rows = per.min(n - n0);
                    let z = &mut z[..rows * d];
                    // the noise alone: scores are made when the solutions come back
                    let at = NoiseAt {
                        problem: b,
                        sample: n0,
                        samples: n,
                        width: d,
                    };
                    sampler.draw(at, z, &mut [], threads);
                    let x = &mut inputs[at.row() * d..(at.row() + rows) * d];
                    c.perturbation()
                        .perturb_host(theta_b, z, c.sigma() as f32, x);
                }
            }
        } else {
            spec.for_each_chunk(&theta, &stream, path, |_, _, _, _, x| {
                extend_host(&mut inputs, &x)
            })?;
        }
        if clean {
            extend_host(&mut inputs, &theta)?;
        }
        let output_device = theta.device();
        Ok(Draw {
            spec,
            theta,
            call,
            inputs,
            rows,
            output_device,
        })
    }

    /// The perturbed inputs, `[count, *input_shape]` row-major on the host.
    pub fn inputs(&self) -> &[f32] {
        &self.inputs
    }
    /// The call count of the op that this draw took.
    pub(crate) fn call(&self) -> u64 {
        self.call
    }

    /// The drawn inputs, given up (no copy).
    pub(crate) fn into_inputs(self) -> Vec<f32> {
        self.inputs
    }
    /// The number of rows of [`Draw::inputs`] (problems to solve).
    pub fn count(&self) -> usize {
        self.rows
    }
    /// Number of problems of the call.
    pub fn batch(&self) -> usize {
        self.theta.size()[0] as usize
    }
    /// Elements of one input row.
    pub fn input_numel(&self) -> usize {
        self.spec.input_numel
    }
    /// The shape of one problem's input.
    pub fn input_shape(&self) -> &[i64] {
        &self.spec.input_shape
    }
    /// Elements of one solution row.
    pub fn output_numel(&self) -> usize {
        self.spec.output_numel
    }

    /// y_σ(θ) `[batch, *output_shape]` from the `solutions` of every row of
    /// [`Draw::inputs`] (`count × output_numel` host floats, in the same order), and the
    /// tape when `want_tape`.
    pub fn finish(&self, solutions: &[f32], want_tape: bool) -> Result<(Tensor, Option<Tape>)> {
        let _cap = crate::intraop::cap(self.spec.config.max_threads());
        crate::cuda_stream::check_usable(self.spec.device)?; // (a capture: nothing enqueued)
        self.check_solutions(solutions)?;
        let wants = Wants {
            jacobian: want_tape,
            input_sums: false,
        };
        let estimate = self.spec.run(
            &self.theta,
            self.call,
            wants,
            (Source::Provided(solutions), None),
            Stop::NEVER,
        )?;
        let batch = self.batch();
        if want_tape {
            let (y, tape) = output_and_tape(&self.spec, estimate, batch, self.output_device)?;
            Ok((y, Some(tape)))
        } else {
            Ok((
                self.spec
                    .output_tensor(&estimate.mean, batch, self.output_device)?,
                None,
            ))
        }
    }

    /// The Fenchel-Young loss `[batch]` of the draw's theta against targets `y_true`
    /// (`[batch, *input_shape]`; the op's output shape must equal its input shape) and its
    /// gradient with respect to theta, from the `solutions` of every row of
    /// [`Draw::inputs`]: what [`crate::PerturbedOp::fenchel_young`] gives for the same
    /// seed and call count.
    pub fn fenchel_young(&self, solutions: &[f32], y_true: &Tensor) -> Result<(Tensor, Tensor)> {
        let (loss, grad, _) = self.fenchel_young_call(solutions, y_true, false)?;
        Ok((loss, grad))
    }

    /// [`Draw::fenchel_young`], and the lower bound `[batch]` of each problem's loss for
    /// exact solutions and feasible targets (see
    /// [`crate::PerturbedOp::fenchel_young_with_bound`]).
    pub fn fenchel_young_with_bound(
        &self,
        solutions: &[f32],
        y_true: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (loss, grad, bound) = self.fenchel_young_call(solutions, y_true, true)?;
        Ok((loss, grad, bound.expect("the call kept its input sums")))
    }

    fn fenchel_young_call(
        &self,
        solutions: &[f32],
        y_true: &Tensor,
        input_sums: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let _cap = crate::intraop::cap(self.spec.config.max_threads());
        crate::cuda_stream::check_usable(self.spec.device)?; // (a capture: nothing enqueued)
        self.spec.require_square("the Fenchel-Young loss")?;
        let theta_size = crate::shape::batched(self.batch(), &self.spec.input_shape);
        crate::fenchel_young::check_targets(&theta_size, y_true)?;
        self.check_solutions(solutions)?;
        let estimate = self.spec.run(
            &self.theta,
            self.call,
            Wants {
                jacobian: false,
                input_sums,
            },
            (Source::Provided(solutions), None),
            Stop::NEVER,
        )?;
        let (loss, grad, bound) = crate::fenchel_young::from_estimate(
            (self.spec.config.sense(), self.spec.config.sigma()),
            &self.theta,
            y_true,
            estimate,
        )?;
        Ok((
            loss.f_to_device(self.output_device)?,
            grad.f_reshape(&theta_size)?
                .f_to_device(self.output_device)?,
            bound
                .map(|b| b.f_to_device(self.output_device))
                .transpose()?,
        ))
    }

    fn check_solutions(&self, solutions: &[f32]) -> Result<()> {
        let expected = self.rows * self.spec.output_numel;
        if solutions.len() != expected {
            return Err(Error::invalid(format!(
                "solutions must hold count * output_numel = {expected} floats, got {}",
                solutions.len()
            )));
        }
        Ok(())
    }
}

fn extend_host(out: &mut Vec<f32>, x: &Tensor) -> Result<()> {
    let x = x.f_to_device(Device::Cpu)?.f_contiguous()?;
    let start = out.len();
    out.resize(start + x.numel(), 0.0);
    x.f_copy_data(&mut out[start..], x.numel())?;
    Ok(())
}
