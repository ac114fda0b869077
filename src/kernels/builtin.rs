//! Built-in solvers: no callback. On CUDA they run in libtorch on the device, with no host
//! round trip; on the CPU in Rust, on all cores (the argmax in a fused kernel, see
//! [`crate::kernels::fused_argmax`]). Each works along the last dimension of the input; the output
//! has the input's shape.

use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// A built-in solver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// One-hot of the largest entry along the last dimension (C: `PERT_BUILTIN_ARGMAX = 0`).
    /// Its statistics are accumulated as counts of winners, not one-hot products.
    Argmax,
    /// Indicator of the k largest entries along the last dimension
    /// (C: `PERT_BUILTIN_TOPK = 1`).
    TopK(i64),
    /// 1-based ranks along the last dimension, the smallest entry ranked 1
    /// (C: `PERT_BUILTIN_RANKS = 2`).
    Ranks,
}

/// Solutions of a chunk of perturbed problems.
pub(crate) enum Solutions {
    /// `[rows, output_numel]` float32.
    Dense(Tensor),
    /// 0/1 solutions given by the flat positions of their ones, `[rows, m]` int64, distinct
    /// within a row (argmax: one per slice along the last dimension; top-k: k per slice).
    Indicator(Tensor),
}

impl Builtin {
    /// The built-in with this C number; `k` is used by top-k only.
    pub fn from_u32(id: u32, k: i64) -> Result<Builtin> {
        match id {
            0 => Ok(Builtin::Argmax),
            1 => Ok(Builtin::TopK(k)),
            2 => Ok(Builtin::Ranks),
            _ => Err(Error::invalid(format!(
                "builtin must be PERT_BUILTIN_ARGMAX (0), PERT_BUILTIN_TOPK (1) or PERT_BUILTIN_RANKS (2), got {id}"
            ))),
        }
    }

    /// Checks that the built-in applies to problems of `input_shape`.
    pub fn check(self, input_shape: &[i64]) -> Result<()> {
        let last = *input_shape.last().ok_or_else(|| {
            Error::invalid(
                "built-in solvers work along the last dimension: input_rank must be >= 1, got 0",
            )
        })?;
        if let Builtin::TopK(k) = self {
            if k < 1 || k > last {
                return Err(Error::invalid(format!(
                    "top-k needs 1 <= k <= the last dimension ({last}), got k = {k}"
                )));
            }
        }
        Ok(())
    }

    /// Solves the problems `x` `[rows, *input_shape]`, with `last` the size of the last
    /// dimension.
    pub(crate) fn solve(self, x: &Tensor, last: i64) -> Result<Solutions> {
        let size = x.size();
        let (rows, numel) = (size[0], size[1..].iter().product::<i64>());
        // sizes spelt out (no -1): a view of 0 rows has no inferable dimension
        let flat = x.f_view([rows, numel / last, last])?; // [rows, groups, last]
        Ok(match self {
            Builtin::Argmax => {
                let index = flat.f_argmax(2, true)?; // [rows, groups, 1]
                Solutions::Indicator(flat_positions(&index, last)?)
            }
            Builtin::TopK(k) => {
                let (_, index) = flat.f_topk(k, 2, true, false)?; // [rows, groups, k]
                Solutions::Indicator(flat_positions(&index, last)?)
            }
            Builtin::Ranks => {
                let order = flat.f_argsort(2, false)?;
                let ranks = order
                    .f_argsort(2, false)?
                    .f_to_kind(Kind::Float)?
                    .f_add_scalar_(1.0)?;
                Solutions::Dense(ranks.f_view([rows, numel])?)
            }
        })
    }
}

impl Builtin {
    /// The ones of each slice's solution for 0/1 built-ins (argmax: 1, top-k: k), or None
    /// (ranks).
    pub(crate) fn ones_per_slice(self) -> Option<usize> {
        match self {
            Builtin::Argmax => Some(1),
            Builtin::TopK(k) => Some(k as usize),
            Builtin::Ranks => None,
        }
    }

