//! A solution pool: distinct solutions of one output shape, kept for expensive solvers.
//!
//! An op with a pool answers a share of its perturbed samples from it instead of calling
//! its solver (the best member for the sample's linear objective ⟨x, y⟩), and adds the
//! solutions its solver makes; the pool-based losses (NCE, CMAP, learning to rank) score
//! the predicted costs against its members.
//!
//! **Memory** is bounded by the capacity: at most `capacity` members of `numel` floats.
//! **Eviction**: first in, first out. A solution already in the pool is not added again
//! (solutions are equal when every entry is, -0 and +0 alike) and keeps its place; new
//! solutions join in the order of their last occurrence; when additions take the pool
//! beyond its capacity, its oldest members leave first.
//! **Sharing**: the pool is shared by reference counting ([`std::sync::Arc`]) between
//! ops, threads and the caller; every reader works on a snapshot taken at the start of
//! its call, so a call's answers never depend on what other threads
//! add while it runs, and additions are made whole, in the order given.
//! **Fork**: the pool's lock is never held at a `fork()` (the library waits for it), so a child
//! forked while other threads use the pool finds it whole and can use it.

use crate::dot::dot;
use crate::error::{Error, Result, Status};
use crate::fork_safe::ForkSafeMutex;
use crate::settings::Sense;
use hashbrown::HashTable;
use std::sync::Arc;
use tch::Tensor;

/// A pool of distinct solutions of one output shape, with a bounded capacity.
#[derive(Debug)]
pub struct Pool {
    output_shape: Vec<i64>,
    numel: usize,
    capacity: usize,
    members: ForkSafeMutex<Arc<Members>>,
}

/// The members of a pool at one moment (a snapshot: immutable once shared).
///
/// The members sit in `capacity` slots used as a ring: slots are appended until the pool
/// first fills (the oldest member in slot 0), then each new member takes the oldest one's
/// slot. Equal solutions are found through a table of slots by the solutions' hash, so no
/// copy of a member is kept besides its floats.
#[derive(Debug, Default)]
pub(crate) struct Members {
    numel: usize,
    capacity: usize,
    /// `len · numel` floats: the members' slots.
    values: Vec<f32>,
    /// The slot of the oldest member (0 until the pool first fills).
    head: usize,
    /// Every member's slot, by [`row_hash`] of its floats.
    index: HashTable<usize>,
}

/// A hash of a solution's entries as bits (-0 counted as +0): equal solutions
/// ([`same_row`]) have equal hashes.
pub(crate) fn row_hash(row: &[f32]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15_u64 ^ row.len() as u64;
    for &v in row {
        h = (h.rotate_left(5) ^ u64::from((v + 0.0).to_bits())).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    // (the table uses the top bits: mix them with the bottom ones)
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Whether two solutions are equal: every entry, -0 and +0 alike.
pub(crate) fn same_row(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x + 0.0).to_bits() == (y + 0.0).to_bits())
}

impl Pool {
    /// An empty pool for solutions of `output_shape` (every dimension > 0; empty: one
    /// value) holding at most `capacity` (≥ 1) of them.
    pub fn new(output_shape: &[i64], capacity: usize) -> Result<Pool> {
        if let Some(&bad) = output_shape.iter().find(|&&n| n <= 0) {
            return Err(Error::invalid(format!(
                "every dimension of a pool's output_shape must be > 0, got {bad} in {output_shape:?}"
            )));
        }
        let numel = crate::shape::checked_product(
            &output_shape.iter().map(|&n| n as usize).collect::<Vec<_>>(),
            "the pool's output numel",
        )?;
        if capacity == 0 {
            return Err(Error::invalid("a pool's capacity must be >= 1"));
        }
        crate::shape::checked_product(&[capacity, numel, 4], "capacity * output_numel * 4")?;
        Ok(Pool {
            output_shape: output_shape.to_vec(),
            numel,
            capacity,
            members: ForkSafeMutex::new(Arc::new(Members {
                numel,
                capacity,
                ..Members::default()
            }))?,
        })
    }

    /// The shape of each solution.
    pub fn output_shape(&self) -> &[i64] {
        &self.output_shape
    }

    /// The number of floats of each solution.
    pub fn output_numel(&self) -> usize {
        self.numel
    }

    /// The most solutions the pool holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of solutions held now.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// Whether the pool holds no solution.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The members now, as a snapshot that later additions do not change.
    pub(crate) fn snapshot(&self) -> Arc<Members> {
        self.members.with(|members| members.clone())
    }

