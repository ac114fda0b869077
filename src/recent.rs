//! The solutions a call adds to its pool, kept within the pool's capacity ([`Recent`]).
//!
//! A call offers its solved rows with their places in the call, in any order (blocks end
//! on any thread, in any order). What the pool would gain from all of them in the call's
//! order ([`crate::pool::Pool::add_rows`]) is the `capacity` distinct rows that occur
//! last: a row with `capacity` distinct others after its last occurrence can never be
//! among them. So at most `capacity` rows are kept at any time (capacity + 1 slots of
//! floats, and a table and a heap of a few words per row), whatever the number of rows
//! offered, and the result does not depend on the order of the offers.

use crate::error::{Error, Result, Status};
use crate::pool::{row_hash, same_row};
use hashbrown::HashTable;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A row's place in a call: the clean-input baseline's rows first (0, problem), then the
/// samples (1, row).
pub(crate) type Place = (u8, u64);

/// No row's place (a free slot's).
const NOWHERE: Place = (u8::MAX, u64::MAX);

/// The distinct rows offered whose last occurrences are the `capacity` latest.
#[derive(Debug)]
pub(crate) struct Recent {
    numel: usize,
    capacity: usize,
    /// Slots of `numel` floats (at most capacity + 1), each a kept row as it occurs last.
    values: Vec<f32>,
    /// Each slot's place (the last occurrence seen), [`NOWHERE`] when free.
    places: Vec<Place>,
    /// Free slots.
    free: Vec<usize>,
    /// The kept rows' slots, by [`row_hash`].
    index: HashTable<usize>,
    /// Slots by place, the earliest on top; an entry whose place is no longer its slot's
    /// is stale (skipped, and dropped when the heap grows).
    order: BinaryHeap<Reverse<(Place, usize)>>,
}

impl Recent {
    /// Nothing kept yet, for rows of `numel` floats and a pool of `capacity`.
    pub(crate) fn new(numel: usize, capacity: usize) -> Recent {
        Recent {
            numel,
            capacity,
            values: Vec::new(),
            places: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            order: BinaryHeap::new(),
        }
    }

    fn slot(&self, s: usize) -> &[f32] {
        &self.values[s * self.numel..(s + 1) * self.numel]
    }

