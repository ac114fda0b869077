//! The solutions of a host run's block: made by its source (a callback, a built-in, or
//! those handed in), checked, and their non-zero entries found for the sums and the tape
//! where that pays.

use super::geometry::Block;
use super::run::HostRun;
use crate::error::Result;
use crate::kernels::listed::{Listed, Made};
use crate::kernels::nonzero::NonZeros;
use crate::pipeline::cache::solve_or_answer;
use crate::pipeline::solve::{check_finite, check_provided, SolverKind, Source};
use crate::solver::SolveInfo;
use crate::tuning::LISTED_UP_TO;

impl HostRun<'_> {
    /// The floats of `block`'s dense solutions (none for 0/1 built-ins, which list the
    /// positions of their ones).
    pub(super) fn y_len(&self, block: Block) -> usize {
        if self.ones_per_row().is_some() {
            0
        } else {
            block.len() * self.o
        }
    }

    /// The solutions of the block's perturbed inputs `x` into `y` (or, for 0/1 built-ins,
    /// the positions of their ones into `ones`).
    pub(super) fn solutions(
        &self,
        at: &SolveInfo,
        block: Block,
        x: &mut [f32],
        y: &mut [f32],
        ones: &mut Vec<u32>,
    ) -> Result<()> {
        let o = self.o;
        match self.source {
            Source::Solver(SolverKind::Host(solver)) => {
                y.fill(f32::NAN);
                // (the call puts back the thread's floating-point settings, whatever the
                // callback did to them: which thread perturbs or sums a block never
                // changes a bit); checked finite by the caller. With info: told its rows.
                let solve = |at: &SolveInfo, x: &[f32], n, y: &mut [f32]| solver.call(at, x, n, y);
                let rows = (&*x, self.d, solver.workers().is_some());
                solve_or_answer((self.cache, self.spec), at, rows, y, solve)?;
            }
            Source::Solver(SolverKind::Builtin(builtin)) => match self.ones_per_row() {
                Some(_) => {
                    builtin.ones_host(x, self.d, self.last, ones);
                    self.spec.count_solved(block.len());
                }
                None => {
                    let solve = |_: &SolveInfo, x: &[f32], _, y: &mut [f32]| {
                        builtin.solve_host(x, self.last, y);
                        Ok(())
                    };
                    solve_or_answer((self.cache, self.spec), at, (x, self.d, false), y, solve)?
                }
            },
            Source::Provided(all) => {
                let first = at.first_row as usize;
                let part = &all[first * o..(first + block.len()) * o];
                check_provided(part, first, o)?;
                y.copy_from_slice(part);
            }
            Source::Solver(_) => unreachable!("only host solutions take the host path"),
        }
        Ok(())
    }

    /// A block's solutions `y` (of perturbed inputs `x`) checked: a callback's are finite
    /// (the error says where; the built-ins' and the provided ones are finite). For a tape
    /// that keeps the solutions, their non-zero entries are found once for it and the sums
    /// (the scan lists rows of up to o/2 of them, or every row when Jacobian or weighted
    /// sums need each entry); in two stages, short rows are listed with their values (and
    /// inputs) while they are in this thread's cache, for the sums on the helper; else the
    /// sums find them. Returns which list was made.
    pub(super) fn find_entries(
        &self,
        at: &SolveInfo,
        x: &[f32],
        y: &[f32],
        nonzero: &mut NonZeros,
        listed: &mut Listed,
    ) -> Result<Made> {
        let (d, o) = (self.d, self.o);
        let called = self.host_solver().is_some();
        let made = match () {
            _ if y.is_empty() => Made::Nothing,
            _ if self.keeps.solutions => Made::Scanned,
            _ if called && self.plan.two_stages && o <= LISTED_UP_TO && Listed::fits(y.len()) => {
                Made::Listed
            }
            _ => Made::Nothing,
        };
        let finite = match made {
            Made::Listed => listed.list(y, o, (o == d).then_some(x)),
            Made::Scanned => {
                let jacobian = self.keeps.jacobian_sums || (self.multiplicative() && o == d);
                nonzero.scan(y, o, if jacobian { o } else { o / 2 })
            }
            Made::Nothing => !called,
        };
        if !finite && !y.is_empty() {
            check_finite(y, o, at)?;
        }
        Ok(made)
    }
}