    /// The 0/1 solutions of argmax and top-k as the positions of their ones: for each row
    /// of `x` (rows of `d` floats, slices of `last`), its [`Builtin::ones_per_slice`] ones
    /// per slice, positions within the row in increasing order, into `ones` (cleared
    /// first). The solutions of [`Builtin::solve_host`], without writing their zeros.
    pub(crate) fn ones_host(self, x: &[f32], d: usize, last: usize, ones: &mut Vec<u32>) {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.ones_host_avx2(x, d, last, ones) };
        }
        self.ones_host_impl(x, d, last, ones)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn ones_host_avx2(self, x: &[f32], d: usize, last: usize, ones: &mut Vec<u32>) {
        self.ones_host_impl(x, d, last, ones)
    }

    #[inline(always)]
    fn ones_host_impl(self, x: &[f32], d: usize, last: usize, ones: &mut Vec<u32>) {
        let mut order: Vec<usize> = Vec::new();
        let mut above = AboveScratch::default();
        ones.clear();
        let slices = d / last;
        // per slice of a row: the bar of the same slice of the row before (the rows of a
        // problem's samples are alike)
        let mut bars = vec![
            0u32;
            if matches!(self, Builtin::TopK(_)) {
                slices
            } else {
                0
            }
        ];
        for (s, xs) in x.chunks_exact(last).enumerate() {
            let at = (s % slices) * last; // the slice's first position within its row
            match self {
                Builtin::Argmax => ones.push((at + first_max(xs)) as u32),
                Builtin::TopK(1) => ones.push((at + first_max(xs)) as u32),
                Builtin::TopK(k) => {
                    if (k as usize) * 64 <= last || u32::try_from(last).is_err() {
                        top_k(xs, k as usize, &mut order);
                        order.sort_unstable();
                        ones.extend(order.iter().map(|&i| (at + i) as u32));
                    } else {
                        let bar = &mut bars[s % slices];
                        top_k_above(xs, k as usize, bar, at as u32, ones, &mut above);
                    }
                }
                Builtin::Ranks => unreachable!("ranks are not 0/1"),
            }
        }
    }

    /// The solutions of `x` (rows of `d` floats, slices of `last` along each row) into `y`,
    /// on the host: the CPU path of top-k and ranks (argmax has its own fused kernel).
    pub(crate) fn solve_host(self, x: &[f32], last: usize, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.solve_host_avx2(x, last, y) };
        }
        self.solve_host_impl(x, last, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn solve_host_avx2(self, x: &[f32], last: usize, y: &mut [f32]) {
        self.solve_host_impl(x, last, y)
    }

    #[inline(always)]
    fn solve_host_impl(self, x: &[f32], last: usize, y: &mut [f32]) {
        let mut order: Vec<usize> = Vec::with_capacity(last);
        let mut values: Vec<u64> = Vec::new();
        let mut keys: Vec<u64> = Vec::new();
        let mut spare: Vec<u64> = Vec::new();
        for (xs, ys) in x.chunks_exact(last).zip(y.chunks_exact_mut(last)) {
            match self {
                Builtin::Argmax => {
                    let best = first_max(xs);
                    ys.fill(0.0);
                    ys[best] = 1.0;
                }
                Builtin::TopK(1) => {
                    ys.fill(0.0);
                    ys[first_max(xs)] = 1.0; // the first of equal largest entries, as top_k
                }
                Builtin::TopK(k) => {
                    ys.fill(0.0);
                    if (k as usize) * 64 <= last || u32::try_from(last).is_err() {
                        top_k(xs, k as usize, &mut order);
                    } else {
                        top_k_by_selection(xs, k as usize, &mut order, &mut values);
                    }
                    order.iter().for_each(|&i| ys[i] = 1.0);
                }
                Builtin::Ranks if u32::try_from(last).is_err() => {
                    order.clear();
                    order.extend(0..last);
                    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
                    for (rank, &i) in order.iter().enumerate() {
                        ys[i] = (rank + 1) as f32;
                    }
                }
                Builtin::Ranks => {
                    // (value as an ordered integer, position) in one word: a plain integer
                    // sort, ties in the order of their positions
                    keys.clear();
                    keys.extend(
                        xs.iter()
                            .enumerate()
                            .map(|(i, &v)| (u64::from(ordered(v)) << 32) | i as u64),
                    );
                    if last <= RANKS_COUNTED_UP_TO {
                        // short rows: each entry's rank counted (no branches, as
                        // comparisons of vectors)
                        for (y, &key) in ys.iter_mut().zip(&keys) {
                            let below: u32 = keys.iter().map(|&other| u32::from(other < key)).sum();
                            *y = (below + 1) as f32;
                        }
                        continue;
                    }
                    if last >= RADIX_MIN {
                        radix_sort_high(&mut keys, &mut spare);
                    } else {
                        keys.sort_unstable();
                    }
                    for (rank, &key) in keys.iter().enumerate() {
                        ys[key as u32 as usize] = (rank + 1) as f32;
                    }
                }
            }
        }
    }
}

/// The shortest rows that ranks sort by radix (shorter ones by comparisons).
const RADIX_MIN: usize = 256;

