//! The Monte-Carlo estimator: running sums over the samples of a forward call, and the
//! Jacobian, objective and objective gradient computed from them once all samples are in.
//!
//! With Y_n the solutions, s_n the scores (∇ν(Z_n) for the additive model, Z_n for the
//! multiplicative one) and N samples, the Jacobian estimate per problem is
//!
//! | baseline    | J                                               | extra solves |
//! |-------------|-------------------------------------------------|--------------|
//! | none        | Σ Y_n s_nᵀ / (Nσ)                               | 0            |
//! | sample mean | Σ (Y_n − Ȳ) s_nᵀ / ((N−1)σ)                     | 0            |
//! | clean input | Σ (Y_n − y*(θ)) s_nᵀ / (Nσ)                     | 1 per problem|
//!
//! each divided by θ column-wise for the multiplicative model (0 where θ = 0). All are
//! unbiased since E[s] = 0. With antithetic pairs (Z, −Z) the scores of a pair cancel, so
//! any constant baseline drops out: J = Σ Y_n s_nᵀ / (Nσ) exactly, whatever the baseline,
//! and no extra solve is made.

use crate::error::{Error, Result};
use crate::perturbation::Perturbation;
use tch::{Device, Kind, Tensor};

/// The variance-reduction baseline of the gradient estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Baseline {
    /// The plain score-function estimator (C: `PERT_BASELINE_NONE = 0`).
    None = 0,
    /// Subtract the mean of the other samples; no extra solve, needs N ≥ 2
    /// (C: `PERT_BASELINE_SAMPLE_MEAN = 1`). The default.
    #[default]
    SampleMean = 1,
    /// Subtract the solution at the clean input y*(θ); one extra solve per problem
    /// (C: `PERT_BASELINE_CLEAN_INPUT = 2`).
    CleanInput = 2,
}

impl Baseline {
    /// The baseline with this C number.
    pub fn from_u32(value: u32) -> Result<Baseline> {
        match value {
            0 => Ok(Baseline::None),
            1 => Ok(Baseline::SampleMean),
            2 => Ok(Baseline::CleanInput),
            _ => Err(Error::invalid(format!(
                "baseline must be PERT_BASELINE_NONE (0), PERT_BASELINE_SAMPLE_MEAN (1) or PERT_BASELINE_CLEAN_INPUT (2), got {value}"
            ))),
        }
    }
}

/// What one forward call estimated, per problem.
pub(crate) struct Estimate {
    /// y_σ(θ), `[batch * output_numel]`.
    pub mean: Vec<f32>,
    /// J, `[batch, output_numel, input_numel]` float32 on the op's device, when asked for.
    pub jacobian: Option<Tensor>,
    /// F_σ(θ) = E[⟨perturbed input, Y⟩], `[batch]`, when output shape = input shape.
    pub objective: Option<Vec<f64>>,
    /// ∇F_σ(θ), `[batch * input_numel]`, when output shape = input shape.
    pub grad_objective: Option<Vec<f64>>,
}

/// Running sums of one forward call.
pub(crate) struct Accumulator {
    d: usize,
    o: usize,
    perturbation: Perturbation,
    sigma: f32,
    sum_y: Vec<f64>,
    /// Σ s_n and Σ Y_n s_nᵀ, kept when a Jacobian is wanted.
    jacobian_sums: Option<(Vec<f64>, Tensor)>,
    /// Σ ⟨x_n, Y_n⟩ and, for the multiplicative model, Σ exp(σZ_n − σ²/2) ⊙ Y_n; kept when
    /// output shape = input shape.
    objective_sums: Option<(Vec<f64>, Vec<f64>)>,
}

impl Accumulator {
    pub fn new(
        batch: usize,
        d: usize,
        o: usize,
        perturbation: Perturbation,
        sigma: f64,
        want_jacobian: bool,
        square: bool,
        device: Device,
    ) -> Result<Accumulator> {
        let jacobian_sums = if want_jacobian {
            let sum_ys = Tensor::f_zeros([batch as i64, o as i64, d as i64], (Kind::Double, device))?;
            Some((vec![0.0; batch * d], sum_ys))
        } else {
            None
        };
        let objective_sums = square.then(|| {
            let wy = if perturbation == Perturbation::Multiplicative { batch * d } else { 0 };
            (vec![0.0; batch], vec![0.0; wy])
        });
        Ok(Accumulator {
            d,
            o,
            perturbation,
            sigma: sigma as f32,
            sum_y: vec![0.0; batch * o],
            jacobian_sums,
            objective_sums,
        })
    }

