//! The non-zero entries of a block's solution rows as the sums read them ([`Entries`]):
//! found by the sums row by row, scanned for a tape ([`super::nonzero`]), or listed with
//! their values by the thread that solved the block ([`Listed`]), so that another core can
//! sum the block from short lists instead of reading the rows from the solving core's
//! cache (a two-stage run: a callback on the calling thread, the sums on a helper).

use super::nonzero::RowsNonZero;
use std::ops::Range;

/// The non-zero entries (not ±0; NaN is non-zero) of a block's solution rows `[rows, o]`,
/// each with its value and, when inputs and outputs have one shape, the perturbed input at
/// its position, in the order of the rows: made in one vectorized pass while the rows are
/// in the solving thread's cache; the room is kept between blocks.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    /// Per entry, its position in the rows (row · o + i), increasing; then room for the
    /// whole-vector stores of the pass.
    at: Vec<u32>,
    /// Per entry, the solution's value and the perturbed input (when listed).
    y: Vec<f32>,
    x: Vec<f32>,
    /// The entries listed, the row length, and whether the inputs were listed.
    len: usize,
    o: usize,
    with_x: bool,
}

/// The lanes of a vector store past the last entry of a pass.
const SPARE: usize = 16;

impl Listed {
    /// Whether the rows of a block of `values` solution entries can be listed (their
    /// positions are u32).
    pub fn fits(values: usize) -> bool {
        values <= (u32::MAX as usize) - SPARE
    }

    /// Lists the non-zero entries of `y` (rows of `o` entries, `o` > 0) with their values,
    /// and the entries of `x` at the same positions when given (`x` as long as `y`);
    /// returns whether every entry of `y` is finite.
    pub fn list(&mut self, y: &[f32], o: usize, x: Option<&[f32]>) -> bool {
        assert!(o > 0 && y.len().is_multiple_of(o) && Self::fits(y.len()));
        if let Some(x) = x {
            assert_eq!(
                x.len(),
                y.len(),
                "inputs at every position of the solutions"
            );
        }
        let room = y.len() + SPARE;
        if self.at.len() < room {
            self.at.resize(room, 0);
            self.y.resize(room, 0.0);
        }
        if x.is_some() && self.x.len() < room {
            self.x.resize(room, 0.0);
        }
        (self.o, self.with_x) = (o, x.is_some());
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx512() {
            // SAFETY: the CPU has AVX-512; the room holds y.len() + SPARE entries
            return unsafe { self.list_avx512(y, x) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2() {
            // SAFETY: the CPU has AVX2; the room holds y.len() + SPARE entries
            return unsafe { self.list_avx2(y, x) };
        }
        let (len, finite) = self.list_from(y, x, 0, 0);
        self.len = len;
        finite
    }

    /// The entries from position `from` on, one at a time, after the `count` listed before
    /// it: written always, kept when non-zero (no branch per entry). Returns the entries
    /// in all, and whether those from `from` on are finite.
    fn list_from(
        &mut self,
        y: &[f32],
        x: Option<&[f32]>,
        from: usize,
        mut count: usize,
    ) -> (usize, bool) {
        let mut finite = true;
        for (f, &v) in y.iter().enumerate().skip(from) {
            // count <= f < y.len() < the room
            self.at[count] = f as u32;
            self.y[count] = v;
            if let Some(x) = x {
                self.x[count] = x[f];
            }
            let kept = v != 0.0;
            finite &= !kept || v.is_finite();
            count += usize::from(kept);
        }
        (count, finite)
    }

    /// [`Listed::list`] 8 entries a step: a compare with zero, and where one is non-zero,
    /// the kept lanes of the positions, values and inputs packed to the front by a
    /// permutation of [`super::largest::PACK`] and stored whole at the count.
    ///
    /// # Safety
    /// The CPU has AVX2; `at`, `y` (and `x` when given) hold `y.len() + SPARE` entries.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn list_avx2(&mut self, y: &[f32], x: Option<&[f32]>) -> bool {
        use std::arch::x86_64::*;
        let n = y.len();
        let (zero, lanes) = (
            _mm256_setzero_ps(),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let infinity = _mm256_set1_ps(f32::INFINITY);
        let (mut count, mut f, mut bad) = (0, 0, zero);
        while f + 8 <= n {
            // SAFETY: f + 8 <= n entries of y (and of x, as long)
            let v = unsafe { _mm256_loadu_ps(y.as_ptr().add(f)) };
            let kept = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(v, zero)) as usize;
            if kept != 0 {
                // |v| not below infinity: ±∞ or NaN
                let infinite = _mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_and_ps(v, magnitude), infinity);
                bad = _mm256_or_ps(bad, infinite);
                // SAFETY: an entry of the 256-entry table
                let perm =
                    unsafe { _mm256_loadu_si256(super::largest::PACK[kept].as_ptr().cast()) };
                let at = _mm256_add_epi32(_mm256_set1_epi32(f as i32), lanes);
                // SAFETY: count <= f, so 8 entries at count lie within the room (n + SPARE)
                unsafe {
                    _mm256_storeu_si256(
                        self.at.as_mut_ptr().add(count).cast(),
                        _mm256_permutevar8x32_epi32(at, perm),
                    );
                    _mm256_storeu_ps(
                        self.y.as_mut_ptr().add(count),
                        _mm256_permutevar8x32_ps(v, perm),
                    );
                    if let Some(x) = x {
                        let xv = _mm256_loadu_ps(x.as_ptr().add(f));
                        _mm256_storeu_ps(
                            self.x.as_mut_ptr().add(count),
                            _mm256_permutevar8x32_ps(xv, perm),
                        );
                    }
                }
                count += kept.count_ones() as usize;
            }
            f += 8;
        }
        let (len, finite) = self.list_from(y, x, f, count);
        self.len = len;
        finite && _mm256_testz_ps(bad, bad) == 1
    }

