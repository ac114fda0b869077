//! Locks that a forked child can take.
//!
//! `fork()` copies the calling thread only: a lock that another thread held at that moment
//! stays held in the child forever, and the child's first use of it would hang (a Python
//! DataLoader forking its workers while another thread adds to a solution pool, say). A
//! [`ForkSafeMutex`] is only ever held inside a *gate* that `fork()` waits at: the
//! library's `pthread_atfork` handlers close the gate before the fork, wait until no thread
//! is inside, and open it again after, in the parent and in the child. So no such lock is
//! held at a fork, and the data behind it is whole (no change was half made) in the child.
//!
//! Code inside the gate must neither call user code nor wait for anything a forking thread
//! may hold (it allocates at most: the allocator's own fork handlers run after ours). A
//! fork waits for the threads inside; threads that come to the gate during a fork wait for
//! it to end, except the forking thread itself (other fork handlers may use a pool; a fork
//! from a signal handler that interrupted its thread inside the gate is not supported). The
//! handlers are registered when the library is loaded (so that, in a program linked with
//! it, the program's own handlers run before ours at a fork and after ours in the child),
//! else at the first use.
//!
//! A second gate, [`foreign`], is for short calls into other libraries whose locks no fork
//! handler protects (MKL's): a fork waits for the threads inside it too, but only up to a
//! bound, since such a call may wait for a lock that another fork handler holds.

use crate::error::{Error, Result};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

/// Threads inside the gate now (or about to look whether it is open).
static INSIDE: AtomicUsize = AtomicUsize::new(0);
/// Threads inside the foreign gate now ([`foreign`]: calls into libraries whose locks no
/// fork handler protects), or about to look whether it is open.
static FOREIGN: AtomicUsize = AtomicUsize::new(0);
/// How many pauses (see [`pause`]: 64 yields, then sleeps of 50 µs: at least about 100 ms
/// in all) a fork waits for the threads inside the foreign gate while none of them leaves.
/// Their calls take microseconds; a longer wait means that such a call waits for the
/// forking thread (another runtime's fork handler, run before ours, holds a lock it
/// needs), and the fork goes on. Counted in pauses, not in time: a forking thread that was
/// descheduled for a while still gives the threads inside all its pauses.
const FOREIGN_PAUSES: u32 = 2064;
/// Forks under way in this process (the gate is closed while > 0).
static FORKING: AtomicUsize = AtomicUsize::new(0);
/// Whether the fork handlers are registered in this process.
static REGISTERED: AtomicBool = AtomicBool::new(false);
/// The process whose thread registers them (0: none).
static REGISTERING: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// Whether this thread's fork is under way (it passes the gate: other fork handlers
    /// may use a pool). A fork from a signal handler that interrupted this thread inside
    /// the gate is not supported (it would wait for itself).
    static FORKING_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Waits a little: yields first, then sleeps (a fork may wait for a long addition).
