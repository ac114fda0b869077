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
        #[cfg(test)]
        if made == Made::Listed {
            tests::LISTED_BLOCKS.with(|n| n.set(n.get() + 1));
        }
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::op::PerturbedOp;
    use tch::{Kind, Tensor};

    thread_local! {
        /// The blocks whose solutions this thread listed (lists are made where the
        /// callback runs: in two stages, the calling thread), so that a test counts its
        /// own calls' blocks, not those of tests running beside it.
        pub(super) static LISTED_BLOCKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A one-thread callback with short rows lists them when it runs in two stages (a
    /// machine of two cores or more): blocks of part of a problem with a tape of Jacobian
    /// sums, and blocks of several whole problems without a tape; the means are those of
    /// two solver threads, bit for bit.
    #[test]
    fn short_rows_of_a_two_stage_call_are_listed() {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            return; // one core: no two stages
        }
        let d = 10i64;
        for (batch, n, tape) in [(8i64, 4000u64, true), (64, 100, false)] {
            let theta = Tensor::linspace(-3.0, 3.0, batch * d, (Kind::Float, tch::Device::Cpu))
                .reshape([batch, d])
                .cos();
            let run = |threads: u32| {
                let mut c = Config::new();
                c.set_num_samples(n).unwrap().set_sigma(0.5).unwrap();
                c.set_seed(5).set_threads(threads).unwrap();
                let op = PerturbedOp::new(&c, &[d], &[d], |x: &[f32], rows, y: &mut [f32]| {
                    for (xr, yr) in x.chunks_exact(x.len() / rows).zip(y.chunks_exact_mut(10)) {
                        let best = (0..10).fold(0, |b, i| if xr[i] > xr[b] { i } else { b });
                        yr.iter_mut()
                            .enumerate()
                            .for_each(|(i, v)| *v = f32::from(i == best));
                    }
                    Ok::<(), String>(())
                })
                .unwrap();
                let y = if tape {
                    op.forward_with_tape(&theta).unwrap().0
                } else {
                    op.forward(&theta).unwrap()
                };
                Vec::<f32>::try_from(y.flatten(0, -1))
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            let before = LISTED_BLOCKS.with(std::cell::Cell::get);
            let one = run(1);
            assert!(
                LISTED_BLOCKS.with(std::cell::Cell::get) > before,
                "{batch}x{d}x{n}: no block listed"
            );
            assert!(
                one == run(2),
                "{batch}x{d}x{n}: the mean differs from two threads'"
            );
        }
    }
}
