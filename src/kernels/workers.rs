//! Persistent worker threads: an op's own (for solvers that keep state per thread: worker w
//! is always the same OS thread), and the process's shared helpers that block runs borrow
//! when they are free ([`shared`]).
//!
//! [`Workers::run_each`] runs a borrowed closure on workers `0 .. count` at once, and
//! [`Workers::try_scope`] lends jobs to them while the calling thread works too; both
//! return only once every job has ended (a panic included, or dropped unrun), which is
//! what makes lending non-`'static` data sound. Calls take turns on a pool
//! ([`Workers::turn`], [`Workers::try_scope`]), so a worker never runs two calls' jobs at
//! once. A job runs under the calling thread's floating-point settings (rounding, flush to
//! zero), as a thread started for the call would, and the worker's own are put back after.

use crate::tuning::{HELPER_SPIN, WAIT_SPIN, WORKER_STACK_BYTES};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// What a worker receives: a lent job (sent as it is, with no box around it: sending
/// allocates nothing more than the channel's own blocks).
type Job = Lent;

/// The next message of `receive`: looked for during `spin` (calling `pause` between
/// looks: a yield or a spin hint), then waited for; None once every sender is gone.
pub(crate) fn recv_after_spin<T>(
    receive: &Receiver<T>,
    spin: std::time::Duration,
    pause: fn(),
) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        match receive.try_recv() {
            Ok(message) => return Some(message),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if start.elapsed() < spin => pause(),
            Err(mpsc::TryRecvError::Empty) => return receive.recv().ok(),
        }
    }
}

/// `f`, then the calling thread's floating-point control word restored to what it was
/// before (a solver callback that changes it leaves the library's arithmetic under the
/// call's settings, whichever thread does it).
pub(crate) fn restoring_fp_state<R>(f: impl FnOnce() -> R) -> R {
    let own = fp_state();
    let result = f();
    set_fp_state(own);
    result
}

/// The calling thread's floating-point control word (SSE/AVX rounding and denormal modes).
fn fp_state() -> u32 {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        let mut csr: u32 = 0;
        // SAFETY: stores MXCSR into a local.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags))
        };
        csr
    }
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    {
        0 // (Miri runs no inline assembly: the state is not kept there)
    }
}

fn set_fp_state(csr: u32) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: loads a control word read from a thread of this process by `fp_state`.
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags))
    };
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    let _ = csr;
}

/// A job lent to a worker: when it is dropped, run or not, its borrowed closure is dropped
/// first, then its latch counts it (with its panic): so the lender can return.
struct Lent {
    job: Option<Box<dyn FnOnce() + Send + 'static>>,
    latch: Arc<Latch>,
    panic: Option<Panic>,
    fp: u32,
}

impl Lent {
    fn run(mut self) {
        if let Some(job) = self.job.take() {
            let own = fp_state();
            set_fp_state(self.fp);
            self.panic = catch_unwind(AssertUnwindSafe(job)).err();
            set_fp_state(own);
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // a job dropped unrun after it was sent (its worker is gone): the lender must not
        // take the work for done (see `WorkerGone`)
        let unrun = self.job.take().is_some();
        let panic = self
            .panic
            .take()
            .or_else(|| unrun.then(|| Box::new(WorkerGone) as Panic));
        self.latch.count_down(panic);
    }
}

impl Lent {
    /// This job, dropped unrun and counted as ended without a panic: for a job that was
    /// never handed to a worker (its lender knows and does the work another way).
    fn withdraw(mut self) {
        drop(self.job.take());
    }
}

/// The panic of a call whose job a worker thread could not run (the thread has ended):
/// a zero-sized payload, boxed without allocating, so that it can be made while memory
/// is short. The C boundary names it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerGone;

impl WorkerGone {
    /// What it means, for messages.
    pub(crate) const MESSAGE: &'static str =
        "a worker thread could not run its part of the call (the thread has ended)";
}

type Panic = Box<dyn std::any::Any + Send + 'static>;

/// The op's worker threads.
pub(crate) struct Workers {
    senders: Vec<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
    turn: Mutex<()>,
    /// Tells this pool's threads from others (`OWNER` holds the id of the pool a worker thread belongs to).
    id: usize,
    /// The process that started the threads: after `fork()` they do not exist.
    pid: u32,
}

/// Why a pool cannot run a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// The caller is one of the pool's own workers (a solver calling its own op): it would
    /// wait for itself.
    OwnWorker,
    /// The process forked after the threads started: they do not exist here.
    Forked,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unavailable::OwnWorker => {
                "a solver or worker hook called its own op, which would wait for itself"
            }
            Unavailable::Forked => {
                "the op's worker threads do not exist in this process (it was forked after the op was made): make the op in the process that uses it"
            }
        })
    }
}

