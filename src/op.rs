//! A perturbed optimizer: a solver, its problem shapes, and a config.

use crate::blocks::run_blocks;
use crate::builtin::{Builtin, Solutions};
use crate::config::{Config, AUTO_CHUNK_BYTES};
use crate::error::{Error, Result, Status};
use crate::estimator::{Accumulator, Baseline, Estimate, ProblemSums, TapeForm};
use crate::fused_argmax::Kernel;
use crate::input::check_floats;
use crate::replay::{Redraw, SolutionRows};
use crate::rng::Stream;
use crate::shape::{batched, checked_floats, numel};
use crate::solver::Solver;
use crate::tape::Tape;
use crate::two_phase::Draw;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// About how many blocks the host pipeline cuts a problem's samples into (see
/// [`OpSpec::rows_per_block`]).
const HOST_BLOCKS: usize = 32;

/// The fewest samples in a host block (fewer only when a chunk is smaller): enough that
/// the per-block cost (a solver call, a hand-over between threads) stays small.
const HOST_BLOCK_MIN_ROWS: usize = 512;

/// The most bytes of a host block's buffers (noise, scores, perturbed inputs, solutions),
/// so that a block stays in a core's L2 cache between its steps.
const HOST_BLOCK_BYTES: u64 = 512 << 10;

/// What solves an op's perturbed problems.
#[derive(Clone)]
pub(crate) enum SolverKind {
    /// A host solver (a C callback or a Rust closure).
    Host(Arc<dyn Solver>),
    /// A built-in solver running in libtorch on the op's device.
    Builtin(Builtin),
    /// Solved elsewhere, through the two-phase API only.
    External,
}

