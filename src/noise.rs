//! Noise distributions: sampling from a counter-based stream, and the score ∇ν(z).
//!
//! | noise  | sample                              | score ∇ν(z)  |
//! |--------|-------------------------------------|--------------|
//! | Normal | Box-Muller on two uniforms          | z            |
//! | Gumbel | z = −log(−log u), u ~ U(0,1)        | 1 − e^{−z}   |
//! | Sum-of-Gamma(κ, s) | (Σᵢ₌₁ˢ Gamma(1/κ, κ/i) − log s) / κ | none (no closed form) |
//!
//! Sum-of-Gamma noise (I-MLE's) is drawn by `crate::sum_of_gamma`; it has no score.
//!
//! Element e of a call's noise is a pure function of (stream, e): it comes from word e of
//! the stream (Gumbel) or words 2⌊e/2⌋ and 2⌊e/2⌋+1 (Normal, a Box-Muller pair). So the
//! draws do not depend on chunking or on the number of threads, bit for bit. Words are
//! made 64 at a time (sixteen blocks abreast) by [`crate::rng`] and turned into noise with
//! the vectorizable `fastmath` functions, on all cores. The uniforms have 23 bits, so
//! |Normal| < 5.8 and Gumbel ∈ (−2.9, 16.7): the truncated tails have probability below
//! 10⁻⁷.

use crate::error::{Error, Result};
use crate::fastmath::{has_avx2, has_avx512, ln, sincos_2pi};
use crate::rng::{unit, Stream, Words64, LANES64};
pub(crate) use crate::sum_of_gamma::no_score;
pub use crate::sum_of_gamma::SumOfGamma;
use crate::uninit::{as_uninit, written};
use std::mem::MaybeUninit;
use tch::{Device, Kind, Tensor};

/// The distribution of the i.i.d. noise coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Noise {
    /// Standard normal noise (C: `PERT_NOISE_NORMAL = 0`).
    #[default]
    Normal,
    /// Standard Gumbel noise (C: `PERT_NOISE_GUMBEL = 1`).
    Gumbel,
    /// Sum-of-Gamma noise (C: `PERT_NOISE_SUM_OF_GAMMA = 2`, `pert_config_set_sum_of_gamma`):
    /// (Σᵢ₌₁ˢ Gamma(1/κ, κ/i) − log s) / κ, with mean (Hₛ − log s)/κ and variance
    /// (Σᵢ₌₁ˢ 1/i²)/κ. Made by [`Noise::sum_of_gamma`].
    SumOfGamma(SumOfGamma),
}

// (κ is finite and > 0: its bits compare as its value)
impl Eq for Noise {}

/// The room for 64 values of `v` from `at`.
#[inline(always)]
fn group(v: &mut [MaybeUninit<f32>], at: usize) -> &mut [MaybeUninit<f32>; 64] {
    (&mut v[at..at + 64]).try_into().expect("64 values")
}

/// Sixteen blocks' values by word and block (`[j][i]`: from word j of block i).
type Values64 = [[f32; LANES64]; 4];

/// Values by word and block into stream order (`out[4i + j] = v[j][i]`), every one of the
/// 64 written.
#[inline(always)]
fn interleave(v: &Values64, out: &mut [MaybeUninit<f32>; 64]) {
    for (i, o) in out.chunks_exact_mut(4).enumerate() {
        for (j, slot) in o.iter_mut().enumerate() {
            slot.write(v[j][i]);
        }
    }
}

