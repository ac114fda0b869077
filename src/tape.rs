//! What a forward call keeps for the backward pass, so that VJP, JVP, the Jacobian and
//! the objective need no further solver call.

use crate::error::{Error, Result};
use crate::op::host_floats;
use crate::replay::Replay;
use crate::shape::batched;
use tch::{Device, Kind, Tensor};

/// What the Jacobian is computed from (see [`crate::estimator`]).
#[derive(Debug)]
pub(crate) enum JacobianData {
    /// J itself, `[batch, o, d]` float32.
    Dense(Tensor),
    /// J = scale · (y − center)ᵀ s ⊙ col_scale from the samples: y `[batch, N, o]`,
    /// s `[batch, N, d]`, center `[batch, o]`, col_scale `[batch, d]`.
    Samples {
        y: Tensor,
        s: Tensor,
        center: Tensor,
        col_scale: Option<Tensor>,
        scale: f64,
    },
    /// J from the samples' solutions and their scores drawn again (CPU tapes of the host
    /// pipeline; see [`crate::replay`]).
    Replay(Replay),
}

/// A new tensor with the values of `t`, sharing no storage with it.
pub(crate) fn copy(t: &Tensor) -> Result<Tensor> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

/// The record of one forward call.
///
/// A tape owns its tensors: it stays valid after its op is dropped.
#[derive(Debug)]
pub struct Tape {
    jacobian: JacobianData,
    /// F_σ(θ) `[batch]` (float32), when output shape = input shape.
    objective: Option<Tensor>,
    input_shape: Vec<i64>,
    output_shape: Vec<i64>,
    batch: usize,
}

// SAFETY: a tape's tensors are written only while it is built and are read-only after:
// no method hands out a tensor that shares their storage (`jacobian` and `objective` return
// copies; VJP, JVP and the samples' Jacobian are new tensors), and the forward call's output
// shares no storage with them (see `Accumulator::finish`). libtorch allows concurrent reads
// of a tensor from several threads.
unsafe impl Sync for Tape {}

