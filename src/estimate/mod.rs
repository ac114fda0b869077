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
//! unbiased since E[s] = 0. With antithetic pairs (Z, −Z) the scores of a pair cancel, so
//! any constant baseline drops out: J = Σ Y_n s_nᵀ / (Nσ) exactly, whatever the baseline,
//! and no extra solve is made.
//!
//! Memory: per problem, either the sums Σ Y_n s_nᵀ (output_numel × input_numel) are
//! streamed, or the samples are kept (at most N × (output_numel + input_numel) floats);
//! [`TapeForm::choose`] picks one from their sizes and costs. A CPU tape of samples keeps
//! only the Y_n, sparse ones as index-value pairs, and draws the s_n again from the call's
//! stream for each product (module [`replay`]); a CUDA tape keeps both.

pub(crate) mod accumulator;
pub(crate) mod form;
pub(crate) mod jacobian;
pub(crate) mod replay;

pub(crate) use accumulator::{Accumulator, Estimate, Objective};
pub use form::TapeForm;
pub(crate) use jacobian::JacobianData;
