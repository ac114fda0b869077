//! A host run: the blocks of one call drawn, perturbed, solved and summed on host buffers
//! by the solver threads (see [`HostRun`]).

use super::combine::{BlockSums, Combine, Recycled};
use super::geometry::{Block, BlockPlan};
use super::whole::WholeSums;
use crate::config::Config;
use crate::error::Result;
use crate::estimate::accumulator::{Accumulator, HostSlices};
use crate::interrupt::Stop;
use crate::kernels::blocks::{run_blocks, run_blocks_on, slots, take, Slots};
use crate::kernels::listed::{Found, Listed, Made};
use crate::kernels::nonzero::NonZeros;
use crate::kernels::sums::{ProblemSums, SumScratch};
use crate::kernels::two_stages::run_two_stages;
use crate::noise::{Noise, NoiseAt, Sampler};
use crate::perturbation::Perturbation;
use crate::pipeline::cache::CallCache;
use crate::pipeline::plan::OpSpec;
use crate::pipeline::solve::{HostSolver, SolverKind, Source};
use crate::rng::Stream;
use crate::solver::SolveInfo;
use crate::uninit::{as_uninit, written};
use std::mem::MaybeUninit;

/// What a host run keeps besides Σ Y_n: fixed for the call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keeps {
    /// Jacobian sums Σ Y_n s_nᵀ (a tape of sums).
    pub jacobian_sums: bool,
    /// The samples' solutions (a CPU tape of samples).
    pub solutions: bool,
    /// Σ x_n (the Fenchel-Young loss's bound).
    pub input_sums: bool,
}

/// The buffers of one solver thread of a host run.
pub(crate) struct Scratch {
    /// Noise, scores (when they are not the noise), perturbed inputs, solutions.
    z: Vec<f32>,
    s: Vec<f32>,
    x: Vec<f32>,
    y: Vec<f32>,
    /// The positions of the ones of 0/1 built-in solutions.
    ones: Vec<u32>,
    /// The non-zero entries of the block's solutions given as whole rows, scanned for a
    /// tape that keeps them.
    nonzero: NonZeros,
    /// The same listed with their values (and inputs), for sums on the helper of a
    /// two-stage run.
    listed: Listed,
    sums: SumScratch,
}

/// What the first stage hands to the second: the block's noise when it was drawn straight
/// into the tape's kept scores (Normal noise: the scores are the noise), and whether the
/// block's inputs are perturbed already.
type Prepared<'s> = (Option<&'s mut [f32]>, bool);

/// What the second stage hands to the sums: the block's noise when it is in the tape's
/// kept scores, and the list of its solutions' non-zero entries it made.
type Solved<'s> = (Option<&'s mut [f32]>, Made);

/// One call of the host pipeline: its geometry, what it reads, and each block's slots in
/// the call's outputs. Its stages are methods: [`HostRun::prepare`] (noise drawn, scores
/// kept, inputs perturbed), [`HostRun::solve`] (solutions and sums) and
/// `Combine::block` (blocks added in their order, so threads never change a bit).
pub(crate) struct HostRun<'a> {
    pub plan: BlockPlan,
    pub d: usize,
    pub o: usize,
    pub config: &'a Config,
    /// θ `[batch, d]` on the host.
    pub theta: &'a [f32],
    pub stream: &'a Stream,
    pub source: Source<'a>,
    /// The call's use of the op's pool; the op's plan (it counts the rows solved).
    pub cache: Option<&'a CallCache>,
    pub spec: &'a OpSpec,
    pub stop: Stop<'a>,
    pub keeps: Keeps,
    /// The call's sums (blocks of whole problems) are handed over unwritten: each block
    /// zeroes its own.
    pub zero_sums: bool,
    /// The length of the inputs' last dimension (a built-in's slices).
    pub last: usize,
    /// Each block's part of the tape's kept scores (written by the block), and of the
    /// call's sums Σ Y_n, Σ ⟨x_n, Y_n⟩, Σ exp(σZ_n − σ²/2) ⊙ Y_n and Σ x_n (blocks of
    /// whole problems).
    pub kept: Slots<'a, MaybeUninit<f32>>,
    pub sum_y: Slots<'a, MaybeUninit<f64>>,
    pub objective: Slots<'a, MaybeUninit<f64>>,
    pub weighted: Slots<'a, MaybeUninit<f64>>,
    pub inputs: Slots<'a, MaybeUninit<f64>>,
    /// Each block's part of the mean (blocks of whole problems), written by the block.
    pub means: Slots<'a, MaybeUninit<f32>>,
    /// The blocks' results taken in, for later blocks to fill again.
    pub recycled: Recycled,
}

