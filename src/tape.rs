//! What a forward call keeps for the backward pass, so that VJP, JVP, the Jacobian and
//! the objective need no further solver call.

use crate::error::{Error, Result};
use crate::estimate::{Estimate, Kept};
use crate::pipeline::OpSpec;
use crate::settings::Path;
use crate::shape::batched;
use tch::{Device, Kind, Tensor};

/// The record of one forward call.
///
/// A tape owns its tensors: it stays valid after its op is dropped.
#[derive(Debug)]
pub struct Tape {
    kept: Kept,
    /// F_σ(θ) `[batch]` (float32), when output shape = input shape.
    objective: Option<Tensor>,
    input_shape: Vec<i64>,
    output_shape: Vec<i64>,
    batch: usize,
    /// The op's cap on a call's threads, for the products too.
    max_threads: u32,
    /// The path the forward call took.
    path: Option<Path>,
}

// SAFETY: a tape's tensors are written only while it is built and are read-only after:
// no method hands out a tensor that shares their storage (`jacobian` and `objective` return
// copies; VJP, JVP and the samples' Jacobian are new tensors), and the forward call's output
// shares no storage with them (see `Accumulator::finish`). libtorch allows concurrent reads
// of a tensor from several threads.
unsafe impl Sync for Tape {}

/// The output `[batch, *output_shape]` on `device` and the tape of a forward call of `spec`
/// that estimated `estimate` with a Jacobian.
pub(crate) fn output_and_tape(
    spec: &OpSpec,
    estimate: Estimate,
    batch: usize,
    device: Device,
) -> Result<(Tensor, Tape)> {
    let output = spec.output_tensor(&estimate.mean, batch, device)?;
    let objective = match &estimate.objective {
        Some(f) => Some(f.value.f_to_kind(Kind::Float)?),
        None => None,
    };
    let kept = estimate.kept.expect("a Jacobian was requested");
    let tape = Tape {
        kept,
        objective,
        input_shape: spec.input_shape.clone(),
        output_shape: spec.output_shape.clone(),
        batch,
        max_threads: spec.config.max_threads(),
        path: estimate.path,
    };
    Ok((output, tape))
}

impl Tape {
    /// Number of problems of the forward call.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Shape of one problem's input.
    pub fn input_shape(&self) -> &[i64] {
        &self.input_shape
    }
    /// Shape of one problem's output.
    pub fn output_shape(&self) -> &[i64] {
        &self.output_shape
    }
    /// The device the tape's statistics live on.
    pub fn device(&self) -> Device {
        self.kept.device()
    }
    /// The bytes of memory the tape holds (its tensors and buffers).
    pub fn bytes(&self) -> usize {
        let objective = self
            .objective
            .as_ref()
            .map_or(0, |t| t.numel() * t.kind().elt_size_in_bytes());
        self.kept.bytes() + objective
    }

    /// The path the forward call took (see `OpSpec::path`); for tests that force one.
    #[doc(hidden)]
    pub fn path(&self) -> Option<Path> {
        self.path
    }

    /// Whether the tape keeps the samples (true) or the Jacobian (false). Tapes of the
    /// CPU's host paths keep the samples' solutions (their non-zero entries), and their
    /// scores up to 16 MiB (larger ones are drawn again from the forward call's stream
    /// when a gradient is asked); tapes of the chunk pipeline (CUDA ops, CPU ops of device
    /// solvers) keep both as tensors.
    pub fn keeps_samples(&self) -> bool {
        !matches!(self.kept, Kept::Sums(_))
    }

    /// The Jacobian estimate `[batch, output_numel, input_numel]` (float32), a new tensor;
    /// see [`crate::estimate`] for the estimator each setting gives.
    pub fn jacobian(&self) -> Result<Tensor> {
        let _cap = crate::intraop::cap(self.max_threads);
        crate::cuda_stream::check_usable(self.device())?; // (a capture: nothing enqueued)
        let d = self.input_shape.iter().product::<i64>();
        let o = self.output_shape.iter().product::<i64>();
        self.kept.jacobian([self.batch as i64, o, d])
    }

    /// The perturbed objective F_σ(θ) of every problem, `[batch]`: E[⟨θ + σZ, y*(θ + σZ)⟩]
    /// (additive) or E[⟨η, y*(η)⟩] (multiplicative), from the forward call's draws, a new
    /// tensor. Only for ops whose output shape equals their input shape.
    pub fn objective(&self) -> Result<Tensor> {
        let _cap = crate::intraop::cap(self.max_threads);
        crate::cuda_stream::check_usable(self.device())?; // (a capture: nothing enqueued)
        match &self.objective {
            Some(f) => crate::tensors::copy(f),
            None => Err(Error::invalid(format!(
                "the objective <theta, y> needs output_shape == input_shape, got output {:?} and input {:?}",
                self.output_shape, self.input_shape
            ))),
        }
    }

    /// The vector-Jacobian product Jᵀg for `grad_output` of shape `[batch, *output_shape]`;
    /// the result has shape `[batch, *input_shape]`, on the device of `grad_output`.
    pub fn vjp(&self, grad_output: &Tensor) -> Result<Tensor> {
        let _cap = crate::intraop::cap(self.max_threads);
        crate::cuda_stream::check_usable(self.device())?; // (a capture: nothing enqueued)
        let g = self.check_tensor(grad_output, &self.output_shape, "grad_output")?; // [b, o]
        Ok(self
            .kept
            .vjp(&g)?
            .f_reshape(batched(self.batch, &self.input_shape))?
            .f_to_device(grad_output.device())?)
    }

    /// The Jacobian-vector product J t for `tangent` of shape `[batch, *input_shape]`;
    /// the result has shape `[batch, *output_shape]`, on the device of `tangent`.
    pub fn jvp(&self, tangent: &Tensor) -> Result<Tensor> {
        let _cap = crate::intraop::cap(self.max_threads);
        crate::cuda_stream::check_usable(self.device())?; // (a capture: nothing enqueued)
        let t = self.check_tensor(tangent, &self.input_shape, "tangent_input")?; // [b, d]
        Ok(self
            .kept
            .jvp(&t)?
            .f_reshape(batched(self.batch, &self.output_shape))?
            .f_to_device(tangent.device())?)
    }

    /// J δ `[batch, output_numel]` for `delta` `[batch, input_numel]`, differentiable with
    /// respect to δ by libtorch's autograd (its backward is the VJP), from what the tape
    /// keeps (see `Kept::linear`): for [`crate::autograd`].
    pub(crate) fn linear(&self, delta: &Tensor) -> Result<Tensor> {
        let _cap = crate::intraop::cap(self.max_threads);
        crate::cuda_stream::check_usable(self.device())?; // (a capture: nothing enqueued)
        self.kept.linear(delta)
    }

    /// Checks kind, shape and finiteness of a per-problem tensor and returns it flattened to
    /// `[batch, numel]` on the tape's device.
    fn check_tensor(&self, t: &Tensor, shape: &[i64], what: &str) -> Result<Tensor> {
        let expected = batched(self.batch, shape);
        if t.size() != expected {
            return Err(Error::invalid(format!(
                "{what} must have shape {expected:?}, got {:?}",
                t.size()
            )));
        }
        crate::input::check_floats(t, what)?;
        // sizes spelt out (no -1): a reshape of 0 problems has no inferable dimension
        Ok(t.f_to_device(self.device())?
            .f_reshape([self.batch as i64, shape.iter().product::<i64>()])?)
    }
}
