//! One forward call's use of its op's solution pool ([`CallCache`]): which samples go to
//! the solver, the pool's answers for the others, and the solutions the call adds to the
//! pool once it has succeeded.
//!
//! Sample row r of call c (problem-major, as [`SolveInfo::first_row`] counts) goes to the
//! solver when word 0 of block r of the decision stream (seed ^ [`DECISION_KEY`], c) is
//! below solve_ratio · 2³², a pure function of (seed, call, row): the same for any number
//! of threads, blocks or chunks. The others are answered by the best member of the pool's
//! snapshot taken when the call began, so answers never depend on other threads; every row
//! solved (and the clean-input baseline's rows) is added to the pool when the call has
//! succeeded, in the call's row order.

use crate::error::Result;
use crate::pipeline::plan::OpSpec;
use crate::pool::{Members, Pool};
use crate::rng::Stream;
use crate::settings::Sense;
use crate::solver::SolveInfo;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// XORed into the seed for the stream of solve-or-answer decisions (so that it is not the
/// noise's stream).
pub(crate) const DECISION_KEY: u64 = 0x706f_6f6c_6465_6369; // "pooldeci"

/// Where a group of solved rows sits in the call: the clean-input baseline's rows first,
/// then the samples, each by its first row.
type RowsKey = (bool, u64);

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
    /// The distinct solutions each solver call made, by where its rows sit in the call.
    solved: Mutex<BTreeMap<RowsKey, Vec<f32>>>,
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
        let o = pool.output_numel();
        CallCache {
            pool,
            members,
            threshold: (ratio * 4_294_967_296.0).ceil() as u64,
            decisions: Stream::new(seed ^ DECISION_KEY, call),
            sense,
            o,
            solved: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether sample row `row` of the call goes to the solver (always, while the
    /// snapshot is empty: there is nothing to answer from).
    fn solves(&self, row: u64) -> bool {
        self.members.len() == 0 || u64::from(self.decisions.block(row)[0]) < self.threshold
    }

    /// The solutions `y` of the call's sample rows `x` (`count` rows of `d` floats, where
    /// `at` says): each run of consecutive rows that go to the solver is solved by
    /// `solve(info, x, count, y)` with its own info; the others are the pool's best
    /// members. The solved rows are kept for the pool. Returns the rows solved.
    pub(crate) fn solutions(
        &self,
        at: &SolveInfo,
        (x, d): (&[f32], usize),
        count: usize,
        y: &mut [f32],
        mut solve: impl FnMut(&SolveInfo, &[f32], usize, &mut [f32]) -> Result<()>,
    ) -> Result<usize> {
        let o = self.o;
        let mut solved = 0;
        let mut r = 0;
        while r < count {
            let first = at.first_row + r as u64;
            if at.clean || self.solves(first) {
                let mut end = r + 1;
                while end < count && (at.clean || self.solves(at.first_row + end as u64)) {
                    end += 1;
                }
                let info = SolveInfo {
                    first_row: first,
                    ..*at
                };
                let ys = &mut y[r * o..end * o];
                solve(&info, &x[r * d..end * d], end - r, ys)?;
                self.keep((at.clean, first), ys);
                solved += end - r;
                r = end;
            } else {
                let best = self
                    .members
                    .best(&x[r * d..(r + 1) * d], self.sense)
                    .expect("a non-empty pool has a best member");
                y[r * o..(r + 1) * o].copy_from_slice(best);
                r += 1;
            }
        }
        Ok(solved)
    }

    /// Keeps the distinct rows of solutions `y` made by the solver at `key`, for the pool.
    pub(crate) fn keep(&self, key: RowsKey, y: &[f32]) {
        let mut seen = HashSet::new();
        let mut distinct = Vec::new();
        for row in y.chunks_exact(self.o.max(1)) {
            let bits: Vec<u32> = row.iter().map(|&v| (v + 0.0).to_bits()).collect();
            if seen.insert(bits) {
                distinct.extend_from_slice(row);
            }
        }
        self.solved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, distinct);
    }

    /// Adds the call's solved rows to the pool, in the call's row order (after the call
    /// has succeeded).
    pub(crate) fn commit(self) -> Result<()> {
        let CallCache {
            pool,
            members,
            solved,
            ..
        } = self;
        drop(members); // (the pool need not copy its members for a snapshot no one reads)
        let solved = solved.into_inner().unwrap_or_else(|e| e.into_inner());
        let rows: Vec<f32> = solved.into_values().flatten().collect();
        pool.add_rows(&rows)
    }
}

/// Rows `x` (`(x, d)`: rows of d floats, where `at` says) solved into `y` by
/// `solve(info, x, count, y)`, or, for a call with a pool, some of them answered from it
/// ([`CallCache::solutions`]); the rows solved counted on `spec`.
pub(crate) fn solve_rows(
    (cache, spec): (Option<&CallCache>, &OpSpec),
    at: &SolveInfo,
    (x, d): (&[f32], usize),
    y: &mut [f32],
    mut solve: impl FnMut(&SolveInfo, &[f32], usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let count = x.len() / d.max(1);
    let solved = match cache {
        Some(cache) => cache.solutions(at, (x, d), count, y, solve)?,
        None => {
            solve(at, x, count, y)?;
            count
        }
    };
    spec.count_solved(solved);
    Ok(())
}