/// [`interleave`] with AVX-512 shuffles (the compiler's own is element by element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn interleave_avx512(v: &Values64, out: &mut [MaybeUninit<f32>; 64]) {
    use std::arch::x86_64::*;
    // SAFETY: unaligned loads of exactly 64 bytes of arrays
    let [a, b, c, d] = v.map(|row| unsafe { _mm512_loadu_ps(row.as_ptr()) });
    // 4 × 4 transposes within each 128-bit lane: r_k holds blocks k, k + 4, k + 8, k + 12
    let (ab_lo, ab_hi) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let (cd_lo, cd_hi) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    let r0 = ps(_mm512_unpacklo_pd(pd(ab_lo), pd(cd_lo)));
    let r1 = ps(_mm512_unpackhi_pd(pd(ab_lo), pd(cd_lo)));
    let r2 = ps(_mm512_unpacklo_pd(pd(ab_hi), pd(cd_hi)));
    let r3 = ps(_mm512_unpackhi_pd(pd(ab_hi), pd(cd_hi)));
    // then the 128-bit lanes in block order: out vector m = lane m of r0, r1, r2, r3
    let r01_lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(r0, r1); // r0.0 r0.1 r1.0 r1.1
    let r23_lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(r2, r3);
    let r01_hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(r0, r1); // r0.2 r0.3 r1.2 r1.3
    let r23_hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(r2, r3);
    let rows = [
        _mm512_shuffle_f32x4::<0b10_00_10_00>(r01_lo, r23_lo),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(r01_lo, r23_lo),
        _mm512_shuffle_f32x4::<0b10_00_10_00>(r01_hi, r23_hi),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(r01_hi, r23_hi),
    ];
    for (chunk, row) in out.chunks_exact_mut(16).zip(rows) {
        // SAFETY: chunk is room for 16 floats = 64 bytes
        unsafe { _mm512_storeu_ps(chunk.as_mut_ptr().cast(), row) };
    }
}

/// [`interleave`] with AVX shuffles, eight blocks at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn interleave_avx2(v: &Values64, out: &mut [MaybeUninit<f32>; 64]) {
    use std::arch::x86_64::*;
    for half in 0..2 {
        // SAFETY: unaligned loads of exactly 32 bytes of arrays
        let [a, b, c, d] = v.map(|row| unsafe { _mm256_loadu_ps(row[8 * half..].as_ptr()) });
        let (ab_lo, ab_hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let (cd_lo, cd_hi) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
        let pd = _mm256_castps_pd;
        let ps = _mm256_castpd_ps;
        // r_k: blocks k and k + 4 of the half
        let r0 = ps(_mm256_unpacklo_pd(pd(ab_lo), pd(cd_lo)));
        let r1 = ps(_mm256_unpackhi_pd(pd(ab_lo), pd(cd_lo)));
        let r2 = ps(_mm256_unpacklo_pd(pd(ab_hi), pd(cd_hi)));
        let r3 = ps(_mm256_unpackhi_pd(pd(ab_hi), pd(cd_hi)));
        let rows = [
            _mm256_permute2f128_ps::<0x20>(r0, r1),
            _mm256_permute2f128_ps::<0x20>(r2, r3),
            _mm256_permute2f128_ps::<0x31>(r0, r1),
            _mm256_permute2f128_ps::<0x31>(r2, r3),
        ];
        for (k, row) in rows.into_iter().enumerate() {
            // SAFETY: room for 8 floats = 32 bytes within the 64
            unsafe { _mm256_storeu_ps(out[32 * half + 8 * k..].as_mut_ptr().cast(), row) };
        }
    }
}

impl Noise {
    /// The noise with this C number (Sum-of-Gamma with PyEPO's defaults, κ = 5 and 10 terms).
    pub fn from_u32(value: u32) -> Result<Noise> {
        match value {
            0 => Ok(Noise::Normal),
            1 => Ok(Noise::Gumbel),
            2 => Noise::sum_of_gamma(5.0, 10),
            _ => Err(Error::invalid(format!(
                "noise must be PERT_NOISE_NORMAL (0), PERT_NOISE_GUMBEL (1) or PERT_NOISE_SUM_OF_GAMMA (2), got {value}"
            ))),
        }
    }

