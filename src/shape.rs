//! Shapes of problems, and size arithmetic that refuses to overflow.

use crate::error::{Error, Result};

/// The number of elements of a shape whose dimensions are all ≥ 1 (1 for rank 0).
/// `what` names the shape in the error message.
pub fn numel(shape: &[i64], what: &str) -> Result<usize> {
    let mut total: i64 = 1;
    for (axis, &dim) in shape.iter().enumerate() {
        if dim < 1 {
            return Err(Error::invalid(format!(
                "{what}[{axis}] must be >= 1, got {dim}"
            )));
        }
        total = total.checked_mul(dim).ok_or_else(|| {
            Error::invalid(format!(
                "{what} {shape:?} has more than {} elements",
                i64::MAX
            ))
        })?;
    }
    usize::try_from(total)
        .map_err(|_| Error::invalid(format!("{what} {shape:?} does not fit in memory")))
}

/// `factors` multiplied, or an error naming `what` when the product overflows an i64
/// (the largest size libtorch and the C API can express).
pub fn checked_product(factors: &[usize], what: &str) -> Result<usize> {
    let mut total: usize = 1;
    for &f in factors {
        total = total
            .checked_mul(f)
            .filter(|&t| t <= i64::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{what} overflows: the product of {factors:?} is too large"
                ))
            })?;
    }
    Ok(total)
}

/// [`checked_product`] for a number of float32 values, whose size in bytes must also stay
/// within `isize::MAX` (the most any buffer can span): INVALID_ARGUMENT naming the size.
pub fn checked_floats(factors: &[usize], what: &str) -> Result<usize> {
    let floats = checked_product(factors, what)?;
    if floats > isize::MAX as usize / 4 {
        return Err(Error::invalid(format!(
            "{what} = {floats} floats would take {} bytes, more than the {} bytes a buffer can span",
            floats as u128 * 4,
            isize::MAX
        )));
    }
    Ok(floats)
}

/// `[batch, *shape]`.
pub fn batched(batch: usize, shape: &[i64]) -> Vec<i64> {
    std::iter::once(batch as i64)
        .chain(shape.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numel_checks_dims_and_overflow() {
        assert_eq!(numel(&[], "s").unwrap(), 1);
        assert_eq!(numel(&[2, 3], "s").unwrap(), 6);
        assert_eq!(
            numel(&[2, 0], "input_shape").unwrap_err().message(),
            "input_shape[1] must be >= 1, got 0"
        );
        assert!(numel(&[i64::MAX, 2], "s")
            .unwrap_err()
            .message()
            .contains("more than"));
        assert!(checked_product(&[usize::MAX / 2, 3], "x").is_err());
        assert!(checked_product(&[1 << 40, 1 << 30], "x").is_err());
        assert_eq!(checked_product(&[4, 5, 6], "x").unwrap(), 120);
        // 2^60 x 4 floats is within i64 as a count, not as bytes
        assert!(checked_product(&[1 << 60, 4], "x").is_ok());
        let err = checked_floats(&[1 << 60, 1, 4], "batch * num_samples * input_numel");
        assert!(err.unwrap_err().message().contains("bytes"));
        assert_eq!(checked_floats(&[4, 5, 6], "x").unwrap(), 120);
    }
}
