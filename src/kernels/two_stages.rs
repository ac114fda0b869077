//! Blocks in two stages and a tail on two threads ([`run_two_stages`]): a helper prepares
//! each block, the calling thread solves it (a solver that must stay on that thread), and
//! the block is finished, in block order, on whichever of the two has time for it.

use super::blocks::{with_helpers, Panic};
use crate::tuning::TWO_STAGE_SPIN;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

/// Runs blocks `0 .. blocks` in two stages and a tail: `prepare(k, buffer, idle)` on one
/// helper thread, `solve(k, buffer, prepared)` on the calling thread in block order, then
/// `finish(k, buffer, solved)` in block order: on the calling thread until the helper is
/// first seen ahead (the block was ready, the helper waiting for work), then on the helper
/// (before it prepares the next block in that buffer); the helper one block ahead (two
/// buffers pass between the threads). The same results as `prepare`, `solve` then `finish` for each block in turn
/// on one thread; for work whose middle stage must stay on the calling thread (a solver
/// that is not thread-safe) while the rest runs on another core. `idle()` tells `prepare`
/// whether the calling thread is waiting for a block at that moment, so that work which
/// either stage may do goes where there is time for it (it must not change the results).
/// The first error in block order is returned (no later block is finished, the helper
/// stops; a failed finish on the helper stops the solves, but for the one that may be
/// running then); a panic of any stage is resumed here once the helper has ended. Without
/// a free shared helper a thread of the call's own prepares and finishes.
pub(crate) fn run_two_stages<S: Send, P: Send, Q: Send, E: Send>(
    blocks: usize,
    buffers: &mut [S; 2],
    prepare: impl Fn(usize, &mut S, &dyn Fn() -> bool) -> P + Sync,
    mut solve: impl FnMut(usize, &mut S, P) -> Result<Q, E>,
    finish: impl FnMut(usize, &mut S, Q) -> Result<(), E> + Send,
) -> Result<(), E> {
    let panicked: Mutex<Option<Panic>> = Mutex::new(None);
    // whether the calling thread waits for the helper's next block (a hint: relaxed)
    let waiting = AtomicBool::new(false);
    // the helper's first error (it stops there), and `finish`, which the helper calls (or
    // this thread, when no helper starts)
    let failed: Mutex<Option<(usize, E)>> = Mutex::new(None);
    let finish = Mutex::new(finish);
    let stages = Stages {
        prepare: &prepare,
        finish: &finish,
        failed: &failed,
        panicked: &panicked,
        waiting: &waiting,
        helper_idle: AtomicBool::new(false),
        finished: AtomicUsize::new(0),
        stopped: AtomicBool::new(false),
    };
    let outcome = with_helpers!(1, |spawn| two_stages(
        spawn,
        blocks,
        &mut *buffers,
        &stages,
        &mut solve
    ));
    let finished = stages.finished.load(Ordering::Acquire);
    if let Some(payload) = panicked.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(payload);
    }
    // the first error in block order: the helper's (a finish, always of an earlier block
    // than the solve running meanwhile) or this thread's
    let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    match (failed, outcome) {
        (Some((j, e)), Err((k, _))) if j < k => Err(e),
        (_, Err((_, e))) => Err(e),
        (Some((_, e)), Ok(())) => Err(e),
        (None, Ok(())) => {
            // (a run that ends with blocks not finished and no error is a bug of this
            // module: the callers read what the finishes wrote)
            assert_eq!(
                finished, blocks,
                "a two-stage run ended with blocks not finished and no error"
            );
            Ok(())
        }
    }
}

/// The next message of `receive`, looked for during [`TWO_STAGE_SPIN`] before waiting
/// (the two stages hand blocks over faster than a thread wakes up); None once every sender
/// is gone.
fn spin_recv<T>(receive: &mpsc::Receiver<T>) -> Option<T> {
    super::workers::recv_after_spin(receive, TWO_STAGE_SPIN, std::hint::spin_loop)
}

/// The first stage of [`run_two_stages`]: `prepare(k, buffer, idle)`.
type Prepare<'a, S, P> = dyn Fn(usize, &mut S, &dyn Fn() -> bool) -> P + Sync + 'a;

/// What the helper of [`run_two_stages`] runs and reports to.
struct Stages<'a, S, P, F, E> {
    prepare: &'a Prepare<'a, S, P>,
    finish: &'a Mutex<F>,
    failed: &'a Mutex<Option<(usize, E)>>,
    panicked: &'a Mutex<Option<Panic>>,
    /// The calling thread waits for the helper's next block; the helper waits for work
    /// (hints: relaxed).
    waiting: &'a AtomicBool,
    helper_idle: AtomicBool,
    /// The blocks finished so far (all of `0 .. finished`, in order).
    finished: AtomicUsize,
    /// A finish on the helper failed (the run stops).
    stopped: AtomicBool,
}

