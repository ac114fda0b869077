//! The fused argmax path ([`crate::settings::Path::FusedArgmax`]): per problem, blocks of
//! samples drawn, perturbed, solved and summed in one pass by the fused kernel
//! (kernels/fused_argmax), or whole problems shared among the cores when a problem has
//! fewer blocks than there are cores (each made exactly as it would be alone).

use crate::error::Result;
use crate::estimate::Accumulator;
use crate::interrupt::Stop;
use crate::kernels::blocks::run_blocks;
use crate::kernels::fused_argmax::{FusedArgmax, Problem, Tiles};
use crate::pipeline::plan::OpSpec;
use crate::pipeline::solve::{check_provided, Source};
use crate::rng::Stream;
use crate::tensors::HostFloats;
use tch::Tensor;

impl OpSpec {
    /// The samples of a call of the built-in argmax (or of solutions `source` handed back
    /// to its draws) on the CPU, summed into `acc` by the fused kernel.
    pub(crate) fn run_fused(
        &self,
        theta: &Tensor,
        stream: &Stream,
        source: Source<'_>,
        stop: Stop<'_>,
        acc: &mut Accumulator,
    ) -> Result<()> {
        let c = &self.config;
        let (d, n) = (self.input_numel, c.num_samples() as usize);
        let provided = match source {
            Source::Provided(all) => Some(all),
            Source::Solver(_) => None,
        };
        // the rows of problem b, checked finite
        let rows_of = |b: usize| -> Result<Option<&[f32]>> {
            provided
                .map(|all| {
                    let part = &all[b * n * d..(b + 1) * n * d];
                    check_provided(part, b * n, d)?;
                    Ok(part)
                })
                .transpose()
        };
        let kernel = FusedArgmax {
            stream,
            noise: c.noise(),
            perturbation: c.perturbation(),
            sigma: c.sigma() as f32,
            antithetic: c.antithetic(),
            jacobian: acc.form().is_some(),
            last: *self.input_shape.last().expect("built-ins have rank >= 1") as usize,
            stop,
            input_sums: acc.keeps_input_sums(),
        };
        // read in place: no code of the caller's runs during the call
        let theta_values = HostFloats::of(theta)?;
        let theta_host: &[f32] = &theta_values;
        let batch = theta_host.len() / d;
        // a core for at least HOST_THREAD_VALUES perturbed values: a smaller share costs
        // more to hand over than it saves (a training step's 32 × 40 × 10 runs on one)
        let values = batch.saturating_mul(n).saturating_mul(d);
        let cores = c
            .library_threads()
            .min(values / crate::tuning::HOST_THREAD_VALUES)
            .max(1);
        let problem = |b: usize| -> Result<Problem<'_>> {
            Ok(Problem {
                theta: &theta_host[b * d..(b + 1) * d],
                b,
                n,
                solutions: rows_of(b)?,
            })
        };
        if kernel.blocks(n) >= cores || batch == 1 {
            // enough blocks within each problem for every core
            // one set of buffers and sums for every problem (no allocation per problem)
            let (mut tiles, mut sums) = (Tiles::default(), kernel.zeros(d));
            let mut sums_of = acc.host_adder();
            for b in 0..batch {
                kernel.problem_into(problem(b)?, cores, &mut tiles, &mut sums)?;
                sums_of.add(b, &sums);
            }
            Ok(())
        } else {
            // problems shared by the cores (each made exactly as above, on one)
            let mut scratch: Vec<Tiles> = (0..cores).map(|_| Tiles::default()).collect();
            let mut sums_of = acc.host_adder();
            run_blocks(
                batch,
                &mut scratch,
                |b, tiles| {
                    let mut sums = kernel.zeros(d);
                    kernel.problem_into(problem(b)?, 1, tiles, &mut sums)?;
                    Ok(sums)
                },
                |b, sums| {
                    sums_of.add(b, &sums);
                    Ok(())
                },
            )
        }
    }
}