    /// [`Listed::list`] 16 entries a step (the last step masked): a compare with zero, and
    /// where one is non-zero, the kept lanes compressed to the front and stored whole at
    /// the count.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F); `at`, `y` (and `x` when given) hold `y.len() + SPARE`
    /// entries.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn list_avx512(&mut self, y: &[f32], x: Option<&[f32]>) -> bool {
        use std::arch::x86_64::*;
        let n = y.len();
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (zero, infinity) = (_mm512_setzero_ps(), _mm512_set1_ps(f32::INFINITY));
        let (mut count, mut f, mut bad) = (0, 0, 0u16);
        while f < n {
            let within: u16 = if n - f >= 16 {
                u16::MAX
            } else {
                (1 << (n - f)) - 1
            };
            // SAFETY: the lanes loaded lie within y (masked lanes are not read)
            let v = unsafe { _mm512_maskz_loadu_ps(within, y.as_ptr().add(f)) };
            let kept = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(within, v, zero);
            if kept != 0 {
                bad |= _mm512_mask_cmp_ps_mask::<_CMP_NLT_UQ>(kept, _mm512_abs_ps(v), infinity);
                let at = _mm512_add_epi32(_mm512_set1_epi32(f as i32), lanes);
                // SAFETY: count <= f, so 16 entries at count lie within the room (n +
                // SPARE); the inputs loaded are the kept lanes, within x (as long as y)
                unsafe {
                    _mm512_storeu_si512(
                        self.at.as_mut_ptr().add(count).cast(),
                        _mm512_maskz_compress_epi32(kept, at),
                    );
                    _mm512_storeu_ps(
                        self.y.as_mut_ptr().add(count),
                        _mm512_maskz_compress_ps(kept, v),
                    );
                    if let Some(x) = x {
                        let xv = _mm512_maskz_loadu_ps(kept, x.as_ptr().add(f));
                        _mm512_storeu_ps(
                            self.x.as_mut_ptr().add(count),
                            _mm512_maskz_compress_ps(kept, xv),
                        );
                    }
                }
                count += kept.count_ones() as usize;
            }
            f += 16;
        }
        self.len = count;
        bad == 0
    }

    /// The entries of rows `rows` (row 0 the first of the pass).
    pub fn rows(&self, rows: Range<usize>) -> ListedRows<'_> {
        let at = &self.at[..self.len];
        let (first, end) = ((rows.start * self.o) as u32, (rows.end * self.o) as u32);
        let entries = at.partition_point(|&p| p < first)..at.partition_point(|&p| p < end);
        ListedRows {
            rows: rows.len(),
            at: &at[entries.clone()],
            y: &self.y[entries.clone()],
            x: if self.with_x { &self.x[entries] } else { &[] },
            with_x: self.with_x,
            first,
            o: self.o as u32,
        }
    }
}

/// The listed entries of some rows of a [`Listed`] (all of each row's), with the position
/// of their first row's first entry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ListedRows<'a> {
    rows: usize,
    at: &'a [u32],
    y: &'a [f32],
    x: &'a [f32],
    with_x: bool,
    first: u32,
    o: u32,
}

impl<'a> ListedRows<'a> {
    /// Whether the inputs were listed with the entries.
    pub fn with_inputs(&self) -> bool {
        self.with_x
    }

