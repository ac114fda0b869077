//! I-MLE (Niepert, Minervini & Franceschi, "Implicit MLE: Backpropagating Through Discrete
//! Exponential Family Distributions", NeurIPS 2021) and its adaptive step, AI-MLE
//! (Minervini, Franceschi & Niepert, "Adaptive Perturbation-Based Gradient Estimation for
//! Discrete Latent Variable Models", AAAI 2023), as PyEPO's `implicitMLE` and
//! `adaptiveImplicitMLE`: the forward is the perturbed optimizer's mean over the op's noise
//! (Sum-of-Gamma noise is the papers'); the backward solves the same perturbed inputs
//! moved by the target step, sharing the forward's noise.

use super::{pyepo_sign, step, Call, Rows};
use crate::error::{Error, Result};
use crate::op::PerturbedOp;
use crate::pipeline::{Additions, CallCache, OpSpec};
use std::sync::Arc;
use tch::{Device, Tensor};

/// The record of an I-MLE forward call: its perturbed inputs and their solutions, for
/// [`PerturbedOp::imle_vjp`] and [`PerturbedOp::aimle_vjp`] on the same op.
pub struct ImleRecord {
    spec: Arc<OpSpec>,
    rows: Rows,
    samples: usize,
    theta: Vec<f32>,
    inputs: Vec<f32>,
    solutions: Vec<f32>,
    /// The op's call count the forward took (the pool's decisions of the backward's solves).
    call: u64,
    shape: Vec<i64>,
    device: Device,
}

impl std::fmt::Debug for ImleRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImleRecord")
            .field("batch", &self.rows.batch)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

impl ImleRecord {
    /// Problems of the call.
    pub fn batch(&self) -> usize {
        self.rows.batch
    }
}

/// The state of AI-MLE's adaptive step λ = α‖θ‖/‖g‖ (C: `pert_aimle_state`): α moves by
/// `step` after each backward pass, up while the moving average of the fraction of non-zero
/// gradient entries is below 1, down (not below 0) otherwise, as PyEPO's
/// `adaptiveImplicitMLE`. [`AimleState::default`]: α 1, average 1, step 0.001.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AimleState {
    /// α, the step's magnitude relative to ‖θ‖ / ‖g‖.
    pub alpha: f64,
    /// The moving average (weight 0.9) of the fraction of gradient entries above 1e-8.
    pub grad_norm_avg: f64,
    /// How much α moves per backward pass.
    pub step: f64,
}

impl Default for AimleState {
    fn default() -> AimleState {
        AimleState {
            alpha: 1.0,
            grad_norm_avg: 1.0,
            step: 1e-3,
        }
    }
}

impl AimleState {
    fn check(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if ok(self.alpha) && ok(self.grad_norm_avg) && ok(self.step) {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "the AI-MLE state must hold finite values >= 0, got alpha {}, grad_norm_avg {}, step {}",
            self.alpha, self.grad_norm_avg, self.step
        )))
    }
}

impl PerturbedOp {
    /// I-MLE's forward pass: y_σ(θ) = mean over the op's N samples of y*(θ + σZ) (as
    /// [`PerturbedOp::forward`], from the same draws: one call of the op), and the record
    /// of the perturbed inputs and solutions that its backward passes use. Its noise may be
    /// any of the op's, Sum-of-Gamma included (no score is needed). The op's output shape
    /// must equal its input shape. A batch of 0 draws nothing (the call does not count) and
    /// gives an empty mean and a record whose backward passes give empty gradients.
    pub fn imle_forward(&self, theta: &Tensor) -> Result<(Tensor, ImleRecord)> {
        let (call, theta_host) = Call::of(self, "I-MLE", theta, "theta")?;
        let (mean, record, additions) = self.imle_forward_rows(call.rows, theta_host, theta)?;
        let record = ImleRecord {
            shape: call.shape.clone(),
            device: call.device,
            ..record
        };
        let mean = call.like_first(&mean)?;
        additions.commit()?;
        Ok((mean, record))
    }

    /// [`PerturbedOp::imle_forward`] on host rows (finite, checked by the caller); `theta`
    /// is the same values as a tensor when the caller has one. With the solutions to add
    /// to the op's pool once the caller's outputs are made.
    pub(crate) fn imle_forward_rows(
        &self,
        rows: Rows,
        theta: Vec<f32>,
        tensor: &Tensor,
    ) -> Result<(Vec<f32>, ImleRecord, Additions)> {
        self.require_square("I-MLE")?;
        let n = self.config().num_samples() as usize;
        if rows.batch == 0 {
            // no problem: an empty mean and an empty record, no noise drawn (the call does
            // not count, as a forward call of batch 0), whose backward passes write nothing
            let record = ImleRecord {
                spec: self.spec().clone(),
                rows,
                samples: n,
                theta,
                inputs: Vec::new(),
                solutions: Vec::new(),
                call: 0,
                shape: vec![0, rows.d as i64],
                device: Device::Cpu,
            };
            return Ok((Vec::new(), record, Additions::none()));
        }
        // the draw's own buffer (its rows of θ under the clean-input baseline dropped)
        let draw = self.draw(tensor)?;
        let call = draw.call();
        let mut inputs = draw.into_inputs();
        inputs.truncate(rows.batch * n * rows.d);
        // (with a pool: the samples a forward call of this count would solve or answer)
        let cache = self.samples_cache(call);
        let solutions = self.solve_host_samples(&inputs, rows.batch, cache.as_ref())?;
        let mean = sample_means(&solutions, rows, n, f64::from)?;
        let record = ImleRecord {
            spec: self.spec().clone(),
            rows,
            samples: n,
            theta,
            inputs,
            solutions,
            call,
            shape: vec![rows.batch as i64, rows.d as i64],
            device: Device::Cpu,
        };
        Ok((mean, record, Additions(cache.into_iter().collect())))
    }

