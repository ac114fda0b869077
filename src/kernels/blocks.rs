//! Work split into fixed blocks that run on a pool of threads and are reduced in their
//! order, so that results do not depend on the number of threads, bit for bit.
//!
//! Correctness does not depend on timing: a thread checks for failure *before* it takes a
//! block (one step: once the stop flag is seen, no block is taken), and every block it
//! takes is done and handed over, whatever happens meanwhile. So the blocks that were taken
//! are always a prefix `0 .. taken` with every result present, and the in-order combine
//! either reaches an error (the first one in block order) or combines every block. A run
//! that ends with blocks neither combined nor failed is a bug of this module, and panics
//! rather than report success.
//!
//! Memory stays bounded: a block k is started only once it is within [`BLOCK_WINDOW`] blocks per
//! thread of the next block to combine (helpers wait; the calling thread combines what
//! they hand over until it is), so results waiting for their turn never pile up behind a
//! slow block.

use crate::tuning::{BLOCK_WINDOW, TWO_STAGE_SPIN};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use super::workers::{Unavailable, Workers};

/// `$body` with `$spawn` bound to a way to start helper jobs (`&dyn Fn(Box<dyn FnOnce() +
/// Send>) -> bool`, false when one could not start): the process's shared helper threads
/// when at least `$count` are free (no thread start-up per call), else threads of this
/// call's own (one that cannot start, for thread or memory limits, is left out). Returns
/// the body's value once every job started has ended. A macro, not a function: the body
/// borrows the caller's data for the scope's lifetime, which a closure argument could not
/// name.
macro_rules! with_helpers {
    ($count:expr, |$spawn:ident| $body:expr) => {{
        let pool = super::workers::shared().filter(|pool| pool.count() >= $count);
        let attempt = pool.map(|pool| {
            pool.try_scope(|scope| {
                let $spawn = &|job| scope.spawn(job);
                $body
            })
        });
        match attempt {
            Some(Ok(outcome)) => outcome,
            // the pool is busy (or absent)
            unrun => {
                drop(unrun); // the body that did not run, and what it borrowed
                std::thread::scope(|scope| {
                    let $spawn = &|job| {
                        std::thread::Builder::new()
                            .stack_size(crate::tuning::WORKER_STACK_BYTES)
                            .spawn_scoped(scope, job)
                            .is_ok()
                    };
                    $body
                })
            }
        }
    }};
}
pub(super) use with_helpers;

/// Runs `work(k, scratch)` for blocks `k = 0 .. blocks` on `scratch.len()` threads (each
/// thread owns one scratch; the calling thread is one of them, so with one everything runs
/// there) and hands the results to `combine` in block order, on the calling thread. The
/// first error in block order is returned (once an error is seen, no new block starts).
/// A panic in `work` stops the other threads and is resumed on the calling thread. When a
/// thread cannot be started, the run goes on with those that could (the results do not
/// depend on the number of threads).
pub(crate) fn run_blocks<S: Send, R: Send, E: Send>(
    blocks: usize,
    scratch: &mut [S],
    work: impl Fn(usize, &mut S) -> Result<R, E> + Sync,
    combine: impl FnMut(usize, R) -> Result<(), E>,
) -> Result<(), E> {
    run_blocks_observed(blocks, scratch, work, combine, |_| {})
}

/// What the threads of a run share: the next block to take, the stop flag, and the next
/// block to combine (for the window).
struct Shared {
    next: AtomicUsize,
    stop: AtomicBool,
    blocks: usize,
    /// Blocks `0 .. combined` are combined.
    combined: AtomicUsize,
    /// Helpers waiting for the window to move.
    waiting: AtomicUsize,
    lock: Mutex<()>,
    moved: Condvar,
    window: usize,
}

impl Shared {
    /// A run of `blocks` blocks on `threads` threads: nothing taken or combined yet.
    fn new(blocks: usize, threads: usize) -> Shared {
        Shared {
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            blocks,
            combined: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            lock: Mutex::new(()),
            moved: Condvar::new(),
            window: BLOCK_WINDOW * threads,
        }
    }

