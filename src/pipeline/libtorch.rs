//! The libtorch chunk pipeline: CUDA ops (and CPU ops forced onto it) draw, perturb, solve
//! and sum chunks of samples as tensors on the op's device.

use crate::error::Result;
use crate::estimate::Accumulator;
use crate::interrupt::Stop;
use crate::kernels::builtin::Solutions;
use crate::noise::NoiseAt;
use crate::pipeline::cache::CallCache;
use crate::pipeline::plan::OpSpec;
use crate::pipeline::solve::{provided, Source};
use crate::rng::Stream;
use crate::settings::Path;
use tch::Tensor;

impl OpSpec {
    /// The noise `[nb · rows, d]` of samples `n0 .. n0 + rows` of problems `b .. b + nb` of
    /// a call and the perturbed inputs, on the op's device (`theta_rows` `[nb, d]`: those
    /// problems; several problems only with all their samples, n0 = 0). With antithetic
    /// pairs, sample 2k + 1 is the negation of sample 2k (n0 and rows are then even).
    pub(crate) fn chunk(
        &self,
        stream: &Stream,
        theta_rows: &Tensor,
        (b, nb): (usize, usize),
        n0: usize,
        rows: usize,
        path: Path,
    ) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (d, n) = (self.input_numel, c.num_samples() as usize);
        debug_assert!(nb == 1 || (n0 == 0 && rows == n));
        let threads = c.library_threads(); // noise only
                                           // Path::Chunks draws with the CPU sampler; Path::Cuda with libtorch on the op's
                                           // device. The samples of consecutive problems are consecutive in the stream, so
                                           // several whole problems are one draw.
        let draw = |first: u64, count: usize| -> Result<Tensor> {
            if path == Path::Chunks {
                c.noise().sample(stream, first, count, threads)
            } else {
                c.noise().sample_on(stream, first, count, self.device)
            }
        };
        let total = nb * rows;
        let at = NoiseAt {
            problem: b,
            sample: n0,
            samples: n,
            width: d,
        };
        let z = if c.antithetic() {
            let half = draw(at.first_pair_value(), total / 2 * d)?
                .f_view([(total / 2) as i64, d as i64])?;
            Tensor::f_stack(&[half.shallow_clone(), half.f_neg()?], 1)?
                .f_view([total as i64, d as i64])?
        } else {
            draw(at.first_value(), total * d)?.f_view([total as i64, d as i64])?
        };
        let x = c
            .perturbation()
            .perturb(
                &theta_rows.f_unsqueeze(1)?,
                &z.f_view([nb as i64, rows as i64, d as i64])?,
                c.sigma(),
            )?
            .f_view([total as i64, d as i64])?;
        Ok((z, x))
    }

    /// Calls `f(b, nb, n0, z, x)` for the chunks of samples of the problems of `theta`
    /// `[batch, d]` (on the device), in order: samples `n0 ..` of problems `b .. b + nb`,
    /// noise and perturbed inputs `[nb · rows, d]` (problem by problem). A chunk holds
    /// several problems when their samples fit in it (one draw and one solve for many
    /// small problems), else part of one problem.
    pub(crate) fn for_each_chunk(
        &self,
        theta: &Tensor,
        stream: &Stream,
        path: Path,
        mut f: impl FnMut(usize, usize, usize, Tensor, Tensor) -> Result<()>,
    ) -> Result<()> {
        let n = self.config.num_samples() as usize;
        let batch = theta.size()[0] as usize;
        let per = self.rows_per_chunk();
        if per >= n {
            let problems = (self.chunk_rows() / n).clamp(1, batch.max(1));
            for b in (0..batch).step_by(problems) {
                let nb = problems.min(batch - b);
                let theta_rows = theta.f_narrow(0, b as i64, nb as i64)?;
                let (z, x) = self.chunk(stream, &theta_rows, (b, nb), 0, n, path)?;
                f(b, nb, 0, z, x)?;
            }
            return Ok(());
        }
        for b in 0..batch {
            let theta_b = theta.f_narrow(0, b as i64, 1)?;
            for n0 in (0..n).step_by(per) {
                let (z, x) = self.chunk(stream, &theta_b, (b, 1), n0, per.min(n - n0), path)?;
                f(b, 1, n0, z, x)?;
            }
        }
        Ok(())
    }
}

impl OpSpec {
    /// The samples of a call on the libtorch chunk pipeline (`path`: [`Path::Chunks`] or
    /// [`Path::Cuda`]), summed into `acc` chunk by chunk.
    pub(crate) fn run_chunks(
        &self,
        theta: &Tensor,
        stream: &Stream,
        (source, cache): (Source<'_>, Option<&CallCache>),
        stop: Stop<'_>,
        path: Path,
        acc: &mut Accumulator,
    ) -> Result<()> {
        let c = &self.config;
        let (o, n) = (self.output_numel, c.num_samples() as usize);
        let batch = theta.size()[0] as usize;
        self.for_each_chunk(theta, stream, path, |b, nb, n0, z, x| {
            stop.check()?;
            let rows = z.size()[0] as usize; // of all nb problems
            let y = match source {
                Source::Solver(solver) => {
                    let at = self.rows_at(false, (b * n + n0) as u64, batch);
                    match cache {
                        Some(cache) => self.solve_cached(solver, &x, at, cache)?,
                        None => self.solve(solver, &x, at)?,
                    }
                }
                Source::Provided(all) => {
                    Solutions::Dense(provided(all, b * n + n0, rows, o, self.device)?)
                }
            };
            let s = if acc.wants_scores() {
                Some(c.perturbation().score(c.noise(), &z)?)
            } else {
                None
            };
            acc.add(b as i64, nb as i64, n0 as i64, &z, &x, s.as_ref(), &y)
        })
    }
}
