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

    /// Blocks `16·group .. 16·group + 16` of this stream, word by word: `out[j][i]` is
    /// word j of block 16·group + i (words 64·group .. 64·group + 64 of the stream, in
    /// four lanes-of-blocks arrays), computed sixteen blocks abreast so that the compiler
    /// vectorizes the rounds.
    #[inline(always)]
    pub(crate) fn words64(&self, group: u64, out: &mut Words64) {
        let [c0, c1, c2, c3] = out;
        (*c0, *c1) = counters(group * LANES64 as u64);
        c2.fill(self.stream as u32);
        c3.fill((self.stream >> 32) as u32);
        let [mut k0, mut k1] = self.key;
        for _ in 0..10 {
            for i in 0..LANES64 {
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
    }
}

/// The lower and upper halves of the block indices `first .. first + L`.
#[inline(always)]
fn counters<const L: usize>(first: u64) -> ([u32; L], [u32; L]) {
    let (mut lo, mut hi) = ([0u32; L], [0u32; L]);
    for (i, (l, h)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
        let index = first.wrapping_add(i as u64);
        (*l, *h) = (index as u32, (index >> 32) as u32);
    }
    (lo, hi)
}

/// Blocks per [`Stream::words64`] group.
pub(crate) const LANES64: usize = 16;

/// Sixteen Philox blocks, word by word: `[j][i]` is word j of block i.
pub(crate) type Words64 = [[u32; LANES64]; 4];

impl Stream {
    /// [`Stream::words64`] with AVX2 integer vectors, written out with intrinsics (the
    /// compiler does not vectorize the 32 × 32 → 64-bit products by itself): the same
    /// words, bit for bit.
    ///
    /// Each 64-bit lane carries one block's word in its low half (four blocks a vector,
    /// two vectors abreast): one `vpmuludq` gives both halves of a product, whose low half
    /// is the next word as it stands and whose high half a lane shuffle brings down. The
    /// high halves of the lanes are never read by the products, so they are left as they
    /// fall, and only the low halves are stored.
    ///
    /// # Safety
    /// Outside code compiled for AVX2, callers must check that the CPU has it
    /// ([`crate::fastmath::has_avx2`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn words64_avx2(&self, group: u64, out: &mut Words64) {
        use std::arch::x86_64::*;
        let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
        // the low halves of the four 64-bit lanes, in order
        let lows = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let first = group.wrapping_mul(LANES64 as u64);
        for pair in 0..2 {
            // blocks first + 8·pair + 4·v + lane, for v = 0, 1
            let index = |v: u64| {
                let base = _mm256_set1_epi64x(first.wrapping_add(8 * pair + 4 * v) as i64);
                _mm256_add_epi64(base, _mm256_setr_epi64x(0, 1, 2, 3))
            };
            let mut c0 = [index(0), index(1)];
            let mut c1 = c0.map(|c| _mm256_srli_epi64::<32>(c));
            let mut c2 = [_mm256_set1_epi32(self.stream as u32 as i32); 2];
            let mut c3 = [_mm256_set1_epi32((self.stream >> 32) as u32 as i32); 2];
            let [mut k0, mut k1] = self.key;
            for _ in 0..10 {
                let (kv0, kv1) = (_mm256_set1_epi32(k0 as i32), _mm256_set1_epi32(k1 as i32));
                for v in 0..2 {
                    let p0 = _mm256_mul_epu32(c0[v], m0);
                    let p1 = _mm256_mul_epu32(c2[v], m1);
                    // the high halves, brought down to the low halves of the lanes
                    let hi0 = _mm256_shuffle_epi32::<0b10_11_00_01>(p0);
                    let hi1 = _mm256_shuffle_epi32::<0b10_11_00_01>(p1);
                    c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), kv0);
                    c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), kv1);
                    c1[v] = p1;
                    c3[v] = p0;
                }
                k0 = k0.wrapping_add(W0);
                k1 = k1.wrapping_add(W1);
            }
            for (word, c) in out.iter_mut().zip([c0, c1, c2, c3]) {
                for (v, c) in c.into_iter().enumerate() {
                    let packed = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c, lows));
                    let at = 8 * pair as usize + 4 * v;
                    // SAFETY: 4 u32 = 16 bytes of the array, at `at` + 4 ≤ 16
                    unsafe { _mm_storeu_si128(word[at..at + 4].as_mut_ptr().cast(), packed) };
                }
            }
        }
    }

    /// [`Stream::words64`] with AVX-512 integer vectors: the same words, bit for bit, in
    /// 64-bit lanes as [`Stream::words64_avx2`] (eight blocks a vector, two abreast).
    ///
    /// # Safety
    /// Outside code compiled for AVX-512 F, callers must check that the CPU has it
    /// ([`crate::fastmath::has_avx512`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn words64_avx512(&self, group: u64, out: &mut Words64) {
        use std::arch::x86_64::*;
        let (m0, m1) = (_mm512_set1_epi32(M0 as i32), _mm512_set1_epi32(M1 as i32));
        let first = group.wrapping_mul(LANES64 as u64);
        // blocks first + 8·v + lane, for v = 0, 1
        let index = |v: u64| {
            let base = _mm512_set1_epi64(first.wrapping_add(8 * v) as i64);
            _mm512_add_epi64(base, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7))
        };
        let mut c0 = [index(0), index(1)];
        let mut c1 = c0.map(|c| _mm512_srli_epi64::<32>(c));
        let mut c2 = [_mm512_set1_epi32(self.stream as u32 as i32); 2];
        let mut c3 = [_mm512_set1_epi32((self.stream >> 32) as u32 as i32); 2];
        let [mut k0, mut k1] = self.key;
        for _ in 0..10 {
            let (kv0, kv1) = (_mm512_set1_epi32(k0 as i32), _mm512_set1_epi32(k1 as i32));
            for v in 0..2 {
                let p0 = _mm512_mul_epu32(c0[v], m0);
                let p1 = _mm512_mul_epu32(c2[v], m1);
                let hi0 = _mm512_shuffle_epi32::<0b10_11_00_01>(p0);
                let hi1 = _mm512_shuffle_epi32::<0b10_11_00_01>(p1);
                // three-way exclusive or (truth table 0x96)
                c0[v] = _mm512_ternarylogic_epi32::<0x96>(hi1, c1[v], kv0);
                c2[v] = _mm512_ternarylogic_epi32::<0x96>(hi0, c3[v], kv1);
                c1[v] = p1;
                c3[v] = p0;
            }
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for (word, c) in out.iter_mut().zip([c0, c1, c2, c3]) {
            for (v, c) in c.into_iter().enumerate() {
                // the low halves of the eight 64-bit lanes
                let packed = _mm512_cvtepi64_epi32(c);
                // SAFETY: 8 u32 = 32 bytes of the array, at 8·v + 8 ≤ 16
                unsafe { _mm256_storeu_si256(word[8 * v..8 * v + 8].as_mut_ptr().cast(), packed) };
            }
        }
    }
}

