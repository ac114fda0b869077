//! The losses over a solution pool Γ (the op's, [`PerturbedOp::set_pool`]), as PyEPO 2.2
//! defines them (`pyepo.func`: `NCE`, `CMAP`, `pointwiseLTR`, `pairwiseLTR`,
//! `listwiseLTR`), with s = +1 minimizing and −1 maximizing, per problem:
//!
//! | loss | value | gradient with respect to ĉ |
//! |---|---|---|
//! | NCE (Mulamba et al. 2021) | mean over w ∈ Γ of s·(⟨ĉ, w*⟩ − ⟨ĉ, w⟩) | s·(w* − mean w) |
//! | CMAP | max over w ∈ Γ of s·(⟨ĉ, w*⟩ − ⟨ĉ, w⟩) | s·(w* − w_max), the first maximizer |
//! | pointwise LTR (Mandi et al. 2022) | mean over w of ⟨c − ĉ, w⟩² | −2·mean ⟨c − ĉ, w⟩·w |
//! | pairwise LTR | Σ over w of relu(s·(⟨ĉ, w_b⟩ − ⟨ĉ, w⟩)) / max(\|Γ\| − 1, 1), w_b the best member for c (the first) | s·Σ over the positive terms of (w_b − w), divided alike |
//! | listwise LTR | −Σ p_w·log q_w, p = max(softmax(−s⟨c, w⟩), 10⁻⁸), q = softmax(−s⟨ĉ, w⟩) | s·Σ (p_w − q_w·Σp)·w |
//!
//! As PyEPO's modules do, each call first solves the batch at ĉ with probability
//! solve_ratio (the op's, [`crate::Config::set_solve_ratio`]; decided by the op's own
//! stream of pool refreshes, so by the number of earlier such calls on the op), which
//! adds the solutions to the pool; then every problem is scored against the pool as it is.
//! The scores are [`crate::dot::dot`]'s (f64, a fixed order) and the sums run over the
//! pool in its order: the same bits for any number of threads.

use super::{Call, Rows};
use crate::dot::{dot, dot2};
use crate::error::{Error, Result};
use crate::op::PerturbedOp;
use crate::pool::Members;
use crate::settings::Sense;
use tch::Tensor;

/// A loss over the op's solution pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolLoss {
    /// Noise-contrastive estimation: the mean margin of w* over the pool (target: w*).
    Nce,
    /// Contrastive MAP: the largest margin of w* over the pool (target: w*).
    Cmap,
    /// Pointwise learning to rank: the mean squared error of the pool's objectives
    /// (target: c).
    LtrPointwise,
    /// Pairwise learning to rank: hinges of the pool's best member for c over the others
    /// (target: c).
    LtrPairwise,
    /// Listwise learning to rank: the cross-entropy of the pool's rankings (target: c).
    LtrListwise,
}

impl PoolLoss {
    /// The loss's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            PoolLoss::Nce => "NCE",
            PoolLoss::Cmap => "CMAP",
            PoolLoss::LtrPointwise => "pointwise LTR",
            PoolLoss::LtrPairwise => "pairwise LTR",
            PoolLoss::LtrListwise => "listwise LTR",
        }
    }

    /// What its target is: the true solutions w* (NCE, CMAP) or the true costs c (LTR).
    pub fn target_name(self) -> &'static str {
        match self {
            PoolLoss::Nce | PoolLoss::Cmap => "true_sol",
            _ => "true_cost",
        }
    }
}

impl PerturbedOp {
    /// The pool-based loss `loss` `[batch]` of predicted costs ĉ (`pred_cost`,
    /// `[batch, *input_shape]`) against `target` (the true solutions w* for NCE and CMAP,
    /// the true costs c for the LTR losses; the same shape), and its gradient with
    /// respect to ĉ, both on `pred_cost`'s device. The op needs a pool
    /// ([`PerturbedOp::set_pool`]) that holds a solution by then (seed it with the
    /// training set's true solutions); see [`PoolLoss`] and the module's table.
    pub fn pool_loss(
        &self,
        loss: PoolLoss,
        pred_cost: &Tensor,
        target: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (call, pred) = Call::of(self, loss.name(), pred_cost, "pred_cost")?;
        let target = call.rows(target, loss.target_name())?;
        let (l, g) = self.pool_loss_rows(loss, call.rows, &pred, &target, true)?;
        Ok((call.per_problem(&l)?, call.like_first(&g)?))
    }

