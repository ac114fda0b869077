//! The geometry of a host run: how a call's samples are cut into blocks, and how many
//! threads and buffer sets run them. A plain value, made from sizes alone, so that it can
//! be tested without running anything.

use crate::tuning::{
    HOST_BLOCKS, HOST_BLOCK_BYTES, HOST_BLOCK_MIN_ROWS, HOST_THREAD_VALUES, TWO_STAGE_BLOCKS,
    WHOLE_BLOCK_MIN_VALUES,
};

/// What the geometry of a host run depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostSizes {
    /// Problems, samples per problem, inputs and outputs per sample.
    pub batch: usize,
    pub n: usize,
    pub d: usize,
    pub o: usize,
    /// Samples per block of part of a problem (`OpSpec::rows_per_block`).
    pub rows_per_block: usize,
    /// The tape keeps Jacobian sums (o·d entries per problem, a per-block cost).
    pub jacobian_sums: bool,
    /// The solver is a built-in (its work per value is known: threads by the work).
    pub builtin: bool,
    /// The solver is a callback without workers of its own (two stages are possible).
    pub plain_callback: bool,
    /// The config's solver threads, and the cores the library may use.
    pub solver_threads: usize,
    pub cores: usize,
}

/// How a host run cuts its samples into blocks (see [`BlockPlan::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockPlan {
    pub batch: usize,
    pub n: usize,
    /// Samples per block of part of a problem.
    per: usize,
    /// Blocks per problem (1 when a problem's samples fit in one block).
    pub per_problem: usize,
    /// Whole problems per block (1: a block holds samples of one problem).
    pub group: usize,
    /// Blocks add their samples straight into their problems' sums (every block holds
    /// whole problems, and no Jacobian sums are kept).
    pub whole: bool,
    pub blocks: usize,
    /// Threads that run blocks (the calling thread included).
    pub threads: usize,
    /// Two stages: the noise of the next block drawn on a helper while the calling thread
    /// solves (a callback on one thread, with a core to spare).
    pub two_stages: bool,
}

/// One block: `count` problems from `first`, each with samples `n0 .. n0 + rows` in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub first: usize,
    pub count: usize,
    pub n0: usize,
    pub rows: usize,
}

impl Block {
    /// The rows (samples) in the block, of all its problems.
    pub fn len(&self) -> usize {
        self.count * self.rows
    }

    /// The index of the block's first row in the call's problem-major order (its rows are
    /// consecutive there), with `n` samples per problem.
    pub fn first_row(&self, n: usize) -> usize {
        self.first * n + self.n0
    }
}

impl BlockPlan {
    /// A block is `per_problem` blocks of one problem, or, when a problem's samples fit in
    /// one block, several whole problems (one per block with Jacobian sums, whose o·d
    /// entries are a per-problem cost), so that a block's work outweighs its hand-over.
    /// The sums of each problem are made the same either way, so neither the grouping nor
    /// the threads change a bit.
    pub fn new(s: &HostSizes) -> BlockPlan {
        let HostSizes { batch, n, d, .. } = *s;
        let per = s.rows_per_block.max(1);
        let per_problem = n.div_ceil(per);
        let values = batch.saturating_mul(n).saturating_mul(d);
        // a callback on one thread (the calling thread: see pert_config_set_threads), with
        // another core for the library and enough work
        let two_stages = s.plain_callback
            && s.solver_threads == 1
            && s.cores >= 2
            && values >= 2 * HOST_THREAD_VALUES;
        // callbacks get the config's solver threads; built-ins use every core (up to the
        // config's cap), a core for at least HOST_THREAD_VALUES perturbed values
        let threads = if s.builtin {
            s.cores.min(values / HOST_THREAD_VALUES)
        } else {
            s.solver_threads
        }
        .max(1);
        let whole = per_problem == 1 && !s.jacobian_sums;
        let group = if whole {
            Self::group(s, threads, two_stages)
        } else {
            1
        };
        let blocks = if group > 1 {
            batch.div_ceil(group)
        } else {
            batch * per_problem
        };
        BlockPlan {
            batch,
            n,
            per,
            per_problem,
            group,
            whole,
            blocks,
            threads: threads.clamp(1, blocks.max(1)),
            two_stages: two_stages && blocks >= 2,
        }
    }

    /// Whole problems per block: about HOST_BLOCK_MIN_ROWS rows, and the batch still cut
    /// into about HOST_BLOCKS blocks (TWO_STAGE_BLOCKS for two stages, whose blocks are
    /// fewer and larger, each worth a hand-over between the two), but none of fewer than
    /// WHOLE_BLOCK_MIN_VALUES perturbed values while there are two blocks a thread; a
    /// block's per-problem sums stay small, and its buffers (one solver call's rows)
    /// within a few cache blocks.
    fn group(s: &HostSizes, threads: usize, two_stages: bool) -> usize {
        let (batch, n, d, o) = (s.batch, s.n, s.d, s.o);
        let values_of = |floor: usize| floor / (n * d).max(1);
        if two_stages {
            (HOST_BLOCK_MIN_ROWS / n.max(1))
                .max(values_of(HOST_THREAD_VALUES))
                .min(batch.div_ceil(TWO_STAGE_BLOCKS))
        } else {
            (HOST_BLOCK_MIN_ROWS / n.max(1))
                .min(batch.div_ceil(HOST_BLOCKS))
                .max(values_of(WHOLE_BLOCK_MIN_VALUES))
                .min(batch.div_ceil(2 * threads)) // still two blocks a thread
        }
        .min((1 << 16) / o.max(1))
        .min(4 * HOST_BLOCK_BYTES as usize / (4 * (3 * d + o) * n).max(1))
        .max(1)
    }

