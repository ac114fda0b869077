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
