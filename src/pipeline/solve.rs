//! Calling the op's solver: host solvers on slices of rows over solver threads, with the
//! check that every output is finite, and the checks of solutions provided through the
//! two-phase API.

use crate::error::{Error, Result, Status};
use crate::kernels::builtin::{Builtin, Solutions};
use crate::kernels::workers::{restoring_fp_state, Workers};
use crate::pipeline::cache::CallCache;
use crate::pipeline::plan::OpSpec;
use crate::shape::batched;
use crate::solver::{DeviceSolver, SolveInfo, Solver, WorkerSolver};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// What solves an op's perturbed problems.
#[derive(Clone)]
pub(crate) enum SolverKind {
    /// A host solver (a C callback or a Rust closure), with its workers when it has them.
    Host(Arc<HostSolver>),
    /// A built-in solver: in Rust on host buffers on the CPU's host paths (the fused
    /// argmax, or kernels/builtin's host kernels), with libtorch on the chunk pipeline.
    Builtin(Builtin),
    /// A solver working on the op's device memory (the libtorch chunk pipeline).
    Device(Arc<dyn DeviceSolver>),
    /// Solved elsewhere, through the two-phase API only.
    External,
}

/// Where a forward call's solutions come from.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// The op's own solver.
    Solver(&'a SolverKind),
    /// Solutions handed back after a [`crate::Draw`]: `[rows, output_numel]` host floats, rows in
    /// the order of the draw's inputs.
    Provided(&'a [f32]),
}

impl OpSpec {
    /// Where rows of a call on `batch` problems sit, for a solver call on the calling
    /// thread (worker 0), on the op's device.
    pub(crate) fn rows_at(&self, clean: bool, first_row: u64, batch: usize) -> SolveInfo {
        SolveInfo {
            worker: 0,
            clean,
            first_row,
            num_samples: self.config.num_samples(),
            batch,
            cuda_device: match self.device {
                Device::Cuda(i) => Some(i),
                _ => None,
            },
            pool: None,
        }
    }

    /// Solves the problems `x` `[rows, d]` with the op's own solver (`at` says which rows
    /// of the call they are; its worker is ignored).
    pub(crate) fn solve(
        &self,
        solver: &SolverKind,
        x: &Tensor,
        at: SolveInfo,
    ) -> Result<Solutions> {
        let solutions = self.solve_uncounted(solver, x, at)?;
        self.count_solved(x.size()[0] as usize);
        Ok(solutions)
    }

    /// The rows `x` `[rows, d]` (on the op's device, as copied to the host when needed) of
    /// a call of `cache`'s, solved or answered from the pool as [`CallCache::solutions`]
    /// decides; the solutions on the op's device.
    pub(crate) fn solve_cached(
        &self,
        solver: &SolverKind,
        x: &Tensor,
        at: SolveInfo,
        cache: &CallCache,
    ) -> Result<Solutions> {
        let (d, o) = (self.input_numel, self.output_numel);
        let rows = x.size()[0] as usize;
        let xs = crate::tensors::host_floats(x)?;
        let mut y = crate::tensors::host_room(rows * o, "the solutions")?;
        y.resize(rows * o, 0.0);
        let exact_info = match solver {
            SolverKind::Host(host) => host.workers().is_some(),
            SolverKind::Device(_) => true,
            _ => false,
        };
        // the rows are on the device for a device solver only (the others get them in
        // host memory, and so warm starts too)
        let at = match solver {
            SolverKind::Device(_) => at,
            _ => SolveInfo {
                cuda_device: None,
                ..at
            },
        };
        cache.solutions(
            &at,
            (&xs, d, exact_info),
            rows,
            &mut y,
            |info, xs, count, ys| {
                let part = crate::tensors::from_slice(xs)?
                    .f_view([count as i64, d as i64])?
                    .f_to_device(self.device)?;
                let solved = self.solve(solver, &part, info.clone())?.dense(o as i64)?;
                ys.copy_from_slice(&crate::tensors::host_floats(&solved)?);
                Ok(())
            },
        )?;
        Ok(Solutions::Dense(
            crate::tensors::from_slice(&y)?
                .f_view([rows as i64, o as i64])?
                .f_to_device(self.device)?,
        ))
    }

    fn solve_uncounted(&self, solver: &SolverKind, x: &Tensor, at: SolveInfo) -> Result<Solutions> {
        match solver {
            SolverKind::Builtin(builtin) => {
                let x = x.f_view(batched(x.size()[0] as usize, &self.input_shape).as_slice())?;
                builtin.solve(
                    &x,
                    *self.input_shape.last().expect("built-ins have rank >= 1"),
                )
            }
            SolverKind::Host(host) => {
                let y = solve_host(
                    host,
                    x,
                    self.output_numel,
                    self.config.effective_threads(),
                    SolveInfo {
                        cuda_device: None, // host solvers get host memory
                        ..at
                    },
                )?;
                Ok(Solutions::Dense(to_op_device(y, self.device)?))
            }
            SolverKind::Device(device) => Ok(Solutions::Dense(solve_on_device(
                &**device,
                &x.f_view([x.size()[0], self.input_numel as i64])?,
                self.output_numel,
                at,
            )?)),
            SolverKind::External => unreachable!("external ops are refused before solving"),
        }
    }
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

/// A host solver: a plain [`Solver`] called on the thread that runs its rows, or a
/// [`WorkerSolver`] with its op's persistent workers (each initialized before its first
/// solve, finalized when the op is dropped).
pub(crate) struct HostSolver {
    solver: Arc<dyn WorkerSolver>,
    workers: Option<Workers>,
    /// Per worker: its init ran (so its fini is due). Only its own thread writes it.
    ready: Vec<AtomicBool>,
    /// The first failed init's message: every later call fails with it.
    broken: std::sync::Mutex<Option<String>>,
    /// The op's theta does not change during a call while the solver runs (a C callback:
    /// the C layer passes a copy, or the caller's buffer, which the C contract keeps
    /// unchanged until the call returns), so a call may read it in place.
    private_theta: bool,
}

impl From<HostSolver> for SolverKind {
    fn from(host: HostSolver) -> SolverKind {
        SolverKind::Host(Arc::new(host))
    }
}

/// A plain solver seen as a worker solver (no state, no workers of its own).
struct Plain<S>(S);

impl<S: Solver> WorkerSolver for Plain<S> {
    fn solve(
        &self,
        _info: &SolveInfo,
        inputs: &[f32],
        count: usize,
        outputs: &mut [f32],
    ) -> std::result::Result<(), String> {
        self.0.solve(inputs, count, outputs)
    }
}

impl HostSolver {
    /// A plain solver: its rows run on the calling thread and on helper threads.
    pub(crate) fn plain(solver: impl Solver + 'static) -> HostSolver {
        HostSolver {
            solver: Arc::new(Plain(solver)),
            workers: None,
            ready: Vec::new(),
            broken: std::sync::Mutex::new(None),
            private_theta: false,
        }
    }

    /// This solver, for an op whose theta does not change while a call runs (see
    /// `private_theta`).
    pub(crate) fn with_private_theta(mut self) -> HostSolver {
        self.private_theta = true;
        self
    }

    /// Whether a call may read theta in place while this solver runs.
    pub(crate) fn theta_is_private(&self) -> bool {
        self.private_theta
    }

    /// A solver run by `threads` persistent workers of its own.
    pub(crate) fn with_workers(
        solver: impl WorkerSolver + 'static,
        threads: usize,
    ) -> Result<HostSolver> {
        let workers = Workers::new(threads.max(1)).map_err(|e| {
            Error::new(
                Status::TorchError,
                format!("cannot start {threads} worker threads: {e}"),
            )
        })?;
        Ok(HostSolver {
            solver: Arc::new(solver),
            ready: (0..workers.count())
                .map(|_| AtomicBool::new(false))
                .collect(),
            workers: Some(workers),
            broken: std::sync::Mutex::new(None),
            private_theta: false,
        })
    }

    /// The persistent workers, for a solver that has them.
    pub(crate) fn workers(&self) -> Option<&Workers> {
        self.workers.as_ref()
    }

    /// One solver call on `count` rows (`info` says which), on the current thread (worker
    /// `info.worker` when the solver has workers: its init runs first, once over the op's
    /// life; once an init has failed, every call fails with its message). Errors name the
    /// rows.
    pub(crate) fn call(
        &self,
        info: &SolveInfo,
        inputs: &[f32],
        count: usize,
        outputs: &mut [f32],
    ) -> Result<()> {
        self.init_and_solve(info, inputs, count, outputs)
    }

    /// [`HostSolver::call`]. User code may change the thread's floating-point state (flush
    /// to zero, rounding): after each call of it (the init, the solve) the state is put
    /// back, so that the solve, the library's arithmetic after it and the caller's thread
    /// run under the call's own.
    fn init_and_solve(
        &self,
        info: &SolveInfo,
        inputs: &[f32],
        count: usize,
        outputs: &mut [f32],
    ) -> Result<()> {
        if let Some(ready) = self.ready.get(info.worker) {
            let broken = |msg: &str| {
                Error::new(
                    Status::SolverFailed,
                    format!(
                        "the solver's init failed on a worker ({msg}); the op cannot solve {} (free it and make a new op)",
                        info.describe_rows(count)
                    ),
                )
            };
            if let Some(msg) = &*self.broken.lock().unwrap_or_else(|e| e.into_inner()) {
                return Err(broken(msg));
            }
            if !ready.load(Ordering::Acquire) {
                ready.store(true, Ordering::Release); // it ran: its fini is due, whatever it gives
                if let Err(msg) = restoring_fp_state(|| self.solver.init(info.worker)) {
                    let msg = format!("worker {}: {msg}", info.worker);
                    let mut first = self.broken.lock().unwrap_or_else(|e| e.into_inner());
                    let msg = first.get_or_insert(msg).clone();
                    return Err(broken(&msg));
                }
            }
        }
        restoring_fp_state(|| self.solver.solve(info, inputs, count, outputs)).map_err(|msg| {
            Error::new(
                Status::SolverFailed,
                format!("the solver failed on {}: {msg}", info.describe_rows(count)),
            )
        })
    }
}

impl Drop for HostSolver {
    fn drop(&mut self) {
        if let Some(workers) = &self.workers {
            // each worker's fini on its own thread, for the workers whose init ran
            let (solver, ready) = (&self.solver, &self.ready);
            // (none on the op's own worker, nor after fork: the threads cannot run them)
            let Ok(_turn) = workers.turn() else {
                return;
            };
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                workers.run_each(workers.count(), &|w| {
                    if ready[w].load(Ordering::Acquire) {
                        restoring_fp_state(|| solver.fini(w));
                    }
                })
            }));
        }
    }
}

