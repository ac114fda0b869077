//! What a tape keeps of the Jacobian, and the products computed from it: the Jacobian
//! itself, VJP and JVP, per problem.

use crate::error::Result;
use crate::estimate::replay::Replay;
use crate::tensors::host_floats;
use tch::{Device, Kind, Tensor};

/// What the Jacobian is computed from (see [`crate::estimate`]).
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
    /// pipeline; see [`crate::estimate::replay`]).
    Replay(Replay),
}

impl JacobianData {
    /// The device the data lives on.
    pub fn device(&self) -> Device {
        match self {
            JacobianData::Dense(j) => j.device(),
            JacobianData::Samples { y, .. } => y.device(),
            JacobianData::Replay(_) => Device::Cpu,
        }
    }

    /// The bytes of memory held.
    pub fn bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        match self {
            JacobianData::Dense(j) => tensor(j),
            JacobianData::Samples {
                y,
                s,
                center,
                col_scale,
                ..
            } => tensor(y) + tensor(s) + tensor(center) + col_scale.as_ref().map_or(0, tensor),
            JacobianData::Replay(r) => r.bytes(),
        }
    }

    /// The Jacobian `[batch, o, d]` of `batch` problems with `d` inputs, a new tensor.
    pub fn jacobian(&self, batch: usize, d: usize) -> Result<Tensor> {
        match self {
            JacobianData::Dense(j) => crate::tensors::copy(j),
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
            JacobianData::Replay(r) => {
                Ok(Tensor::f_from_slice(&r.jacobian()?)?.f_view([batch as i64, -1, d as i64])?)
            }
        }
    }

    /// Jᵀg for `g` `[batch, o]` on [`JacobianData::device`]: a new tensor of `batch · d`
    /// values (shape `[batch, 1, d]` or flat).
    pub fn vjp(&self, g: &Tensor) -> Result<Tensor> {
        Ok(match self {
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
                let cg = center.f_mul(g)?.f_sum_dim_intlist(1, true, Kind::Float)?; // [b, 1]
                let weights = yg.f_squeeze_dim(2)?.f_sub(&cg)?; // [b, N]
                let out = weights.f_unsqueeze(1)?.f_matmul(s)?.f_mul_scalar(*scale)?; // [b, 1, d]
                match col_scale {
                    Some(cs) => out.f_mul(&cs.f_unsqueeze(1)?)?,
                    None => out,
                }
            }
            JacobianData::Replay(r) => Tensor::f_from_slice(&r.vjp(&host_floats(g)?)?)?,
        })
    }

    /// J t for `t` `[batch, d]` on [`JacobianData::device`]: a new tensor of `batch · o`
    /// values.
    pub fn jvp(&self, t: &Tensor) -> Result<Tensor> {
        Ok(match self {
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
                    None => t.shallow_clone(),
                };
                let st = s.f_matmul(&t.f_unsqueeze(2)?)?; // [b, N, 1]
                let yst = y.f_transpose(1, 2)?.f_matmul(&st)?; // [b, o, 1]
                let cst =
                    center
                        .f_unsqueeze(2)?
                        .f_mul(&st.f_sum_dim_intlist(1, true, Kind::Float)?)?;
                yst.f_sub(&cst)?.f_mul_scalar(*scale)?
            }
            JacobianData::Replay(r) => Tensor::f_from_slice(&r.jvp(&host_floats(t)?)?)?,
        })
    }
}
