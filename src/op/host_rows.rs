//! Solves of host rows (`pert_op_solve`, the methods of `crate::methods`, whose inputs are
//! host rows of their own), with the op's pool where it has one.

use super::PerturbedOp;
use crate::error::{Error, Result};
use crate::pipeline::{CallCache, SolverKind};

impl PerturbedOp {
    /// y*(x) for the `rows` problems of host rows `x` (`rows × input_numel`, finite), as
    /// [`PerturbedOp::solve`] gives it: a host solver is called on the slices themselves
    /// (no tensor is made), others through the op's solve; the solutions join the op's
    /// pool at once (the plain solve, which cannot fail after its solve).
    pub(crate) fn solve_host_rows(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let y = self.solve_host_rows_unpooled(x, rows)?;
        self.grow_pool(&y)?;
        Ok(y)
    }

    /// [`PerturbedOp::solve_host_rows`] with the pool, if any, not grown: a method that
    /// can still fail after its solves hands its solutions back as a [`PoolAddition`],
    /// committed once the call has succeeded, so that a failed call adds nothing.
    pub(crate) fn solve_host_rows_unpooled(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.solve_rows_at(x, rows, self.spec.rows_at(true, 0, rows))
    }

    /// The cache of I-MLE's samples of call `call` (the decisions of a forward call of
    /// that count), when the op has a pool.
    pub(crate) fn samples_cache(&self, call: u64) -> Option<CallCache> {
        let c = self.config();
        let sense = self.objective_sense();
        self.pool()
            .map(|pool| CallCache::new(pool, (c.seed(), call), c.solve_ratio(), sense))
    }

    /// y*(x) for the perturbed samples of `batch` problems (`batch × num_samples` rows of
    /// host values in problem-major order, as a draw's inputs): the solver is told which
    /// problem and sample each row is (`SolveInfo::clean` not set), as in a forward call.
    /// With a `cache` ([`PerturbedOp::samples_cache`]), as in a pooled forward call: each
    /// row goes to the solver with probability solve_ratio, the others are the pool's best
    /// members, and the rows solved are kept in the cache for the pool.
    pub(crate) fn solve_host_samples(
        &self,
        x: &[f32],
        batch: usize,
        cache: Option<&CallCache>,
    ) -> Result<Vec<f32>> {
        let rows = batch * self.config().num_samples() as usize;
        let at = self.spec.rows_at(false, 0, batch);
        let Some(cache) = cache else {
            return self.solve_rows_at(x, rows, at);
        };
        if rows == 0 {
            return Ok(Vec::new());
        }
        let stop = self.interrupts.stop();
        let _cap = crate::intraop::cap(self.config().max_threads());
        stop.check()?;
        let spec = self.spec_here()?;
        let (d, o) = (spec.input_numel, spec.output_numel);
        let x = crate::tensors::from_slice(x)?
            .f_view([rows as i64, d as i64])?
            .f_to_device(spec.device)?;
        let y = spec.solve_cached(&self.solver, &x, at, cache)?;
        let y = crate::tensors::host_floats(&y.dense(o as i64)?)?;
        stop.check()?;
        Ok(y)
    }

    /// y*(x) for `rows` host rows that `at` describes (the pool, if any, not grown).
    pub(crate) fn solve_rows_at(
        &self,
        x: &[f32],
        rows: usize,
        at: crate::solver::SolveInfo,
    ) -> Result<Vec<f32>> {
        if let SolverKind::External = self.solver {
            return Err(Error::invalid(
                "this op has no solver (it was made for the two-phase API): solve its draws' inputs yourself",
            ));
        }
        let stop = self.interrupts.stop();
        let _cap = crate::intraop::cap(self.config().max_threads());
        let (d, o) = (self.spec.input_numel, self.spec.output_numel);
        let len = crate::shape::checked_product(&[rows, o], "rows * output_numel")?;
        stop.check()?;
        let y = match &self.solver {
            SolverKind::Host(host) => {
                // NaN until the solver writes it: an output left unwritten is caught
                let mut y = crate::tensors::nan_room(len, "the solutions")?;
                let at = crate::solver::SolveInfo {
                    cuda_device: None, // host solvers get host memory
                    ..at
                };
                let threads = self.config().effective_threads();
                crate::pipeline::solve_nan_filled_rows(host, x, &mut y, rows, d, o, threads, at)?;
                self.spec.count_solved(rows);
                y
            }
            solver => {
                if rows == 0 {
                    return Ok(Vec::new());
                }
                let spec = self.spec_here()?;
                let x = crate::tensors::from_slice(x)?
                    .f_view([rows as i64, d as i64])?
                    .f_to_device(spec.device)?;
                let y = spec.solve(solver, &x, at)?.dense(o as i64)?;
                crate::tensors::host_floats(&y)?
            }
        };
        // solver calls are not cut short: an interrupt while they ran fails the call here
        stop.check()?;
        Ok(y)
    }

    /// Adds a plain solve's solutions to the op's pool, if it has one.
    pub(super) fn grow_pool(&self, y: &[f32]) -> Result<()> {
        match self.pool() {
            Some(pool) => pool.add_rows(y),
            None => Ok(()),
        }
    }
}

/// The solutions of a method call's solves (in order), for the op's pool: added by
/// [`PoolAddition::commit`] once nothing else of the call can fail (its results staged
/// for the caller), so that a call that fails adds nothing.
#[must_use = "commit the addition once the call has succeeded"]
pub(crate) struct PoolAddition(pub Vec<Vec<f32>>);

impl PoolAddition {
    /// No solutions (a call that solves nothing).
    pub(crate) fn none() -> PoolAddition {
        PoolAddition(Vec::new())
    }

    /// Adds the solutions to `op`'s pool, if it has one, as one addition (all or nothing).
    pub(crate) fn commit(self, op: &PerturbedOp) -> Result<()> {
        let Some(pool) = op.pool() else {
            return Ok(());
        };
        match &self.0[..] {
            [] => Ok(()),
            [one] => pool.add_rows(one),
            parts => {
                let n = parts.iter().map(Vec::len).sum();
                let mut rows = crate::tensors::host_room(n, "the solutions added to the pool")?;
                for part in parts {
                    rows.extend_from_slice(part);
                }
                pool.add_rows(&rows)
            }
        }
    }
}
