//! The host half of the accumulator: the sums that the CPU's host paths made in Rust,
//! added in place (no libtorch operation: the OpenMP rule of [`crate::tuning`]), and the
//! finish in Rust, but for the products that make a large dense Jacobian.

use super::{Accumulator, Center, ObjectiveSums};
use crate::error::Result;
use crate::estimate::centering::Centering;
use crate::estimate::kept::Kept;
use crate::kernels::sums::ProblemSums;
use crate::tensors::{host_floats, host_slice, host_slice_uninit, HostFloats};
use crate::tuning::HOST_FINISH_ENTRIES;
use std::mem::MaybeUninit;
use tch::{Device, Kind, Tensor};

impl Accumulator {
    /// Adds the sums over all samples of problem `b`, made on the host, to this CPU
    /// accumulator: in place, and only over the outputs the sums touched. (For many
    /// problems, take a [`HostAdder`] once.)
    pub fn add_sums(&mut self, b: i64, sums: &ProblemSums) -> Result<()> {
        self.host_adder().add(b as usize, sums);
        Ok(())
    }

    /// This CPU accumulator's sums as slices, to add many problems' sums to: each slice
    /// taken from its tensor costs several libtorch calls, which a small call's many
    /// problems would otherwise pay each.
    pub fn host_adder(&mut self) -> HostAdder<'_> {
        self.zero_sums();
        let jacobian = match (&mut self.kept, &mut self.sum_s) {
            (Some(Kept::Sums(sum_ys)), Some(sum_s)) => {
                Some((host_slice::<f64>(sum_s), host_slice::<f32>(sum_ys)))
            }
            _ => None,
        };
        let objective = match &mut self.objective {
            Some(ObjectiveSums {
                value,
                weighted,
                inputs,
            }) => {
                let (inputs_width, weighted_width) =
                    (inputs.size()[1] as usize, weighted.size()[1] as usize);
                Some(ObjectiveSlices {
                    value: host_slice::<f64>(value),
                    inputs: host_slice::<f64>(inputs),
                    inputs_width,
                    weighted: host_slice::<f64>(weighted),
                    weighted_width,
                })
            }
            None => None,
        };
        HostAdder {
            o: self.o as usize,
            sum_y: host_slice::<f64>(&mut self.sum_y),
            jacobian,
            objective,
        }
    }

    /// The call's float64 sums Σ Y_n `[batch, o]`, and Σ ⟨x_n, Y_n⟩ `[batch]` and
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n `[batch, w]` when the objective is estimated, taken out of
    /// this CPU accumulator so that blocks of whole problems add their samples straight
    /// into their problems' entries, with room for the mean, which each such block
    /// writes for its problems once their sums are complete (in its cache, where a pass
    /// over the whole float64 sums afterwards would read them from memory); give them
    /// back with [`Accumulator::put_host_sums`].
    /// They are not written yet when [`HostSums::unzeroed`] says so: then each block
    /// zeroes its problems' entries before it adds to them (every problem's, or the call
    /// fails).
    pub fn take_host_sums(&mut self) -> Result<HostSums> {
        let batch = self.sum_y.size()[0];
        Ok(HostSums {
            sum_y: std::mem::replace(&mut self.sum_y, Tensor::new()),
            objective: self.objective.take(),
            unzeroed: std::mem::take(&mut self.unzeroed),
            mean: Tensor::f_empty([batch, self.o], (Kind::Float, Device::Cpu))?,
        })
    }

    /// Gives back the sums taken with [`Accumulator::take_host_sums`], once every block
    /// of the run has written its problems' entries, the mean's included.
    pub fn put_host_sums(&mut self, sums: HostSums) {
        self.sum_y = sums.sum_y;
        self.objective = sums.objective;
        self.mean = Some(sums.mean);
    }

    /// y_σ(θ) `[batch, o]` float32: Σ Y_n / n, in Rust (made by the blocks of whole
    /// problems already, when they had the sums).
    pub(super) fn host_mean(&mut self, n: usize) -> Result<Tensor> {
        if let Some(mean) = self.mean.take() {
            return Ok(mean);
        }
        let o = self.o as usize;
        let batch = self.sum_y.numel() / o.max(1);
        let mean = Tensor::f_empty([batch as i64, o as i64], (Kind::Float, Device::Cpu))?;
        if batch * o == 0 {
            return Ok(mean);
        }
        let sum_y = host_slice::<f64>(&mut self.sum_y);
        // SAFETY: a fresh contiguous CPU float32 tensor of batch·o elements, not aliased, as
        // uninitialized floats (each written below)
        let out = unsafe {
            std::slice::from_raw_parts_mut(mean.data_ptr() as *mut MaybeUninit<f32>, batch * o)
        };
        means_of_sums(out, sum_y, n);
        Ok(mean)
    }
}