impl<'a> HostRun<'a> {
    /// Cuts the call's kept scores (`kept`, room for all of them) and, for blocks of whole
    /// problems, the call's sums (`sums`: Σ Y_n, Σ ⟨x_n, Y_n⟩, weighted, Σ x_n, and the
    /// room for the means) into the blocks' slots.
    pub fn cut(&mut self, kept: Option<&'a mut [MaybeUninit<f32>]>, sums: Option<HostSlices<'a>>) {
        let (plan, d, o) = (self.plan, self.d, self.o);
        let block = |g: usize| plan.block(g);
        if let Some(all) = kept {
            let lens: Vec<usize> = (0..plan.blocks).map(|g| block(g).len() * d).collect();
            // the blocks' parts cover the scores exactly (each block writes all of its own)
            assert_eq!(lens.iter().sum::<usize>(), all.len());
            self.kept = slots(all, lens.into_iter());
        }
        if let Some(HostSlices {
            sum_y,
            objective,
            weighted,
            inputs,
            means,
        }) = sums
        {
            let batch = plan.batch.max(1);
            let (w, xw) = (weighted.len() / batch, inputs.len() / batch);
            let count = |g: usize| block(g).count;
            // the blocks' parts cover the sums exactly (each block writes all of its own)
            assert_eq!((0..plan.blocks).map(count).sum::<usize>(), plan.batch);
            let per_problem = [
                (sum_y.len(), o),
                (weighted.len(), w),
                (inputs.len(), xw),
                (means.len(), o),
            ];
            assert!(per_problem.iter().all(|&(len, w)| len == plan.batch * w));
            assert!(objective.as_ref().is_none_or(|v| v.len() == plan.batch));
            self.sum_y = slots(sum_y, (0..plan.blocks).map(|g| count(g) * o));
            if let Some(objective) = objective {
                self.objective = slots(objective, (0..plan.blocks).map(count));
            }
            self.weighted = slots(weighted, (0..plan.blocks).map(|g| count(g) * w));
            self.inputs = slots(inputs, (0..plan.blocks).map(|g| count(g) * xw));
            self.means = slots(means, (0..plan.blocks).map(|g| count(g) * o));
        }
    }