impl From<Unavailable> for crate::error::Error {
    fn from(why: Unavailable) -> Self {
        crate::error::Error::invalid(why.to_string())
    }
}

static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

thread_local! {
    /// The id of the pool this thread works for (0: none).
    static OWNER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The borrowed closure of one `run_each`, as a raw pointer: no reference to it is alive
/// in a job except while the job calls it.
#[derive(Clone, Copy)]
struct Borrowed(*const (dyn Fn(usize) + Sync));

// SAFETY: the closure is Sync, and `run_each` keeps it alive until every job is done.
unsafe impl Send for Borrowed {}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.senders.len())
            .finish()
    }
}

/// Counts the jobs of one `run_each` or `try_scope` down to zero, keeping the first panic.
struct Latch {
    state: Mutex<(usize, Option<Panic>)>,
    done: Condvar,
}

impl Latch {
    /// Waits until every job counted has ended (looking for it, yielding the core, during
    /// [`WAIT_SPIN`] before it sleeps: jobs of a small call end within microseconds of
    /// their last result, and a sleeping thread can take far longer to wake); the first
    /// panic of the jobs.
    fn wait_all(&self) -> Option<Panic> {
        let start = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.0 > 0 {
            if start.elapsed() < WAIT_SPIN {
                drop(state);
                std::thread::yield_now();
                state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            } else {
                state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        state.1.take()
    }

    /// One job ended (with its panic, if any).
    fn count_down(&self, panic: Option<Panic>) {
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
    /// Starts `count` (>= 1) threads named `pert-worker-<w>` (they sleep as soon as a job
    /// ends: an op has a pool of its own, and many ops could spin at once); an error
    /// names what the system refused.
    pub(crate) fn new(count: usize) -> std::io::Result<Workers> {
        Workers::named(count, "pert-worker", std::time::Duration::ZERO)
    }

    /// [`Workers::new`] with threads named `<name>-<w>`.
    fn named(count: usize, name: &str, spin: std::time::Duration) -> std::io::Result<Workers> {
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut workers = Workers {
            senders: Vec::with_capacity(count),
            handles: Vec::with_capacity(count),
            turn: Mutex::new(()),
            id,
            pid: std::process::id(),
        };
        for w in 0..count.max(1) {
            let (send, receive): (Sender<Job>, Receiver<Job>) = mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{w}"))
                // solvers ran on the caller's thread before (often 8 MiB of stack): as much
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || {
                    OWNER.with(|o| o.set(id));
                    // jobs catch their own panics: this loop only ends when the op drops
                    // its sender. Waiting may allocate (the channel's per-thread context
                    // on the first wait): if memory is short then, the worker waits again
                    // rather than end
                    loop {
                        let next = catch_unwind(AssertUnwindSafe(|| {
                            recv_after_spin(&receive, spin, std::thread::yield_now)
                        }));
                        match next {
                            Ok(Some(job)) => job.run(),
                            Ok(None) => break,
                            Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
                        }
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

    /// One call's turn on the workers, held while the call runs jobs on them; refused to
    /// one of the pool's own workers (it would wait for itself) and after `fork()`.
    pub(crate) fn turn(&self) -> Result<MutexGuard<'_, ()>, Unavailable> {
        if OWNER.with(|o| o.get()) == self.id {
            return Err(Unavailable::OwnWorker);
        }
        if std::process::id() != self.pid {
            return Err(Unavailable::Forked);
        }
        Ok(self.turn.lock().unwrap_or_else(|e| e.into_inner()))
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
            state: Mutex::new((0, None)),
            done: Condvar::new(),
        });
        // The jobs get `f` as a raw pointer (its lifetime erased). SAFETY of the
        // dereference below: this function returns, or unwinds, only once every job sent
        // has finished calling `f` (`Waiter` waits for the latch also while unwinding): a
        // job is counted before it is sent and counts itself down when it is dropped, run
        // or not, after its call (its panics are caught). No reference to `f` is alive in
        // a job after its call returns.
        // SAFETY: only the lifetime is changed (a fat pointer to the same trait object).
        let f = Borrowed(unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
                f,
            )
        });
        let fp = fp_state();
        let waiter = Waiter(&latch);
        for w in 0..count {
            // boxed before it is counted: a failed allocation leaves nothing to wait for
            let job: Box<dyn FnOnce() + Send> = Box::new(move || {
                let f = f;
                // SAFETY: see above; `f` is alive until the latch counts this job.
                unsafe { (*f.0)(w) }
            });
            latch.state.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
            let lent = Lent {
                job: Some(job),
                latch: latch.clone(),
                panic: None,
                fp,
            };
            // a job that cannot be sent (its worker is gone) comes back: dropped unrun, it
            // records that its part was not done
            if let Err(mpsc::SendError(lent)) = self.senders[w].send(lent) {
                drop(lent);
            }
        }
        let panic = waiter.wait();
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Waits for every job counted on a latch: when [`Waiter::wait`] is called, and when it is
/// dropped without (a panic between two sends), so that borrowed data outlives the jobs.
struct Waiter<'a>(&'a Latch);

impl Waiter<'_> {
    /// Waits (looking for the end, yielding the core, during [`WAIT_SPIN`] before it
    /// sleeps: jobs of a small call end within microseconds, and a sleeping thread can
    /// take far longer to wake) and returns the first panic of the jobs.
    fn wait(self) -> Option<Panic> {
        let panic = self.wait_all();
        std::mem::forget(self);
        panic
    }

    fn wait_all(&self) -> Option<Panic> {
        self.0.wait_all()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let _ = self.wait_all();
    }
}

/// Jobs lent to a pool's workers within [`Workers::try_scope`]: each `spawn` sends one job
/// to the next worker; the scope waits for every job sent before it returns.
pub(crate) struct Scope<'scope, 'env: 'scope> {
    workers: &'scope Workers,
    latch: Arc<Latch>,
    fp: u32,
    next: std::cell::Cell<usize>,
    _scope: std::marker::PhantomData<&'scope mut &'scope ()>,
    _env: std::marker::PhantomData<&'env mut &'env ()>,
}

impl<'scope> Scope<'scope, '_> {
    /// Sends `job` to the next worker; false (the job dropped, not run) when every worker
    /// has one already or the worker is gone.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'scope) -> bool {
        let w = self.next.get();
        if w >= self.workers.count() {
            return false;
        }
        self.next.set(w + 1);
        // boxed before it is counted: a failed allocation leaves nothing to wait for
        let job: Box<dyn FnOnce() + Send + 'scope> = Box::new(job);
        // SAFETY: only the lifetime is changed; the scope returns only once the latch has
        // counted this job, which happens when the job is dropped, run or not, after its
        // closure (with everything it borrows for 'scope) has been dropped (`Lent`).
        let job = unsafe {
            std::mem::transmute::<
                Box<dyn FnOnce() + Send + 'scope>,
                Box<dyn FnOnce() + Send + 'static>,
            >(job)
        };
        self.latch.state.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        let lent = Lent {
            job: Some(job),
            latch: self.latch.clone(),
            panic: None,
            fp: self.fp,
        };
        // a job that cannot be sent (the worker is gone) comes back: withdrawn (counted,
        // unrun, no panic), and the caller does its work with the threads it has
        match self.workers.senders[w].send(lent) {
            Ok(()) => true,
            Err(mpsc::SendError(lent)) => {
                lent.withdraw();
                false
            }
        }
    }
}

