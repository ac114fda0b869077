//! The in-order combine of a host run's blocks ([`Combine`]), and the results it hands back
//! for later blocks to fill again ([`Recycled`]).

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
    /// Where the blocks' results go once taken in (for later blocks to fill again).
    pub recycled: &'c Recycled,
    pub plan: BlockPlan,
    /// The sums of the current problem so far (blocks of part of a problem).
    pub total: Option<ProblemSums>,
    pub zero: ProblemSums,
}

impl Combine<'_> {
    /// Adds block `g`: its solutions to the tape, its sums to its problem's (added to the
    /// accumulator with the problem's last block); then hands them back to the pool, for
    /// later blocks to fill again (also when adding them failed).
    pub fn block(&mut self, g: usize, block: BlockSums) -> Result<()> {
        let taken = self.take_in(g, &block);
        self.recycled.give_back(block);
        taken
    }

    fn take_in(&mut self, g: usize, (sums, solutions): &BlockSums) -> Result<()> {
        if let Some(solutions) = solutions {
            self.acc.add_solutions(solutions)?;
        }
        if self.plan.whole {
            return Ok(()); // the sums are in place already
        }
        let sums = sums
            .as_ref()
            .expect("a block of part of a problem has its sums");
        let total = self.total.get_or_insert_with(|| self.zero.clone());
        total.add(sums);
        if let Some(problem) = self.plan.ends_problem(g) {
            let total = self.total.take().expect("just added");
            self.acc.add_sums(problem as i64, &total)?;
        }
        Ok(())
    }
}

/// The blocks' solutions and sums that the combine has taken in, handed back for later
/// blocks to fill again (their memory kept): a block's results are made on one thread
/// and were dropped on another, where a worker's allocations and the calling thread's
/// release of them contended for the allocator's lock (a thread put to sleep then waits
/// for its wake-up). At most the blocks in flight.
#[derive(Default)]
pub(crate) struct Recycled {
    rows: std::sync::Mutex<Vec<SolutionRows>>,
    sums: std::sync::Mutex<Vec<ProblemSums>>,
}

impl Recycled {
    /// Solutions to fill: handed back ones, cleared, or new ones of `o` outputs.
    pub(super) fn rows(&self, o: usize) -> SolutionRows {
        let back = self.rows.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match back {
            Some(mut rows) => {
                rows.clear();
                rows
            }
            None => SolutionRows::new(o),
        }
    }

    /// Zero sums: handed back ones, zeroed (the call's blocks all have the same shape),
    /// or `make()`.
    pub(super) fn sums(&self, make: impl FnOnce() -> ProblemSums) -> ProblemSums {
        // (zeroed or made with the lock released: other blocks take and give back meanwhile)
        let back = self.sums.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match back {
            Some(mut sums) => {
                sums.reset();
                sums
            }
            None => make(),
        }
    }

    /// Hands back a block's solutions and sums once they are taken in.
    fn give_back(&self, (sums, rows): BlockSums) {
        if let Some(rows) = rows {
            self.rows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(rows);
        }
        if let Some(sums) = sums {
            self.sums
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(sums);
        }
    }
}