/// A word as a uniform float in the open interval (0, 1), from its top 23 bits:
/// (w >> 9 + 0.5) / 2^23, exactly representable in float32, never 0 or 1.
#[inline(always)]
pub fn unit(w: u32) -> f32 {
    ((w >> 9) as f32 + 0.5) * (1.0 / (1u32 << 23) as f32)
}

/// The threshold below which a uniform 32-bit word falls with probability `p` (in [0, 1]):
/// ⌈p · 2³²⌉, so that p = 1 takes every word and p = 0 none.
pub(crate) fn chance_threshold(p: f64) -> u64 {
    (p * 4_294_967_296.0).ceil() as u64
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
    fn vector_words_equal_the_portable_ones() {
        #[cfg(target_arch = "x86_64")]
        for (seed, stream) in [(0u64, 0u64), (0x1234_5678_9abc, 77), (u64::MAX, u64::MAX)] {
            let s = Stream::new(seed, stream);
            // groups around a 32-bit boundary of the block index
            for group in [0u64, 1, 5, (1 << 28) - 1, 1 << 28, u64::MAX / 16] {
                let mut a = [[0u32; LANES64]; 4];
                s.words64(group, &mut a);
                if crate::fastmath::has_avx2() {
                    let mut b = [[1u32; LANES64]; 4];
                    // SAFETY: the CPU has AVX2.
                    unsafe { s.words64_avx2(group, &mut b) };
                    assert_eq!(a, b, "AVX2: seed {seed} stream {stream} group {group}");
                }
                if crate::fastmath::has_avx512() {
                    let mut b = [[1u32; LANES64]; 4];
                    // SAFETY: the CPU has AVX-512 F.
                    unsafe { s.words64_avx512(group, &mut b) };
                    assert_eq!(a, b, "AVX-512: seed {seed} stream {stream} group {group}");
                }
            }
        }
    }

    #[test]
    fn sixteen_abreast_equals_one_by_one() {
        let s = Stream::new(0x1234_5678_9abc, 77);
        let mut words = [[0u32; LANES64]; 4];
        s.words64(5, &mut words);
        let blocks = (0..LANES64).map(|i| words.map(|word| word[i]));
        for (i, block) in blocks.enumerate() {
            assert_eq!(block, s.block(80 + i as u64));
        }
    }

    #[test]
    fn uniforms_are_open_interval_and_roughly_uniform() {
        let s = Stream::new(7, 3);
        let mut words = [[0u32; LANES64]; 4];
        let (mut sum, mut n) = (0f64, 0usize);
        for g in 0..5_000 {
            s.words64(g, &mut words);
            for &w in words.as_flattened() {
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
