//! A fused CPU kernel for the built-in argmax: draws, perturbs, solves and reduces each
//! sample in one pass over cache-sized blocks, on all cores, instead of a chain of
//! libtorch calls over chunk-sized tensors. Used when the op runs on the CPU and the tape
//! keeps sums (or no tape is needed) of a small problem (see `OpSpec::path`).
//!
//! The samples of a problem are cut into fixed blocks of [`FUSED_BLOCK`] rows; each block's sums
//! are made on one thread and the blocks are added in their order, so the results do not
//! depend on the number of threads, bit for bit.

use crate::error::Result;
use crate::interrupt::Stop;
use crate::kernels::blocks::run_blocks;
use crate::kernels::largest::first_max;
use crate::kernels::sums::ProblemSums;
use crate::noise::{Noise, NoiseAt, Sampler};
use crate::perturbation::Perturbation;
use crate::rng::Stream;
use crate::tuning::{FUSED_BLOCK, FUSED_TILE};

/// One problem of a call: θ, its index `b` in the batch, its `n` samples, and the
/// solutions handed back through the two-phase API (its `n` rows of `d` finite floats),
/// which then stand for the samples' argmax: one-hot rows give the argmax's sums, bit for
/// bit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Problem<'a> {
    pub theta: &'a [f32],
    pub b: usize,
    pub n: usize,
    pub solutions: Option<&'a [f32]>,
}

/// The fused argmax kernel, configured for one call: its stream, noise, perturbation and
/// what it sums.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FusedArgmax<'a> {
    pub stream: &'a Stream,
    pub noise: Noise,
    pub perturbation: Perturbation,
    pub sigma: f32,
    pub antithetic: bool,
    pub jacobian: bool,
    /// Length of the last dimension (argmax is taken within each slice of this length).
    pub last: usize,
    /// Checked before each block: an interrupted call stops there.
    pub stop: Stop<'a>,
    /// Whether Σ x_n is kept (the Fenchel-Young loss's bound).
    pub input_sums: bool,
}

