//! A perturbed optimizer: a solver, its problem shapes, and a config.

use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::estimator::{Accumulator, Baseline, Estimate};
use crate::noise::Noise;
use crate::rng::Stream;
use crate::shape::{batched, checked_product, numel};
use crate::solver::Solver;
use crate::tape::Tape;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Upper bound on the host memory of one chunk of perturbed inputs and solutions.
const CHUNK_BYTES: usize = 8 << 20;

/// y_σ(θ) = E[y*(θ + σZ)] for a black-box solver y*, with its Monte-Carlo gradient.
///
/// `forward` may be called from several threads at once. Each call draws fresh noise: the
/// draws are a pure function of (seed, number of earlier forward calls on this op).
pub struct PerturbedOp {
    config: Config,
    device: Device,
    input_shape: Vec<i64>,
    output_shape: Vec<i64>,
    input_numel: usize,
    output_numel: usize,
    solver: Arc<dyn Solver>,
    calls: AtomicU64,
}

impl std::fmt::Debug for PerturbedOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerturbedOp")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("input_shape", &self.input_shape)
            .field("output_shape", &self.output_shape)
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
        let input_numel = numel(input_shape, "input_shape")?;
        let output_numel = numel(output_shape, "output_shape")?;
        config.validate()?;
        let device = config.device().resolve()?;
        Ok(PerturbedOp {
            config: config.clone(),
            device,
            input_shape: input_shape.to_vec(),
            output_shape: output_shape.to_vec(),
            input_numel,
            output_numel,
            solver: Arc::new(solver),
            calls: AtomicU64::new(0),
        })
    }

    /// The op's config (a copy made at construction).
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The device the op computes on.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Shape of one problem's input.
    pub fn input_shape(&self) -> &[i64] {
        &self.input_shape
    }
    /// Shape of one problem's output.
    pub fn output_shape(&self) -> &[i64] {
        &self.output_shape
    }
    /// Elements of one problem's input.
    pub fn input_numel(&self) -> usize {
        self.input_numel
    }
    /// Elements of one problem's output.
    pub fn output_numel(&self) -> usize {
        self.output_numel
    }

    /// y_σ(θ) for `theta` of shape `[batch, *input_shape]` (float32, any device); the result
    /// has shape `[batch, *output_shape]`, on the device of `theta`.
    pub fn forward(&self, theta: &Tensor) -> Result<Tensor> {
        let (batch, _, estimate) = self.estimate(theta, false)?;
        self.output_tensor(&estimate.mean, batch, theta.device())
    }

    /// As [`PerturbedOp::forward`], and the tape for the backward pass.
    pub fn forward_with_tape(&self, theta: &Tensor) -> Result<(Tensor, Tape)> {
        let (batch, _, estimate) = self.estimate(theta, true)?;
        let output = self.output_tensor(&estimate.mean, batch, theta.device())?;
        let objective = match &estimate.objective {
            Some(f) => Some(Tensor::f_from_slice(f)?.f_to_kind(Kind::Float)?),
            None => None,
        };
        let jacobian = estimate.jacobian.expect("a Jacobian was requested");
        Ok((output, Tape::new(jacobian, objective, &self.input_shape, &self.output_shape, batch)))
    }

    /// The Fenchel-Young loss `[batch]` of `theta` against targets `y_true` (both
    /// `[batch, *input_shape]`; the op's output shape must equal its input shape), and its
    /// gradient with respect to theta, from one forward call's draws. See
    /// [`crate::fenchel_young`] for the formulas per sense and perturbation.
    pub fn fenchel_young(&self, theta: &Tensor, y_true: &Tensor) -> Result<(Tensor, Tensor)> {
        self.require_square("the Fenchel-Young loss")?;
        if y_true.size() != theta.size() {
            return Err(Error::invalid(format!(
                "y_true must have the shape of theta {:?}, got {:?}",
                theta.size(),
                y_true.size()
            )));
        }
        let y_vec = host_vec(y_true, "y_true")?;
        let (batch, theta_vec, estimate) = self.estimate(theta, false)?;
        let (objective, grad_objective) = (
            estimate.objective.expect("square ops estimate the objective"),
            estimate.grad_objective.expect("square ops estimate its gradient"),
        );
        let (loss, grad) =
            crate::fenchel_young::loss_and_grad(self.config.sense(), &theta_vec, &y_vec, &objective, &grad_objective);
        let device = theta.device();
        let loss = Tensor::f_from_slice(&loss)?.f_to_device(device)?;
        let grad = Tensor::f_from_slice(&grad)?.f_reshape(batched(batch, &self.input_shape))?.f_to_device(device)?;
        Ok((loss, grad))
    }

    /// An error unless output shape = input shape, naming `what` needs it.
    pub(crate) fn require_square(&self, what: &str) -> Result<()> {
        if self.input_shape == self.output_shape {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{what} needs output_shape == input_shape (a linear objective <theta, y>), got output {:?} and input {:?}",
            self.output_shape, self.input_shape
        )))
    }

    fn output_tensor(&self, mean: &[f32], batch: usize, device: Device) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(mean)?.f_reshape(batched(batch, &self.output_shape))?.f_to_device(device)?)
    }

    /// Checks theta, draws the samples of one call in chunks, solves them and returns
    /// (batch, theta on the host, the estimates).
    fn estimate(&self, theta: &Tensor, want_jacobian: bool) -> Result<(usize, Vec<f32>, Estimate)> {
        let size = theta.size();
        if size.len() != self.input_shape.len() + 1 || size[1..] != self.input_shape[..] {
            return Err(Error::invalid(format!(
                "theta must have shape [batch, {}], got {size:?}",
                self.input_shape.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            )));
        }
        let batch = size[0] as usize;
        let (d, o) = (self.input_numel, self.output_numel);
        let n = usize::try_from(self.config.num_samples())
            .map_err(|_| Error::invalid("num_samples does not fit in this machine's address space"))?;
        checked_product(&[batch, n, d], "batch * num_samples * input_numel")?;
        checked_product(&[batch, n, o], "batch * num_samples * output_numel")?;
        if want_jacobian {
            checked_product(&[batch, o, d, 8], "the tape size batch * output_numel * input_numel")?;
        }
        let theta_vec = host_vec(theta, "theta")?;

        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let stream = Stream::new(self.config.seed(), call);
        let (noise, perturbation) = (self.config.noise(), self.config.perturbation());
        let sigma = self.config.sigma() as f32;
        let threads = self.config.effective_threads();
        let antithetic = self.config.antithetic();
        let baseline = if antithetic { Baseline::None } else { self.config.baseline() };
        let clean = if want_jacobian && baseline == Baseline::CleanInput {
            let mut y0 = vec![0f32; batch * o];
            solve_rows(&*self.solver, &theta_vec, &mut y0, batch, d, o, threads)?;
            Some(y0)
        } else {
            None
        };

        let square = self.input_shape == self.output_shape;
        let mut acc =
            Accumulator::new(batch, d, o, perturbation, self.config.sigma(), want_jacobian, square, self.device)?;
        let rows_per_chunk = (CHUNK_BYTES / (4 * (3 * d + o))).clamp(1, n);
        let mut z = vec![0f32; rows_per_chunk * d];
        let mut x = vec![0f32; rows_per_chunk * d];
        let mut s = vec![0f32; if want_jacobian { rows_per_chunk * d } else { 0 }];
        let mut y = vec![0f32; rows_per_chunk * o];
        for b in 0..batch {
            let theta_b = &theta_vec[b * d..(b + 1) * d];
            let mut n0 = 0;
            while n0 < n {
                let rows = rows_per_chunk.min(n - n0);
                let (z, x, y) = (&mut z[..rows * d], &mut x[..rows * d], &mut y[..rows * o]);
                draw(noise, &stream, (b * n + n0) as u64, d, antithetic, z);
                perturbation.perturb(theta_b, z, sigma, x);
                solve_rows(&*self.solver, x, y, rows, d, o, threads)?;
                let s = &mut s[..if want_jacobian { rows * d } else { 0 }];
                if want_jacobian {
                    perturbation.score(noise, z, s);
                }
                acc.add(b, z, x, s, y, rows)?;
                n0 += rows;
            }
        }
        let estimate = acc.finish(n as u64, baseline, clean.as_deref(), &theta_vec)?;
        Ok((batch, theta_vec, estimate))
    }
}

