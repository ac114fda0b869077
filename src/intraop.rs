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
use std::cell::Cell;
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
            let omp = ["libgomp.so.1", "libiomp5.so", "libomp.so.5", "libomp.so"]
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

thread_local! {
    /// The cap in force on this thread (0: none).
    static CAPPED: Cell<u32> = const { Cell::new(0) };
}

/// The cap on this thread's libtorch work while a [`Cap`] lives (0: none).
pub(crate) fn current() -> u32 {
    CAPPED.with(Cell::get)
}

/// libtorch's threads on this thread capped at `max_threads` (0: no cap) until dropped.
#[must_use = "the cap ends when the guard is dropped"]
pub(crate) struct Cap {
    previous_omp: Option<c_int>,
    previous_mkl: Option<c_int>,
    previous_cap: u32,
}

/// Caps the libtorch work of the current thread at `max_threads` threads (see the module):
/// each count becomes the smaller of the cap and the thread's count before the call (a
/// cap never raises one), and the thread's own counts come back when the guard drops.
pub(crate) fn cap(max_threads: u32) -> Cap {
    let previous_cap = current();
    let mut guard = Cap {
        previous_omp: None,
        previous_mkl: None,
        previous_cap,
    };
    // an enclosing cap that is tighter stays
    if max_threads == 0 || (previous_cap != 0 && previous_cap <= max_threads) {
        return guard;
    }
    CAPPED.with(|c| c.set(max_threads));
    let controls = controls();
    let n = max_threads.min(c_int::MAX as u32) as c_int;
    // the caller's own counts, read before libtorch's per-thread set-up (on this thread's
    // first parallel region) can overwrite them
    // SAFETY: OpenMP and MKL API calls on the current thread.
    let own_omp = controls.omp.map(|(_, get)| unsafe { get() });
    let own_mkl = controls
        .mkl
        .map(|(_, get)| get.map_or(c_int::MAX, |get| unsafe { get() }));
    // libtorch's set-up runs now, so that it cannot undo the cap later in the call
    let _ = tch::get_num_threads();
    if let (Some((set, _)), Some(own)) = (controls.omp, own_omp) {
        guard.previous_omp = Some(own);
        // SAFETY: as above.
        unsafe { set(n.min(own.max(1))) };
    }
    if let (Some((set_local, _)), Some(own)) = (controls.mkl, own_mkl) {
        // SAFETY: as above; it returns the previous local count (0: the process-wide one).
        guard.previous_mkl = Some(unsafe { set_local(n.min(own.max(1))) });
    }
    guard
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
        let controls = controls();
        if let (Some(previous), Some((set, _))) = (self.previous_omp, controls.omp) {
            // SAFETY: as in `cap`.
            unsafe { set(previous.max(1)) };
        }
        if let (Some(previous), Some((set_local, _))) = (self.previous_mkl, controls.mkl) {
            // SAFETY: as in `cap`; 0 puts back the process-wide count.
            unsafe { set_local(previous.max(0)) };
        }
        CAPPED.with(|c| c.set(self.previous_cap));
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
        for (own, max_threads, during) in [(3, 64, 3), (3, 2, 2), (1, 8, 1)] {
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
}
