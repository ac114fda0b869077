//! Branch-free float32 approximations of ln, and of sin and cos of 2πu, written as plain
//! arithmetic so that the compiler vectorizes loops over them (libm calls would not). Their
//! polynomials are fused multiply-adds: single instructions in the AVX2+FMA and AVX-512
//! copies the noise samplers run on x86-64 CPUs that have them (and on aarch64), calls of
//! the correctly rounded `fmaf` elsewhere (slower, the same bits). Their errors (tested
//! below against float64) are below 2 float32 ulps over the ranges the noise samplers use.

/// ln(x) for finite x > 0 (normal floats).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    const LN2: f32 = std::f32::consts::LN_2;
    const SQRT_HALF_BITS: u32 = 0x3f35_04f3; // √½
    let bits = x.to_bits();
    // x = 2^e · m with m in [√½, √2)
    let shifted = bits.wrapping_sub(SQRT_HALF_BITS);
    let e = (shifted as i32) >> 23;
    let m = f32::from_bits(bits.wrapping_sub((e as u32) << 23));
    // ln m = 2 atanh(t), t = (m − 1)/(m + 1), |t| ≤ 0.1716
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let p = horner(
        t2,
        &[2.0, 0.666_666_7, 0.4, 0.285_714_3, 0.222_222_2, 0.181_818_2],
    );
    t.mul_add(p, e as f32 * LN2)
}

/// c\[0\] + x·(c\[1\] + x·(c\[2\] + …)), each step one fused multiply-add (the same bits on every
/// CPU: a fused multiply-add is rounded once, in hardware or in software).
#[inline(always)]
fn horner<const N: usize>(x: f32, c: &[f32; N]) -> f32 {
    c.iter()
        .rev()
        .skip(1)
        .fold(c[N - 1], |acc, &k| acc.mul_add(x, k))
}

/// e^x for x ≤ 0 (0 below −87, where e^x leaves float32's normal range): e^r · 2^n with
/// n = ⌊x·log₂e⌋, r = x − n·ln 2 in [0, ln 2) (ln 2 in two parts, each product a fused
/// multiply-add), and e^r by its Taylor polynomial of degree 9 (error below 10⁻⁸).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 to 16 bits: n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x0 = x.max(-87.0);
    let n = (x0 * std::f32::consts::LOG2_E).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x0));
    let p = horner(
        r,
        &[
            1.0,
            1.0,
            0.5,
            0.166_666_67,
            0.041_666_668,
            0.008_333_334,
            0.001_388_888_9,
            0.000_198_412_7,
            0.000_024_801_587,
            0.000_002_755_732,
        ],
    );
    let scaled = f32::from_bits(((n as i32 + 127) as u32) << 23) * p;
    if x < -87.0 {
        0.0
    } else {
        scaled
    }
}

/// (sin 2πu, cos 2πu) for u in [0, 1].
#[inline(always)]
pub fn sincos_2pi(u: f32) -> (f32, f32) {
    // u = q/4 + r with r in [−1/8, 1/8]: 2πu = qπ/2 + a, |a| ≤ π/4
    // round u·4 to an integer by adding 1.5 · 2^23 (whose ulp is 1), so that the quadrant
    // comes from the bits with no float-to-int conversion (which would not vectorize);
    // a tie goes to even, and |a| = π/4 either way
    const MAGIC: f32 = 12_582_912.0;
    let big = u * 4.0 + MAGIC;
    let q = big - MAGIC;
    let a = (u - q * 0.25) * std::f32::consts::TAU;
    let a2 = a * a;
    let s = a * horner(
        a2,
        &[
            1.0,
            -1.666_666_7e-1,
            8.333_333e-3,
            -1.984_127e-4,
            2.755_731_9e-6,
        ],
    );
    let c = horner(
        a2,
        &[
            1.0,
            -0.5,
            4.166_666_7e-2,
            -1.388_888_9e-3,
            2.480_158_7e-5,
            -2.755_732e-7,
        ],
    );
    // rotate by q quarter turns, without branches (so that loops vectorize):
    // odd q swaps sin and cos; the signs follow the quadrant
    let q = big.to_bits(); // its low bits are those of the integer q
    let swap = q & 1 != 0;
    let (sin, cos) = (if swap { c } else { s }, if swap { s } else { c });
    let sin_sign = (q & 2) << 30; // q = 2, 3: −
    let cos_sign = (q.wrapping_add(1) & 2) << 30; // q = 1, 2: −
    (
        f32::from_bits(sin.to_bits() ^ sin_sign),
        f32::from_bits(cos.to_bits() ^ cos_sign),
    )
}

/// Whether the CPU has AVX2 and FMA, so that hot loops may run their copies compiled for
/// them (an `#[inline(always)]` body called from a `#[target_feature]` wrapper). The results are the same bit for bit either way: Rust never
/// fuses a multiply and an add by itself, and each lane computes what a scalar would.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // (std caches the CPU's features in atomics: no lock, so a process forked while
        // another thread asks never waits)
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512 (F, VL, DQ, BW) besides AVX2 and FMA: the noise transforms
/// then run sixteen lanes wide, with the same results bit for bit.
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // (std caches the CPU's features in atomics, as for has_avx2)
        has_avx2()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (f64::from(got) - want).abs() / ulp.max(f64::from(f32::MIN_POSITIVE))
    }

    #[test]
    fn exp_is_accurate_below_zero() {
        let mut worst = 0.0f64;
        for k in 0..=200_000 {
            let x = -87.0 * f64::from(k) / 200_000.0;
            let got = f64::from(exp_nonpositive(x as f32));
            let want = (f64::from(x as f32)).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn ln_is_accurate_on_the_unit_interval_and_beyond() {
        let mut worst: f64 = 0.0;
        let mut x = 1.0f32 / (1 << 25) as f32;
        while x < 40.0 {
            let want = f64::from(x).ln();
            let err = (f64::from(ln(x)) - want).abs();
            // absolute error near x = 1 (where ln → 0), relative elsewhere
            worst = worst.max(if want.abs() < 0.5 {
                err / 6e-8
            } else {
                ulps(ln(x), want)
            });
            x = f32::from_bits(x.to_bits() + 997);
        }
        assert!(worst < 2.0, "worst error {worst} ulps");
    }

    #[test]
    fn sincos_is_accurate_over_a_turn() {
        for i in 0..=100_000 {
            let u = i as f32 / 100_000.0;
            let (s, c) = sincos_2pi(u);
            let a = std::f64::consts::TAU * f64::from(u);
            assert!(
                (f64::from(s) - a.sin()).abs() < 2.5e-7,
                "sin at {u}: {s} vs {}",
                a.sin()
            );
            assert!(
                (f64::from(c) - a.cos()).abs() < 2.5e-7,
                "cos at {u}: {c} vs {}",
                a.cos()
            );
        }
    }
}