    /// Offers `row` (whose [`row_hash`] is `hash`) at `place` (each place offered once).
    pub(crate) fn offer(&mut self, place: Place, row: &[f32], hash: u64) -> Result<()> {
        let numel = self.numel;
        if let Some(&s) = self.index.find(hash, |&s| same_row(self.slot(s), row)) {
            if place > self.places[s] {
                self.push_order(place, s)?;
                self.places[s] = place;
                self.values[s * numel..(s + 1) * numel].copy_from_slice(row);
            }
            return Ok(());
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = self.places.len();
                // room for twice the slots, never beyond capacity + 1 (each checked: an
                // earlier failure may have left one short)
                let more = s.max(1).min(self.capacity + 1 - s);
                if self.free.capacity() < s + 1 {
                    let len = self.free.len();
                    self.free
                        .try_reserve_exact(s + more - len)
                        .map_err(|_| no_room())?;
                }
                if self.values.capacity() < (s + 1) * numel {
                    self.values
                        .try_reserve_exact(more * numel)
                        .map_err(|_| no_room())?;
                }
                if self.places.capacity() == s {
                    self.places.try_reserve_exact(more).map_err(|_| no_room())?;
                }
                self.values.resize((s + 1) * numel, 0.0);
                self.places.push(NOWHERE);
                s
            }
        };
        let values = &self.values;
        let reserved = self
            .index
            .try_reserve(1, |&q| row_hash(&values[q * numel..(q + 1) * numel]));
        if reserved.is_err() || self.push_order(place, s).is_err() {
            self.free.push(s); // (room reserved when the slot was made)
            return Err(no_room());
        }
        self.places[s] = place;
        self.values[s * numel..(s + 1) * numel].copy_from_slice(row);
        let values = &self.values;
        self.index
            .insert_unique(hash, s, |&q| row_hash(&values[q * numel..(q + 1) * numel]));
        if self.index.len() > self.capacity {
            self.forget_earliest();
        }
        Ok(())
    }

    /// Notes slot `s` at `place` in the order (dropping stale entries first when the heap
    /// has grown to twice the rows kept).
    fn push_order(&mut self, place: Place, s: usize) -> Result<()> {
        if self.order.len() >= 2 * self.index.len() + 8 {
            let places = &self.places;
            self.order.retain(|Reverse((p, q))| places[*q] == *p);
        }
        self.order.try_reserve(1).map_err(|_| no_room())?;
        self.order.push(Reverse((place, s)));
        Ok(())
    }

    /// Forgets the kept row whose last occurrence is the earliest.
    fn forget_earliest(&mut self) {
        while let Some(Reverse((place, s))) = self.order.pop() {
            if self.places[s] != place {
                continue; // stale
            }
            let hash = row_hash(self.slot(s));
            if let Ok(entry) = self.index.find_entry(hash, |&q| q == s) {
                entry.remove();
            }
            self.places[s] = NOWHERE;
            self.free.push(s); // (room reserved when the slot was made)
            return;
        }
    }

    /// Appends the rows kept to `rows`, in the order of their last occurrences.
    pub(crate) fn append_to(&self, rows: &mut Vec<f32>) -> Result<()> {
        let mut kept = Vec::new();
        kept.try_reserve_exact(self.index.len())
            .map_err(|_| no_room())?;
        kept.extend(
            (0..self.places.len())
                .filter(|&s| self.places[s] != NOWHERE)
                .map(|s| (self.places[s], s)),
        );
        kept.sort_unstable();
        rows.try_reserve(kept.len() * self.numel)
            .map_err(|_| no_room())?;
        for &(_, s) in &kept {
            rows.extend_from_slice(self.slot(s));
        }
        Ok(())
    }
}

/// TORCH_ERROR: no memory for the solutions a call keeps for its pool.
fn no_room() -> Error {
    Error::new(
        Status::TorchError,
        "cannot allocate the solutions a call adds to its pool",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the pool would gain from `rows` in order: the distinct rows by last
    /// occurrence, the last `capacity` of them.
    fn by_hand(rows: &[[f32; 2]], capacity: usize) -> Vec<f32> {
        let mut last: Vec<(usize, [f32; 2])> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            last.retain(|(_, q)| !same_row(q, r));
            last.push((i, *r));
        }
        let skip = last.len().saturating_sub(capacity);
        last.iter().skip(skip).flat_map(|(_, r)| *r).collect()
    }

    #[test]
    fn the_latest_distinct_rows_whatever_the_order_of_the_offers() {
        // rows from a small set (many repeats, -0 and +0), offered in several orders
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for capacity in [1, 2, 3, 5, 40] {
            for _ in 0..if cfg!(miri) { 3 } else { 20 } {
                let rows: Vec<[f32; 2]> = (0..60)
                    .map(|_| {
                        let v = next();
                        let zero = if v & 64 == 0 { 0.0 } else { -0.0 };
                        [(v % 7) as f32, if v & 8 == 0 { zero } else { 1.0 }]
                    })
                    .collect();
                let want = by_hand(&rows, capacity);
                let mut order: Vec<usize> = (0..rows.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, next() as usize % (i + 1));
                }
                let mut recent = Recent::new(2, capacity);
                for &i in &order {
                    let place = (u8::from(i >= 10), i as u64);
                    recent.offer(place, &rows[i], row_hash(&rows[i])).unwrap();
                    assert!(recent.index.len() <= capacity);
                    assert!(recent.places.len() <= capacity + 1);
                    assert!(recent.order.len() <= 2 * (capacity + 1) + 9);
                    assert!(recent.values.capacity() <= (capacity + 1) * 2);
                }
                let mut got = Vec::new();
                recent.append_to(&mut got).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "capacity {capacity}");
            }
        }
    }
}