    /// I-MLE's gradient with respect to θ of a loss whose gradient with respect to the
    /// forward's y_σ(θ) is `grad_output` (`[batch, *input_shape]`), as PyEPO's
    /// `implicitMLE` (s = +1 minimizing, −1 maximizing):
    ///
    /// - one-sided: s·mean over samples of (y*(x_k + sλg) − y*(x_k)) / λ, x_k the forward's
    ///   perturbed inputs (the target distribution θ − λg for maximize);
    /// - two-sided: mean of (y*(x_k + λg) − y*(x_k − λg)) / (2λ).
    ///
    /// One solve per sample (two when two-sided; with a pool, the samples the forward
    /// answered from it are answered from it too, on both sides, from the pool as this
    /// call begins: one-sided, y*(x_k) is the forward's answer, from the pool as the
    /// forward began, so a pool grown meanwhile may answer the moved sample better even
    /// when λg moves nothing). λ (`lambda`) finite and > 0; `record` from
    /// [`PerturbedOp::imle_forward`] of this op.
    pub fn imle_vjp(
        &self,
        record: &ImleRecord,
        grad_output: &Tensor,
        lambda: f64,
        two_sided: bool,
    ) -> Result<Tensor> {
        let g = self.record_grad(record, grad_output)?;
        let (grad, additions) = self.imle_vjp_rows(record, &g, lambda, two_sided)?;
        let grad = like_record(record, &grad)?;
        additions.commit()?;
        Ok(grad)
    }

    /// AI-MLE's gradient: I-MLE's with λ = α‖θ‖/‖g‖ (norms over the whole batch; no solve
    /// and a zero gradient when g or α is 0), then α updated in `state` (see [`AimleState`];
    /// on error, and for a record of no problem, `state` is unchanged).
    pub fn aimle_vjp(
        &self,
        record: &ImleRecord,
        grad_output: &Tensor,
        two_sided: bool,
        state: &mut AimleState,
    ) -> Result<Tensor> {
        let g = self.record_grad(record, grad_output)?;
        let mut next = *state;
        let (grad, additions) = self.aimle_vjp_rows(record, &g, two_sided, &mut next)?;
        let grad = like_record(record, &grad)?;
        additions.commit()?;
        *state = next; // only once everything has succeeded
        Ok(grad)
    }

    fn record_grad(&self, record: &ImleRecord, grad_output: &Tensor) -> Result<Vec<f32>> {
        self.check_record(record)?;
        let call = Call {
            rows: record.rows,
            device: record.device,
            shape: record.shape.clone(),
        };
        call.rows(grad_output, "grad_output")
    }

    /// INVALID_ARGUMENT unless `record` comes from a forward call of this op.
    pub(crate) fn check_record(&self, record: &ImleRecord) -> Result<()> {
        if Arc::ptr_eq(&record.spec, self.spec()) {
            return Ok(());
        }
        Err(Error::invalid(
            "the I-MLE record comes from another op: pass the op whose imle_forward made it",
        ))
    }

    /// [`PerturbedOp::imle_vjp`] on host values (`g` finite, checked by the caller), with
    /// the solutions to add to the op's pool once the caller's outputs are made.
    pub(crate) fn imle_vjp_rows(
        &self,
        record: &ImleRecord,
        g: &[f32],
        lambda: f64,
        two_sided: bool,
    ) -> Result<(Vec<f32>, Additions)> {
        let lambda = step(lambda, "lambda")?;
        self.check_record(record)?;
        self.imle_gradient(record, g, lambda, two_sided, "the I-MLE gradient")
    }

