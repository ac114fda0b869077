//! The plan of a forward call: an op's shapes, config and device ([`OpSpec`]), the checks
//! of a call's sizes, and how its samples are cut into chunks and blocks.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::input::check_floats;
use crate::shape::{batched, checked_floats};
use crate::tuning::{AUTO_CHUNK_BYTES, HOST_BLOCKS, HOST_BLOCK_BYTES, HOST_BLOCK_MIN_ROWS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tch::{Device, Tensor};

/// The part of an op that its draws keep (shapes, config, device): immutable.
#[derive(Debug, Clone)]
pub(crate) struct OpSpec {
    pub config: Config,
    pub device: Device,
    pub input_shape: Vec<i64>,
    pub output_shape: Vec<i64>,
    pub input_numel: usize,
    pub output_numel: usize,
    /// Every call takes the libtorch chunk pipeline, on the CPU too (ops of device
    /// solvers), draws for the two-phase API included.
    pub chunked: bool,
    /// The op's solver is the built-in argmax: its CPU calls of small problems run the
    /// fused kernel, and so do the two-phase solutions handed back to it (the same sums,
    /// bit for bit, as its forward calls).
    pub builtin_argmax: bool,
    /// Rows solved by the op's solver so far (its CPU twin's too): perturbed samples,
    /// clean-input rows and plain solves.
    pub solver_rows: Arc<AtomicU64>,
}

impl OpSpec {
    /// Counts `rows` rows solved by the op's solver.
    pub(crate) fn count_solved(&self, rows: usize) {
        self.solver_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

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
    pub(crate) fn check_theta(&self, theta: &Tensor) -> Result<Tensor> {
        self.check_input(theta, "theta", self.config.num_samples() as usize)
    }

    /// Checks the shape, kind and values of `x` (named `name` in errors), an input of
    /// `samples` rows per problem; returns it as `[batch, d]` on the op's device. (Whether
    /// this thread may use that device now, `cuda_stream::check_usable`, its callers have
    /// checked: they take the spec from `PerturbedOp::spec_here` or `spec_for`.)
    pub(crate) fn check_input(&self, x: &Tensor, name: &str, samples: usize) -> Result<Tensor> {
        let size = x.size();
        if size.len() != self.input_shape.len() + 1 || size[1..] != self.input_shape[..] {
            return Err(Error::invalid(format!(
                "{name} must have shape [batch, {}], got {size:?}",
                self.input_shape
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let batch = size[0] as usize;
        self.check_rows(batch, samples)?;
        check_floats(x, name)?;
        Ok(x.f_to_device(self.device)?
            .f_reshape([batch as i64, self.input_numel as i64])?)
    }

    pub(crate) fn check_batch(&self, batch: usize) -> Result<()> {
        self.check_rows(batch, self.config.num_samples() as usize)
    }

    /// Checks that `batch` problems of `n` rows each have sizes that can be expressed.
    pub(crate) fn check_rows(&self, batch: usize, n: usize) -> Result<()> {
        checked_floats(
            &[batch, n, self.input_numel],
            "batch * num_samples * input_numel",
        )?;
        checked_floats(
            &[batch, n, self.output_numel],
            "batch * num_samples * output_numel",
        )?;
        let values = batch as u128 * n as u128 * self.input_numel as u128;
        if let crate::noise::Noise::SumOfGamma(_) = self.config.noise() {
            if values > u128::from(crate::sum_of_gamma::SUM_OF_GAMMA_MAX_VALUES) {
                return Err(crate::Error::invalid(format!(
                    "a call with Sum-of-Gamma noise draws at most 2^40 values, got batch * num_samples * input_numel = {values}"
                )));
            }
        }
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

    /// The rows (samples, of one or several problems) whose buffers fit in a chunk's
    /// budget: the chunk size set, or the automatic one of the op's device.
    pub(crate) fn chunk_rows(&self) -> usize {
        let (d, o) = (self.input_numel as u64, self.output_numel as u64);
        let row_bytes = 4 * (4 * d + 3 * o);
        let budget = match self.config.chunk_bytes() {
            0 if self.device == Device::Cpu => AUTO_CHUNK_BYTES.0,
            0 => AUTO_CHUNK_BYTES.1,
            bytes => bytes,
        };
        usize::try_from((budget / row_bytes).max(1)).unwrap_or(usize::MAX)
    }

    /// Samples per chunk: what fits in the config's chunk budget (even under antithetic
    /// pairs), at least one (two).
    pub(crate) fn rows_per_chunk(&self) -> usize {
        let n = self.config.num_samples() as usize;
        let rows = self.chunk_rows().clamp(1, n);
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
}
