//! A solution pool: distinct solutions of one output shape, kept for expensive solvers.
//!
//! An op with a pool answers a share of its perturbed samples from it instead of calling
//! its solver (the best member for the sample's linear objective ⟨x, y⟩), and adds the
//! solutions its solver makes; the pool-based losses (NCE, CMAP, learning to rank) score
//! the predicted costs against its members.
//!
//! **Memory** is bounded by the capacity: at most `capacity` members of `numel` floats.
//! **Eviction**: first in, first out. A solution already in the pool is not added again
//! (solutions are equal when every entry is, -0 and +0 alike) and keeps its place; when
//! additions take the pool beyond its capacity, its oldest members leave first.
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
use std::collections::HashSet;
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
#[derive(Debug, Clone, Default)]
pub(crate) struct Members {
    numel: usize,
    /// `len · numel` floats, oldest member first.
    values: Vec<f32>,
    /// Each member's entries as bits (-0 as +0), to find equal solutions.
    keys: HashSet<Box<[u32]>>,
}

/// A solution's entries as bits, -0 counted as +0 (TORCH_ERROR when there is no memory).
fn key(row: &[f32]) -> Result<Box<[u32]>> {
    let mut bits = Vec::new();
    bits.try_reserve_exact(row.len())
        .map_err(|_| room(row.len()))?;
    bits.extend(row.iter().map(|&v| (v + 0.0).to_bits()));
    Ok(bits.into_boxed_slice())
}

/// [`key`] into `bits` (a buffer with room for the row: no allocation), for lookups.
fn key_into<'b>(row: &[f32], bits: &'b mut Vec<u32>) -> &'b [u32] {
    bits.clear();
    bits.extend(row.iter().map(|&v| (v + 0.0).to_bits()));
    bits
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
    /// does not hold when the call begins, each once, join as its newest members in the
    /// order given; then its oldest members leave until it is within its capacity (when
    /// more than `capacity` are new, the last `capacity` of them stay). A row the pool
    /// held counts as held even when its member leaves in the same call (capacity 2,
    /// members [a, b], adding [c, a] gives [b, c]). All or nothing: on error the pool is
    /// unchanged. When nothing is new the pool is not touched; else it is changed in place,
    /// or on a copy while calls that began before still read it.
    pub fn add_rows(&self, rows: &[f32]) -> Result<()> {
        if !rows.len().is_multiple_of(self.numel) {
            return Err(Error::invalid(format!(
                "solutions must be whole rows of {} floats, got {} floats",
                self.numel,
                rows.len()
            )));
        }
        if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
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
            members.append(fresh, self.capacity)
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
        Ok(crate::tensors::from_slice(&members.values)?.f_reshape(&shape)?)
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

    /// Member `i`.
    pub(crate) fn member(&self, i: usize) -> &[f32] {
        &self.values[i * self.numel..(i + 1) * self.numel]
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
        let mut keys = HashSet::new();
        keys.try_reserve(self.keys.len())
            .map_err(|_| room(self.values.len()))?;
        for k in &self.keys {
            let mut copy = Vec::new();
            copy.try_reserve_exact(k.len()).map_err(|_| room(k.len()))?;
            copy.extend_from_slice(k);
            keys.insert(copy.into_boxed_slice());
        }
        Ok(Members {
            numel: self.numel,
            values,
            keys,
        })
    }

    /// The rows of `rows` (whole rows) that the members do not hold, each once, in order
    /// (TORCH_ERROR when there is no memory for them).
    pub(crate) fn fresh(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let numel = self.numel;
        let mut fresh: Vec<f32> = Vec::new();
        let mut seen = HashSet::new();
        seen.try_reserve(rows.len() / numel)
            .map_err(|_| room(rows.len()))?;
        for row in rows.chunks_exact(numel) {
            let k = key(row)?;
            if self.keys.contains(&k) || !seen.insert(k) {
                continue;
            }
            fresh
                .try_reserve(numel)
                .map_err(|_| room(fresh.len() + numel))?;
            fresh.extend_from_slice(row);
        }
        Ok(fresh)
    }

    /// Appends `fresh` (rows not held, distinct), then lets the oldest leave down to
    /// `capacity`. The room is reserved first: on error nothing has changed.
    fn append(&mut self, fresh: Vec<f32>, capacity: usize) -> Result<()> {
        let numel = self.numel;
        let new = fresh.len() / numel;
        let leaving = (self.len() + new).saturating_sub(capacity);
        let old_leaving = leaving.min(self.len());
        let fresh_leaving = leaving - old_leaving;
        let staying = new - fresh_leaving;
        self.values
            .try_reserve(staying * numel)
            .map_err(|_| room(self.values.len() + staying * numel))?;
        self.keys
            .try_reserve(staying)
            .map_err(|_| room(self.values.len() + staying * numel))?;
        // every allocation before the first change (the new keys, a lookup buffer)
        let mut new_keys = Vec::new();
        new_keys
            .try_reserve_exact(staying)
            .map_err(|_| room(staying * numel))?;
        for row in fresh.chunks_exact(numel).skip(fresh_leaving) {
            new_keys.push(key(row)?);
        }
        let mut bits = Vec::new();
        bits.try_reserve_exact(numel).map_err(|_| room(numel))?;
        for i in 0..old_leaving {
            let k = key_into(&self.values[i * numel..(i + 1) * numel], &mut bits);
            self.keys.remove(k);
        }
        self.values.drain(..old_leaving * numel);
        self.values
            .extend_from_slice(&fresh[fresh_leaving * numel..]);
        self.keys.extend(new_keys);
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

    #[test]
    fn distinct_members_first_in_first_out() {
        let pool = Pool::new(&[2], 3).unwrap();
        pool.add_rows(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, -0.0, 1.0])
            .unwrap();
        assert_eq!(pool.len(), 2); // [1, 0] twice, [0, 1] and [-0, 1] equal
        pool.add_rows(&[2.0, 2.0, 3.0, 3.0]).unwrap();
        assert_eq!(pool.len(), 3);
        let m = pool.snapshot();
        assert_eq!(m.values, &[0.0, 1.0, 2.0, 2.0, 3.0, 3.0]); // [1, 0] left first
                                                               // an old snapshot does not change
        pool.add_rows(&[4.0, 4.0]).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(pool.snapshot().member(0), &[2.0, 2.0]);
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
        assert_eq!(pool.snapshot().values, [2.0, 3.0]);
        assert_eq!(
            before.values,
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
        assert_eq!(pool.snapshot().values, [3.0, 4.0]);
    }

    #[test]
    fn best_member_by_sense_and_ties_to_the_oldest() {
        let pool = Pool::new(&[3], 10).unwrap();
        pool.add_rows(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
            .unwrap();
        let m = pool.snapshot();
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