    /// The C number of the noise (`PERT_NOISE_*`).
    pub fn code(self) -> u32 {
        match self {
            Noise::Normal => 0,
            Noise::Gumbel => 1,
            Noise::SumOfGamma(_) => 2,
        }
    }

    /// Sum-of-Gamma noise with κ = `kappa` (0.001 to 1000) and `terms` terms (1 to 1000).
    pub fn sum_of_gamma(kappa: f64, terms: u32) -> Result<Noise> {
        Ok(Noise::SumOfGamma(SumOfGamma::new(kappa, terms)?))
    }

    /// Whether the noise has a score ∇ν(z), which a Jacobian estimate needs.
    pub fn has_score(self) -> bool {
        !matches!(self, Noise::SumOfGamma(_))
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Noise::Normal => "Normal",
            Noise::Gumbel => "Gumbel",
            Noise::SumOfGamma(_) => "Sum-of-Gamma",
        }
    }

    /// Elements `first .. first + count` of the noise of `stream`, a float32 tensor
    /// `[count]` on the CPU, made on up to `threads` threads.
    pub fn sample(
        self,
        stream: &Stream,
        first: u64,
        count: usize,
        threads: usize,
    ) -> Result<Tensor> {
        let z = Tensor::f_zeros([count as i64], (Kind::Float, Device::Cpu))?;
        if count == 0 {
            return Ok(z); // empty tensors have no data pointer
        }
        // SAFETY: `z` is a fresh contiguous float32 CPU tensor of `count` initialized
        // elements, owned here and not aliased.
        let out = unsafe { std::slice::from_raw_parts_mut(z.data_ptr() as *mut f32, count) };
        let per = count.div_ceil(threads.max(1)).max(1 << 15);
        if per >= count {
            self.fill(stream, first, out);
        } else {
            let parts: Vec<_> = out.chunks_mut(per).enumerate().collect();
            on_threads(parts, threads, |(i, part)| {
                self.fill(stream, first + (i * per) as u64, part)
            });
        }
        Ok(z)
    }

    /// Elements `first .. first + count` of the noise of `stream` made on `device` (how CUDA
    /// ops draw: nothing is drawn on the CPU and copied): on a CUDA device by one fused
    /// kernel compiled at run time (see `cuda_noise`), else, or when that kernel
    /// is unavailable, as [`Noise::sample_on_libtorch`]. The random words equal the CPU's
    /// bit for bit; the transforms are the device's, so the values equal
    /// [`Noise::sample`]'s up to float rounding.
    pub fn sample_on(
        self,
        stream: &Stream,
        first: u64,
        count: usize,
        device: Device,
    ) -> Result<Tensor> {
        if let Noise::SumOfGamma(_) = self {
            // drawn on the host (no device kernel), then copied
            return Ok(self.sample(stream, first, count, 1)?.f_to_device(device)?);
        }
        if let Some(z) =
            crate::cuda_noise::sample(self == Noise::Gumbel, stream, first, count, device)
        {
            return z;
        }
        self.sample_on_libtorch(stream, first, count, device)
    }

    /// Whether [`Noise::sample_on`] uses the fused kernel on CUDA device `index` (the form
    /// of its code: "CUBIN sm_90", or PTX and why not CUBIN), or why not (for the GPU
    /// check and benchmarks).
    #[doc(hidden)]
    pub fn fused_cuda_kernel(index: usize) -> std::result::Result<String, String> {
        crate::cuda_noise::status(index)
    }

    /// As [`Noise::sample_on`], with libtorch operations alone (about 130 of them: the
    /// Philox rounds in int64 arithmetic, then the transform), on any device.
    pub fn sample_on_libtorch(
        self,
        stream: &Stream,
        first: u64,
        count: usize,
        device: Device,
    ) -> Result<Tensor> {
        let start = first & !3; // whole blocks
        let blocks = ((first + count as u64).div_ceil(4) - start / 4) as usize;
        let words = stream.blocks_on(start / 4, blocks, device)?;
        let u = words
            .f_bitwise_right_shift_tensor_scalar(9)?
            .f_to_kind(Kind::Float)?
            .f_add_scalar_(0.5)?
            .f_mul_scalar_(1.0 / f64::from(1u32 << 23))?;
        let z = match self {
            Noise::SumOfGamma(_) => {
                return Ok(self.sample(stream, first, count, 1)?.f_to_device(device)?);
            }
            Noise::Gumbel => u.f_log()?.f_neg_()?.f_log_()?.f_neg_()?,
            Noise::Normal => {
                let pairs = u.f_view([-1, 2])?;
                let r = pairs
                    .f_select(1, 0)?
                    .f_log()?
                    .f_mul_scalar(-2.0)?
                    .f_sqrt_()?;
                let angle = pairs.f_select(1, 1)?.f_mul_scalar(std::f64::consts::TAU)?;
                let cos = r.f_mul(&angle.f_cos()?)?;
                let sin = r.f_mul(&angle.f_sin()?)?;
                Tensor::f_stack(&[cos, sin], 1)?.f_view([-1])?
            }
        };
        Ok(z.f_narrow(0, (first - start) as i64, count as i64)?)
    }

    /// Writes elements `first .. first + out.len()` of the noise of `stream`.
    pub fn fill(self, stream: &Stream, first: u64, out: &mut [f32]) {
        // SAFETY: the samplers write only floats
        self.fill_with(stream, first, unsafe { as_uninit(out) }, None);
    }

    /// As [`Noise::fill`], and the scores ∇ν(z) into `score` (same length). The Gumbel
    /// score 1 − e^{−z} comes free from the sampler: e^{−z} = −log u.
    pub fn fill_with_score(self, stream: &Stream, first: u64, out: &mut [f32], score: &mut [f32]) {
        // SAFETY: the samplers write only floats
        let (out, score) = unsafe { (as_uninit(out), as_uninit(score)) };
        self.fill_with(stream, first, out, Some(score));
    }

    /// Writes every element of `out` (elements `first ..` of the noise, and their scores
    /// into `score` when given, same length).
    fn fill_with(
        self,
        stream: &Stream,
        first: u64,
        out: &mut [MaybeUninit<f32>],
        score: Option<&mut [MaybeUninit<f32>]>,
    ) {
        if let Noise::SumOfGamma(sog) = self {
            assert!(
                score.is_none(),
                "Sum-of-Gamma noise has no score (callers refuse tapes)"
            );
            return sog.fill(stream, first, out);
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512 F/VL/DQ/BW, AVX2 and FMA.
            return unsafe { self.fill_with_avx512(stream, first, out, score) };
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.fill_with_avx2(stream, first, out, score) };
        }
        self.fill_with_impl(stream, first, out, score, Stream::words64, interleave)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
    unsafe fn fill_with_avx512(
        self,
        stream: &Stream,
        first: u64,
        out: &mut [MaybeUninit<f32>],
        score: Option<&mut [MaybeUninit<f32>]>,
    ) {
        let words = |s: &Stream, g, w: &mut Words64| s.words64_avx512(g, w);
        self.fill_with_impl(stream, first, out, score, words, |v, o| {
            interleave_avx512(v, o)
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_with_avx2(
        self,
        stream: &Stream,
        first: u64,
        out: &mut [MaybeUninit<f32>],
        score: Option<&mut [MaybeUninit<f32>]>,
    ) {
        let words = |s: &Stream, g, w: &mut Words64| s.words64_avx2(g, w);
        self.fill_with_impl(stream, first, out, score, words, |v, o| {
            interleave_avx2(v, o)
        })
    }

    #[inline(always)]
    fn fill_with_impl(
        self,
        stream: &Stream,
        first: u64,
        out: &mut [MaybeUninit<f32>],
        mut score: Option<&mut [MaybeUninit<f32>]>,
        words64: impl Fn(&Stream, u64, &mut Words64),
        interleave: impl Fn(&Values64, &mut [MaybeUninit<f32>; 64]),
    ) {
        let mut words: Words64 = [[0; LANES64]; 4];
        let mut values = [MaybeUninit::<f32>::uninit(); 64];
        let mut scores = [MaybeUninit::<f32>::uninit(); 64];
        let mut e = first;
        let mut done = 0;
        while done < out.len() {
            words64(stream, e / 64, &mut words);
            let offset = (e % 64) as usize;
            let take = (64 - offset).min(out.len() - done);
            if take == 64 {
                // a whole group: straight into the outputs
                match score.as_deref_mut() {
                    Some(score) => self.transform(
                        &words,
                        group(out, done),
                        Some(group(score, done)),
                        &interleave,
                    ),
                    None => self.transform(&words, group(out, done), None, &interleave),
                }
            } else {
                self.transform(&words, &mut values, Some(&mut scores), &interleave);
                out[done..done + take].copy_from_slice(&values[offset..offset + take]);
                if let Some(score) = score.as_deref_mut() {
                    score[done..done + take].copy_from_slice(&scores[offset..offset + take]);
                }
            }
            done += take;
            e += take as u64;
        }
    }

    /// Noise values, and their scores when asked for, from the 64 words of sixteen blocks
    /// (value 4i + j from word j of block i; Normal: Box-Muller on words 0 and 1, and on
    /// words 2 and 3, of each block), computed lane by lane over the blocks.
    #[inline(always)]
    fn transform(
        self,
        words: &Words64,
        out: &mut [MaybeUninit<f32>; 64],
        score: Option<&mut [MaybeUninit<f32>; 64]>,
        interleave: impl Fn(&Values64, &mut [MaybeUninit<f32>; 64]),
    ) {
        let mut v = [[0f32; LANES64]; 4];
        match self {
            Noise::Gumbel => {
                let mut sv = [[0f32; LANES64]; 4];
                for ((vj, sj), wj) in v.iter_mut().zip(sv.iter_mut()).zip(words) {
                    for ((o, s), &w) in vj.iter_mut().zip(sj.iter_mut()).zip(wj) {
                        let e = -ln(unit(w)); // Exp(1), = e^{−z}
                        *o = -ln(e);
                        *s = 1.0 - e;
                    }
                }
                if let Some(score) = score {
                    interleave(&sv, score);
                }
            }
            Noise::SumOfGamma(_) => unreachable!("Sum-of-Gamma noise is drawn by fill_with"),
            Noise::Normal => {
                let [v0, v1, v2, v3] = &mut v;
                for (pair, (cos, sin)) in [(0, (v0, v1)), (2, (v2, v3))] {
                    for i in 0..LANES64 {
                        let r = (-2.0 * ln(unit(words[pair][i]))).sqrt();
                        let (s, c) = sincos_2pi(unit(words[pair + 1][i]));
                        cos[i] = r * c;
                        sin[i] = r * s;
                    }
                }
                if let Some(score) = score {
                    interleave(&v, score);
                }
            }
        }
        interleave(&v, out);
    }
    /// [`Noise::fill_with_score`] (or [`Noise::fill`] for an empty `s`) split over up to
    /// `threads` threads (same values): every element of `z` written.
    fn fill_parallel(
        self,
        stream: &Stream,
        first: u64,
        z: &mut [MaybeUninit<f32>],
        s: &mut [f32],
        threads: usize,
    ) {
        let fill = move |first: u64, zp: &mut [MaybeUninit<f32>], sp: &mut [f32]| {
            // SAFETY: the samplers write only floats
            let sp = (!sp.is_empty()).then(|| unsafe { as_uninit(sp) });
            self.fill_with(stream, first, zp, sp)
        };
        let per = z.len().div_ceil(threads.max(1)).max(1 << 15);
        if per >= z.len() {
            return fill(first, z, s);
        }
        let mut scores = s.chunks_mut(per);
        let parts: Vec<_> = z
            .chunks_mut(per)
            .enumerate()
            .map(|(i, zp)| (i, zp, scores.next().unwrap_or_default()))
            .collect();
        on_threads(parts, threads, |(i, zp, sp)| {
            fill(first + (i * per) as u64, zp, sp)
        });
    }

    /// The score ∇ν(z), elementwise.
    pub fn score(self, z: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Noise::Normal => z.shallow_clone(),
            Noise::Gumbel => z.f_neg()?.f_exp_()?.f_neg_()?.f_add_scalar_(1.0)?,
            Noise::SumOfGamma(_) => return Err(no_score()),
        })
    }
}

