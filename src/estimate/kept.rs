//! What a tape keeps, and the whole policy that decides it: the form by sizes
//! ([`TapeForm::choose`], checked against the config's limit by [`tape_form`]), samples as
//! tensors or as solutions (by the call's path: [`keeps_solutions`]), and how many scores
//! a tape of solutions keeps ([`kept_scores`]). [`Kept`] is the one name for the data,
//! from the first sample a call adds to the last product a tape makes.

use crate::error::{Error, Result};
use crate::estimate::centering::Centering;
use crate::estimate::replay::Replay;
pub use crate::settings::TapeForm;
use crate::tuning::KEEP_SCORES_BYTES;
use tch::Tensor;

impl TapeForm {
    /// The form for N samples of problems with d inputs and o outputs, and its size in
    /// floats per problem. Accumulating the sums costs o·d per sample where keeping the
    /// samples costs o + d, so the samples are kept while they take at most twice the
    /// memory of the sums; past that the sums win (their size does not grow with N).
    /// `limit` (floats per problem, 0: none) rules out a form that does not fit.
    pub fn choose(n: usize, d: usize, o: usize, limit: u128) -> (TapeForm, u128) {
        let sums = o as u128 * d as u128;
        let samples = n as u128 * (o as u128 + d as u128);
        let fits = |size: u128| limit == 0 || size <= limit;
        if samples <= 2 * sums && fits(samples) || !fits(sums) && samples < sums {
            (TapeForm::Samples, samples)
        } else {
            (TapeForm::Sums, sums)
        }
    }
}

/// The form of a call's tape for `batch` problems of N samples, d inputs and o outputs,
/// checked against the config's `max_tape_bytes` (0: no limit): INVALID_ARGUMENT when
/// the tape would not fit, or could not be addressed. A form `forced` by the config
/// (hidden: for tests of every form) replaces the choice.
pub(crate) fn tape_form(
    n: usize,
    d: usize,
    o: usize,
    batch: usize,
    (limit, forced): (u64, Option<TapeForm>),
) -> Result<TapeForm> {
    let per_problem = u128::from(limit) / 4 / (batch.max(1) as u128);
    let (chosen, floats) =
        TapeForm::choose(n, d, o, if limit == 0 { 0 } else { per_problem.max(1) });
    let (form, floats) = match forced {
        Some(TapeForm::Sums) => (TapeForm::Sums, o as u128 * d as u128),
        Some(TapeForm::Samples) => (TapeForm::Samples, n as u128 * (o as u128 + d as u128)),
        None => (chosen, floats),
    };
    let bytes = floats.saturating_mul(batch as u128).saturating_mul(4);
    if limit > 0 && bytes > u128::from(limit) {
        return Err(Error::invalid(format!(
            "the tape needs {bytes} bytes (batch {batch}, {floats} floats per problem), above max_tape_bytes {limit}"
        )));
    }
    if bytes > i64::MAX as u128 {
        return Err(Error::invalid(format!(
            "the tape would need {bytes} bytes, more than can be addressed"
        )));
    }
    Ok(form)
}

/// Whether a tape of samples keeps the samples' solutions (and draws their scores again
/// when they are too large to keep): on the CPU's host paths, whose noise the tape can
/// draw again bit for bit, for outputs whose indices fit in 32 bits. Elsewhere it keeps
/// Y_n and s_n as tensors.
pub(crate) fn keeps_solutions(host_path: bool, o: usize) -> bool {
    host_path && u32::try_from(o).is_ok()
}

/// Room (an empty buffer) for the scores `[batch, n, d]` of a tape of solutions, when they
/// take at most [`KEEP_SCORES_BYTES`], the tape still fits in `max_tape_bytes` (0: no
/// limit) whatever its solutions take (dense rows of `o` values and their ends, the
/// center), and memory allows; else None (they are drawn again).
pub(crate) fn kept_scores(
    batch: usize,
    n: usize,
    (d, o): (usize, usize),
    max_tape_bytes: u64,
) -> Option<Vec<f32>> {
    let len = batch.checked_mul(n)?.checked_mul(d)?;
    if len == 0 || len.checked_mul(4)? > KEEP_SCORES_BYTES {
        return None;
    }
    if max_tape_bytes > 0 {
        // scores, dense rows with their 8-byte ends, center and column scale, objective
        let rows = batch.checked_mul(n)?;
        let floats = len
            .checked_add(rows.checked_mul(o.checked_add(2)?)?)?
            .checked_add(batch.checked_mul(o.checked_add(d)?.checked_add(2)?)?)?;
        if floats.checked_mul(4)? as u64 > max_tape_bytes {
            return None;
        }
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    Some(v)
}

/// What a tape keeps for the Jacobian, J = scale · Σ_n (Y_n − center) s_nᵀ ⊙ col_scale
/// per problem: filled while a call accumulates, then completed by the accumulator's
/// finish (which makes J of the sums, and sets the centering of the samples).
#[derive(Debug)]
pub(crate) enum Kept {
    /// `[batch, o, d]` float32: Σ Y_n s_nᵀ while accumulating, J itself after the finish
    /// (made in place).
    Sums(Tensor),
    /// Y_n `[batch, N, o]` and s_n `[batch, N, d]` as tensors on the op's device (CUDA
    /// ops, and CPU ops on the chunk pipeline).
    Samples {
        y: Tensor,
        s: Tensor,
        centering: Centering<Tensor>,
    },
    /// The samples' solutions, and their scores when small enough to keep (else drawn
    /// again): CPU tapes of the host paths (see [`crate::estimate::replay`]).
    Solutions(Replay),
}

impl Kept {
    /// The form this is.
    pub fn form(&self) -> TapeForm {
        match self {
            Kept::Sums(_) => TapeForm::Sums,
            Kept::Samples { .. } | Kept::Solutions(_) => TapeForm::Samples,
        }
    }
}