/// Where a forward call's solutions come from.
pub(crate) enum Source<'a> {
    /// The op's own solver.
    Solver(&'a SolverKind),
    /// Solutions handed back after a [`Draw`]: `[rows, output_numel]` host floats, rows in
    /// the order of the draw's inputs.
    Provided(&'a [f32]),
}

/// The part of an op that its draws keep (shapes, config, device): immutable.
#[derive(Debug)]
pub(crate) struct OpSpec {
    pub config: Config,
    pub device: Device,
    pub input_shape: Vec<i64>,
    pub output_shape: Vec<i64>,
    pub input_numel: usize,
    pub output_numel: usize,
}

/// y_σ(θ) = E[y*(θ + σZ)] for a black-box solver y*, with its Monte-Carlo gradient.
///
/// `forward` may be called from several threads at once. Each call draws fresh noise: the
/// draws are a pure function of (seed, number of earlier forward calls on this op).
pub struct PerturbedOp {
    spec: Arc<OpSpec>,
    solver: SolverKind,
    calls: AtomicU64,
}

impl std::fmt::Debug for PerturbedOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerturbedOp")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl PerturbedOp {
    /// An op over `solver` for problems of shape `input_shape` with solutions of shape
    /// `output_shape` (empty: one scalar per problem). The config is copied.
    pub fn new(
        config: &Config,
        input_shape: &[i64],
        output_shape: &[i64],
        solver: impl Solver + 'static,
    ) -> Result<PerturbedOp> {
        PerturbedOp::with_solver(
            config,
            input_shape,
            output_shape,
            SolverKind::Host(Arc::new(solver)),
        )
    }

    /// An op over a built-in solver, working along the last dimension of `input_shape`;
    /// the output has the input's shape.
    pub fn new_builtin(
        config: &Config,
        builtin: Builtin,
        input_shape: &[i64],
    ) -> Result<PerturbedOp> {
        builtin.check(input_shape)?;
        PerturbedOp::with_solver(
            config,
            input_shape,
            input_shape,
            SolverKind::Builtin(builtin),
        )
    }

    /// An op whose problems are solved elsewhere: only [`PerturbedOp::draw`] and
    /// [`Draw::finish`] work on it.
    pub fn new_external(
        config: &Config,
        input_shape: &[i64],
        output_shape: &[i64],
    ) -> Result<PerturbedOp> {
        PerturbedOp::with_solver(config, input_shape, output_shape, SolverKind::External)
    }

    fn with_solver(
        config: &Config,
        input_shape: &[i64],
        output_shape: &[i64],
        solver: SolverKind,
    ) -> Result<PerturbedOp> {
        let input_numel = numel(input_shape, "input_shape")?;
        let output_numel = numel(output_shape, "output_shape")?;
        config.validate()?;
        let device = config.device().resolve()?;
        let spec = OpSpec {
            config: config.clone(),
            device,
            input_shape: input_shape.to_vec(),
            output_shape: output_shape.to_vec(),
            input_numel,
            output_numel,
        };
        Ok(PerturbedOp {
            spec: Arc::new(spec),
            solver,
            calls: AtomicU64::new(0),
        })
    }

    /// The op's config (a copy made at construction).
    pub fn config(&self) -> &Config {
        &self.spec.config
    }
    /// The device the op computes on.
    pub fn device(&self) -> Device {
        self.spec.device
    }
    /// Shape of one problem's input.
    pub fn input_shape(&self) -> &[i64] {
        &self.spec.input_shape
    }
    /// Shape of one problem's output.
    pub fn output_shape(&self) -> &[i64] {
        &self.spec.output_shape
    }
    /// Elements of one problem's input.
    pub fn input_numel(&self) -> usize {
        self.spec.input_numel
    }
    /// Elements of one problem's output.
    pub fn output_numel(&self) -> usize {
        self.spec.output_numel
    }

    /// y_σ(θ) for `theta` of shape `[batch, *input_shape]` (float32, any device); the result
    /// has shape `[batch, *output_shape]`, on the device of `theta`.
    pub fn forward(&self, theta: &Tensor) -> Result<Tensor> {
        let (batch, _, estimate) = self.estimate(theta, false)?;
        self.spec
            .output_tensor(&estimate.mean, batch, theta.device())
    }

    /// As [`PerturbedOp::forward`], and the tape for the backward pass.
    pub fn forward_with_tape(&self, theta: &Tensor) -> Result<(Tensor, Tape)> {
        let (batch, _, estimate) = self.estimate(theta, true)?;
        self.spec.output_and_tape(estimate, batch, theta.device())
    }

    /// The Fenchel-Young loss `[batch]` of `theta` against targets `y_true` (both
    /// `[batch, *input_shape]`; the op's output shape must equal its input shape), and its
    /// gradient with respect to theta, from one forward call's draws. See
    /// [`crate::fenchel_young`] for the formulas per sense and perturbation.
    pub fn fenchel_young(&self, theta: &Tensor, y_true: &Tensor) -> Result<(Tensor, Tensor)> {
        self.spec.require_square("the Fenchel-Young loss")?;
        if y_true.size() != theta.size() {
            return Err(Error::invalid(format!(
                "y_true must have the shape of theta {:?}, got {:?}",
                theta.size(),
                y_true.size()
            )));
        }
        check_floats(y_true, "y_true")?;
        let (_, theta_dev, estimate) = self.estimate(theta, false)?;
        let (objective, grad_objective) = estimate
            .objective
            .expect("square ops estimate the objective");
        let y = y_true
            .f_to_device(self.spec.device)?
            .f_reshape(theta_dev.size())?;
        let (loss, grad) = crate::fenchel_young::loss_and_grad(
            self.config().sense(),
            &theta_dev,
            &y,
            &objective,
            &grad_objective,
        )?;
        let device = theta.device();
        Ok((
            loss.f_to_device(device)?,
            grad.f_reshape(theta.size())?.f_to_device(device)?,
        ))
    }

    /// Draws the perturbed inputs of one call for the two-phase API: solve
    /// [`Draw::inputs`] anywhere, then hand the solutions to [`Draw::finish`]. Gives the
    /// results of a forward call with the same seed and call count.
    pub fn draw(&self, theta: &Tensor) -> Result<Draw> {
        let theta_dev = self.spec.check_theta(theta)?;
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        Draw::new(self.spec.clone(), theta_dev, call)
    }

    /// An error unless output shape = input shape, naming `what` needs it.
    pub fn require_square(&self, what: &str) -> Result<()> {
        self.spec.require_square(what)
    }

    /// Checks that a call on `batch` problems has sizes that can be expressed
    /// (batch × num_samples × numel within i64): the C layer calls it before it reads any
    /// caller buffer.
    pub fn check_batch(&self, batch: usize) -> Result<()> {
        self.spec.check_batch(batch)
    }

    fn estimate(&self, theta: &Tensor, want_jacobian: bool) -> Result<(usize, Tensor, Estimate)> {
        if let SolverKind::External = self.solver {
            return Err(Error::invalid(
                "this op has no solver (it was made for the two-phase API): use draw and finish",
            ));
        }
        let theta_dev = self.spec.check_theta(theta)?;
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let estimate = self.spec.run(
            &theta_dev,
            call,
            want_jacobian,
            Source::Solver(&self.solver),
        )?;
        Ok((theta_dev.size()[0] as usize, theta_dev, estimate))
    }
}

