//! The hook of `pert_op_on_free`: a C function that runs when an op is freed, after its
//! workers stopped (for code built on the library that keeps state with an op: the MPI
//! component).

use std::ffi::c_void;

/// A function that `pert_op_free` calls with its pointer (see `pert_op_on_free`).
pub type pert_free_hook = Option<unsafe extern "C" fn(data: *mut c_void)>;

/// A C function and its pointer, called once when dropped (see `pert_op_on_free`).
#[derive(Default)]
pub(crate) struct FreeHook(std::sync::Mutex<Option<(unsafe extern "C" fn(*mut c_void), SendPtr)>>);

/// The hook's pointer: the C caller's, passed back untouched on whatever thread frees the
/// op (the contract of `pert_op_on_free`).
struct SendPtr(*mut c_void);
// SAFETY: the library never dereferences it; the caller promises it may be used from the
// thread that frees the op
unsafe impl Send for SendPtr {}

impl FreeHook {
    /// Sets the hook (None: removes it); the one set before is dropped without running.
    pub(crate) fn set(&self, hook: pert_free_hook, data: *mut c_void) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *slot = hook.map(|h| (h, SendPtr(data)));
    }
}

impl Drop for FreeHook {
    fn drop(&mut self) {
        let hook = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((hook, data)) = hook {
            // SAFETY: the caller's function, with the pointer it gave (pert_op_on_free)
            unsafe { hook(data.0) };
        }
    }
}
