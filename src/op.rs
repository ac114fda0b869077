//! A perturbed optimizer: a solver, its problem shapes, and a config; the public entry
//! points of a forward call (the work is in `crate::pipeline`).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::estimate::Estimate;
use crate::interrupt::Interrupter;
use crate::kernels::builtin::Builtin;
use crate::pipeline::{Additions, CallCache, HostSolver, OpSpec, SolverKind, Source, Wants};
use crate::pool::Pool;
use crate::shape::numel;
use crate::solver::{DeviceSolver, Solver, WorkerSolver};
use crate::tape::{output_and_tape, Tape};
use crate::two_phase::Draw;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tch::{Device, Tensor};

mod host_rows;
pub(crate) use host_rows::PoolAddition;

/// XORed into the seed for the stream that decides whether a pool-based loss solves its
/// batch (apart from the noise's and the samples' decisions).
const REFRESH_KEY: u64 = 0x706f_6f6c_7265_6672; // "poolrefr"

/// y_σ(θ) = E[y*(θ + σZ)] for a black-box solver y*, with its Monte-Carlo gradient.
///
/// `forward` may be called from several threads at once. Each call draws fresh noise: the
/// draws are a pure function of (seed, number of earlier forward calls on this op; a call
/// on no problem does not count).
pub struct PerturbedOp {
    spec: Arc<OpSpec>,
    /// Under `"auto"`, a built-in op put on a GPU also runs on the CPU: small calls go
    /// there (see [`crate::device::small_for_the_gpu`]).
    cpu_twin: Option<Arc<OpSpec>>,
    solver: SolverKind,
    calls: AtomicU64,
    interrupts: Interrupter,
    /// The solution pool its samples may be answered from, and that its solves add to.
    /// (Never locked at a fork: a child can set and read it.)
    pool: crate::fork_safe::ForkSafeMutex<Option<Arc<Pool>>>,
    /// Calls of the pool-based losses so far (each decides whether it solves its batch).
    refreshes: AtomicU64,
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
        let host = HostSolver::plain(solver);
        PerturbedOp::with_solver(config, input_shape, output_shape, host.into())
    }

    /// [`PerturbedOp::new`] for the C layer, which passes theta as a tensor of its own (a
    /// copy) or as the caller's buffer, borrowed for the call, which the C contract keeps
    /// unchanged until the call returns: calls read it in place while the callback runs.
    pub(crate) fn new_with_private_theta(
        config: &Config,
        shapes: (&[i64], &[i64]),
        solver: impl Solver + 'static,
    ) -> Result<PerturbedOp> {
        let host = HostSolver::plain(solver).with_private_theta();
        PerturbedOp::with_solver(config, shapes.0, shapes.1, host.into())
    }

    /// An op over a solver with state per worker, run by the op's own persistent worker
    /// threads (the config's solver threads; 0: one per core within `max_threads`): worker
    /// w is always the same thread, its `init` runs there before its first solve, its
    /// `fini` when the op is dropped, and it never runs two solves at once (concurrent
    /// calls on the op take turns on the workers). Results are the same for any number of
    /// workers, bit for bit.
    pub fn with_workers(
        config: &Config,
        input_shape: &[i64],
        output_shape: &[i64],
        solver: impl WorkerSolver + 'static,
    ) -> Result<PerturbedOp> {
        PerturbedOp::with_workers_of(config, (input_shape, output_shape), solver, false)
    }

    /// [`PerturbedOp::with_workers`] for the C layer, whose theta does not change while a
    /// call runs (see [`PerturbedOp::new_with_private_theta`]).
    pub(crate) fn with_workers_private_theta(
        config: &Config,
        shapes: (&[i64], &[i64]),
        solver: impl WorkerSolver + 'static,
    ) -> Result<PerturbedOp> {
        PerturbedOp::with_workers_of(config, shapes, solver, true)
    }

    fn with_workers_of(
        config: &Config,
        (input_shape, output_shape): (&[i64], &[i64]),
        solver: impl WorkerSolver + 'static,
        private_theta: bool,
    ) -> Result<PerturbedOp> {
        // the settings first: no thread starts for an op that is refused
        PerturbedOp::with_solver(config, input_shape, output_shape, SolverKind::External)?;
        let host = HostSolver::with_workers(solver, config.effective_threads())?;
        let host = if private_theta {
            host.with_private_theta()
        } else {
            host
        };
        PerturbedOp::with_solver(config, input_shape, output_shape, host.into())
    }

    /// An op over a solver that works on the op's device memory (see [`DeviceSolver`]):
    /// the perturbed rows are drawn, solved and summed on the device, never copied to the
    /// host. On a CPU op the solver gets host memory through the same pipeline. Under
    /// `"auto"` such an op goes to the GPU when there is one.
    pub fn new_device(
        config: &Config,
        input_shape: &[i64],
        output_shape: &[i64],
        solver: impl DeviceSolver + 'static,
    ) -> Result<PerturbedOp> {
        PerturbedOp::with_solver(
            config,
            input_shape,
            output_shape,
            SolverKind::Device(Arc::new(solver)),
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
        if config.sense() != crate::settings::Sense::Maximize {
            return Err(Error::invalid(
                "the built-in solvers maximize <theta, y> (argmax, top-k, ranks of the largest): an op over one \
                 needs sense maximize (to minimize, negate theta, or give a solver callback)",
            ));
        }
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
        let host_solver = !matches!(solver, SolverKind::Builtin(_) | SolverKind::Device(_));
        let device = config.device().resolve_for(host_solver)?;
        let spec = OpSpec {
            config: config.clone(),
            device,
            input_shape: input_shape.to_vec(),
            output_shape: output_shape.to_vec(),
            input_numel,
            output_numel,
            chunked: matches!(solver, SolverKind::Device(_)),
            builtin_argmax: matches!(solver, SolverKind::Builtin(Builtin::Argmax)),
            solver_rows: Arc::default(),
        };
        let twin = config.device() == crate::DeviceSpec::Auto
            && device != Device::Cpu
            && matches!(solver, SolverKind::Builtin(_));
        let cpu_twin = twin.then(|| {
            Arc::new(OpSpec {
                device: Device::Cpu,
                ..spec.clone()
            })
        });
        Ok(PerturbedOp {
            spec: Arc::new(spec),
            cpu_twin,
            solver,
            calls: AtomicU64::new(0),
            interrupts: Interrupter::default(),
            pool: crate::fork_safe::ForkSafeMutex::new(None)?,
            refreshes: AtomicU64::new(0),
        })
    }

    /// Gives the op a solution pool (None: takes it away). Its forward and Fenchel-Young
    /// calls, and I-MLE's perturbed samples (its forward's, and those its VJPs move by
    /// ±λ·grad_output), then answer each perturbed sample from the pool with probability
    /// 1 − solve_ratio (see [`Config::set_solve_ratio`]): the pool member y of best
    /// ⟨x, y⟩ for the sample's input x in the op's sense,
    /// which is y*(x) itself whenever
    /// the pool holds it; the other samples are solved. The solver's solutions join the
    /// pool: a forward or Fenchel-Young call's once the call has succeeded (those new to
    /// the pool when it began, the capacity that occur last in row order, added by
    /// [`Pool::add_rows`]' rule; meanwhile the call keeps at most the capacity), those of
    /// SPO+, DBB and PG once the whole call has succeeded (one addition of the call's
    /// solutions in order: a call that fails adds nothing), those of
    /// [`PerturbedOp::solve`] and the pool losses' refreshes as each solve succeeds. The
    /// estimate is then the mean over samples of those answers: exact where the pool holds
    /// each answered sample's optimum, biased towards the pool's members where it does
    /// not (a sample's answer is never better than its optimum).
    ///
    /// The pool's output shape must be the op's, and the objective linear: output shape
    /// = input shape, a built-in solver, or a callback declared linear
    /// ([`Config::set_linear_objective`]). An op made for the two-phase API is refused.
    /// Calls already running keep the pool they started with.
    pub fn set_pool(&self, pool: Option<Arc<Pool>>) -> Result<()> {
        if let Some(pool) = &pool {
            if pool.output_shape() != self.output_shape() {
                return Err(Error::invalid(format!(
                    "the pool's output shape {:?} is not the op's {:?}",
                    pool.output_shape(),
                    self.output_shape()
                )));
            }
            self.require_square("a solution pool")?;
            match &self.solver {
                SolverKind::External => {
                    return Err(Error::invalid(
                        "an op made for the two-phase API solves nothing: a pool cannot answer for it",
                    ))
                }
                SolverKind::Builtin(_) => {}
                _ if self.config().linear_objective() => {}
                _ => {
                    return Err(Error::invalid(
                        "a solution pool answers a sample with its best member for <x, y>: declare the solver's objective linear first (pert_config_set_linear_objective / Config::set_linear_objective)",
                    ))
                }
            }
        }
        let old = self.pool.with(|slot| std::mem::replace(slot, pool));
        drop(old); // (outside the lock: the last reference frees the pool)
        Ok(())
    }

    /// The op's solution pool, if it has one.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.pool.with(|slot| slot.clone())
    }

    /// The number of rows the op's solver has solved so far (all calls, all threads):
    /// perturbed samples (those answered from a pool aside), clean-input rows, and the
    /// rows of [`PerturbedOp::solve`] and of the methods.
    pub fn solver_rows(&self) -> u64 {
        self.spec
            .solver_rows
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The sense of the objective ⟨x, y⟩ the solver optimizes: the config's (a built-in's
    /// op is made only with maximize, the built-ins' sense).
    pub(crate) fn objective_sense(&self) -> crate::settings::Sense {
        self.config().sense()
    }

    /// Whether this call of a pool-based loss solves its batch first: with probability
    /// solve_ratio, from the op's stream of refreshes (seed ^ its key, the number of
    /// earlier such calls).
    pub(crate) fn pool_refresh(&self) -> bool {
        let k = self.refreshes.fetch_add(1, Ordering::Relaxed);
        let c = self.config();
        let stream = crate::rng::Stream::new(c.seed() ^ REFRESH_KEY, 0);
        u64::from(stream.block(k)[0]) < crate::rng::chance_threshold(c.solve_ratio())
    }

    /// Stops the forward and Fenchel-Young calls running on this op now, from any thread:
    /// each fails with [`crate::Status::Interrupted`] at its next block of samples (or
    /// when its running solver call returns), having written nothing. Calls that start
    /// afterwards are not affected.
    pub fn interrupt(&self) {
        self.interrupts.interrupt();
    }

    /// The op's config (a copy made at construction).
    pub fn config(&self) -> &Config {
        &self.spec.config
    }
    /// The device the op computes on (under `"auto"`, a built-in op on a GPU runs its
    /// small calls on the CPU: see [`crate::DeviceSpec::Auto`]).
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
        let (y, additions) = self.forward_deferred(theta)?;
        additions.commit()?;
        Ok(y)
    }

    /// [`PerturbedOp::forward`], its pool's additions left to commit.
    pub(crate) fn forward_deferred(&self, theta: &Tensor) -> Result<(Tensor, Additions)> {
        let (batch, _, estimate, additions) = self.estimate(theta, Wants::default())?;
        let y = self
            .spec
            .output_tensor(&estimate.mean, batch, theta.device())?;
        Ok((y, additions))
    }

    /// As [`PerturbedOp::forward`], and the tape for the backward pass (on the device the
    /// call ran on; its products take and give tensors on any device).
    pub fn forward_with_tape(&self, theta: &Tensor) -> Result<(Tensor, Tape)> {
        let (y, tape, additions) = self.forward_with_tape_deferred(theta)?;
        additions.commit()?;
        Ok((y, tape))
    }

    /// [`PerturbedOp::forward_with_tape`], its pool's additions left to commit.
    pub(crate) fn forward_with_tape_deferred(
        &self,
        theta: &Tensor,
    ) -> Result<(Tensor, Tape, Additions)> {
        let wants = Wants {
            jacobian: true,
            input_sums: false,
        };
        let (batch, _, estimate, additions) = self.estimate(theta, wants)?;
        let (y, tape) = output_and_tape(&self.spec, estimate, batch, theta.device())?;
        Ok((y, tape, additions))
    }

    /// y*(x): the op's solver on each problem of `x` (`[batch, *input_shape]`, float32, any
    /// device), with no noise, by the op's threads, workers and device as in a forward call
    /// (`SolveInfo::clean` is set); the result has shape `[batch, *output_shape]`, on the
    /// device of `x`. It draws no noise, so later forward calls draw what they would have.
    /// The whole batch is one solve (over the solver threads or workers; not cut into
    /// chunks): an interrupt during it fails the call when the solver calls return.
    pub fn solve(&self, x: &Tensor) -> Result<Tensor> {
        let stop = self.interrupts.stop();
        let _cap = crate::intraop::cap(self.config().max_threads());
        if let SolverKind::External = self.solver {
            return Err(Error::invalid(
                "this op has no solver (it was made for the two-phase API): solve its draws' inputs yourself",
            ));
        }
        let spec = self.spec_here()?;
        let x_dev = spec.check_input(x, "x", 1)?;
        // a copy when the caller's solver runs while it is read (a Rust solver could
        // reach the caller's tensor; a C callback's op reads the caller's rows, which the
        // C contract keeps unchanged until the call returns)
        let x_dev = match &self.solver {
            SolverKind::Host(h) if !h.theta_is_private() => crate::tensors::copy(&x_dev)?,
            _ => x_dev,
        };
        let batch = x_dev.size()[0] as usize;
        if batch == 0 {
            let empty = Tensor::f_zeros(
                [0, spec.output_numel as i64],
                (tch::Kind::Float, x.device()),
            )?;
            return spec.output_tensor(&empty, 0, x.device());
        }
        stop.check()?;
        let y = spec
            .solve(&self.solver, &x_dev, spec.rows_at(true, 0, batch))?
            .dense(spec.output_numel as i64)?;
        // solver calls are not cut short: an interrupt while they ran fails the call here
        stop.check()?;
        // the solutions join the pool once the result is made (a call that fails adds
        // nothing)
        let out = spec.output_tensor(&y, batch, x.device())?;
        if self.pool().is_some() {
            self.grow_pool(&crate::tensors::host_floats(&y)?)?;
        }
        Ok(out)
    }

    /// The op's spec (its identity for records of its calls, such as I-MLE's).
    pub(crate) fn spec(&self) -> &Arc<OpSpec> {
        &self.spec
    }

    /// The spec a call on `theta` runs with: the CPU twin for a small call, else the op's
    /// ([`PerturbedOp::spec_here`] in a child forked after its parent started CUDA); refused
    /// under a CUDA graph capture, as there.
    fn spec_for(&self, theta: &Tensor) -> Result<&Arc<OpSpec>> {
        if crate::cuda_libraries::forked_after_cuda() {
            return self.spec_here();
        }
        let spec = match &self.cpu_twin {
            Some(cpu) => {
                let c = &self.spec.config;
                let batch = theta.size().first().map_or(0, |&b| b.max(0) as u128);
                let values = batch * u128::from(c.num_samples()) * self.spec.input_numel as u128;
                if crate::device::small_for_the_gpu(values, c.library_threads()) {
                    cpu
                } else {
                    &self.spec
                }
            }
            None => &self.spec,
        };
        crate::cuda_stream::check_usable(spec.device)?;
        Ok(spec)
    }

    /// The spec of a call that always runs on the op's device (a solve, the methods'
    /// solves): the op's, except in a child forked after its parent started CUDA, where
    /// CUDA cannot be used: there an `"auto"` op runs on its CPU twin, and a CUDA op
    /// without one fails (DEVICE_UNAVAILABLE) instead of with libtorch's error from deep
    /// inside the call; and on a CUDA device whose current stream captures a CUDA graph,
    /// the call fails (DEVICE_UNAVAILABLE) before anything is enqueued.
    pub(crate) fn spec_here(&self) -> Result<&Arc<OpSpec>> {
        if !(self.spec.device.is_cuda() && crate::cuda_libraries::forked_after_cuda()) {
            crate::cuda_stream::check_usable(self.spec.device)?;
            return Ok(&self.spec);
        }
        self.cpu_twin.as_ref().ok_or_else(|| {
            Error::new(
                crate::Status::DeviceUnavailable,
                format!(
                    "this op computes on CUDA device {}, but {}: make the op in the child with \
                     device \"auto\" or \"cpu\", or start the child with spawn",
                    match self.spec.device {
                        tch::Device::Cuda(index) => index,
                        _ => 0,
                    },
                    crate::cuda_libraries::FORKED_AFTER_CUDA
                ),
            )
        })
    }

    /// The Fenchel-Young loss `[batch]` of `theta` against targets `y_true` (both
    /// `[batch, *input_shape]`; the op's output shape must equal its input shape), and its
    /// gradient with respect to theta, from one forward call's draws. See
    /// [`crate::fenchel_young`] for the formulas per sense and perturbation.
    pub fn fenchel_young(&self, theta: &Tensor, y_true: &Tensor) -> Result<(Tensor, Tensor)> {
        let (loss, grad, _, additions) = self.fenchel_young_call(theta, y_true, false)?;
        additions.commit()?;
        Ok((loss, grad))
    }

    /// [`PerturbedOp::fenchel_young`], and the lower bound `[batch]` of each problem's loss
    /// that the call's own draws give for an exact solver and a feasible target:
    /// sign·⟨x̄ − θ, y_true⟩, x̄ the call's mean perturbed input (sign −1 when minimizing).
    /// A loss below it, beyond rounding, means the sense is wrong, the solver is not
    /// exact, or the target is infeasible (see [`crate::fenchel_young`]).
    pub fn fenchel_young_with_bound(
        &self,
        theta: &Tensor,
        y_true: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (loss, grad, bound, additions) = self.fenchel_young_call(theta, y_true, true)?;
        additions.commit()?;
        Ok((loss, grad, bound.expect("the call kept its input sums")))
    }

    /// The Fenchel-Young loss, gradient and (with `input_sums`) bound, the pool's additions
    /// left to commit.
    pub(crate) fn fenchel_young_call(
        &self,
        theta: &Tensor,
        y_true: &Tensor,
        input_sums: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>, Additions)> {
        let _cap = crate::intraop::cap(self.config().max_threads());
        self.spec.require_square("the Fenchel-Young loss")?;
        crate::fenchel_young::check_targets(&theta.size(), y_true)?;
        let wants = Wants {
            jacobian: false,
            input_sums,
        };
        let (_, theta_dev, estimate, additions) = self.estimate(theta, wants)?;
        let (loss, grad, bound) = crate::fenchel_young::from_estimate(
            (self.config().sense(), self.config().sigma()),
            &theta_dev,
            y_true,
            estimate,
        )?;
        let device = theta.device();
        Ok((
            loss.f_to_device(device)?,
            grad.f_reshape(theta.size())?.f_to_device(device)?,
            bound.map(|b| b.f_to_device(device)).transpose()?,
            additions,
        ))
    }

    /// Draws the perturbed inputs of one call for the two-phase API: solve
    /// [`Draw::inputs`] anywhere, then hand the solutions to [`Draw::finish`]. Gives the
    /// results of a forward call with the same seed and call count (of an op without a
    /// pool: a draw's inputs are all the caller's to solve, none answered from a pool).
    pub fn draw(&self, theta: &Tensor) -> Result<Draw> {
        let _cap = crate::intraop::cap(self.config().max_threads());
        // the draw keeps theta past this call: its own copy, never the caller's storage
        // on the spec a forward call of theta would use, so that finish gives its results
        let spec = self.spec_for(theta)?;
        let theta_dev = crate::tensors::copy(&spec.check_theta(theta)?)?;
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        Draw::new(spec.clone(), theta_dev, call)
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

    /// One forward call's estimate, and the solutions it adds to the op's pool (to commit
    /// once everything else of the call has succeeded).
    fn estimate(
        &self,
        theta: &Tensor,
        wants: Wants,
    ) -> Result<(usize, Tensor, Estimate, Additions)> {
        let stop = self.interrupts.stop();
        let _cap = crate::intraop::cap(self.config().max_threads());
        if let SolverKind::External = self.solver {
            return Err(Error::invalid(
                "this op has no solver (it was made for the two-phase API): use draw and finish",
            ));
        }
        let spec = self.spec_for(theta)?;
        let theta_dev = spec.check_theta(theta)?;
        // a call on no problem draws nothing: it does not count (so later draws do not
        // depend on whether an empty call asked for a tape)
        let call = if theta_dev.size()[0] == 0 {
            self.calls.load(Ordering::Relaxed)
        } else {
            self.calls.fetch_add(1, Ordering::Relaxed)
        };
        let cache = self.pool().map(|pool| {
            let c = self.config();
            CallCache::new(
                pool,
                (c.seed(), call),
                c.solve_ratio(),
                self.objective_sense(),
            )
        });
        let source = (Source::Solver(&self.solver), cache.as_ref());
        let estimate = spec.run(&theta_dev, call, wants, source, stop)?;
        // solver calls are not cut short: an interrupt during the last of them (after the
        // run's last check between blocks) fails the call here, as any other
        stop.check()?;
        Ok((
            theta_dev.size()[0] as usize,
            theta_dev,
            estimate,
            Additions(cache.into_iter().collect()),
        ))
    }
}
