//! How a tape keeps what the Jacobian needs: the sums or the samples.

/// How a tape keeps what the Jacobian needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapeForm {
    /// Σ Y_n s_nᵀ per problem: output_numel × input_numel floats.
    Sums,
    /// The samples: Y_n and s_n of each, N × (output_numel + input_numel) floats per
    /// problem at most (on the CPU only the Y_n are kept; see module `replay`).
    Samples,
}

impl TapeForm {
    /// The form for N samples of problems with d inputs and o outputs, and its size in
    /// floats per problem. Accumulating the sums costs o·d per sample where keeping the
    /// samples costs o + d, so the samples are kept while they take at most twice the
    /// memory of the sums; past that the sums win (their size does not grow with N).
    /// `limit` (floats per problem, 0: none) rules out a form that does not fit.
    pub fn choose(n: usize, d: usize, o: usize, limit: u128) -> (TapeForm, u128) {
        let sums = o as u128 * d as u128;
        let samples = n as u128 * (o as u128 + d as u128);
        let fits = |size: u128| limit == 0 || size <= limit;
        if samples <= 2 * sums && fits(samples) || !fits(sums) && samples < sums {
            (TapeForm::Samples, samples)
        } else {
            (TapeForm::Sums, sums)
        }
    }
}
