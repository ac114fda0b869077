//! Dot products of float32 rows in f64, in a fixed order: the same bits on every machine
//! and for every thread count (the methods' losses, the solution pool's best member).

/// ⟨a, b⟩ in f64, in a fixed order (eight lanes by index mod 8 over whole groups of eight,
/// combined pairwise, then the tail in order): the same bits on every machine and thread
/// count, and vectorizable (one chain of dependent additions would cost four cycles an
/// entry). With AVX2 the same loop runs compiled for it, with the same bits (Rust never
/// fuses a multiply and an add).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { dots_avx2([(a, b)]) }[0];
    }
    dot_lanes(a, b)
}

/// (⟨a, b⟩, ⟨c, e⟩), each as [`dot`] gives it, in one loop (the two chains of additions
/// overlap).
pub(crate) fn dot2(a: &[f32], b: &[f32], c: &[f32], e: &[f32]) -> (f64, f64) {
    debug_assert!(a.len() == b.len() && c.len() == e.len());
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        let [x, y] = unsafe { dots_avx2([(a, b), (c, e)]) };
        return (x, y);
    }
    (dot_lanes(a, b), dot_lanes(c, e))
}

/// [`dot_lanes`] of each pair in AVX, the pairs in one loop (over the shortest pair's whole
/// groups of eight; each pair's own remaining groups after it): lanes 0-3 in one register,
/// 4-7 in another, each a multiply then an add (no fused multiply-add), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const K: usize>(pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
    use std::arch::x86_64::*;
    let lens = pairs.map(|(a, b)| a.len().min(b.len()));
    let common = lens.iter().copied().min().unwrap_or(0) / 8 * 8;
    let mut acc = [[_mm256_setzero_pd(); 2]; K];
    // one group of eight of pair k at i (i + 8 <= lens[k])
    let group = |acc: &mut [__m256d; 2], (a, b): (&[f32], &[f32]), i: usize| {
        // SAFETY: i + 8 <= both lengths (the callers' bounds).
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        let x_low = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
        let y_low = _mm256_cvtps_pd(_mm256_castps256_ps128(y));
        let x_high = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x));
        let y_high = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(y));
        acc[0] = _mm256_add_pd(acc[0], _mm256_mul_pd(x_low, y_low));
        acc[1] = _mm256_add_pd(acc[1], _mm256_mul_pd(x_high, y_high));
    };
    let mut i = 0;
    while i < common {
        for k in 0..K {
            group(&mut acc[k], pairs[k], i);
        }
        i += 8;
    }
    let mut out = [0.0; K];
    for k in 0..K {
        let whole = lens[k] / 8 * 8;
        let mut j = common;
        while j < whole {
            group(&mut acc[k], pairs[k], j);
            j += 8;
        }
        let mut lanes = [0.0f64; 8];
        // SAFETY: lanes holds 8 doubles.
        unsafe {
            _mm256_storeu_pd(lanes.as_mut_ptr(), acc[k][0]);
            _mm256_storeu_pd(lanes.as_mut_ptr().add(4), acc[k][1]);
        }
        let (a, b) = pairs[k];
        out[k] = combine(&lanes, &a[whole..lens[k]], &b[whole..lens[k]]);
    }
    out
}

fn dot_lanes(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let (mut xs, mut ys) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut xs).zip(&mut ys) {
        for k in 0..8 {
            lanes[k] += f64::from(x[k]) * f64::from(y[k]);
        }
    }
    combine(&lanes, xs.remainder(), ys.remainder())
}

/// The eight lanes combined pairwise, plus the tail's products summed in order.
fn combine(lanes: &[f64; 8], a: &[f32], b: &[f32]) -> f64 {
    let tail: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX dot is the portable one, bit for bit, for every length and sign mix.
    #[test]
    fn dot_is_the_same_with_and_without_avx() {
        let mut s = 12345u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 1e3
        };
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let want = dot_lanes(&a, &b);
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "n {n}");
            let naive: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            assert!((want - naive).abs() <= 1e-9 * (1.0 + naive.abs()), "n {n}");
            // two pairs in one loop, of this length and of every other
            for m in [0, 1, 7, 8, 9, 17, 40, n] {
                let c: Vec<f32> = (0..m).map(|_| next()).collect();
                let e: Vec<f32> = (0..m).map(|_| next()).collect();
                let (x, y) = dot2(&a, &b, &c, &e);
                let other = dot_lanes(&c, &e);
                assert_eq!(
                    (x.to_bits(), y.to_bits()),
                    (want.to_bits(), other.to_bits()),
                    "n {n}, m {m}"
                );
            }
        }
    }
}