    /// [`PerturbedOp::aimle_vjp`] on host values (`g` finite, checked by the caller), with
    /// the solutions to add to the op's pool once the caller's outputs are made.
    pub(crate) fn aimle_vjp_rows(
        &self,
        record: &ImleRecord,
        g: &[f32],
        two_sided: bool,
        state: &mut AimleState,
    ) -> Result<(Vec<f32>, Additions)> {
        self.check_record(record)?;
        state.check()?;
        if record.rows.batch == 0 {
            return Ok((Vec::new(), Additions::none())); // no problem: no step, α unchanged
        }
        let norm = |v: &[f32]| {
            v.iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt()
        };
        let g_norm = norm(g);
        let lambda = if g_norm > 0.0 {
            (state.alpha * norm(&record.theta) / g_norm) as f32
        } else {
            0.0
        };
        if !lambda.is_finite() {
            return Err(Error::invalid(format!(
                "the AI-MLE step alpha * |theta| / |grad_output| overflows float32 (alpha {}, |grad_output| {g_norm})",
                state.alpha
            )));
        }
        let (grad, additions) = if lambda > 0.0 {
            self.imle_gradient(record, g, lambda, two_sided, "the AI-MLE gradient")?
        } else {
            (vec![0.0; g.len()], Additions::none()) // no step: the solutions do not move
        };
        // the moving average of the fraction of non-zero entries, and α, as PyEPO
        let nonzero =
            grad.iter().filter(|v| v.abs() > 1e-8).count() as f64 / grad.len().max(1) as f64;
        state.grad_norm_avg = 0.9 * state.grad_norm_avg + 0.1 * nonzero;
        state.alpha = if state.grad_norm_avg < 1.0 {
            state.alpha + state.step
        } else {
            (state.alpha - state.step).max(0.0)
        };
        Ok((grad, additions))
    }

    fn imle_gradient(
        &self,
        record: &ImleRecord,
        g: &[f32],
        lambda: f32,
        two_sided: bool,
        what: &str,
    ) -> Result<(Vec<f32>, Additions)> {
        let (rows, n) = (record.rows, record.samples);
        if rows.batch == 0 {
            return Ok((Vec::new(), Additions::none())); // no problem, nothing to solve
        }
        // with a pool: each moved sample solved or answered as the forward's sample was
        // (the forward call's decisions, from the pool as this call began), so that a
        // sample's difference is that of two solves or of two answers
        let first = self.samples_cache(record.call);
        let second = first.as_ref().map(CallCache::sibling);
        let moved = |shift: f32, cache: Option<&CallCache>| -> Result<Vec<f32>> {
            let x = shifted(&record.inputs, g, rows, n, shift)?;
            rows.check_derived(&x, "the perturbed inputs moved by lambda * grad_output")?;
            self.solve_host_samples(&x, rows.batch, cache)
        };
        let sign = pyepo_sign(self.config().sense());
        let grad = if two_sided {
            let up = moved(lambda, first.as_ref())?;
            let (mut diff, down) = (up, moved(-lambda, second.as_ref())?);
            diff.iter_mut().zip(&down).for_each(|(a, b)| *a -= b);
            sample_means(&diff, rows, n, |v| f64::from(v) / (2.0 * f64::from(lambda)))?
        } else {
            let mut diff = moved(sign * lambda, first.as_ref())?;
            diff.iter_mut()
                .zip(&record.solutions)
                .for_each(|(a, b)| *a -= b);
            sample_means(&diff, rows, n, |v| {
                f64::from(sign) * f64::from(v) / f64::from(lambda)
            })?
        };
        rows.check_result(&grad, what)?;
        let caches = first.into_iter().chain(second.filter(|_| two_sided));
        Ok((grad, Additions(caches.collect())))
    }
}

/// The inputs of every sample of problem b moved by `shift · g_b`.
fn shifted(inputs: &[f32], g: &[f32], rows: Rows, n: usize, shift: f32) -> Result<Vec<f32>> {
    let mut out = crate::tensors::host_room(inputs.len(), "the moved perturbed inputs")?;
    for (b, samples) in inputs.chunks(n * rows.d).enumerate().take(rows.batch) {
        let g_b = &g[b * rows.d..(b + 1) * rows.d];
        for x in samples.chunks(rows.d) {
            out.extend(x.iter().zip(g_b).map(|(&x, &g)| x + shift * g));
        }
    }
    Ok(out)
}

/// Per problem, the mean over its `n` sample rows of `f(value)`, summed in f64 in sample
/// order.
fn sample_means(values: &[f32], rows: Rows, n: usize, f: impl Fn(f32) -> f64) -> Result<Vec<f32>> {
    let mut out = crate::tensors::host_room(rows.batch * rows.d, "the sample means")?;
    out.resize(rows.batch * rows.d, 0.0);
    let mut sums = vec![0.0f64; rows.d];
    for b in 0..rows.batch {
        sums.fill(0.0);
        for k in 0..n {
            let row = &values[(b * n + k) * rows.d..(b * n + k + 1) * rows.d];
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += f(v);
            }
        }
        for (o, s) in out[b * rows.d..(b + 1) * rows.d].iter_mut().zip(&sums) {
            *o = (s / n as f64) as f32;
        }
    }
    Ok(out)
}

/// Values of a record's problems as a tensor of its θ's shape and device.
fn like_record(record: &ImleRecord, values: &[f32]) -> Result<Tensor> {
    Call {
        rows: record.rows,
        device: record.device,
        shape: record.shape.clone(),
    }
    .like_first(values)
}