impl FusedArgmax<'_> {
    /// The blocks of work (of [`FUSED_BLOCK`] samples) of a problem of `n` samples.
    pub fn blocks(&self, n: usize) -> usize {
        n.div_ceil(FUSED_BLOCK)
    }

    /// The sums over the samples of problem `p`, on `threads` threads; `Err` when the
    /// call is interrupted.
    pub fn problem(&self, p: Problem<'_>, threads: usize) -> Result<ProblemSums> {
        let mut total = self.zeros(p.theta.len());
        let blocks = self.blocks(p.n);
        let mut scratch: Vec<Tiles> = (0..threads.clamp(1, blocks.max(1)))
            .map(|_| Tiles::default())
            .collect();
        run_blocks::<_, _, crate::error::Error>(
            blocks,
            &mut scratch,
            |k, tiles| {
                self.stop.check()?;
                let mut part = self.zeros(p.theta.len());
                self.block(p, k, tiles, &mut part);
                Ok(part)
            },
            |_, part| {
                total.add(&part);
                Ok(())
            },
        )?;
        Ok(total)
    }

    /// [`FusedArgmax::problem`] into `out` (sums of this kernel's shape for the problem's
    /// size, from [`FusedArgmax::zeros`], whatever they hold), with `tiles` for its
    /// buffers: a problem of one block (up to [`FUSED_BLOCK`] samples, a training step's)
    /// is made with no allocation. The same sums, bit for bit: a block's sums start at +0
    /// and are never −0, so they equal zero sums with them added.
    pub fn problem_into(
        &self,
        p: Problem<'_>,
        threads: usize,
        tiles: &mut Tiles,
        out: &mut ProblemSums,
    ) -> Result<()> {
        if self.blocks(p.n) > 1 {
            *out = self.problem(p, threads)?;
            return Ok(());
        }
        self.stop.check()?;
        out.reset();
        self.block(p, 0, tiles, out);
        Ok(())
    }

    /// Zero sums of this kernel's shape for a problem of `d` inputs.
    pub fn zeros(&self, d: usize) -> ProblemSums {
        let multiplicative = self.perturbation == Perturbation::Multiplicative;
        ProblemSums::zeros(d, d, self.jacobian, multiplicative).with_input_sums(d, self.input_sums)
    }

    /// Adds the samples of block `k` of problem `p` to `sums` (zero sums of this kernel's
    /// shape, [`FusedArgmax::zeros`]).
    fn block(&self, p: Problem<'_>, k: usize, tiles: &mut Tiles, sums: &mut ProblemSums) {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.block_avx2(p, k, tiles, sums) };
        }
        self.block_impl(p, k, tiles, sums)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2(
        &self,
        p: Problem<'_>,
        k: usize,
        tiles: &mut Tiles,
        sums: &mut ProblemSums,
    ) {
        self.block_impl(p, k, tiles, sums)
    }

    #[inline(always)]
    fn block_impl(&self, p: Problem<'_>, k: usize, tiles: &mut Tiles, sums: &mut ProblemSums) {
        let Problem {
            theta,
            b,
            n,
            solutions,
        } = p;
        let d = theta.len();
        let multiplicative = self.perturbation == Perturbation::Multiplicative;
        let (start, end) = (k * FUSED_BLOCK, ((k + 1) * FUSED_BLOCK).min(n));
        // tiles of at most the block's rows (a problem of few samples zeroes no more); each
        // tile's rows are written (drawn, perturbed) before they are read
        let tile = FUSED_TILE.min(end - start);
        let Tiles { z, s, x } = tiles;
        for buffer in [&mut *z, &mut *s, &mut *x] {
            if buffer.len() < tile * d {
                buffer.resize(tile * d, 0.0);
            }
        }
        let shift = 0.5 * self.sigma * self.sigma;
        let mut n0 = start;
        while n0 < end {
            let rows = FUSED_TILE.min(end - n0);
            let (z, s) = (&mut z[..rows * d], &mut s[..rows * d]);
            let sampler = Sampler {
                noise: self.noise,
                stream: self.stream,
                antithetic: self.antithetic,
                score_is_z: multiplicative,
            };
            let at = NoiseAt {
                problem: b,
                sample: n0,
                samples: n,
                width: d,
            };
            sampler.draw(at, z, s, 1);
            // the tile's inputs perturbed (the perturbation's own host kernel)
            let x = &mut x[..rows * d];
            self.perturbation.perturb_host(theta, z, self.sigma, x);
            let rows_of = z
                .chunks_exact(d)
                .zip(s.chunks_exact(d))
                .zip(x.chunks_exact(d));
            for (j, ((zr, sr), x)) in rows_of.enumerate() {
                for (a, &v) in sums.sum_x.iter_mut().zip(x) {
                    *a += f64::from(v);
                }
                // adds solution entry p (of value y) of this sample
                let mut add = |p: usize, y: f32| {
                    let y = f64::from(y);
                    sums.sum_y[p] += y;
                    sums.touched[p] = true;
                    sums.objective += f64::from(x[p]) * y;
                    if self.jacobian {
                        for (a, &sv) in sums.sum_ys[p * d..(p + 1) * d].iter_mut().zip(sr) {
                            *a += f64::from(sv) * y;
                        }
                    }
                    if multiplicative {
                        sums.sum_wy[p] += f64::from((self.sigma * zr[p] - shift).exp()) * y;
                    }
                };
                if let Some(all) = solutions {
                    let row = &all[(n0 + j) * d..(n0 + j + 1) * d];
                    for (p, &y) in row.iter().enumerate().filter(|(_, &y)| y != 0.0) {
                        add(p, y);
                    }
                } else {
                    // the argmax of each slice (the built-ins' own kernel)
                    for (g, slice) in x.chunks_exact(self.last).enumerate() {
                        add(g * self.last + first_max(slice), 1.0);
                    }
                }
                if self.jacobian {
                    for (a, &sv) in sums.sum_s.iter_mut().zip(sr) {
                        *a += f64::from(sv);
                    }
                }
            }
            n0 += rows;
        }
    }
}

