//! The pipelines of a forward call. [`OpSpec::run`] picks one by the op's device and
//! solver: the fused argmax kernel (CPU built-in argmax), the host pipeline ([`host`]: CPU
//! callbacks, other built-ins and two-phase solutions) or the libtorch chunk pipeline
//! ([`libtorch`]: CUDA ops, ops of device solvers, and CPU ops forced onto it), and returns
//! the [`Estimate`].

pub(crate) mod host;
pub(crate) mod libtorch;
pub(crate) mod plan;
pub(crate) mod solve;

use crate::error::Result;
use crate::estimate::replay::Redraw;
use crate::estimate::{Accumulator, Estimate, TapeForm};
use crate::interrupt::Stop;
use crate::kernels::builtin::{Builtin, Solutions};
use crate::kernels::fused_argmax::{Kernel, Problem};
use crate::pipeline::solve::provided;
use crate::rng::Stream;
use crate::settings::Baseline;
use crate::solver::SolveInfo;
use crate::tensors::HostFloats;
use tch::{Device, Tensor};

pub(crate) use plan::OpSpec;

/// What a forward call computes besides y_σ(θ) (and F_σ(θ) for square ops).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wants {
    /// The Jacobian, for a tape.
    pub jacobian: bool,
    /// Σ x_n, the perturbed inputs (the Fenchel-Young loss's bound).
    pub input_sums: bool,
}
pub(crate) use solve::{HostSolver, SolverKind, Source};

impl OpSpec {
    /// Where rows of a call on `batch` problems sit, for a solver call on the calling
    /// thread (worker 0), on the op's device.
    fn rows_at(&self, clean: bool, first_row: u64, batch: usize) -> SolveInfo {
        SolveInfo {
            worker: 0,
            clean,
            first_row,
            num_samples: self.config.num_samples(),
            batch,
            cuda_device: match self.device {
                Device::Cuda(i) => Some(i),
                _ => None,
            },
        }
    }

