//! Helpers between libtorch tensors and host buffers, shared by the layers above.

use crate::error::Result;
use tch::{Device, Tensor};

/// Whether `bytes` more can be held by this machine at all: at most its RAM and swap
/// (read once). Large host buffers are checked with this before they are reserved, so that
/// an impossible size is an error even where the system overcommits memory (it would grant
/// the allocation and kill the process when the buffer is written).
pub(crate) fn fits_in_memory(bytes: u128) -> bool {
    // (no lock: threads that race each read it; a forked child never waits)
    static TOTAL: once_cell::race::OnceBox<u128> = once_cell::race::OnceBox::new();
    let total = *TOTAL.get_or_init(|| {
        if cfg!(miri) {
            return Box::new(u128::MAX); // (Miri has no sysinfo: the allocator decides)
        }
        // SAFETY: sysinfo fills the zeroed struct it is given.
        let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
        Box::new(if unsafe { libc::sysinfo(&mut info) } != 0 {
            u128::MAX // unknown: the allocator decides
        } else {
            let unit = u128::from(info.mem_unit.max(1));
            (u128::from(info.totalram) + u128::from(info.totalswap)) * unit
        })
    });
    bytes <= total
}

/// An empty host buffer with room for `n` values of `T`, or TORCH_ERROR naming `what` when
/// the machine cannot hold them (checked before reserving: see [`fits_in_memory`]) or the
/// reservation fails: a large buffer never aborts the process.
pub(crate) fn host_room<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let bytes = n as u128 * std::mem::size_of::<T>() as u128;
    let mut out = Vec::new();
    if !fits_in_memory(bytes) || out.try_reserve_exact(n).is_err() {
        return Err(crate::error::Error::new(
            crate::error::Status::TorchError,
            format!("cannot allocate {bytes} bytes for {what}"),
        ));
    }
    Ok(out)
}

/// `n` floats, each a NaN, reserved as [`host_room`] does: the room a solver writes, where
/// an output it leaves unwritten stays NaN and is caught. Filled as bytes (all ones, a
/// NaN), at the speed of `memset`.
pub(crate) fn nan_room(n: usize, what: &str) -> Result<Vec<f32>> {
    let mut out = host_room::<f32>(n, what)?;
    // SAFETY: the room holds n floats (reserved above); all-ones bits are a valid f32 (a
    // NaN), so after the fill the first n elements are initialized.
    unsafe {
        std::ptr::write_bytes(out.as_mut_ptr(), 0xff, n);
        out.set_len(n);
    }
    Ok(out)
}

/// The values of a tensor as `T` (converted to its kind), flattened, on the host (a copy).
fn host_values<T: tch::kind::Element>(t: &Tensor) -> Result<Vec<T>> {
    let host = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(T::KIND)?
        .f_contiguous()?;
    let n = host.numel();
    let mut out = host_room(n, "a tensor's values on the host")?;
    if n > 0 {
        // SAFETY: a contiguous CPU tensor of n elements of kind T (a fresh or the caller's
        // tensor, not written while this copies), into the Vec's room for n values, which
        // are then all initialized.
        unsafe {
            std::ptr::copy_nonoverlapping(host.data_ptr() as *const T, out.as_mut_ptr(), n);
            out.set_len(n);
        }
    }
    Ok(out)
}

/// The values of a float32 tensor, flattened, on the host.
pub(crate) fn host_floats(t: &Tensor) -> Result<Vec<f32>> {
    host_values(t)
}

/// The values of a float64 tensor, flattened, on the host (a copy).
pub(crate) fn host_doubles(t: &Tensor) -> Result<Vec<f64>> {
    host_values(t)
}

/// The values of a float32 tensor, flattened, on the host: borrowed from `t` itself when it
/// is a contiguous CPU float32 tensor (no copy), else copied (see [`host_floats`]).
pub(crate) enum HostFloats {
    /// A contiguous CPU float32 tensor, kept alive while its values are borrowed.
    Tensor(Tensor),
    Copied(Vec<f32>),
}

impl HostFloats {
    /// The values of `t`.
    pub fn of(t: &Tensor) -> Result<HostFloats> {
        if t.device() == Device::Cpu && t.kind() == tch::Kind::Float && t.is_contiguous() {
            return Ok(HostFloats::Tensor(t.shallow_clone()));
        }
        Ok(HostFloats::Copied(host_floats(t)?))
    }
}

impl std::ops::Deref for HostFloats {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            HostFloats::Tensor(t) if t.numel() > 0 => {
                // SAFETY: a contiguous CPU float32 tensor of numel() elements, held by
                // `self` for the slice's lifetime; the crate reads it only (it is the
                // caller's input or the crate's own copy of it).
                unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) }
            }
            HostFloats::Tensor(_) => &[], // empty tensors have no data pointer
            HostFloats::Copied(v) => v,
        }
    }
}

/// A new tensor with the values of `t`, sharing no storage with it.
pub(crate) fn copy(t: &Tensor) -> Result<Tensor> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