    /// [`PerturbedOp::pool_loss`] on host rows (checked finite here). Without
    /// `grad_wanted` (a C caller that asks for the loss alone) the gradient is not
    /// checked: a gradient beyond float32's range fails only a call that returns it.
    pub(crate) fn pool_loss_rows(
        &self,
        loss: PoolLoss,
        rows: Rows,
        pred: &[f32],
        target: &[f32],
        grad_wanted: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.require_square(loss.name())?;
        let Some(pool) = self.pool() else {
            return Err(Error::invalid(format!(
                "{} needs the op's solution pool: give the op one (pert_op_set_pool / set_pool), seeded with solutions",
                loss.name()
            )));
        };
        rows.check_finite(pred, "pred_cost")?;
        rows.check_finite(target, loss.target_name())?;
        if rows.batch > 0 && self.pool_refresh() {
            // (to the pool this call scores against, whatever set_pool does meanwhile)
            let at = self.spec().rows_at(true, 0, rows.batch);
            pool.add_rows(&self.solve_rows_at(pred, rows.batch, at)?)?;
        }
        let members = pool.snapshot();
        if members.len() == 0 {
            return Err(Error::invalid(format!(
                "{}: the op's solution pool is empty: add solutions first (say, the training set's true solutions)",
                loss.name()
            )));
        }
        let s = match self.objective_sense() {
            Sense::Minimize => 1.0,
            Sense::Maximize => -1.0,
        };
        let mut losses = crate::tensors::host_room(rows.batch, "the loss")?;
        let mut grad = crate::tensors::host_room(pred.len(), "the gradient")?;
        let mut g = crate::tensors::host_room(rows.d, "a gradient row")?;
        g.resize(rows.d, 0.0f64);
        // NCE's gradient holds the pool's mean member, the same for every problem
        let mut mean = Vec::new();
        if loss == PoolLoss::Nce {
            mean = crate::tensors::host_room(rows.d, "the pool's mean")?;
            mean.resize(rows.d, 0.0f64);
            for j in 0..members.len() {
                add_scaled(&mut mean, 1.0 / members.len() as f64, members.member(j));
            }
        }
        // the listwise loss's scores per member
        let scores = if loss == PoolLoss::LtrListwise {
            2 * members.len()
        } else {
            0
        };
        let mut scratch = crate::tensors::host_room(scores, "the pool's scores")?;
        for i in 0..rows.batch {
            let (p, t) = (rows.row(pred, i), rows.row(target, i));
            g.fill(0.0);
            let value = match loss {
                PoolLoss::Nce => nce(&members, (p, t), s, &mean, &mut g),
                PoolLoss::Cmap => cmap(&members, (p, t), s, &mut g),
                PoolLoss::LtrPointwise => pointwise(&members, (p, t), &mut g),
                PoolLoss::LtrPairwise => pairwise(&members, (p, t), s, &mut g),
                PoolLoss::LtrListwise => listwise(&members, (p, t), s, (&mut scratch, &mut g)),
            };
            losses.push(value as f32);
            grad.extend(g.iter().map(|&v| v as f32));
        }
        rows.per_problem()
            .check_result(&losses, &format!("the {} loss", loss.name()))?;
        if grad_wanted {
            rows.check_result(&grad, &format!("the {} gradient", loss.name()))?;
        }
        Ok((losses, grad))
    }
}

/// g += a·w.
fn add_scaled(g: &mut [f64], a: f64, w: &[f32]) {
    for (g, &w) in g.iter_mut().zip(w) {
        *g += a * f64::from(w);
    }
}