    /// The next block to do, or None once all are taken or a failure was seen. A taken
    /// block is always done: the check for failure comes before the take, in one step.
    fn take(&self) -> Option<usize> {
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (k < self.blocks).then_some(k)
    }

    /// Waits (helpers only) until block k is within the window, or the run stops (then
    /// the block is done anyway: the combine may still need it).
    fn wait_turn(&self, k: usize) {
        let open = || {
            k < self.combined.load(Ordering::SeqCst) + self.window
                || self.stop.load(Ordering::SeqCst)
        };
        // looked for during TWO_STAGE_SPIN first: the calling thread usually moves the
        // window within microseconds, and a sleeping thread can take far longer to wake
        let start = std::time::Instant::now();
        while !open() {
            if start.elapsed() >= TWO_STAGE_SPIN {
                break;
            }
            std::thread::yield_now(); // the core to any thread that wants it (oversubscribed)
        }
        if open() {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !open() {
            guard = self.moved.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        drop(guard);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes the helpers waiting for the window.
    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.moved.notify_all();
        }
    }

    /// Blocks `0 .. combined` are combined.
    fn advance(&self, combined: usize) {
        self.combined.store(combined, Ordering::SeqCst);
        self.wake();
    }

    /// No block is taken any more.
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// [`run_blocks`], calling `taken(k)` on the thread that took block k, right after it took
/// it: tests use it to force interleavings (e.g. hold a block until another has failed).
fn run_blocks_observed<S: Send, R: Send, E: Send>(
    blocks: usize,
    scratch: &mut [S],
    work: impl Fn(usize, &mut S) -> Result<R, E> + Sync,
    mut combine: impl FnMut(usize, R) -> Result<(), E>,
    taken: impl Fn(usize) + Sync,
) -> Result<(), E> {
    let threads = scratch.len().clamp(1, blocks.max(1));
    if threads == 1 {
        for k in 0..blocks {
            taken(k);
            combine(k, work(k, &mut scratch[0])?)?;
        }
        return Ok(());
    }
    let shared = Shared::new(blocks, threads);
    let (own, helpers) = scratch[..threads].split_first_mut().expect("threads >= 2");
    let panicked = Mutex::new(None);
    // the helpers: the process's shared threads when they are free (no thread start-up
    // per call), else threads of this call's own
    let count = helpers.len();
    let outcome = with_helpers!(count, |spawn| drive(
        spawn,
        &shared,
        &mut *own,
        &mut *helpers,
        &work,
        &mut combine,
        &taken,
        &panicked,
    ));
    // a helper's panic, once every helper has ended
    if let Some(payload) = panicked.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(payload);
    }
    outcome
}

pub(super) type Panic = Box<dyn std::any::Any + Send + 'static>;

/// The body of a run with helpers: starts one helper per scratch of `helpers` with `spawn`
/// (false: it could not start, and is left out), works and combines on this thread, and
/// returns once every started helper has handed over every block it took (the caller's
/// scope then waits for the helpers to end). A helper's panic is kept in `panicked`.
#[allow(clippy::too_many_arguments)]
fn drive<'env, S: Send, R: Send, E: Send>(
    spawn: &dyn Fn(Box<dyn FnOnce() + Send + 'env>) -> bool,
    shared: &'env Shared,
    own: &mut S,
    helpers: &'env mut [S],
    work: &'env (dyn Fn(usize, &mut S) -> Result<R, E> + Sync),
    combine: &mut dyn FnMut(usize, R) -> Result<(), E>,
    taken: &'env (dyn Fn(usize) + Sync),
    panicked: &'env Mutex<Option<Panic>>,
) -> Result<(), E> {
    let blocks = shared.blocks;
    let (send, receive) = mpsc::channel::<(usize, Result<R, E>)>();
    // helpers stop taking blocks however this thread leaves (error, panic)
    let _stop_helpers = HaltOnDrop(shared);
    for s in helpers.iter_mut() {
        let send = send.clone();
        let helper = move || {
            let run = || {
                // a panic here stops the others too (resumed by the caller)
                let _halt = HaltOnDrop(shared);
                while let Some(k) = shared.take() {
                    taken(k);
                    shared.wait_turn(k);
                    let result = work(k, s);
                    if result.is_err() {
                        shared.halt();
                    }
                    if send.send((k, result)).is_err() {
                        break; // the calling thread has its outcome already
                    }
                }
            };
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                let mut first = panicked.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert(payload);
            }
        };
        spawn(Box::new(helper));
    }
    drop(send);
    let mut pending = BTreeMap::new();
    let mut combined = 0;
    let mut outcome = Ok(());
    // combines the results that are next in block order; false once an error is seen
    let mut drain = |pending: &mut BTreeMap<usize, Result<R, E>>, outcome: &mut Result<(), E>| {
        let before = combined;
        while let Some(result) = pending.remove(&combined) {
            *outcome = result.and_then(|r| combine(combined, r));
            combined += 1;
            if outcome.is_err() {
                shared.halt();
                return false;
            }
        }
        if combined != before {
            shared.advance(combined);
        }
        true
    };
    // this thread works too, and combines between its own blocks (or, when its next
    // block is beyond the window, until it is within)
    let mut failed = false;
    'own: while let Some(k) = shared.take() {
        taken(k);
        // ahead of the window: combine what the helpers hand over first
        while k >= shared.combined.load(Ordering::SeqCst) + shared.window
            && !shared.stop.load(Ordering::SeqCst)
        {
            let Some((j, result)) = wait_recv(&receive) else {
                break; // every helper has left (one panicked): do the block anyway
            };
            pending.insert(j, result);
            if !drain(&mut pending, &mut outcome) {
                failed = true;
                break 'own;
            }
        }
        let result = work(k, own);
        if result.is_err() {
            shared.halt();
        }
        pending.insert(k, result);
        pending.extend(receive.try_iter());
        if !drain(&mut pending, &mut outcome) {
            failed = true;
            break;
        }
    }
    if !failed {
        // the helpers' last blocks: the channel ends when every helper has left, and
        // each has handed over every block it took
        while let Some((k, result)) = wait_recv(&receive) {
            pending.insert(k, result);
            if !drain(&mut pending, &mut outcome) {
                break;
            }
        }
    }
    drop(receive);
    // taken blocks form a prefix and all were handed over: either an error was combined,
    // or every block was (unless a helper panicked: the caller resumes that panic)
    let helper_panicked = panicked.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    assert!(
        helper_panicked || outcome.is_err() || combined == blocks,
        "a block run ended with {combined} of {blocks} blocks combined and no error"
    );
    outcome
}

