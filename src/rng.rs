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
        Stream { key: [seed as u32, (seed >> 32) as u32], stream }
    }

    /// The four 32-bit words of block `index` of this stream.
    #[inline]
    pub fn block(&self, index: u64) -> [u32; 4] {
        philox4x32(
            [index as u32, (index >> 32) as u32, self.stream as u32, (self.stream >> 32) as u32],
            self.key,
        )
    }

    /// Uniform floats in the open interval (0, 1) for the words `first .. first + out.len()`
    /// of this stream (word w is word w % 4 of block w / 4), each from the top 24 bits of
    /// its word: (w >> 8 + 0.5) / 2^24, exactly representable, never 0 or 1.
    pub fn fill_uniform(&self, first: u64, out: &mut [f32]) {
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        let to_unit = |w: u32| ((w >> 8) as f32 + 0.5) * SCALE;
        let mut w = first;
        let mut rest = &mut out[..];
        // head: up to the next block boundary
        while w % 4 != 0 && !rest.is_empty() {
            rest[0] = to_unit(self.block(w / 4)[(w % 4) as usize]);
            rest = &mut rest[1..];
            w += 1;
        }
        let mut quads = rest.chunks_exact_mut(4);
        for quad in &mut quads {
            let words = self.block(w / 4);
            for (o, &x) in quad.iter_mut().zip(&words) {
                *o = to_unit(x);
            }
            w += 4;
        }
        let tail = quads.into_remainder();
        if !tail.is_empty() {
            let words = self.block(w / 4);
            for (o, &x) in tail.iter_mut().zip(&words) {
                *o = to_unit(x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer tests from the Random123 distribution (kat_vectors, philox4x32_10).
    #[test]
    fn matches_random123_known_answers() {
        assert_eq!(philox4x32([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniforms_are_open_interval_and_roughly_uniform() {
        let n = 400_000;
        let mut u = vec![0f32; n];
        Stream::new(7, 3).fill_uniform(0, &mut u);
        assert!(u.iter().all(|&v| v > 0.0 && v < 1.0));
        let mean = u.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        // s.d. of the mean: sqrt(1/12 / n) ~ 4.6e-4; 5 s.d.
        assert!((mean - 0.5).abs() < 2.3e-3, "{mean}");
    }

    #[test]
    fn uniform_words_do_not_depend_on_where_a_fill_starts() {
        let s = Stream::new(9, 4);
        let mut whole = vec![0f32; 37];
        s.fill_uniform(5, &mut whole);
        for split in [1, 3, 4, 11, 36] {
            let mut parts = vec![0f32; 37];
            let (a, b) = parts.split_at_mut(split);
            s.fill_uniform(5, a);
            s.fill_uniform(5 + split as u64, b);
            assert_eq!(whole, parts);
        }
        assert!(whole.iter().all(|&u| u > 0.0 && u < 1.0));
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
