//! The vector work on one row that the sums of [`super::sums`] do: a row copied into whole
//! 8-float vectors, a scaled row added, a float32 dot product, the non-zero entries of 8
//! floats as a mask, and the scores of rows ahead asked for.

/// ⟨a, b⟩ in float32, in 8 lanes (vectorized).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, at) = a.as_chunks::<8>();
    let (bc, bt) = b.as_chunks::<8>();
    for (a, b) in ac.iter().zip(bc) {
        for j in 0..8 {
            lanes[j] += a[j] * b[j];
        }
    }
    let tail: f32 = at.iter().zip(bt).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Bit j set when `values[j]` (j < 8) is not ±0.
#[inline(always)]
pub(super) fn nonzero_mask(values: &[f32]) -> u32 {
    values
        .iter()
        .enumerate()
        .fold(0u32, |mask, (j, v)| mask | (u32::from(*v != 0.0) << j))
}

/// Asks for the cache line of `values[at]` (nothing past the end): the scores of rows
/// ahead, which the hardware's prefetchers fetch too late for short rows.
#[inline(always)]
pub(super) fn prefetch(values: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(ahead) = values.get(at) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch (of an element of the slice) reads nothing
        unsafe { _mm_prefetch::<_MM_HINT_T0>((ahead as *const f32).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, at);
}

/// `row` into the first `row.len()` floats of `padded` (the rest stays as it is: zero).
#[inline]
pub(super) fn copy_padded(padded: &mut [f32], rest: &[f32], d: usize) {
    padded[..d].copy_from_slice(&rest[..d]);
}

/// [`copy_padded`] in whole 8-float vectors (the padding of the last one written as the
/// zeros it holds), so that the vector loads of the padded row that follow get their data
/// from the stores at once (a vector load of several narrower stores waits for them to
/// reach the cache).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn copy_padded_avx2(padded: &mut [f32], rest: &[f32], d: usize) {
    use std::arch::x86_64::*;
    let row = &rest[..d];
    let (chunks, tail) = row.as_chunks::<8>();
    let (out, spare) = padded.as_chunks_mut::<8>();
    debug_assert!(spare.is_empty());
    assert!(
        out.len() >= row.len().div_ceil(8),
        "a padded row holds the row"
    );
    for (o, c) in out.iter_mut().zip(chunks) {
        // SAFETY: arrays of 8 floats (32 bytes)
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_loadu_ps(c.as_ptr())) };
    }
    if !tail.is_empty() {
        let (v, _) = tail_vector(rest, d - tail.len(), tail.len());
        // SAFETY: one array of 8 floats
        unsafe { _mm256_storeu_ps(out[chunks.len()].as_mut_ptr(), v) };
    }
}

/// The `len` (< 8) floats of `rest` from `at` in a vector whose other lanes are zero, and
/// whether it took one plain load over the floats that follow them (the next row's),
/// cleared in the register (a masked load stalls on some CPUs): when 8 floats are left
/// from `at`, else (the last row of its slice) a masked load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn tail_vector(
    rest: &[f32],
    at: usize,
    len: usize,
) -> (std::arch::x86_64::__m256, bool) {
    use std::arch::x86_64::*;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lanes);
    match rest.get(at..at + 8) {
        // SAFETY: a slice of 8 floats
        Some(eight) => (
            unsafe { _mm256_and_ps(_mm256_loadu_ps(eight.as_ptr()), _mm256_castsi256_ps(keep)) },
            true,
        ),
        // SAFETY: the masked load reads only the lanes below `len`, which are in `rest`
        // (the others neither read nor fault)
        None => (
            unsafe { _mm256_maskload_ps(rest[at..at + len].as_ptr(), keep) },
            false,
        ),
    }
}

/// a += v · b over whole 8-float vectors (lengths multiples of 8).
#[inline]
pub(super) fn add_scaled(a: &mut [f32], v: f32, b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a += v * b;
    }
}

/// [`add_scaled`] one AVX vector at a time (the compiler vectorizes across vectors, which
/// leaves the short rows of small problems scalar); a multiply then an add, as there, so
/// the sums are the same bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn add_scaled_avx2(a: &mut [f32], v: f32, b: &[f32]) {
    use std::arch::x86_64::*;
    let v = _mm256_set1_ps(v);
    for (a, b) in a
        .as_chunks_mut::<8>()
        .0
        .iter_mut()
        .zip(b.as_chunks::<8>().0)
    {
        // SAFETY: a and b are arrays of 8 floats (32 bytes)
        unsafe {
            let sum = _mm256_add_ps(
                _mm256_loadu_ps(a.as_ptr()),
                _mm256_mul_ps(v, _mm256_loadu_ps(b.as_ptr())),
            );
            _mm256_storeu_ps(a.as_mut_ptr(), sum);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A row copied into its padded vectors holds the row, then zeros up to the next
    /// multiple of 8, whatever follows it (NaN and infinities of the next row included),
    /// for a row followed by others and for the last row of its slice.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn padded_rows_hold_the_row_then_zeros_whatever_follows() {
        if !crate::fastmath::has_avx2() {
            return;
        }
        for d in 1..=20usize {
            let dp = d.div_ceil(8) * 8;
            let rows = 3;
            let s: Vec<f32> = (0..rows * d)
                .map(|k| match k % d {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    j => j as f32 - 7.5,
                })
                .collect();
            for r in 0..rows {
                let mut padded = vec![f32::NAN; dp];
                // SAFETY: this CPU has AVX2
                unsafe { super::copy_padded_avx2(&mut padded, &s[r * d..], d) };
                let want: Vec<u32> = s[r * d..(r + 1) * d]
                    .iter()
                    .map(|v| v.to_bits())
                    .chain(std::iter::repeat_n(0, dp - d))
                    .collect();
                let got: Vec<u32> = padded.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "d {d}, row {r}");
                // a row with 8 floats from its tail on takes the plain load, the last row
                // of its slice (or one whose tail is 8 floats from the end) the masked one
                let (tail, at) = (d % 8, r * d + d - d % 8);
                if tail > 0 {
                    // SAFETY: this CPU has AVX2
                    let (v, plain) = unsafe { super::tail_vector(&s, at, tail) };
                    assert_eq!(plain, at + 8 <= s.len(), "d {d}, row {r}");
                    let mut lanes = [0f32; 8];
                    // SAFETY: an array of 8 floats; this CPU has AVX2
                    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                    let bits: Vec<u32> = lanes.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(bits, want[d - tail..d - tail + 8], "d {d}, row {r}");
                }
            }
        }
    }
}