    /// Adds the solutions `rows` (`count · output_numel` floats, finite): those the pool
    /// does not hold when the call begins join as its newest members, each once, in the
    /// order of their last occurrence in `rows`; then its oldest members leave until it is
    /// within its capacity (when more than `capacity` are new, the `capacity` that occur
    /// last stay). A row the pool held counts as held even when its member leaves in the
    /// same call (capacity 2, members [a, b], adding [c, a] gives [b, c]). All or nothing:
    /// on error the pool is unchanged. When nothing is new the pool is not touched; else
    /// it is changed in place, or on a copy while calls that began before still read it.
    /// Memory: the new members, and a table of at most `capacity` of them.
    pub fn add_rows(&self, rows: &[f32]) -> Result<()> {
        if !rows.len().is_multiple_of(self.numel) {
            return Err(Error::invalid(format!(
                "solutions must be whole rows of {} floats, got {} floats",
                self.numel,
                rows.len()
            )));
        }
        // (one vectorized pass when all are finite, as solutions checked by a call are)
        let first_bad = (!crate::input::all_finite(rows))
            .then(|| rows.iter().position(|v| !v.is_finite()))
            .flatten();
        if let Some(i) = first_bad {
            return Err(Error::new(
                Status::NonFiniteInput,
                format!(
                    "solutions[{}][{}] is {}; solutions must be finite",
                    i / self.numel,
                    i % self.numel,
                    rows[i]
                ),
            ));
        }
        // (under a lock that is never held at a fork: a child forked meanwhile finds the
        // pool whole and unlocked)
        self.members.with(|current| {
            let fresh = current.fresh(rows)?;
            if fresh.is_empty() {
                return Ok(()); // (nothing changes, nothing is copied)
            }
            // in place, unless a call still reads this version: then on a copy (no snapshot
            // is taken meanwhile: that needs the lock)
            if Arc::get_mut(current).is_none() {
                *current = Arc::new(current.try_clone()?);
            }
            let members = Arc::get_mut(current).expect("the only reference, under the lock");
            members.append(rows, &fresh)
        })
    }

