//! A fused CPU kernel for the built-in argmax: draws, perturbs, solves and reduces each
//! sample in one pass over cache-sized blocks, on all cores, instead of a chain of
//! libtorch calls over chunk-sized tensors. Used when the op runs on the CPU and the tape
//! keeps sums (or no tape is needed) of a small problem (input_numel² ≤ [`MAX_SUMS`]).
//!
//! The samples of a problem are cut into fixed blocks of [`BLOCK`] rows; each block's sums
//! are made on one thread and the blocks are added in their order, so the results do not
//! depend on the number of threads, bit for bit.

use crate::noise::Noise;
use crate::perturbation::Perturbation;
use crate::rng::Stream;

/// Samples per block (the unit of work of a thread).
const BLOCK: usize = 1 << 15;
/// Rows drawn at a time within a block (kept in cache).
const TILE: usize = 256;
/// The largest input_numel² the kernel handles (its per-block sums are that many doubles).
pub(crate) const MAX_SUMS: usize = 4096;

/// What the kernel computes for one problem: the sums the estimator needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProblemSums {
    /// Σ Y_n (the counts of winners), `[d]`.
    pub sum_y: Vec<f64>,
    /// Σ s_n, `[d]` (empty without a Jacobian).
    pub sum_s: Vec<f64>,
    /// Σ Y_n s_nᵀ, `[d, d]` row-major (empty without a Jacobian).
    pub sum_ys: Vec<f64>,
    /// Σ ⟨x_n, Y_n⟩.
    pub objective: f64,
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n, `[d]` (multiplicative model only, else empty).
    pub sum_wy: Vec<f64>,
}

impl ProblemSums {
    fn zeros(d: usize, jacobian: bool, multiplicative: bool) -> ProblemSums {
        ProblemSums {
            sum_y: vec![0.0; d],
            sum_s: if jacobian { vec![0.0; d] } else { Vec::new() },
            sum_ys: if jacobian { vec![0.0; d * d] } else { Vec::new() },
            objective: 0.0,
            sum_wy: if multiplicative { vec![0.0; d] } else { Vec::new() },
        }
    }

    fn add(&mut self, other: &ProblemSums) {
        for (a, b) in [(&mut self.sum_y, &other.sum_y), (&mut self.sum_s, &other.sum_s), (&mut self.sum_ys, &other.sum_ys), (&mut self.sum_wy, &other.sum_wy)] {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.objective += other.objective;
    }
}

/// The settings of one run of the kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel<'a> {
    pub stream: &'a Stream,
    pub noise: Noise,
    pub perturbation: Perturbation,
    pub sigma: f32,
    pub antithetic: bool,
    pub jacobian: bool,
    /// Length of the last dimension (argmax is taken within each slice of this length).
    pub last: usize,
}

impl Kernel<'_> {
    /// The sums over samples `0 .. n` of problem `b` (θ = `theta`), on `threads` threads.
    pub fn problem(&self, theta: &[f32], b: usize, n: usize, threads: usize) -> ProblemSums {
        let d = theta.len();
        let multiplicative = self.perturbation == Perturbation::Multiplicative;
        let mut total = ProblemSums::zeros(d, self.jacobian, multiplicative);
        let blocks = n.div_ceil(BLOCK);
        let threads = threads.clamp(1, blocks.max(1));
        let mut k = 0;
        while k < blocks {
            let wave = threads.min(blocks - k);
            let parts: Vec<ProblemSums> = if wave == 1 {
                vec![self.block(theta, b, n, k)]
            } else {
                std::thread::scope(|scope| {
                    let handles: Vec<_> =
                        (k..k + wave).map(|j| scope.spawn(move || self.block(theta, b, n, j))).collect();
                    handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
                })
            };
            for part in &parts {
                total.add(part);
            }
            k += wave;
        }
        total
    }

    /// The sums of block `k` of problem `b`.
    fn block(&self, theta: &[f32], b: usize, n: usize, k: usize) -> ProblemSums {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.block_avx2(theta, b, n, k) };
        }
        self.block_impl(theta, b, n, k)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2(&self, theta: &[f32], b: usize, n: usize, k: usize) -> ProblemSums {
        self.block_impl(theta, b, n, k)
    }

    #[inline(always)]
    fn block_impl(&self, theta: &[f32], b: usize, n: usize, k: usize) -> ProblemSums {
        let d = theta.len();
        let multiplicative = self.perturbation == Perturbation::Multiplicative;
        let mut sums = ProblemSums::zeros(d, self.jacobian, multiplicative);
        let (start, end) = (k * BLOCK, ((k + 1) * BLOCK).min(n));
        let mut z = vec![0f32; TILE * d];
        let mut s = vec![0f32; TILE * d];
        let mut x = vec![0f32; d];
        let shift = 0.5 * self.sigma * self.sigma;
        let mut n0 = start;
        while n0 < end {
            let rows = TILE.min(end - n0);
            let (z, s) = (&mut z[..rows * d], &mut s[..rows * d]);
            self.draw(b, n, n0, d, z, s);
            for (zr, sr) in z.chunks_exact(d).zip(s.chunks_exact(d)) {
                for ((xv, &zv), &tv) in x.iter_mut().zip(zr).zip(theta) {
                    *xv = if multiplicative { tv * (self.sigma * zv - shift).exp() } else { tv + self.sigma * zv };
                }
                for (g, slice) in x.chunks_exact(self.last).enumerate() {
                    let mut best = 0;
                    for (i, &v) in slice.iter().enumerate().skip(1) {
                        if v > slice[best] {
                            best = i;
                        }
                    }
                    let p = g * self.last + best;
                    sums.sum_y[p] += 1.0;
                    sums.objective += f64::from(x[p]);
                    if self.jacobian {
                        for (a, &sv) in sums.sum_ys[p * d..(p + 1) * d].iter_mut().zip(sr) {
                            *a += f64::from(sv);
                        }
                    }
                    if multiplicative {
                        sums.sum_wy[p] += f64::from((self.sigma * zr[p] - shift).exp());
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
        sums
    }

    /// Noise and scores of samples `n0 .. n0 + rows` of problem `b` (element indices as in
    /// the general path, so both paths draw the same noise).
    fn draw(&self, b: usize, n: usize, n0: usize, d: usize, z: &mut [f32], s: &mut [f32]) {
        if !self.antithetic {
            self.noise.fill_with_score(self.stream, ((b * n + n0) * d) as u64, z, s);
            if self.perturbation == Perturbation::Multiplicative {
                s.copy_from_slice(z);
            }
            return;
        }
        // sample 2j + 1 is the negation of sample 2j (n0 and n are even)
        let rows = z.len() / d;
        let half = rows.div_ceil(2);
        let first = ((b * n + n0) / 2 * d) as u64;
        let (mut zh, mut sh) = (vec![0f32; half * d], vec![0f32; half * d]);
        self.noise.fill_with_score(self.stream, first, &mut zh, &mut sh);
        for r in 0..rows {
            let src = &zh[(r / 2) * d..(r / 2 + 1) * d];
            let sign = if r % 2 == 0 { 1.0 } else { -1.0 };
            for (i, &v) in src.iter().enumerate() {
                z[r * d + i] = sign * v;
                s[r * d + i] = sign * v; // antithetic pairs are Normal: the score is z
            }
        }
    }
}