/// Solutions made on the host by [`solve_host`], moved to `device`: from pinned memory the
/// copy does not block (libtorch keeps the pinned block until the copy is done).
pub(crate) fn to_op_device(y: Tensor, device: Device) -> Result<Tensor> {
    Ok(match device {
        Device::Cpu => y,
        _ => y.f_to_device_(device, Kind::Float, true, false)?,
    })
}

/// Calls a host solver on the rows of `x` (copied to the host if needed) and returns the
/// solutions `[rows, o]` on the CPU (in pinned memory when `x` is on a GPU); `at` says
/// which rows they are.
pub(crate) fn solve_host(
    solver: &HostSolver,
    x: &Tensor,
    o: usize,
    threads: usize,
    at: SolveInfo,
) -> Result<Tensor> {
    // rows of a CUDA op are staged through pinned host memory (libtorch's caching host
    // allocator keeps the blocks for the next chunk): faster copies both ways, and the
    // solutions go back to the device without blocking (see `to_op_device`)
    let device = x.device();
    let staged = |t: Tensor| -> Result<Tensor> {
        Ok(match device {
            Device::Cpu => t,
            _ => t.f_internal_pin_memory(device)?, // (pin_memory warns when given a device)
        })
    };
    let x = match device {
        Device::Cpu => x.f_contiguous()?,
        _ => {
            let mut host = staged(Tensor::f_empty(x.size(), (Kind::Float, Device::Cpu))?)?;
            host.f_copy_(x)?; // device to pinned host: waits for the copy
            host
        }
    };
    let rows = x.size()[0] as usize;
    let d = x.numel() / rows.max(1);
    // NaN (initialized) before it is viewed as a slice: an output left unwritten is caught
    let y = staged(Tensor::f_full(
        [rows as i64, o as i64],
        f64::NAN,
        (Kind::Float, Device::Cpu),
    )?)?;
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
    solve_nan_filled_rows(solver, xs, ys, rows, d, o, threads, at)?;
    Ok(y)
}

