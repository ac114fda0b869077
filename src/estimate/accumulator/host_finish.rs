//! [`Accumulator::finish`] for a CPU accumulator, in Rust on the host buffers.

use super::{dense_jacobian, Accumulator, Centre, Estimate, JacobianSums, Objective};
use crate::error::Result;
use crate::estimate::jacobian::JacobianData;
use crate::estimate::replay::Replay;
use crate::perturbation::Perturbation;
use crate::settings::Baseline;
use crate::tensors::{host_floats, host_slice};
use crate::tuning::HOST_FINISH_ENTRIES;
use tch::{Device, Kind, Tensor};

impl Accumulator {
    /// [`Accumulator::finish`] for a CPU accumulator, in Rust on the host buffers: no
    /// libtorch operation runs (the OpenMP rule of [`crate::tuning`]), except the products
    /// that make a large dense Jacobian.
    pub(super) fn finish_on_host(
        mut self,
        n: usize,
        baseline: Baseline,
        clean: Option<&Tensor>,
        theta: &Tensor,
    ) -> Result<Estimate> {
        let nf = n as f64;
        let o = self.o as usize;
        let batch = self.sum_y.numel() / o;
        let mean_tensor = Tensor::f_empty([batch as i64, o as i64], (Kind::Float, Device::Cpu))?;
        if batch > 0 {
            let sum_y = host_slice::<f64>(&mut self.sum_y);
            // SAFETY: a fresh contiguous CPU float32 tensor of batch·o elements, not aliased,
            // as uninitialized floats (written below before any `&[f32]` is formed)
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    mean_tensor.data_ptr() as *mut std::mem::MaybeUninit<f32>,
                    batch * o,
                )
            };
            if n.is_power_of_two() {
                // 1/n is exact, and so is the product: the quotient, bit for bit, without
                // a division per entry
                let inv = 1.0 / nf;
                for (m, &v) in out.iter_mut().zip(sum_y.iter()) {
                    m.write((v * inv) as f32);
                }
            } else {
                for (m, &v) in out.iter_mut().zip(sum_y.iter()) {
                    m.write((v / nf) as f32);
                }
            }
        }
        let mean: &[f32] = if batch > 0 {
            // SAFETY: the tensor's batch·o floats, all written above.
            unsafe { std::slice::from_raw_parts(mean_tensor.data_ptr() as *const f32, batch * o) }
        } else {
            &[]
        };
        // the baseline only enters the Jacobian (see `finish`)
        let (center, scale) = match self.centre_and_scale(baseline, nf, clean.is_some()) {
            (Centre::Mean, scale) => (Some(mean.to_vec()), scale),
            (Centre::Clean, scale) => (clean.map(host_floats).transpose()?, scale),
            (Centre::Zero, scale) => (None, scale),
        };
        // 1/θ, 0 where θ = 0 (multiplicative model)
        let col_scale = match self.perturbation {
            Perturbation::Additive => None,
            Perturbation::Multiplicative => Some(
                host_floats(theta)?
                    .iter()
                    .map(|&t| if t == 0.0 { 0.0 } else { 1.0 / t })
                    .collect::<Vec<f32>>(),
            ),
        };
        let tensor = |v: &[f32], size: &[i64]| -> Result<Tensor> {
            Ok(crate::tensors::from_slice(v)?.f_view(size)?)
        };
        let (b, o_i) = (batch as i64, o as i64);
        let jacobian = match self.jacobian.take() {
            None => None,
            Some(JacobianSums::Sums {
                mut sum_s,
                mut sum_ys,
            }) => {
                let d = sum_s.size()[1] as usize;
                if batch * o * d <= HOST_FINISH_ENTRIES {
                    // Σ (Y_n − c) s_nᵀ = Σ Y_n s_nᵀ − c (Σ s_n)ᵀ, then scaled, in place
                    let sums: Vec<f32> = host_slice::<f64>(&mut sum_s)
                        .iter()
                        .map(|&v| v as f32)
                        .collect();
                    let j = host_slice::<f32>(&mut sum_ys);
                    for (p, jp) in j.chunks_exact_mut(o * d).enumerate() {
                        let s_p = &sums[p * d..(p + 1) * d];
                        for (i, row) in jp.chunks_exact_mut(d).enumerate() {
                            if let Some(c) = &center {
                                let c = -c[p * o + i];
                                for (v, &sv) in row.iter_mut().zip(s_p) {
                                    *v += c * sv;
                                }
                            }
                            for v in row.iter_mut() {
                                *v *= scale as f32;
                            }
                            if let Some(cs) = &col_scale {
                                for (v, &c) in row.iter_mut().zip(&cs[p * d..(p + 1) * d]) {
                                    *v *= c;
                                }
                            }
                        }
                    }
                    Some(JacobianData::Dense(sum_ys))
                } else {
                    let center = center
                        .as_deref()
                        .map(|c| tensor(c, &[b, o_i]))
                        .transpose()?;
                    let col_scale = col_scale
                        .as_deref()
                        .map(|cs| tensor(cs, &[b, d as i64]))
                        .transpose()?;
                    let j =
                        dense_jacobian(&sum_s, sum_ys, center.as_ref(), scale, col_scale.as_ref())?;
                    Some(JacobianData::Dense(j))
                }
            }
            Some(JacobianSums::Replay {
                mut rows,
                redraw,
                scores,
            }) => {
                rows.shrink();
                assert_eq!(rows.len(), batch * n, "every sample's solution is kept");
                // scores that are not all there (none were drawn into the room) are drawn
                // again
                let scores = scores.filter(|s| s.len() == batch * n * redraw.d);
                Some(JacobianData::Replay(Replay {
                    rows,
                    redraw,
                    scores,
                    batch,
                    center,
                    col_scale,
                    scale,
                }))
            }
            Some(JacobianSums::Samples { y, s }) => {
                let center = center.unwrap_or_else(|| vec![0f32; mean.len()]);
                let d = s.size()[2];
                Some(JacobianData::Samples {
                    y,
                    s,
                    center: tensor(&center, &[b, o_i])?,
                    col_scale: col_scale
                        .as_deref()
                        .map(|c| tensor(c, &[b, d]))
                        .transpose()?,
                    scale,
                })
            }
        };
        let objective = match self.objective.take() {
            None => None,
            Some((mut objective, sum_wy, sum_x)) => {
                let value: Vec<f64> = host_slice::<f64>(&mut objective)
                    .iter()
                    .map(|&x| x / nf)
                    .collect();
                Some(Objective {
                    value: crate::tensors::from_slice(&value)?,
                    sum: match self.perturbation {
                        Perturbation::Additive => self.sum_y,
                        Perturbation::Multiplicative => sum_wy,
                    },
                    sum_x: (sum_x.size()[1] > 0).then_some(sum_x),
                    n: nf,
                })
            }
        };
        Ok(Estimate {
            mean: mean_tensor,
            jacobian,
            objective,
        })
    }
}
