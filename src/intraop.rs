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

use once_cell::sync::Lazy;
use std::cell::Cell;
use std::ffi::{c_int, CStr};

type SetFn = unsafe extern "C" fn(c_int);
type GetFn = unsafe extern "C" fn() -> c_int;
type SetLocalFn = unsafe extern "C" fn(c_int) -> c_int;

struct Controls {
    omp_set: Option<(SetFn, GetFn)>,
    mkl_set_local: Option<SetLocalFn>,
}

static CONTROLS: Lazy<Controls> = Lazy::new(|| {
    // SAFETY: looking up symbols of libraries this process has loaded; a found symbol has
    // the C signature of its documented function.
    unsafe {
        let omp_set = ["libgomp.so.1", "libiomp5.so", "libomp.so.5", "libomp.so"]
            .iter()
            .find_map(|lib| {
                let set = symbol(lib, c"omp_set_num_threads")?;
                let get = symbol(lib, c"omp_get_max_threads")?;
                Some((
                    std::mem::transmute::<*mut libc::c_void, SetFn>(set),
                    std::mem::transmute::<*mut libc::c_void, GetFn>(get),
                ))
            });
        let mkl_set_local = symbol("libtorch_cpu.so", c"MKL_Set_Num_Threads_Local")
            .map(|f| std::mem::transmute::<*mut libc::c_void, SetLocalFn>(f));
        Controls {
            omp_set,
            mkl_set_local,
        }
    }
});

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

/// Caps the libtorch work of the current thread at `max_threads` threads (see the module).
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
    let controls = &*CONTROLS;
    // libtorch sets this thread's counts on its first parallel region: let it do so
    // first, so that it does not undo the cap
    let _ = tch::get_num_threads();
    let n = max_threads.min(c_int::MAX as u32) as c_int;
    if let Some((set, get)) = controls.omp_set {
        // SAFETY: OpenMP API calls on the current thread.
        unsafe {
            guard.previous_omp = Some(get());
            set(n);
        }
    }
    if let Some(set_local) = controls.mkl_set_local {
        // SAFETY: MKL API call on the current thread; it returns the previous local count.
        guard.previous_mkl = Some(unsafe { set_local(n) });
    }
    guard
}

impl Drop for Cap {
    fn drop(&mut self) {
        let controls = &*CONTROLS;
        if let (Some(previous), Some((set, _))) = (self.previous_omp, controls.omp_set) {
            // SAFETY: as in `cap`.
            unsafe { set(previous.max(1)) };
        }
        if let (Some(previous), Some(set_local)) = (self.previous_mkl, controls.mkl_set_local) {
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
            if CONTROLS.omp_set.is_some() {
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
}
