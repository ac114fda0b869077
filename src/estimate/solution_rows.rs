//! The solutions of a forward call's samples as a tape of solutions keeps them
//! ([`SolutionRows`]): row by row, a row's non-zero entries as (index, value) pairs when at
//! most half of them are non-zero (one-hot, top-k and path indicators: a few entries of
//! many), the whole row otherwise (see [`crate::estimate::replay`]).

use crate::error::{Error, Result, Status};
use crate::kernels::nonzero::RowsNonZero;

/// Bit 63 of a row's end: the row is stored whole.
const DENSE: u64 = 1 << 63;

/// Solutions `[rows, o]`, row by row: a sparse row is its non-zero indices then their
/// values (as float bits), a dense row its `o` values.
#[derive(Debug, Default)]
pub(crate) struct SolutionRows {
    pub(crate) o: usize,
    /// Where each row ends in `words`, with [`DENSE`] set for whole rows.
    ends: Vec<u64>,
    words: Vec<u32>,
}

impl SolutionRows {
    /// No rows of `o` outputs (`o` must fit in 32 bits).
    pub fn new(o: usize) -> SolutionRows {
        assert!(
            u32::try_from(o).is_ok(),
            "output_numel {o} does not fit in 32 bits"
        );
        SolutionRows {
            o,
            ends: Vec::new(),
            words: Vec::new(),
        }
    }

    /// Appends the rows of `y` `[rows, o]` (tests; the host pipeline scans its rows once
    /// for the tape and the sums: see [`SolutionRows::push_scanned`]).
    #[cfg(test)]
    pub fn push(&mut self, y: &[f32]) -> Result<()> {
        let mut scan = crate::kernels::nonzero::NonZeros::default();
        if self.o > 0 {
            scan.scan(y, self.o, self.o / 2);
        }
        self.push_scanned(y, scan.rows(0..y.len() / self.o.max(1)))
    }

    /// Appends the rows of `y` `[rows, o]`, whose non-zero entries a scan has listed
    /// (`nonzero`, one entry per row of `y`): a row with more non-zero entries than zeros
    /// is stored whole, listed or not, another as its listed positions and their values.
    /// Memory grows with what the rows take (sparse rows take a few words), never by a
    /// worst case; TORCH_ERROR when it cannot.
    pub fn push_scanned(&mut self, y: &[f32], nonzero: RowsNonZero<'_>) -> Result<()> {
        let rows = y.len() / self.o.max(1);
        assert_eq!(nonzero.len(), rows, "a scan of these rows");
        let o = self.o;
        let listed = |r: usize| nonzero.row(r).filter(|p| 2 * p.len() <= o);
        let words: usize = (0..rows)
            .map(|r| listed(r).map_or(self.o, |p| 2 * p.len()))
            .sum();
        self.reserve(rows, words)?;
        for (r, row) in y.chunks_exact(self.o.max(1)).take(rows).enumerate() {
            match listed(r) {
                None => {
                    self.words.extend(row.iter().map(|v| v.to_bits()));
                    self.ends.push(self.words.len() as u64 | DENSE);
                }
                // the indices, then the values
                Some(positions) => {
                    self.words.extend_from_slice(positions);
                    self.words
                        .extend(positions.iter().map(|&i| row[i as usize].to_bits()));
                    self.ends.push(self.words.len() as u64);
                }
            }
        }
        Ok(())
    }

    /// Appends 0/1 rows given by the positions of their ones (`per_row` increasing
    /// positions a row): the rows [`SolutionRows::push_scanned`] makes of them written
    /// out.
    pub fn push_ones(&mut self, ones: &[u32], per_row: usize) -> Result<()> {
        let rows = ones.len() / per_row.max(1);
        let dense = 2 * per_row > self.o;
        let per_words = if dense { self.o } else { 2 * per_row };
        self.reserve(rows, rows.saturating_mul(per_words))?;
        let one = 1f32.to_bits();
        for row in ones.chunks_exact(per_row.max(1)).take(rows) {
            if dense {
                let start = self.words.len();
                self.words.resize(start + self.o, 0);
                for &i in row {
                    self.words[start + i as usize] = one;
                }
                self.ends.push(self.words.len() as u64 | DENSE);
            } else {
                self.words.extend_from_slice(row);
                self.words.extend(std::iter::repeat_n(one, per_row));
                self.ends.push(self.words.len() as u64);
            }
        }
        Ok(())
    }

    /// Appends the rows of `other` (same `o`), which keeps them (and its memory, to be
    /// [`SolutionRows::clear`]ed and filled again); TORCH_ERROR when memory runs out.
    pub fn append(&mut self, other: &SolutionRows) -> Result<()> {
        self.reserve(other.ends.len(), other.words.len())?;
        let base = self.words.len() as u64;
        self.ends.extend(
            other
                .ends
                .iter()
                .map(|&e| ((e & !DENSE) + base) | (e & DENSE)),
        );
        self.words.extend_from_slice(&other.words);
        Ok(())
    }