    /// Block `g`.
    pub fn block(&self, g: usize) -> Block {
        let (first, count, k) = if self.group > 1 {
            (
                g * self.group,
                self.group.min(self.batch - g * self.group),
                0,
            )
        } else {
            (g / self.per_problem, 1, g % self.per_problem)
        };
        let n0 = k * self.per;
        Block {
            first,
            count,
            n0,
            rows: self.per.min(self.n - n0),
        }
    }

    /// The most rows of a block: the rows of a thread's buffers.
    pub fn block_rows(&self) -> usize {
        if self.group > 1 {
            self.group * self.n
        } else {
            self.per
        }
    }

    /// The buffer sets the run needs: one per thread, two for two stages.
    pub fn buffer_sets(&self) -> usize {
        if self.two_stages {
            2
        } else {
            self.threads
        }
    }

    /// The problem whose last block `g` is, if it is one (blocks of part of a problem).
    pub fn ends_problem(&self, g: usize) -> Option<usize> {
        (g % self.per_problem == self.per_problem - 1).then_some(g / self.per_problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(batch: usize, n: usize, d: usize, per: usize) -> HostSizes {
        HostSizes {
            batch,
            n,
            d,
            o: d,
            rows_per_block: per,
            jacobian_sums: false,
            builtin: false,
            plain_callback: true,
            solver_threads: 1,
            cores: 2,
        }
    }

    /// Every sample of every problem is in exactly one block, in the call's order, and
    /// each block fits its thread's buffers, whatever the sizes and threads.
    #[test]
    fn blocks_cover_every_sample_once_in_order() {
        let mut cases = 0;
        for (batch, n, d) in [
            (1, 1, 1),
            (64, 1, 1000),
            (32, 10, 40),
            (256, 100, 100),
            (8, 4000, 10),
            (3, 7, 5),
            (1000, 2, 3),
        ] {
            for per in [1, 3, 64, 512, 4096] {
                for threads in [1, 2, 5] {
                    for (sums, builtin, plain) in [
                        (false, false, true),
                        (true, false, false),
                        (false, true, false),
                    ] {
                        let mut s = sizes(batch, n, d, per);
                        (
                            s.jacobian_sums,
                            s.builtin,
                            s.plain_callback,
                            s.solver_threads,
                        ) = (sums, builtin, plain, threads);
                        let plan = BlockPlan::new(&s);
                        let mut next = 0; // the next row expected, problem-major
                        for g in 0..plan.blocks {
                            let b = plan.block(g);
                            assert!(b.count >= 1 && b.rows >= 1, "{s:?} block {g}: {b:?}");
                            assert!(b.len() <= plan.block_rows(), "{s:?} block {g}");
                            assert_eq!(b.first_row(n), next, "{s:?} block {g}");
                            assert!(b.count == 1 || (b.n0 == 0 && b.rows == n), "{s:?} {b:?}");
                            next += if b.count > 1 { b.count * n } else { b.rows };
                            if b.count == 1 && b.n0 + b.rows < n {
                                assert!(!plan.whole && plan.ends_problem(g).is_none());
                            }
                        }
                        assert_eq!(next, batch * n, "{s:?}: every row once");
                        assert!(plan.threads >= 1 && plan.threads <= plan.blocks.max(1));
                        assert!(!plan.two_stages || (plan.blocks >= 2 && plain && threads == 1));
                        assert!(plan.group == 1 || plan.whole);
                        assert!(!(sums && plan.whole));
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 300);
    }

    /// A problem's blocks do not depend on the threads (so neither do its sums).
    #[test]
    fn the_blocks_of_a_problem_do_not_depend_on_the_threads() {
        for (batch, n, d) in [(4, 5000, 10), (64, 1, 1000), (1000, 10, 4)] {
            let parts = |threads: usize| {
                let mut s = sizes(batch, n, d, 512);
                (s.solver_threads, s.cores) = (threads, threads.max(2));
                let plan = BlockPlan::new(&s);
                let mut per_problem = vec![Vec::new(); batch];
                for g in 0..plan.blocks {
                    let b = plan.block(g);
                    for parts in &mut per_problem[b.first..b.first + b.count] {
                        parts.push((b.n0, b.rows));
                    }
                }
                per_problem
            };
            assert_eq!(parts(1), parts(2));
            assert_eq!(parts(1), parts(7));
        }
    }
}
