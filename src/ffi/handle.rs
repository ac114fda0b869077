//! Opaque handles: how the C layer gives a Rust value to C, borrows it back for a call, and
//! frees it (the pattern of rustls-ffi's `Castable`). Each handle type (`pert_config`,
//! `pert_op`, `pert_tape`, `pert_draw`) wraps one value of the safe API and implements
//! [`Handle`]; nothing else in the C layer calls `Box::into_raw` or `Box::from_raw`.

use super::boundary::null;
use crate::error::Result;

/// A C handle that owns one value of the safe API.
pub(crate) trait Handle: Sized + 'static {
    /// The value the handle owns.
    type Inner;

    /// The handle of `inner`.
    fn wrap(inner: Self::Inner) -> Self;

    /// The value the handle owns.
    fn inner(&self) -> &Self::Inner;

    /// The value the handle owns, mutably.
    fn inner_mut(&mut self) -> &mut Self::Inner;

    /// `inner` boxed as a handle, not yet given to C: made (its allocation included)
    /// before a call writes any output, so that a call that fails gives nothing.
    fn boxed(inner: Self::Inner) -> Owned<Self> {
        Owned(Box::new(Self::wrap(inner)))
    }

    /// `inner` given to C as a handle: C owns it until its `_free`.
    fn into_raw(inner: Self::Inner) -> *mut Self {
        Self::boxed(inner).into_raw()
    }

    /// The value of the handle `ptr`, borrowed for the call; None for NULL.
    ///
    /// # Safety
    /// A non-NULL `ptr` must be a live handle of this type, from this library.
    unsafe fn get<'a>(ptr: *const Self) -> Option<&'a Self::Inner> {
        // SAFETY: the caller's promise
        unsafe { ptr.as_ref() }.map(Self::inner)
    }

    /// The value of the handle `ptr`, borrowed for the call, or NULL_ARGUMENT naming
    /// `name`.
    ///
    /// # Safety
    /// A non-NULL `ptr` must be a live handle of this type, from this library.
    unsafe fn borrow<'a>(ptr: *const Self, name: &str) -> Result<&'a Self::Inner> {
        // SAFETY: the caller's promise
        unsafe { Self::get(ptr) }.ok_or_else(|| null(name))
    }

    /// The value of the handle `ptr`, borrowed mutably for the call, or NULL_ARGUMENT
    /// naming `name`.
    ///
    /// # Safety
    /// A non-NULL `ptr` must be a live handle of this type, from this library, that no
    /// other thread uses during the call.
    unsafe fn borrow_mut<'a>(ptr: *mut Self, name: &str) -> Result<&'a mut Self::Inner> {
        // SAFETY: the caller's promise
        unsafe { ptr.as_mut() }
            .map(Self::inner_mut)
            .ok_or_else(|| null(name))
    }

    /// Frees the handle `ptr` (its value dropped); NULL is ignored.
    ///
    /// # Safety
    /// A non-NULL `ptr` must be a handle of this type given to C by this library, not
    /// freed before, and not used after.
    unsafe fn free(ptr: *mut Self) {
        if !ptr.is_null() {
            // SAFETY: the caller's promise: the box of `into_raw`, freed once
            drop(unsafe { Box::from_raw(ptr) });
        }
    }
}

/// A handle made but not yet given to C (see [`Handle::boxed`]).
pub(crate) struct Owned<H>(Box<H>);

impl<H> Owned<H> {
    /// Gives the handle to C: the pointer C frees with the handle's `_free`.
    pub fn into_raw(self) -> *mut H {
        Box::into_raw(self.0)
    }
}

/// Implements [`Handle`] for a C handle type whose one field `inner` holds the value.
macro_rules! handle {
    ($handle:ident, $inner:ty) => {
        impl $crate::ffi::handle::Handle for $handle {
            type Inner = $inner;
            fn wrap(inner: $inner) -> Self {
                $handle { inner }
            }
            fn inner(&self) -> &$inner {
                &self.inner
            }
            fn inner_mut(&mut self) -> &mut $inner {
                &mut self.inner
            }
        }
    };
}
pub(crate) use handle;
