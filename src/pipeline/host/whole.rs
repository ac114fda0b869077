//! A block's part of a host run's sums when it holds whole problems ([`WholeSums`]).

use crate::estimate::accumulator::means_of_sums;
use crate::kernels::sums::SumsMut;
use crate::uninit::written;
use std::mem::MaybeUninit;

/// A block's slots of the call's sums (blocks of whole problems; none otherwise).
pub(super) struct WholeSums<'a> {
    /// The block's problems.
    count: usize,
    sum_y: Option<&'a mut [f64]>,
    objective: Option<&'a mut [f64]>,
    weighted: Option<&'a mut [f64]>,
    inputs: Option<&'a mut [f64]>,
}

/// A block's slot of one of the call's sums (Σ Y_n, Σ ⟨x_n, Y_n⟩, weighted, Σ x_n).
pub(super) type Slot<'a> = Option<&'a mut [MaybeUninit<f64>]>;

impl<'a> WholeSums<'a> {
    /// The block's slots of the call's sums, for its `count` problems: zeroed here when
    /// the sums were handed over `unwritten` (see `Accumulator::take_host_sums`), in
    /// cache, before the block adds to them.
    pub fn new(
        count: usize,
        [sum_y, objective, weighted, inputs]: [Slot<'a>; 4],
        unwritten: bool,
    ) -> Self {
        let ready = |v: Slot<'a>| {
            v.map(|v| {
                if unwritten {
                    v.fill(MaybeUninit::new(0.0));
                }
                // SAFETY: every entry is written: zeroed just above, or by the accumulator
                // (sums not handed over unwritten are its zeros)
                unsafe { written(v) }
            })
        };
        WholeSums {
            count,
            sum_y: ready(sum_y),
            objective: ready(objective),
            weighted: ready(weighted),
            inputs: ready(inputs),
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

    /// The means Σ Y_n / n of the block's problems, into `out` (every entry), from their
    /// sums once complete (each problem's `n` samples added).
    pub fn write_means(&self, out: &mut [MaybeUninit<f32>], n: usize) {
        let sum_y = self
            .sum_y
            .as_deref()
            .expect("blocks of whole problems have Σ Y_n");
        means_of_sums(out, sum_y, n);
    }
}
