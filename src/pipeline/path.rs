//! The one place that chooses the path of a forward call ([`OpSpec::path`]), as an engine
//! is chosen for a search: every other part of the crate asks it.

use crate::error::{Error, Result};
use crate::estimate::TapeForm;
use crate::kernels::builtin::Builtin;
use crate::pipeline::plan::OpSpec;
use crate::pipeline::solve::{SolverKind, Source};
use crate::settings::Path;
use crate::tuning::FUSED_MAX_SUMS;
use tch::Device;

impl OpSpec {
    /// The path of a call whose solutions come from `source`, with a tape of `form` (None:
    /// no tape). In order:
    ///
    /// - **CUDA ops** take [`Path::Cuda`] (libtorch chunks on the device, noise from the
    ///   fused CUDA kernel).
    /// - **CPU ops of device solvers** (`chunked`) take [`Path::Chunks`].
    /// - **The built-in argmax** (its own solves, or solutions handed back to its draws)
    ///   takes [`Path::FusedArgmax`] without a tape of samples, when input_numel² ≤
    ///   [`FUSED_MAX_SUMS`] (beyond, the host pipeline's sparse sums cost less), and
    ///   when it has no solution pool (`pooled`: its samples are answered apart).
    /// - **Other host solutions** (callbacks, Rust closures, other built-ins, two-phase
    ///   solutions) take [`Path::Host`].
    ///
    /// A path forced by the config (`Config::set_path`, for tests) replaces the choice
    /// when the call can take it, and fails with INVALID_ARGUMENT when it cannot.
    pub(crate) fn path(
        &self,
        source: &Source<'_>,
        form: Option<TapeForm>,
        pooled: bool,
    ) -> Result<Path> {
        let cpu = self.device == Device::Cpu;
        let on_host = cpu && !self.chunked;
        let host_solutions = on_host
            && matches!(
                source,
                Source::Solver(SolverKind::Host(_) | SolverKind::Builtin(_)) | Source::Provided(_)
            );
        let argmax = match source {
            Source::Solver(SolverKind::Builtin(Builtin::Argmax)) => true,
            Source::Provided(_) => self.builtin_argmax,
            Source::Solver(_) => false,
        };
        // (the fused kernel draws Normal and Gumbel noise only)
        let fused = host_solutions
            && !pooled
            && argmax
            && form != Some(TapeForm::Samples)
            && self.config.noise().has_score();
        let d = self.input_numel;
        let Some(forced) = self.config.path() else {
            return Ok(if !cpu {
                Path::Cuda
            } else if fused && d.checked_mul(d).is_some_and(|dd| dd <= FUSED_MAX_SUMS) {
                Path::FusedArgmax
            } else if host_solutions {
                Path::Host
            } else {
                Path::Chunks
            });
        };
        let possible = match forced {
            Path::FusedArgmax => fused,
            Path::Host => host_solutions,
            Path::Chunks => cpu,
            Path::Cuda => true,
        };
        if possible {
            Ok(forced)
        } else {
            Err(Error::invalid(format!(
                "this call cannot take the forced {forced:?} path (device {:?}, {} solutions, tape {form:?})",
                self.device,
                match source {
                    Source::Provided(_) => "provided",
                    Source::Solver(SolverKind::Host(_)) => "host solver",
                    Source::Solver(SolverKind::Builtin(_)) => "built-in",
                    Source::Solver(SolverKind::Device(_)) => "device solver",
                    Source::Solver(SolverKind::External) => "external",
                }
            )))
        }
    }
}