/// Sorts `keys` by their upper 32 bits, stably (a least-significant-digit radix sort, a
/// byte a pass; passes where every key has the same byte are skipped), with `spare` as
/// room. Keys whose lower 32 bits increase with their position come out as
/// `sort_unstable` leaves them.
fn radix_sort_high(keys: &mut [u64], spare: &mut Vec<u64>) {
    let n = keys.len();
    spare.clear();
    spare.resize(n, 0);
    let mut counts = [[0usize; 256]; 4];
    for &k in keys.iter() {
        for (p, count) in counts.iter_mut().enumerate() {
            count[(k >> (32 + 8 * p)) as usize & 255] += 1;
        }
    }
    let (mut from, mut to) = (&mut keys[..], &mut spare[..]);
    let mut in_spare = false;
    for (p, count) in counts.iter().enumerate() {
        if count.contains(&n) {
            continue; // one byte value for all: nothing moves
        }
        let mut at = [0usize; 256];
        let mut sum = 0;
        for (a, &c) in at.iter_mut().zip(count) {
            *a = sum;
            sum += c;
        }
        for &k in from.iter() {
            let b = (k >> (32 + 8 * p)) as usize & 255;
            to[at[b]] = k;
            at[b] += 1;
        }
        std::mem::swap(&mut from, &mut to);
        in_spare = !in_spare;
    }
    if in_spare {
        keys.copy_from_slice(spare);
    }
}

/// `v` as an integer in the order of `f32::total_cmp` (−NaN < −∞ < … < −0 < +0 < … < +∞ <
/// NaN).
#[inline(always)]
fn ordered(v: f32) -> u32 {
    let bits = v.to_bits();
    // negative: every bit flipped; else the sign bit set
    bits ^ (((bits as i32) >> 31) as u32 | 1 << 31)
}

/// The position of the first largest entry of `xs` (not empty), NaN entries skipped (0 when
/// the first is NaN): the same as a scan that keeps the first strictly larger entry, found
/// with a vectorized maximum and a vectorized search for its first occurrence.
#[inline(always)]
fn first_max(xs: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if xs.len() >= 32 && crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2; `xs` holds at least 32 floats.
        return unsafe { first_max_avx2(xs) };
    }
    first_max_portable(xs)
}

#[inline(always)]
fn first_max_portable(xs: &[f32]) -> usize {
    if xs[0].is_nan() {
        return 0; // nothing compares larger than a NaN in the scan
    }
    let mut lanes = [xs[0]; 16];
    let (chunks, tail) = xs.as_chunks::<16>();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = tail.iter().fold(xs[0], |m, &v| if v > m { v } else { m });
    for &m in &lanes {
        max = if m > max { m } else { max };
    }
    xs.iter().position(|&v| v == max).unwrap_or(0)
}

/// [`first_max_portable`] in AVX2: the maximum in four independent vectors of eight lanes
/// (`max_ps(v, m)` is `v > m ? v : m`, so a NaN `v` leaves `m`, as the scan does), then the
/// first entry equal to it, sixteen entries a step.
///
/// # Safety
/// The CPU has AVX2 and `xs.len() >= 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn first_max_avx2(xs: &[f32]) -> usize {
    use std::arch::x86_64::*;
    if xs[0].is_nan() {
        return 0;
    }
    let n = xs.len();
    let p = xs.as_ptr();
    let first = _mm256_set1_ps(xs[0]);
    let mut m = [first; 4];
    let mut i = 0;
    // SAFETY (loads): every load reads 8 floats at i + 8j with i + 32 <= n.
    while i + 32 <= n {
        for (j, mj) in m.iter_mut().enumerate() {
            *mj = _mm256_max_ps(unsafe { _mm256_loadu_ps(p.add(i + 8 * j)) }, *mj);
        }
        i += 32;
    }
    let mut lanes = [0f32; 32];
    for (j, mj) in m.iter().enumerate() {
        // SAFETY: 8 floats into lanes[8j..8j + 8].
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * j), *mj) };
    }
    let mut max = xs[i..]
        .iter()
        .fold(xs[0], |m, &v| if v > m { v } else { m });
    for &l in &lanes {
        max = if l > max { l } else { max };
    }
    // the first entry equal to max (there is one: max is an entry of xs)
    let want = _mm256_set1_ps(max);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: 16 floats at i with i + 16 <= n.
        let (a, b) = unsafe { (_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(p.add(i + 8))) };
        let lo = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, want)) as u32;
        let hi = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(b, want)) as u32;
        let mask = lo | hi << 8;
        if mask != 0 {
            return i + mask.trailing_zeros() as usize;
        }
        i += 16;
    }
    i + xs[i..].iter().position(|&v| v == max).unwrap_or(0)
}

