//! The largest entries of a row of floats, on the host: the first maximum (argmax: IEEE
//! comparisons, NaN entries skipped, −0 equal to +0) and the positions of the k largest
//! (top-k: in the order of `f32::total_cmp`), ties to the first; the kernels of the 0/1
//! built-ins (see [`super::builtin`]).

use crate::tuning::{SCANNED_UP_TO, TOP_K_RANKED_BY_COUNTING};

/// `v` as an integer in the order of `f32::total_cmp` (−NaN < −∞ < … < −0 < +0 < … < +∞ <
/// NaN).
#[inline(always)]
pub(super) fn ordered(v: f32) -> u32 {
    let bits = v.to_bits();
    // negative: every bit flipped; else the sign bit set
    bits ^ (((bits as i32) >> 31) as u32 | 1 << 31)
}

/// The position of the first largest entry of `xs` (not empty), NaN entries skipped (0 when
/// the first is NaN): the same as a scan that keeps the first strictly larger entry, found
/// with a vectorized maximum and a vectorized search for its first occurrence.
#[inline(always)]
pub(super) fn first_max(xs: &[f32]) -> usize {
    if xs.len() <= SCANNED_UP_TO {
        // short rows: one pass, the scan itself
        let mut best = 0;
        for (i, &v) in xs.iter().enumerate().skip(1) {
            if v > xs[best] {
                best = i;
            }
        }
        return best;
    }
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
pub(super) fn top_k(xs: &[f32], k: usize, out: &mut Vec<usize>) {
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
pub(super) fn top_k_by_selection(xs: &[f32], k: usize, out: &mut Vec<usize>, keys: &mut Vec<u64>) {
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
pub(super) struct AboveScratch {
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
pub(super) static PACK: [[u32; 8]; 256] = {
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
pub(super) fn top_k_above(
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // (under Miri, fewer seeds: `make miri` runs it on several schedules)
        let seeds = if cfg!(miri) { 2 } else { 20 };
        for n in [1usize, 2, 7, 64, 1000, 9, 65, 40] {
            for seed in 0..seeds {
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
