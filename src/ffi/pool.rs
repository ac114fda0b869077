//! The solution pool's handle (`pert_pool`) and the op calls that use it.

use super::boundary::{self, arg_mut, guard, guard_or, slice};
use super::handle::{handle, Handle};
use super::methods::{input_len, method_op, shape as rows_of, write};
use super::op::{pert_op, shape};
use super::status::pert_status;
use crate::op::PoolAddition;
use crate::pool::Pool;
use crate::shape::checked_product;
use crate::PoolLoss;
use std::sync::Arc;

/// A pool of distinct solutions of one output shape, for ops whose solver is expensive
/// (see `pert_op_set_pool`) and for the pool-based losses.
///
/// Made by `pert_pool_new`, freed by `pert_pool_free`. The pool is reference-counted: an
/// op given it by `pert_op_set_pool` holds its own reference, so the handle may be freed
/// while ops use it (the pool lives until the last of them lets it go).
///
/// Memory: at most `capacity` solutions of `output_numel` floats, plus a key of as many
/// 32-bit words for each; an addition while calls that began before it still read the
/// pool makes a copy of it for them.
/// Eviction: first in, first out. A solution the pool holds already (every entry equal,
/// -0 and +0 alike) is not added again and keeps its place; when additions take the pool
/// beyond its capacity, its oldest solutions leave first.
///
/// Threads: every function may be called from several threads at once, on one pool, and
/// while ops that use it run. Each call of an op reads the pool as it was when the call
/// began, and adds its solutions whole once it has succeeded, so results depend only on
/// the order of the calls, never on threads.
///
/// `fork()`: a child process may use a pool it inherits (read it, add to it, give it to
/// ops it makes), whatever other threads of the parent were doing with it at the fork: the
/// library's fork handlers (`pthread_atfork`, registered when the library is loaded) make
/// a fork wait until no other thread is inside a pool's critical sections (which run no
/// user code), and threads that reach one during a fork wait for it to end. The child's
/// pool is a copy: additions on either side are not seen on the other. (`_Fork()` and a
/// raw `clone` run no fork handlers: a child made so must not use the pool. A program's
/// own fork handler must not wait for a lock that another thread holds while it calls
/// into a pool, if the program registered that handler before it loaded this library.)
pub struct pert_pool {
    pub(crate) inner: Arc<Pool>,
}

handle!(pert_pool, Arc<Pool>);

/// Makes an empty pool for solutions of `output_shape` holding at most `capacity` of them.
///
/// @param output_shape  `output_rank` dimensions, each >= 1 (may be NULL when
///                      `output_rank` is 0: one scalar per solution). An op given the pool
///                      must have this output shape.
/// @param capacity      The most solutions the pool holds, >= 1.
/// @param out           Receives the new pool on success; untouched on error.
/// @return `PERT_STATUS_NULL_ARGUMENT`, `PERT_STATUS_INVALID_ARGUMENT` (a dimension < 1,
///         a rank above 64, capacity 0, capacity * output_numel * 4 bytes overflowing).
#[no_mangle]
pub unsafe extern "C" fn pert_pool_new(
    output_shape: *const i64,
    output_rank: usize,
    capacity: usize,
    out: *mut *mut pert_pool,
) -> pert_status {
    guard(|| {
        let out = unsafe { arg_mut(out, "out") }?;
        let dims = unsafe { shape(output_shape, output_rank, "output_shape") }?;
        let pool = pert_pool::boxed(Arc::new(Pool::new(&dims, capacity)?));
        *out = pool.into_raw();
        Ok(())
    })
}

/// Adds `count` solutions (`count * output_numel` floats, row-major, finite): those the
/// pool does not hold join as its newest members, each once, in the order of their last
/// occurrence in `solutions`; then its oldest members leave until it is within its
/// capacity (when more than `capacity` are new, the `capacity` that occur last stay). All
/// or nothing: on error the pool is unchanged. `count` 0 does nothing. Memory: the new
/// members, and a table of at most `capacity` rows during the call.
///
/// @return `PERT_STATUS_NULL_ARGUMENT`, `PERT_STATUS_NON_FINITE_INPUT` (naming the first
///         bad entry), `PERT_STATUS_INVALID_ARGUMENT` (sizes overflow),
///         `PERT_STATUS_TORCH_ERROR` (out of memory).
#[no_mangle]
pub unsafe extern "C" fn pert_pool_add(
    pool: *mut pert_pool,
    solutions: *const f32,
    count: usize,
) -> pert_status {
    guard(|| {
        let pool = unsafe { pert_pool::borrow(pool, "pool") }?;
        let len = checked_product(&[count, pool.output_numel()], "count * output_numel")?;
        let rows = unsafe { slice(solutions, len, "solutions") }?;
        pool.add_rows(rows)
    })
}

