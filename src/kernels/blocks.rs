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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// Runs `work(k, scratch)` for blocks `k = 0 .. blocks` on `scratch.len()` threads (each
/// thread owns one scratch; the calling thread is one of them, so with one everything runs
/// there) and hands the results to `combine` in block order, on the calling thread. The
/// first error in block order is returned (once an error is seen, no new block starts).
/// A panic in `work` is resumed on the calling thread.
pub(crate) fn run_blocks<S: Send, R: Send, E: Send>(
    blocks: usize,
    scratch: &mut [S],
    work: impl Fn(usize, &mut S) -> Result<R, E> + Sync,
    combine: impl FnMut(usize, R) -> Result<(), E>,
) -> Result<(), E> {
    run_blocks_observed(blocks, scratch, work, combine, |_| {})
}

/// Hands out block numbers: a block is taken only while no failure has been seen, and a
/// taken block is always done.
struct Queue<'a> {
    next: AtomicUsize,
    stop: &'a AtomicBool,
    blocks: usize,
}

impl Queue<'_> {
    /// The next block to do, or None once all are taken or a failure was seen.
    fn take(&self) -> Option<usize> {
        if self.stop.load(Ordering::Acquire) {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (k < self.blocks).then_some(k)
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
    let stop = AtomicBool::new(false);
    let queue = Queue {
        next: AtomicUsize::new(0),
        stop: &stop,
        blocks,
    };
    let (send, receive) = mpsc::channel::<(usize, Result<R, E>)>();
    let (own, helpers) = scratch[..threads].split_first_mut().expect("threads >= 2");
    std::thread::scope(|scope| {
        // helpers stop taking blocks however this thread leaves the scope (error, panic)
        let _stop_helpers = StopOnDrop(&stop);
        let handles: Vec<_> = helpers
            .iter_mut()
            .map(|s| {
                let (send, queue, work, taken) = (send.clone(), &queue, &work, &taken);
                scope.spawn(move || {
                    while let Some(k) = queue.take() {
                        taken(k);
                        let result = work(k, s);
                        if result.is_err() {
                            queue.stop.store(true, Ordering::Release);
                        }
                        if send.send((k, result)).is_err() {
                            break; // the calling thread has its outcome already
                        }
                    }
                })
            })
            .collect();
        drop(send);
        let mut pending = BTreeMap::new();
        let mut combined = 0;
        let mut outcome = Ok(());
        // combines the results that are next in block order; false once an error is seen
        let mut drain = |pending: &mut BTreeMap<usize, Result<R, E>>,
                         outcome: &mut Result<(), E>| {
            while let Some(result) = pending.remove(&combined) {
                *outcome = result.and_then(|r| combine(combined, r));
                combined += 1;
                if outcome.is_err() {
                    stop.store(true, Ordering::Release);
                    return false;
                }
            }
            true
        };
        // this thread works too, and combines between its own blocks without waiting
        let mut failed = false;
        while let Some(k) = queue.take() {
            taken(k);
            let result = work(k, own);
            if result.is_err() {
                stop.store(true, Ordering::Release);
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
            for (k, result) in receive.iter() {
                pending.insert(k, result);
                if !drain(&mut pending, &mut outcome) {
                    break;
                }
            }
        }
        drop(receive);
        for h in handles {
            if let Err(payload) = h.join() {
                std::panic::resume_unwind(payload);
            }
        }
        // taken blocks form a prefix and all were handed over: either an error was
        // combined, or every block was
        assert!(
            outcome.is_err() || combined == blocks,
            "a block run ended with {combined} of {blocks} blocks combined and no error"
        );
        outcome
    })
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
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

    /// Thousands of runs on many threads with a failure at a varying block: every run
    /// reports the first failing block, and combines exactly the blocks before it.
    #[test]
    fn failures_anywhere_are_always_reported() {
        let blocks = 24;
        for run in 0..4000usize {
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