/// The in-order combine of a run on persistent workers, done by whichever worker hands
/// over the next block in order.
struct InOrder<R, E, C> {
    pending: BTreeMap<usize, Result<R, E>>,
    combined: usize,
    outcome: Result<(), E>,
    combine: C,
}

/// [`run_blocks`] on an op's persistent workers: `work(k, w, scratch)` runs on worker w
/// (`0 .. threads`, at most the workers' count, each with `scratch[w]`), and the results
/// are combined in block order by the worker that hands over the next one, so the calling
/// thread only waits: at most `threads` threads run at once. The same guarantees as
/// [`run_blocks`]: the first error in block order, every block combined otherwise, a
/// panic stops the others and is resumed here, bounded results ahead of the combine.
pub(crate) fn run_blocks_on<S: Send, R: Send, E: Send + From<Unavailable>>(
    workers: &Workers,
    threads: usize,
    blocks: usize,
    scratch: &mut [S],
    work: impl Fn(usize, usize, &mut S) -> Result<R, E> + Sync,
    combine: impl FnMut(usize, R) -> Result<(), E> + Send,
) -> Result<(), E> {
    if blocks == 0 {
        return Ok(());
    }
    let threads = threads
        .clamp(1, blocks)
        .min(workers.count())
        .min(scratch.len());
    let shared = Shared::new(blocks, threads);
    let order = Mutex::new(InOrder {
        pending: BTreeMap::new(),
        combined: 0,
        outcome: Ok(()),
        combine,
    });
    let scratch: Vec<Mutex<&mut S>> = scratch.iter_mut().take(threads).map(Mutex::new).collect();
    {
        let _turn = workers.turn()?;
        workers.run_each(threads, &|w| {
            // a panic here stops the others too (resumed by run_each)
            let _halt = HaltOnDrop(&shared);
            let mut s = scratch[w].lock().unwrap_or_else(|e| e.into_inner());
            while let Some(k) = shared.take() {
                shared.wait_turn(k);
                let result = work(k, w, &mut s);
                if result.is_err() {
                    shared.halt();
                }
                let mut guard = order.lock().unwrap_or_else(|e| e.into_inner());
                let InOrder {
                    pending,
                    combined,
                    outcome,
                    combine,
                } = &mut *guard;
                pending.insert(k, result);
                let before = *combined;
                while outcome.is_ok() {
                    let Some(result) = pending.remove(combined) else {
                        break;
                    };
                    *outcome = result.and_then(|r| combine(*combined, r));
                    *combined += 1;
                }
                if outcome.is_err() {
                    shared.halt();
                } else if *combined != before {
                    shared.advance(*combined);
                }
            }
        });
    }
    let order = order.into_inner().unwrap_or_else(|e| e.into_inner());
    assert!(
        order.outcome.is_err() || order.combined == blocks,
        "a block run ended with {} of {blocks} blocks combined and no error",
        order.combined
    );
    order.outcome
}

