//! The differentiable black box (DBB: Vlastelica et al., "Differentiation of Blackbox
//! Combinatorial Solvers", ICLR 2020) and the negative identity (NID: Sahoo et al.,
//! "Backpropagation through Combinatorial Algorithms: Identity with Projection Works",
//! ICLR 2023). Both return y*(θ) forward ([`PerturbedOp::solve`]); these are their
//! backward passes.

use super::{passes, pyepo_sign, step, Call, Rows};
use crate::error::Result;
use crate::op::{PerturbedOp, PoolAddition};
use tch::Tensor;

impl PerturbedOp {
    /// DBB's gradient with respect to θ (`[batch, *input_shape]`) of a loss whose gradient
    /// with respect to the forward's solutions y = y*(θ) (`y`) is `grad_output`, by one
    /// solve per problem at θ' = θ + s·λ·g, as PyEPO's `blackboxOpt` (s = +1 minimizing,
    /// −1 maximizing): s·(y*(θ') − y) / λ, computed in float32 as written
    /// (θ' = θ + (s·λ)·g; (y*(θ') − y) · s / λ). λ (`lambda`) must be finite and > 0;
    /// PyEPO recommends 10 to 20 (in the units of θ); a gradient beyond float32's range (a
    /// tiny λ) is refused. The op's output shape must equal its input shape; the result is
    /// on `theta`'s device.
    pub fn blackbox_vjp(
        &self,
        theta: &Tensor,
        y: &Tensor,
        grad_output: &Tensor,
        lambda: f64,
    ) -> Result<Tensor> {
        step(lambda, "lambda")?;
        let (call, theta) = Call::of(self, "the black-box gradient (DBB)", theta, "theta")?;
        let y = call.rows(y, "y")?;
        let g = call.rows(grad_output, "grad_output")?;
        let (grad, addition) = self.blackbox_vjp_rows(call.rows, &theta, &y, &g, lambda)?;
        let grad = call.like_first(&grad)?;
        addition.commit(self)?;
        Ok(grad)
    }

    /// [`PerturbedOp::blackbox_vjp`] on host rows, checked here (finite); they must not
    /// change during the call (`y` is read after the solve). θ' = θ + s·λ·g is finite only
    /// when θ and g are: one pass makes θ' and checks it and y, and each input is checked
    /// by itself, for the message, only when that fails; one pass makes the gradient and
    /// checks it (`passes`). The solutions, for the op's pool, are committed by the caller
    /// once the call has succeeded ([`PoolAddition`]).
    pub(crate) fn blackbox_vjp_rows(
        &self,
        rows: Rows,
        theta: &[f32],
        y: &[f32],
        g: &[f32],
        lambda: f64,
    ) -> Result<(Vec<f32>, PoolAddition)> {
        let lambda = step(lambda, "lambda")?;
        self.require_square("the black-box gradient (DBB)")?;
        let sign = pyepo_sign(self.config().sense());
        let step = sign * lambda;
        let (shifted, finite) = passes::map2_checked(theta, g, [y], |t, g| t + step * g)?;
        if !finite {
            rows.check_finite(theta, "theta")?;
            rows.check_finite(y, "y")?;
            rows.check_finite(g, "grad_output")?;
            rows.check_derived(&shifted, "theta + lambda * grad_output")?;
        }
        let w = self.solve_host_rows_unpooled(&shifted, rows.batch)?;
        let (grad, finite) = passes::map2_checked(&w, y, [], |w, y| (w - y) * sign / lambda)?;
        if !finite {
            rows.check_result(&grad, "the black-box gradient")?;
        }
        Ok((grad, PoolAddition(vec![w])))
    }

    /// NID's gradient with respect to θ of a loss whose gradient with respect to the
    /// forward's solutions y*(θ) is `grad_output` (`[batch, *input_shape]`): −g when
    /// minimizing, g when maximizing (PyEPO's `negativeIdentity`; no solve). The op's
    /// output shape must equal its input shape; the result is on `grad_output`'s device.
    pub fn negative_identity_vjp(&self, grad_output: &Tensor) -> Result<Tensor> {
        let (call, g) = Call::of(
            self,
            "the negative identity (NID)",
            grad_output,
            "grad_output",
        )?;
        call.like_first(&self.negative_identity_vjp_rows(call.rows, &g)?)
    }

    /// [`PerturbedOp::negative_identity_vjp`] on host rows, checked here (finite).
    pub(crate) fn negative_identity_vjp_rows(&self, rows: Rows, g: &[f32]) -> Result<Vec<f32>> {
        self.require_square("the negative identity (NID)")?;
        let sign = -pyepo_sign(self.config().sense());
        let (grad, finite) = passes::map2_checked(g, g, [], |g, _| sign * g)?;
        if !finite {
            rows.check_finite(g, "grad_output")?;
        }
        Ok(grad)
    }
}
