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
    if t.numel() == 0 {
        return Ok(()); // nothing to check (and libtorch gives no data pointer)
    }
    if t.device() == tch::Device::Cpu && t.is_contiguous() {
        // on the host, one pass in Rust: libtorch's parallel reductions would leave its
        // OpenMP workers spinning on the cores the solver threads need
        // SAFETY: a contiguous CPU float32 tensor holds numel() floats, borrowed for the call.
        let values = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) };
        if all_finite(values) {
            return Ok(());
        }
    } else if bool::try_from(t.f_isfinite()?.f_all()?)? {
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

/// Whether every value is finite: one vectorizable pass (all exponent bits set means NaN or
/// an infinity).
pub(crate) fn all_finite(values: &[f32]) -> bool {
    let exponent = 0x7f80_0000u32;
    !values
        .iter()
        .fold(false, |any, v| any | (v.to_bits() & exponent == exponent))
}