/// The buffers of a thread's blocks (noise, scores, perturbed inputs of a tile), kept
/// across its blocks and problems.
#[derive(Default)]
pub(crate) struct Tiles {
    z: Vec<f32>,
    s: Vec<f32>,
    x: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(
        stream: &Stream,
        noise: Noise,
        perturbation: Perturbation,
        antithetic: bool,
    ) -> FusedArgmax<'_> {
        FusedArgmax {
            stream,
            noise,
            perturbation,
            sigma: 0.5,
            antithetic,
            jacobian: true,
            last: 5,
            stop: Stop::NEVER,
            input_sums: false,
        }
    }

    #[test]
    fn sums_do_not_depend_on_the_number_of_threads() {
        let stream = Stream::new(3, 1);
        let theta = [0.1f32, -0.2, 0.3, 0.0, 0.25];
        let n = 3 * FUSED_BLOCK + 1234; // several blocks, a partial last one
        for (noise, perturbation, antithetic) in [
            (Noise::Gumbel, Perturbation::Additive, false),
            (Noise::Normal, Perturbation::Additive, true),
            (Noise::Normal, Perturbation::Multiplicative, false),
        ] {
            let k = kernel(&stream, noise, perturbation, antithetic);
            let p = Problem {
                theta: &theta,
                b: 1,
                n,
                solutions: None,
            };
            let one = k.problem(p, 1).unwrap();
            assert_eq!(one, k.problem(p, 2).unwrap());
            assert_eq!(one, k.problem(p, 5).unwrap());
            assert_eq!(one.sum_y.iter().sum::<f64>(), n as f64);
        }
    }

    /// A problem made into reused buffers and sums (after other problems, of more and of
    /// fewer samples, one of more than a block) equals the problem made alone, bit for bit: every noise and
    /// perturbation, with and without Jacobian and input sums, and with solutions handed
    /// back that hold negative values and signed zeros.
    #[test]
    fn problems_into_reused_sums_equal_problems_made_alone() {
        let stream = Stream::new(5, 2);
        let thetas = [[0.1f32, -0.2, 0.3, 0.0, 0.25], [-1.0, 2.0, 0.5, -0.5, 0.0]];
        let d = 5;
        let provided: Vec<f32> = (0..40 * d)
            .map(|i| match i % 7 {
                0 => -0.0,
                1 => -2.5,
                3 => 1.0,
                5 => 0.75,
                _ => 0.0,
            })
            .collect();
        for (noise, perturbation, antithetic) in [
            (Noise::Gumbel, Perturbation::Additive, false),
            (Noise::Normal, Perturbation::Additive, true),
            (Noise::Normal, Perturbation::Multiplicative, false),
        ] {
            for (jacobian, input_sums, solutions) in [
                (true, false, None),
                (false, true, None),
                (true, true, Some(&provided[..])),
            ] {
                let k = FusedArgmax {
                    jacobian,
                    input_sums,
                    ..kernel(&stream, noise, perturbation, antithetic)
                };
                let (mut tiles, mut sums) = (Tiles::default(), k.zeros(d));
                // (without solutions handed back, a problem of more than one block too)
                let long = if solutions.is_some() {
                    17
                } else {
                    FUSED_BLOCK + 17
                };
                for (b, n) in [(0, 40), (1, 3), (0, long), (1, 40), (0, 5)] {
                    let p = Problem {
                        theta: &thetas[b],
                        b,
                        n,
                        solutions: solutions.map(|all| &all[..n * d]),
                    };
                    k.problem_into(p, 1, &mut tiles, &mut sums).unwrap();
                    let alone = k.problem(p, 1).unwrap();
                    assert_eq!(
                        sums, alone,
                        "{noise:?} {perturbation:?} problem {b}, {n} samples"
                    );
                    // bit for bit (== would take -0.0 for +0.0)
                    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    for (a, b) in [
                        (&sums.sum_y, &alone.sum_y),
                        (&sums.sum_s, &alone.sum_s),
                        (&sums.sum_ys, &alone.sum_ys),
                        (&sums.sum_wy, &alone.sum_wy),
                        (&sums.sum_x, &alone.sum_x),
                    ] {
                        assert_eq!(bits(a), bits(b));
                    }
                    assert_eq!(sums.objective.to_bits(), alone.objective.to_bits());
                }
            }
        }
    }
}
