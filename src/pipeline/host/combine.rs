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
    /// Zero sums of the call's shape (the first of the recycled ones).
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
        let (zero, recycled) = (&self.zero, self.recycled);
        let total = self
            .total
            .get_or_insert_with(|| recycled.sums(|| zero.clone()));
        total.add(sums);
        if let Some(problem) = self.plan.ends_problem(g) {
            let total = self.total.take().expect("just added");
            let added = self.acc.add_sums(problem as i64, &total);
            self.recycled.sums.put(Some(total));
            added?;
        }
        Ok(())
    }
}

/// The blocks' solutions and sums that the combine has taken in, handed back for later
/// blocks to fill again (their memory kept): a block's results are made on one thread
/// and were dropped on another, where a worker's allocations and the calling thread's
/// release of them contended for the allocator's lock (a thread put to sleep then waits
/// for its wake-up). At most the blocks in flight, and a problem's running total.
#[derive(Default)]
pub(crate) struct Recycled {
    rows: FreeList<SolutionRows>,
    sums: FreeList<ProblemSums>,
}

impl Recycled {
    /// Solutions to fill: handed back ones, cleared, or new ones of `o` outputs.
    pub(super) fn rows(&self, o: usize) -> SolutionRows {
        self.rows.take(SolutionRows::clear, || SolutionRows::new(o))
    }

    /// Zero sums: handed back ones, zeroed (the call's blocks all have the same shape),
    /// or `make()`.
    pub(super) fn sums(&self, make: impl FnOnce() -> ProblemSums) -> ProblemSums {
        self.sums.take(ProblemSums::reset, make)
    }

    /// Hands back a block's solutions and sums once they are taken in.
    fn give_back(&self, (sums, rows): BlockSums) {
        self.rows.put(rows);
        self.sums.put(sums);
    }
}

/// Values handed back for reuse.
struct FreeList<T>(std::sync::Mutex<Vec<T>>);

impl<T> Default for FreeList<T> {
    fn default() -> Self {
        FreeList(Default::default())
    }
}

impl<T> FreeList<T> {
    /// A value handed back, made ready by `ready` (with the lock released: other threads
    /// take and hand back meanwhile), or `make()`.
    fn take(&self, ready: impl FnOnce(&mut T), make: impl FnOnce() -> T) -> T {
        let back = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match back {
            Some(mut value) => {
                ready(&mut value);
                value
            }
            None => make(),
        }
    }

    /// Hands `value` back, if any.
    fn put(&self, value: Option<T>) {
        if let Some(value) = value {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(value);
        }
    }
}