/// The number of solutions the pool holds now; 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_pool_size(pool: *const pert_pool) -> usize {
    guard_or(0, || unsafe { pert_pool::get(pool) }.map_or(0, |p| p.len()))
}

/// Frees the handle. NULL is accepted and ignored. Ops given the pool keep it.
#[no_mangle]
pub unsafe extern "C" fn pert_pool_free(pool: *mut pert_pool) {
    guard_or((), || {
        // SAFETY: a non-NULL pool comes from `pert_pool_new` and is freed once.
        unsafe { pert_pool::free(pool) }
    })
}

/// Gives `op` a solution pool (NULL: takes its pool away). Its `pert_forward`,
/// `pert_forward_with_tape` and `pert_fenchel_young` calls, and the perturbed samples of
/// I-MLE and AI-MLE (`pert_imle_forward` and the solves of their VJPs at the samples moved
/// by ±lambda·grad_output), then answer each perturbed sample from the pool with
/// probability 1 - solve_ratio (`pert_config_set_solve_ratio`,
/// decided by the op's own random stream: the same for any number of threads): by the
/// pool's solution y of best <x, y> for the sample's input x in the op's sense
/// (the oldest of equals). The other samples are solved.
/// The solver's solutions join the pool: a forward or Fenchel-Young call's (samples and
/// clean-input rows) once the call has succeeded. The call's row order puts the
/// clean-input rows (problem by problem) first, then the samples (problem-major; not the
/// order of a draw's inputs, where the clean rows come last), whatever thread solves them.
/// The call keeps those the pool did not
/// hold when it began, each once, the `capacity` that occur last in the call's row order
/// (by their last occurrences: the others could not stay), and adds them in that order by
/// `pert_pool_add`'s rule (one evicted or added meanwhile by another call is not added
/// again): with no other addition during the call, the pool ends as `pert_pool_add` of
/// all its solutions in row order would leave it. Its extra memory is at most capacity + 1
/// rows of output_numel floats and a few words per row, however many samples it solves.
/// I-MLE's samples join the same way, once all of a forward's or a VJP's samples are
/// solved. Those of SPO+, DBB and PG join once the whole call has succeeded, as one
/// addition of the call's solutions in order (a call that fails adds nothing); those of
/// `pert_op_solve` and of the pool losses' refreshes as each solve succeeds. While the pool is
/// empty every sample is solved. A solver told where its rows sit (`pert_op_new_ex`,
/// `pert_op_new_device`) gets each run of consecutive solved rows as a call of its own; a
/// plain callback gets a block's solved rows gathered into one call.
///
/// What the estimate then is: the mean over the samples of those answers. It is y_sigma's
/// estimate itself wherever the pool holds each answered sample's optimum y*(x) (then bit
/// for bit the result of solving them with the same op, for a solver whose tie rule is the
/// pool's; a pool moves the built-in argmax off its fused kernel, whose results differ by
/// rounding), and
/// otherwise biased towards the pool's solutions (an answer is never better than the
/// optimum). The Jacobian is estimated from the same answers.
///
/// The objective must be linear: the op's output shape equal to its input shape and to
/// the pool's output shape, and its solver a built-in or declared linear
/// (`pert_config_set_linear_objective`). Calls running keep the pool they began with.
///
/// @return `PERT_STATUS_NULL_ARGUMENT` (op), `PERT_STATUS_INVALID_ARGUMENT` (shapes differ,
///         a solver not declared linear, an op of `pert_op_new_external`).
#[no_mangle]
pub unsafe extern "C" fn pert_op_set_pool(op: *mut pert_op, pool: *mut pert_pool) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        let pool = unsafe { pert_pool::get(pool) }.cloned();
        op.set_pool(pool)
    })
}