impl OpSpec {
    pub fn require_square(&self, what: &str) -> Result<()> {
        if self.input_shape == self.output_shape {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{what} needs output_shape == input_shape (a linear objective <theta, y>), got output {:?} and input {:?}",
            self.output_shape, self.input_shape
        )))
    }

    /// Checks theta's shape, kind and values; returns it as `[batch, d]` on the op's device.
    fn check_theta(&self, theta: &Tensor) -> Result<Tensor> {
        let size = theta.size();
        if size.len() != self.input_shape.len() + 1 || size[1..] != self.input_shape[..] {
            return Err(Error::invalid(format!(
                "theta must have shape [batch, {}], got {size:?}",
                self.input_shape
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let batch = size[0] as usize;
        self.check_batch(batch)?;
        check_floats(theta, "theta")?;
        Ok(theta
            .f_to_device(self.device)?
            .f_reshape([batch as i64, self.input_numel as i64])?)
    }

    fn check_batch(&self, batch: usize) -> Result<()> {
        let n = self.config.num_samples() as usize;
        checked_floats(
            &[batch, n, self.input_numel],
            "batch * num_samples * input_numel",
        )?;
        checked_floats(
            &[batch, n, self.output_numel],
            "batch * num_samples * output_numel",
        )?;
        Ok(())
    }

    pub(crate) fn output_tensor(
        &self,
        mean: &Tensor,
        batch: usize,
        device: Device,
    ) -> Result<Tensor> {
        Ok(mean
            .f_reshape(batched(batch, &self.output_shape))?
            .f_to_device(device)?)
    }

    pub(crate) fn output_and_tape(
        &self,
        estimate: Estimate,
        batch: usize,
        device: Device,
    ) -> Result<(Tensor, Tape)> {
        let output = self.output_tensor(&estimate.mean, batch, device)?;
        let objective = match &estimate.objective {
            Some((f, _)) => Some(f.f_to_kind(Kind::Float)?),
            None => None,
        };
        let jacobian = estimate.jacobian.expect("a Jacobian was requested");
        Ok((
            output,
            Tape::new(
                jacobian,
                objective,
                &self.input_shape,
                &self.output_shape,
                batch,
            ),
        ))
    }

    /// The tape form for `batch` problems, checked against the config's tape limit.
    fn tape_form(&self, batch: usize) -> Result<TapeForm> {
        let n = self.config.num_samples() as usize;
        let limit = self.config.max_tape_bytes();
        let per_problem = u128::from(limit) / 4 / (batch.max(1) as u128);
        let (form, floats) = TapeForm::choose(
            n,
            self.input_numel,
            self.output_numel,
            if limit == 0 { 0 } else { per_problem.max(1) },
        );
        let bytes = floats.saturating_mul(batch as u128).saturating_mul(4);
        if limit > 0 && bytes > u128::from(limit) {
            return Err(Error::invalid(format!(
                "the tape needs {bytes} bytes (batch {batch}, {} floats per problem), above max_tape_bytes {limit}",
                floats
            )));
        }
        if bytes > i64::MAX as u128 {
            return Err(Error::invalid(format!(
                "the tape would need {bytes} bytes, more than can be addressed"
            )));
        }
        Ok(form)
    }

    /// Samples per chunk: what fits in the config's chunk budget (even under antithetic
    /// pairs), at least one (two).
    pub(crate) fn rows_per_chunk(&self) -> usize {
        let (d, o) = (self.input_numel as u64, self.output_numel as u64);
        let row_bytes = 4 * (4 * d + 3 * o);
        let n = self.config.num_samples() as usize;
        let budget = match self.config.chunk_bytes() {
            0 if self.device == Device::Cpu => AUTO_CHUNK_BYTES.0,
            0 => AUTO_CHUNK_BYTES.1,
            bytes => bytes,
        };
        let rows = (budget / row_bytes).clamp(1, n as u64) as usize;
        if self.config.antithetic() {
            (rows & !1).max(2)
        } else {
            rows
        }
    }

    /// Samples per block of the host pipeline: a chunk ([`Self::rows_per_chunk`]), cut
    /// down to about 1/[`HOST_BLOCKS`] of a problem's samples (not below
    /// [`HOST_BLOCK_MIN_ROWS`]) so that solver threads share the work evenly, and to
    /// [`HOST_BLOCK_BYTES`] of buffers so that a block stays in cache, unless the block
    /// keeps Jacobian sums (`sums`): their output × input entries are then a per-block cost
    /// that the block's own work must outweigh. It does not depend on the number of
    /// threads, so neither do the results.
    pub(crate) fn rows_per_block(&self, sums: bool) -> usize {
        let n = self.config.num_samples() as usize;
        let share = n.div_ceil(HOST_BLOCKS).max(HOST_BLOCK_MIN_ROWS);
        let (d, o) = (self.input_numel as u64, self.output_numel as u64);
        let row_floats = 3 * d + o;
        let mut in_cache = (HOST_BLOCK_BYTES / (4 * row_floats)).max(1);
        if sums {
            in_cache = in_cache.max((o * d).div_ceil(row_floats));
        }
        let rows = self.rows_per_chunk().min(share).min(in_cache as usize);
        if self.config.antithetic() {
            (rows + (rows & 1)).min(self.rows_per_chunk())
        } else {
            rows
        }
    }

    /// The noise `[rows, d]` of samples `n0 .. n0 + rows` of problem `b` of a call and the
    /// perturbed inputs, on the op's device. With antithetic pairs, sample 2k + 1 is the
    /// negation of sample 2k (n0 and rows are then even).
    pub(crate) fn chunk(
        &self,
        stream: &Stream,
        theta_b: &Tensor,
        b: usize,
        n0: usize,
        rows: usize,
    ) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (d, n) = (self.input_numel, c.num_samples() as usize);
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()); // noise only
                                                                                   // CPU ops draw with the CPU sampler; CUDA ops (and CPU ops forced onto this path)
                                                                                   // draw with libtorch on their device
        let draw = |first: usize, count: usize| -> Result<Tensor> {
            if self.device == Device::Cpu && !c.libtorch_path() {
                c.noise().sample(stream, first as u64, count, threads)
            } else {
                c.noise()
                    .sample_on(stream, first as u64, count, self.device)
            }
        };
        let z = if c.antithetic() {
            let half =
                draw((b * n + n0) / 2 * d, rows / 2 * d)?.f_view([(rows / 2) as i64, d as i64])?;
            Tensor::f_stack(&[half.shallow_clone(), half.f_neg()?], 1)?
                .f_view([rows as i64, d as i64])?
        } else {
            draw((b * n + n0) * d, rows * d)?.f_view([rows as i64, d as i64])?
        };
        let x = c.perturbation().perturb(theta_b, &z, c.sigma())?;
        Ok((z, x))
    }

    /// Calls `f(b, n0, z, x)` for the chunks of samples of every problem of `theta`
    /// `[batch, d]` (on the device), in order: noise and perturbed inputs `[rows, d]`.
    pub(crate) fn for_each_chunk(
        &self,
        theta: &Tensor,
        stream: &Stream,
        mut f: impl FnMut(usize, usize, Tensor, Tensor) -> Result<()>,
    ) -> Result<()> {
        let n = self.config.num_samples() as usize;
        let per = self.rows_per_chunk();
        for b in 0..theta.size()[0] as usize {
            let theta_b = theta.f_narrow(0, b as i64, 1)?;
            for n0 in (0..n).step_by(per) {
                let (z, x) = self.chunk(stream, &theta_b, b, n0, per.min(n - n0))?;
                f(b, n0, z, x)?;
            }
        }
        Ok(())
    }

    /// One forward call (number `call` of its op) on `theta` `[batch, d]` (on the device).
    pub(crate) fn run(
        &self,
        theta: &Tensor,
        call: u64,
        want_jacobian: bool,
        source: Source<'_>,
    ) -> Result<Estimate> {
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
        let baseline = if c.antithetic() {
            Baseline::None
        } else {
            c.baseline()
        };
        let clean = if want_jacobian && baseline == Baseline::CleanInput {
            let rows = match source {
                Source::Provided(all) => {
                    Solutions::Dense(provided(all, batch * n, batch, o, self.device)?)
                }
                Source::Solver(solver) => self.solve(solver, theta)?,
            };
            Some(rows.dense(o as i64)?)
        } else {
            None
        };
        let square = self.input_shape == self.output_shape;
        let host = matches!(
            source,
            Source::Solver(SolverKind::Host(_) | SolverKind::Builtin(_)) | Source::Provided(_)
        ) && self.device == Device::Cpu
            && !c.libtorch_path();
        // the host pipeline's tapes keep the samples' solutions and draw the scores again
        let redraw = (host && u32::try_from(o).is_ok()).then_some(Redraw {
            stream,
            noise: c.noise(),
            antithetic: c.antithetic(),
            score_is_z: c.perturbation() == crate::perturbation::Perturbation::Multiplicative,
            n,
            d,
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
            square,
            self.device,
        )?;
        if let (
            Source::Solver(SolverKind::Builtin(Builtin::Argmax)),
            Device::Cpu,
            None | Some(TapeForm::Sums),
            false,
        ) = (&source, self.device, form, c.libtorch_path())
        {
            if d * d <= crate::fused_argmax::MAX_SUMS {
                let kernel = Kernel {
                    stream: &stream,
                    noise: c.noise(),
                    perturbation: c.perturbation(),
                    sigma: c.sigma() as f32,
                    antithetic: c.antithetic(),
                    jacobian: form.is_some(),
                    last: *self.input_shape.last().expect("built-ins have rank >= 1") as usize,
                };
                let cores = std::thread::available_parallelism().map_or(1, |t| t.get());
                for (b, theta_b) in host_floats(theta)?.chunks_exact(d).enumerate() {
                    acc.add_sums(b as i64, &kernel.problem(theta_b, b, n, cores))?;
                }
                return acc.finish(n, baseline, clean.as_ref(), theta);
            }
        }
        if host {
            self.run_on_host(theta, &stream, source, &mut acc)?;
            return acc.finish(n, baseline, clean.as_ref(), theta);
        }
        self.for_each_chunk(theta, &stream, |b, n0, z, x| {
            let rows = z.size()[0] as usize;
            let y = match source {
                Source::Solver(solver) => self.solve(solver, &x)?,
                Source::Provided(all) => {
                    Solutions::Dense(provided(all, b * n + n0, rows, o, self.device)?)
                }
            };
            let s = if acc.wants_scores() {
                Some(c.perturbation().score(c.noise(), &z)?)
            } else {
                None
            };
            acc.add(b as i64, n0 as i64, &z, &x, s.as_ref(), &y)
        })?;
        acc.finish(n, baseline, clean.as_ref(), theta)
    }

    /// The samples of a CPU op whose solutions come from the host (a callback, a built-in
    /// other than the fused argmax, or the two-phase API), in Rust on host buffers: each
    /// block of samples is drawn, perturbed, solved and summed on one of the solver
    /// threads, and the blocks are added in their order (so the results do not depend on
    /// the number of threads). No libtorch parallel
    /// region runs between solver calls, where its OpenMP workers would spin on the cores
    /// the solver threads need.
    fn run_on_host(
        &self,
        theta: &Tensor,
        stream: &Stream,
        source: Source<'_>,
        acc: &mut Accumulator,
    ) -> Result<()> {
        let c = &self.config;
        let (d, o, n) = (
            self.input_numel,
            self.output_numel,
            c.num_samples() as usize,
        );
        let multiplicative = c.perturbation() == crate::perturbation::Perturbation::Multiplicative;
        let sums_form = acc.form() == Some(TapeForm::Sums);
        let keep_solutions = acc.keeps_solutions();
        let per = self.rows_per_block(sums_form);
        let per_problem = n.div_ceil(per);
        let theta_host = host_floats(theta)?;
        let batch = theta_host.len() / d.max(1);
        // blocks of every problem, problem by problem: threads share out the whole batch
        let blocks = batch * per_problem;
        let builtin = matches!(source, Source::Solver(SolverKind::Builtin(_)));
        // callbacks get the config's solver threads; built-ins use every core
        let threads = if builtin {
            std::thread::available_parallelism().map_or(1, |t| t.get())
        } else {
            c.effective_threads()
        };
        let threads = threads.clamp(1, blocks.max(1));
        let last = self.input_shape.last().map_or(1, |&l| l as usize);
        // per solver thread: noise, scores, perturbed inputs, solutions
        let mut scratch: Vec<[Vec<f32>; 4]> = (0..threads)
            .map(|_| {
                [
                    vec![0f32; per * d],
                    vec![0f32; per * d],
                    vec![0f32; per * d],
                    vec![0f32; per * o],
                ]
            })
            .collect();
        type Block = (ProblemSums, Option<SolutionRows>);
        let work = |g: usize, buffers: &mut [Vec<f32>; 4]| -> Result<Block> {
            let (b, k) = (g / per_problem, g % per_problem);
            let theta_b = &theta_host[b * d..(b + 1) * d];
            let (n0, rows) = (k * per, per.min(n - k * per));
            let [z, s, x, y] = buffers;
            let (z, s, x, y) = (
                &mut z[..rows * d],
                &mut s[..rows * d],
                &mut x[..rows * d],
                &mut y[..rows * o],
            );
            // scores only for Jacobian sums (a tape of solutions draws them again later)
            let s: &mut [f32] = if sums_form { s } else { &mut [] };
            c.noise().draw_samples(
                stream,
                c.antithetic(),
                multiplicative,
                (b, n, n0, d),
                z,
                s,
                1,
            );
            c.perturbation()
                .perturb_host(theta_b, z, c.sigma() as f32, x);
            match source {
                Source::Solver(SolverKind::Host(solver)) => {
                    solve_rows(&**solver, x, y, rows, d, o, 1)?
                }
                Source::Solver(SolverKind::Builtin(builtin)) => builtin.solve_host(x, last, y),
                Source::Provided(all) => {
                    let first = b * n + n0;
                    check_provided(&all[first * o..(first + rows) * o], first, o)?;
                    y.copy_from_slice(&all[first * o..(first + rows) * o]);
                }
                Source::Solver(_) => unreachable!("only host solutions take the host path"),
            }
            let mut sums = ProblemSums::zeros(d, o, sums_form, multiplicative);
            sums.add_rows(d, z, x, s, y, c.sigma() as f32);
            // a tape that keeps the samples' solutions gets this block's
            let solutions = if keep_solutions {
                let mut rows = SolutionRows::new(o);
                rows.push(y)?;
                Some(rows)
            } else {
                None
            };
            Ok((sums, solutions))
        };
        let mut total = ProblemSums::zeros(d, o, sums_form, multiplicative);
        run_blocks(blocks, &mut scratch, work, |g, (sums, solutions)| {
            total.add(&sums);
            if let Some(solutions) = solutions {
                acc.add_solutions(solutions)?;
            }
            if g % per_problem == per_problem - 1 {
                // the last block of a problem: its sums go to the accumulator (in place, no
                // libtorch operation while the solver threads work)
                acc.add_sums((g / per_problem) as i64, &total)?;
                total = ProblemSums::zeros(d, o, sums_form, multiplicative);
            }
            Ok(())
        })
    }

    /// Solves the problems `x` `[rows, d]` with the op's own solver.
    fn solve(&self, solver: &SolverKind, x: &Tensor) -> Result<Solutions> {
        match solver {
            SolverKind::Builtin(builtin) => {
                let x = x.f_view(batched(x.size()[0] as usize, &self.input_shape).as_slice())?;
                builtin.solve(
                    &x,
                    *self.input_shape.last().expect("built-ins have rank >= 1"),
                )
            }
            SolverKind::Host(host) => {
                let y = solve_host(
                    &**host,
                    x,
                    self.output_numel,
                    self.config.effective_threads(),
                )?;
                Ok(Solutions::Dense(y.f_to_device(self.device)?))
            }
            SolverKind::External => unreachable!("external ops are refused before solving"),
        }
    }
}

/// Rows `first .. first + rows` of provided solutions `[*, o]`, checked finite, on `device`.
fn provided(all: &[f32], first: usize, rows: usize, o: usize, device: Device) -> Result<Tensor> {
    let part = &all[first * o..(first + rows) * o];
    check_provided(part, first, o)?;
    Ok(Tensor::f_from_slice(part)?
        .f_view([rows as i64, o as i64])?
        .f_to_device(device)?)
}

/// NON_FINITE_INPUT naming the first non-finite value of provided solution rows that start
/// at row `first`.
fn check_provided(part: &[f32], first: usize, o: usize) -> Result<()> {
    match part.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::new(
            Status::NonFiniteInput,
            format!(
                "solutions[{}][{}] is {}; solutions must be finite",
                first + i / o,
                i % o,
                part[i]
            ),
        )),
    }
}

