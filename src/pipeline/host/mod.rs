//! The host pipeline: CPU ops whose solutions come from the host (callbacks, built-ins
//! other than the fused argmax, two-phase solutions) draw, perturb, solve and sum blocks
//! of samples in Rust on host buffers, the blocks shared by the solver threads and added
//! in their order (so the results do not depend on the number of threads), with no
//! libtorch operation between solver calls (the OpenMP rule of [`crate::tuning`]).
//!
//! [`geometry`] cuts a call into blocks ([`geometry::BlockPlan`]); [`run`] runs them
//! ([`run::HostRun`]: prepare, solve, combine); [`solutions`] makes and checks a block's
//! solutions.

mod combine;
pub(crate) mod geometry;
pub(crate) mod run;
mod solutions;
mod whole;

use crate::error::Result;
use crate::estimate::accumulator::Accumulator;
use crate::estimate::TapeForm;
use crate::interrupt::Stop;
use crate::pipeline::cache::CallCache;
use crate::pipeline::plan::OpSpec;
use crate::pipeline::solve::{SolverKind, Source};
use crate::rng::Stream;
use crate::tensors::{host_floats, HostFloats};
use geometry::{BlockPlan, HostSizes};
use run::{HostRun, Keeps};
use tch::Tensor;

impl OpSpec {
    /// The samples of a CPU op whose solutions come from the host, summed into `acc`.
    pub(crate) fn run_on_host(
        &self,
        theta: &Tensor,
        stream: &Stream,
        (source, cache): (Source<'_>, Option<&CallCache>),
        stop: Stop<'_>,
        acc: &mut Accumulator,
    ) -> Result<()> {
        let c = &self.config;
        // a copy (batch · d floats, against batch · N · d of work) when the caller's
        // solver runs while it is read (a Rust solver could reach the caller's tensor);
        // read in place for the built-ins and provided solutions (no code of the caller's
        // runs during the call) and for C callbacks (the C layer passes a copy, or the
        // caller's buffer, borrowed for the call and unchanged until it returns)
        let theta_host = match source {
            Source::Solver(SolverKind::Host(h)) if !h.theta_is_private() => {
                HostFloats::Copied(host_floats(theta)?)
            }
            _ => HostFloats::of(theta)?,
        };
        let (d, o) = (self.input_numel, self.output_numel);
        let keeps = Keeps {
            jacobian_sums: acc.form() == Some(TapeForm::Sums),
            solutions: acc.keeps_solutions(),
            input_sums: acc.keeps_input_sums(),
        };
        let plan = BlockPlan::new(&HostSizes {
            batch: theta_host.len() / d.max(1),
            n: c.num_samples() as usize,
            d,
            o,
            rows_per_block: self.rows_per_block(keeps.jacobian_sums),
            jacobian_sums: keeps.jacobian_sums,
            builtin: matches!(source, Source::Solver(SolverKind::Builtin(_))),
            plain_callback: matches!(source, Source::Solver(SolverKind::Host(h)) if h.workers().is_none()),
            solver_threads: c.effective_threads(),
            cores: c.library_threads(),
        });
        // the room for the tape's kept scores (not zeroed: each block writes its own), and
        // the call's sums, which blocks of whole problems add their samples straight into
        let mut kept = acc.take_scores();
        let mut host_sums = plan.whole.then(|| acc.take_host_sums()).transpose()?;
        let all_scores = plan.batch * plan.n * d;
        let mut run = HostRun {
            plan,
            d,
            o,
            config: c,
            theta: &theta_host,
            stream,
            source,
            cache,
            spec: self,
            stop,
            keeps,
            zero_sums: host_sums.as_ref().is_some_and(|sums| sums.unzeroed),
            last: self.input_shape.last().map_or(1, |&l| l as usize),
            kept: Vec::new(),
            sum_y: Vec::new(),
            objective: Vec::new(),
            weighted: Vec::new(),
            inputs: Vec::new(),
            means: Vec::new(),
            recycled: Default::default(),
        };
        run.cut(
            kept.as_mut()
                .map(|all| &mut all.spare_capacity_mut()[..all_scores]),
            host_sums.as_mut().map(|sums| sums.slices()),
        );
        run.run(acc)?;
        if let Some(mut kept) = kept {
            // SAFETY: the room holds `all_scores` floats (reserved by the accumulator for
            // batch · N · d), and every block ran (else the call failed above, dropping
            // the room unread), each writing every float of its part; the parts cover
            // 0 .. all_scores (asserted where they were cut).
            unsafe { kept.set_len(all_scores) };
            acc.put_scores(kept);
        }
        if let Some(host_sums) = host_sums {
            acc.put_host_sums(host_sums);
        }
        Ok(())
    }
}
