//! libtorch's intra-op threads within a call's cap (`max_threads`).
//!
//! libtorch runs its CPU kernels (elementwise operations, reductions, matrix products)
//! on OpenMP teams and MKL threads. Both counts are per-thread settings: OpenMP's
//! `nthreads-var` is a property of the thread that opens the parallel region, and MKL has
//! `mkl_set_num_threads_local` (its C entry point `MKL_Set_Num_Threads_Local`: the
//! lower-case symbols are the Fortran interface, which takes a pointer). So a call can cap the libtorch work it runs on its own
//! thread without touching other threads of the process: [`cap`] sets both for the
//! current thread and the guard puts the previous values back. (`at::set_num_threads`
//! would not do: it also changes a process-wide default.)
//!
//! The functions are found in the already-loaded libraries (`dlopen` with `RTLD_NOLOAD`),
//! so this works whether the library was linked or `dlopen`ed with local symbols. Where
//! they are not found (a libtorch without OpenMP or MKL), there is nothing to cap.

use once_cell::race::OnceBox;
use std::ffi::{c_int, CStr};

type SetFn = unsafe extern "C" fn(c_int);
type GetFn = unsafe extern "C" fn() -> c_int;
type SetLocalFn = unsafe extern "C" fn(c_int) -> c_int;

struct Controls {
    omp: Option<(SetFn, GetFn)>,
    /// MKL's local setter and, where exported, its count.
    mkl: Option<(SetLocalFn, Option<GetFn>)>,
}

/// The controls, looked up on first use without a lock (threads that race each look them
/// up, the first one kept): a process forked while another thread looks them up never
/// waits for it.
fn controls() -> &'static Controls {
    static CONTROLS: OnceBox<Controls> = OnceBox::new();
    CONTROLS.get_or_init(|| {
        // SAFETY: looking up symbols of libraries this process has loaded; a found symbol
        // has the C signature of its documented function.
        Box::new(unsafe {
            // the runtime libtorch itself links (a lookup in libtorch_cpu's handle searches
            // its dependencies, whatever the runtime's file is called), else by SONAME
            let omp = [
                "libtorch_cpu.so",
                "libgomp.so.1",
                "libiomp5.so",
                "libomp.so.5",
                "libomp.so",
            ]
            .iter()
            .find_map(|lib| {
                let set = symbol(lib, c"omp_set_num_threads")?;
                let get = symbol(lib, c"omp_get_max_threads")?;
                Some((
                    std::mem::transmute::<*mut libc::c_void, SetFn>(set),
                    std::mem::transmute::<*mut libc::c_void, GetFn>(get),
                ))
            });
            let mkl = symbol("libtorch_cpu.so", c"MKL_Set_Num_Threads_Local").map(|set| {
                let get = symbol("libtorch_cpu.so", c"MKL_Get_Max_Threads");
                (
                    std::mem::transmute::<*mut libc::c_void, SetLocalFn>(set),
                    get.map(|get| std::mem::transmute::<*mut libc::c_void, GetFn>(get)),
                )
            });
            Controls { omp, mkl }
        })
    })
}

/// `name` in the loaded library `lib` (its file name or SONAME), if both exist.
///
/// # Safety
/// Calls `dlopen`/`dlsym`; the handle is kept (the library stays loaded anyway).
unsafe fn symbol(lib: &str, name: &CStr) -> Option<*mut libc::c_void> {
    let lib = std::ffi::CString::new(lib).ok()?;
    let handle = libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
    if handle.is_null() {
        return None;
    }
    let f = libc::dlsym(handle, name.as_ptr());
    (!f.is_null()).then_some(f)
}

/// This thread's caps in force and its own counts from before the first of them.
#[derive(Default)]
struct Caps {
    /// The live guards' caps (0: none), by guard id: guards may end in any order (a Julia
    /// task that yields inside a solver lets another task's call start and end on the
    /// same thread).
    live: Vec<(u64, u32)>,
    /// The thread's own OpenMP count, read before the first live guard.
    own_omp: Option<c_int>,
    /// The thread's own MKL count, read before the library first set one.
    own_mkl: Option<c_int>,
    /// MKL's local setting before the library set one (0: the process-wide count).
    mkl_local: Option<c_int>,
    next_id: u64,
}

