//! Work split into fixed blocks that run on a pool of threads and are reduced in their
//! order, so that results do not depend on the number of threads, bit for bit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// Runs `work(k, scratch)` for blocks `k = 0 .. blocks` on `scratch.len()` threads (each
/// thread owns one scratch; the calling thread is one of them, so with one everything runs
/// there) and hands the results to `combine` in block order, on the calling thread. The
/// first error in block order stops the run (no new blocks start). A panic in `work` is
/// resumed on the calling thread.
pub(crate) fn run_blocks<S: Send, R: Send, E: Send>(
    blocks: usize,
    scratch: &mut [S],
    work: impl Fn(usize, &mut S) -> Result<R, E> + Sync,
    mut combine: impl FnMut(usize, R) -> Result<(), E>,
) -> Result<(), E> {
    let threads = scratch.len().clamp(1, blocks.max(1));
    if threads == 1 {
        for k in 0..blocks {
            combine(k, work(k, &mut scratch[0])?)?;
        }
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (send, receive) = mpsc::channel::<(usize, Result<R, E>)>();
    let (own, helpers) = scratch[..threads].split_first_mut().expect("threads >= 2");
    std::thread::scope(|scope| {
        // helpers stop taking blocks however this thread leaves the scope (error, panic)
        let _stop_helpers = StopOnDrop(&stop);
        let handles: Vec<_> = helpers
            .iter_mut()
            .map(|s| {
                let (send, next, stop, work) = (send.clone(), &next, &stop, &work);
                scope.spawn(move || loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= blocks || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = work(k, s);
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if send.send((k, result)).is_err() {
                        break;
                    }
                })
            })
            .collect();
        drop(send);
        let mut pending = BTreeMap::new();
        let mut expected = 0;
        let mut outcome = Ok(());
        // combines the results that are next in block order; false once an error is seen
        let mut drain = |pending: &mut BTreeMap<usize, Result<R, E>>,
                         outcome: &mut Result<(), E>| {
            while let Some(result) = pending.remove(&expected) {
                *outcome = result.and_then(|r| combine(expected, r));
                expected += 1;
                if outcome.is_err() {
                    stop.store(true, Ordering::Relaxed);
                    return false;
                }
            }
            true
        };
        // this thread works too, and combines between its own blocks without waiting
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            if k >= blocks || stop.load(Ordering::Relaxed) {
                break;
            }
            let result = work(k, own);
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            pending.insert(k, result);
            pending.extend(receive.try_iter());
            if !drain(&mut pending, &mut outcome) {
                break;
            }
        }
        if outcome.is_ok() {
            // the helpers' last blocks
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
        outcome
    })
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