/// Halts the run when dropped.
struct HaltOnDrop<'a>(&'a Shared);

impl Drop for HaltOnDrop<'_> {
    fn drop(&mut self) {
        self.0.halt();
    }
}

/// The next block a helper hands over to the calling thread, looked for during
/// [`TWO_STAGE_SPIN`] before waiting: a thread that sleeps for it may take far longer to
/// wake up than the helper takes to prepare (on a virtual machine, its core may have to
/// be woken too); None once every helper has left.
fn wait_recv<T>(receive: &mpsc::Receiver<T>) -> Option<T> {
    super::workers::recv_after_spin(receive, TWO_STAGE_SPIN, std::thread::yield_now)
}

/// `all` cut into consecutive parts of the given lengths (one per block), each to be taken
/// once by its block (see [`take`]).
pub(crate) fn slots<T>(mut all: &mut [T], lens: impl Iterator<Item = usize>) -> Slots<'_, T> {
    lens.map(|len| {
        let (mine, rest) = std::mem::take(&mut all).split_at_mut(len);
        all = rest;
        Mutex::new(Some(mine))
    })
    .collect()
}

/// A run's parts of one buffer, a part per block (see [`slots`]).
pub(crate) type Slots<'a, T> = Vec<Mutex<Option<&'a mut [T]>>>;