    /// How many rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The entries of a row.
    pub fn width(&self) -> usize {
        self.o as usize
    }

    /// The entries of row `r` (the rows taken in order from 0: `next` is the first entry
    /// of row r, moved past its last): their positions (from which `base`, the row's
    /// first position, is subtracted for the output), values, and inputs (none when not
    /// listed).
    #[inline(always)]
    pub fn row(&self, r: usize, next: &mut usize) -> RowEntries<'a> {
        let (base, start) = (self.first + r as u32 * self.o, *next);
        debug_assert!(r < self.rows && self.at.get(start).is_none_or(|&p| p >= base));
        let end = base + self.o;
        while *next < self.at.len() && self.at[*next] < end {
            *next += 1;
        }
        let part = start..*next;
        RowEntries {
            pos: &self.at[part.clone()],
            base,
            y: &self.y[part.clone()],
            x: if self.with_x { &self.x[part] } else { &[] },
        }
    }
}

/// The non-zero entries of one row as the sums take them: positions (less `base`, the
/// row's first position, positions in the row), and when listed their values and inputs
/// (empty when not listed; the inputs also when they were not listed with the values).
pub(crate) struct RowEntries<'a> {
    pub pos: &'a [u32],
    pub base: u32,
    pub y: &'a [f32],
    pub x: &'a [f32],
}

/// How the sums get the non-zero entries of a block's solution rows.
#[derive(Clone, Copy)]
pub(crate) enum Entries<'a> {
    /// Found by the sums, row by row.
    Unknown,
    /// Scanned for a tape that keeps the solutions (positions within each row).
    Scanned(RowsNonZero<'a>),
    /// Listed with their values (and inputs) by the thread that solved the rows.
    Listed(ListedRows<'a>),
}

/// The list of a block's non-zero entries that its solve made for the sums, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Made {
    Nothing,
    /// By a scan for a tape that keeps the solutions ([`super::nonzero::NonZeros`]).
    Scanned,
    /// By [`Listed::list`].
    Listed,
}

