//! The perturbation gradient (PG: Huang & Gupta, "Decision-Focused Learning with
//! Directional Gradients", NeurIPS 2024).

use super::{passes, pyepo_sign, step, Call, Rows};
use crate::error::Result;
use crate::op::{PerturbedOp, PoolAddition};
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
    /// The loss tends to s·⟨c, w*(ĉ)⟩ as σ → 0 (the true cost of the predicted decision
    /// when minimizing, its negation when maximizing). Two solves per problem, made as two
    /// solves of the batch. σ (`sigma`) must be finite and > 0 (PyEPO divides by σ + 1e-8,
    /// or 2σ + 1e-8; this divides by σ or 2σ); a result beyond float32's range is refused. The op's output shape
    /// must equal its input shape; inputs float32 and finite.
    pub fn perturbation_gradient(
        &self,
        pred_cost: &Tensor,
        true_cost: &Tensor,
        sigma: f64,
        two_sided: bool,
    ) -> Result<(Tensor, Tensor)> {
        step(sigma, "sigma")?;
        let (call, pred) = Call::of(
            self,
            "the perturbation gradient (PG)",
            pred_cost,
            "pred_cost",
        )?;
        let cost = call.rows(true_cost, "true_cost")?;
        let (loss, grad, addition) =
            self.perturbation_gradient_rows(call.rows, &pred, &cost, sigma, two_sided, true)?;
        let results = (call.per_problem(&loss)?, call.like_first(&grad)?);
        addition.commit(self)?;
        Ok(results)
    }

    /// [`PerturbedOp::perturbation_gradient`] on host rows, checked here (finite), all
    /// read before the solves. ĉ ± σc is finite only when ĉ and c are: one pass makes each
    /// solve's input and checks it, and each input is checked by itself, for the message,
    /// only when that fails (`passes`). The two solves' solutions, for the op's pool, are
    /// committed by the caller once the call has succeeded ([`PoolAddition`]). Without
    /// `grad_wanted` the gradient is not checked (as [`PerturbedOp::spo_plus_rows`]).
    pub(crate) fn perturbation_gradient_rows(
        &self,
        rows: Rows,
        pred: &[f32],
        cost: &[f32],
        sigma: f64,
        two_sided: bool,
        grad_wanted: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, PoolAddition)> {
        let sigma = step(sigma, "sigma")?;
        self.require_square("the perturbation gradient (PG)")?;
        let up = if two_sided { sigma } else { 0.0 };
        // two solves of `batch` problems each (a solver learns each row's problem from
        // `first_row`: one solve of 2·batch rows would name problems that do not exist)
        let (plus, plus_finite) = passes::map2_checked(pred, cost, [], |c_hat, c| c_hat + up * c)?;
        let (minus, minus_finite) =
            passes::map2_checked(pred, cost, [], |c_hat, c| c_hat - sigma * c)?;
        if !(plus_finite && minus_finite) {
            rows.check_finite(pred, "pred_cost")?;
            rows.check_finite(cost, "true_cost")?;
            rows.check_derived(&plus, "pred_cost + sigma * true_cost")?;
            rows.check_derived(&minus, "pred_cost - sigma * true_cost")?;
        }
        let w_plus = self.solve_host_rows_unpooled(&plus, rows.batch)?;
        let w_minus = self.solve_host_rows_unpooled(&minus, rows.batch)?;
        let sign = pyepo_sign(self.config().sense());
        let width = if two_sided { 2.0 * sigma } else { sigma };
        let (loss, grad, finite) =
            passes::pg_results(rows.d, [&plus, &minus], [&w_plus, &w_minus], sign, width)?;
        if !finite {
            rows.per_problem().check_result(&loss, "the PG loss")?;
            if grad_wanted {
                rows.check_result(&grad, "the PG gradient")?;
            }
        }
        Ok((loss, grad, PoolAddition(vec![w_plus, w_minus])))
    }
}
