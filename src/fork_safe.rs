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

use crate::error::{Error, Result};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

/// Threads inside the gate now (or about to look whether it is open).
static INSIDE: AtomicUsize = AtomicUsize::new(0);
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

/// Inside the gate until dropped (on the thread that entered: not `Send`).
struct Inside(std::marker::PhantomData<*const ()>);

impl Inside {
    /// Waits while a fork is under way (unless this thread is forking), then enters.
    fn enter() -> Inside {
        let mut spins = 0;
        loop {
            INSIDE.fetch_add(1, SeqCst);
            let inside = Inside(std::marker::PhantomData); // (leaves on drop)
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
        INSIDE.fetch_sub(1, SeqCst);
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
        let _inside = Inside::enter();
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
}