/// A block's lists of non-zero entries, as its solve made them.
#[derive(Clone, Copy)]
pub(crate) enum Found<'s> {
    Nothing,
    Scanned(&'s super::nonzero::NonZeros),
    Listed(&'s Listed),
}

impl Found<'_> {
    /// The entries of rows `rows` of the block, for the sums.
    pub fn rows(&self, rows: Range<usize>) -> Entries<'_> {
        match self {
            Found::Nothing => Entries::Unknown,
            Found::Scanned(scan) => Entries::Scanned(scan.rows(rows)),
            Found::Listed(listed) => Entries::Listed(listed.rows(rows)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass of one width over y (and x), returning whether y is finite.
    type Width = fn(&mut Listed, &[f32], Option<&[f32]>) -> bool;

    /// What a plain pass lists: positions, values and inputs of the non-zero entries.
    fn plain(y: &[f32], x: &[f32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let kept: Vec<usize> = (0..y.len()).filter(|&f| y[f] != 0.0).collect();
        (
            kept.iter().map(|&f| f as u32).collect(),
            kept.iter().map(|&f| y[f].to_bits()).collect(),
            kept.iter().map(|&f| x[f].to_bits()).collect(),
        )
    }

    /// The listed entries of `rows`, as bits.
    fn listed(l: &ListedRows<'_>) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect();
        (l.at.to_vec(), bits(l.y), bits(l.x))
    }

    /// Every width the CPU has (AVX-512, AVX2, one at a time) lists what a plain pass does,
    /// bit for bit (−0 not listed, NaN listed), with the inputs or without, says whether
    /// every entry is finite, and cuts the list by rows; the room is reused across passes
    /// of other lengths.
    #[test]
    fn every_width_lists_the_plain_entries_and_their_finiteness() {
        let specials = crate::kernels::nonzero::SPECIAL_VALUES;
        #[allow(unused_mut)]
        let mut widths: Vec<(&str, Width)> = vec![("one at a time", |l, y, x| {
            let (len, finite) = l.list_from(y, x, 0, 0);
            l.len = len;
            finite
        })];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::fastmath::has_avx2() {
                // SAFETY: the CPU has AVX2; `list` made the room first
                widths.push(("AVX2", |l, y, x| unsafe { l.list_avx2(y, x) }));
            }
            if crate::fastmath::has_avx512() {
                // SAFETY: the CPU has AVX-512; `list` made the room first
                widths.push(("AVX-512", |l, y, x| unsafe { l.list_avx512(y, x) }));
            }
        }
        // (under Miri, every fifth length: `make miri` runs it on several schedules)
        let step = if cfg!(miri) { 5 } else { 1 };
        let mut lists: Vec<Listed> = widths.iter().map(|_| Listed::default()).collect();
        for o in [1usize, 3, 10, 16, 17] {
            for rows in (0..12usize).step_by(step) {
                for seed in 0..8u64 {
                    let n = rows * o;
                    let y: Vec<f32> = (0..n as u64)
                        .map(|i| {
                            let h =
                                (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(31);
                            // seed 7: every entry non-zero (the widest stores)
                            if seed == 7 {
                                1.0 + (h % 5) as f32
                            } else if h % 9 < seed {
                                specials[(h % 7) as usize]
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
                    let want = plain(&y, &x);
                    let finite = y.iter().all(|v| v.is_finite());
                    for ((name, width), l) in widths.iter().zip(&mut lists) {
                        for with_x in [true, false] {
                            let what =
                                format!("{name}: o {o}, {rows} rows, seed {seed}, inputs {with_x}");
                            let x = with_x.then_some(&x[..]);
                            // `list` makes the room and runs the widest; then each width
                            assert_eq!(l.list(&y, o, x), finite, "{what}");
                            assert_eq!(width(l, &y, x), finite, "{what}");
                            let all = l.rows(0..rows);
                            assert_eq!(all.with_inputs(), with_x, "{what}");
                            let got = listed(&all);
                            assert_eq!((&got.0, &got.1), (&want.0, &want.1), "{what}");
                            if with_x {
                                assert_eq!(got.2, want.2, "{what}");
                            }
                            // by rows: the entries of rows 1 .. rows - 1, from row 1's first
                            if rows >= 2 {
                                let part = l.rows(1..rows - 1);
                                let (lo, hi) = ((o) as u32, ((rows - 1) * o) as u32);
                                let inside: Vec<u32> = want
                                    .0
                                    .iter()
                                    .copied()
                                    .filter(|&p| lo <= p && p < hi)
                                    .collect();
                                assert_eq!(part.at, &inside[..], "{what}");
                                assert_eq!(part.first, lo, "{what}");
                                assert_eq!(part.rows(), rows - 2, "{what}");
                                let values: Vec<u32> =
                                    inside.iter().map(|&p| y[p as usize].to_bits()).collect();
                                assert_eq!(listed(&part).1, values, "{what}");
                                if let Some(x) = x {
                                    let inputs: Vec<u32> =
                                        inside.iter().map(|&p| x[p as usize].to_bits()).collect();
                                    assert_eq!(listed(&part).2, inputs, "{what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The entries of each row of a list, as the sums take them: positions less the row's
    /// first, values and inputs.
    #[test]
    fn the_sums_take_each_rows_entries_from_the_list() {
        let o = 10;
        let mut y = vec![0f32; 4 * o];
        y[3] = 1.0; // row 0: one-hot
        y[o..2 * o].fill(2.0); // row 1: dense
                               // row 2: nothing
        y[3 * o + 5] = 0.5; // row 3: two entries
        y[3 * o + 9] = -0.25;
        let x: Vec<f32> = (0..4 * o).map(|i| i as f32).collect();
        let mut l = Listed::default();
        assert!(l.list(&y, o, Some(&x)));
        let rows = l.rows(0..4);
        let mut next = 0;
        let mut row = |r: usize| {
            let e = rows.row(r, &mut next);
            let pos: Vec<u32> = e.pos.iter().map(|p| p - e.base).collect();
            (pos, e.y.to_vec(), e.x.to_vec())
        };
        assert_eq!(row(0), (vec![3], vec![1.0], vec![3.0]));
        assert_eq!(row(1).0, (0..10).collect::<Vec<u32>>());
        assert_eq!(row(2), (vec![], vec![], vec![]));
        assert_eq!(row(3), (vec![5, 9], vec![0.5, -0.25], vec![35.0, 39.0]));
        // a list of rows 2 .. 4 alone: its rows count from 0
        let rows = l.rows(2..4);
        let mut next = 0;
        assert!(rows.row(0, &mut next).pos.is_empty());
        let e = rows.row(1, &mut next);
        assert_eq!((e.pos, e.base), (&[35u32, 39][..], 30));
        // a NaN and an infinity are listed, and the pass says so; without the inputs
        y[2 * o + 1] = f32::NAN;
        assert!(!l.list(&y, o, None));
        assert_eq!(l.rows(2..3).at, &[21u32][..]);
        assert!(l.rows(0..4).row(0, &mut 0).x.is_empty());
    }
}