/// Runs `work` on every item of `parts`, on up to `threads` threads, the calling thread
/// one of them: the parts are taken from a shared queue, so a thread that cannot start
/// (thread or memory limits) leaves its parts to the others. (Each part's values depend
/// only on the part, not on the thread that fills it.)
fn on_threads<T: Send>(parts: Vec<T>, threads: usize, work: impl Fn(T) + Sync) {
    let threads = threads.clamp(1, parts.len().max(1));
    let queue = std::sync::Mutex::new(parts.into_iter());
    let run = || loop {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        match next {
            Some(part) => work(part),
            None => break,
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            let started = std::thread::Builder::new().spawn_scoped(scope, run);
            if started.is_err() {
                break;
            }
        }
        run();
    });
}

/// Where samples start in a call's noise stream: sample `sample` of problem `problem`, in
/// a call of `samples` samples of `width` values per problem. Sample k of problem b is
/// values (b·n + k)·d .. of the stream; with antithetic pairs (k and n even) sample 2j + 1
/// is the negation of sample 2j, drawn from values (b·n/2 + j)·d ... The one description
/// of a sample's place, for the host paths, the chunk pipeline, replayed scores and draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoiseAt {
    pub problem: usize,
    pub sample: usize,
    pub samples: usize,
    pub width: usize,
}

