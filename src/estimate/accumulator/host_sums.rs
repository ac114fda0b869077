//! The host sums of a CPU accumulator, which blocks of whole problems add their samples
//! straight into (see [`Accumulator::take_host_sums`]).

use super::Accumulator;
use crate::tensors::host_slice;
use tch::Tensor;

impl Accumulator {
    /// The call's float64 sums Σ Y_n `[batch, o]`, and Σ ⟨x_n, Y_n⟩ `[batch]` and
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n `[batch, w]` when the objective is estimated, taken out of
    /// this CPU accumulator so that blocks of whole problems add their samples straight
    /// into their problems' entries; give them back with [`Accumulator::put_host_sums`].
    pub fn take_host_sums(&mut self) -> HostSums {
        HostSums {
            sum_y: std::mem::replace(&mut self.sum_y, Tensor::new()),
            objective: self.objective.take(),
        }
    }

    /// Gives back the sums taken with [`Accumulator::take_host_sums`].
    pub fn put_host_sums(&mut self, sums: HostSums) {
        self.sum_y = sums.sum_y;
        self.objective = sums.objective;
    }
}

/// The host sums of a CPU accumulator (see [`Accumulator::take_host_sums`]).
pub(crate) struct HostSums {
    sum_y: Tensor,
    objective: Option<(Tensor, Tensor, Tensor)>,
}

/// The entries of a CPU accumulator's host sums: Σ Y_n, Σ ⟨x_n, Y_n⟩, Σ exp(σZ_n − σ²/2) ⊙ Y_n
/// and Σ x_n (see [`HostSums::slices`]).
pub(crate) type HostSlices<'a> = (
    &'a mut [f64],
    Option<&'a mut [f64]>,
    &'a mut [f64],
    &'a mut [f64],
);

impl HostSums {
    /// The entries of Σ Y_n `[batch · o]`, Σ ⟨x_n, Y_n⟩ (`[batch]`, or None),
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n (`[batch · w]`, w = d for the multiplicative objective,
    /// else 0) and Σ x_n (`[batch · d]` when kept, else empty).
    pub fn slices(&mut self) -> HostSlices<'_> {
        let sum_y = host_slice::<f64>(&mut self.sum_y);
        match &mut self.objective {
            Some((objective, sum_wy, sum_x)) => (
                sum_y,
                Some(host_slice::<f64>(objective)),
                host_slice::<f64>(sum_wy),
                host_slice::<f64>(sum_x),
            ),
            None => (sum_y, None, &mut [], &mut []),
        }
    }
}
