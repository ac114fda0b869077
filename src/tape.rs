//! What a forward call keeps for the backward pass: sums over the samples, so that the
//! VJP and the Jacobian need no further solver call.

use crate::error::{Error, Result, Status};
use crate::shape::batched;
use tch::{Device, Kind, Tensor};

/// The statistics of one forward call, summed over its N samples, per problem:
/// `sum_ys[b] = Σ_n Y_n ∇ν(Z_n)ᵀ` (`[batch, output_numel, input_numel]`, float64).
///
/// A tape owns its tensors: it stays valid after its op is dropped.
#[derive(Debug)]
pub struct Tape {
    sum_ys: Tensor,
    num_samples: u64,
    sigma: f64,
    input_shape: Vec<i64>,
    output_shape: Vec<i64>,
    batch: usize,
}

// SAFETY: a tape's tensors are written only while it is built and are read-only after;
// libtorch allows concurrent reads of a tensor from several threads.
unsafe impl Sync for Tape {}

impl Tape {
    pub(crate) fn new(
        sum_ys: Tensor,
        num_samples: u64,
        sigma: f64,
        input_shape: &[i64],
        output_shape: &[i64],
        batch: usize,
    ) -> Tape {
        Tape {
            sum_ys,
            num_samples,
            sigma,
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
        self.sum_ys.device()
    }

    /// The Jacobian estimate `[batch, output_numel, input_numel]` (float32):
    /// J = (1/(Nσ)) Σ_n Y_n ∇ν(Z_n)ᵀ.
    pub fn jacobian(&self) -> Result<Tensor> {
        let scale = 1.0 / (self.num_samples as f64 * self.sigma);
        Ok(self.sum_ys.f_mul_scalar(scale)?.f_to_kind(Kind::Float)?)
    }

    /// The vector-Jacobian product Jᵀg for `grad_output` of shape `[batch, *output_shape]`;
    /// the result has shape `[batch, *input_shape]`, on the device of `grad_output`.
    pub fn vjp(&self, grad_output: &Tensor) -> Result<Tensor> {
        let g = self.check_tensor(grad_output, &self.output_shape, "grad_output")?;
        let scale = 1.0 / (self.num_samples as f64 * self.sigma);
        // Σ_o sum_ys[b, o, d] g[b, o]
        let out = g.f_unsqueeze(1)?.f_matmul(&self.sum_ys)?.f_squeeze_dim(1)?.f_mul_scalar(scale)?;
        Ok(out
            .f_to_kind(Kind::Float)?
            .f_reshape(batched(self.batch, &self.input_shape))?
            .f_to_device(grad_output.device())?)
    }

    /// Checks kind, shape and finiteness of a per-problem tensor and returns it flattened to
    /// `[batch, numel]` as float64 on the tape's device.
    fn check_tensor(&self, t: &Tensor, shape: &[i64], what: &str) -> Result<Tensor> {
        let expected = batched(self.batch, shape);
        if t.size() != expected {
            return Err(Error::invalid(format!("{what} must have shape {expected:?}, got {:?}", t.size())));
        }
        if t.f_kind()? != Kind::Float {
            return Err(Error::invalid(format!("{what} must be float32, got {:?}", t.f_kind()?)));
        }
        if !bool::try_from(t.f_isfinite()?.f_all()?)? {
            return Err(Error::new(Status::NonFiniteInput, format!("{what} contains NaN or infinite values")));
        }
        Ok(t.f_to_device(self.device())?.f_to_kind(Kind::Double)?.f_reshape([self.batch as i64, -1])?)
    }
}
