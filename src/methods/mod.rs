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
//! | I-MLE ([`PerturbedOp::imle_forward`], [`PerturbedOp::imle_vjp`]) | y_σ(θ) | s·mean(y*(x_k + sλg) − y*(x_k)) / λ over the forward's samples x_k | N per problem, and N (2N two-sided) in backward |
//! | AI-MLE ([`PerturbedOp::aimle_vjp`]) | y_σ(θ) | I-MLE's with λ = α‖θ‖/‖g‖, α adapted | as I-MLE |
//!
//! The signs follow PyEPO 2.2 (`pyepo.func`: `SPOPlus`, `blackboxOpt`, `negativeIdentity`,
//! `perturbationGradient`), where `sign` is +1 for minimize and −1 for maximize. Every
//! method needs a linear objective ⟨c, w⟩ (the op's output shape equal to its input shape).
//!
//! The solves run as [`PerturbedOp::solve`] runs them (the op's threads, workers and
//! device); the rest is done on the host per problem, its dot products summed in f64 in
//! index order: the results are the same bit for bit for any number of threads.

mod blackbox;
mod imle;
mod passes;
mod perturbation_gradient;
mod pool_losses;
mod spo_plus;

pub use imle::{AimleState, ImleRecord};
pub use pool_losses::PoolLoss;

use crate::error::{Error, Result, Status};
use crate::op::PerturbedOp;
use crate::settings::Sense;
use crate::tensors::host_floats;
use tch::{Device, Tensor};

/// The problems of one method call on the host: `batch` rows of `d` values each (the C
/// layer's borrowed buffers, or the tensor API's host copies).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    pub batch: usize,
    pub d: usize,
}

impl Rows {
    /// The call's rows of `d` values each (`d` ≥ 1).
    pub(crate) fn new(batch: usize, d: usize) -> Rows {
        Rows { batch, d }
    }

    /// One value per problem (a loss, an objective): messages name `name[p]`.
    fn per_problem(self) -> Rows {
        Rows { d: 0, ..self }
    }

    /// Problem `i`'s row of `values`.
    fn row(self, values: &[f32], i: usize) -> &[f32] {
        &values[i * self.d..(i + 1) * self.d]
    }

    /// NON_FINITE_INPUT naming the first non-finite value of `values` (`name[problem][index]`,
    /// or `name[problem]` for values per problem).
    pub(crate) fn check_finite(self, values: &[f32], name: &str) -> Result<()> {
        self.first_non_finite(values).map_or(Ok(()), |(at, v)| {
            Err(Error::new(
                Status::NonFiniteInput,
                format!("{name}{at} is {v}; {name} must be finite"),
            ))
        })
    }

    /// The input of a solve made from the call's inputs (2ĉ − c, θ + sλg, ĉ ± σc), checked:
    /// finite inputs can still overflow float32.
    fn check_derived(self, values: &[f32], what: &str) -> Result<()> {
        self.first_non_finite(values).map_or(Ok(()), |(at, v)| {
            Err(Error::new(
                Status::NonFiniteInput,
                format!("{what} is {v} at {at} (it overflows float32): the costs are too large"),
            ))
        })
    }

    /// A result (a loss per problem when `per_problem`, else a gradient) checked: finite
    /// inputs can give a result beyond float32's range (costs near its limit, a tiny λ or
    /// σ), which is refused (INVALID_ARGUMENT naming `what`) rather than returned as inf.
    fn check_result(self, values: &[f32], what: &str) -> Result<()> {
        self.first_non_finite(values).map_or(Ok(()), |(at, v)| {
            Err(Error::invalid(format!(
                "{what} is {v} at {at} (it overflows float32): the inputs are too large, or the step too small"
            )))
        })
    }

    /// (`[problem][index]`, or `[problem]` per problem; the value as text) of the first
    /// non-finite value, if any (one vectorized pass when all are finite).
    fn first_non_finite(self, values: &[f32]) -> Option<(String, String)> {
        if crate::input::all_finite(values) {
            return None;
        }
        let i = values.iter().position(|v| !v.is_finite())?;
        let v = values[i];
        let text = if v.is_nan() {
            "NaN".to_string()
        } else {
            crate::error::number(f64::from(v))
        };
        let at = match self.d {
            0 => format!("[{i}]"),
            d => format!("[{}][{}]", i / d, i % d),
        };
        Some((at, text))
    }
}

/// The tensors of a method call, on the host: where its results go.
struct Call {
    rows: Rows,
    /// The device of the call's first argument, where its results are returned.
    device: Device,
    shape: Vec<i64>,
}

impl Call {
    /// The call whose first argument is `first` (`[batch, *input_shape]`), for `method`,
    /// which needs a linear objective; `first` on the host.
    fn of(op: &PerturbedOp, method: &str, first: &Tensor, name: &str) -> Result<(Call, Vec<f32>)> {
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
        let call = Call {
            rows: Rows::new(size[0] as usize, op.input_numel()),
            device: first.device(),
            shape: size,
        };
        let values = host(first, name)?;
        Ok((call, values))
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
        host(t, name)
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
}

/// A float32 tensor's values on the host, checked finite.
fn host(t: &Tensor, name: &str) -> Result<Vec<f32>> {
    crate::input::check_floats(t, name)?;
    host_floats(t)
}

/// PyEPO's sign of a sense: +1 minimizing, −1 maximizing.
fn pyepo_sign(sense: Sense) -> f32 {
    match sense {
        Sense::Minimize => 1.0,
        Sense::Maximize => -1.0,
    }
}

/// A step (λ, σ) checked: finite, > 0, and > 0 as float32.
pub(crate) fn check_step(value: f64, name: &str) -> Result<()> {
    step(value, name).map(|_| ())
}

fn step(value: f64, name: &str) -> Result<f32> {
    let f = value as f32;
    if !(value.is_finite() && value > 0.0 && f > 0.0 && f.is_finite()) {
        return Err(Error::invalid(format!(
            "{name} must be finite and > 0 (and within float32's range), got {}",
            crate::error::number(value)
        )));
    }
    Ok(f)
}
