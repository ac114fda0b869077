//! The libtorch chunk pipeline: CUDA ops (and CPU ops forced onto it) draw, perturb, solve
//! and sum chunks of samples as tensors on the op's device.

use crate::error::Result;
use crate::kernels::builtin::Solutions;
use crate::pipeline::plan::OpSpec;
use crate::pipeline::solve::{solve_host, solve_on_device, to_op_device, SolverKind};
use crate::rng::Stream;
use crate::shape::batched;
use crate::solver::SolveInfo;
use tch::{Device, Tensor};

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
    ) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (d, n) = (self.input_numel, c.num_samples() as usize);
        debug_assert!(nb == 1 || (n0 == 0 && rows == n));
        let threads = c.library_threads(); // noise only
                                           // CPU ops draw with the CPU sampler; CUDA ops (and CPU ops forced onto this path)
                                           // draw with libtorch on their device. The samples of consecutive problems are
                                           // consecutive in the stream, so several whole problems are one draw.
        let draw = |first: usize, count: usize| -> Result<Tensor> {
            if self.device == Device::Cpu && !c.libtorch_path() {
                c.noise().sample(stream, first as u64, count, threads)
            } else {
                c.noise()
                    .sample_on(stream, first as u64, count, self.device)
            }
        };
        let total = nb * rows;
        let z = if c.antithetic() {
            let half = draw((b * n + n0) / 2 * d, total / 2 * d)?
                .f_view([(total / 2) as i64, d as i64])?;
            Tensor::f_stack(&[half.shallow_clone(), half.f_neg()?], 1)?
                .f_view([total as i64, d as i64])?
        } else {
            draw((b * n + n0) * d, total * d)?.f_view([total as i64, d as i64])?
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
                let (z, x) = self.chunk(stream, &theta_rows, (b, nb), 0, n)?;
                f(b, nb, 0, z, x)?;
            }
            return Ok(());
        }
        for b in 0..batch {
            let theta_b = theta.f_narrow(0, b as i64, 1)?;
            for n0 in (0..n).step_by(per) {
                let (z, x) = self.chunk(stream, &theta_b, (b, 1), n0, per.min(n - n0))?;
                f(b, 1, n0, z, x)?;
            }
        }
        Ok(())
    }

    /// Solves the problems `x` `[rows, d]` with the op's own solver (`at` says which rows
    /// of the call they are; its worker is ignored).
    pub(crate) fn solve(
        &self,
        solver: &SolverKind,
        x: &Tensor,
        at: SolveInfo,
    ) -> Result<Solutions> {
        match solver {
            SolverKind::Builtin(builtin) => {
                let x = x.f_view(batched(x.size()[0] as usize, &self.input_shape).as_slice())?;
                builtin.solve(
                    &x,
                    *self.input_shape.last().expect("built-ins have rank >= 1"),
                )
            }
            SolverKind::Host(host) => {
                let y = solve_host(
                    host,
                    x,
                    self.output_numel,
                    self.config.effective_threads(),
                    SolveInfo {
                        cuda_device: None, // host solvers get host memory
                        ..at
                    },
                )?;
                Ok(Solutions::Dense(to_op_device(y, self.device)?))
            }
            SolverKind::Device(device) => Ok(Solutions::Dense(solve_on_device(
                &**device,
                &x.f_view([x.size()[0], self.input_numel as i64])?,
                self.output_numel,
                at,
            )?)),
            SolverKind::External => unreachable!("external ops are refused before solving"),
        }
    }
}
