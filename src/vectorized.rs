//! Loops run compiled for the widest vectors the CPU has: a [`Kernel`]'s `run` is
//! `#[inline(always)]`, so each `#[target_feature]` copy here holds a copy of it, and it is
//! handed the [`Vectors`] of its copy, whose explicit vector code (the f64 dot products)
//! is then inlined into it. Plain Rust arithmetic gives the same bits in every copy (no
//! multiply and add is ever fused), and so do the dot products of every width.

use crate::dot;

/// A loop to run by [`vectorized`].
pub(crate) trait Kernel {
    type Output;
    fn run<V: Vectors>(self, vectors: V) -> Self::Output;
}

/// The vector code a copy of a [`Kernel`] may call: values of these types exist only on a
/// CPU that has their instructions ([`vectorized`] makes them).
pub(crate) trait Vectors: Copy {
    /// [`crate::dot::dot`] of each pair (the pairs' chains of additions overlap).
    fn dots<const K: usize>(self, pairs: [(&[f32], &[f32]); K]) -> [f64; K];
}

/// Plain code, for any CPU.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Vectors for Portable {
    #[inline(always)]
    fn dots<const K: usize>(self, pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
        pairs.map(|(a, b)| dot::dot_lanes(a, b))
    }
}

/// AVX2 and FMA: made only where the CPU has them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Vectors for Avx2 {
    #[inline(always)]
    fn dots<const K: usize>(self, pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
        // SAFETY: an Avx2 exists only where the CPU has AVX2 and FMA.
        unsafe { dot::dots_avx2(pairs) }
    }
}

/// AVX-512 (F, VL, DQ, BW), AVX2 and FMA: made only where the CPU has them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512(());

#[cfg(target_arch = "x86_64")]
impl Vectors for Avx512 {
    #[inline(always)]
    fn dots<const K: usize>(self, pairs: [(&[f32], &[f32]); K]) -> [f64; K] {
        // SAFETY: an Avx512 exists only where the CPU has AVX-512F.
        unsafe { dot::dots_avx512(pairs) }
    }
}

/// Runs `kernel` compiled for AVX-512 or AVX2 when the CPU has them, else as it is.
#[inline]
pub(crate) fn vectorized<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::fastmath::has_avx512() {
            // SAFETY: the CPU has AVX-512 (F, VL, DQ, BW), AVX2 and FMA.
            return unsafe { run_avx512(kernel, Avx512(())) };
        }
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { run_avx2(kernel, Avx2(())) };
        }
    }
    kernel.run(Portable)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn run_avx512<K: Kernel>(kernel: K, vectors: Avx512) -> K::Output {
    kernel.run(vectors)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(kernel: K, vectors: Avx2) -> K::Output {
    kernel.run(vectors)
}
