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
    // (a CUDA tensor's check reads its result on the host, which a CUDA graph capture
    // forbids: refused before anything is enqueued)
    crate::cuda_stream::check_usable(t.device())?;
    if t.numel() == 0 {
        return Ok(()); // nothing to check (and libtorch gives no data pointer)
    }
    if t.device() == tch::Device::Cpu && t.is_contiguous() {
        // on the host, one pass in Rust (the OpenMP rule: crate::tuning)
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

/// Whether every value is finite: one vectorized pass (all exponent bits set means NaN or
/// an infinity).
pub(crate) fn all_finite(values: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { all_finite_avx2(values) };
    }
    all_finite_impl(values)
}

/// [`all_finite_impl`] 32 values a step in four independent vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn all_finite_avx2(values: &[f32]) -> bool {
    use std::arch::x86_64::*;
    let exponent = _mm256_set1_epi32(0x7f80_0000);
    let mut any = [_mm256_setzero_si256(); 4];
    let (chunks, tail) = values.as_chunks::<32>();
    for chunk in chunks {
        for (j, a) in any.iter_mut().enumerate() {
            // SAFETY: 8 floats of the chunk's 32.
            let v = unsafe { _mm256_loadu_si256(chunk.as_ptr().add(8 * j) as *const __m256i) };
            let bad = _mm256_cmpeq_epi32(_mm256_and_si256(v, exponent), exponent);
            *a = _mm256_or_si256(*a, bad);
        }
    }
    let any = _mm256_or_si256(
        _mm256_or_si256(any[0], any[1]),
        _mm256_or_si256(any[2], any[3]),
    );
    _mm256_testz_si256(any, any) == 1 && all_finite_impl(tail)
}

fn all_finite_impl(values: &[f32]) -> bool {
    let exponent = 0x7f80_0000u32;
    !values
        .iter()
        .fold(false, |any, v| any | (v.to_bits() & exponent == exponent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_finds_any_nan_or_infinity_in_lanes_and_tail() {
        let finite = [
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            -0.0,
            0.0,
            1.0,
        ];
        for len in [0usize, 1, 15, 16, 17, 40, 1000] {
            let ok: Vec<f32> = (0..len).map(|i| finite[i % finite.len()]).collect();
            assert!(all_finite(&ok), "len {len}");
            assert!(all_finite_impl(&ok), "len {len}");
            for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, len / 2, len.saturating_sub(1)]
                    .into_iter()
                    .filter(|&a| a < len)
                {
                    let mut v = ok.clone();
                    v[at] = bad;
                    assert!(!all_finite(&v), "len {len} at {at} {bad}");
                    assert!(!all_finite_impl(&v), "len {len} at {at} {bad}");
                }
            }
        }
    }
}