/// Block g's part of `slots` (None when there are none).
pub(crate) fn take<'a, T>(slots: &[Mutex<Option<&'a mut [T]>>], g: usize) -> Option<&'a mut [T]> {
    slots.get(g).map(|slot| {
        slot.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each block takes its part once")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn combines_in_block_order_whatever_the_threads() {
        for threads in [1, 2, 3, 8] {
            let mut scratch = vec![0u64; threads];
            let mut order = Vec::new();
            run_blocks::<_, _, ()>(
                50,
                &mut scratch,
                |k, s| {
                    *s += 1;
                    Ok(k)
                },
                |k, r| {
                    assert_eq!(k, r);
                    order.push(k);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(order, (0..50).collect::<Vec<_>>());
            assert_eq!(scratch.iter().sum::<u64>(), 50);
        }
    }

    #[test]
    fn the_first_error_in_block_order_wins() {
        for threads in [1, 4] {
            let mut scratch = vec![(); threads];
            let err = run_blocks(
                10,
                &mut scratch,
                |k, _| if k == 6 || k == 9 { Err(k) } else { Ok(()) },
                |_, _| Ok(()),
            );
            assert_eq!(err, Err(6));
        }
    }

    /// The interleaving that lost failures: a thread takes block 0 and is held until block
    /// 1 has failed on another thread. The held block must still be done and the run must
    /// end with block 1's error (a scheduler that checks for failure after taking a block
    /// dropped block 0, the in-order combine stalled there, and the run reported success).
    #[test]
    fn a_block_taken_before_a_failure_is_done_and_the_failure_is_reported() {
        for threads in [2, 3, 8] {
            let failed = AtomicBool::new(false);
            let done = AtomicU32::new(0);
            let mut scratch = vec![(); threads];
            let mut combined = Vec::new();
            let outcome = run_blocks_observed(
                16,
                &mut scratch,
                |k, _| {
                    if k == 1 {
                        failed.store(true, Ordering::SeqCst);
                        return Err(k);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    Ok(k)
                },
                |k, _| {
                    combined.push(k);
                    Ok(())
                },
                |k| {
                    if k == 0 {
                        // held until block 1 has failed (and a little more, so that the
                        // failing thread has set the stop flag)
                        while !failed.load(Ordering::SeqCst) {
                            std::thread::yield_now();
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                },
            );
            assert_eq!(outcome, Err(1), "threads {threads}");
            assert_eq!(combined, vec![0], "threads {threads}");
        }
    }

    /// A slow first block does not let the others pile up: at most the window of blocks
    /// per thread is done ahead of the combine (without it, all 199 others were).
    #[test]
    fn results_ahead_of_the_combine_stay_within_the_window() {
        let threads = 4;
        let ahead = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let mut scratch = vec![(); threads];
        run_blocks::<_, _, ()>(
            200,
            &mut scratch,
            |k, _| {
                if k == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                let now = ahead.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                Ok(())
            },
            |_, _| {
                ahead.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
        let most = most.load(Ordering::SeqCst);
        assert!(
            most <= (BLOCK_WINDOW + 1) * threads,
            "{most} results waited"
        );
    }

    /// A panic on any thread stops the others (it used to stop only the calling thread's
    /// own work, so the helpers ran every remaining block first), and is resumed.
    #[test]
    fn a_panic_in_a_block_stops_the_run() {
        // quiet panics (the default hook prints a backtrace while the others run on)
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        for panicking in [0, 1, 2] {
            let calls = AtomicUsize::new(0);
            let mut scratch = vec![(); 4];
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_blocks_observed::<_, _, ()>(
                    10_000,
                    &mut scratch,
                    |k, _| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        if k == panicking {
                            panic!("block {k} panics");
                        }
                        std::thread::sleep(std::time::Duration::from_micros(50));
                        Ok(())
                    },
                    |_, _| Ok(()),
                    |_| {},
                )
            }));
            assert!(result.is_err(), "the panic is resumed");
            let calls = calls.load(Ordering::SeqCst);
            assert!(calls < 200, "{calls} blocks ran after a panic");
        }
        std::panic::set_hook(hook);
    }

    /// Thousands of runs on many threads with a failure at a varying block: every run
    /// reports the first failing block, and combines exactly the blocks before it.
    #[test]
    fn failures_anywhere_are_always_reported() {
        let blocks = 24;
        // (under Miri, fewer runs: each seed of `make miri` schedules them differently)
        let runs = if cfg!(miri) { 56 } else { 4000 };
        for run in 0..runs {
            let threads = 2 + run % 7;
            let fail_at = (run * 7) % (blocks + 4); // past the end: no failure
            let mut scratch = vec![(); threads];
            let mut combined = 0;
            let outcome = run_blocks(
                blocks,
                &mut scratch,
                |k, _| if k == fail_at { Err(k) } else { Ok(k) },
                |k, r| {
                    assert_eq!((k, r), (combined, combined));
                    combined += 1;
                    Ok(())
                },
            );
            if fail_at < blocks {
                assert_eq!(outcome, Err(fail_at), "run {run}");
                assert_eq!(combined, fail_at, "run {run}");
            } else {
                assert_eq!(outcome, Ok(()), "run {run}");
                assert_eq!(combined, blocks, "run {run}");
            }
        }
    }
}