    /// How the call draws its noise.
    fn sampler(&self) -> Sampler<'a> {
        Sampler {
            noise: self.config.noise(),
            stream: self.stream,
            antithetic: self.config.antithetic(),
            score_is_z: self.multiplicative(),
        }
    }

    pub(super) fn multiplicative(&self) -> bool {
        self.config.perturbation() == Perturbation::Multiplicative
    }

    /// Normal noise is its own score (both models, antithetic pairs too): the kept scores
    /// and the scores of the Jacobian sums are then the noise itself.
    fn scores_are_noise(&self) -> bool {
        self.config.noise() == Noise::Normal
    }

    /// Whether a block draws scores apart from its noise (for Jacobian sums or kept
    /// scores, when they are not the noise).
    fn scores_drawn(&self) -> bool {
        (self.keeps.jacobian_sums || !self.kept.is_empty()) && !self.scores_are_noise()
    }

    pub(super) fn host_solver(&self) -> Option<&'a HostSolver> {
        match self.source {
            Source::Solver(SolverKind::Host(solver)) => Some(solver),
            _ => None,
        }
    }

    /// Argmax and top-k give the positions of their ones (this many a row), which the sums
    /// and the tape take as they are, when there are no Jacobian or weighted sums (rows
    /// with more ones than zeros take the dense path of the sums, as the same solutions
    /// handed in through the two-phase API would).
    pub(super) fn ones_per_row(&self) -> Option<usize> {
        match self.source {
            Source::Solver(SolverKind::Builtin(b))
                if !self.keeps.jacobian_sums && !self.multiplicative() && self.cache.is_none() =>
            {
                b.ones_per_slice()
                    .map(|m| m * (self.d / self.last.max(1)))
                    .filter(|&m| 2 * m <= self.o)
            }
            _ => None,
        }
    }

    /// A thread's buffers.
    fn scratch(&self) -> Scratch {
        let rows = self.plan.block_rows();
        let (d, o) = (self.d, self.o);
        Scratch {
            z: vec![0f32; rows * d],
            s: vec![0f32; if self.scores_drawn() { rows * d } else { 0 }],
            x: vec![0f32; rows * d],
            y: vec![
                0f32;
                if self.ones_per_row().is_some() {
                    0
                } else {
                    rows * o
                }
            ],
            ones: Vec::new(),
            nonzero: NonZeros::default(),
            listed: Listed::default(),
            sums: SumScratch::default(),
        }
    }

    /// The inputs of `block`'s problems perturbed by its noise `z` into `x`.
    fn perturb(&self, block: Block, z: &[f32], x: &mut [f32]) {
        let (d, rows) = (self.d, block.rows);
        let (z, x) = (&z[..block.len() * d], &mut x[..block.len() * d]);
        for (i, (z_i, x_i)) in z.chunks(rows * d).zip(x.chunks_mut(rows * d)).enumerate() {
            let b = block.first + i;
            self.config.perturbation().perturb_host(
                &self.theta[b * d..(b + 1) * d],
                z_i,
                self.config.sigma() as f32,
                x_i,
            );
        }
    }

    /// The first stage of block `g`: its noise (and scores) drawn, its part of the tape's
    /// kept scores written, its inputs perturbed unless `later()` (in two stages: the
    /// calling thread waits for the block, and perturbs it itself).
    pub fn prepare(
        &self,
        g: usize,
        buffers: &mut Scratch,
        later: &dyn Fn() -> bool,
    ) -> Prepared<'a> {
        let block = self.plan.block(g);
        let d = self.d;
        let Scratch { z, s, x, .. } = buffers;
        let mut kept = take(&self.kept, g);
        let into_kept = self.scores_are_noise();
        // the room for the noise: the block's part of the kept scores when they are the
        // noise (drawn there once, no copy), else the block's buffer
        let mut room: &mut [MaybeUninit<f32>] = match kept.as_deref_mut() {
            Some(kept) if into_kept => kept,
            // SAFETY: the draw writes only floats
            _ => unsafe { as_uninit(&mut z[..block.len() * d]) },
        };
        assert_eq!(room.len(), block.len() * d);
        let scores_drawn = self.scores_drawn();
        for i in 0..block.count {
            let part = i * block.rows * d..(i + 1) * block.rows * d;
            let s_i: &mut [f32] = if scores_drawn { &mut s[part] } else { &mut [] };
            let (mine, rest) = std::mem::take(&mut room).split_at_mut(block.rows * d);
            room = rest;
            let at = NoiseAt {
                problem: block.first + i,
                sample: block.n0,
                samples: self.plan.n,
                width: d,
            };
            self.sampler().draw_into(at, mine, s_i, 1);
        }
        let noise = match kept {
            // SAFETY: every float of the part was written above (the draw writes all of
            // each problem's room; the rooms cover the part, asserted)
            Some(kept) if into_kept => Some(unsafe { written(kept) }),
            // the block's kept scores: those drawn, while they are in cache
            Some(kept) => {
                let scores = &s[..block.len() * d];
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
            self.perturb(block, noise.as_deref().unwrap_or(&z[..]), x);
        }
        (noise, perturbed)
    }

    /// The second stage of block `g` (on worker `worker`) and its sums: see
    /// [`HostRun::solve_rows`] and [`HostRun::sum_rows`].
    pub fn solve(
        &self,
        g: usize,
        worker: usize,
        buffers: &mut Scratch,
        prepared: Prepared<'_>,
    ) -> Result<BlockSums> {
        let solved = self.solve_rows(g, worker, buffers, prepared)?;
        self.sum_rows(g, buffers, solved)
    }

    /// The second stage of block `g` (on worker `worker`): its inputs perturbed if they
    /// are not yet, its solutions made (or taken from the provided ones) and checked.
    pub fn solve_rows<'p>(
        &self,
        g: usize,
        worker: usize,
        buffers: &mut Scratch,
        (noise, perturbed): Prepared<'p>,
    ) -> Result<Solved<'p>> {
        self.stop.check()?;
        let block = self.plan.block(g);
        let d = self.d;
        let Scratch {
            z,
            x,
            y,
            ones,
            nonzero,
            listed,
            ..
        } = buffers;
        let (x, y) = (&mut x[..block.len() * d], &mut y[..self.y_len(block)]);
        if !perturbed {
            // the block's noise: in the tape's kept scores, or in the buffer
            let z: &[f32] = noise.as_deref().unwrap_or(&z[..block.len() * d]);
            self.perturb(block, z, x);
        }
        let at = SolveInfo {
            worker,
            clean: false,
            first_row: block.first_row(self.plan.n) as u64,
            num_samples: self.plan.n as u64,
            batch: self.plan.batch,
            cuda_device: None,
            pool: None,
        };
        self.solutions(&at, block, x, y, ones)?;
        let made = self.find_entries(&at, x, y, nonzero, listed)?;
        Ok((noise, made))
    }

    /// The last stage of block `g`, once solved: its sums and solutions taken.
    pub fn sum_rows(
        &self,
        g: usize,
        buffers: &mut Scratch,
        (noise, made): Solved<'_>,
    ) -> Result<BlockSums> {
        let block = self.plan.block(g);
        let d = self.d;
        let Scratch {
            z,
            s,
            x,
            y,
            ones,
            nonzero,
            listed,
            sums,
        } = buffers;
        let rows = BlockRows {
            z: noise.as_deref().unwrap_or(&z[..block.len() * d]),
            s,
            x: &x[..block.len() * d],
            y: &y[..self.y_len(block)],
            ones,
            found: match made {
                Made::Nothing => Found::Nothing,
                Made::Scanned => Found::Scanned(nonzero),
                Made::Listed => Found::Listed(listed),
            },
        };
        self.sum(g, block, &rows, sums)
    }

    /// The sums of block `g`'s samples `rows`, into the call's sums of its problems
    /// (blocks of whole problems) or its problem's sums, and its solutions for a tape that
    /// keeps them.
    fn sum(
        &self,
        g: usize,
        block: Block,
        samples: &BlockRows<'_>,
        scratch: &mut SumScratch,
    ) -> Result<BlockSums> {
        let (d, o, rows) = (self.d, self.o, block.rows);
        let (jacobian_sums, multiplicative) = (self.keeps.jacobian_sums, self.multiplicative());
        let ones_per_row = self.ones_per_row();
        let mut solutions = self.keeps.solutions.then(|| self.recycled.rows(o));
        let slots = [&self.sum_y, &self.objective, &self.weighted, &self.inputs];
        let mut whole = WholeSums::new(block.count, slots.map(|s| take(s, g)), self.zero_sums);
        let mut problem = None;
        for i in 0..block.count {
            let (rd, ro) = (
                i * rows * d..(i + 1) * rows * d,
                i * rows * o..(i + 1) * rows * o,
            );
            let y_i: &[f32] = if samples.y.is_empty() {
                &[]
            } else {
                &samples.y[ro]
            };
            let x_i = &samples.x[rd.clone()];
            // the positions of the ones of problem i's rows (0/1 built-ins)
            let ones_i = ones_per_row.map(|m| (&samples.ones[i * rows * m..(i + 1) * rows * m], m));
            let entries_i = || samples.found.rows(i * rows..(i + 1) * rows);
            let mut unused = 0.0;
            let mut sums = match whole.problem(i, &mut unused) {
                // whole problems: into the call's sums of problem `first + i`
                Some(sums) => sums,
                None => {
                    assert!(problem.is_none(), "a block of part of a problem has one");
                    problem
                        .insert(self.recycled.sums(|| {
                            ProblemSums::zeros(d, o, jacobian_sums, multiplicative)
                                .with_input_sums(d, self.keeps.input_sums)
                        }))
                        .view()
                }
            };
            sums.add_inputs(d, x_i);
            match ones_i {
                Some((ones_i, m)) => sums.add_ones(scratch, d, x_i, ones_i, m),
                None => {
                    let s_i: &[f32] = match (jacobian_sums, self.scores_are_noise()) {
                        (false, _) => &[],
                        (true, true) => &samples.z[rd.clone()],
                        (true, false) => &samples.s[rd.clone()],
                    };
                    let rows_i = (&samples.z[rd], x_i, s_i, y_i);
                    sums.add_rows(scratch, d, rows_i, entries_i(), self.config.sigma() as f32);
                }
            }
            if let Some(solutions) = &mut solutions {
                match ones_i {
                    Some((ones_i, m)) => solutions.push_ones(ones_i, m)?,
                    None => match samples.found {
                        Found::Scanned(scan) => {
                            solutions.push_scanned(y_i, scan.rows(i * rows..(i + 1) * rows))?
                        }
                        _ => unreachable!("solutions kept are scanned"),
                    },
                }
            }
        }
        // blocks of whole problems: their means, from their complete sums
        if let Some(means) = take(&self.means, g) {
            whole.write_means(means, self.plan.n);
        }
        Ok((problem, solutions))
    }
}

