//! A counter-based random generator: Philox4x32-10 (Salmon et al., "Parallel random
//! numbers: as easy as 1, 2, 3", SC 2011).
//!
//! A block of four 32-bit words is a pure function of (key, counter), so any draw can be
//! computed independently of all others: the noise of a forward call does not depend on
//! chunk sizes, thread counts or the order in which chunks are produced, and the library
//! never touches libtorch's process-wide generator.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The Philox4x32-10 bijection of a 128-bit counter under a 64-bit key.
#[inline]
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let p0 = u64::from(M0) * u64::from(c0);
        let p1 = u64::from(M1) * u64::from(c2);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 = k0.wrapping_add(W0);
        k1 = k1.wrapping_add(W1);
    }
    [c0, c1, c2, c3]
}

/// One independent stream of blocks: the key is the user's seed, the upper half of the
/// counter the stream id (e.g. the index of a forward call), the lower half the block index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    key: [u32; 2],
    stream: u64,
}

impl Stream {
    /// The stream `stream` of generator `seed`.
    pub fn new(seed: u64, stream: u64) -> Stream {
        Stream {
            key: [seed as u32, (seed >> 32) as u32],
            stream,
        }
    }

    /// The blocks `first .. first + count` of this stream computed with libtorch integer
    /// operations on `device` (so that CUDA ops make their noise on the GPU): the words
    /// `[count · 4]` as an int64 tensor, equal to [`Stream::block`]'s bit for bit.
    pub fn blocks_on(
        &self,
        first: u64,
        count: usize,
        device: tch::Device,
    ) -> tch::Result<tch::Tensor> {
        use tch::{Kind, Tensor};
        const LOW: i64 = 0xFFFF_FFFF;
        let index = Tensor::f_arange_start(
            first as i64,
            first as i64 + count as i64,
            (Kind::Int64, device),
        )?;
        let mut c0 = index.f_bitwise_and(LOW)?;
        let mut c1 = index.f_bitwise_right_shift_tensor_scalar(32)?;
        let mut c2 = Tensor::f_full(
            [count as i64],
            i64::from(self.stream as u32),
            (Kind::Int64, device),
        )?;
        let mut c3 = Tensor::f_full(
            [count as i64],
            i64::from((self.stream >> 32) as u32),
            (Kind::Int64, device),
        )?;
        let [mut k0, mut k1] = self.key;
        for _ in 0..10 {
            // 32 × 32 → 64-bit products, wrapping in int64 (the low 64 bits are exact)
            let p0 = c0.f_mul_scalar(i64::from(M0))?;
            let p1 = c2.f_mul_scalar(i64::from(M1))?;
            let hi0 = p0
                .f_bitwise_right_shift_tensor_scalar(32)?
                .f_bitwise_and(LOW)?;
            let hi1 = p1
                .f_bitwise_right_shift_tensor_scalar(32)?
                .f_bitwise_and(LOW)?;
            let n0 = hi1
                .f_bitwise_xor_tensor(&c1)?
                .f_bitwise_xor(i64::from(k0))?;
            let n2 = hi0
                .f_bitwise_xor_tensor(&c3)?
                .f_bitwise_xor(i64::from(k1))?;
            c1 = p1.f_bitwise_and(LOW)?;
            c3 = p0.f_bitwise_and(LOW)?;
            c0 = n0;
            c2 = n2;
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        Tensor::f_stack(&[c0, c1, c2, c3], 1)?.f_view([count as i64 * 4])
    }

    /// The key (the seed's two halves).
    pub(crate) fn key(&self) -> [u32; 2] {
        self.key
    }

    /// The stream id (the upper half of every counter).
    pub(crate) fn id(&self) -> u64 {
        self.stream
    }

    /// The four 32-bit words of block `index` of this stream.
    #[inline]
    pub fn block(&self, index: u64) -> [u32; 4] {
        philox4x32(
            [
                index as u32,
                (index >> 32) as u32,
                self.stream as u32,
                (self.stream >> 32) as u32,
            ],
            self.key,
        )
    }

    /// Words `32·group .. 32·group + 32` of this stream (blocks 8·group .. 8·group + 8),
    /// computed eight blocks abreast so that the compiler vectorizes the rounds.
    #[inline(always)]
    pub fn words32(&self, group: u64, out: &mut [u32; 32]) {
        const LANES: usize = 8;
        let mut c0 = [0u32; LANES];
        let mut c1 = [0u32; LANES];
        let mut c2 = [self.stream as u32; LANES];
        let mut c3 = [(self.stream >> 32) as u32; LANES];
        for (i, (a, b)) in c0.iter_mut().zip(c1.iter_mut()).enumerate() {
            let index = group * LANES as u64 + i as u64;
            *a = index as u32;
            *b = (index >> 32) as u32;
        }
        let [mut k0, mut k1] = self.key;
        for _ in 0..10 {
            for i in 0..LANES {
                let p0 = u64::from(M0) * u64::from(c0[i]);
                let p1 = u64::from(M1) * u64::from(c2[i]);
                let n0 = (p1 >> 32) as u32 ^ c1[i] ^ k0;
                let n2 = (p0 >> 32) as u32 ^ c3[i] ^ k1;
                c0[i] = n0;
                c1[i] = p1 as u32;
                c2[i] = n2;
                c3[i] = p0 as u32;
            }
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for i in 0..LANES {
            out[4 * i..4 * i + 4].copy_from_slice(&[c0[i], c1[i], c2[i], c3[i]]);
        }
    }
}

impl Stream {
    /// [`Stream::words32`] with AVX2 integer vectors, written out with intrinsics (the
    /// compiler does not vectorize the 32 × 32 → 64-bit products by itself): the same
    /// words, bit for bit.
    ///
    /// # Safety
    /// Outside code compiled for AVX2, callers must check that the CPU has it
    /// ([`crate::fastmath::has_avx2`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub fn words32_avx2(&self, group: u64, out: &mut [u32; 32]) {
        use std::arch::x86_64::*;
        // (high 32 bits, low 32 bits) of the products a · m, lane by lane
        #[target_feature(enable = "avx2")]
        fn mul_hi_lo(a: __m256i, m: __m256i) -> (__m256i, __m256i) {
            let lo = _mm256_mullo_epi32(a, m);
            let even = _mm256_srli_epi64::<32>(_mm256_mul_epu32(a, m));
            let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
            (_mm256_blend_epi32::<0b1010_1010>(even, odd), lo)
        }
        let first = group * 8;
        let lanes =
            |f: fn(u64) -> u32| -> [u32; 8] { std::array::from_fn(|i| f(first + i as u64)) };
        // SAFETY (loads and stores): unaligned accesses of exactly 32 bytes of arrays
        let load = |a: [u32; 8]| unsafe { _mm256_loadu_si256(a.as_ptr().cast()) };
        let mut c0 = load(lanes(|i| i as u32));
        let mut c1 = load(lanes(|i| (i >> 32) as u32));
        let mut c2 = _mm256_set1_epi32(self.stream as u32 as i32);
        let mut c3 = _mm256_set1_epi32((self.stream >> 32) as u32 as i32);
        let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
        let [mut k0, mut k1] = self.key;
        for _ in 0..10 {
            let (hi0, lo0) = mul_hi_lo(c0, m0);
            let (hi1, lo1) = mul_hi_lo(c2, m1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(k0 as i32));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(k1 as i32));
            c1 = lo1;
            c3 = lo0;
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        // transpose to block order: out[4i + j] = c_j[i]
        let (a_lo, a_hi) = (_mm256_unpacklo_epi32(c0, c1), _mm256_unpackhi_epi32(c0, c1));
        let (b_lo, b_hi) = (_mm256_unpacklo_epi32(c2, c3), _mm256_unpackhi_epi32(c2, c3));
        let b04 = _mm256_unpacklo_epi64(a_lo, b_lo); // blocks 0 | 4
        let b15 = _mm256_unpackhi_epi64(a_lo, b_lo); // blocks 1 | 5
        let b26 = _mm256_unpacklo_epi64(a_hi, b_hi); // blocks 2 | 6
        let b37 = _mm256_unpackhi_epi64(a_hi, b_hi); // blocks 3 | 7
        let rows = [
            _mm256_permute2x128_si256::<0x20>(b04, b15),
            _mm256_permute2x128_si256::<0x20>(b26, b37),
            _mm256_permute2x128_si256::<0x31>(b04, b15),
            _mm256_permute2x128_si256::<0x31>(b26, b37),
        ];
        for (chunk, row) in out.chunks_exact_mut(8).zip(rows) {
            // SAFETY: chunk is 8 u32 = 32 bytes
            unsafe { _mm256_storeu_si256(chunk.as_mut_ptr().cast(), row) };
        }
    }
}

/// A word as a uniform float in the open interval (0, 1), from its top 23 bits:
/// (w >> 9 + 0.5) / 2^23, exactly representable in float32, never 0 or 1.
#[inline(always)]
pub fn unit(w: u32) -> f32 {
    ((w >> 9) as f32 + 0.5) * (1.0 / (1u32 << 23) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer tests from the Random123 distribution (kat_vectors, philox4x32_10).
    #[test]
    fn matches_random123_known_answers() {
        assert_eq!(
            philox4x32([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn avx2_words_equal_the_portable_ones() {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            for (seed, stream) in [(0u64, 0u64), (0x1234_5678_9abc, 77), (u64::MAX, u64::MAX)] {
                let s = Stream::new(seed, stream);
                // groups around a 32-bit boundary of the block index
                for group in [0u64, 1, 5, (1 << 29) - 1, 1 << 29, u64::MAX / 8] {
                    let (mut a, mut b) = ([0u32; 32], [0u32; 32]);
                    s.words32(group, &mut a);
                    // SAFETY: the CPU has AVX2.
                    unsafe { s.words32_avx2(group, &mut b) };
                    assert_eq!(a, b, "seed {seed} stream {stream} group {group}");
                }
            }
        }
    }

    #[test]
    fn eight_abreast_equals_one_by_one() {
        let s = Stream::new(0x1234_5678_9abc, 77);
        let mut words = [0u32; 32];
        s.words32(5, &mut words);
        for i in 0..8 {
            assert_eq!(words[4 * i..4 * i + 4], s.block(40 + i as u64));
        }
    }

    #[test]
    fn uniforms_are_open_interval_and_roughly_uniform() {
        let s = Stream::new(7, 3);
        let mut words = [0u32; 32];
        let (mut sum, mut n) = (0f64, 0usize);
        for g in 0..10_000 {
            s.words32(g, &mut words);
            for &w in &words {
                let u = unit(w);
                assert!(u > 0.0 && u < 1.0);
                sum += f64::from(u);
                n += 1;
            }
        }
        assert!(unit(0) > 0.0 && unit(u32::MAX) < 1.0);
        // s.d. of the mean: sqrt(1/12 / n); 5 s.d.
        let mean = sum / n as f64;
        assert!(
            (mean - 0.5).abs() < 5.0 * (1.0 / 12.0 / n as f64).sqrt(),
            "{mean}"
        );
    }

    #[test]
    fn libtorch_blocks_equal_the_rust_ones() {
        let s = Stream::new(0xdead_beef_1234, (7u64 << 32) + 5);
        let first = (1u64 << 33) - 3; // crosses a 32-bit boundary of the block index
        let words = s.blocks_on(first, 9, tch::Device::Cpu).unwrap();
        let words: Vec<i64> = Vec::try_from(words).unwrap();
        for i in 0..9 {
            let want = s.block(first + i as u64);
            for (j, &w) in want.iter().enumerate() {
                assert_eq!(words[i * 4 + j], i64::from(w), "block {i} word {j}");
            }
        }
    }

    #[test]
    fn streams_and_seeds_differ() {
        let a = Stream::new(1, 0).block(0);
        assert_ne!(a, Stream::new(1, 1).block(0));
        assert_ne!(a, Stream::new(2, 0).block(0));
        assert_ne!(a, Stream::new(1, 0).block(1));
        assert_eq!(a, Stream::new(1, 0).block(0));
    }
}