/// The positions of the `k` largest entries of `xs` (1 <= k <= xs.len()) into `out`, in
/// no particular order; of equal entries the first wins. One pass with a min-heap of the
/// best k so far: most entries only meet the heap's root, so this costs about one
/// comparison per entry when k is much smaller than the slice (O(n log k) at worst).
fn top_k(xs: &[f32], k: usize, out: &mut Vec<usize>) {
    // a worse than b: smaller, or equal and later
    let worse = |a: usize, b: usize| match xs[a].total_cmp(&xs[b]) {
        std::cmp::Ordering::Equal => a > b,
        order => order == std::cmp::Ordering::Less,
    };
    let sift_down = |heap: &mut [usize], mut i: usize| loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut worst = i;
        if l < heap.len() && worse(heap[l], heap[worst]) {
            worst = l;
        }
        if r < heap.len() && worse(heap[r], heap[worst]) {
            worst = r;
        }
        if worst == i {
            return;
        }
        heap.swap(i, worst);
        i = worst;
    };
    out.clear();
    out.extend(0..k);
    for i in (0..k / 2).rev() {
        sift_down(out, i);
    }
    // a later entry enters only when strictly larger than the root (the worst kept)
    let mut bar = xs[out[0]];
    for (i, &v) in xs.iter().enumerate().skip(k) {
        if v.total_cmp(&bar) == std::cmp::Ordering::Greater {
            out[0] = i;
            sift_down(out, 0);
            bar = xs[out[0]];
        }
    }
}

/// [`top_k`] for a larger k (rows of at most 2^32 entries): one selection (O(n) integer
/// comparisons) on the values as ordered integers, each with its position, then the k
/// positions in increasing order. The same set as [`top_k`].
#[inline(always)]
fn top_k_by_selection(xs: &[f32], k: usize, out: &mut Vec<usize>, keys: &mut Vec<u64>) {
    // (ordered value, reversed position): distinct keys whose k largest are the k largest
    // entries, the first of equal ones first; one selection finds them, positions included
    keys.clear();
    keys.extend(
        xs.iter()
            .enumerate()
            .map(|(i, &v)| (u64::from(ordered(v)) << 32) | u64::from(u32::MAX - i as u32)),
    );
    keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    out.clear();
    out.extend(
        keys[..k]
            .iter()
            .map(|&key| (u32::MAX - key as u32) as usize),
    );
    out.sort_unstable();
}

/// The buffers of [`top_k_above`], kept from row to row.
#[derive(Default)]
pub(crate) struct AboveScratch {
    /// The candidates' positions, in increasing order.
    pos: Vec<u32>,
    /// The candidates' values as integers in the order of `f32::total_cmp`, signed.
    key: Vec<i32>,
    /// (ordered value, reversed position) keys for a selection among many candidates.
    work: Vec<u64>,
}

/// [`ordered`] as a signed integer (the same order under signed comparison, which vectors
/// have for 32-bit lanes).
#[inline(always)]
fn signed_ordered(o: u32) -> i32 {
    (o ^ 1 << 31) as i32
}

/// The positions and signed ordered values of the entries of `xs` whose ordered value is
/// at least `bar`, in order of position, into the first entries of `pos` and `key` (each at
/// least as long as `xs`); returns how many.
#[inline(always)]
fn gather_above(xs: &[f32], bar: u32, pos: &mut [u32], key: &mut [i32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { gather_above_avx2(xs, bar, pos, key) };
    }
    gather_above_from(xs, 0, 0, bar, pos, key)
}

/// [`gather_above`] from entry `start` on, `count` gathered before it.
#[inline(always)]
fn gather_above_from(
    xs: &[f32],
    start: usize,
    mut count: usize,
    bar: u32,
    pos: &mut [u32],
    key: &mut [i32],
) -> usize {
    // written always, kept when above: no branch per entry
    for (i, &v) in xs.iter().enumerate().skip(start) {
        let o = ordered(v);
        pos[count] = i as u32; // count <= i < xs.len()
        key[count] = signed_ordered(o);
        count += usize::from(o >= bar);
    }
    count
}

