//! The in-order combine of a host run's blocks ([`Combine`]).

use super::geometry::BlockPlan;
use crate::error::Result;
use crate::estimate::accumulator::Accumulator;
use crate::estimate::replay::SolutionRows;
use crate::kernels::sums::ProblemSums;

/// What a block gives the in-order combine: the sums of its problem (none for blocks of
/// whole problems, which add into the call's sums in place), and the solutions, for a tape
/// that keeps them.
pub(super) type BlockSums = (Option<ProblemSums>, Option<SolutionRows>);

/// The in-order combine of a host run's blocks into the call's accumulator.
pub(super) struct Combine<'c> {
    pub acc: &'c mut Accumulator,
    pub plan: BlockPlan,
    /// The sums of the current problem so far (blocks of part of a problem).
    pub total: Option<ProblemSums>,
    pub zero: ProblemSums,
}

impl Combine<'_> {
    /// Adds block `g`: its solutions to the tape, its sums to its problem's (added to the
    /// accumulator with the problem's last block).
    pub fn block(&mut self, g: usize, (sums, solutions): BlockSums) -> Result<()> {
        if let Some(solutions) = solutions {
            self.acc.add_solutions(solutions)?;
        }
        if self.plan.whole {
            return Ok(()); // the sums are in place already
        }
        let sums = sums.expect("a block of part of a problem has its sums");
        let total = self.total.get_or_insert_with(|| self.zero.clone());
        total.add(&sums);
        if let Some(problem) = self.plan.ends_problem(g) {
            let total = self.total.take().expect("just added");
            self.acc.add_sums(problem as i64, &total)?;
        }
        Ok(())
    }
}
