//! Uninitialized floats: float slices not yet (or no longer required to be) initialized,
//! for kernels that write every element of a buffer once (the tape's kept scores, the
//! noise) and so need neither zero it first nor copy into it from a buffer of their own.

use std::mem::MaybeUninit;

/// Floats seen as uninitialized floats, to be written.
///
/// # Safety
/// Only initialized values may be written through the result (never
/// `MaybeUninit::uninit()`), so that `v` stays initialized for its owner.
pub(crate) unsafe fn as_uninit<T>(v: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has the layout of T; the same memory, borrowed as `v` was
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// Uninitialized floats whose every element has been written, as floats.
///
/// # Safety
/// Every element of `v` must be initialized.
pub(crate) unsafe fn written<T>(v: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: the caller's promise; MaybeUninit<T> has the layout of T
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}
