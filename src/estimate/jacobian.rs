//! The products computed from what a tape keeps ([`Kept`]): the Jacobian itself, VJP and
//! JVP, per problem.

use crate::error::Result;
use crate::estimate::centering::Centering;
use crate::estimate::kept::Kept;
use crate::tensors::{host_floats, HostFloats};
use crate::tuning::SEQUENTIAL_UP_TO;
use tch::{Device, Kind, Tensor};

impl Kept {
    /// The device the data lives on.
    pub fn device(&self) -> Device {
        match self {
            Kept::Sums(j) => j.device(),
            Kept::Samples { y, .. } => y.device(),
            Kept::Solutions(_) => Device::Cpu,
        }
    }

    /// The bytes of memory held.
    pub fn bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        match self {
            Kept::Sums(j) => tensor(j),
            Kept::Samples { y, s, centering } => {
                tensor(y)
                    + tensor(s)
                    + centering.center.as_ref().map_or(0, tensor)
                    + centering.col_scale.as_ref().map_or(0, tensor)
            }
            Kept::Solutions(r) => r.bytes(),
        }
    }

    /// The Jacobian of shape `size` = `[batch, o, d]`, a new tensor.
    pub fn jacobian(&self, size: [i64; 3]) -> Result<Tensor> {
        match self {
            Kept::Sums(j) => crate::tensors::copy(j),
            Kept::Samples { y, s, centering } => {
                let _serial = crate::intraop::serial_on(y.device()); // (same bits, any threads)
                let yc = y.f_sub(&center_of(centering, y)?.f_unsqueeze(1)?)?;
                let j = yc
                    .f_transpose(1, 2)?
                    .f_matmul(s)?
                    .f_mul_scalar(centering.scale)?;
                Ok(match &centering.col_scale {
                    Some(cs) => j.f_mul(&cs.f_unsqueeze(1)?)?,
                    None => j,
                })
            }
            Kept::Solutions(r) => Ok(r.jacobian()?.f_view(size)?),
        }
    }

    /// Jᵀg for `g` `[batch, o]` on [`Kept::device`]: a new tensor of `batch · d` values
    /// (shape `[batch, 1, d]` or flat).
    pub fn vjp(&self, g: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Kept::Sums(j) if host_sized(j) => {
                // Σ_i g_i J_i· per problem, in Rust (see `host_sized`)
                let size = j.size();
                let (b, o, d) = (size[0] as usize, size[1] as usize, size[2] as usize);
                let (j, g) = (host_floats(j)?, host_floats(g)?);
                let mut out = vec![0f32; b * d];
                for p in 0..b {
                    let row = &mut out[p * d..(p + 1) * d];
                    for i in 0..o {
                        let gi = g[p * o + i];
                        for (r, &v) in row.iter_mut().zip(&j[(p * o + i) * d..(p * o + i + 1) * d])
                        {
                            *r += gi * v;
                        }
                    }
                }
                crate::tensors::from_slice(&out)?
            }
            Kept::Sums(j) => g.f_unsqueeze(1)?.f_matmul(j)?,
            Kept::Samples { y, s, centering } => {
                // scale · Σ_n s_n ⟨Y_n − c, g⟩
                let _serial = crate::intraop::serial_on(y.device()); // (same bits, any threads)
                let yg = y.f_matmul(&g.f_unsqueeze(2)?)?; // [b, N, 1]
                let cg =
                    center_of(centering, y)?
                        .f_mul(g)?
                        .f_sum_dim_intlist(1, true, Kind::Float)?; // [b, 1]
                let weights = yg.f_squeeze_dim(2)?.f_sub(&cg)?; // [b, N]
                let out = weights
                    .f_unsqueeze(1)?
                    .f_matmul(s)?
                    .f_mul_scalar(centering.scale)?; // [b, 1, d]
                match &centering.col_scale {
                    Some(cs) => out.f_mul(&cs.f_unsqueeze(1)?)?,
                    None => out,
                }
            }
            Kept::Solutions(r) => r.vjp(&HostFloats::of(g)?)?,
        })
    }

    /// J t for `t` `[batch, d]` on [`Kept::device`]: a new tensor of `batch · o` values.
    pub fn jvp(&self, t: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Kept::Sums(j) if host_sized(j) => {
                // J_i· t per problem, in Rust (see `host_sized`)
                let size = j.size();
                let (b, o, d) = (size[0] as usize, size[1] as usize, size[2] as usize);
                let (j, t) = (host_floats(j)?, host_floats(t)?);
                let lanes = o * d > SEQUENTIAL_UP_TO;
                let out: Vec<f32> = (0..b * o)
                    .map(|r| {
                        let p = r / o;
                        let (row, t) = (&j[r * d..(r + 1) * d], &t[p * d..(p + 1) * d]);
                        if lanes {
                            dot_in_lanes(row, t)
                        } else {
                            row.iter().zip(t).fold(0.0f32, |acc, (a, b)| acc + a * b)
                        }
                    })
                    .collect();
                crate::tensors::from_slice(&out)?
            }
            Kept::Sums(j) => j.f_matmul(&t.f_unsqueeze(2)?)?,
            Kept::Samples { y, s, centering } => {
                // scale · Σ_n (Y_n − c) ⟨s_n, t ⊙ col_scale⟩
                let _serial = crate::intraop::serial_on(y.device()); // (same bits, any threads)
                let t = match &centering.col_scale {
                    Some(cs) => t.f_mul(cs)?,
                    None => t.shallow_clone(),
                };
                let st = s.f_matmul(&t.f_unsqueeze(2)?)?; // [b, N, 1]
                let yst = y.f_transpose(1, 2)?.f_matmul(&st)?; // [b, o, 1]
                let cst = center_of(centering, y)?
                    .f_unsqueeze(2)?
                    .f_mul(&st.f_sum_dim_intlist(1, true, Kind::Float)?)?;
                yst.f_sub(&cst)?.f_mul_scalar(centering.scale)?
            }
            Kept::Solutions(r) => r.jvp(&HostFloats::of(t)?)?,
        })
    }

    /// J δ `[batch, o]` for `delta` `[batch, d]`, as tensor operations that autograd
    /// differentiates with respect to δ (its backward is Jᵀg): from the dense Jacobian of a
    /// tape of sums, or from the samples of a tape of samples. A CPU tape of solutions
    /// makes whichever is smaller dense once: the Jacobian, or the samples (the scores
    /// drawn again, the solutions spread out).
    pub fn linear(&self, delta: &Tensor) -> Result<Tensor> {
        let _serial = crate::intraop::serial_on(self.device()); // (same bits, any threads)
        let delta = delta.f_to_device(self.device())?;
        match self {
            Kept::Sums(j) => Ok(j.f_matmul(&delta.f_unsqueeze(2)?)?.f_squeeze_dim(2)?),
            Kept::Samples { y, s, centering } => samples_linear(
                y,
                s,
                &center_of(centering, y)?,
                centering.col_scale.as_ref(),
                centering.scale,
                &delta,
            ),
            Kept::Solutions(r) => {
                let (b, n, o, d) = (
                    r.batch as i64,
                    r.redraw.n as i64,
                    r.o() as i64,
                    r.redraw.d as i64,
                );
                // the smaller of the dense Jacobian and the dense samples (tch has no custom
                // backward that could stream the tape's products)
                if o * d <= n * (o + d) {
                    let j = r.jacobian()?.f_view([b, o, d])?;
                    return Ok(j.f_matmul(&delta.f_unsqueeze(2)?)?.f_squeeze_dim(2)?);
                }
                let (y, s) = r.dense_samples()?;
                let y = crate::tensors::from_slice(&y)?.f_view([b, n, o])?;
                let s = crate::tensors::from_slice(&s)?.f_view([b, n, d])?;
                let center = match &r.centering.center {
                    Some(c) => crate::tensors::from_slice(c)?.f_view([b, o])?,
                    None => Tensor::f_zeros([b, o], (Kind::Float, Device::Cpu))?,
                };
                let col_scale = match &r.centering.col_scale {
                    Some(cs) => Some(crate::tensors::from_slice(cs)?.f_view([b, d])?),
                    None => None,
                };
                samples_linear(
                    &y,
                    &s,
                    &center,
                    col_scale.as_ref(),
                    r.centering.scale,
                    &delta,
                )
            }
        }
    }
}

