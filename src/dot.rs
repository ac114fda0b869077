//! Dot products of float32 rows in f64, in a fixed order: the same bits on every machine
//! and for every thread count (the methods' losses, the solution pool's best member).

/// ⟨a, b⟩ in f64, in a fixed order (eight lanes by index mod 8 over whole groups of eight,
/// combined pairwise, then the tail in order): the same bits on every machine and thread
/// count, and vectorizable (one chain of dependent additions would cost four cycles an
/// entry). With AVX2 the same loop runs compiled for it, with the same bits (Rust never
/// fuses a multiply and an add).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    dots([(a, b)])[0]
}

/// (⟨a, b⟩, ⟨c, e⟩), each as [`dot`] gives it, in one loop (the two chains of additions
/// overlap).
pub(crate) fn dot2(a: &[f32], b: &[f32], c: &[f32], e: &[f32]) -> (f64, f64) {
    debug_assert!(a.len() == b.len() && c.len() == e.len());
    let [x, y] = dots([(a, b), (c, e)]);
    (x, y)
}

/// [`dot`] of each pair, on the widest vectors the CPU has (the pairs' chains of additions
/// overlap).
#[inline]
fn dots<const K: usize>(pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::fastmath::has_avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { dots_avx512(pairs) };
        }
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { dots_avx2(pairs) };
        }
    }
    pairs.map(|(a, b)| dot_lanes(a, b))
}

/// [`dot_lanes`] of each pair in AVX, the pairs in one loop (over the shortest pair's whole
/// groups of eight; each pair's own remaining groups after it): lanes 0-3 in one register,
/// 4-7 in another, so the same bits. Each lane adds its product in one fused multiply-add:
/// the product of two float32 values is exact in f64 (24 + 24 significant bits of 53), so
/// rounding `x·y + acc` once is rounding `acc + x·y` as `dot_lanes` does.
/// Each four floats are loaded and widened in one step (no lane extraction: the widening
/// is what bounds the loop).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn dots_avx2<const K: usize>(pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
    use std::arch::x86_64::*;
    // one group of eight of a pair at i (i + 8 <= its length)
    let group = |acc: &mut [__m256d; 2], (a, b): (&[f32], &[f32]), i: usize| {
        // SAFETY: i + 8 <= both lengths (the callers' bounds).
        let [x_low, x_high, y_low, y_high] = unsafe {
            [
                a.as_ptr().add(i),
                a.as_ptr().add(i + 4),
                b.as_ptr().add(i),
                b.as_ptr().add(i + 4),
            ]
            .map(|p| _mm256_cvtps_pd(_mm_loadu_ps(p)))
        };
        acc[0] = _mm256_fmadd_pd(x_low, y_low, acc[0]);
        acc[1] = _mm256_fmadd_pd(x_high, y_high, acc[1]);
    };
    let lanes = |acc: &[__m256d; 2]| {
        let mut lanes = [0.0f64; 8];
        // SAFETY: lanes holds 8 doubles.
        unsafe {
            _mm256_storeu_pd(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_pd(lanes.as_mut_ptr().add(4), acc[1]);
        }
        lanes
    };
    in_groups(pairs, [_mm256_setzero_pd(); 2], group, lanes)
}

/// [`dots_avx2`] in 512-bit registers: a pair's eight f64 lanes in one register instead of
/// two, the same operations lane by lane, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(crate) unsafe fn dots_avx512<const K: usize>(pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
    use std::arch::x86_64::*;
    let group = |acc: &mut __m512d, (a, b): (&[f32], &[f32]), i: usize| {
        // SAFETY: i + 8 <= both lengths (the callers' bounds).
        let (x, y) = unsafe {
            (
                _mm512_cvtps_pd(_mm256_loadu_ps(a.as_ptr().add(i))),
                _mm512_cvtps_pd(_mm256_loadu_ps(b.as_ptr().add(i))),
            )
        };
        *acc = _mm512_fmadd_pd(x, y, *acc);
    };
    let lanes = |acc: &__m512d| {
        let mut lanes = [0.0f64; 8];
        // SAFETY: lanes holds 8 doubles.
        unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), *acc) };
        lanes
    };
    in_groups(pairs, _mm512_setzero_pd(), group, lanes)
}

/// The loop of the vector dots: `group(acc, pair, i)` adds the pair's products i..i + 8
/// to its accumulator, the pairs in turn over the shortest pair's whole groups of eight,
/// then each pair's own remaining groups; `lanes` reads an accumulator's eight lanes,
/// which [`combine`] sums with the pair's tail.
#[inline(always)]
fn in_groups<const K: usize, A: Copy>(
    pairs: [(&[f32], &[f32]); K],
    zero: A,
    group: impl Fn(&mut A, (&[f32], &[f32]), usize),
    lanes: impl Fn(&A) -> [f64; 8],
) -> [f64; K] {
    let lens = pairs.map(|(a, b)| a.len().min(b.len()));
    let common = lens.iter().copied().min().unwrap_or(0) / 8 * 8;
    let mut acc = [zero; K];
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
        let (a, b) = pairs[k];
        out[k] = combine(&lanes(&acc[k]), &a[whole..lens[k]], &b[whole..lens[k]]);
    }
    out
}

/// [`dot`] as plain Rust, inlined into its caller: vectorized as the caller is compiled
/// (a [`crate::vectorized::Kernel`]), the same bits either way.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f64 {
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
#[inline(always)]
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
        // (under Miri, which checks the unsafe code, lengths around the vector widths)
        let lengths: Vec<usize> = if cfg!(miri) {
            vec![0, 1, 7, 8, 9, 17, 40]
        } else {
            (0..70).collect()
        };
        for n in lengths {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let want = dot_lanes(&a, &b);
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "n {n}");
            // each vector width this CPU has, not only the widest that `dot` picks
            #[cfg(target_arch = "x86_64")]
            {
                if crate::fastmath::has_avx2() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    let [x] = unsafe { dots_avx2([(&a[..], &b[..])]) };
                    assert_eq!(x.to_bits(), want.to_bits(), "AVX2, n {n}");
                }
                if crate::fastmath::has_avx512() {
                    // SAFETY: the CPU has AVX-512F.
                    let [x] = unsafe { dots_avx512([(&a[..], &b[..])]) };
                    assert_eq!(x.to_bits(), want.to_bits(), "AVX-512, n {n}");
                }
            }
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