/// For each mask of 8 lanes, the lanes whose bit is set, first to last (then zeros): the
/// permutation that packs the kept lanes of a vector to its front.
#[cfg(target_arch = "x86_64")]
static PACK: [[u32; 8]; 256] = {
    let mut table = [[0u32; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut kept, mut lane) = (0, 0);
        while lane < 8 {
            if mask >> lane & 1 == 1 {
                table[mask][kept] = lane as u32;
                kept += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
};

/// [`gather_above`] eight entries a step: their signed ordered values compared with the
/// bar's, the kept lanes (and their positions) packed to the front by a permutation from
/// [`PACK`] and stored whole at `count` (lanes past the kept ones are overwritten later or
/// lie beyond the count).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_above_avx2(xs: &[f32], bar: u32, pos: &mut [u32], key: &mut [i32]) -> usize {
    use std::arch::x86_64::*;
    let n = xs.len();
    assert!(pos.len() >= n && key.len() >= n);
    let low31 = _mm256_set1_epi32(i32::MAX);
    let bar_key = _mm256_set1_epi32(signed_ordered(bar));
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut count = 0;
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 8 floats at i, i + 8 <= n.
        let bits = unsafe { _mm256_loadu_si256(xs.as_ptr().add(i) as *const __m256i) };
        // negative: all but the sign bit flipped (signed_ordered ∘ ordered)
        let k = _mm256_xor_si256(bits, _mm256_and_si256(_mm256_srai_epi32::<31>(bits), low31));
        let below = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bar_key, k)));
        let kept = !below as usize & 0xff;
        // SAFETY: an entry of the 256-entry table.
        let perm = unsafe { _mm256_loadu_si256(PACK[kept].as_ptr() as *const __m256i) };
        let at = _mm256_add_epi32(_mm256_set1_epi32(i as i32), lanes);
        // SAFETY: 8 values at count <= i, and count + 8 <= i + 8 <= n <= both lengths.
        unsafe {
            _mm256_storeu_si256(
                key.as_mut_ptr().add(count) as *mut __m256i,
                _mm256_permutevar8x32_epi32(k, perm),
            );
            _mm256_storeu_si256(
                pos.as_mut_ptr().add(count) as *mut __m256i,
                _mm256_permutevar8x32_epi32(at, perm),
            );
        }
        count += kept.count_ones() as usize;
        i += 8;
    }
    gather_above_from(xs, i, count, bar, pos, key)
}

/// [`top_k`] for a larger k (slices of at most 2^32 entries): the positions of the k
/// largest entries of `xs`, plus `at`, appended to `out` in increasing order; the same set
/// as [`top_k`]. The k largest are selected among the entries whose ordered value is at
/// least `bar` when k of them are (one pass: the rows of a problem's samples are alike,
/// so the bar of the row before usually leaves about k + m, m = ⌊k/2⌋ + 8), else among
/// all; `bar` is then set, for the next row, to the value of the (k + m)-th largest when
/// there were k + m candidates (else it stays, or becomes the lowest value when fewer
/// than k reached it).
#[inline(always)]
fn top_k_above(
    xs: &[f32],
    k: usize,
    bar: &mut u32,
    at: u32,
    out: &mut Vec<u32>,
    scratch: &mut AboveScratch,
) {
    let AboveScratch { pos, key, work } = scratch;
    if pos.len() < xs.len() {
        pos.resize(xs.len(), 0);
        key.resize(xs.len(), 0);
    }
    // the entries at or above the bar, in order of position
    let mut count = gather_above(xs, *bar, pos, key);
    let above = count >= k;
    if !above {
        // too few above the bar: all of them
        for (i, ((p, c), &v)) in pos.iter_mut().zip(key.iter_mut()).zip(xs).enumerate() {
            (*p, *c) = (i as u32, signed_ordered(ordered(v)));
        }
        count = xs.len();
    }
    let (pos, key) = (&pos[..count], &key[..count]);
    // the next bar: the value of the (k + m)-th largest when there is one; else the same
    // bar (k were above it), or the lowest value (every entry passes)
    let m = k / 2 + 8;
    let bar_of = |key: i32| (key as u32) ^ 1 << 31;
    if count <= TOP_K_RANKED_BY_COUNTING {
        // few candidates: each one's rank counted, the candidates ranked above it (larger,
        // or equal and earlier), eight at a time as comparisons of vectors (no branches);
        // the k of rank below k, in order of position
        let mut keys = [i32::MIN; TOP_K_RANKED_BY_COUNTING];
        keys[..count].copy_from_slice(key);
        let mut ranks = [0u32; TOP_K_RANKED_BY_COUNTING];
        // the candidates' indices, as 32-bit lanes too
        let index: [i32; TOP_K_RANKED_BY_COUNTING] = std::array::from_fn(|i| i as i32);
        let groups = count.div_ceil(8);
        for (j, &kj) in key.iter().enumerate() {
            let j = j as i32;
            for ((r8, k8), i8) in ranks
                .chunks_exact_mut(8)
                .zip(keys.chunks_exact(8))
                .zip(index.chunks_exact(8))
                .take(groups)
            {
                for t in 0..8 {
                    r8[t] += u32::from(kj > k8[t]) | u32::from((kj == k8[t]) & (j < i8[t]));
                }
            }
        }
        let ranks = &ranks[..count];
        // written always, kept when of rank below k (no branch per candidate)
        let start = out.len();
        out.resize(start + count, 0);
        let mut kept = 0;
        for (&p, &rank) in pos.iter().zip(ranks) {
            out[start + kept] = at + p; // kept <= the candidate's index < count
            kept += usize::from((rank as usize) < k);
        }
        out.truncate(start + kept);
        if count >= k + m {
            let at_rank = ranks.iter().position(|&r| r as usize == k + m - 1);
            *bar = bar_of(key[at_rank.expect("distinct keys have every rank")]);
        } else if !above {
            *bar = 0;
        }
        return;
    }
    // (ordered value, reversed position): distinct keys whose k largest are the k largest
    // entries, the first of equal ones first
    let long = |p: u32, c: i32| (u64::from(bar_of(c)) << 32) | u64::from(u32::MAX - p);
    work.clear();
    work.extend(pos.iter().zip(key).map(|(&p, &c)| long(p, c)));
    work.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let kth = work[k - 1];
    if count >= k + m {
        let rest = &mut work[k..];
        rest.select_nth_unstable_by(m - 1, |a, b| b.cmp(a));
        *bar = (rest[m - 1] >> 32) as u32;
    } else if !above {
        *bar = 0;
    }
    out.extend(
        pos.iter()
            .zip(key)
            .filter(|&(&p, &c)| long(p, c) >= kth)
            .map(|(&p, _)| at + p),
    );
}

