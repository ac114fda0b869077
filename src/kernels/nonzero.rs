//! The non-zero entries of solution rows, found in one pass for the sums of a problem's
//! samples and for the tape that keeps the solutions (each reads only those entries after),
//! with a check that every entry is finite.

use std::ops::Range;

/// The positions of the non-zero entries of rows `[rows, o]` (an entry is non-zero when it
/// is not ±0; NaN is non-zero), kept between blocks on one thread: a row with more than
/// the scan's `most` non-zero entries is dense and lists none.
#[derive(Debug, Default)]
pub(crate) struct NonZeros {
    /// The positions of the sparse rows, row after row (room past `used` for the vector
    /// stores of the next row).
    pos: Vec<u32>,
    /// Per row, its range in `pos`, or [`DENSE`].
    spans: Vec<(usize, usize)>,
}

/// The span of a dense row.
const DENSE: (usize, usize) = (usize::MAX, usize::MAX);

impl NonZeros {
    /// Scans the rows of `y` (`o` entries each, `o` > 0), listing the non-zero entries of
    /// each row that has at most `most` of them; returns whether every entry of `y` is
    /// finite.
    pub fn scan(&mut self, y: &[f32], o: usize, most: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.scan_avx2(y, o, most) };
        }
        self.scan_with(y, o, most, row_nonzeros_portable)
    }

    /// [`NonZeros::scan`] with the AVX2 search of each row inlined (short rows are many).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn scan_avx2(&mut self, y: &[f32], o: usize, most: usize) -> bool {
        // SAFETY: the CPU has AVX2; `scan_with` gives room for a whole row
        self.scan_with(y, o, most, |row, most, out| unsafe {
            row_nonzeros_avx2(row, most, out)
        })
    }

    /// [`NonZeros::scan`], each row searched by `find` (as [`row_nonzeros_avx2`], with
    /// `out` at least as long as the row).
    #[inline(always)]
    fn scan_with(
        &mut self,
        y: &[f32],
        o: usize,
        most: usize,
        find: impl Fn(&[f32], usize, &mut [u32]) -> Option<usize>,
    ) -> bool {
        self.spans.clear();
        let mut used = 0;
        let mut finite = true;
        for row in y.chunks_exact(o) {
            if self.pos.len() < used + o {
                // room for a whole row (the vector stores need as much)
                let len = (used + o).max(2 * self.pos.len());
                self.pos.resize(len, 0);
            }
            match find(row, most, &mut self.pos[used..]) {
                Some(count) => {
                    let listed = &self.pos[used..used + count];
                    finite &= listed.iter().all(|&i| row[i as usize].is_finite());
                    self.spans.push((used, used + count));
                    used += count;
                }
                None => {
                    finite &= crate::input::all_finite(row);
                    self.spans.push(DENSE);
                }
            }
        }
        finite
    }

    /// The scanned rows `rows` (row 0 the first of the scan).
    pub fn rows(&self, rows: Range<usize>) -> RowsNonZero<'_> {
        RowsNonZero {
            pos: &self.pos,
            spans: &self.spans[rows],
        }
    }
}

/// Some scanned rows of a [`NonZeros`].
#[derive(Clone, Copy)]
pub(crate) struct RowsNonZero<'a> {
    pos: &'a [u32],
    spans: &'a [(usize, usize)],
}

impl<'a> RowsNonZero<'a> {
    /// The positions of the non-zero entries of row r (in increasing order), or None for a
    /// dense row.
    #[inline(always)]
    pub fn row(&self, r: usize) -> Option<&'a [u32]> {
        let span = self.spans[r];
        (span != DENSE).then(|| &self.pos[span.0..span.1])
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.spans.len()
    }
}

/// The positions of the non-zero entries of `row` (not ±0; NaN is non-zero), in increasing
/// order: `out` holds them (it is resized to hold any row).
pub(crate) fn nonzeros<'a>(row: &[f32], out: &'a mut Vec<u32>) -> &'a [u32] {
    if out.len() < row.len() {
        out.resize(row.len(), 0);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2() {
        // SAFETY: the CPU has AVX2; `out` is at least as long as `row`.
        let count = unsafe { nonzeros_avx2(row, out) };
        return &out[..count];
    }
    let count = row_nonzeros_from(row, 0, 0, out);
    &out[..count]
}

