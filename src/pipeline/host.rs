//! The host pipeline: CPU ops whose solutions come from the host draw, perturb, solve and
//! sum blocks of samples in Rust on host buffers, the blocks shared by the solver threads.

use crate::error::Result;
use crate::estimate::accumulator::Accumulator;
use crate::estimate::replay::SolutionRows;
use crate::estimate::TapeForm;
use crate::interrupt::Stop;
use crate::kernels::blocks::{run_blocks, run_blocks_on, run_pipelined, slots, take};
use crate::kernels::nonzero::NonZeros;
use crate::kernels::sums::{ProblemSums, SumScratch, SumsMut};
use crate::pipeline::plan::{
    OpSpec, HOST_BLOCKS, HOST_BLOCK_BYTES, HOST_BLOCK_MIN_ROWS, HOST_THREAD_VALUES, PIPELINE_BLOCKS,
};
use crate::pipeline::solve::{check_finite, check_provided, HostSolver, SolverKind, Source};
use crate::rng::Stream;
use crate::room::{as_room, written};
use crate::solver::SolveInfo;
use crate::tensors::{host_floats, HostFloats};
use std::mem::MaybeUninit;
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
        stop: Stop<'_>,
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
        // a copy (batch · d floats, against batch · N · d of work) when the caller's
        // solver runs while it is read (a Rust solver could reach the caller's tensor);
        // read in place for the built-ins and provided solutions (no code of the
        // caller's runs during the call) and for C callbacks (the C layer passes a copy
        // of its own)
        let theta_host = match source {
            Source::Solver(SolverKind::Host(h)) if !h.theta_is_private() => {
                HostFloats::Copied(host_floats(theta)?)
            }
            _ => HostFloats::of(theta)?,
        };
        let theta_host: &[f32] = &theta_host;
        let batch = theta_host.len() / d.max(1);
        // a block is `per_problem` blocks of one problem, or, when a problem's samples fit
        // in one block, several whole problems (up to `per` rows; one per block with
        // Jacobian sums, whose o·d entries are a per-problem cost), so that a block's work
        // outweighs its hand-over; the sums of each problem are made the same either way
        let host_solver = match source {
            Source::Solver(SolverKind::Host(solver)) => Some(&**solver),
            _ => None,
        };
        // a callback on one thread (the calling thread: see pert_config_set_threads), with
        // another core for the library and enough work, runs in two stages: the noise of
        // the next block drawn on a helper while this thread solves (blocks of whole
        // problems are then fewer and larger, each worth a hand-over between the two;
        // blocks of part of a problem, or of one problem with Jacobian sums, stay as
        // they are: the sums are the same either way)
        let values = batch.saturating_mul(n).saturating_mul(d);
        let pipelined = host_solver.is_some_and(|h| h.workers().is_none())
            && c.effective_threads() == 1
            && c.library_threads() >= 2
            && values >= 2 * HOST_THREAD_VALUES;
        let builtin = matches!(source, Source::Solver(SolverKind::Builtin(_)));
        // callbacks get the config's solver threads; built-ins use every core (up to the
        // config's cap), a core for at least HOST_THREAD_VALUES perturbed values (a smaller
        // share costs less than handing it over)
        let threads = if builtin {
            c.library_threads().min(values / HOST_THREAD_VALUES)
        } else {
            c.effective_threads()
        }
        .max(1);
        let group = if per_problem == 1 && !sums_form {
            // about HOST_BLOCK_MIN_ROWS rows, and the batch still cut into about
            // HOST_BLOCKS blocks (PIPELINE_BLOCKS for two stages), but none of fewer than
            // BLOCK_VALUES perturbed values while there are two blocks a thread: each block
            // a hand-over between threads (a problem's sums do not depend on the blocks it
            // is grouped in)
            let values_of = |floor: usize| floor / (n * d).max(1);
            if pipelined {
                (HOST_BLOCK_MIN_ROWS / n.max(1))
                    .max(values_of(HOST_THREAD_VALUES))
                    .min(batch.div_ceil(PIPELINE_BLOCKS))
            } else {
                (HOST_BLOCK_MIN_ROWS / n.max(1))
                    .min(batch.div_ceil(HOST_BLOCKS))
                    .max(values_of(BLOCK_VALUES))
                    .min(batch.div_ceil(2 * threads)) // still two blocks a thread
            }
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
        let threads = threads.clamp(1, blocks.max(1));
        let pipelined = pipelined && blocks >= 2;
        let buffer_sets = if pipelined { 2 } else { threads };
        let last = self.input_shape.last().map_or(1, |&l| l as usize);
        // a block's rows: `per` samples of one problem, or all samples of `group` problems
        let block_rows = if group > 1 { group * n } else { per };
        // argmax and top-k give the positions of their ones (this many a row), which the
        // sums and the tape take as they are, when there are no Jacobian or weighted sums
        // (rows with more ones than zeros take the dense path of the sums, as the same
        // solutions handed in through the two-phase API would)
        let ones_per_row = match source {
            Source::Solver(SolverKind::Builtin(b)) if !sums_form && !multiplicative => b
                .ones_per_slice()
                .map(|m| m * (d / last.max(1)))
                .filter(|&m| 2 * m <= o),
            _ => None,
        };
        // the room for the tape's kept scores (not zeroed: each block writes its own)
        let mut kept = acc.take_scores();
        // Normal noise is its own score (both models, antithetic pairs too): the kept
        // scores and the scores of the Jacobian sums are then the noise itself
        let scores_are_noise = c.noise() == crate::noise::Noise::Normal;
        // per solver thread: noise, scores (for Jacobian sums or kept scores, when they are
        // not the noise), perturbed inputs, solutions, and the tiles of the sums
        let scores_drawn = (sums_form || kept.is_some()) && !scores_are_noise;
        let mut scratch: Vec<Scratch> = (0..buffer_sets)
            .map(|_| Scratch {
                z: vec![0f32; block_rows * d],
                s: vec![0f32; if scores_drawn { block_rows * d } else { 0 }],
                x: vec![0f32; block_rows * d],
                y: vec![
                    0f32;
                    if ones_per_row.is_some() {
                        0
                    } else {
                        block_rows * o
                    }
                ],
                ones: Vec::new(),
                nonzero: NonZeros::default(),
                sums: SumScratch::default(),
            })
            .collect();
        // the first problem, the number of problems, and the index among its problem's
        // blocks of block g; every problem of the block has `rows` samples there, from
        // sample n0
        let block_at = |g: usize| {
            let (first, count, k) = if group > 1 {
                (g * group, group.min(batch - g * group), 0)
            } else {
                (g / per_problem, 1, g % per_problem)
            };
            let (n0, rows) = (k * per, per.min(n - k * per));
            (first, count, n0, rows)
        };
        // the tape's kept scores, each block's rows (consecutive in the call's
        // problem-major order) written by that block, once
        let all_scores = batch * n * d;
        let kept_slots = match kept.as_mut() {
            Some(all) => {
                let lens: Vec<usize> = (0..blocks)
                    .map(|g| {
                        let (_, count, _, rows) = block_at(g);
                        count * rows * d
                    })
                    .collect();
                // the blocks' parts cover the scores exactly (they are all written below
                // before the length is set)
                assert_eq!(lens.iter().sum::<usize>(), all_scores);
                slots(
                    &mut all.spare_capacity_mut()[..all_scores],
                    lens.into_iter(),
                )
            }
            None => Vec::new(),
        };
        // blocks of whole problems add their samples straight into their problems' sums
        let whole = per_problem == 1 && !sums_form;
        let mut host_sums = whole.then(|| acc.take_host_sums());
        let (mut sum_slots, mut objective_slots, mut weighted_slots, mut input_slots) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let input_sums = acc.keeps_input_sums();
        let (weighted, inputs) = match host_sums.as_mut() {
            Some(host_sums) => {
                let (sum_y, objective, sum_wy, sum_x) = host_sums.slices();
                let w = sum_wy.len() / batch.max(1);
                let xw = sum_x.len() / batch.max(1);
                let count = |g: usize| block_at(g).1;
                sum_slots = slots(sum_y, (0..blocks).map(|g| count(g) * o));
                if let Some(objective) = objective {
                    objective_slots = slots(objective, (0..blocks).map(count));
                }
                weighted_slots = slots(sum_wy, (0..blocks).map(|g| count(g) * w));
                input_slots = slots(sum_x, (0..blocks).map(|g| count(g) * xw));
                (w, xw)
            }
            None => (0, 0),
        };
        // the sums of each problem of the block (or of the block of one problem; none for
        // blocks of whole problems), and the solutions, for a tape that keeps them
        type Block = (Vec<ProblemSums>, Option<SolutionRows>);
        // the inputs of block g's problems perturbed by its noise `z` into `x`
        let perturb = |g: usize, z: &[f32], x: &mut [f32]| {
            let (first, count, _, rows) = block_at(g);
            let (z, x) = (&z[..count * rows * d], &mut x[..count * rows * d]);
            for (i, (z_i, x_i)) in z.chunks(rows * d).zip(x.chunks_mut(rows * d)).enumerate() {
                let b = first + i;
                c.perturbation().perturb_host(
                    &theta_host[b * d..(b + 1) * d],
                    z_i,
                    c.sigma() as f32,
                    x_i,
                );
            }
        };
        // the first stage of a block: its noise (and scores) drawn, its part of the tape's
        // kept scores written, its inputs perturbed unless `later()` (in two stages: the
        // calling thread waits for the block, and perturbs it itself); returns that part
        // of the kept scores when the noise itself was drawn into it (Normal noise: the
        // scores are the noise), the block's noise for the second stage, and whether the
        // inputs are perturbed
        let prepare = |g: usize,
                       buffers: &mut Scratch,
                       later: &dyn Fn() -> bool|
         -> (Option<&mut [f32]>, bool) {
            let (first, count, n0, rows) = block_at(g);
            let total_rows = count * rows;
            let Scratch { z, s, x, .. } = buffers;
            let mut kept = take(&kept_slots, g);
            // the room for the noise: the block's part of the kept scores when they are
            // the noise (drawn there once, no copy), else the block's buffer
            let mut room: &mut [MaybeUninit<f32>] = match kept.as_deref_mut() {
                Some(kept) if scores_are_noise => kept,
                // SAFETY: draw_samples_into writes only floats
                _ => unsafe { as_room(&mut z[..total_rows * d]) },
            };
            assert_eq!(room.len(), total_rows * d);
            // the noise, and the scores for Jacobian sums or the tape into `s` (a tape of
            // solutions that keeps none draws them again later)
            for i in 0..count {
                let b = first + i;
                let part = i * rows * d..(i + 1) * rows * d;
                let s_i: &mut [f32] = if scores_drawn {
                    &mut s[part.clone()]
                } else {
                    &mut []
                };
                let (mine, rest) = std::mem::take(&mut room).split_at_mut(rows * d);
                room = rest;
                c.noise().draw_samples_into(
                    stream,
                    c.antithetic(),
                    multiplicative,
                    (b, n, n0, d),
                    mine,
                    s_i,
                    1,
                );
            }
            let noise = match kept {
                // SAFETY: every float of the part was written above (draw_samples_into
                // writes all of each problem's room; the rooms cover the part, asserted)
                Some(kept) if scores_are_noise => Some(unsafe { written(kept) }),
                // the block's kept scores: those drawn, while they are in cache
                Some(kept) => {
                    let scores = &s[..total_rows * d];
                    assert_eq!(kept.len(), scores.len());
                    for (k, &v) in kept.iter_mut().zip(scores) {
                        k.write(v);
                    }
                    None
                }
                None => None,
            };
            let perturbed = !(later() || caller_perturbs());
            if perturbed {
                perturb(g, noise.as_deref().unwrap_or(&z[..]), x);
            }
            (noise, perturbed)
        };
        // the second stage: the block solved (by `worker`), its sums and solutions taken
        let finish = |g: usize,
                      worker: usize,
                      buffers: &mut Scratch,
                      (noise, perturbed): (Option<&mut [f32]>, bool)|
         -> Result<Block> {
            stop.check()?;
            let (first, count, n0, rows) = block_at(g);
            let total_rows = count * rows;
            let Scratch {
                z,
                s,
                x,
                y,
                ones,
                nonzero,
                sums: sum_scratch,
            } = buffers;
            // (no dense solutions for 0/1 built-ins)
            let y_len = if ones_per_row.is_some() {
                0
            } else {
                total_rows * o
            };
            let (x, y) = (&mut x[..total_rows * d], &mut y[..y_len]);
            // the block's noise: in the tape's kept scores, or in the buffer
            let z: &[f32] = match noise {
                Some(kept) => kept,
                None => &z[..total_rows * d],
            };
            if !perturbed {
                perturb(g, z, x);
            }
            // the block's rows are consecutive in the call's problem-major order: one
            // solver call for all of them
            let first_row = (first * n + n0) as u64;
            let at = SolveInfo {
                worker,
                clean: false,
                first_row,
                num_samples: n as u64,
                batch,
                cuda_device: None,
            };
            match source {
                Source::Solver(SolverKind::Host(_)) => {
                    let solver = host_solver.expect("a host solver");
                    y.fill(f32::NAN);
                    // (the call puts back the thread's floating-point settings, whatever
                    // the callback did to them: which thread perturbs or sums a block
                    // never changes a bit)
                    solver.call(&at, x, total_rows, y)?;
                    // checked finite below (by the scan, or check_finite)
                }
                Source::Solver(SolverKind::Builtin(builtin)) => match ones_per_row {
                    Some(_) => builtin.ones_host(x, d, last, ones),
                    None => builtin.solve_host(x, last, y),
                },
                Source::Provided(all) => {
                    let first = first_row as usize;
                    check_provided(&all[first * o..(first + total_rows) * o], first, o)?;
                    y.copy_from_slice(&all[first * o..(first + total_rows) * o]);
                }
                Source::Solver(_) => unreachable!("only host solutions take the host path"),
            }
            // a callback's solutions checked finite (the error says where; the built-ins'
            // and the provided ones are finite); for a tape that keeps the solutions, with
            // their non-zero entries found once for it and the sums (the scan lists rows
            // of up to o/2 of them, or every row when Jacobian or weighted sums need each
            // entry), else the sums find them
            let scanned = !y.is_empty() && keep_solutions;
            let called = matches!(source, Source::Solver(SolverKind::Host(_)));
            if scanned {
                let most = if sums_form || (multiplicative && o == d) {
                    o
                } else {
                    o / 2
                };
                if !nonzero.scan(y, o, most) {
                    check_finite(y, o, &at)?;
                }
            } else if called && !y.is_empty() {
                check_finite(y, o, &at)?;
            }
            let mut all = Vec::with_capacity(if whole { 0 } else { count });
            let mut solutions = keep_solutions.then(|| SolutionRows::new(o));
            let (mut sum_y, mut objective, mut sum_wy, mut sum_x) = (
                take(&sum_slots, g),
                take(&objective_slots, g),
                take(&weighted_slots, g),
                take(&input_slots, g),
            );
            for i in 0..count {
                let (rd, ro) = (
                    i * rows * d..(i + 1) * rows * d,
                    i * rows * o..(i + 1) * rows * o,
                );
                let y_i: &[f32] = if y.is_empty() { &[] } else { &y[ro.clone()] };
                let rows_i: (&[f32], &[f32], &[f32], &[f32]) =
                    (&z[rd.clone()], &x[rd.clone()], &[], y_i);
                // the positions of the ones of problem i's rows (0/1 built-ins)
                let ones_i = ones_per_row.map(|m| (&ones[i * rows * m..(i + 1) * rows * m], m));
                let mut unused = 0.0;
                let mut problem_sums = ProblemSums::zeros(0, 0, false, false);
                let mut sums = match sum_y.as_deref_mut() {
                    // whole problems: into the call's sums of problem `first + i`
                    Some(sum_y) => SumsMut {
                        sum_y: &mut sum_y[i * o..(i + 1) * o],
                        sum_s: &mut [],
                        sum_ys: &mut [],
                        objective: objective.as_deref_mut().map_or(&mut unused, |v| &mut v[i]),
                        sum_wy: sum_wy
                            .as_deref_mut()
                            .map_or(&mut [][..], |v| &mut v[i * weighted..(i + 1) * weighted]),
                        touched: &mut [],
                        sum_x: sum_x
                            .as_deref_mut()
                            .map_or(&mut [][..], |v| &mut v[i * inputs..(i + 1) * inputs]),
                    },
                    None => {
                        problem_sums = ProblemSums::zeros(d, o, sums_form, multiplicative)
                            .with_input_sums(d, input_sums);
                        problem_sums.view()
                    }
                };
                sums.add_inputs(d, rows_i.1);
                match ones_i {
                    Some((ones_i, m)) => sums.add_ones(sum_scratch, d, rows_i.1, ones_i, m),
                    None => {
                        let s_i: &[f32] = match (sums_form, scores_are_noise) {
                            (false, _) => &[],
                            (true, true) => &z[rd],
                            (true, false) => &s[rd],
                        };
                        let rows_i = (rows_i.0, rows_i.1, s_i, rows_i.3);
                        let nonzero_i = scanned.then(|| nonzero.rows(i * rows..(i + 1) * rows));
                        sums.add_rows(sum_scratch, d, rows_i, nonzero_i, c.sigma() as f32);
                    }
                }
                if sum_y.is_none() {
                    all.push(problem_sums);
                }
                if let Some(solutions) = &mut solutions {
                    match ones_i {
                        Some((ones_i, m)) => solutions.push_ones(ones_i, m)?,
                        None => {
                            solutions.push_scanned(y_i, nonzero.rows(i * rows..(i + 1) * rows))?
                        }
                    }
                }
            }
            Ok((all, solutions))
        };
        let zero_sums =
            || ProblemSums::zeros(d, o, sums_form, multiplicative).with_input_sums(d, input_sums);
        let mut total = zero_sums();
        let combine = |g: usize, (all, solutions): Block| -> Result<()> {
            if let Some(solutions) = solutions {
                acc.add_solutions(solutions)?;
            }
            if whole {
                return Ok(()); // the sums are in place already
            }
            total.add(&all[0]);
            if g % per_problem == per_problem - 1 {
                // the last block of a problem
                acc.add_sums((g / per_problem) as i64, &total)?;
                total = zero_sums();
            }
            Ok(())
        };
        let work = |g: usize, worker: usize, buffers: &mut Scratch| -> Result<Block> {
            let prepared = prepare(g, buffers, &|| false);
            finish(g, worker, buffers, prepared)
        };
        match host_solver.and_then(HostSolver::workers) {
            // a solver with workers: every block on them (worker w is always one thread)
            Some(workers) => run_blocks_on(workers, threads, blocks, &mut scratch, work, combine)?,
            // a callback on the calling thread alone, with a core to spare: the noise of
            // the next block is drawn on a helper while this thread solves
            None if pipelined => {
                let mut combine = combine;
                let [a, b]: [Scratch; 2] = scratch.try_into().ok().expect("two buffers");
                run_pipelined(blocks, &mut [a, b], prepare, |g, buffers, prepared| {
                    combine(g, finish(g, 0, buffers, prepared)?)
                })?
            }
            // the calling thread works too (it is worker 0)
            None => {
                let mut scratch: Vec<(usize, Scratch)> = scratch.into_iter().enumerate().collect();
                run_blocks(
                    blocks,
                    &mut scratch,
                    |g, (w, buffers)| work(g, *w, buffers),
                    combine,
                )?
            }
        }
        // every block ran (else the call failed above): all the kept scores and the
        // sums of whole problems are written
        drop((
            kept_slots,
            sum_slots,
            objective_slots,
            weighted_slots,
            input_slots,
        ));
        if let Some(mut kept) = kept {
            // SAFETY: the room holds `all_scores` floats (reserved by the accumulator for
            // batch · N · d), and every block ran (else the call failed above, dropping the
            // room unread), each writing every float of its part; the parts cover
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

/// The fewest perturbed values (problems × samples × inputs) in a block of whole problems
/// (fewer only when the call is smaller): a smaller block costs more in its hand-over
/// between threads than it gains in balance.
const BLOCK_VALUES: usize = 4 << 10;

/// Whether the calling thread of a two-stage run perturbs every block itself (tests: the
/// path it takes when it waits for the helper, whose choice is otherwise timing's).
fn caller_perturbs() -> bool {
    #[cfg(test)]
    return tests::CALLER_PERTURBS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// The buffers of one solver thread of the host pipeline.
struct Scratch {
    z: Vec<f32>,
    s: Vec<f32>,
    x: Vec<f32>,
    y: Vec<f32>,
    /// The positions of the ones of 0/1 built-in solutions.
    ones: Vec<u32>,
    /// The non-zero entries of the block's solutions given as whole rows, for a tape that
    /// keeps them.
    nonzero: NonZeros,
    sums: SumScratch,
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::op::PerturbedOp;
    use crate::perturbation::Perturbation;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tch::{Kind, Tensor};

    /// See [`super::caller_perturbs`].
    pub(super) static CALLER_PERTURBS: AtomicBool = AtomicBool::new(false);

    /// A one-thread callback in two stages gives the same bits whether the helper or the
    /// calling thread perturbs the blocks (the calling thread does when it waits for the
    /// helper), with a tape of samples (the noise drawn into the tape's kept scores) and a
    /// tape of Jacobian sums, both perturbation models.
    #[test]
    fn the_thread_that_perturbs_a_block_changes_no_bit() {
        for (batch, d, n) in [(64i64, 1000i64, 4u64), (8, 10, 4000)] {
            for model in [Perturbation::Additive, Perturbation::Multiplicative] {
                let theta = Tensor::linspace(-3.0, 3.0, batch * d, (Kind::Float, tch::Device::Cpu))
                    .reshape([batch, d])
                    .cos();
                let g = (&theta * 1.7).sin();
                let run = |caller: bool| {
                    CALLER_PERTURBS.store(caller, Ordering::Relaxed);
                    let mut c = Config::new();
                    c.set_num_samples(n).unwrap().set_sigma(0.5).unwrap();
                    c.set_perturbation(model).set_seed(5);
                    c.set_threads(1).unwrap();
                    let op = PerturbedOp::new(&c, &[d], &[d], |x: &[f32], rows, y: &mut [f32]| {
                        let d = x.len() / rows;
                        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
                            let best = (0..d).fold(0, |b, i| if xr[i] > xr[b] { i } else { b });
                            yr.iter_mut()
                                .enumerate()
                                .for_each(|(i, v)| *v = f32::from(i == best));
                        }
                        Ok::<(), String>(())
                    })
                    .unwrap();
                    let (y, tape) = op.forward_with_tape(&theta).unwrap();
                    let v = tape.vjp(&g).unwrap();
                    CALLER_PERTURBS.store(false, Ordering::Relaxed);
                    (y, v)
                };
                let ((y0, v0), (y1, v1)) = (run(false), run(true));
                let bits = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
                let same = |a: &Tensor, b: &Tensor| {
                    bits(a)
                        .iter()
                        .zip(bits(b))
                        .all(|(x, y)| x.to_bits() == y.to_bits())
                };
                assert!(same(&y0, &y1), "{batch}x{d}x{n} {model:?}: the mean");
                assert!(same(&v0, &v1), "{batch}x{d}x{n} {model:?}: the VJP");
            }
        }
    }
}
