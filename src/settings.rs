//! The settings that are plain choices (no behaviour of their own): the variance-reduction
//! baseline and the sense of the optimization. The other settings, with the code that
//! carries them out, are in [`crate::noise`], [`crate::perturbation`] and
//! [`crate::device`]; [`crate::config::Config`] holds them all.

use crate::error::{Error, Result};

/// The variance-reduction baseline of the gradient estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Baseline {
    /// The plain score-function estimator (C: `PERT_BASELINE_NONE = 0`).
    None = 0,
    /// Subtract the mean of the samples; no extra solve (C: `PERT_BASELINE_SAMPLE_MEAN = 1`).
    /// The default. Undefined for N = 1, where the plain estimator ([`Baseline::None`]) is
    /// used instead.
    #[default]
    SampleMean = 1,
    /// Subtract the solution at the clean input y*(θ); one extra solve per problem
    /// (C: `PERT_BASELINE_CLEAN_INPUT = 2`).
    CleanInput = 2,
}

impl Baseline {
    /// The baseline with this C number.
    pub fn from_u32(value: u32) -> Result<Baseline> {
        match value {
            0 => Ok(Baseline::None),
            1 => Ok(Baseline::SampleMean),
            2 => Ok(Baseline::CleanInput),
            _ => Err(Error::invalid(format!(
                "baseline must be PERT_BASELINE_NONE (0), PERT_BASELINE_SAMPLE_MEAN (1) or PERT_BASELINE_CLEAN_INPUT (2), got {value}"
            ))),
        }
    }
}

/// Whether the solver maximizes or minimizes ⟨θ, y⟩.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sense {
    /// y*(θ) = argmax ⟨θ, y⟩ (C: `PERT_SENSE_MAXIMIZE = 0`). The default.
    #[default]
    Maximize = 0,
    /// y*(θ) = argmin ⟨θ, y⟩, e.g. shortest paths over costs (C: `PERT_SENSE_MINIMIZE = 1`).
    Minimize = 1,
}

impl Sense {
    /// The sense with this C number.
    pub fn from_u32(value: u32) -> Result<Sense> {
        match value {
            0 => Ok(Sense::Maximize),
            1 => Ok(Sense::Minimize),
            _ => Err(Error::invalid(format!(
                "sense must be PERT_SENSE_MAXIMIZE (0) or PERT_SENSE_MINIMIZE (1), got {value}"
            ))),
        }
    }
}

/// How a tape keeps what the Jacobian needs: the form, chosen by sizes (`TapeForm::choose`,
/// in src/estimate/kept.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapeForm {
    /// Σ Y_n s_nᵀ per problem: output_numel × input_numel floats.
    Sums,
    /// The samples, N × (output_numel + input_numel) floats per problem at most: on the
    /// CPU's host paths their solutions (sparse rows) and their scores up to a size (else
    /// drawn again), elsewhere Y_n and s_n as tensors.
    Samples,
}

/// The path a forward call takes (chosen by `OpSpec::path`, in src/pipeline/path.rs).
/// Hidden: tests force one with `Config::set_path` to compare the paths on the same
/// cases, whatever the size thresholds would choose.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The fused CPU argmax kernel: blocks of samples drawn, perturbed, solved and summed
    /// in one pass (the built-in argmax, or solutions handed back to its op's draws).
    FusedArgmax,
    /// The host pipeline: blocks of samples on host buffers, solved by the op's solver.
    Host,
    /// The libtorch chunk pipeline with the CPU sampler (CPU ops of device solvers).
    Chunks,
    /// The libtorch chunk pipeline with libtorch's sampler on the op's device: CUDA ops,
    /// and CPU ops forced onto it (the CUDA path's arithmetic, on a machine without GPU).
    Cuda,
}