/// The number of rows `op`'s solver has solved so far, over all its calls and threads:
/// perturbed samples (not those answered from a pool), clean-input rows, and the rows of
/// `pert_op_solve` and of the methods.
///
/// @param rows  Receives the count.
/// @return `PERT_STATUS_NULL_ARGUMENT` when `op` or `rows` is NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_op_solver_calls(op: *const pert_op, rows: *mut u64) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        let rows = unsafe { arg_mut(rows, "rows") }?;
        *rows = op.solver_rows();
        Ok(())
    })
}

/// The op's sense, from the config it was made with.
///
/// @param sense  Receives `PERT_SENSE_MAXIMIZE` or `PERT_SENSE_MINIMIZE`.
/// @return `PERT_STATUS_NULL_ARGUMENT` when `op` or `sense` is NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_op_sense(op: *const pert_op, sense: *mut u32) -> pert_status {
    guard(|| {
        let op = unsafe { pert_op::borrow(op, "op") }?;
        let sense = unsafe { arg_mut(sense, "sense") }?;
        *sense = op.config().sense() as u32;
        Ok(())
    })
}

/// One pool-based loss through the C API: checks, the loss, the outputs written.
unsafe fn pool_loss(
    loss_kind: PoolLoss,
    op: *mut pert_op,
    (pred_cost, target): (*const f32, *const f32),
    batch: usize,
    (loss, grad): (*mut f32, *mut f32),
) -> pert_status {
    guard(|| {
        let op = unsafe { method_op(op, loss_kind.name()) }?;
        let len = input_len(op, batch)?;
        let outputs = unsafe { boundary::loss_and_grad_outputs(loss, batch, (grad, len, "grad")) }?;
        let pred = unsafe { slice(pred_cost, len, "pred_cost") }?;
        let target = unsafe { slice(target, len, loss_kind.target_name()) }?;
        if batch == 0 {
            op.pool_loss_rows(loss_kind, rows_of(op, 0), &[], &[], false)?; // (the pool checked)
            return Ok(());
        }
        let (l, g) =
            op.pool_loss_rows(loss_kind, rows_of(op, batch), pred, target, !grad.is_null())?;
        write(op, &outputs, (l, g, PoolAddition::none()))
    })
}

/// The noise-contrastive estimation loss (NCE, Mulamba et al. 2021) of predicted costs
/// against true solutions w*, over the op's solution pool P (`pert_op_set_pool`), and its
/// gradient with respect to the predicted costs, per problem, as PyEPO's `NCE` (s = +1 for
/// `PERT_SENSE_MINIMIZE`, -1 for `PERT_SENSE_MAXIMIZE`):
/// loss = mean over w in P of s (<pred_cost, w*> - <pred_cost, w>),
/// grad = s (w* - mean over w in P of w).
///
/// Each call first solves the batch at pred_cost with probability solve_ratio
/// (`pert_config_set_solve_ratio`, decided by the op's own stream: the same for the same
/// sequence of calls), as `pert_op_solve` does, which adds the solutions to the pool; then
/// every problem is scored against the pool as it is. Scores are dot products summed in
/// double precision in a fixed order: the results do not depend on the number of threads.
/// The pool must hold a solution by then (seed it with the training set's true
/// solutions, `pert_pool_add`).
///
/// @param pred_cost  `batch * input_numel` floats, finite.
/// @param true_sol   `batch * input_numel` floats, finite.
/// @param batch      Number of problems. 0: nothing is written (the pool is still checked).
/// @param loss       Receives `batch` floats.
/// @param grad       Receives `batch * input_numel` floats; may be NULL. `loss` and `grad`
///                   may overlap the inputs, not each other.
/// @return `PERT_STATUS_INVALID_ARGUMENT` (no pool, an empty pool, output shape differs
///         from input shape, sizes overflow, a loss, or a gradient asked for, beyond
///         float32's range),
///         `PERT_STATUS_NULL_ARGUMENT`, `PERT_STATUS_NON_FINITE_INPUT`, and the statuses of
///         `pert_op_solve`. On error nothing is written.
#[no_mangle]
pub unsafe extern "C" fn pert_nce(
    op: *mut pert_op,
    pred_cost: *const f32,
    true_sol: *const f32,
    batch: usize,
    loss: *mut f32,
    grad: *mut f32,
) -> pert_status {
    unsafe {
        pool_loss(
            PoolLoss::Nce,
            op,
            (pred_cost, true_sol),
            batch,
            (loss, grad),
        )
    }
}