/// The means Σ Y_n / n of the sums `sums`, as float32, into `out` (every entry written):
/// the one rounding of the host paths' means, wherever they are made.
pub(crate) fn means_of_sums(out: &mut [MaybeUninit<f32>], sums: &[f64], n: usize) {
    assert_eq!(out.len(), sums.len(), "a mean for every sum");
    let nf = n as f64;
    if n.is_power_of_two() {
        // 1/n is exact, and so is the product: the quotient, bit for bit, without a
        // division per entry
        let inv = 1.0 / nf;
        for (m, &v) in out.iter_mut().zip(sums) {
            m.write((v * inv) as f32);
        }
    } else {
        for (m, &v) in out.iter_mut().zip(sums) {
            m.write((v / nf) as f32);
        }
    }
}

/// The host sums of a CPU accumulator (see [`Accumulator::take_host_sums`]).
pub(crate) struct HostSums {
    sum_y: Tensor,
    objective: Option<ObjectiveSums>,
    /// Not written yet: the blocks that take them zero their problems' entries.
    pub unzeroed: bool,
    /// Room for y_σ(θ) `[batch, o]` float32, each block's problems written by the block
    /// from its sums (while they are in its cache).
    mean: Tensor,
}

/// The entries of a CPU accumulator's host sums: Σ Y_n, Σ ⟨x_n, Y_n⟩, Σ exp(σZ_n − σ²/2) ⊙ Y_n
/// and Σ x_n (see [`HostSums::slices`]), written or not ([`HostSums::unzeroed`]); and the
/// room for the means of Σ Y_n, not written.
pub(crate) struct HostSlices<'a> {
    /// Σ Y_n `[batch · o]`.
    pub sum_y: &'a mut [MaybeUninit<f64>],
    /// Σ ⟨x_n, Y_n⟩ `[batch]`, when the objective is estimated.
    pub objective: Option<&'a mut [MaybeUninit<f64>]>,
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n `[batch · w]` (w = d for the multiplicative objective, else 0).
    pub weighted: &'a mut [MaybeUninit<f64>],
    /// Σ x_n `[batch · d]` when kept, else empty.
    pub inputs: &'a mut [MaybeUninit<f64>],
    /// The room for the means `[batch · o]`, not written.
    pub means: &'a mut [MaybeUninit<f32>],
}

impl HostSums {
    /// The entries of Σ Y_n `[batch · o]`, Σ ⟨x_n, Y_n⟩ (`[batch]`, or None),
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n (`[batch · w]`, w = d for the multiplicative objective,
    /// else 0) and Σ x_n (`[batch · d]` when kept, else empty): zeros, or not written yet
    /// when [`HostSums::unzeroed`] says so (then the taker writes every one); and the
    /// room for their means `[batch · o]`, which the taker writes, every entry.
    pub fn slices(&mut self) -> HostSlices<'_> {
        let sum_y = host_slice_uninit::<f64>(&mut self.sum_y);
        let means = host_slice_uninit::<f32>(&mut self.mean);
        match &mut self.objective {
            Some(sums) => HostSlices {
                sum_y,
                objective: Some(host_slice_uninit::<f64>(&mut sums.value)),
                weighted: host_slice_uninit::<f64>(&mut sums.weighted),
                inputs: host_slice_uninit::<f64>(&mut sums.inputs),
                means,
            },
            None => HostSlices {
                sum_y,
                objective: None,
                weighted: &mut [],
                inputs: &mut [],
                means,
            },
        }
    }
}

/// The centering on the host: `center` of the `mean` or of `clean`, and the column scale
/// 1/θ (0 where θ = 0) of `theta`, when the model has one.
pub(super) fn centering(
    center: Center,
    scale: f64,
    mean: &Tensor,
    clean: Option<&Tensor>,
    theta: Option<&Tensor>,
) -> Result<Centering<Vec<f32>>> {
    let center = match center {
        Center::Mean => Some(HostFloats::of(mean)?.to_vec()),
        Center::Clean => clean.map(host_floats).transpose()?,
        Center::Zero => None,
    };
    let col_scale = match theta {
        None => None,
        Some(theta) => Some(
            host_floats(theta)?
                .iter()
                .map(|&t| if t == 0.0 { 0.0 } else { 1.0 / t })
                .collect(),
        ),
    };
    Ok(Centering {
        center,
        col_scale,
        scale,
    })
}

/// Whether a CPU call finishes a Jacobian of `size` `[batch, o, d]` in Rust (beyond
/// HOST_FINISH_ENTRIES entries, libtorch's parallel products are worth their start-up).
pub(super) fn finishes_in_rust(size: [i64; 3]) -> bool {
    size.iter().product::<i64>() as usize <= HOST_FINISH_ENTRIES
}