/// NCE of ĉ (`p`) with true solution w* (`w`); `mean` is the pool's mean member.
fn nce(pool: &Members, (p, w): (&[f32], &[f32]), s: f64, mean: &[f64], g: &mut [f64]) -> f64 {
    let own = dot(p, w);
    let total: f64 = (0..pool.len())
        .map(|j| s * (own - dot(p, pool.member(j))))
        .sum();
    add_scaled(g, s, w);
    for (g, &m) in g.iter_mut().zip(mean) {
        *g -= s * m;
    }
    total / pool.len() as f64
}

/// CMAP of ĉ (`p`) with true solution w* (`w`).
fn cmap(pool: &Members, (p, w): (&[f32], &[f32]), s: f64, g: &mut [f64]) -> f64 {
    let own = dot(p, w);
    let mut best = (0, f64::NEG_INFINITY);
    for j in 0..pool.len() {
        let margin = s * (own - dot(p, pool.member(j)));
        if margin > best.1 {
            best = (j, margin);
        }
    }
    add_scaled(g, s, w);
    add_scaled(g, -s, pool.member(best.0));
    best.1
}

/// Pointwise LTR of ĉ (`p`) against c (`c`).
fn pointwise(pool: &Members, (p, c): (&[f32], &[f32]), g: &mut [f64]) -> f64 {
    let n = pool.len() as f64;
    let mut total = 0.0;
    for j in 0..pool.len() {
        let w = pool.member(j);
        let (cw, pw) = dot2(c, w, p, w);
        let e = cw - pw;
        total += e * e;
        add_scaled(g, -2.0 * e / n, w);
    }
    total / n
}

/// Pairwise LTR of ĉ (`p`) against c (`c`).
fn pairwise(pool: &Members, (p, c): (&[f32], &[f32]), s: f64, g: &mut [f64]) -> f64 {
    // the best member for c in the op's sense (the first of equals)
    let mut b = (0, f64::INFINITY);
    for j in 0..pool.len() {
        let score = s * dot(c, pool.member(j));
        if score < b.1 {
            b = (j, score);
        }
    }
    let best = dot(p, pool.member(b.0));
    let scale = 1.0 / (pool.len().max(2) - 1) as f64;
    let (mut total, mut positive) = (0.0, 0);
    for j in 0..pool.len() {
        let diff = s * (best - dot(p, pool.member(j)));
        if diff > 0.0 {
            total += diff;
            positive += 1;
            add_scaled(g, -s * scale, pool.member(j));
        }
    }
    add_scaled(g, s * scale * f64::from(positive), pool.member(b.0));
    total * scale
}

/// Listwise LTR of ĉ (`p`) against c (`c`); `scratch` has room for 2·|P| scores.
fn listwise(
    pool: &Members,
    (p, c): (&[f32], &[f32]),
    s: f64,
    (scratch, g): (&mut Vec<f64>, &mut [f64]),
) -> f64 {
    let n = pool.len();
    scratch.clear();
    for j in 0..n {
        let (cw, pw) = dot2(c, pool.member(j), p, pool.member(j));
        scratch.extend([-s * cw, -s * pw]); // (t_j, u_j)
    }
    let log_norm = |k: usize| {
        let m = scratch
            .iter()
            .skip(k)
            .step_by(2)
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        m + scratch
            .iter()
            .skip(k)
            .step_by(2)
            .map(|x| (x - m).exp())
            .sum::<f64>()
            .ln()
    };
    let (lt, lu) = (log_norm(0), log_norm(1));
    let target = |j: usize| (scratch[2 * j] - lt).exp().max(1e-8);
    let mass: f64 = (0..n).map(target).sum();
    let mut total = 0.0;
    for j in 0..n {
        let log_q = scratch[2 * j + 1] - lu;
        total -= target(j) * log_q;
        add_scaled(g, s * (target(j) - log_q.exp() * mass), pool.member(j));
    }
    total
}