/// The contrastive MAP loss (CMAP, Mulamba et al. 2021), as `pert_nce` but with the
/// largest margin instead of the mean, as PyEPO's `CMAP`:
/// loss = max over w in P of s (<pred_cost, w*> - <pred_cost, w>),
/// grad = s (w* - w_max), w_max the first member of the pool that attains the maximum.
/// Parameters and statuses as `pert_nce`.
#[no_mangle]
pub unsafe extern "C" fn pert_cmap(
    op: *mut pert_op,
    pred_cost: *const f32,
    true_sol: *const f32,
    batch: usize,
    loss: *mut f32,
    grad: *mut f32,
) -> pert_status {
    unsafe {
        pool_loss(
            PoolLoss::Cmap,
            op,
            (pred_cost, true_sol),
            batch,
            (loss, grad),
        )
    }
}

/// The pointwise learning-to-rank loss (Mandi et al. 2022) of predicted costs against true
/// costs c over the op's pool P, as PyEPO's `pointwiseLTR` (no sense):
/// loss = mean over w in P of <c - pred_cost, w>^2,
/// grad = -2 mean over w in P of <c - pred_cost, w> w.
/// The refresh, the pool and the statuses as `pert_nce`; `true_cost` replaces `true_sol`.
#[no_mangle]
pub unsafe extern "C" fn pert_ltr_pointwise(
    op: *mut pert_op,
    pred_cost: *const f32,
    true_cost: *const f32,
    batch: usize,
    loss: *mut f32,
    grad: *mut f32,
) -> pert_status {
    unsafe {
        pool_loss(
            PoolLoss::LtrPointwise,
            op,
            (pred_cost, true_cost),
            batch,
            (loss, grad),
        )
    }
}

/// The pairwise learning-to-rank loss (Mandi et al. 2022) of predicted costs against true
/// costs c over the op's pool P, as PyEPO's `pairwiseLTR`: with w_b the best member of P
/// for c in the op's sense (the first of equals),
/// loss = sum over w in P of relu(s (<pred_cost, w_b> - <pred_cost, w>)) / max(|P| - 1, 1),
/// grad = s sum over the positive terms of (w_b - w), divided alike.
/// The refresh, the pool and the statuses as `pert_nce`; `true_cost` replaces `true_sol`.
#[no_mangle]
pub unsafe extern "C" fn pert_ltr_pairwise(
    op: *mut pert_op,
    pred_cost: *const f32,
    true_cost: *const f32,
    batch: usize,
    loss: *mut f32,
    grad: *mut f32,
) -> pert_status {
    unsafe {
        pool_loss(
            PoolLoss::LtrPairwise,
            op,
            (pred_cost, true_cost),
            batch,
            (loss, grad),
        )
    }
}

/// The listwise learning-to-rank loss (Mandi et al. 2022) of predicted costs against true
/// costs c over the op's pool P, as PyEPO's `listwiseLTR`: the cross-entropy
/// loss = -sum over w in P of p_w log q_w, with p = max(softmax(-s <c, w>), 1e-8) (not
/// renormalized) and q = softmax(-s <pred_cost, w>) over P;
/// grad = s sum over w of (p_w - q_w sum(p)) w.
/// The refresh, the pool and the statuses as `pert_nce`; `true_cost` replaces `true_sol`.
#[no_mangle]
pub unsafe extern "C" fn pert_ltr_listwise(
    op: *mut pert_op,
    pred_cost: *const f32,
    true_cost: *const f32,
    batch: usize,
    loss: *mut f32,
    grad: *mut f32,
) -> pert_status {
    unsafe {
        pool_loss(
            PoolLoss::LtrListwise,
            op,
            (pred_cost, true_cost),
            batch,
            (loss, grad),
        )
    }
}