/// The elements of a contiguous CPU tensor whose kind is `T`, to change in place (the
/// accumulator's own tensors; anything else is a bug of this crate).
pub(crate) fn host_slice_uninit<T: tch::kind::Element>(
    t: &mut Tensor,
) -> &mut [std::mem::MaybeUninit<T>] {
    assert!(
        t.device() == Device::Cpu && t.is_contiguous() && t.kind() == T::KIND,
        "host sums need a contiguous CPU {:?} tensor, got {:?} on {:?}",
        T::KIND,
        t.kind(),
        t.device()
    );
    if t.numel() == 0 {
        return &mut []; // libtorch gives empty tensors no data pointer
    }
    // SAFETY: a contiguous CPU tensor of numel() elements of kind T (written or not: seen
    // as maybe-uninitialized values), borrowed mutably for the slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast(), t.numel()) }
}

/// The elements of a contiguous CPU tensor of kind `T`, every one written, as a slice.
pub(crate) fn host_slice<T: tch::kind::Element>(t: &mut Tensor) -> &mut [T] {
    // SAFETY: the tensors this is called on are written (libtorch's fills and copies, the
    // library's kernels, the accumulator's sums once zeroed); the sums handed over
    // unwritten are seen through `host_slice_uninit` alone
    unsafe { crate::uninit::written(host_slice_uninit(t)) }
}

/// A 1-d CPU tensor holding a copy of `values`. Unlike `Tensor::f_from_slice`, which fills
/// the new tensor with zeros first (a parallel libtorch kernel for large buffers: the
/// OpenMP rule of [`crate::tuning`]), it only copies.
pub(crate) fn from_slice<T: tch::kind::Element>(values: &[T]) -> Result<Tensor> {
    let t = Tensor::f_empty([values.len() as i64], (T::KIND, Device::Cpu))?;
    if !values.is_empty() {
        // SAFETY: a fresh contiguous CPU tensor of `values.len()` elements of kind T, not
        // aliased; the source is a distinct Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), t.data_ptr() as *mut T, values.len())
        };
    }
    Ok(t)
}

/// `f` on a 1-d CPU tensor that views `values` in place (no copy), for an input that a call
/// only reads: `f` must not keep the view (or a shallow copy of it) past its return and
/// must not write through it. A result of `f` that shares the view's memory is copied
/// before the view ends, so what is returned never reads `values` (a result of no
/// elements is returned as it is: it has nothing to read).
pub(crate) fn with_view<T: tch::kind::Element>(
    values: &[T],
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    // SAFETY: f's result is checked (and copied if it shares the view), and nothing else
    // leaves f
    let (out, ()) = unsafe { with_view_and(values, |v| Ok((f(v)?, ()))) }?;
    Ok(out)
}

/// As [`with_view`], for a call whose result is a tensor (checked: copied if it shares the
/// view's memory, as there) and more of its own, `R`.
///
/// # Safety
/// `R` must hold no tensor that shares the view's memory (no view of it, no shallow copy):
/// the view ends when this returns, and `values`' borrow with it.
pub(crate) unsafe fn with_view_and<T: tch::kind::Element, R>(
    values: &[T],
    f: impl FnOnce(&Tensor) -> Result<(Tensor, R)>,
) -> Result<(Tensor, R)> {
    if values.is_empty() {
        return f(&from_slice(values)?); // an empty slice has no usable pointer
    }
    // SAFETY: `values.len()` elements of T, contiguous and readable while `values` is
    // borrowed, which outlasts the view: it is dropped at the end of this function, and
    // `f` keeps no copy of it (its contract and this function's; no autograd graph records
    // it either).
    let view = unsafe {
        Tensor::f_from_blob(
            values.as_ptr() as *const u8,
            &[values.len() as i64],
            &[1],
            T::KIND,
            Device::Cpu,
        )
    }?;
    let _no_graph = tch::no_grad_guard();
    let (out, more) = f(&view)?;
    let (start, end) = (
        values.as_ptr() as usize,
        values.as_ptr() as usize + std::mem::size_of_val(values),
    );
    let at = out.data_ptr() as usize;
    if out.numel() > 0 && out.device() == Device::Cpu && (start..end).contains(&at) {
        return Ok((copy(&out)?, more)); // shares the viewed memory: made independent of it
    }
    Ok((out, more))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The room a solver writes is NaN everywhere, for every length (Miri checks the fill).
    #[test]
    fn nan_room_is_nan_everywhere() {
        for n in [0, 1, 3, 16, 17, 100] {
            let room = nan_room(n, "test").unwrap();
            assert_eq!(room.len(), n);
            assert!(room.iter().all(|v| v.is_nan()), "n {n}");
        }
    }

    #[test]
    fn a_view_never_outlives_its_call() {
        let values = vec![1.0f32, 2.0, 3.0, 4.0];
        let range = values.as_ptr() as usize..values.as_ptr() as usize + 16;
        // a result made from the view is its own tensor
        let doubled = with_view(&values, |v| Ok(v.f_mul_scalar(2.0)?)).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&doubled).unwrap(),
            [2.0, 4.0, 6.0, 8.0]
        );
        // results that share the view (itself, a part of it) are copied
        for part in [0i64, 2] {
            let same = with_view(&values, |v| Ok(v.f_narrow(0, part, 4 - part)?)).unwrap();
            assert!(!range.contains(&(same.data_ptr() as usize)), "part {part}");
            assert_eq!(
                Vec::<f32>::try_from(&same).unwrap(),
                values[part as usize..].to_vec()
            );
        }
        // an empty input
        let empty = with_view::<f32>(&[], |v| Ok(v.shallow_clone())).unwrap();
        assert_eq!(empty.numel(), 0);
    }
}
