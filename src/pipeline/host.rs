//! The host pipeline: CPU ops whose solutions come from the host draw, perturb, solve and
//! sum blocks of samples in Rust on host buffers, the blocks shared by the solver threads.

use crate::error::Result;
use crate::estimate::accumulator::Accumulator;
use crate::estimate::replay::SolutionRows;
use crate::estimate::TapeForm;
use crate::kernels::blocks::{run_blocks, run_blocks_on};
use crate::kernels::sums::ProblemSums;
use crate::pipeline::plan::{OpSpec, HOST_BLOCKS, HOST_BLOCK_BYTES, HOST_BLOCK_MIN_ROWS};
use crate::pipeline::solve::{check_finite, check_provided, HostSolver, SolverKind, Source};
use crate::rng::Stream;
use crate::solver::SolveInfo;
use crate::tensors::host_floats;
use tch::Tensor;

impl OpSpec {
    /// The samples of a CPU op whose solutions come from the host (a callback, a built-in
    /// other than the fused argmax, or the two-phase API), in Rust on host buffers: each
    /// block of samples is drawn, perturbed, solved and summed on one of the solver
    /// threads, and the blocks are added in their order (so the results do not depend on
    /// the number of threads). No libtorch parallel
    /// region runs between solver calls, where its OpenMP workers would spin on the cores
    /// the solver threads need.
    pub(crate) fn run_on_host(
        &self,
        theta: &Tensor,
        stream: &Stream,
        source: Source<'_>,
        acc: &mut Accumulator,
    ) -> Result<()> {
        let c = &self.config;
        let (d, o, n) = (
            self.input_numel,
            self.output_numel,
            c.num_samples() as usize,
        );
        let multiplicative = c.perturbation() == crate::perturbation::Perturbation::Multiplicative;
        let sums_form = acc.form() == Some(TapeForm::Sums);
        let keep_solutions = acc.keeps_solutions();
        let per = self.rows_per_block(sums_form);
        let per_problem = n.div_ceil(per);
        let theta_host = host_floats(theta)?;
        let batch = theta_host.len() / d.max(1);
        // a block is `per_problem` blocks of one problem, or, when a problem's samples fit
        // in one block, several whole problems (up to `per` rows; one per block with
        // Jacobian sums, whose o·d entries are a per-problem cost), so that a block's work
        // outweighs its hand-over; the sums of each problem are made the same either way
        let group = if per_problem == 1 && !sums_form {
            // about HOST_BLOCK_MIN_ROWS rows, and the batch still cut into about
            // HOST_BLOCKS blocks (never dependent on the number of threads)
            (HOST_BLOCK_MIN_ROWS / n.max(1))
                .min(batch.div_ceil(HOST_BLOCKS))
                .min((1 << 16) / o.max(1)) // a block's per-problem sums stay small
                // and its buffers (one solver call's rows) within a few cache blocks
                .min(4 * HOST_BLOCK_BYTES as usize / (4 * (3 * d + o) * n).max(1))
                .max(1)
        } else {
            1
        };
        let blocks = if group > 1 {
            batch.div_ceil(group)
        } else {
            batch * per_problem
        };
        let builtin = matches!(source, Source::Solver(SolverKind::Builtin(_)));
        let host_solver = match source {
            Source::Solver(SolverKind::Host(solver)) => Some(&**solver),
            _ => None,
        };
        // callbacks get the config's solver threads; built-ins use every core (up to the
        // config's cap)
        let threads = if builtin {
            c.library_threads()
        } else {
            c.effective_threads()
        };
        let threads = threads.clamp(1, blocks.max(1));
        let last = self.input_shape.last().map_or(1, |&l| l as usize);
        // a block's rows: `per` samples of one problem, or all samples of `group` problems
        let block_rows = if group > 1 { group * n } else { per };
        // per solver thread: noise, scores, perturbed inputs, solutions
        let mut scratch: Vec<[Vec<f32>; 4]> = (0..threads)
            .map(|_| {
                [
                    vec![0f32; block_rows * d],
                    vec![0f32; block_rows * d],
                    vec![0f32; block_rows * d],
                    vec![0f32; block_rows * o],
                ]
            })
            .collect();
        // the sums of each problem of the block (or of the block of one problem), and the
        // solutions, for a tape that keeps them
        type Block = (Vec<ProblemSums>, Option<SolutionRows>);
        let work = |g: usize, worker: usize, buffers: &mut [Vec<f32>; 4]| -> Result<Block> {
            let (first, count, k) = if group > 1 {
                (g * group, group.min(batch - g * group), 0)
            } else {
                (g / per_problem, 1, g % per_problem)
            };
            // every problem of the block has `rows` samples here, from sample n0
            let (n0, rows) = (k * per, per.min(n - k * per));
            let total_rows = count * rows;
            let [z, s, x, y] = &mut *buffers;
            let (z, s, x, y) = (
                &mut z[..total_rows * d],
                &mut s[..total_rows * d],
                &mut x[..total_rows * d],
                &mut y[..total_rows * o],
            );
            // scores only for Jacobian sums (a tape of solutions draws them again later)
            let s: &mut [f32] = if sums_form { s } else { &mut [] };
            for i in 0..count {
                let b = first + i;
                let part = i * rows * d..(i + 1) * rows * d;
                let s_i: &mut [f32] = if sums_form { &mut s[part.clone()] } else { &mut [] };
                c.noise().draw_samples(
                    stream,
                    c.antithetic(),
                    multiplicative,
                    (b, n, n0, d),
                    &mut z[part.clone()],
                    s_i,
                    1,
                );
                c.perturbation().perturb_host(
                    &theta_host[b * d..(b + 1) * d],
                    &z[part.clone()],
                    c.sigma() as f32,
                    &mut x[part],
                );
            }
            // the block's rows are consecutive in the call's problem-major order: one
            // solver call for all of them
            let first_row = (first * n + n0) as u64;
            match source {
                Source::Solver(SolverKind::Host(_)) => {
                    let solver = host_solver.expect("a host solver");
                    let at = SolveInfo {
                        worker,
                        clean: false,
                        first_row,
                        num_samples: n as u64,
                        batch,
                        cuda_device: None,
                    };
                    y.fill(f32::NAN);
                    solver.call(&at, x, total_rows, y)?;
                    check_finite(y, o, &at)?;
                }
                Source::Solver(SolverKind::Builtin(builtin)) => builtin.solve_host(x, last, y),
                Source::Provided(all) => {
                    let first = first_row as usize;
                    check_provided(&all[first * o..(first + total_rows) * o], first, o)?;
                    y.copy_from_slice(&all[first * o..(first + total_rows) * o]);
                }
                Source::Solver(_) => unreachable!("only host solutions take the host path"),
            }
            let mut all = Vec::with_capacity(count);
            let mut solutions = keep_solutions.then(|| SolutionRows::new(o));
            for i in 0..count {
                let (rd, ro) = (i * rows * d..(i + 1) * rows * d, i * rows * o..(i + 1) * rows * o);
                let s_i: &[f32] = if sums_form { &s[rd.clone()] } else { &[] };
                let mut sums = ProblemSums::zeros(d, o, sums_form, multiplicative);
                sums.add_rows(d, &z[rd.clone()], &x[rd], s_i, &y[ro.clone()], c.sigma() as f32);
                all.push(sums);
                if let Some(solutions) = &mut solutions {
                    solutions.push(&y[ro])?;
                }
            }
            Ok((all, solutions))
        };
        let mut total = ProblemSums::zeros(d, o, sums_form, multiplicative);
        let combine = |g: usize, (all, solutions): Block| -> Result<()> {
            if let Some(solutions) = solutions {
                acc.add_solutions(solutions)?;
            }
            if group > 1 {
                // whole problems: their sums go to the accumulator (in place, no libtorch
                // operation while the solver threads work)
                for (i, sums) in all.iter().enumerate() {
                    acc.add_sums((g * group + i) as i64, sums)?;
                }
                return Ok(());
            }
            total.add(&all[0]);
            if g % per_problem == per_problem - 1 {
                // the last block of a problem
                acc.add_sums((g / per_problem) as i64, &total)?;
                total = ProblemSums::zeros(d, o, sums_form, multiplicative);
            }
            Ok(())
        };
        match host_solver.and_then(HostSolver::workers) {
            // a solver with workers: every block on them (worker w is always one thread)
            Some(workers) => run_blocks_on(workers, threads, blocks, &mut scratch, work, combine),
            // the calling thread works too (it is worker 0)
            None => {
                let mut scratch: Vec<(usize, [Vec<f32>; 4])> = scratch.into_iter().enumerate().collect();
                run_blocks(
                    blocks,
                    &mut scratch,
                    |g, (w, buffers)| work(g, *w, buffers),
                    combine,
                )
            }
        }
    }
}