/// J from the Jacobian sums in Rust: Σ (Y_n − c) s_nᵀ = Σ Y_n s_nᵀ − c (Σ s_n)ᵀ, then
/// scaled and times the column scale, in place in `sum_ys`.
pub(super) fn jacobian_of_sums(
    sum_s: &Tensor,
    mut sum_ys: Tensor,
    centering: &Centering<Vec<f32>>,
) -> Result<Tensor> {
    let size = sum_ys.size();
    let (o, d) = (size[1] as usize, size[2] as usize);
    let sums: Vec<f32> = crate::tensors::host_doubles(sum_s)?
        .iter()
        .map(|&v| v as f32)
        .collect();
    let scale = centering.scale as f32;
    let j = host_slice::<f32>(&mut sum_ys);
    for (p, jp) in j.chunks_exact_mut(o * d).enumerate() {
        let s_p = &sums[p * d..(p + 1) * d];
        for (i, row) in jp.chunks_exact_mut(d).enumerate() {
            if let Some(c) = &centering.center {
                let c = -c[p * o + i];
                for (v, &sv) in row.iter_mut().zip(s_p) {
                    *v += c * sv;
                }
            }
            for v in row.iter_mut() {
                *v *= scale;
            }
            if let Some(cs) = &centering.col_scale {
                for (v, &c) in row.iter_mut().zip(&cs[p * d..(p + 1) * d]) {
                    *v *= c;
                }
            }
        }
    }
    Ok(sum_ys)
}

/// A host centering as tensors (`size` `[batch, o, d]`), for libtorch's products.
pub(super) fn to_tensors(c: &Centering<Vec<f32>>, size: [i64; 3]) -> Result<Centering<Tensor>> {
    let [b, o, d] = size;
    let tensor = |v: &[f32], shape: [i64; 2]| -> Result<Tensor> {
        Ok(crate::tensors::from_slice(v)?.f_view(shape)?)
    };
    Ok(Centering {
        center: c.center.as_deref().map(|v| tensor(v, [b, o])).transpose()?,
        col_scale: c
            .col_scale
            .as_deref()
            .map(|v| tensor(v, [b, d]))
            .transpose()?,
        scale: c.scale,
    })
}

/// `sums` / n, in Rust, as a new float64 tensor.
pub(super) fn mean_of(mut sums: Tensor, nf: f64) -> Result<Tensor> {
    let value: Vec<f64> = host_slice::<f64>(&mut sums)
        .iter()
        .map(|&x| x / nf)
        .collect();
    crate::tensors::from_slice(&value)
}

/// A CPU accumulator's sums as slices ([`Accumulator::host_adder`]).
pub(crate) struct HostAdder<'a> {
    o: usize,
    /// Σ Y_n `[batch, o]`.
    sum_y: &'a mut [f64],
    /// Σ s_n `[batch, d]` and Σ Y_n s_nᵀ `[batch, o, d]`, for a tape of sums.
    jacobian: Option<(&'a mut [f64], &'a mut [f32])>,
    objective: Option<ObjectiveSlices<'a>>,
}

/// The objective's sums as slices.
struct ObjectiveSlices<'a> {
    /// Σ ⟨x_n, Y_n⟩ `[batch]`.
    value: &'a mut [f64],
    /// Σ x_n `[batch, inputs_width]` (width 0 when not kept).
    inputs: &'a mut [f64],
    inputs_width: usize,
    /// Σ exp(σZ_n − σ²/2) ⊙ Y_n `[batch, weighted_width]` (width 0 when not kept).
    weighted: &'a mut [f64],
    weighted_width: usize,
}

impl HostAdder<'_> {
    /// Adds the sums over all samples of problem `b`: in place, and only over the outputs
    /// the sums touched.
    pub fn add(&mut self, b: usize, sums: &ProblemSums) {
        let o = self.o;
        let d = sums.sum_s.len();
        let sum_y = &mut self.sum_y[b * o..(b + 1) * o];
        let mut jacobian = match &mut self.jacobian {
            Some((sum_s, sum_ys)) => {
                for (a, v) in sum_s[b * d..(b + 1) * d].iter_mut().zip(&sums.sum_s) {
                    *a += v;
                }
                Some(&mut sum_ys[b * o * d..(b + 1) * o * d])
            }
            None => None,
        };
        let mut weighted = match &mut self.objective {
            Some(objective) => {
                objective.value[b] += sums.objective;
                let xw = objective.inputs_width;
                for (a, v) in objective.inputs[b * xw..(b + 1) * xw]
                    .iter_mut()
                    .zip(&sums.sum_x)
                {
                    *a += v;
                }
                let w = objective.weighted_width;
                Some(&mut objective.weighted[b * w..(b + 1) * w]).filter(|s| !s.is_empty())
            }
            None => None,
        };
        for (i, _) in sums.touched.iter().enumerate().filter(|(_, &t)| t) {
            sum_y[i] += sums.sum_y[i];
            if let Some(target) = jacobian.as_deref_mut() {
                for (a, v) in target[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(&sums.sum_ys[i * d..(i + 1) * d])
                {
                    *a += *v as f32;
                }
            }
            if let Some(target) = weighted.as_deref_mut() {
                target[i] += sums.sum_wy[i];
            }
        }
    }
}