/// [`nonzeros`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2, and `out.len() >= row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn nonzeros_avx2(row: &[f32], out: &mut [u32]) -> usize {
    // SAFETY: the caller's promises; no bound on the count
    unsafe { row_nonzeros_avx2(row, row.len(), out) }.expect("at most every entry")
}

/// The positions of the non-zero entries of `row`, in increasing order, into the first
/// entries of `out` (at least as long as `row`), and how many; None when there are more
/// than `most`: one entry at a time.
fn row_nonzeros_portable(row: &[f32], most: usize, out: &mut [u32]) -> Option<usize> {
    let count = row_nonzeros_from(row, 0, 0, out);
    (count <= most).then_some(count)
}

/// The positions of the non-zero entries of `row` from entry `start` on, in increasing
/// order, into `out` from `count` (the number listed before `start`; `out` at least as long
/// as `row`), and how many in all: written always, kept when non-zero (no branch per
/// entry).
#[inline(always)]
fn row_nonzeros_from(row: &[f32], start: usize, mut count: usize, out: &mut [u32]) -> usize {
    for (i, &v) in row.iter().enumerate().skip(start) {
        out[count] = i as u32; // count <= i < row.len() <= out.len()
        count += usize::from(v != 0.0);
    }
    count
}

/// The positions of the non-zero entries of `row` in increasing order, into the first
/// entries of `out`, and how many; None when there are more than `most` (the row is dense;
/// `out` then holds anything). 32 entries a step: four vector compares with zero, and only where one
/// is non-zero, each vector's non-zero lanes packed to the front by a permutation of
/// [`super::largest::PACK`] and stored whole at the count (lanes past the kept ones are
/// overwritten later or lie beyond the count). A one-hot row costs about a compare per 8
/// entries.
///
/// # Safety
/// The CPU has AVX2, and `out.len() >= row.len()`. (Not compiled for AVX2 itself, so that
/// it inlines into the callers that are: short rows are many.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_nonzeros_avx2(row: &[f32], most: usize, out: &mut [u32]) -> Option<usize> {
    use std::arch::x86_64::*;
    let n = row.len();
    debug_assert!(out.len() >= n);
    let zero = _mm256_setzero_ps();
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut count = 0;
    let mut i = 0;
    // the lanes not ±0 (NaN included: unordered compares are "not equal")
    let nonzero = |at: usize| {
        // SAFETY: callers pass at + 8 <= n, so 8 floats of `row` at `at`
        _mm256_cmp_ps::<_CMP_NEQ_UQ>(unsafe { _mm256_loadu_ps(row.as_ptr().add(at)) }, zero)
    };
    // the non-zero lanes of the 8 entries at `at` stored at `count`
    let pack = |at: usize, mask: __m256, count: &mut usize, out: &mut [u32]| {
        let kept = _mm256_movemask_ps(mask) as usize;
        if kept != 0 {
            // SAFETY: an entry of the 256-entry table
            let perm = unsafe { _mm256_loadu_si256(super::largest::PACK[kept].as_ptr().cast()) };
            let at = _mm256_add_epi32(_mm256_set1_epi32(at as i32), lanes);
            // SAFETY: count <= at (one position per entry before it) and at + 8 <= n <=
            // out.len(), so 8 u32 at count are within `out`
            unsafe {
                _mm256_storeu_si256(
                    out.as_mut_ptr().add(*count).cast(),
                    _mm256_permutevar8x32_epi32(at, perm),
                )
            };
            *count += kept.count_ones() as usize;
        }
    };
    while i + 32 <= n {
        let m = [nonzero(i), nonzero(i + 8), nonzero(i + 16), nonzero(i + 24)];
        let any = _mm256_or_ps(_mm256_or_ps(m[0], m[1]), _mm256_or_ps(m[2], m[3]));
        if _mm256_testz_ps(any, any) == 0 {
            for (k, &mask) in m.iter().enumerate() {
                pack(i + 8 * k, mask, &mut count, out);
            }
            if count > most {
                return None;
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        pack(i, nonzero(i), &mut count, out);
        i += 8;
    }
    let count = row_nonzeros_from(row, i, count, out);
    (count <= most).then_some(count)
}

/// Values whose zeroness and finiteness the kernels' tests try: ±0, NaN, ∞, a subnormal's
/// neighbour (the smallest normal), negatives.
#[cfg(test)]
pub(crate) const SPECIAL_VALUES: [f32; 7] = [
    1.0,
    -0.0,
    0.0,
    f32::NAN,
    f32::INFINITY,
    -2.5,
    f32::MIN_POSITIVE,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The positions a plain scan finds.
    fn plain(row: &[f32]) -> Vec<u32> {
        (0..row.len() as u32)
            .filter(|&i| row[i as usize] != 0.0)
            .collect()
    }

    /// `make miri` compiles the kernels with AVX2 and FMA: their vector paths are the ones
    /// Miri runs.
    #[test]
    #[cfg(miri)]
    fn the_avx2_paths_run_under_miri() {
        assert!(
            cfg!(all(target_feature = "avx2", target_feature = "fma")),
            "make miri compiles with -Ctarget-feature=+avx2,+fma"
        );
        assert!(crate::fastmath::has_avx2());
    }

    #[test]
    fn every_length_and_pattern_gives_the_plain_positions() {
        let specials = SPECIAL_VALUES;
        // (under Miri, every third length: `make miri` runs it on several schedules)
        let step = if cfg!(miri) { 3 } else { 1 };
        for n in (0..80usize).step_by(step) {
            for seed in 0..12u64 {
                // sparse to dense rows with special values
                let row: Vec<f32> = (0..n as u64)
                    .map(|i| {
                        let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(31);
                        if h % 13 < seed {
                            specials[(h % 7) as usize]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let want = plain(&row);
                let mut out = vec![u32::MAX; n];
                let count = row_nonzeros_from(&row, 0, 0, &mut out);
                assert_eq!(&out[..count], &want[..]);
                // the vector search (where the CPU has it) through a scan of the one row
                let mut positions = Vec::new();
                assert_eq!(nonzeros(&row, &mut positions), &want[..]);
                if n == 0 {
                    continue;
                }
                let finite = row.iter().all(|v| v.is_finite());
                for most in [0, 1, n / 2, n] {
                    // the scan the CPU runs (AVX2 where it has it), and the portable one
                    let mut scan = NonZeros::default();
                    let mut portable = NonZeros::default();
                    assert_eq!(scan.scan(&row, n, most), finite);
                    let by_plain_scan = portable.scan_with(&row, n, most, row_nonzeros_portable);
                    assert_eq!(by_plain_scan, finite);
                    for got in [scan.rows(0..1).row(0), portable.rows(0..1).row(0)] {
                        if want.len() <= most {
                            assert_eq!(got, Some(&want[..]), "n {n} seed {seed} most {most}");
                        } else {
                            assert_eq!(got, None, "n {n} seed {seed} most {most}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scans_rows_sparse_and_dense_and_checks_finiteness() {
        let o = 40;
        let mut y = vec![0f32; 4 * o];
        y[3] = 1.0; // row 0: one-hot
        y[o..2 * o].fill(2.0); // row 1: dense
        y[2 * o + 39] = -0.0; // row 2: nothing
        y[3 * o + 5] = 0.5; // row 3: two entries
        y[3 * o + 33] = 0.25;
        let mut scan = NonZeros::default();
        assert!(scan.scan(&y, o, o / 2));
        let rows = scan.rows(0..4);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows.row(0), Some(&[3u32][..]));
        assert_eq!(rows.row(1), None);
        assert_eq!(rows.row(2), Some(&[][..]));
        assert_eq!(rows.row(3), Some(&[5u32, 33][..]));
        assert_eq!(scan.rows(3..4).row(0), Some(&[5u32, 33][..]));
        // the same scan with no dense rows lists row 1 whole
        assert!(scan.scan(&y, o, o));
        assert_eq!(scan.rows(0..4).row(1).map(<[u32]>::len), Some(o));
        // a NaN in a sparse row, an infinity in a dense row
        for (at, bad) in [(2 * o + 7, f32::NAN), (o + 11, f32::NEG_INFINITY)] {
            let mut y = y.clone();
            y[at] = bad;
            assert!(!scan.scan(&y, o, o / 2), "{bad} at {at}");
        }
    }
}
