//! SPO+ (Elmachtoub & Grigas, "Smart 'Predict, then Optimize'", Management Science 2022).

use super::{host, passes, pyepo_sign, Call, Rows};
use crate::error::{Error, Result};
use crate::op::{PerturbedOp, PoolAddition};
use tch::Tensor;

impl PerturbedOp {
    /// The SPO+ loss `[batch]` of predicted costs ĉ (`pred_cost`, `[batch, *input_shape]`)
    /// against true costs c (`true_cost`), their optimal solutions w = w*(c) (`true_sol`)
    /// and objectives z = ⟨c, w⟩ (`true_obj`, `[batch]` or `[batch, 1]`), and its
    /// (sub)gradient with respect to ĉ, `[batch, *input_shape]`; both on `pred_cost`'s device.
    /// One solve per problem, at q = 2ĉ − c, by the op's solver (in its sense), as PyEPO's
    /// `SPOPlus`:
    ///
    /// - minimize: loss = −⟨q, w*(q)⟩ + 2⟨ĉ, w⟩ − z, gradient 2(w − w*(q));
    /// - maximize: loss = ⟨q, w*(q)⟩ − 2⟨ĉ, w⟩ + z, gradient 2(w*(q) − w).
    ///
    /// For an exact solver and consistent (c, w, z) the loss is ≥ 0 (up to the float32
    /// rounding of 2ĉ − c), and 0 at ĉ = c. A loss or gradient beyond float32's range is
    /// refused (INVALID_ARGUMENT). The op's output shape must equal its input shape; all
    /// inputs float32 and finite.
    pub fn spo_plus(
        &self,
        pred_cost: &Tensor,
        true_cost: &Tensor,
        true_sol: &Tensor,
        true_obj: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (call, pred) = Call::of(self, "SPO+", pred_cost, "pred_cost")?;
        let cost = call.rows(true_cost, "true_cost")?;
        let sol = call.rows(true_sol, "true_sol")?;
        let obj_size = true_obj.size();
        let b = call.rows.batch as i64;
        if obj_size != [b] && obj_size != [b, 1] {
            return Err(Error::invalid(format!(
                "true_obj must have shape [{b}] or [{b}, 1] (one objective per problem), got {obj_size:?}"
            )));
        }
        let obj = host(true_obj, "true_obj")?;
        let (loss, grad, addition) =
            self.spo_plus_rows(call.rows, &pred, &cost, &sol, &obj, true)?;
        let results = (call.per_problem(&loss)?, call.like_first(&grad)?);
        addition.commit(self)?;
        Ok(results)
    }

    /// [`PerturbedOp::spo_plus`] on host rows, checked here (finite): the loss per problem
    /// and the gradient. The inputs must not change during the call (the C API's buffers
    /// are borrowed for it): `true_sol` is read after the solve.
    ///
    /// The solve aside, this is three passes over the rows (the library's share of a call
    /// is benchmarked against the solver's, `make bench-methods`), in `passes`: q = 2ĉ − c
    /// is finite only when ĉ and c are, so the first pass's check of q (and of w) stands
    /// for the three inputs' (each input is checked by itself, for the message, only when
    /// that fails); the second makes the losses, the third the gradient, checked as it is
    /// written. The solutions go to the op's pool through the returned [`PoolAddition`],
    /// once the caller has staged the results. Without `grad_wanted` (a C caller that
    /// asks for the loss alone) the gradient is not checked: a gradient beyond float32's
    /// range fails only a call that returns it.
    pub(crate) fn spo_plus_rows(
        &self,
        rows: Rows,
        pred: &[f32],
        cost: &[f32],
        sol: &[f32],
        obj: &[f32],
        grad_wanted: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, PoolAddition)> {
        self.require_square("SPO+")?;
        // q, and whether q and w are finite, in one pass
        // (one rounding: 2ĉ is exact, so these are the bits of 2ĉ − c, but a q within
        // float32's range is not refused for an intermediate 2ĉ beyond it)
        let (q, finite) =
            passes::map2_checked(pred, cost, [sol], |c_hat, c| 2.0f32.mul_add(c_hat, -c))?;
        if !finite {
            rows.check_finite(pred, "pred_cost")?;
            rows.check_finite(cost, "true_cost")?;
            rows.check_finite(sol, "true_sol")?;
        }
        rows.per_problem().check_finite(obj, "true_obj")?;
        if !finite {
            rows.check_derived(&q, "2 * pred_cost - true_cost")?; // finite inputs can overflow
        }
        let wq = self.solve_host_rows_unpooled(&q, rows.batch)?;
        let sign = pyepo_sign(self.config().sense());
        let (loss, grad, finite) =
            passes::spo_plus_results(rows.d, &q, &wq, pred, sol, &obj[..rows.batch], sign)?;
        if !finite {
            rows.per_problem().check_result(&loss, "the SPO+ loss")?;
            if grad_wanted {
                rows.check_result(&grad, "the SPO+ gradient")?;
            }
        }
        Ok((loss, grad, PoolAddition(vec![wq])))
    }
}
