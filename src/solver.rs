//! The black-box solver: anything that maps a batch of perturbed inputs to outputs.

/// A black-box solver y*(θ) applied to `count` problems at once.
///
/// `inputs` holds `count × input_numel` values and `outputs` has room for
/// `count × output_numel`, both row-major, in host memory. Returning `Err` aborts the
/// forward call with [`crate::Status::SolverFailed`] and the message.
///
/// With more than one solver thread, `solve` runs concurrently on disjoint slices, hence
/// `Sync`.
pub trait Solver: Send + Sync {
    /// Solves `count` problems.
    fn solve(&self, inputs: &[f32], count: usize, outputs: &mut [f32]) -> Result<(), String>;
}

impl<F> Solver for F
where
    F: Fn(&[f32], usize, &mut [f32]) -> Result<(), String> + Send + Sync,
{
    fn solve(&self, inputs: &[f32], count: usize, outputs: &mut [f32]) -> Result<(), String> {
        self(inputs, count, outputs)
    }
}

/// What a solver may ask of the op's solution pool: the member of best ⟨x, y⟩ for an
/// input row (made by the pipeline from the pool as a call sees it).
pub trait PoolSearch: Send + Sync {
    /// The member of best ⟨x, y⟩ in the op's sense (the oldest of equals), None when the
    /// pool is empty or `x` is not of its size.
    fn best(&self, x: &[f32]) -> Option<&[f32]>;
    /// The floats of one solution (and of an input row, as the objective is linear).
    fn numel(&self) -> usize;
}

/// The op's solution pool as one call sees it (the snapshot the call began with), for
/// warm starts: see [`SolveInfo::pool_best`]. (A trait object: the solver layer knows no
/// pool.) Keep it no longer than the solver call: while a clone lives, each addition to
/// the pool copies it instead of adding in place.
#[derive(Clone)]
pub struct PoolView(std::sync::Arc<dyn PoolSearch>);

impl PoolView {
    /// The view of `search`.
    pub fn new(search: std::sync::Arc<dyn PoolSearch>) -> PoolView {
        PoolView(search)
    }

    /// See [`PoolSearch::best`].
    pub fn best(&self, x: &[f32]) -> Option<&[f32]> {
        self.0.best(x)
    }

    /// See [`PoolSearch::numel`].
    pub fn numel(&self) -> usize {
        self.0.numel()
    }
}

impl std::fmt::Debug for PoolView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolView")
    }
}

impl PartialEq for PoolView {
    fn eq(&self, other: &PoolView) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PoolView {}

/// Where the rows of one solver call sit in its forward call (C: `pert_solve_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SolveInfo {
    /// The worker running the call, `0 .. threads` (for a [`WorkerSolver`] always the
    /// same thread for the same worker over the op's life).
    pub worker: usize,
    /// The rows are the unperturbed inputs of problems `first_row ..` (the clean-input
    /// baseline's theta, or the x of [`crate::PerturbedOp::solve`]).
    pub clean: bool,
    /// When not `clean`: row r of the call is the call's global row `first_row + r`, in
    /// problem-major order: problem `(first_row + r) / num_samples`, sample
    /// `(first_row + r) % num_samples`.
    pub first_row: u64,
    /// The op's number of samples N.
    pub num_samples: u64,
    /// Problems in the call (forward, Fenchel-Young, draw or plain solve).
    pub batch: usize,
    /// Where the rows are: None for host memory, `Some(i)` for CUDA device i (device
    /// solvers of CUDA ops only).
    pub cuda_device: Option<usize>,
    /// For warm starts: the op's pool as the call sees it, when the op has one (the sample
    /// rows of a pooled op's calls); see [`SolveInfo::pool_best`].
    pub pool: Option<PoolView>,
}

impl SolveInfo {
    /// For warm starts: the pool's solution of best ⟨x, y⟩ for input row `x` (in the op's
    /// sense), None when the call has no pool, the pool is empty, or `x` is not of its size.
    pub fn pool_best(&self, x: &[f32]) -> Option<&[f32]> {
        self.pool.as_ref().and_then(|p| p.best(x))
    }

    /// "problem 3, sample 7" for row r of the call (or "unperturbed problem 3").
    pub fn describe_row(&self, r: usize) -> String {
        let global = self.first_row + r as u64;
        if self.clean {
            format!("unperturbed problem {global}")
        } else {
            let n = self.num_samples.max(1);
            format!("problem {}, sample {}", global / n, global % n)
        }
    }

    /// The rows of a call of `count` rows: "problem 3, sample 7" or "problem 0, sample 4 to
    /// problem 2, sample 1".
    pub fn describe_rows(&self, count: usize) -> String {
        if count <= 1 {
            self.describe_row(0)
        } else {
            format!(
                "{} to {}",
                self.describe_row(0),
                self.describe_row(count - 1)
            )
        }
    }
}

/// A solver with state per worker (a model object, a warm start) run by the op's own
/// persistent worker threads: worker w is always the same thread, `init(w)` runs there
/// once over the op's life, before its first solve, `fini(w)` there when the op is
/// dropped (for each worker whose init ran, whether it succeeded or not), and a worker
/// never runs two solves at once.
pub trait WorkerSolver: Send + Sync {
    /// Builds worker `worker`'s state, on its thread, before its first solve. An error
    /// fails that forward call with [`crate::Status::SolverFailed`], and every later call
    /// of the op too (init runs once over the op's life: make a new op).
    fn init(&self, worker: usize) -> Result<(), String> {
        let _ = worker;
        Ok(())
    }

    /// Solves `count` problems (see [`Solver::solve`]); `info` says which rows they are.
    fn solve(
        &self,
        info: &SolveInfo,
        inputs: &[f32],
        count: usize,
        outputs: &mut [f32],
    ) -> Result<(), String>;

    /// Frees worker `worker`'s state, on its thread, when the op is dropped.
    fn fini(&self, worker: usize) {
        let _ = worker;
    }
}

/// A solver that works where the op's data lives (CUDA device memory for a CUDA op, host
/// memory for a CPU op): it gets the perturbed rows and writes the solutions in place, on
/// the stream the library uses, so no row is copied to the host. Written in CUDA or
/// libtorch C++, typically.
pub trait DeviceSolver: Send + Sync {
    /// Solves `count` rows: `inputs` holds `count × input_numel` floats and `outputs` has
    /// room for `count × output_numel`, both row-major on the op's device; `stream` is the
    /// CUDA stream to work on (null: the default stream; always null for a CPU op). Work
    /// queued on that stream may still run after the call returns: the library orders its
    /// own work after it on the same stream.
    ///
    /// # Safety
    /// The pointers are valid for the documented sizes during the call (and, on CUDA, for
    /// work queued on `stream` during the call).
    unsafe fn solve(
        &self,
        info: &SolveInfo,
        inputs: *const f32,
        count: usize,
        outputs: *mut f32,
        stream: *mut std::ffi::c_void,
    ) -> Result<(), String>;
}