/// The most candidates [`top_k_above`] ranks by counting (beyond: by selection).
const TOP_K_RANKED_BY_COUNTING: usize = 64;

/// The longest rows the ranks built-in ranks by counting (beyond: by sorting; counting
/// costs a comparison per pair of entries, without branches).
const RANKS_COUNTED_UP_TO: usize = 16;

/// Positions `[rows, groups, m]` within each slice of length `last` as flat positions
/// `[rows, groups · m]` within the row.
fn flat_positions(index: &Tensor, last: i64) -> Result<Tensor> {
    let groups = index.size()[1];
    let offsets =
        Tensor::f_arange_start_step(0, groups * last, last, (Kind::Int64, index.device()))?;
    Ok(index
        .f_add(&offsets.f_view([1, groups, 1])?)?
        .f_flatten(1, 2)?)
}

impl Solutions {
    /// The dense `[rows, output_numel]` float32 form.
    pub(crate) fn dense(&self, output_numel: i64) -> Result<Tensor> {
        match self {
            Solutions::Dense(y) => Ok(y.shallow_clone()),
            Solutions::Indicator(index) => {
                let rows = index.size()[0];
                let mut y = Tensor::f_zeros([rows, output_numel], (Kind::Float, index.device()))?;
                Ok(y.f_scatter_value_(1, index, 1.0)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: Builtin, x: &[f32], shape: &[i64]) -> Vec<f32> {
        let last = *shape.last().unwrap();
        let n: i64 = shape.iter().product();
        let t = Tensor::from_slice(x)
            .view(crate::shape::batched(x.len() / n as usize, shape).as_slice());
        let y = b.solve(&t, last).unwrap().dense(n).unwrap();
        Vec::try_from(y.flatten(0, -1)).unwrap()
    }

    #[test]
    fn argmax_topk_and_ranks_along_the_last_dimension() {
        let x = [0.1f32, 3.0, -1.0, 2.0, 5.0, 4.0];
        assert_eq!(run(Builtin::Argmax, &x, &[3]), [0., 1., 0., 0., 1., 0.]);
        assert_eq!(run(Builtin::Argmax, &x, &[2, 3]), [0., 1., 0., 0., 1., 0.]);
        assert_eq!(run(Builtin::Argmax, &x, &[6]), [0., 0., 0., 0., 1., 0.]);
        assert_eq!(run(Builtin::TopK(2), &x, &[3]), [1., 1., 0., 0., 1., 1.]);
        assert_eq!(run(Builtin::Ranks, &x, &[3]), [2., 3., 1., 1., 3., 2.]);
    }

    #[test]
    fn ordered_integers_follow_total_cmp_and_ties_rank_by_position() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -f32::MIN_POSITIVE,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::INFINITY,
        ];
        for a in v {
            for b in v {
                assert_eq!(ordered(a).cmp(&ordered(b)), a.total_cmp(&b), "{a} {b}");
            }
        }
        let mut y = [0f32; 5];
        Builtin::Ranks.solve_host(&[2.0, -1.0, 2.0, 0.5, -1.0], 5, &mut y);
        assert_eq!(y, [4.0, 1.0, 5.0, 3.0, 2.0]);
    }

    #[test]
    fn ones_are_the_positions_of_the_dense_solutions() {
        let x: Vec<f32> = (0..600)
            .map(|i| ((i * 7919) % 37) as f32 * 0.25 - 3.0)
            .collect();
        for (b, last) in [
            (Builtin::Argmax, 10),
            (Builtin::Argmax, 300),
            (Builtin::TopK(3), 10),
            (Builtin::TopK(2), 100),
            (Builtin::TopK(150), 300),
        ] {
            let mut y = vec![0f32; 600];
            b.solve_host(&x, last, &mut y);
            let mut ones = Vec::new();
            b.ones_host(&x, 300, last, &mut ones);
            let want: Vec<u32> = (0..600u32)
                .filter(|&i| y[i as usize] == 1.0)
                .map(|i| i % 300)
                .collect();
            assert_eq!(ones, want, "{b:?} {last}");
            assert!(y.iter().all(|&v| v == 0.0 || v == 1.0));
        }
    }

    #[test]
    fn radix_ranks_equal_the_comparison_sort() {
        for len in [64usize, 100, 1000, 4097] {
            let xs: Vec<f32> = (0..len)
                .map(|i| match i % 7 {
                    0 => -(((i * 7919) % 101) as f32) * 1e3,
                    1 => 0.0,
                    2 => -0.0,
                    _ => ((i * 104_729) % 997) as f32 * 1e-3 - 0.4,
                })
                .collect();
            let mut keys: Vec<u64> = xs
                .iter()
                .enumerate()
                .map(|(i, &v)| (u64::from(ordered(v)) << 32) | i as u64)
                .collect();
            let mut want = keys.clone();
            want.sort_unstable();
            radix_sort_high(&mut keys, &mut Vec::new());
            assert_eq!(keys, want, "{len}");
        }
    }

    #[test]
    fn first_max_equals_the_scan_for_first_strictly_larger() {
        let scan = |xs: &[f32]| (1..xs.len()).fold(0, |b, i| if xs[i] > xs[b] { i } else { b });
        let mut cases: Vec<Vec<f32>> = vec![
            vec![1.0],
            vec![-0.0, 0.0, -0.0],
            vec![0.0, -0.0, 0.0],
            vec![f32::NAN, 2.0, 3.0],
            vec![1.0, f32::NAN, 3.0, f32::NAN],
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY],
            vec![1.0, f32::INFINITY, 2.0, f32::INFINITY],
        ];
        // ties in every position relative to the 16 lanes and the tail
        for len in [15usize, 16, 17, 31, 33, 40, 1000] {
            for at in [0, len / 3, len - 1] {
                let mut v: Vec<f32> = (0..len).map(|i| ((i * 7919) % 13) as f32).collect();
                v[at] = 20.0;
                cases.push(v.clone());
                v[len - 1 - at / 2] = 20.0;
                cases.push(v);
            }
        }
        // NaN entries and -0 / +0 ties in the vector part and in the tails of both passes
        for len in [32usize, 33, 47, 64, 100] {
            let mut v: Vec<f32> = (0..len).map(|i| -(((i * 31) % 17) as f32)).collect();
            v[len / 2] = f32::NAN;
            v[len - 1] = f32::NAN;
            cases.push(v.clone());
            v[5] = -0.0;
            v[len - 2] = 0.0;
            v[0] = -1.0;
            cases.push(v.clone());
            v[len - 3] = 5.0;
            cases.push(v);
        }
        for xs in &cases {
            assert_eq!(first_max(xs), scan(xs), "{xs:?}");
            assert_eq!(first_max_portable(xs), scan(xs), "{xs:?}");
        }
    }

