//! Persistent worker threads owned by an op: worker w is always the same OS thread, for
//! solvers that keep state per thread (a model object built once, a warm start).
//!
//! [`Workers::run_each`] runs a borrowed closure on workers `0 .. count` at once and
//! returns only once every one of them has finished with it (a panic included), which is
//! what makes lending it non-`'static` data sound. Calls take turns on the workers
//! ([`Workers::turn`]), so a worker never runs two jobs at once.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The stack of a worker thread: a solver's recursion gets what a main thread gets.
const WORKER_STACK_BYTES: usize = 8 << 20;
type Panic = Box<dyn std::any::Any + Send + 'static>;

/// The op's worker threads.
pub(crate) struct Workers {
    senders: Vec<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
    turn: Mutex<()>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.senders.len())
            .finish()
    }
}

/// Counts the jobs of one `run_each` down to zero, keeping the first panic.
struct Latch {
    state: Mutex<(usize, Option<Panic>)>,
    done: Condvar,
}

impl Latch {
    fn finish(&self, panic: Option<Panic>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.1.is_none() {
            state.1 = panic;
        }
        if state.0 == 0 {
            self.done.notify_all();
        }
    }
}

impl Workers {
    /// Starts `count` (>= 1) threads named `pert-worker-<w>`; an error names what the
    /// system refused.
    pub(crate) fn new(count: usize) -> std::io::Result<Workers> {
        let mut workers = Workers {
            senders: Vec::with_capacity(count),
            handles: Vec::with_capacity(count),
            turn: Mutex::new(()),
        };
        for w in 0..count.max(1) {
            let (send, receive): (Sender<Job>, Receiver<Job>) = mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("pert-worker-{w}"))
                // solvers ran on the caller's thread before (often 8 MiB of stack): as much
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || {
                    // jobs catch their own panics: this loop only ends when the op drops
                    // its sender
                    for job in receive {
                        job();
                    }
                })?; // the threads started so far end when `workers` is dropped
            workers.senders.push(send);
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// The number of workers.
    pub(crate) fn count(&self) -> usize {
        self.senders.len()
    }

    /// One call's turn on the workers: held while the call runs jobs on them.
    pub(crate) fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f(w)` on workers `w = 0 .. count` (at most [`Workers::count`]) at once and
    /// waits until every one has returned; a panic in `f` is resumed here after that.
    /// The caller holds [`Workers::turn`].
    pub(crate) fn run_each(&self, count: usize, f: &(dyn Fn(usize) + Sync)) {
        let count = count.min(self.count());
        if count == 0 {
            return;
        }
        let latch = Arc::new(Latch {
            state: Mutex::new((count, None)),
            done: Condvar::new(),
        });
        // SAFETY: `f` is only used by the jobs sent below, and this function returns only
        // once each of them has finished with it: every job ends in `latch.finish` (its
        // panics are caught), and a job that could not be sent is counted here, so the
        // wait below ends exactly when no job can still touch `f`.
        let f: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        for w in 0..count {
            let latch_w = latch.clone();
            let job: Job = Box::new(move || {
                let outcome = catch_unwind(AssertUnwindSafe(|| f(w)));
                latch_w.finish(outcome.err());
            });
            if self.senders[w].send(job).is_err() {
                // the worker is gone (cannot happen while the op lives): nothing ran
                latch.finish(None);
            }
        }
        let mut state = latch.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.0 > 0 {
            state = latch.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(panic) = state.1.take() {
            drop(state);
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.senders.clear(); // each worker's loop ends after its last job
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_worker_is_always_the_same_thread() {
        let workers = Workers::new(3).unwrap();
        let ids = Mutex::new(vec![Vec::new(); 3]);
        for _ in 0..5 {
            let _turn = workers.turn();
            workers.run_each(3, &|w| {
                ids.lock().unwrap()[w].push(std::thread::current().id());
            });
        }
        let ids = ids.into_inner().unwrap();
        for w in 0..3 {
            assert_eq!(ids[w].len(), 5);
            assert!(ids[w].iter().all(|id| *id == ids[w][0]));
            assert_ne!(ids[w][0], std::thread::current().id());
        }
        assert_ne!(ids[0][0], ids[1][0]);
    }

    #[test]
    fn borrowed_data_and_panics_come_back_after_every_job_ended() {
        let workers = Workers::new(4).unwrap();
        let done = AtomicUsize::new(0);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            workers.run_each(4, &|w| {
                if w == 1 {
                    panic!("worker 1 fails");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                done.fetch_add(1, Ordering::SeqCst);
            })
        }));
        assert!(outcome.is_err());
        assert_eq!(done.load(Ordering::SeqCst), 3); // the others finished first
        // the workers still run
        workers.run_each(4, &|_| {
            done.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(done.load(Ordering::SeqCst), 7);
    }
}