/// Calls the solver on `rows` problems, split into contiguous slices over `threads`
/// threads (the solver's workers when it has them; row r of the whole is row `r` after
/// `at.first_row`), and checks that every output is finite. The outputs `y` come filled
/// with NaN, so that a solver that writes nothing is caught.
#[allow(clippy::too_many_arguments)]
pub(crate) fn solve_nan_filled_rows(
    solver: &HostSolver,
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    d: usize,
    o: usize,
    threads: usize,
    at: SolveInfo,
) -> Result<()> {
    debug_assert!(y.iter().all(|v| v.is_nan()));
    if rows == 0 {
        return Ok(()); // the solver is never called with count 0
    }
    let threads = match solver.workers() {
        Some(workers) => threads.min(workers.count()),
        None => threads,
    }
    .clamp(1, rows);
    let per = rows.div_ceil(threads).max(1);
    let slice_info = |i: usize| SolveInfo {
        worker: i,
        first_row: at.first_row + (i * per) as u64,
        ..at.clone()
    };
    let result = if let Some(workers) = solver.workers() {
        // slice i on worker i
        let slices: Vec<_> = x
            .chunks(per * d)
            .zip(y.chunks_mut(per * o))
            .map(std::sync::Mutex::new)
            .collect();
        let results: Vec<_> = (0..slices.len())
            .map(|_| std::sync::Mutex::new(Ok(())))
            .collect();
        let _turn = workers.turn()?;
        workers.run_each(slices.len(), &|i| {
            let mut slice = slices[i].lock().unwrap_or_else(|e| e.into_inner());
            let (xs, ys) = &mut *slice;
            let r = solver.call(&slice_info(i), xs, xs.len() / d, ys);
            *results[i].lock().unwrap_or_else(|e| e.into_inner()) = r;
        });
        results
            .into_iter()
            .map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()))
            .find(|r| r.is_err())
            .unwrap_or(Ok(()))
    } else if threads == 1 {
        solver.call(&slice_info(0), x, rows, y)
    } else {
        // each slice in a slot that its thread takes; a slice whose thread cannot start
        // (thread or memory limits) is solved here instead (its rows and info are the
        // same wherever it runs)
        let slots: Vec<_> = x
            .chunks(per * d)
            .zip(y.chunks_mut(per * o))
            .map(|slice| std::sync::Mutex::new(Some(slice)))
            .collect();
        let solve_slot = |i: usize| -> Result<()> {
            let taken = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Some((xs, ys)) => solver.call(&slice_info(i), xs, xs.len() / d, ys),
                None => Ok(()),
            }
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..slots.len())
                .map(|i| {
                    std::thread::Builder::new()
                        .stack_size(crate::tuning::WORKER_STACK_BYTES)
                        .spawn_scoped(scope, move || solve_slot(i))
                        .ok()
                })
                .collect();
            let mut first = Ok(());
            for (i, handle) in handles.into_iter().enumerate() {
                let r = match handle {
                    Some(h) => h
                        .join()
                        .unwrap_or_else(|payload| std::panic::resume_unwind(payload)),
                    None => solve_slot(i),
                };
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    };
    result?;
    check_finite(y, o, &at)
}