    /// Adds the solutions of a tensor `[count, *output_shape]` (float32, finite).
    pub fn add(&self, solutions: &Tensor) -> Result<()> {
        let size = solutions.size();
        if size.len() != self.output_shape.len() + 1 || size[1..] != self.output_shape[..] {
            return Err(Error::invalid(format!(
                "solutions must have shape [count, {}], got {size:?}",
                self.output_shape
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        crate::input::check_floats(solutions, "solutions")?;
        self.add_rows(&crate::tensors::host_floats(solutions)?)
    }

    /// The members `[len, *output_shape]`, oldest first, on the CPU (a copy).
    pub fn solutions(&self) -> Result<Tensor> {
        let members = self.snapshot();
        let mut shape = vec![members.len() as i64];
        shape.extend_from_slice(&self.output_shape);
        let mut rows = crate::tensors::host_room(members.values.len(), "the pool's solutions")?;
        for i in 0..members.len() {
            rows.extend_from_slice(members.member(i));
        }
        Ok(crate::tensors::from_slice(&rows)?.f_reshape(&shape)?)
    }
}

impl Members {
    /// The floats of one member.
    pub(crate) fn numel(&self) -> usize {
        self.numel
    }

    /// The number of members.
    pub(crate) fn len(&self) -> usize {
        self.values.len() / self.numel.max(1)
    }

    /// The floats in slot `s`.
    fn slot(&self, s: usize) -> &[f32] {
        &self.values[s * self.numel..(s + 1) * self.numel]
    }

    /// Member `i` (0: the oldest).
    pub(crate) fn member(&self, i: usize) -> &[f32] {
        let len = self.len();
        let s = self.head + i;
        self.slot(if s >= len { s - len } else { s })
    }

    /// Whether the pool holds `row` (whose [`row_hash`] is `hash`).
    pub(crate) fn holds(&self, row: &[f32], hash: u64) -> bool {
        self.index
            .find(hash, |&s| same_row(self.slot(s), row))
            .is_some()
    }

    /// The best member for the linear objective ⟨x, y⟩ in `sense` (the first of equals:
    /// the oldest), None when empty. The scores are [`dot`]'s, so the choice is the same
    /// on every machine and thread count.
    pub(crate) fn best(&self, x: &[f32], sense: Sense) -> Option<&[f32]> {
        let mut best: Option<(usize, f64)> = None;
        for i in 0..self.len() {
            let score = dot(x, self.member(i));
            let better = match (best, sense) {
                (None, _) => true,
                (Some((_, b)), Sense::Minimize) => score < b,
                (Some((_, b)), Sense::Maximize) => score > b,
            };
            if better {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| self.member(i))
    }

    /// A copy, or TORCH_ERROR when there is no memory for it.
    fn try_clone(&self) -> Result<Members> {
        let mut values = Vec::new();
        values
            .try_reserve_exact(self.values.len())
            .map_err(|_| room(self.values.len()))?;
        values.extend_from_slice(&self.values);
        let numel = self.numel;
        let hash_of = |&s: &usize| row_hash(&values[s * numel..(s + 1) * numel]);
        let mut index = HashTable::new();
        index
            .try_reserve(self.len(), hash_of)
            .map_err(|_| room(self.values.len()))?;
        for s in 0..self.len() {
            index.insert_unique(hash_of(&s), s, hash_of);
        }
        Ok(Members {
            numel,
            capacity: self.capacity,
            values,
            head: self.head,
            index,
        })
    }

    /// The rows of `rows` (whole rows) that the members do not hold, each once, in the
    /// order of their last occurrence, and at most `capacity` of them (those that occur
    /// last): their row numbers, ascending, with their [`row_hash`] (TORCH_ERROR when
    /// there is no memory for them).
    pub(crate) fn fresh(&self, rows: &[f32]) -> Result<Vec<(usize, u64)>> {
        let numel = self.numel;
        let row = |r: usize| &rows[r * numel..(r + 1) * numel];
        let most = (rows.len() / numel).min(self.capacity);
        let mut picked = Vec::new();
        picked.try_reserve_exact(most).map_err(|_| room(most))?;
        let mut seen = HashTable::new();
        seen.try_reserve(most, |&r: &usize| row_hash(row(r)))
            .map_err(|_| room(most))?;
        for r in (0..rows.len() / numel).rev() {
            if picked.len() == most {
                break;
            }
            let (y, hash) = (row(r), row_hash(row(r)));
            if self.holds(y, hash) {
                continue;
            }
            if let hashbrown::hash_table::Entry::Vacant(slot) =
                seen.entry(hash, |&q| same_row(row(q), y), |&q| row_hash(row(q)))
            {
                slot.insert(r); // (room reserved: no allocation)
                picked.push((r, hash));
            }
        }
        picked.reverse();
        Ok(picked)
    }

    /// Appends the rows `picked` of `rows` (rows not held, distinct, at most `capacity`,
    /// with their hashes),
    /// each new member taking the oldest one's slot once the pool is full. The room is
    /// reserved first: on error nothing has changed.
    fn append(&mut self, rows: &[f32], picked: &[(usize, u64)]) -> Result<()> {
        let numel = self.numel;
        let len = self.len();
        let grow = (len + picked.len()).min(self.capacity) - len;
        if self.values.capacity() < (len + grow) * numel {
            // (doubling, never beyond the capacity)
            let slots = (len + grow).max((2 * len).min(self.capacity));
            self.values
                .try_reserve_exact(slots * numel - self.values.len())
                .map_err(|_| room(slots * numel))?;
        }
        {
            let values = &self.values;
            // inserts use up this room; removals never take it back: no allocation below
            self.index
                .try_reserve(picked.len(), |&s| {
                    row_hash(&values[s * numel..(s + 1) * numel])
                })
                .map_err(|_| room(self.values.len() + picked.len() * numel))?;
        }
        for &(r, hash) in picked {
            let y = &rows[r * numel..(r + 1) * numel];
            let s = if self.len() < self.capacity {
                self.values.extend_from_slice(y);
                self.len() - 1
            } else {
                let s = self.head;
                let old = row_hash(self.slot(s));
                if let Ok(entry) = self.index.find_entry(old, |&q| q == s) {
                    entry.remove();
                }
                self.values[s * numel..(s + 1) * numel].copy_from_slice(y);
                self.head = (s + 1) % self.capacity;
                s
            };
            let values = &self.values;
            self.index
                .insert_unique(hash, s, |&q| row_hash(&values[q * numel..(q + 1) * numel]));
        }
        Ok(())
    }
}

/// TORCH_ERROR: no memory for a pool of `floats` floats.
fn room(floats: usize) -> Error {
    Error::new(
        Status::TorchError,
        format!("cannot allocate {} bytes for the pool", 4 * floats),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The members, oldest first.
    fn rows(m: &Members) -> Vec<f32> {
        (0..m.len()).flat_map(|i| m.member(i).to_vec()).collect()
    }

    #[test]
    fn distinct_members_first_in_first_out() {
        let pool = Pool::new(&[2], 3).unwrap();
        pool.add_rows(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, -0.0, 1.0])
            .unwrap();
        // [1, 0] twice, [0, 1] and [-0, 1] equal: by their last occurrences
        assert_eq!(rows(&pool.snapshot()), [1.0, 0.0, -0.0, 1.0]);
        pool.add_rows(&[2.0, 2.0, 3.0, 3.0]).unwrap();
        assert_eq!(pool.len(), 3);
        let m = pool.snapshot();
        assert_eq!(rows(&m), [-0.0, 1.0, 2.0, 2.0, 3.0, 3.0]); // [1, 0] left first
        pool.add_rows(&[4.0, 4.0]).unwrap();
        assert_eq!(
            rows(&m),
            [-0.0, 1.0, 2.0, 2.0, 3.0, 3.0],
            "an old snapshot does not change"
        );
        assert_eq!(rows(&pool.snapshot()), [2.0, 2.0, 3.0, 3.0, 4.0, 4.0]);
        // more new rows than the capacity: the capacity that occur last, the ring wraps
        pool.add_rows(&[5.0, 5.0, 6.0, 6.0, 5.0, 5.0, 7.0, 7.0, 8.0, 8.0])
            .unwrap();
        assert_eq!(rows(&pool.snapshot()), [5.0, 5.0, 7.0, 7.0, 8.0, 8.0]);
        pool.add_rows(&[9.0, 9.0, 7.0, 7.0]).unwrap();
        assert_eq!(rows(&pool.snapshot()), [7.0, 7.0, 8.0, 8.0, 9.0, 9.0]);
        let m = pool.snapshot();
        for (i, r) in [[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]].iter().enumerate() {
            assert!(m.holds(r, row_hash(r)), "member {i} found by its hash");
        }
        assert!(
            !m.holds(&[5.0, 5.0], row_hash(&[5.0, 5.0])),
            "a member that left"
        );
        assert_eq!(m.index.len(), 3);
    }

    #[test]
    fn a_held_row_counts_as_held_even_when_it_leaves_and_nothing_new_copies_nothing() {
        let pool = Pool::new(&[1], 2).unwrap();
        pool.add_rows(&[1.0, 2.0]).unwrap();
        let before = pool.snapshot();
        pool.add_rows(&[2.0, 1.0, -0.0 + 1.0]).unwrap();
        assert!(
            Arc::ptr_eq(&before, &pool.snapshot()),
            "nothing new: the same version"
        );
        pool.add_rows(&[3.0, 1.0]).unwrap();
        assert_eq!(rows(&pool.snapshot()), [2.0, 3.0]);
        assert_eq!(
            rows(&before),
            [1.0, 2.0],
            "a call's snapshot keeps its version"
        );
        drop(before);
        let unshared = Arc::as_ptr(&pool.snapshot());
        pool.add_rows(&[4.0]).unwrap();
        assert_eq!(
            Arc::as_ptr(&pool.snapshot()),
            unshared,
            "changed in place when no call reads it"
        );
        assert_eq!(rows(&pool.snapshot()), [3.0, 4.0]);
        let copy = pool.snapshot().try_clone().unwrap();
        assert_eq!(rows(&copy), [3.0, 4.0]);
        assert!(copy.holds(&[3.0], row_hash(&[3.0])) && copy.holds(&[4.0], row_hash(&[4.0])));
    }

    #[test]
    fn best_member_by_sense_and_ties_to_the_oldest() {
        let pool = Pool::new(&[3], 3).unwrap();
        pool.add_rows(&[9.0, 9.0, 9.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
            .unwrap();
        // the ring wraps: the oldest member sits in slot 1
        pool.add_rows(&[0.0, 0.0, 1.0]).unwrap();
        let m = pool.snapshot();
        assert_eq!(m.head, 1);
        assert_eq!(
            m.best(&[3.0, 1.0, 2.0], Sense::Minimize),
            Some(&[0.0, 1.0, 0.0][..])
        );
        assert_eq!(
            m.best(&[3.0, 1.0, 2.0], Sense::Maximize),
            Some(&[1.0, 0.0, 0.0][..])
        );
        assert_eq!(
            m.best(&[1.0, 1.0, 1.0], Sense::Maximize),
            Some(&[1.0, 0.0, 0.0][..])
        );
        assert_eq!(
            Pool::new(&[3], 1)
                .unwrap()
                .snapshot()
                .best(&[1.0; 3], Sense::Minimize),
            None
        );
    }

    #[test]
    fn bad_rows_change_nothing() {
        let pool = Pool::new(&[2], 4).unwrap();
        pool.add_rows(&[1.0, 2.0]).unwrap();
        let e = pool.add_rows(&[5.0, 6.0, f32::NAN, 1.0]).unwrap_err();
        assert_eq!(e.status(), Status::NonFiniteInput);
        assert!(e.message().contains("solutions[1][0] is NaN"), "{e}");
        assert!(pool.add_rows(&[1.0, 2.0, 3.0]).is_err());
        assert_eq!(pool.len(), 1);
        assert!(Pool::new(&[2, 0], 4).is_err());
        assert!(Pool::new(&[2], 0).is_err());
        assert!(Pool::new(&[1 << 40, 1 << 40], 1 << 20).is_err());
    }
}