impl NoiseAt {
    /// The sample's row among all the call's samples (problem-major): b·n + k.
    pub fn row(self) -> usize {
        self.problem * self.samples + self.sample
    }

    /// The index of the sample's first value in the stream: (b·n + k)·d.
    pub fn first_value(self) -> u64 {
        (self.row() * self.width) as u64
    }

    /// Under antithetic pairs (k even): the index of the first value of the pair's drawn
    /// half, (b·n + k)/2·d.
    pub fn first_pair_value(self) -> u64 {
        (self.row() / 2 * self.width) as u64
    }
}

/// How a call draws its samples' noise: the noise, the call's stream, antithetic pairs,
/// and whether the score is z itself (the multiplicative model) rather than ∇ν(z).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sampler<'a> {
    pub noise: Noise,
    pub stream: &'a Stream,
    pub antithetic: bool,
    pub score_is_z: bool,
}

impl Sampler<'_> {
    /// The noise `z` and scores `s` (∇ν(z), or z itself when `score_is_z`) of the samples
    /// from `at` (`z.len() / width` of them, of one problem), made on up to `threads`
    /// threads. An empty `s` asks for the noise alone.
    pub fn draw(&self, at: NoiseAt, z: &mut [f32], s: &mut [f32], threads: usize) {
        // SAFETY: the samplers write only floats
        let z = unsafe { as_uninit(z) };
        self.draw_into(at, z, s, threads);
    }

    /// As [`Sampler::draw`], into room not yet initialized (the tape's kept scores,
    /// written once): every element of `z` is written, and returned as floats.
    pub fn draw_into<'z>(
        &self,
        at: NoiseAt,
        z: &'z mut [MaybeUninit<f32>],
        s: &mut [f32],
        threads: usize,
    ) -> &'z mut [f32] {
        let (noise, stream, d) = (self.noise, self.stream, at.width);
        let rows = z.len() / d;
        if self.antithetic {
            let half = rows.div_ceil(2);
            let mut zh = vec![0f32; half * d];
            noise.fill_parallel(
                stream,
                at.first_pair_value(),
                // SAFETY: the samplers write only floats
                unsafe { as_uninit(&mut zh) },
                &mut [],
                threads,
            );
            assert_eq!(z.len(), rows * d, "whole samples");
            for (r, zr) in z.chunks_exact_mut(d).enumerate() {
                let src = &zh[(r / 2) * d..(r / 2 + 1) * d];
                let sign = if r % 2 == 0 { 1.0 } else { -1.0 };
                for (zv, &v) in zr.iter_mut().zip(src) {
                    zv.write(sign * v);
                }
            }
            // SAFETY: every element was written above (z is whole rows of d)
            let z = unsafe { written(z) };
            // antithetic pairs are Normal: the score is z
            if !s.is_empty() {
                s.copy_from_slice(z);
            }
            z
        } else {
            noise.fill_parallel(stream, at.first_value(), z, s, threads);
            // SAFETY: fill_parallel writes every element of z
            let z = unsafe { written(z) };
            if self.score_is_z && !s.is_empty() {
                s.copy_from_slice(z);
            }
            z
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(noise: Noise, first: u64, n: usize, threads: usize) -> Vec<f64> {
        let z = noise
            .sample(&Stream::new(11, 0), first, n, threads)
            .unwrap();
        Vec::<f64>::try_from(z.to_kind(Kind::Double)).unwrap()
    }

    #[test]
    fn normal_has_mean_0_variance_1() {
        let n = 400_000;
        let z = values(Noise::Normal, 0, n, 2);
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 5.0 * (1.0 / n as f64).sqrt(), "{mean}");
        // s.d. of the sample variance of N(0,1): sqrt(2/n)
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(), "{var}");
    }

    #[test]
    fn gumbel_has_euler_gamma_mean_and_zero_mean_score() {
        let n = 400_000;
        let z = values(Noise::Gumbel, 0, n, 2);
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let gamma = 0.577_215_664_901_532_9;
        let pi2_6 = std::f64::consts::PI.powi(2) / 6.0;
        assert!(
            (mean - gamma).abs() < 5.0 * (pi2_6 / n as f64).sqrt(),
            "{mean}"
        );
        // μ4 = 5.4 σ⁴ for a Gumbel: s.d. of the sample variance ≈ sqrt(4.4/n) σ²
        assert!(
            (var - pi2_6).abs() < 5.0 * 4.4f64.sqrt() * pi2_6 / (n as f64).sqrt(),
            "{var}"
        );
        // E[1 − e^{−Z}] = 0 and Var = 1
        let s = Noise::Gumbel.score(&Tensor::from_slice(&z)).unwrap();
        let score_mean = f64::try_from(s.mean(Kind::Double)).unwrap();
        assert!(score_mean.abs() < 5.0 / (n as f64).sqrt(), "{score_mean}");
        // the sampler's own scores agree with 1 − e^{−z}
        let (mut z2, mut s2) = (vec![0f32; 1000], vec![0f32; 1000]);
        Noise::Gumbel.fill_with_score(&Stream::new(11, 0), 0, &mut z2, &mut s2);
        for (zv, sv) in z2.iter().zip(&s2) {
            assert!(
                (f64::from(*sv) - (1.0 - (-f64::from(*zv)).exp())).abs() < 1e-5,
                "{zv} {sv}"
            );
        }
    }

    #[test]
    fn draws_do_not_depend_on_chunking_or_threads() {
        let sog = Noise::sum_of_gamma(5.0, 10).unwrap();
        for noise in [Noise::Normal, Noise::Gumbel, sog] {
            let whole = values(noise, 3, 101, 1);
            assert_eq!(whole, values(noise, 3, 101, 3));
            let big = values(noise, 5, 200_000, 1);
            assert_eq!(
                big,
                values(noise, 5, 200_000, 2),
                "{noise:?}: threads change the draws"
            );
            for split in [1usize, 2, 7, 50, 100] {
                let mut parts = values(noise, 3, split, 1);
                parts.extend(values(noise, 3 + split as u64, 101 - split, 1));
                assert_eq!(whole, parts, "{noise:?} split at {split}");
            }
        }
    }

    #[test]
    fn noise_alone_equals_the_noise_drawn_with_scores() {
        let stream = Stream::new(5, 2);
        let d = 7;
        for (noise, antithetic) in [(Noise::Gumbel, false), (Noise::Normal, true)] {
            for (rows, threads) in [(10usize, 1usize), (20_000, 2)] {
                let (mut z, mut s, mut alone) = (
                    vec![0f32; rows * d],
                    vec![0f32; rows * d],
                    vec![0f32; rows * d],
                );
                let at = NoiseAt {
                    problem: 1,
                    sample: 4,
                    samples: 40_000,
                    width: d,
                };
                let sampler = Sampler {
                    noise,
                    stream: &stream,
                    antithetic,
                    score_is_z: false,
                };
                sampler.draw(at, &mut z, &mut s, threads);
                sampler.draw(at, &mut alone, &mut [], threads);
                assert_eq!(z, alone, "{noise:?} rows {rows}");
                assert!(s.iter().any(|&v| v != 0.0));
            }
        }
    }

    #[test]
    fn every_vector_width_gives_the_same_bits() {
        let stream = Stream::new(0xabcdef, 9);
        for noise in [Noise::Normal, Noise::Gumbel] {
            let n = 10_000;
            let (mut z0, mut s0) = (vec![0f32; n], vec![0f32; n]);
            // SAFETY (as_uninit): the samplers write only floats
            noise.fill_with_impl(
                &stream,
                3,
                unsafe { as_uninit(&mut z0) },
                Some(unsafe { as_uninit(&mut s0) }),
                Stream::words64,
                interleave,
            );
            #[cfg(target_arch = "x86_64")]
            for (width, present) in [(256, has_avx2()), (512, has_avx512())] {
                if !present {
                    continue;
                }
                let (mut z, mut s) = (vec![0f32; n], vec![0f32; n]);
                // SAFETY: the CPU has the features (checked above); the samplers write
                // only floats (as_uninit).
                unsafe {
                    let (z, s) = (as_uninit(&mut z), Some(as_uninit(&mut s)));
                    if width == 256 {
                        noise.fill_with_avx2(&stream, 3, z, s);
                    } else {
                        noise.fill_with_avx512(&stream, 3, z, s);
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&z), bits(&z0), "{noise:?} {width}-bit values");
                assert_eq!(bits(&s), bits(&s0), "{noise:?} {width}-bit scores");
            }
        }
    }

    #[test]
    fn libtorch_draws_equal_the_cpu_draws_up_to_rounding() {
        for noise in [Noise::Normal, Noise::Gumbel] {
            for (first, count) in [(0u64, 64usize), (5, 37), (1000, 1)] {
                let cpu = values(noise, first, count, 1);
                let lt = noise
                    .sample_on(&Stream::new(11, 0), first, count, Device::Cpu)
                    .unwrap();
                let lt = Vec::<f64>::try_from(lt.to_kind(Kind::Double)).unwrap();
                for (a, b) in cpu.iter().zip(&lt) {
                    assert!(
                        (a - b).abs() <= 2e-6 * (1.0 + a.abs()),
                        "{noise:?} {first}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_unknown_numbers() {
        assert_eq!(Noise::from_u32(1).unwrap(), Noise::Gumbel);
        let err = Noise::from_u32(3).unwrap_err();
        assert!(err.message().contains("got 3"));
    }
}