/// The samples of a block, after its solve.
struct BlockRows<'s> {
    /// Noise, scores (when drawn apart from the noise), perturbed inputs, solutions (none
    /// for 0/1 built-ins, whose ones are listed in `ones`).
    z: &'s [f32],
    s: &'s [f32],
    x: &'s [f32],
    y: &'s [f32],
    ones: &'s [u32],
    /// The lists of the solutions' non-zero entries that the solve made.
    found: Found<'s>,
}

impl HostRun<'_> {
    /// Runs every block, on the op's workers, in two stages, or on the calling thread and
    /// helpers, combining them into `acc` in their order. Returns only when every block
    /// ran (else the call fails): the blocks' slots are then all written.
    pub fn run(self, acc: &mut Accumulator) -> Result<()> {
        let plan = self.plan;
        let mut scratch: Vec<Scratch> = (0..plan.buffer_sets()).map(|_| self.scratch()).collect();
        let mut combine = Combine {
            acc,
            recycled: &self.recycled,
            plan,
            total: None,
            zero: ProblemSums::zeros(
                self.d,
                self.o,
                self.keeps.jacobian_sums,
                self.multiplicative(),
            )
            .with_input_sums(self.d, self.keeps.input_sums),
        };
        let work = |g: usize, worker: usize, buffers: &mut Scratch| -> Result<BlockSums> {
            let prepared = self.prepare(g, buffers, &|| false);
            self.solve(g, worker, buffers, prepared)
        };
        match self.host_solver().and_then(HostSolver::workers) {
            // a solver with workers: every block on them (worker w is always one thread)
            Some(workers) => run_blocks_on(
                workers,
                plan.threads,
                plan.blocks,
                &mut scratch,
                work,
                |g, block| combine.block(g, block),
            ),
            // a callback on the calling thread alone, with a core to spare: the noise of
            // the next block is drawn on a helper while this thread solves
            None if plan.two_stages => {
                let [a, b]: [Scratch; 2] = scratch.try_into().ok().expect("two buffer sets");
                run_two_stages(
                    plan.blocks,
                    &mut [a, b],
                    |g, buffers, later| self.prepare(g, buffers, later),
                    |g, buffers, prepared| self.solve_rows(g, 0, buffers, prepared),
                    |g, buffers, solved| combine.block(g, self.sum_rows(g, buffers, solved)?),
                )
            }
            // the calling thread works too (it is worker 0)
            None => {
                let mut scratch: Vec<(usize, Scratch)> = scratch.into_iter().enumerate().collect();
                run_blocks(
                    plan.blocks,
                    &mut scratch,
                    |g, (w, buffers)| work(g, *w, buffers),
                    |g, block| combine.block(g, block),
                )
            }
        }
    }
}

/// Whether the calling thread of a two-stage run perturbs every block itself (tests: the
/// path it takes when it waits for the helper, whose choice is otherwise timing's).
fn caller_perturbs() -> bool {
    #[cfg(test)]
    return tests::CALLER_PERTURBS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
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
