//! One forward call's use of its op's solution pool ([`CallCache`]): which samples go to
//! the solver, the pool's answers for the others, and the solutions the call adds to the
//! pool once it has succeeded.
//!
//! Sample row r of call c (problem-major, as [`SolveInfo::first_row`] counts) goes to the
//! solver when word 0 of block r of the decision stream (seed ^ [`DECISION_KEY`], c) is
//! below solve_ratio · 2³², a pure function of (seed, call, row): the same for any number
//! of threads, blocks or chunks. The others are answered by the best member of the pool's
//! snapshot taken when the call began, so answers never depend on other threads; the rows
//! solved (and the clean-input baseline's rows) are added to the pool when the call has
//! succeeded: those new to the pool as the call began, the `capacity` that occur last in
//! the call's row order, kept meanwhile within the pool's capacity ([`Recent`]).

use crate::error::Result;
use crate::error::{Error, Status};
use crate::pipeline::plan::OpSpec;
use crate::pool::{Members, Pool};
use crate::recent::{Place, Recent};
use crate::rng::Stream;
use crate::settings::Sense;
use crate::solver::SolveInfo;
use std::sync::{Arc, Mutex};

/// XORed into the seed for the stream of solve-or-answer decisions (so that it is not the
/// noise's stream).
pub(crate) const DECISION_KEY: u64 = 0x706f_6f6c_6465_6369; // "pooldeci"

/// The place in the call of the row `r` rows after where `at` says.
fn place(at: &SolveInfo, r: usize) -> Place {
    (u8::from(!at.clean), at.first_row + r as u64)
}

/// A forward call's use of its op's pool.
pub(crate) struct CallCache {
    pool: Arc<Pool>,
    members: Arc<Members>,
    /// Rows solved with probability ratio: below this, word 0 of a row's block solves it
    /// (2³² and above: every row).
    threshold: u64,
    decisions: Stream,
    sense: Sense,
    o: usize,
    /// The solutions the call adds to the pool: the distinct rows solved that the pool
    /// did not hold, the `capacity` that occur last (bounded memory).
    solved: Mutex<Recent>,
    /// The snapshot for the solver's warm starts.
    view: crate::solver::PoolView,
}

/// The call's snapshot of the pool in the op's sense, searched for warm starts.
struct Snapshot(Arc<Members>, Sense);

impl crate::solver::PoolSearch for Snapshot {
    fn best(&self, x: &[f32]) -> Option<&[f32]> {
        (x.len() == self.0.numel())
            .then(|| self.0.best(x, self.1))
            .flatten()
    }

    fn numel(&self) -> usize {
        self.0.numel()
    }
}

impl CallCache {
    /// The cache of call `call` of an op with `pool` (whose solutions have `o` floats).
    pub(crate) fn new(
        pool: Arc<Pool>,
        (seed, call): (u64, u64),
        ratio: f64,
        sense: Sense,
    ) -> CallCache {
        let members = pool.snapshot();
        let (o, capacity) = (pool.output_numel(), pool.capacity());
        let view = crate::solver::PoolView::new(Arc::new(Snapshot(members.clone(), sense)));
        CallCache {
            view,
            pool,
            members,
            threshold: crate::rng::chance_threshold(ratio),
            decisions: Stream::new(seed ^ DECISION_KEY, call),
            sense,
            o,
            solved: Mutex::new(Recent::new(o, capacity)),
        }
    }

    /// A cache of the same call for another set of its rows (I-MLE's samples moved the
    /// other way): the same snapshot and decisions, its own solutions to add.
    pub(crate) fn sibling(&self) -> CallCache {
        CallCache {
            view: self.view.clone(),
            pool: self.pool.clone(),
            members: self.members.clone(),
            threshold: self.threshold,
            decisions: self.decisions,
            sense: self.sense,
            o: self.o,
            solved: Mutex::new(Recent::new(self.o, self.pool.capacity())),
        }
    }

    /// The pool as this call sees it, for the warm starts of a solver of rows in host
    /// memory (a device solver's rows on a GPU are not: it gets none).
    fn view_for(&self, at: &SolveInfo) -> Option<crate::solver::PoolView> {
        at.cuda_device.is_none().then(|| self.view.clone())
    }

    /// Whether sample row `row` of the call goes to the solver (always, while the
    /// snapshot is empty: there is nothing to answer from).
    fn solves(&self, row: u64) -> bool {
        self.members.len() == 0 || u64::from(self.decisions.block(row)[0]) < self.threshold
    }

