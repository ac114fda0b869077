//! The centering and scaling that make a Jacobian estimate of what a tape keeps.

/// The centering and scaling of a Jacobian estimate made from samples (see
/// [`crate::estimate`]): `center` `[batch, o]` (None: zero, no baseline), `col_scale`
/// `[batch, d]` (the multiplicative model's 1/θ, 0 where θ = 0; None for the additive
/// model) and the scalar `scale`.
#[derive(Debug)]
pub(crate) struct Centering<T> {
    pub center: Option<T>,
    pub col_scale: Option<T>,
    pub scale: f64,
}

impl<T> Centering<T> {
    /// No centering, scale 1: what samples carry until the finish sets theirs.
    pub fn none() -> Centering<T> {
        Centering {
            center: None,
            col_scale: None,
            scale: 1.0,
        }
    }
}
