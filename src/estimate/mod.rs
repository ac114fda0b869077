//! The Monte-Carlo estimator: what a forward call accumulates over its samples, and the
//! Jacobian, objective and objective gradient computed from it once all samples are in.
//!
//! With Y_n the solutions, s_n the scores (∇ν(Z_n) for the additive model, Z_n for the
//! multiplicative one) and N samples, the Jacobian estimate per problem is
//!
//! | baseline    | J                                               | extra solves |
//! |-------------|-------------------------------------------------|--------------|
//! | none        | Σ Y_n s_nᵀ / (Nσ)                               | 0            |
//! | sample mean | Σ (Y_n − Ȳ) s_nᵀ / ((N−1)σ); for N = 1 as none   | 0            |
//! | clean input | Σ (Y_n − y*(θ)) s_nᵀ / (Nσ)                     | 1 per problem|
//!
//! each divided by θ column-wise for the multiplicative model (0 where θ = 0). All are
//! unbiased since E\[s\] = 0. With antithetic pairs (Z, −Z) the scores of a pair cancel, so
//! any constant baseline drops out: J = Σ Y_n s_nᵀ / (Nσ) exactly, whatever the baseline,
//! and no extra solve is made.
//!
//! What a tape keeps is a `kept::Kept`, and the whole policy that chooses it is in
//! `kept`: per problem, either the sums Σ Y_n s_nᵀ (output_numel × input_numel) are
//! streamed, or the samples are kept (at most N × (output_numel + input_numel) floats),
//! [`TapeForm::choose`] picking one from their sizes and costs. A tape of samples made by
//! the CPU's host paths keeps the Y_n (sparse ones as index-value pairs) and the s_n up to
//! a size, drawing larger s_n again from the call's stream for each product (module
//! `replay`); elsewhere (CUDA, the chunk pipeline) it keeps both as tensors.
//!
//! The `accumulator` adds the samples and finishes: the mean (made by the blocks
//! themselves in host runs of whole problems), the centering of the Jacobian (center and
//! scale), what the tape keeps, and the objective. `jacobian`
//! makes the products from what the tape keeps.

pub(crate) mod accumulator;
pub(crate) mod centering;
pub(crate) mod jacobian;
pub(crate) mod kept;
pub(crate) mod replay;
pub(crate) mod solution_rows;

pub(crate) use accumulator::{Accumulator, Estimate, Objective};
pub(crate) use kept::Kept;
pub use kept::TapeForm;