/// SOLVER_FAILED naming the first non-finite output of rows described by `at`.
pub(crate) fn check_finite(y: &[f32], o: usize, at: &SolveInfo) -> Result<()> {
    // one vectorizable pass, then the position
    if let Some(i) = (!crate::input::all_finite(y))
        .then(|| y.iter().position(|v| !v.is_finite()))
        .flatten()
    {
        return Err(Error::new(
            Status::SolverFailed,
            format!(
                "the solver wrote {} at output {} of {}; outputs must be finite (was every output written?)",
                y[i],
                i % o.max(1),
                at.describe_row(i / o.max(1))
            ),
        ));
    }
    Ok(())
}

/// Calls a device solver on the rows of `x` `[rows, d]` (on the op's device) and returns
/// the solutions `[rows, o]` there, checked finite; `at` says which rows they are.
pub(crate) fn solve_on_device(
    solver: &dyn DeviceSolver,
    x: &Tensor,
    o: usize,
    at: SolveInfo,
) -> Result<Tensor> {
    let x = x.f_contiguous()?;
    let rows = x.size()[0] as usize;
    // NaN first: a solver that writes nothing is caught by the check below
    let y = Tensor::f_full([rows as i64, o as i64], f64::NAN, (Kind::Float, x.device()))?;
    if rows == 0 {
        return Ok(y); // the solver is never called with count 0
    }
    let failed = |msg: String| {
        Error::new(
            Status::SolverFailed,
            format!("the solver failed on {}: {msg}", at.describe_rows(rows)),
        )
    };
    let cuda = match x.device() {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    // On CUDA the device is synchronized before the call (x and the NaN fill are written,
    // whatever stream libtorch queued them on) and after it (the solver's work is done,
    // whatever stream it used), and the op's device is current during the call.
    let synchronize = |i: usize| {
        std::panic::catch_unwind(|| tch::Cuda::synchronize(i as i64))
            .map_err(|_| failed("a CUDA error surfaced when the device was synchronized".into()))
    };
    if let Some(i) = cuda {
        synchronize(i)?;
    }
    // SAFETY: x and y are contiguous float32 tensors of rows·d and rows·o elements on the
    // op's device that outlive the call and the synchronization after it.
    crate::device::with_current_cuda_device(cuda, || {
        restoring_fp_state(|| unsafe {
            solver.solve(
                &at,
                x.data_ptr() as *const f32,
                rows,
                y.data_ptr() as *mut f32,
                std::ptr::null_mut(),
            )
        })
    })
    .map_err(failed)?;
    if let Some(i) = cuda {
        synchronize(i)?;
    }
    let finite = y.f_isfinite()?.f_all()?.int64_value(&[]) != 0;
    if !finite {
        let host = crate::tensors::host_floats(&y.f_to_device(Device::Cpu)?)?;
        check_finite(&host, o, &at)?;
    }
    Ok(y)
}
