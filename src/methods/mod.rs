//! Decision-focused learning over the op's exact solver: the methods of PyEPO's family
//! that need only y*(x), the plain solve ([`PerturbedOp::solve`]), sometimes called again
//! in backward. Each returns results per problem of a batch:
//!
//! | method | forward | gradient | solves |
//! |---|---|---|---|
//! | SPO+ ([`PerturbedOp::spo_plus`]) | the loss | 2(w*(c) − w*(2ĉ − c)), mirrored when maximizing | 1 per problem |
//! | DBB ([`PerturbedOp::blackbox_vjp`]) | y*(θ) | (y*(θ + λg) − y*(θ)) / λ, mirrored when maximizing | 1 per problem in backward |
//! | NID ([`PerturbedOp::negative_identity_vjp`]) | y*(θ) | −g minimizing, g maximizing | none in backward |
//! | PG ([`PerturbedOp::perturbation_gradient`]) | the finite-difference loss | (w₊ − w₋) / (2σ) or (w − w₋) / σ, signed | 2 per problem |
//!
//! The signs follow PyEPO 2.2 (`pyepo.func`: `SPOPlus`, `blackboxOpt`, `negativeIdentity`,
//! `perturbationGradient`), where `sign` is +1 for minimize and −1 for maximize. Every
//! method needs a linear objective ⟨c, w⟩ (the op's output shape equal to its input shape).
//!
//! The solves run as [`PerturbedOp::solve`] runs them (the op's threads, workers and
//! device); the rest is done on the host per problem, its dot products summed in f64 in
//! index order: the results are the same bit for bit for any number of threads.

mod blackbox;
mod perturbation_gradient;
mod spo_plus;

use crate::error::{Error, Result};
use crate::op::PerturbedOp;
use crate::settings::Sense;
use crate::tensors::host_floats;
use tch::{Device, Tensor};

/// The problems of one method call: how many, their size, and where results go.
struct Problems {
    batch: usize,
    d: usize,
    /// The device of the call's first argument, where its results are returned.
    device: Device,
    shape: Vec<i64>,
}

impl Problems {
    /// The problems of a call whose first argument is `first` (`[batch, *input_shape]`),
    /// for `method`, which needs a linear objective; `first` on the host.
    fn of(
        op: &PerturbedOp,
        method: &str,
        first: &Tensor,
        name: &str,
    ) -> Result<(Problems, Vec<f32>)> {
        op.require_square(method)?;
        let size = first.size();
        let inner = op.input_shape();
        if size.len() != inner.len() + 1 || size[1..] != inner[..] {
            return Err(Error::invalid(format!(
                "{name} must have shape [batch, {}], got {size:?}",
                inner
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let problems = Problems {
            batch: size[0] as usize,
            d: op.input_numel(),
            device: first.device(),
            shape: size,
        };
        let values = problems.host(first, name)?;
        Ok((problems, values))
    }

    /// Another argument of the call, of the first's shape, on the host.
    fn rows(&self, t: &Tensor, name: &str) -> Result<Vec<f32>> {
        if t.size() != self.shape {
            return Err(Error::invalid(format!(
                "{name} must have the shape of the call's first argument {:?}, got {:?}",
                self.shape,
                t.size()
            )));
        }
        self.host(t, name)
    }

    fn host(&self, t: &Tensor, name: &str) -> Result<Vec<f32>> {
        crate::input::check_floats(t, name)?;
        host_floats(t)
    }

    /// One value per problem, `[batch]`, on the call's device.
    fn per_problem(&self, values: &[f32]) -> Result<Tensor> {
        Ok(crate::tensors::from_slice(values)?.f_to_device(self.device)?)
    }

    /// Rows of the call's shape on the call's device.
    fn like_first(&self, values: &[f32]) -> Result<Tensor> {
        Ok(crate::tensors::from_slice(values)?
            .f_reshape(&self.shape)?
            .f_to_device(self.device)?)
    }

    /// y*(x) of `x.len() / d` problems (rows of the op's input shape), on the host.
    fn solve(&self, op: &PerturbedOp, x: &[f32]) -> Result<Vec<f32>> {
        let rows = x.len() / self.d.max(1);
        let x = crate::tensors::from_slice(x)?
            .f_reshape(crate::shape::batched(rows, op.input_shape()))?;
        host_floats(&op.solve(&x)?)
    }

    /// The rows of problem `i` in each of `values`.
    fn row<'a>(&self, values: &'a [f32], i: usize) -> &'a [f32] {
        &values[i * self.d..(i + 1) * self.d]
    }
}

/// PyEPO's sign of a sense: +1 minimizing, −1 maximizing.
fn pyepo_sign(sense: Sense) -> f32 {
    match sense {
        Sense::Minimize => 1.0,
        Sense::Maximize => -1.0,
    }
}

/// ⟨a, b⟩ summed in f64 in index order.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// A step (λ, σ) checked: finite, > 0, and > 0 as float32.
pub(crate) fn check_step(value: f64, name: &str) -> Result<()> {
    step(value, name).map(|_| ())
}

fn step(value: f64, name: &str) -> Result<f32> {
    let f = value as f32;
    if !(value.is_finite() && value > 0.0 && f > 0.0 && f.is_finite()) {
        return Err(Error::invalid(format!(
            "{name} must be finite and > 0 (and within float32's range), got {value}"
        )));
    }
    Ok(f)
}