impl Tape {
    pub(crate) fn new(
        jacobian: JacobianData,
        objective: Option<Tensor>,
        input_shape: &[i64],
        output_shape: &[i64],
        batch: usize,
    ) -> Tape {
        Tape {
            jacobian,
            objective,
            input_shape: input_shape.to_vec(),
            output_shape: output_shape.to_vec(),
            batch,
        }
    }

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
        match &self.jacobian {
            JacobianData::Dense(j) => j.device(),
            JacobianData::Samples { y, .. } => y.device(),
            JacobianData::Replay(_) => Device::Cpu,
        }
    }
    /// The bytes of memory the tape holds (its tensors and buffers).
    pub fn bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let jacobian = match &self.jacobian {
            JacobianData::Dense(j) => tensor(j),
            JacobianData::Samples {
                y,
                s,
                center,
                col_scale,
                ..
            } => tensor(y) + tensor(s) + tensor(center) + col_scale.as_ref().map_or(0, tensor),
            JacobianData::Replay(r) => r.bytes(),
        };
        jacobian + self.objective.as_ref().map_or(0, tensor)
    }

    /// Whether the tape keeps the samples (true) or the Jacobian (false). CPU tapes keep
    /// only the samples' solutions (their non-zero entries) and draw the scores again from
    /// the forward call's stream when a gradient is asked; CUDA tapes keep both.
    pub fn keeps_samples(&self) -> bool {
        !matches!(self.jacobian, JacobianData::Dense(_))
    }

    /// The Jacobian estimate `[batch, output_numel, input_numel]` (float32); see
    /// [`crate::estimator`] for the estimator each setting gives.
    pub fn jacobian(&self) -> Result<Tensor> {
        match &self.jacobian {
            JacobianData::Dense(j) => copy(j),
            JacobianData::Samples {
                y,
                s,
                center,
                col_scale,
                scale,
            } => {
                let yc = y.f_sub(&center.f_unsqueeze(1)?)?;
                let j = yc.f_transpose(1, 2)?.f_matmul(s)?.f_mul_scalar(*scale)?;
                Ok(match col_scale {
                    Some(cs) => j.f_mul(&cs.f_unsqueeze(1)?)?,
                    None => j,
                })
            }
            JacobianData::Replay(r) => Ok(Tensor::f_from_slice(&r.jacobian())?.f_view([
                self.batch as i64,
                -1,
                r.redraw.d as i64,
            ])?),
        }
    }

    /// The perturbed objective F_σ(θ) of every problem, `[batch]`: E[⟨θ + σZ, y*(θ + σZ)⟩]
    /// (additive) or E[⟨η, y*(η)⟩] (multiplicative), from the forward call's draws.
    /// Only for ops whose output shape equals their input shape.
    pub fn objective(&self) -> Result<Tensor> {
        match &self.objective {
            Some(f) => copy(f),
            None => Err(Error::invalid(format!(
                "the objective <theta, y> needs output_shape == input_shape, got output {:?} and input {:?}",
                self.output_shape, self.input_shape
            ))),
        }
    }

    /// The vector-Jacobian product Jᵀg for `grad_output` of shape `[batch, *output_shape]`;
    /// the result has shape `[batch, *input_shape]`, on the device of `grad_output`.
    pub fn vjp(&self, grad_output: &Tensor) -> Result<Tensor> {
        let g = self.check_tensor(grad_output, &self.output_shape, "grad_output")?; // [b, o]
        let out = match &self.jacobian {
            JacobianData::Dense(j) => g.f_unsqueeze(1)?.f_matmul(j)?,
            JacobianData::Samples {
                y,
                s,
                center,
                col_scale,
                scale,
            } => {
                // scale · Σ_n s_n ⟨Y_n − c, g⟩
                let yg = y.f_matmul(&g.f_unsqueeze(2)?)?; // [b, N, 1]
                let cg = center.f_mul(&g)?.f_sum_dim_intlist(1, true, Kind::Float)?; // [b, 1]
                let weights = yg.f_squeeze_dim(2)?.f_sub(&cg)?; // [b, N]
                let out = weights.f_unsqueeze(1)?.f_matmul(s)?.f_mul_scalar(*scale)?; // [b, 1, d]
                match col_scale {
                    Some(cs) => out.f_mul(&cs.f_unsqueeze(1)?)?,
                    None => out,
                }
            }
            JacobianData::Replay(r) => Tensor::f_from_slice(&r.vjp(&host_floats(&g)?))?,
        };
        Ok(out
            .f_reshape(batched(self.batch, &self.input_shape))?
            .f_to_device(grad_output.device())?)
    }

    /// The Jacobian-vector product J t for `tangent` of shape `[batch, *input_shape]`;
    /// the result has shape `[batch, *output_shape]`, on the device of `tangent`.
    pub fn jvp(&self, tangent: &Tensor) -> Result<Tensor> {
        let t = self.check_tensor(tangent, &self.input_shape, "tangent_input")?; // [b, d]
        let out = match &self.jacobian {
            JacobianData::Dense(j) => j.f_matmul(&t.f_unsqueeze(2)?)?,
            JacobianData::Samples {
                y,
                s,
                center,
                col_scale,
                scale,
            } => {
                // scale · Σ_n (Y_n − c) ⟨s_n, t ⊙ col_scale⟩
                let t = match col_scale {
                    Some(cs) => t.f_mul(cs)?,
                    None => t,
                };
                let st = s.f_matmul(&t.f_unsqueeze(2)?)?; // [b, N, 1]
                let yst = y.f_transpose(1, 2)?.f_matmul(&st)?; // [b, o, 1]
                let cst =
                    center
                        .f_unsqueeze(2)?
                        .f_mul(&st.f_sum_dim_intlist(1, true, Kind::Float)?)?;
                yst.f_sub(&cst)?.f_mul_scalar(*scale)?
            }
            JacobianData::Replay(r) => Tensor::f_from_slice(&r.jvp(&host_floats(&t)?))?,
        };
        Ok(out
            .f_reshape(batched(self.batch, &self.output_shape))?
            .f_to_device(tangent.device())?)
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
        Ok(t.f_to_device(self.device())?
            .f_reshape([self.batch as i64, -1])?)
    }
}
