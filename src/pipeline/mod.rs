//! The pipelines of a forward call. [`OpSpec::run`] asks [`OpSpec::path`] (module
//! [`path`], the one place that chooses) for the call's path and runs it: the fused argmax
//! ([`fused`]), the host pipeline ([`host`]) or the libtorch chunk pipeline ([`libtorch`]),
//! then finishes the accumulator into the [`Estimate`].

pub(crate) mod cache;
pub(crate) mod fused;
pub(crate) mod host;
pub(crate) mod libtorch;
pub(crate) mod path;
pub(crate) mod plan;
pub(crate) mod solve;

use crate::error::Result;
use crate::estimate::kept::{keeps_solutions, tape_form};
use crate::estimate::replay::Redraw;
use crate::estimate::{Accumulator, Estimate, TapeForm};
use crate::interrupt::Stop;
use crate::kernels::builtin::Solutions;
use crate::rng::Stream;
use crate::settings::{Baseline, Path};
use tch::Tensor;

pub(crate) use cache::{Additions, CallCache};
pub(crate) use plan::OpSpec;
pub(crate) use solve::{solve_nan_filled_rows, HostSolver, SolverKind, Source};

/// What a forward call computes besides y_σ(θ) (and F_σ(θ) for square ops).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wants {
    /// The Jacobian, for a tape.
    pub jacobian: bool,
    /// Σ x_n, the perturbed inputs (the Fenchel-Young loss's bound).
    pub input_sums: bool,
}

impl OpSpec {
    /// One forward call (number `call` of its op) on `theta` `[batch, d]` (on the device);
    /// with `cache`, its samples are solved or answered from the op's pool as the cache
    /// decides (the cache then holds the rows solved, for the pool).
    pub(crate) fn run(
        &self,
        theta: &Tensor,
        call: u64,
        wants: Wants,
        (source, cache): (Source<'_>, Option<&CallCache>),
        stop: Stop<'_>,
    ) -> Result<Estimate> {
        let batch = theta.size()[0] as usize;
        let c = &self.config;
        // the tape's form, checked against the config's limit (the policy: estimate/kept)
        if wants.jacobian && !c.noise().has_score() {
            return Err(crate::noise::no_score());
        }
        let form = if wants.jacobian {
            Some(tape_form(
                c.num_samples() as usize,
                self.input_numel,
                self.output_numel,
                batch,
                (c.max_tape_bytes(), c.tape_form()),
            )?)
        } else {
            None
        };
        let path = self.path(&source, form, cache.is_some())?;
        let stream = Stream::new(self.config.seed(), call);
        let baseline = self.effective_baseline();
        let clean = if wants.jacobian && baseline == Baseline::CleanInput {
            Some(self.clean_solutions(theta, source, stop, cache)?)
        } else {
            None
        };
        let mut acc = self.accumulator(batch, form, path, wants, &stream)?;
        match path {
            Path::FusedArgmax => {
                self.run_fused(theta, &stream, source, stop, &mut acc)?;
                if let Source::Solver(_) = source {
                    self.count_solved(batch * c.num_samples() as usize);
                }
            }
            Path::Host => self.run_on_host(theta, &stream, (source, cache), stop, &mut acc)?,
            Path::Chunks | Path::Cuda => {
                self.run_chunks(theta, &stream, (source, cache), stop, path, &mut acc)?
            }
        }
        let n = self.config.num_samples() as usize;
        let mut estimate = acc.finish(n, baseline, clean.as_ref(), theta)?;
        estimate.path = Some(path);
        Ok(estimate)
    }

    /// The baseline in effect: none under antithetic pairs (a constant one drops out), and
    /// none for the sample mean of a single sample (undefined there).
    fn effective_baseline(&self) -> Baseline {
        let c = &self.config;
        match c.baseline() {
            _ if c.antithetic() => Baseline::None,
            Baseline::SampleMean if c.num_samples() == 1 => Baseline::None,
            chosen => chosen,
        }
    }

    /// y*(θ) `[batch, o]` for the clean-input baseline: solved, or the provided solutions'
    /// rows that follow the samples.
    fn clean_solutions(
        &self,
        theta: &Tensor,
        source: Source<'_>,
        stop: Stop<'_>,
        cache: Option<&CallCache>,
    ) -> Result<Tensor> {
        let batch = theta.size()[0] as usize;
        let (o, n) = (self.output_numel, self.config.num_samples() as usize);
        let rows = match source {
            Source::Provided(all) => {
                Solutions::Dense(solve::provided(all, batch * n, batch, o, self.device)?)
            }
            Source::Solver(solver) => {
                stop.check()?;
                let y = self
                    .solve(solver, theta, self.rows_at(true, 0, batch))?
                    .dense(o as i64)?;
                if let Some(cache) = cache {
                    cache.keep(&crate::tensors::host_floats(&y)?, |r| (0, r as u64))?;
                }
                Solutions::Dense(y)
            }
        };
        rows.dense(o as i64)
    }

    /// The accumulator of a call of `batch` problems with a tape of `form` on `path`.
    fn accumulator(
        &self,
        batch: usize,
        form: Option<TapeForm>,
        path: Path,
        wants: Wants,
        stream: &Stream,
    ) -> Result<Accumulator> {
        let c = &self.config;
        let (d, o, n) = (
            self.input_numel,
            self.output_numel,
            c.num_samples() as usize,
        );
        let square = self.input_shape == self.output_shape;
        // the host paths' tapes of samples keep the samples' solutions, and draw their
        // scores again when they are not kept (the policy: estimate/kept)
        let host = matches!(path, Path::Host | Path::FusedArgmax);
        let redraw = keeps_solutions(host, o).then_some(Redraw {
            stream: *stream,
            noise: c.noise(),
            antithetic: c.antithetic(),
            score_is_z: c.perturbation() == crate::perturbation::Perturbation::Multiplicative,
            n,
            d,
            threads: c.library_threads(),
            max_tape_bytes: c.max_tape_bytes(),
        });
        Accumulator::new(
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
        )
    }
}