    /// One forward call (number `call` of its op) on `theta` `[batch, d]` (on the device).
    pub(crate) fn run(
        &self,
        theta: &Tensor,
        call: u64,
        wants: Wants,
        source: Source<'_>,
        stop: Stop<'_>,
    ) -> Result<Estimate> {
        let want_jacobian = wants.jacobian;
        let c = &self.config;
        let batch = theta.size()[0] as usize;
        let (d, o, n) = (
            self.input_numel,
            self.output_numel,
            c.num_samples() as usize,
        );
        let form = if want_jacobian {
            Some(self.tape_form(batch)?)
        } else {
            None
        };
        let stream = Stream::new(c.seed(), call);
        // the effective baseline: none under antithetic pairs (a constant one drops out),
        // and none for the sample mean of a single sample (undefined there)
        let baseline = match c.baseline() {
            _ if c.antithetic() => Baseline::None,
            Baseline::SampleMean if n == 1 => Baseline::None,
            chosen => chosen,
        };
        let clean = if want_jacobian && baseline == Baseline::CleanInput {
            let rows = match source {
                Source::Provided(all) => {
                    Solutions::Dense(provided(all, batch * n, batch, o, self.device)?)
                }
                Source::Solver(solver) => {
                    stop.check()?;
                    self.solve(solver, theta, self.rows_at(true, 0, batch))?
                }
            };
            Some(rows.dense(o as i64)?)
        } else {
            None
        };
        let square = self.input_shape == self.output_shape;
        let host = matches!(
            source,
            Source::Solver(SolverKind::Host(_) | SolverKind::Builtin(_)) | Source::Provided(_)
        ) && self.host_pipeline();
        // the host pipeline's tapes keep the samples' solutions, and the scores up to a
        // size (else drawn again)
        let redraw = (host && u32::try_from(o).is_ok()).then_some(Redraw {
            stream,
            noise: c.noise(),
            antithetic: c.antithetic(),
            score_is_z: c.perturbation() == crate::perturbation::Perturbation::Multiplicative,
            n,
            d,
            threads: c.library_threads(),
            max_tape_bytes: c.max_tape_bytes(),
        });
        let mut acc = Accumulator::new(
            batch,
            n,
            d,
            o,
            c.perturbation(),
            c.sigma(),
            form,
            redraw,
            (square, square && wants.input_sums),
            self.device,
        )?;
        // the fused argmax, for the op's own calls and for the solutions of its draws
        let fused = match source {
            Source::Solver(SolverKind::Builtin(Builtin::Argmax)) => Some(None),
            Source::Provided(all) if self.builtin_argmax => Some(Some(all)),
            _ => None,
        };
        if let (Some(provided), Device::Cpu, None | Some(TapeForm::Sums), false) =
            (fused, self.device, form, c.libtorch_path())
        {
            if d * d <= crate::tuning::FUSED_MAX_SUMS {
                // the rows of problem b, checked finite
                let rows_of = |b: usize| -> Result<Option<&[f32]>> {
                    provided
                        .map(|all| {
                            let part = &all[b * n * d..(b + 1) * n * d];
                            crate::pipeline::solve::check_provided(part, b * n, d)?;
                            Ok(part)
                        })
                        .transpose()
                };
                let kernel = Kernel {
                    stream: &stream,
                    noise: c.noise(),
                    perturbation: c.perturbation(),
                    sigma: c.sigma() as f32,
                    antithetic: c.antithetic(),
                    jacobian: form.is_some(),
                    last: *self.input_shape.last().expect("built-ins have rank >= 1") as usize,
                    stop,
                    input_sums: acc.keeps_input_sums(),
                };
                let cores = c.library_threads();
                // read in place: no code of the caller's runs during the call
                let theta_values = HostFloats::of(theta)?;
                let theta_host: &[f32] = &theta_values;
                let batch = theta_host.len() / d;
                if kernel.blocks(n) >= cores || batch == 1 {
                    // enough blocks within each problem for every core
                    for (b, theta) in theta_host.chunks_exact(d).enumerate() {
                        let solutions = rows_of(b)?;
                        let sums = kernel.problem(
                            Problem {
                                theta,
                                b,
                                n,
                                solutions,
                            },
                            cores,
                        )?;
                        acc.add_sums(b as i64, &sums)?;
                    }
                } else {
                    // problems shared by the cores (each made exactly as above, on one)
                    let mut scratch = vec![(); cores];
                    crate::kernels::blocks::run_blocks(
                        batch,
                        &mut scratch,
                        |b, _| {
                            let theta = &theta_host[b * d..(b + 1) * d];
                            let solutions = rows_of(b)?;
                            kernel.problem(
                                Problem {
                                    theta,
                                    b,
                                    n,
                                    solutions,
                                },
                                1,
                            )
                        },
                        |b, sums| acc.add_sums(b as i64, &sums),
                    )?;
                }
                return acc.finish(n, baseline, clean.as_ref(), theta);
            }
        }
        if host {
            self.run_on_host(theta, &stream, source, stop, &mut acc)?;
            return acc.finish(n, baseline, clean.as_ref(), theta);
        }
        self.for_each_chunk(theta, &stream, |b, nb, n0, z, x| {
            stop.check()?;
            let rows = z.size()[0] as usize; // of all nb problems
            let y = match source {
                Source::Solver(solver) => {
                    self.solve(solver, &x, self.rows_at(false, (b * n + n0) as u64, batch))?
                }
                Source::Provided(all) => {
                    Solutions::Dense(provided(all, b * n + n0, rows, o, self.device)?)
                }
            };
            let s = if acc.wants_scores() {
                Some(c.perturbation().score(c.noise(), &z)?)
            } else {
                None
            };
            acc.add(b as i64, nb as i64, n0 as i64, &z, &x, s.as_ref(), &y)
        })?;
        acc.finish(n, baseline, clean.as_ref(), theta)
    }
}