    /// The solutions `y` of the call's sample rows `x` (`count` rows of `d` floats, where
    /// `at` says): the rows that go to the solver are solved by `solve(info, x, count, y)`,
    /// the others are the pool's best members. A solver that is told where its rows sit
    /// (`exact_info`: a solver with info, a device solver) gets each run of consecutive
    /// rows as a call of its own; any other gets all of them gathered into one call. The
    /// solved rows are kept for the pool. Returns the rows solved.
    pub(crate) fn solutions(
        &self,
        at: &SolveInfo,
        (x, d, exact_info): (&[f32], usize, bool),
        count: usize,
        y: &mut [f32],
        mut solve: impl FnMut(&SolveInfo, &[f32], usize, &mut [f32]) -> Result<()>,
    ) -> Result<usize> {
        let o = self.o;
        let mut solved = Vec::new();
        solved.try_reserve_exact(count).map_err(|_| no_room())?;
        solved.extend((0..count).filter(|&r| at.clean || self.solves(at.first_row + r as u64)));
        for r in (0..count).filter(|r| solved.binary_search(r).is_err()) {
            let best = self
                .members
                .best(&x[r * d..(r + 1) * d], self.sense)
                .expect("a non-empty pool has a best member");
            y[r * o..(r + 1) * o].copy_from_slice(best);
        }
        if solved.len() == count || exact_info {
            // runs of consecutive rows, each told where it sits
            let mut i = 0;
            while i < solved.len() {
                let mut j = i + 1;
                while j < solved.len() && solved[j] == solved[j - 1] + 1 {
                    j += 1;
                }
                let (first, end) = (solved[i], solved[j - 1] + 1);
                let info = SolveInfo {
                    first_row: at.first_row + first as u64,
                    pool: self.view_for(at),
                    ..at.clone()
                };
                let ys = &mut y[first * o..end * o];
                solve(&info, &x[first * d..end * d], end - first, ys)?;
                self.keep(ys, |k| place(&info, k))?;
                i = j;
            }
        } else if !solved.is_empty() {
            // gathered into one call (the info's first row is the first solved row's)
            let mut xs = crate::tensors::host_room(solved.len() * d, "the rows to solve")?;
            for &r in &solved {
                xs.extend_from_slice(&x[r * d..(r + 1) * d]);
            }
            let mut ys = crate::tensors::nan_room(solved.len() * o, "their solutions")?;
            let info = SolveInfo {
                first_row: at.first_row + solved[0] as u64,
                pool: self.view_for(at),
                ..at.clone()
            };
            solve(&info, &xs, solved.len(), &mut ys).map_err(|e| {
                Error::new(
                    e.status(),
                    format!(
                        "{} (the {} rows of this block that went to the solver, gathered into one call: their row numbers are not consecutive)",
                        e.message(),
                        solved.len()
                    ),
                )
            })?;
            for (k, &r) in solved.iter().enumerate() {
                y[r * o..(r + 1) * o].copy_from_slice(&ys[k * o..(k + 1) * o]);
            }
            self.keep(&ys, |k| place(at, solved[k]))?;
        }
        Ok(solved.len())
    }

    /// Keeps the rows of solutions `y` made by the solver (row k at `place(k)` in the call)
    /// that the pool did not hold when the call began, for the pool.
    pub(crate) fn keep(&self, y: &[f32], place: impl Fn(usize) -> Place) -> Result<()> {
        let o = self.o;
        // here, in parallel: the rows the pool holds left out, and of each solution only its
        // last occurrence, among the `capacity` last (an earlier one can never stay)
        let fresh = self.members.fresh(y)?;
        if fresh.is_empty() {
            return Ok(());
        }
        let mut solved = self.solved.lock().unwrap_or_else(|e| e.into_inner());
        for (k, hash) in fresh {
            solved.offer(place(k), &y[k * o..(k + 1) * o], hash)?;
        }
        Ok(())
    }

    /// The pool and the solutions to add to it, the call's snapshot let go.
    fn into_additions(self) -> (Arc<Pool>, Recent) {
        let CallCache {
            pool,
            members,
            solved,
            view,
            ..
        } = self;
        drop((members, view));
        (pool, solved.into_inner().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Rows `x` (`(x, d, exact_info)`: rows of d floats, where `at` says, for a solver told
/// where they sit or not) solved into `y` by `solve(info, x, count, y)`, or, for a call
/// with a pool, some of them answered from it ([`CallCache::solutions`]); the rows solved
/// counted on `spec`.
pub(crate) fn solve_or_answer(
    (cache, spec): (Option<&CallCache>, &OpSpec),
    at: &SolveInfo,
    (x, d, exact_info): (&[f32], usize, bool),
    y: &mut [f32],
    mut solve: impl FnMut(&SolveInfo, &[f32], usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let count = x.len() / d.max(1);
    let solved = match cache {
        Some(cache) => cache.solutions(at, (x, d, exact_info), count, y, solve)?,
        None => {
            solve(at, x, count, y)?;
            count
        }
    };
    spec.count_solved(solved);
    Ok(())
}

/// The solutions a call adds to its op's pool (a forward or Fenchel-Young call's, I-MLE's
/// samples): committed once everything else of the call has succeeded (its outputs made,
/// in the C layer staged), so that a call that fails leaves the pool as it was.
#[must_use]
pub(crate) struct Additions(pub(crate) Vec<CallCache>);

impl Additions {
    /// None to add.
    pub(crate) fn none() -> Additions {
        Additions(Vec::new())
    }

    /// Adds them, each cache's in turn in the call's row order, by one addition to their
    /// pool (all or nothing; the caches of one call share its pool).
    pub(crate) fn commit(self) -> Result<()> {
        // every snapshot of the call goes first, so that the pool changes in place when no
        // other call reads it (else the addition copies it)
        let parts: Vec<(Arc<Pool>, Recent)> =
            self.0.into_iter().map(CallCache::into_additions).collect();
        let Some(pool) = parts.first().map(|(pool, _)| pool.clone()) else {
            return Ok(());
        };
        let mut rows = Vec::new();
        for (other, recent) in &parts {
            assert!(
                Arc::ptr_eq(other, &pool),
                "the caches of one call share its pool"
            );
            recent.append_to(&mut rows)?;
        }
        if rows.is_empty() {
            return Ok(());
        }
        drop(parts);
        pool.add_rows(&rows)
    }
}

/// TORCH_ERROR: no memory for the solutions a call keeps for its pool.
fn no_room() -> Error {
    Error::new(
        Status::TorchError,
        "cannot allocate the solutions a call adds to its pool",
    )
}