/// The values of a float32 tensor, flattened, on the host.
pub(crate) fn host_floats(t: &Tensor) -> Result<Vec<f32>> {
    let mut out = vec![0f32; t.numel()];
    let host = t.f_to_device(Device::Cpu)?.f_contiguous()?;
    host.f_view([-1])?.f_copy_data(&mut out, t.numel())?;
    Ok(out)
}

/// Calls a host solver on the rows of `x` (copied to the host if needed) and returns the
/// solutions `[rows, o]` on the CPU.
fn solve_host(solver: &dyn Solver, x: &Tensor, o: usize, threads: usize) -> Result<Tensor> {
    let x = x.f_to_device(Device::Cpu)?.f_contiguous()?;
    let rows = x.size()[0] as usize;
    let d = x.numel() / rows.max(1);
    // initialized before it is viewed as a slice (solve_rows then fills it with NaN)
    let y = Tensor::f_zeros([rows as i64, o as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: x and y are contiguous float32 CPU tensors of rows·d and rows·o initialized
    // elements that outlive these slices; y is fresh, so not aliased.
    let (xs, ys) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * d),
            std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, rows * o),
        )
    };
    solve_rows(solver, xs, ys, rows, d, o, threads)?;
    Ok(y)
}

/// Calls the solver on `rows` problems, split into contiguous slices over `threads`
/// threads, and checks that every output is finite. Outputs are pre-filled with NaN so
/// that a solver that writes nothing is caught.
fn solve_rows(
    solver: &dyn Solver,
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    d: usize,
    o: usize,
    threads: usize,
) -> Result<()> {
    y.fill(f32::NAN);
    let threads = threads.clamp(1, rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    let result = if threads == 1 {
        solver.solve(x, rows, y)
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = x
                .chunks(per * d)
                .zip(y.chunks_mut(per * o))
                .map(|(xs, ys)| scope.spawn(move || solver.solve(xs, xs.len() / d, ys)))
                .collect();
            let mut first = Ok(());
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|payload| std::panic::resume_unwind(payload));
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    };
    result.map_err(|msg| Error::new(Status::SolverFailed, format!("the solver failed: {msg}")))?;
    // one vectorizable pass (all exponent bits set: NaN or infinite), then the position
    let exponent = 0x7f80_0000u32;
    let any_non_finite = y
        .iter()
        .fold(false, |any, v| any | (v.to_bits() & exponent == exponent));
    if let Some(i) = any_non_finite
        .then(|| y.iter().position(|v| !v.is_finite()))
        .flatten()
    {
        return Err(Error::new(
            Status::SolverFailed,
            format!(
                "the solver wrote {} at output {} of perturbed problem {}; outputs must be finite (was every output written?)",
                y[i],
                i % o,
                i / o
            ),
        ));
    }
    Ok(())
}