/// The body of [`run_two_stages`]: starts the helper with `spawn` (false: it could not
/// start, and this thread prepares and finishes too) and solves the blocks here,
/// `waiting` set while this thread waits for the helper. Returns this thread's error and
/// its block.
fn two_stages<'env, S: Send, P: Send, Q: Send + 'env, E: Send, F>(
    spawn: &dyn Fn(Box<dyn FnOnce() + Send + 'env>) -> bool,
    blocks: usize,
    buffers: &'env mut [S; 2],
    stages: &'env Stages<'env, S, P, F, E>,
    solve: &mut dyn FnMut(usize, &mut S, P) -> Result<Q, E>,
) -> Result<(), (usize, E)>
where
    F: FnMut(usize, &mut S, Q) -> Result<(), E> + Send,
{
    // to the helper: the block just solved (to finish) with its buffer, and the block to
    // prepare in it next
    type Job<'b, S, Q> = (Option<(usize, Q)>, &'b mut S, Option<usize>);
    let (to_helper, for_helper) = mpsc::channel::<Job<'env, S, Q>>();
    let (to_caller, for_caller) = mpsc::channel::<(usize, &'env mut S, P)>();
    let waiting = stages.waiting;
    let idle = move || waiting.load(Ordering::Relaxed);
    let finish = |k: usize, buffer: &mut S, solved: Q| {
        let mut finish = stages.finish.lock().unwrap_or_else(|e| e.into_inner());
        (*finish)(k, buffer, solved)?;
        stages.finished.store(k + 1, Ordering::Release);
        Ok(())
    };
    let helper = move || {
        let run = || {
            // ends when the caller drops its sender (done, or failed)
            let receive = || match for_helper.try_recv() {
                Ok(job) => Some(job),
                Err(_) => {
                    stages.helper_idle.store(true, Ordering::Relaxed);
                    let job = spin_recv(&for_helper);
                    stages.helper_idle.store(false, Ordering::Relaxed);
                    job
                }
            };
            while let Some((solved, buffer, next)) = receive() {
                if let Some((k, solved)) = solved {
                    if let Err(e) = finish(k, &mut *buffer, solved) {
                        *stages.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some((k, e));
                        stages.stopped.store(true, Ordering::Release);
                        break;
                    }
                }
                let Some(next) = next else { continue };
                let prepared = (stages.prepare)(next, &mut *buffer, &idle);
                if to_caller.send((next, buffer, prepared)).is_err() {
                    break;
                }
            }
        };
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            let mut first = stages.panicked.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(payload);
        }
    };
    let [first, second] = buffers;
    if !spawn(Box::new(helper)) {
        // no helper: every stage here, block by block
        for k in 0..blocks {
            let prepared = (stages.prepare)(k, first, &|| false);
            let solved = solve(k, first, prepared).map_err(|e| (k, e))?;
            finish(k, first, solved).map_err(|e| (k, e))?;
        }
        return Ok(());
    }
    if blocks > 0 {
        let _ = to_helper.send((None, first, Some(0)));
    }
    if blocks > 1 {
        let _ = to_helper.send((None, second, Some(1)));
    }
    // whether the helper finishes the blocks
    let mut on_helper = false;
    for k in 0..blocks {
        // the helper hands the blocks over in order; none: it failed or panicked (reported
        // by the caller once it has ended)
        let (next, was_ready) = match for_caller.try_recv() {
            Ok(next) => (Some(next), true),
            Err(_) => {
                waiting.store(true, Ordering::Relaxed);
                let next = spin_recv(&for_caller);
                waiting.store(false, Ordering::Relaxed);
                (next, false)
            }
        };
        let Some((j, buffer, prepared)) = next else {
            return Ok(());
        };
        debug_assert_eq!(j, k);
        if stages.stopped.load(Ordering::Acquire) {
            return Ok(()); // the helper failed a finish: no later block is solved
        }
        // an error returns, dropping the sender: the helper finishes what it was given,
        // and prepares no more
        let solved = solve(k, buffer, prepared).map_err(|e| (k, e))?;
        // the helper finishes every block from the first time it is ahead (this block
        // was ready, and it waits for work): it wrote the block's noise and inputs, which
        // the sums read, so they cost it less than this thread (and it never holds up a
        // solver that keeps it ahead); before, this thread finishes each block (so every
        // earlier one is finished when the helper takes over). In block order either way,
        // so the same results.
        on_helper |= helper_finishes() || was_ready && stages.helper_idle.load(Ordering::Relaxed);
        let next = (k + 2 < blocks).then_some(k + 2);
        let job = if !on_helper {
            finish(k, &mut *buffer, solved).map_err(|e| (k, e))?;
            (None, buffer, next)
        } else {
            (Some((k, solved)), buffer, next)
        };
        if (job.0.is_some() || next.is_some()) && to_helper.send(job).is_err() {
            return Ok(()); // the helper ended (failed or panicked)
        }
    }
    Ok(())
}

