//! A perturbed optimizer: a solver, its problem shapes, and a config.

use crate::config::Config;
use crate::error::{Error, Result, Status};
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
        Ok(self.run(theta, false)?.0)
    }

    /// As [`PerturbedOp::forward`], and the tape for the backward pass.
    pub fn forward_with_tape(&self, theta: &Tensor) -> Result<(Tensor, Tape)> {
        let (output, tape) = self.run(theta, true)?;
        Ok((output, tape.expect("a tape was requested")))
    }

    fn run(&self, theta: &Tensor, want_tape: bool) -> Result<(Tensor, Option<Tape>)> {
        let size = theta.size();
        if size.len() != self.input_shape.len() + 1 || size[1..] != self.input_shape[..] {
            return Err(Error::invalid(format!(
                "theta must have shape [batch, {}], got {size:?}",
                self.input_shape.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            )));
        }
        if theta.f_kind()? != Kind::Float {
            return Err(Error::invalid(format!("theta must be float32, got {:?}", theta.f_kind()?)));
        }
        let batch = size[0] as usize;
        let (d, o) = (self.input_numel, self.output_numel);
        let n = usize::try_from(self.config.num_samples())
            .map_err(|_| Error::invalid("num_samples does not fit in this machine's address space"))?;
        checked_product(&[batch, n, d], "batch * num_samples * input_numel")?;
        checked_product(&[batch, n, o], "batch * num_samples * output_numel")?;
        if want_tape {
            checked_product(&[batch, o, d, 8], "the tape size batch * output_numel * input_numel")?;
        }
        let theta_host = theta.f_to_device(Device::Cpu)?.f_contiguous()?.f_reshape([-1])?;
        let mut theta_vec = vec![0f32; batch * d];
        theta_host.f_copy_data(&mut theta_vec, batch * d)?;
        if let Some(i) = theta_vec.iter().position(|v| !v.is_finite()) {
            return Err(Error::new(
                Status::NonFiniteInput,
                format!("theta[{}][{}] is {}; theta must be finite", i / d, i % d, theta_vec[i]),
            ));
        }

        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let stream = Stream::new(self.config.seed(), call);
        let noise = self.config.noise();
        let sigma = self.config.sigma() as f32;
        let threads = self.config.effective_threads();
        let rows_per_chunk = (CHUNK_BYTES / (4 * (d + o))).clamp(1, n);

        let mut sum_y = vec![0f64; batch * o];
        let sum_ys = if want_tape {
            Some(Tensor::f_zeros([batch as i64, o as i64, d as i64], (Kind::Double, self.device))?)
        } else {
            None
        };
        let mut z = vec![0f32; rows_per_chunk * d];
        let mut x = vec![0f32; rows_per_chunk * d];
        let mut y = vec![0f32; rows_per_chunk * o];
        for b in 0..batch {
            let theta_b = &theta_vec[b * d..(b + 1) * d];
            let mut n0 = 0;
            while n0 < n {
                let rows = rows_per_chunk.min(n - n0);
                let (z, x, y) = (&mut z[..rows * d], &mut x[..rows * d], &mut y[..rows * o]);
                noise.fill(&stream, ((b * n + n0) * d) as u64, z);
                for (xr, zr) in x.chunks_exact_mut(d).zip(z.chunks_exact(d)) {
                    for ((xv, &zv), &tv) in xr.iter_mut().zip(zr).zip(theta_b) {
                        *xv = tv + sigma * zv;
                    }
                }
                solve_rows(&*self.solver, x, y, rows, d, o, threads)?;
                for (acc, yr) in sum_y[b * o..(b + 1) * o].iter_mut().zip(column_sums(y, o)) {
                    *acc += yr;
                }
                if let Some(sum_ys) = &sum_ys {
                    accumulate_ys(sum_ys, b, y, z, rows, noise, self.device)?;
                }
                n0 += rows;
            }
        }

        let inv_n = 1.0 / n as f64;
        let mean: Vec<f32> = sum_y.iter().map(|&s| (s * inv_n) as f32).collect();
        let output = Tensor::f_from_slice(&mean)?
            .f_reshape(batched(batch, &self.output_shape))?
            .f_to_device(theta.device())?;
        let tape = sum_ys.map(|sum_ys| {
            Tape::new(sum_ys, n as u64, self.config.sigma(), &self.input_shape, &self.output_shape, batch)
        });
        Ok((output, tape))
    }
}

/// sum_ys[b] += Yᵀ ∇ν(Z) for one chunk.
fn accumulate_ys(
    sum_ys: &Tensor,
    b: usize,
    y: &[f32],
    z: &[f32],
    rows: usize,
    noise: Noise,
    device: Device,
) -> Result<()> {
    let rows = rows as i64;
    let yt = Tensor::f_from_slice(y)?.f_reshape([rows, -1])?.f_to_device(device)?;
    let mut score = Tensor::f_from_slice(z)?.f_reshape([rows, -1])?.f_to_device(device)?;
    noise.score_in_place(&mut score)?;
    let chunk = yt.f_tr()?.f_matmul(&score)?.f_to_kind(Kind::Double)?;
    let _ = sum_ys.f_get(b as i64)?.f_add_(&chunk)?;
    Ok(())
}

/// Per-column sums of a row-major `[rows, cols]` buffer, in float64.
fn column_sums(values: &[f32], cols: usize) -> Vec<f64> {
    let mut sums = vec![0f64; cols];
    for row in values.chunks_exact(cols) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    sums
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