impl Workers {
    /// Runs `f` with a [`Scope`] whose jobs run on this pool's workers, when the pool can
    /// be had at once (see [`Workers::try_turn`]; else `f` comes back unrun), and returns
    /// once every job sent has ended (also when `f` panics). A job's panic is resumed here
    /// (`f`'s own first).
    pub(crate) fn try_scope<'env, T, F>(&self, f: F) -> Result<T, F>
    where
        F: for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> T,
    {
        let Some(_turn) = self.try_turn() else {
            return Err(f);
        };
        let scope = Scope {
            workers: self,
            latch: Arc::new(Latch {
                state: Mutex::new((0, None)),
                done: Condvar::new(),
            }),
            fp: fp_state(),
            next: std::cell::Cell::new(0),
            _scope: std::marker::PhantomData,
            _env: std::marker::PhantomData,
        };
        let result = catch_unwind(AssertUnwindSafe(|| f(&scope)));
        let job_panic = scope.latch.wait_all();
        match result {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(_) if job_panic.is_some() => std::panic::resume_unwind(job_panic.expect("a panic")),
            Ok(value) => Ok(value),
        }
    }

    /// The pool's turn when it can be had at once: None while another call holds it, on
    /// one of its own workers, and after `fork()`.
    fn try_turn(&self) -> Option<MutexGuard<'_, ()>> {
        if OWNER.with(|o| o.get()) == self.id || std::process::id() != self.pid {
            return None;
        }
        match self.turn.try_lock() {
            Ok(guard) => Some(guard),
            // a call that panicked left it poisoned: the pool itself is fine
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// The process's shared helper threads (one per core but one, named `pert-helper-<i>`),
/// started on first use: a call borrows them for the library's own work and for plain
/// solver callbacks when they are free ([`Workers::try_scope`]), and starts threads of its
/// own otherwise, so it never waits for another call. The first caller starts them;
/// callers meanwhile (and a child forked meanwhile) go without.
pub(crate) fn shared() -> Option<&'static Workers> {
    static SHARED: std::sync::OnceLock<Option<Workers>> = std::sync::OnceLock::new();
    static CLAIMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Some(pool) = SHARED.get() {
        return pool.as_ref();
    }
    if CLAIMED.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return None; // another thread is starting them
    }
    let pool = match crate::config::cores().saturating_sub(1) {
        0 => None,
        helpers => Workers::named(helpers, "pert-helper", HELPER_SPIN).ok(),
    };
    let _ = SHARED.set(pool);
    SHARED.get().and_then(Option::as_ref)
}