    /// No rows, the memory kept for the next ones.
    pub fn clear(&mut self) {
        self.ends.clear();
        self.words.clear();
    }

    /// Room for `rows` more ends and `words` more words, growing geometrically (so that
    /// appending costs amortized O(1) a word), or TORCH_ERROR.
    fn reserve(&mut self, rows: usize, words: usize) -> Result<()> {
        let fail = |what: &str, more: usize, have: usize| {
            Error::new(
                Status::TorchError,
                format!("cannot allocate the tape: {what} for {more} more after {have}"),
            )
        };
        let bytes =
            |len: usize, more: usize, size: usize| (len as u128 + more as u128) * size as u128;
        if !crate::tensors::fits_in_memory(
            bytes(self.ends.len(), rows, std::mem::size_of::<u64>())
                + bytes(self.words.len(), words, std::mem::size_of::<u32>()),
        ) {
            return Err(fail(
                "more than this machine's memory",
                rows,
                self.ends.len(),
            ));
        }
        self.ends
            .try_reserve(rows)
            .map_err(|_| fail("no memory for row ends", rows, self.ends.len()))?;
        self.words
            .try_reserve(words)
            .map_err(|_| fail("no memory for solution words", words, self.words.len()))
    }

    /// Gives back the room that growth left unused.
    pub fn shrink(&mut self) {
        self.words.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Calls `f(i, y_ri)` for the non-zero entries of row `r` (all entries of a dense row).
    #[inline]
    pub(crate) fn for_each(&self, r: usize, mut f: impl FnMut(usize, f32)) {
        let start = if r == 0 { 0 } else { self.ends[r - 1] & !DENSE } as usize;
        let end = self.ends[r];
        let words = &self.words[start..(end & !DENSE) as usize];
        if end & DENSE != 0 {
            words
                .iter()
                .enumerate()
                .for_each(|(i, &w)| f(i, f32::from_bits(w)));
        } else {
            let (index, value) = words.split_at(words.len() / 2);
            index
                .iter()
                .zip(value)
                .for_each(|(&i, &w)| f(i as usize, f32::from_bits(w)));
        }
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.ends.len() * 8 + self.words.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_ones_equal_the_rows_written_out() {
        for (o, per_row) in [(6usize, 1usize), (6, 2), (6, 4), (1, 1)] {
            let ones: Vec<u32> = (0..3)
                .flat_map(|r| (0..per_row).map(move |j| ((r + j * 2) % o) as u32))
                .collect::<Vec<_>>()
                .chunks(per_row)
                .flat_map(|c| {
                    let mut c = c.to_vec();
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect();
            if ones.len() != 3 * per_row {
                continue; // a row with repeated positions is not a 0/1 row
            }
            let mut dense = vec![0f32; 3 * o];
            for (r, row) in ones.chunks(per_row).enumerate() {
                for &i in row {
                    dense[r * o + i as usize] = 1.0;
                }
            }
            let (mut a, mut b) = (SolutionRows::new(o), SolutionRows::new(o));
            a.push(&dense).unwrap();
            b.push_ones(&ones, per_row).unwrap();
            assert_eq!(
                (a.ends, a.words),
                (b.ends, b.words),
                "o {o} per row {per_row}"
            );
        }
    }

    #[test]
    fn rows_keep_their_values_sparse_or_whole() {
        let y = [
            0.0f32, 1.0, 0.0, 0.0, // sparse
            2.0, -1.0, 3.0, 0.5, // whole
            0.0, 0.0, 0.0, 0.0, // empty
        ];
        let mut a = SolutionRows::new(4);
        a.push(&y[..4]).unwrap();
        let mut b = SolutionRows::new(4);
        b.push(&y[4..]).unwrap();
        a.append(&b).unwrap();
        assert_eq!(a.len(), 3);
        let mut back = vec![0f32; 12];
        for r in 0..3 {
            a.for_each(r, |i, v| back[r * 4 + i] = v);
        }
        assert_eq!(back, y);
        // 1 sparse entry (2 words) + 4 whole + 0, and 3 ends
        assert_eq!(a.bytes(), 3 * 8 + 6 * 4);
    }

    #[test]
    fn sparse_rows_find_every_non_zero_in_runs_and_tail() {
        // rows over several 8-entry runs and a tail, with -0.0 (a zero) and NaN (not one)
        for o in [1usize, 7, 8, 9, 17, 40, 1003] {
            let mut y = vec![0f32; 3 * o];
            for (r, at) in [(0, 0), (0, o - 1), (1, o / 2), (2, o - 1)] {
                y[r * o + at] = 1.0 + at as f32;
            }
            y[o / 3] = -0.0;
            if o > 2 {
                y[2 * o + 1] = f32::NAN;
            }
            let mut rows = SolutionRows::new(o);
            rows.push(&y).unwrap();
            let mut back = vec![0f32; 3 * o];
            for r in 0..3 {
                rows.for_each(r, |i, v| back[r * o + i] = v);
            }
            for (i, (&a, &b)) in back.iter().zip(&y).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0),
                    "o {o} at {i}"
                );
            }
        }
    }
}
