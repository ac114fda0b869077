//! Calling the op's solver: host solvers on slices of rows over solver threads, with the
//! check that every output is finite, and the checks of solutions provided through the
//! two-phase API.

use crate::error::{Error, Result, Status};
use crate::kernels::builtin::Builtin;
use crate::solver::Solver;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// What solves an op's perturbed problems.
#[derive(Clone)]
pub(crate) enum SolverKind {
    /// A host solver (a C callback or a Rust closure).
    Host(Arc<dyn Solver>),
    /// A built-in solver running in libtorch on the op's device.
    Builtin(Builtin),
    /// Solved elsewhere, through the two-phase API only.
    External,
}

/// Where a forward call's solutions come from.
pub(crate) enum Source<'a> {
    /// The op's own solver.
    Solver(&'a SolverKind),
    /// Solutions handed back after a [`Draw`]: `[rows, output_numel]` host floats, rows in
    /// the order of the draw's inputs.
    Provided(&'a [f32]),
}

/// Rows `first .. first + rows` of provided solutions `[*, o]`, checked finite, on `device`.
pub(crate) fn provided(
    all: &[f32],
    first: usize,
    rows: usize,
    o: usize,
    device: Device,
) -> Result<Tensor> {
    let part = &all[first * o..(first + rows) * o];
    check_provided(part, first, o)?;
    Ok(crate::tensors::from_slice(part)?
        .f_view([rows as i64, o as i64])?
        .f_to_device(device)?)
}

/// NON_FINITE_INPUT naming the first non-finite value of provided solution rows that start
/// at row `first`.
pub(crate) fn check_provided(part: &[f32], first: usize, o: usize) -> Result<()> {
    match part.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::new(
            Status::NonFiniteInput,
            format!(
                "solutions[{}][{}] is {}; solutions must be finite",
                first + i / o,
                i % o,
                part[i]
            ),
        )),
    }
}

/// Calls a host solver on the rows of `x` (copied to the host if needed) and returns the
/// solutions `[rows, o]` on the CPU.
pub(crate) fn solve_host(
    solver: &dyn Solver,
    x: &Tensor,
    o: usize,
    threads: usize,
) -> Result<Tensor> {
    let x = x.f_to_device(Device::Cpu)?.f_contiguous()?;
    let rows = x.size()[0] as usize;
    let d = x.numel() / rows.max(1);
    // initialized before it is viewed as a slice (solve_rows then fills it with NaN)
    let y = Tensor::f_zeros([rows as i64, o as i64], (Kind::Float, Device::Cpu))?;
    if rows == 0 {
        return Ok(y); // nothing to solve (and empty tensors have no data pointer)
    }
    // SAFETY: x and y are contiguous float32 CPU tensors of rows·d and rows·o initialized
    // elements that outlive these slices; y is fresh, so not aliased.
    let (xs, ys) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * d),
            std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, rows * o),
        )
    };
    solve_rows(solver, xs, ys, rows, d, o, threads)?;
    Ok(y)
}

/// Calls the solver on `rows` problems, split into contiguous slices over `threads`
/// threads, and checks that every output is finite. Outputs are pre-filled with NaN so
/// that a solver that writes nothing is caught.
pub(crate) fn solve_rows(
    solver: &dyn Solver,
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    d: usize,
    o: usize,
    threads: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(()); // the solver is never called with count 0
    }
    y.fill(f32::NAN);
    let threads = threads.clamp(1, rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    let result = if threads == 1 {
        solver.solve(x, rows, y)
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = x
                .chunks(per * d)
                .zip(y.chunks_mut(per * o))
                .map(|(xs, ys)| scope.spawn(move || solver.solve(xs, xs.len() / d, ys)))
                .collect();
            let mut first = Ok(());
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|payload| std::panic::resume_unwind(payload));
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    };
    result.map_err(|msg| Error::new(Status::SolverFailed, format!("the solver failed: {msg}")))?;
    // one vectorizable pass, then the position
    if let Some(i) = (!crate::input::all_finite(y))
        .then(|| y.iter().position(|v| !v.is_finite()))
        .flatten()
    {
        return Err(Error::new(
            Status::SolverFailed,
            format!(
                "the solver wrote {} at output {} of perturbed problem {}; outputs must be finite (was every output written?)",
                y[i],
                i % o,
                i / o
            ),
        ));
    }
    Ok(())
}