    /// Adds a chunk of `rows` samples of problem `b`: noise `z`, perturbed inputs `x`,
    /// scores `score` (all `[rows, d]`) and solutions `y` (`[rows, o]`).
    pub fn add(&mut self, b: usize, z: &[f32], x: &[f32], score: &[f32], y: &[f32], rows: usize) -> Result<()> {
        let (d, o) = (self.d, self.o);
        add_column_sums(&mut self.sum_y[b * o..(b + 1) * o], y);
        if let Some((sum_s, sum_ys)) = &mut self.jacobian_sums {
            add_column_sums(&mut sum_s[b * d..(b + 1) * d], score);
            let device = sum_ys.device();
            let yt = Tensor::f_from_slice(y)?.f_view([rows as i64, o as i64])?.f_to_device(device)?;
            let st = Tensor::f_from_slice(score)?.f_view([rows as i64, d as i64])?.f_to_device(device)?;
            let chunk = yt.f_tr()?.f_matmul(&st)?.f_to_kind(Kind::Double)?;
            let _ = sum_ys.f_get(b as i64)?.f_add_(&chunk)?;
        }
        if let Some((objective, sum_wy)) = &mut self.objective_sums {
            objective[b] += x.iter().zip(y).map(|(&xv, &yv)| f64::from(xv) * f64::from(yv)).sum::<f64>();
            if self.perturbation == Perturbation::Multiplicative {
                let shift = 0.5 * f64::from(self.sigma).powi(2);
                let acc = &mut sum_wy[b * d..(b + 1) * d];
                for (zr, yr) in z.chunks_exact(d).zip(y.chunks_exact(d)) {
                    for ((a, &zv), &yv) in acc.iter_mut().zip(zr).zip(yr) {
                        *a += (f64::from(self.sigma) * f64::from(zv) - shift).exp() * f64::from(yv);
                    }
                }
            }
        }
        Ok(())
    }

    /// The estimates from `n` samples. `baseline` is the effective one (None under
    /// antithetic pairs); `clean` holds y*(θ) `[batch * o]` for the clean-input baseline;
    /// `theta` `[batch * d]` is needed by the multiplicative model.
    pub fn finish(self, n: u64, baseline: Baseline, clean: Option<&[f32]>, theta: &[f32]) -> Result<Estimate> {
        let (d, o) = (self.d, self.o);
        let batch = self.sum_y.len() / o;
        let nf = n as f64;
        let sigma = f64::from(self.sigma);
        let mean: Vec<f32> = self.sum_y.iter().map(|&s| (s / nf) as f32).collect();
        let jacobian = match self.jacobian_sums {
            None => None,
            Some((sum_s, sum_ys)) => {
                let device = sum_ys.device();
                let outer = |left: &[f64], right: &[f64]| -> Result<Tensor> {
                    let l = Tensor::f_from_slice(left)?.f_view([batch as i64, o as i64, 1])?;
                    let r = Tensor::f_from_slice(right)?.f_view([batch as i64, 1, d as i64])?;
                    Ok(l.f_mul(&r)?.f_to_device(device)?)
                };
                let j = match baseline {
                    Baseline::None => sum_ys.f_div_scalar(nf * sigma)?,
                    Baseline::SampleMean => {
                        let correction = outer(&self.sum_y, &sum_s)?.f_div_scalar(nf)?;
                        sum_ys.f_sub(&correction)?.f_div_scalar((nf - 1.0) * sigma)?
                    }
                    Baseline::CleanInput => {
                        let clean: Vec<f64> = clean
                            .expect("the clean-input baseline needs y*(theta)")
                            .iter()
                            .map(|&v| f64::from(v))
                            .collect();
                        sum_ys.f_sub(&outer(&clean, &sum_s)?)?.f_div_scalar(nf * sigma)?
                    }
                };
                let j = match self.perturbation {
                    Perturbation::Additive => j,
                    Perturbation::Multiplicative => {
                        let inv: Vec<f64> =
                            theta.iter().map(|&t| if t == 0.0 { 0.0 } else { 1.0 / f64::from(t) }).collect();
                        let inv = Tensor::f_from_slice(&inv)?.f_view([batch as i64, 1, d as i64])?.f_to_device(device)?;
                        j.f_mul(&inv)?
                    }
                };
                Some(j.f_to_kind(Kind::Float)?)
            }
        };
        let (objective, grad_objective) = match self.objective_sums {
            None => (None, None),
            Some((objective, sum_wy)) => {
                let grad = match self.perturbation {
                    Perturbation::Additive => self.sum_y.iter().map(|&s| s / nf).collect(),
                    Perturbation::Multiplicative => sum_wy.iter().map(|&s| s / nf).collect(),
                };
                (Some(objective.iter().map(|&s| s / nf).collect()), Some(grad))
            }
        };
        Ok(Estimate { mean, jacobian, objective, grad_objective })
    }
}

/// Adds the column sums of a row-major `[rows, acc.len()]` buffer to `acc`, in float64.
fn add_column_sums(acc: &mut [f64], values: &[f32]) {
    for row in values.chunks_exact(acc.len()) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += f64::from(v);
        }
    }
}
