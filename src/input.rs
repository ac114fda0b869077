//! Checks of caller-provided tensors, shared by every entry point: one place decides what
//! a bad input is and how the message names it.

use crate::error::{Error, Result, Status};
use tch::{Kind, Tensor};

/// Checks that a float32 tensor is finite (NON_FINITE_INPUT names the first bad entry as
/// `what[problem][index]`).
pub(crate) fn check_floats(t: &Tensor, what: &str) -> Result<()> {
    if t.f_kind()? != Kind::Float {
        return Err(Error::invalid(format!(
            "{what} must be float32, got {:?}",
            t.f_kind()?
        )));
    }
    if bool::try_from(t.f_isfinite()?.f_all()?)? {
        return Ok(());
    }
    let flat = t.f_reshape([t.size().first().copied().unwrap_or(1).max(1), -1])?;
    let cols = flat.size()[1].max(1);
    let bad = flat
        .f_isfinite()?
        .f_logical_not()?
        .f_flatten(0, -1)?
        .f_to_kind(Kind::Int)?;
    let bad = i64::try_from(bad.f_argmax(0, false)?)?;
    let value = f64::try_from(flat.f_flatten(0, -1)?.f_get(bad)?)?;
    let value = if value.is_nan() {
        "NaN".to_string()
    } else {
        format!("{value}")
    };
    Err(Error::new(
        Status::NonFiniteInput,
        format!(
            "{what}[{}][{}] is {value}; {what} must be finite",
            bad / cols,
            bad % cols
        ),
    ))
}