/// Whether the helper finishes every block from the first (tests: the path that timing
/// otherwise chooses), for runs from this thread.
fn helper_finishes() -> bool {
    #[cfg(test)]
    return tests::HELPER_FINISHES.with(std::cell::Cell::get);
    #[cfg(not(test))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// See [`super::helper_finishes`].
        pub(super) static HELPER_FINISHES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A two-stage run with a slow middle stage, a slow helper, or both by turns (so that
    /// the finishes land on either thread): every block is prepared, solved and finished
    /// once, solved and finished in block order, each finished after its solve and before
    /// its buffer is prepared again.
    #[test]
    fn two_stages_finish_every_block_once_in_order_on_either_thread() {
        use std::time::Duration;
        let pause = |us: u64| std::thread::sleep(Duration::from_micros(us));
        let caller = std::thread::current().id();
        for (slow_solve, slow_prepare, forced) in [
            (true, false, false),
            (false, true, false),
            (true, true, false),
            (false, true, true),
        ] {
            HELPER_FINISHES.with(|f| f.set(forced));
            let on_caller = std::sync::atomic::AtomicUsize::new(0);
            let events = Mutex::new(Vec::new());
            let mut buffers = [usize::MAX, usize::MAX];
            let blocks = 40;
            let mut solved = Vec::new();
            let result: Result<(), ()> = run_two_stages(
                blocks,
                &mut buffers,
                |k, buffer, _| {
                    assert_eq!(*buffer, usize::MAX, "block {k}: its buffer was finished");
                    *buffer = k;
                    if slow_prepare && k % 3 != 0 {
                        pause(300);
                    }
                    events.lock().unwrap().push(('p', k));
                    k * 10
                },
                |k, buffer, prepared| {
                    assert_eq!((*buffer, prepared), (k, k * 10));
                    if slow_solve && k % 4 != 1 {
                        pause(300);
                    }
                    solved.push(k);
                    Ok(k * 100)
                },
                |k, buffer, q| {
                    assert_eq!((*buffer, q), (k, k * 100));
                    *buffer = usize::MAX;
                    events.lock().unwrap().push(('f', k));
                    if std::thread::current().id() == caller {
                        on_caller.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                },
            );
            HELPER_FINISHES.with(|f| f.set(false));
            assert_eq!(result, Ok(()));
            if forced {
                // (the helper finished them all: the path a helper ahead takes)
                assert_eq!(on_caller.into_inner(), 0);
            }
            assert_eq!(solved, (0..blocks).collect::<Vec<_>>());
            let events = events.into_inner().unwrap();
            let finished: Vec<usize> = events.iter().filter(|e| e.0 == 'f').map(|e| e.1).collect();
            assert_eq!(finished, (0..blocks).collect::<Vec<_>>());
            let prepared = events.iter().filter(|e| e.0 == 'p').count();
            assert_eq!(prepared, blocks);
        }
    }

    /// The first error in block order is returned, whether a finish (on either thread)
    /// or a solve fails first, and no block after a failed one is finished.
    #[test]
    fn two_stages_return_the_first_error_in_block_order() {
        for (finish_fails, solve_fails, want) in [
            (Some(5), Some(7), 5),
            (Some(5), Some(3), 3),
            (Some(4), Some(5), 4),
            (None, Some(0), 0),
            (Some(0), None, 0),
            (Some(9), None, 9),
        ] {
            for (slow_solve, forced) in [(false, false), (true, false), (false, true)] {
                HELPER_FINISHES.with(|f| f.set(forced));
                let finished = Mutex::new(Vec::new());
                let result = run_two_stages(
                    10,
                    &mut [(), ()],
                    |_, _, _| (),
                    |k, _, ()| {
                        if slow_solve {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                        if solve_fails == Some(k) {
                            Err(k)
                        } else {
                            Ok(())
                        }
                    },
                    |k, _, ()| {
                        finished.lock().unwrap().push(k);
                        if finish_fails == Some(k) {
                            Err(k)
                        } else {
                            Ok(())
                        }
                    },
                );
                HELPER_FINISHES.with(|f| f.set(false));
                assert_eq!(
                    result,
                    Err(want),
                    "{finish_fails:?} {solve_fails:?} {forced}"
                );
                let finished = finished.into_inner().unwrap();
                assert!(finished.iter().all(|&k| k <= want), "{finished:?}");
                assert_eq!(finished, (0..finished.len()).collect::<Vec<_>>());
            }
        }
    }

    /// A panic of the finish stage is resumed on the calling thread.
    #[test]
    fn a_panic_in_a_finish_is_resumed() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        for slow_solve in [false, true] {
            let result = std::panic::catch_unwind(|| {
                run_two_stages::<_, _, _, ()>(
                    10,
                    &mut [(), ()],
                    |_, _, _| (),
                    |_, _, ()| {
                        if slow_solve {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                        Ok(())
                    },
                    |k, _, ()| {
                        assert!(k != 6, "finish 6 panics");
                        Ok(())
                    },
                )
            });
            assert!(result.is_err(), "the panic is resumed");
        }
        std::panic::set_hook(hook);
    }
}