/// The center `[batch, o]` of samples `y` `[batch, N, o]`: zeros when there is none.
fn center_of(centering: &Centering<Tensor>, y: &Tensor) -> Result<Tensor> {
    Ok(match &centering.center {
        Some(c) => c.shallow_clone(),
        None => y.f_select(1, 0)?.f_zeros_like()?,
    })
}

/// scale · Σ_n (Y_n − c) ⟨s_n, δ ⊙ col_scale⟩ per problem: `[batch, o]`.
fn samples_linear(
    y: &Tensor,
    s: &Tensor,
    center: &Tensor,
    col_scale: Option<&Tensor>,
    scale: f64,
    delta: &Tensor,
) -> Result<Tensor> {
    let t = match col_scale {
        Some(cs) => delta.f_mul(cs)?,
        None => delta.shallow_clone(),
    };
    let st = s.f_matmul(&t.f_unsqueeze(2)?)?; // [b, N, 1]
    let yc = y.f_sub(&center.f_unsqueeze(1)?)?; // [b, N, o]
    Ok(yc
        .f_transpose(1, 2)?
        .f_matmul(&st)?
        .f_squeeze_dim(2)?
        .f_mul_scalar(scale)?)
}

/// Whether a product with the dense Jacobian `j` is made in Rust: always on the CPU, where
/// libtorch's matrix products round by how they split the work among their threads (the
/// products must be the same bits under every thread setting), and for the OpenMP rule of
/// [`crate::tuning`].
fn host_sized(j: &Tensor) -> bool {
    j.device() == Device::Cpu
}

/// ⟨a, b⟩ summed in eight interleaved lanes (entry i into lane i mod 8), the lanes then
/// added in order, and the tail last: a fixed order (the same bits on every machine and
/// thread count) that vectorizes, for long rows.
fn dot_in_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, a_tail) = a.as_chunks::<8>();
    let (b8, b_tail) = b.as_chunks::<8>();
    for (x, y) in a8.iter().zip(b8) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    let mut sum = lanes.iter().fold(0f32, |acc, &l| acc + l);
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}