fn pause(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// Before a fork, on the forking thread: closes the gate and waits until no other thread
/// is inside.
extern "C" fn before_fork() {
    FORKING.fetch_add(1, SeqCst);
    FORKING_HERE.with(|f| f.set(true));
    let mut spins = 0;
    while INSIDE.load(SeqCst) != 0 {
        pause(&mut spins);
    }
    // bounded: FOREIGN_PAUSES pauses without progress (a thread leaving restarts the count;
    // none can enter meanwhile)
    let (mut waited, mut inside) = (0, FOREIGN.load(SeqCst));
    while inside != 0 && waited < FOREIGN_PAUSES {
        let mut spins = waited;
        pause(&mut spins);
        let now = FOREIGN.load(SeqCst);
        waited = if now < inside { 0 } else { waited + 1 };
        inside = now;
    }
}

/// After a fork, in the parent: opens the gate (when no other fork is under way).
extern "C" fn after_fork_in_parent() {
    FORKING_HERE.with(|f| f.set(false));
    FORKING.fetch_sub(1, SeqCst);
}

/// After a fork, in the child: its only thread is the forking one, so nobody else is
/// inside and no other fork is under way (the parent's other threads do not exist here).
extern "C" fn after_fork_in_child() {
    FORKING_HERE.with(|f| f.set(false));
    INSIDE.store(0, SeqCst);
    FOREIGN.store(0, SeqCst);
    FORKING.store(0, SeqCst);
    REGISTERED.store(true, SeqCst); // (the handlers ran: they are registered)
}

/// Registers the handlers when the library is loaded (the lazy path of [`register`]
/// remains for builds whose loader runs no constructor of ours).
#[cfg(all(target_os = "linux", not(miri)))]
#[used]
#[link_section = ".init_array"]
static REGISTER_AT_LOAD: extern "C" fn() = {
    extern "C" fn at_load() {
        let _ = register();
    }
    at_load
};

/// Registers the fork handlers once per process (a thread of this process registering them
/// is waited for; one of a parent that forked meanwhile does not exist here and is not).
fn register() -> Result<()> {
    if cfg!(miri) || REGISTERED.load(SeqCst) {
        // (a process under Miri cannot fork)
        return Ok(());
    }
    let me = std::process::id();
    loop {
        if REGISTERED.load(SeqCst) {
            return Ok(());
        }
        let claim = REGISTERING.load(SeqCst);
        if claim != me
            && REGISTERING
                .compare_exchange(claim, me, SeqCst, SeqCst)
                .is_ok()
        {
            // SAFETY: the handlers are plain functions of this library that touch only
            // atomics; glibc removes them when the library is unloaded (they are registered
            // with this library's __dso_handle).
            let status = unsafe {
                libc::pthread_atfork(
                    Some(before_fork),
                    Some(after_fork_in_parent),
                    Some(after_fork_in_child),
                )
            };
            if status != 0 {
                REGISTERING.store(0, SeqCst);
                return Err(Error::new(
                    crate::error::Status::TorchError,
                    format!(
                        "pthread_atfork failed (error {status}): no memory for the fork handlers"
                    ),
                ));
            }
            REGISTERED.store(true, SeqCst);
            return Ok(());
        }
        std::thread::yield_now();
    }
}

/// Runs `f` inside the foreign gate: a fork waits for it to return, up to a bound (about
/// 100 ms of pauses without progress, [`FOREIGN_PAUSES`]), and threads that come to the
/// gate during a fork wait for it to end. For short
/// calls into a library whose own locks no fork handler protects: MKL's per-thread set-up
/// (run by libtorch's, and by MKL's thread-count calls) takes MKL's spin lock, and a
/// child forked while a thread held it hung at its first call. `f` must call no user code.
/// The bound keeps a fork from waiting forever where `f` waits for the forking thread (an
/// OpenMP runtime whose fork handler runs before ours and holds the lock a new thread's
/// first OpenMP call takes): such a fork goes on after the bound, as it would without the
/// gate. What remains: where `f` holds MKL's lock while it waits for that forking thread
/// (Intel's OpenMP runtime, whose fork handler takes its own locks), or was kept off the
/// CPU for the whole bound, the child can still find the lock held. Without fork handlers
/// (no memory to register them), `f` runs as it is.
pub(crate) fn foreign<R>(f: impl FnOnce() -> R) -> R {
    if register().is_err() {
        return f();
    }
    let _inside = Inside::enter(&FOREIGN);
    f()
}

/// Inside a gate until dropped (on the thread that entered: not `Send`).
struct Inside(&'static AtomicUsize, std::marker::PhantomData<*const ()>);

impl Inside {
    /// Waits while a fork is under way (unless this thread is forking), then enters the
    /// gate whose count of threads inside is `count`.
    fn enter(count: &'static AtomicUsize) -> Inside {
        let mut spins = 0;
        loop {
            count.fetch_add(1, SeqCst);
            let inside = Inside(count, std::marker::PhantomData); // (leaves on drop)
            if FORKING.load(SeqCst) == 0 || FORKING_HERE.with(Cell::get) {
                return inside; // (a fork that begins now waits for this thread to leave)
            }
            drop(inside);
            while FORKING.load(SeqCst) != 0 {
                pause(&mut spins);
            }
        }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// A mutex that is never held at a `fork()` (see the module docs): its closures run inside
/// the gate, so they must be short and must not call user code.
#[derive(Debug)]
pub(crate) struct ForkSafeMutex<T>(Mutex<T>);

impl<T> ForkSafeMutex<T> {
    /// A mutex holding `value` (TORCH_ERROR when the fork handlers cannot be registered).
    pub(crate) fn new(value: T) -> Result<ForkSafeMutex<T>> {
        register()?;
        Ok(ForkSafeMutex(Mutex::new(value)))
    }

    /// Runs `f` on the value under the lock, inside the gate (a panic of an earlier holder
    /// does not poison it: every holder leaves the value whole).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let _inside = Inside::enter(&INSIDE);
        let mut guard: MutexGuard<'_, T> = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_is_open_and_empty_between_uses() {
        let m = ForkSafeMutex::new(1).unwrap();
        assert_eq!(m.with(|v| *v + 1), 2);
        m.with(|v| *v = 5);
        assert_eq!(m.with(|v| *v), 5);
        assert!(cfg!(miri) || REGISTERED.load(SeqCst));
    }

    /// Ends the pretended fork of a test, also when the test fails (else every later
    /// use of a pool in the test process would wait).
    struct PretendFork;

    impl Drop for PretendFork {
        fn drop(&mut self) {
            if FORKING_HERE.with(Cell::get) {
                after_fork_in_parent();
            }
        }
    }

    /// The forking thread passes the closed gate (another fork handler may use a pool);
    /// other threads wait until the fork has ended.
    #[test]
    fn the_forking_thread_passes_the_gate_others_wait() {
        let m = std::sync::Arc::new(ForkSafeMutex::new(0).unwrap());
        let _end = PretendFork;
        before_fork();
        assert_eq!(m.with(|v| *v + 1), 1, "the forking thread passes");
        let other = {
            let m = m.clone();
            std::thread::spawn(move || m.with(|v| *v += 1))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            m.with(|v| *v),
            0,
            "the other thread waits while the fork is under way"
        );
        after_fork_in_parent();
        other.join().unwrap();
        assert_eq!(m.with(|v| *v), 1);
    }

    /// The least time a fork waits for a thread that never leaves the foreign gate: its
    /// sleeps of 50 µs.
    fn least_bound() -> std::time::Duration {
        std::time::Duration::from_micros(50 * u64::from(FOREIGN_PAUSES - 64))
    }

    /// A fork waits for a thread inside the foreign gate until it leaves, and no longer
    /// than the bound when it does not (its call waits for the forking thread); threads
    /// that come to the foreign gate during a fork wait for it to end.
    #[test]
    fn a_fork_waits_for_foreign_calls_within_a_bound() {
        use std::sync::{atomic::AtomicBool, mpsc, Arc};
        use std::time::{Duration, Instant};
        let _end = PretendFork;
        // a short call: the fork goes on once it has returned (or after the bound, where
        // the machine preempted it that long)
        let left = Arc::new(AtomicBool::new(false));
        let (entered, wait_entered) = mpsc::channel();
        let short = {
            let left = left.clone();
            std::thread::spawn(move || {
                foreign(|| {
                    entered.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                    left.store(true, SeqCst);
                })
            })
        };
        wait_entered.recv().unwrap();
        let start = Instant::now();
        before_fork();
        assert!(
            left.load(SeqCst) || start.elapsed() >= least_bound(),
            "the fork waited for the call inside the gate"
        );
        // a thread that comes to the gate now waits until the fork has ended
        let came = Arc::new(AtomicBool::new(false));
        let late = {
            let came = came.clone();
            std::thread::spawn(move || foreign(|| came.store(true, SeqCst)))
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!came.load(SeqCst), "a call waits while a fork is under way");
        after_fork_in_parent();
        late.join().unwrap();
        short.join().unwrap();
        assert!(came.load(SeqCst));
        // a call that waits for the forking thread: the fork goes on after the bound
        let (release, wait_release) = mpsc::channel::<()>();
        let (entered, wait_entered) = mpsc::channel();
        let stuck = std::thread::spawn(move || {
            foreign(|| {
                entered.send(()).unwrap();
                wait_release.recv().unwrap();
            })
        });
        wait_entered.recv().unwrap();
        let start = Instant::now();
        before_fork();
        assert!(
            start.elapsed() >= least_bound(),
            "the fork waited the bound"
        );
        after_fork_in_parent();
        release.send(()).unwrap();
        stuck.join().unwrap();
    }
}
