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

/// Where the rows of one solver call sit in its forward call (C: `pert_solve_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SolveInfo {
    /// The worker running the call, `0 .. threads` (for a [`WorkerSolver`] always the
    /// same thread for the same worker over the op's life).
    pub worker: usize,
    /// The rows are the unperturbed inputs of problems `first_row ..` (the clean-input
    /// baseline).
    pub clean: bool,
    /// When not `clean`: row r of the call is the call's global row `first_row + r`, in
    /// problem-major order: problem `(first_row + r) / num_samples`, sample
    /// `(first_row + r) % num_samples`.
    pub first_row: u64,
    /// The op's number of samples N.
    pub num_samples: u64,
    /// Problems in the forward call.
    pub batch: usize,
}

impl SolveInfo {
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
