//! SPO+ (Elmachtoub & Grigas, "Smart 'Predict, then Optimize'", Management Science 2022).

use super::{dot, pyepo_sign, Problems};
use crate::error::{Error, Result};
use crate::op::PerturbedOp;
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
    /// For an exact solver and consistent (c, w, z) the loss is ≥ 0, and 0 at ĉ = c. The
    /// op's output shape must equal its input shape; all inputs float32 and finite.
    pub fn spo_plus(
        &self,
        pred_cost: &Tensor,
        true_cost: &Tensor,
        true_sol: &Tensor,
        true_obj: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (p, pred) = Problems::of(self, "SPO+", pred_cost, "pred_cost")?;
        let cost = p.rows(true_cost, "true_cost")?;
        let sol = p.rows(true_sol, "true_sol")?;
        let obj_size = true_obj.size();
        let b = p.batch as i64;
        if obj_size != [b] && obj_size != [b, 1] {
            return Err(Error::invalid(format!(
                "true_obj must have shape [{b}] or [{b}, 1] (one objective per problem), got {obj_size:?}"
            )));
        }
        let obj = p.host(true_obj, "true_obj")?;
        let q: Vec<f32> = pred
            .iter()
            .zip(&cost)
            .map(|(&c_hat, &c)| 2.0 * c_hat - c)
            .collect();
        let wq = p.solve(self, &q)?;
        let sign = pyepo_sign(self.config().sense());
        let loss: Vec<f32> = obj
            .iter()
            .enumerate()
            .map(|(i, &z)| {
                let value = -dot(p.row(&q, i), p.row(&wq, i))
                    + 2.0 * dot(p.row(&pred, i), p.row(&sol, i))
                    - f64::from(z);
                (f64::from(sign) * value) as f32
            })
            .collect();
        let grad: Vec<f32> = sol
            .iter()
            .zip(&wq)
            .map(|(&w, &w_q)| sign * 2.0 * (w - w_q))
            .collect();
        Ok((p.per_problem(&loss)?, p.like_first(&grad)?))
    }
}
