//! The perturbation gradient (PG: Huang & Gupta, "Decision-Focused Learning with
//! Directional Gradients", NeurIPS 2024).

use super::{dot, pyepo_sign, step, Problems};
use crate::error::Result;
use crate::op::PerturbedOp;
use tch::Tensor;

impl PerturbedOp {
    /// The PG loss `[batch]` of predicted costs ĉ (`pred_cost`, `[batch, *input_shape]`)
    /// along the true costs c (`true_cost`), a finite difference of the optimal value
    /// z*(ĉ + t·c) at t = 0 that approximates the decision's true cost ⟨c, w*(ĉ)⟩, and its
    /// gradient with respect to ĉ (the solutions held fixed); both on `pred_cost`'s device.
    /// As PyEPO's `perturbationGradient`, with s = +1 minimizing and −1 maximizing:
    ///
    /// - two-sided (central): w₊ = w*(ĉ + σc), w₋ = w*(ĉ − σc); loss
    ///   s·(⟨ĉ + σc, w₊⟩ − ⟨ĉ − σc, w₋⟩) / (2σ), gradient s·(w₊ − w₋) / (2σ);
    /// - one-sided (backward): w = w*(ĉ), w₋ = w*(ĉ − σc); loss
    ///   s·(⟨ĉ, w⟩ − ⟨ĉ − σc, w₋⟩) / σ, gradient s·(w − w₋) / σ.
    ///
    /// Two solves per problem, made as one solve of 2·batch problems. σ (`sigma`) must be
    /// finite and > 0 (PyEPO divides by σ + 1e-7; this divides by σ). The op's output shape
    /// must equal its input shape; inputs float32 and finite.
    pub fn perturbation_gradient(
        &self,
        pred_cost: &Tensor,
        true_cost: &Tensor,
        sigma: f64,
        two_sided: bool,
    ) -> Result<(Tensor, Tensor)> {
        let sigma = step(sigma, "sigma")?;
        let (p, pred) = Problems::of(
            self,
            "the perturbation gradient (PG)",
            pred_cost,
            "pred_cost",
        )?;
        let cost = p.rows(true_cost, "true_cost")?;
        let up = if two_sided { sigma } else { 0.0 };
        let plus: Vec<f32> = pred
            .iter()
            .zip(&cost)
            .map(|(&c_hat, &c)| c_hat + up * c)
            .collect();
        let minus: Vec<f32> = pred
            .iter()
            .zip(&cost)
            .map(|(&c_hat, &c)| c_hat - sigma * c)
            .collect();
        let w = p.solve(self, &[plus.as_slice(), minus.as_slice()].concat())?;
        let (w_plus, w_minus) = w.split_at(p.batch * p.d);
        let sign = pyepo_sign(self.config().sense());
        let width = if two_sided { 2.0 * sigma } else { sigma };
        let loss: Vec<f32> = (0..p.batch)
            .map(|i| {
                let diff = dot(p.row(&plus, i), p.row(w_plus, i))
                    - dot(p.row(&minus, i), p.row(w_minus, i));
                (f64::from(sign) * diff / f64::from(width)) as f32
            })
            .collect();
        let grad: Vec<f32> = w_plus
            .iter()
            .zip(w_minus)
            .map(|(&a, &b)| sign * (a - b) / width)
            .collect();
        Ok((p.per_problem(&loss)?, p.like_first(&grad)?))
    }
}