impl Drop for Workers {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // forked: the threads do not exist here, and a lock inside a channel may have
            // been held by a thread of the parent at fork time (dropping a sender takes
            // its waker's lock): nothing of the channels or threads is touched, only leaked
            std::mem::forget(std::mem::take(&mut self.senders));
            std::mem::forget(std::mem::take(&mut self.handles));
            return;
        }
        self.senders.clear(); // each worker's loop ends after its last job
        if OWNER.with(|o| o.get()) == self.id {
            // a worker cannot join itself: the handles are leaked, never joined or
            // detached (the threads end on their own when their channel closes)
            std::mem::forget(std::mem::take(&mut self.handles));
            return;
        }
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
            let _turn = workers.turn().unwrap();
            workers.run_each(3, &|w| {
                ids.lock().unwrap()[w].push(std::thread::current().id());
            });
        }
        let ids = ids.into_inner().unwrap();
        for worker in &ids {
            assert_eq!(worker.len(), 5);
            assert!(worker.iter().all(|id| *id == worker[0]));
            assert_ne!(worker[0], std::thread::current().id());
        }
        assert_ne!(ids[0][0], ids[1][0]);
    }

    #[test]
    fn a_scope_waits_for_its_jobs_and_resumes_their_panics() {
        let workers = Workers::new(2).unwrap();
        let mut counts = [0u32; 3];
        let (first, rest) = counts.split_first_mut().unwrap();
        let done = workers.try_scope(|scope| {
            for c in rest.iter_mut() {
                assert!(scope.spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    *c += 1;
                }));
            }
            assert!(!scope.spawn(|| {}), "one job per worker");
            // one call at a time: a second scope comes back unrun
            assert!(workers.try_scope(|_| ()).is_err());
            *first += 1;
        });
        assert!(done.is_ok());
        assert_eq!(counts, [1, 1, 1]); // every job ended before the scope returned
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let _ = workers.try_scope(|scope| {
                scope.spawn(|| panic!("a job fails"));
            });
        }));
        assert!(outcome.is_err());
        assert!(
            workers.try_scope(|_| ()).is_ok(),
            "the pool is free again (not poisoned)"
        );
    }

    #[test]
    fn jobs_run_under_the_callers_floating_point_settings() {
        let workers = Workers::new(1).unwrap();
        let own = fp_state();
        let flush = own | 0x8040; // flush to zero, denormals are zero
        set_fp_state(flush);
        let seen = Mutex::new(0u32);
        let _ = workers.try_scope(|scope| {
            scope.spawn(|| *seen.lock().unwrap() = fp_state());
        });
        set_fp_state(own);
        assert_eq!(*seen.lock().unwrap(), flush);
        // the worker's own settings came back after the job
        let _turn = workers.turn().unwrap();
        workers.run_each(1, &|_| *seen.lock().unwrap() = fp_state());
        assert_eq!(*seen.lock().unwrap(), own);
    }

    /// A worker that is gone: run_each fails loudly (its part was not done), while a scope
    /// is told at once and goes on without it.
    #[test]
    fn a_job_its_worker_cannot_run_is_never_taken_for_done() {
        let mut workers = Workers::new(2).unwrap();
        let (gone, receiver) = mpsc::channel();
        drop(receiver);
        let _running = std::mem::replace(&mut workers.senders[1], gone);
        let ran = AtomicUsize::new(0);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let _turn = workers.turn().unwrap();
            workers.run_each(2, &|_| {
                ran.fetch_add(1, Ordering::SeqCst);
            });
        }));
        let panic = outcome.expect_err("worker 1 could not run its job");
        assert!(panic.downcast_ref::<WorkerGone>().is_some());
        assert_eq!(ran.load(Ordering::SeqCst), 1, "worker 0 ran its part");
        let sent = workers.try_scope(|scope| {
            let first = scope.spawn(|| {
                ran.fetch_add(1, Ordering::SeqCst);
            });
            (first, scope.spawn(|| {}))
        });
        assert_eq!(sent.ok(), Some((true, false)));
        assert_eq!(ran.load(Ordering::SeqCst), 2);
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