/// The noise of samples `first_sample ..` (as many rows of `d` as `z` holds). Sample k's
/// draws are elements k·d .. (k+1)·d of the call's stream; with antithetic pairs an odd
/// sample is the negation of the sample before it.
fn draw(noise: Noise, stream: &Stream, first_sample: u64, d: usize, antithetic: bool, z: &mut [f32]) {
    if !antithetic {
        noise.fill(stream, first_sample * d as u64, z);
        return;
    }
    for (i, row) in z.chunks_exact_mut(d).enumerate() {
        let k = first_sample + i as u64;
        noise.fill(stream, (k & !1) * d as u64, row);
        if k % 2 == 1 {
            row.iter_mut().for_each(|v| *v = -*v);
        }
    }
}

/// A float32 tensor's values on the host, checked finite (NON_FINITE_INPUT names the first
/// bad entry as `what[problem][index]`).
fn host_vec(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    if t.f_kind()? != Kind::Float {
        return Err(Error::invalid(format!("{what} must be float32, got {:?}", t.f_kind()?)));
    }
    let numel = t.numel();
    let cols = if t.dim() == 0 { 1 } else { numel / (t.size()[0].max(1) as usize) };
    let mut values = vec![0f32; numel];
    t.f_to_device(Device::Cpu)?.f_contiguous()?.f_view([-1])?.f_copy_data(&mut values, numel)?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::new(
            Status::NonFiniteInput,
            format!("{what}[{}][{}] is {}; {what} must be finite", i / cols, i % cols, values[i]),
        ));
    }
    Ok(values)
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
    let threads = threads.clamp(1, rows);
    let per = rows.div_ceil(threads);
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
                let r = h.join().unwrap_or_else(|payload| std::panic::resume_unwind(payload));
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    };
    result.map_err(|msg| Error::new(Status::SolverFailed, format!("the solver failed: {msg}")))?;
    if let Some(i) = y.iter().position(|v| !v.is_finite()) {
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
