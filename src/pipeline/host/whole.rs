//! A block's part of a host run's sums when it holds whole problems ([`WholeSums`]).

use crate::kernels::sums::SumsMut;

/// A block's slots of the call's sums (blocks of whole problems; none otherwise).
pub(super) struct WholeSums<'a> {
    /// The block's problems.
    pub count: usize,
    pub sum_y: Option<&'a mut [f64]>,
    pub objective: Option<&'a mut [f64]>,
    pub weighted: Option<&'a mut [f64]>,
    pub inputs: Option<&'a mut [f64]>,
}

impl WholeSums<'_> {
    /// Zeroes the block's entries of the call's sums (sums handed over unwritten: see
    /// `Accumulator::take_host_sums`), in cache, before the block adds to them.
    pub fn zero(&mut self) {
        for v in [
            &mut self.sum_y,
            &mut self.objective,
            &mut self.weighted,
            &mut self.inputs,
        ]
        .into_iter()
        .flatten()
        {
            v.fill(0.0);
        }
    }

    /// The call's sums of the block's problem `i`, when the block holds whole problems
    /// (`unused` stands for the objective when it is not estimated).
    pub fn problem<'s>(&'s mut self, i: usize, unused: &'s mut f64) -> Option<SumsMut<'s>> {
        let count = self.count;
        let part = |v: Option<&'s mut [f64]>| match v {
            Some(v) => {
                let w = v.len() / count;
                &mut v[i * w..(i + 1) * w]
            }
            None => &mut [][..],
        };
        let sum_y = part(Some(self.sum_y.as_deref_mut()?));
        Some(SumsMut {
            sum_y,
            sum_s: &mut [],
            sum_ys: &mut [],
            objective: self.objective.as_deref_mut().map_or(unused, |v| &mut v[i]),
            sum_wy: part(self.weighted.as_deref_mut()),
            touched: &mut [],
            sum_x: part(self.inputs.as_deref_mut()),
        })
    }
}
