//! The differentiable black box (DBB: Vlastelica et al., "Differentiation of Blackbox
//! Combinatorial Solvers", ICLR 2020) and the negative identity (NID: Sahoo et al.,
//! "Backpropagation through Combinatorial Algorithms: Identity with Projection Works",
//! ICLR 2023). Both return y*(θ) forward ([`PerturbedOp::solve`]); these are their
//! backward passes.

use super::{pyepo_sign, step, Problems};
use crate::error::Result;
use crate::op::PerturbedOp;
use tch::Tensor;

impl PerturbedOp {
    /// DBB's gradient with respect to θ (`[batch, *input_shape]`) of a loss whose gradient
    /// with respect to the forward's solutions y = y*(θ) (`y`) is `grad_output`, by one
    /// solve per problem at θ' = θ + s·λ·g, as PyEPO's `blackboxOpt` (s = +1 minimizing,
    /// −1 maximizing): s·(y*(θ') − y) / λ, computed in float32 as written
    /// (θ' = θ + (s·λ)·g; (y*(θ') − y) · s / λ). λ (`lambda`) must be finite and > 0;
    /// PyEPO recommends 10 to 20 (in the units of θ). The op's output shape must equal its
    /// input shape; the result is on `theta`'s device.
    pub fn blackbox_vjp(
        &self,
        theta: &Tensor,
        y: &Tensor,
        grad_output: &Tensor,
        lambda: f64,
    ) -> Result<Tensor> {
        let lambda = step(lambda, "lambda")?;
        let (p, theta) = Problems::of(self, "the black-box gradient (DBB)", theta, "theta")?;
        let y = p.rows(y, "y")?;
        let g = p.rows(grad_output, "grad_output")?;
        let sign = pyepo_sign(self.config().sense());
        let step = sign * lambda;
        let shifted: Vec<f32> = theta.iter().zip(&g).map(|(&t, &g)| t + step * g).collect();
        let w = p.solve(self, &shifted)?;
        let grad: Vec<f32> = w
            .iter()
            .zip(&y)
            .map(|(&w, &y)| (w - y) * sign / lambda)
            .collect();
        p.like_first(&grad)
    }

    /// NID's gradient with respect to θ of a loss whose gradient with respect to the
    /// forward's solutions y*(θ) is `grad_output` (`[batch, *input_shape]`): −g when
    /// minimizing, g when maximizing (PyEPO's `negativeIdentity`; no solve). The op's
    /// output shape must equal its input shape; the result is on `grad_output`'s device.
    pub fn negative_identity_vjp(&self, grad_output: &Tensor) -> Result<Tensor> {
        let (p, g) = Problems::of(
            self,
            "the negative identity (NID)",
            grad_output,
            "grad_output",
        )?;
        let sign = -pyepo_sign(self.config().sense());
        let grad: Vec<f32> = g.iter().map(|&g| sign * g).collect();
        p.like_first(&grad)
    }
}