thread_local! {
    static CAPS: std::cell::RefCell<Caps> = std::cell::RefCell::new(Caps::default());
    /// libtorch's per-thread set-up has run on this thread (under a guard, which put the
    /// thread's own OpenMP count back after it): later calls cannot have it overwritten.
    static SET_UP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// libtorch's per-thread operation state exists on this thread ([`prepare_thread`]).
    static PREPARED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes libtorch's per-thread operation state on this thread, once, inside the foreign
/// fork gate. A thread's first libtorch operation builds its record-function state, which
/// copies the process-wide callbacks under a mutex of libtorch's that no fork handler
/// protects: a child forked while another thread's first operation held it hung at its
/// own first operation (1 fork in about 20,000 in the C fork sweep). Called where the C
/// boundary begins a fallible call, before any libtorch work; cheap after the first time.
/// A failure here (no memory) changes nothing: the call's own first operation then builds
/// the state, outside the gate.
pub(crate) fn prepare_thread() {
    if PREPARED.with(std::cell::Cell::get) {
        return;
    }
    // (any operation through libtorch's dispatcher builds the state; an empty one is the
    // cheapest)
    let made = crate::fork_safe::foreign(|| {
        tch::Tensor::f_empty([0i64], (tch::Kind::Float, tch::Device::Cpu)).is_ok()
    });
    PREPARED.with(|p| p.set(made));
}

/// A guard that changes nothing (a call without a cap on a thread already set up).
const INERT: u64 = u64::MAX;

impl Caps {
    /// The tightest live cap (0: none).
    fn effective(&self) -> u32 {
        self.live
            .iter()
            .map(|&(_, c)| c)
            .filter(|&c| c != 0)
            .min()
            .unwrap_or(0)
    }

    /// Sets this thread's counts to the smaller of the tightest live cap and its own
    /// counts (its own where no cap is live), or back to its own once no guard is live.
    fn apply(&mut self) {
        let controls = controls();
        let cap = self.effective().min(c_int::MAX as u32) as c_int;
        if let (Some((set, _)), Some(own)) = (controls.omp, self.own_omp) {
            let n = if cap == 0 { own } else { cap.min(own) };
            // SAFETY: OpenMP API call on the current thread.
            unsafe { set(n.max(1)) };
        }
        if let Some((set_local, get)) = controls.mkl {
            if cap != 0 {
                // the thread's own count, read before the library first sets one (only
                // calls with a cap, serial_on's included, read it)
                // SAFETY: MKL API call on the current thread.
                let own = *self
                    .own_mkl
                    .get_or_insert_with(|| get.map_or(c_int::MAX, |get| unsafe { get() }));
                // SAFETY: MKL API call on the current thread; it returns the previous
                // local count.
                let previous = unsafe { set_local(cap.min(own).max(1)) };
                self.mkl_local.get_or_insert(previous);
            } else if let Some(previous) = self.mkl_local.take() {
                // SAFETY: as above; 0 puts back the process-wide count.
                unsafe { set_local(previous.max(0)) };
            }
        }
        if self.live.is_empty() {
            self.own_omp = None;
            self.own_mkl = None;
        }
    }
}

/// The cap on this thread's libtorch work while a [`Cap`] lives (0: none).
#[cfg(test)]
fn current() -> u32 {
    CAPS.with(|c| c.borrow().effective())
}

/// libtorch's threads on this thread capped at `max_threads` (0: no cap) until dropped.
#[must_use = "the cap ends when the guard is dropped"]
pub(crate) struct Cap {
    id: u64,
    /// A guard belongs to its thread's caps (not `Send`).
    _thread: std::marker::PhantomData<*const ()>,
}

/// Caps the libtorch work of the current thread at `max_threads` threads (0: no cap) until
/// the guard drops (see the module): each count becomes the smaller of the tightest live
/// cap and the thread's own count from before (a cap never raises one). With or without a
/// cap, the thread's own counts are what they were before once the last guard is gone,
/// even though libtorch's per-thread set-up (at the call's first parallel kernel) would
/// overwrite its OpenMP count. Guards may be dropped in any order.
pub(crate) fn cap(max_threads: u32) -> Cap {
    if max_threads == 0 && SET_UP.with(std::cell::Cell::get) {
        // nothing to cap, nothing libtorch could overwrite
        return Cap {
            id: INERT,
            _thread: std::marker::PhantomData,
        };
    }
    // (OpenMP's, MKL's and libtorch's set-up calls inside the fork gate: MKL's set-up takes
    // its own spin lock, which a child forked meanwhile would find held forever)
    crate::fork_safe::foreign(|| capped(max_threads))
}

/// [`cap`]'s work, inside the foreign fork gate.
fn capped(max_threads: u32) -> Cap {
    CAPS.with(|caps| {
        let mut caps = caps.borrow_mut();
        let set_up = SET_UP.with(std::cell::Cell::get);
        if caps.live.is_empty() {
            let controls = controls();
            // the thread's own counts, read before libtorch's per-thread set-up can
            // overwrite them; the set-up runs now, so that it cannot undo what follows
            // SAFETY: OpenMP and MKL API calls on the current thread.
            caps.own_omp = controls.omp.map(|(_, get)| unsafe { get() });
            if !set_up {
                // (the set-up may set MKL's local count too: the thread's own goes back)
                // SAFETY: MKL API calls on the current thread (0: the process-wide count).
                let own_local = controls.mkl.map(|(set_local, _)| unsafe { set_local(0) });
                let _ = tch::get_num_threads();
                if let (Some((set_local, _)), Some(own)) = (controls.mkl, own_local) {
                    // SAFETY: as above.
                    unsafe { set_local(own.max(0)) };
                }
            }
        }
        let id = caps.next_id;
        caps.next_id += 1;
        caps.live.push((id, max_threads));
        caps.apply();
        if !set_up {
            SET_UP.with(|s| s.set(true)); // (only once the thread's counts are its own again)
        }
        Cap {
            id,
            _thread: std::marker::PhantomData,
        }
    })
}

/// One thread for the library's own libtorch work on `device` when it is the CPU (None
/// elsewhere: a GPU's kernels do not depend on the host's thread counts). libtorch's CPU
/// reductions and matrix products split their work by the thread count, and rounding
/// follows the split: run on one thread, the library's products are the same bits under
/// every `max_threads` and OpenMP setting. Never held while user code runs.
pub(crate) fn serial_on(device: tch::Device) -> Option<Cap> {
    (device == tch::Device::Cpu).then(|| cap(1))
}

impl Drop for Cap {
    fn drop(&mut self) {
        if self.id == INERT {
            return;
        }
        CAPS.with(|caps| {
            let mut caps = caps.borrow_mut();
            caps.live.retain(|&(id, _)| id != self.id);
            crate::fork_safe::foreign(|| caps.apply());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_holds_on_its_thread_only_and_is_undone() {
        let before = tch::get_num_threads();
        {
            let _cap = cap(1);
            assert_eq!(current(), 1);
            if controls().omp.is_some() {
                assert_eq!(tch::get_num_threads(), 1);
            }
            // another thread keeps libtorch's count
            let other = std::thread::spawn(tch::get_num_threads).join().unwrap();
            assert_eq!(other, before);
            {
                let _looser = cap(4); // a looser cap inside a tighter one changes nothing
                assert_eq!(current(), 1);
            }
            assert_eq!(current(), 1);
        }
        assert_eq!(current(), 0);
        assert_eq!(tch::get_num_threads(), before);
    }

    /// A thread's own OpenMP count, set before its first capped call, is capped (never
    /// raised) during the call and the same after it.
    #[test]
    fn a_cap_keeps_and_never_raises_the_threads_own_count() {
        let Some((set, get)) = controls().omp else {
            return; // no OpenMP in this libtorch: nothing is capped
        };
        for (own, max_threads, during) in [(3, 64, 3), (3, 2, 2), (1, 8, 1), (3, 0, 3)] {
            let seen = std::thread::spawn(move || {
                // SAFETY: OpenMP API calls on this thread.
                unsafe { set(own) };
                let during = {
                    let _cap = cap(max_threads);
                    unsafe { get() }
                };
                (during, unsafe { get() })
            })
            .join()
            .unwrap();
            assert_eq!(seen, (during, own), "own {own}, cap {max_threads}");
        }
    }

    /// Guards that end out of order (calls of two tasks interleaved on one thread) leave
    /// the tightest live cap in force, and the thread's own count once none is live.
    #[test]
    fn caps_may_end_in_any_order() {
        let omp = controls().omp;
        std::thread::spawn(move || {
            // SAFETY: OpenMP API calls on this thread.
            let get = || omp.map(|(_, get)| unsafe { get() });
            if let Some((set, _)) = omp {
                unsafe { set(5) };
            }
            let outer = cap(4);
            let inner = cap(2);
            assert_eq!((current(), get()), (2, omp.map(|_| 2)));
            drop(outer); // the first one ends first
            assert_eq!((current(), get()), (2, omp.map(|_| 2)));
            let third = cap(3);
            assert_eq!(current(), 2);
            drop(inner);
            assert_eq!((current(), get()), (3, omp.map(|_| 3)));
            drop(third);
            assert_eq!((current(), get()), (0, omp.map(|_| 5)));
        })
        .join()
        .unwrap();
    }
}
