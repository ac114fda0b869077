//! Uninitialized floats: float slices not yet (or no longer required to be) initialized,
//! for kernels that write every element of a buffer once (the tape's kept scores, the
//! noise) and so need neither zero it first nor copy into it from a buffer of their own.

use std::mem::MaybeUninit;

/// Floats seen as uninitialized floats, to be written.
///
/// # Safety
/// Only initialized values may be written through the result (never
/// `MaybeUninit::uninit()`), so that `v` stays initialized for its owner.
pub(crate) unsafe fn as_uninit(v: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has the layout of f32; the same memory, borrowed as `v` was
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// Uninitialized floats whose every element has been written, as floats.
///
/// # Safety
/// Every element of `v` must be initialized.
pub(crate) unsafe fn written(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: the caller's promise; MaybeUninit<f32> has the layout of f32
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}