    #[test]
    fn host_solutions_equal_the_libtorch_ones() {
        let x: Vec<f32> = (0..60)
            .map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.0 + i as f32 * 1e-3)
            .collect();
        for b in [
            Builtin::Argmax,
            Builtin::TopK(3),
            Builtin::Ranks,
            Builtin::TopK(6),
        ] {
            let mut y = vec![0f32; 60];
            b.solve_host(&x, 6, &mut y);
            assert_eq!(y, run(b, &x, &[6]), "{b:?}");
        }
        // longer slices: the heap of the best k against libtorch's topk, and ties
        let x: Vec<f32> = (0..2000)
            .map(|i| ((i * 7919) % 1009) as f32 * 0.01)
            .collect();
        for k in [1, 2, 10, 99, 100] {
            let mut y = vec![0f32; 2000];
            Builtin::TopK(k).solve_host(&x, 100, &mut y);
            assert_eq!(y, run(Builtin::TopK(k), &x, &[100]), "k = {k}");
        }
        let ties = [1.0f32, 2.0, 2.0, 0.0, 2.0];
        let mut y = [0f32; 5];
        Builtin::TopK(2).solve_host(&ties, 5, &mut y);
        assert_eq!(y, [0., 1., 1., 0., 0.], "the first of equal entries wins");
        Builtin::Ranks.solve_host(&ties, 5, &mut y);
        assert_eq!(y, [2., 3., 4., 1., 5.], "equal entries ranked by position");
        // ranks counted (short rows) and sorted (longer) agree, ties and -0 included
        let x: Vec<f32> = (0..130 * 64)
            .map(|i| [0.0, -0.0, 1.5, -2.0, f32::INFINITY][i * 7 % 5] * ((i % 3) as f32))
            .collect();
        for last in [1, 2, 10, 16, 17, 64, 130] {
            let mut y = vec![0f32; x.len() / last * last];
            let x = &x[..y.len()];
            Builtin::Ranks.solve_host(x, last, &mut y);
            for (xs, ys) in x.chunks(last).zip(y.chunks(last)) {
                let mut order: Vec<usize> = (0..last).collect();
                order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b])); // stable: ties by position
                for (rank, &i) in order.iter().enumerate() {
                    assert_eq!(ys[i], (rank + 1) as f32, "last {last}");
                }
            }
        }
    }

    #[test]
    fn checks_k_and_rank() {
        assert!(Builtin::TopK(0).check(&[4]).is_err());
        assert_eq!(
            Builtin::TopK(5).check(&[4]).unwrap_err().message(),
            "top-k needs 1 <= k <= the last dimension (4), got k = 5"
        );
        assert!(Builtin::Argmax.check(&[]).is_err());
        assert!(Builtin::from_u32(3, 0).is_err());
        Builtin::TopK(4).check(&[2, 4]).unwrap();
    }

    #[test]
    fn gathered_above_the_bar_as_the_scalar_pass() {
        // special values and ties, rows of every length around the vector width
        let special = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-40,
        ];
        for n in [0usize, 1, 7, 8, 9, 16, 23, 100, 1000] {
            let xs: Vec<f32> = (0..n)
                .map(|i| match i % 11 {
                    3 => special[i % special.len()],
                    _ => ((i as u32).wrapping_mul(2654435761) % 29) as f32 - 14.0,
                })
                .collect();
            for bar in [
                0,
                ordered(-3.0),
                ordered(-0.0),
                ordered(0.0),
                ordered(5.0),
                u32::MAX,
            ] {
                let (mut pos, mut key) = (vec![0u32; n], vec![0i32; n]);
                let (mut want_pos, mut want_key) = (vec![0u32; n], vec![0i32; n]);
                let count = gather_above(&xs, bar, &mut pos, &mut key);
                let want = gather_above_from(&xs, 0, 0, bar, &mut want_pos, &mut want_key);
                assert_eq!(count, want, "n {n} bar {bar}");
                assert_eq!(pos[..count], want_pos[..want], "n {n} bar {bar}");
                assert_eq!(key[..count], want_key[..want], "n {n} bar {bar}");
                // and what the scalar pass keeps is what the bar asks for
                let kept: Vec<u32> = (0..n as u32)
                    .filter(|&i| ordered(xs[i as usize]) >= bar)
                    .collect();
                assert_eq!(pos[..count], kept[..], "n {n} bar {bar}");
            }
        }
    }

    #[test]
    fn top_k_by_selection_gives_the_heap_s_set() {
        let mut order = Vec::new();
        let mut other = Vec::new();
        let mut values = Vec::new();
        // kept from call to call, as the rows of a block keep it (longer and shorter rows)
        let mut scratch = AboveScratch::default();
        for n in [1usize, 2, 7, 64, 1000, 9, 65, 40] {
            for seed in 0..20u32 {
                // values with many ties
                let xs: Vec<f32> = (0..n)
                    .map(|i| {
                        ((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) % 13) as f32
                    })
                    .collect();
                for k in [1, n / 3 + 1, n] {
                    top_k(&xs, k, &mut order);
                    top_k_by_selection(&xs, k, &mut other, &mut values);
                    order.sort_unstable();
                    assert_eq!(order, other, "n {n} k {k} seed {seed}");
                    // with any bar: too high (all entries then), too low, about right
                    for start in [0, ordered(2.0), ordered(9.0), ordered(13.0), u32::MAX] {
                        let mut bar = start;
                        for _ in 0..3 {
                            let mut above = vec![7u32];
                            top_k_above(&xs, k, &mut bar, 5, &mut above, &mut scratch);
                            let want: Vec<u32> = std::iter::once(7)
                                .chain(order.iter().map(|&i| 5 + i as u32))
                                .collect();
                            assert_eq!(above, want, "n {n} k {k} seed {seed} bar {start}");
                        }
                    }
                }
            }
        }
    }
}
