//! The tensor half of the accumulator: chunks of samples added as libtorch tensors (the
//! chunk pipeline), and the finish on the op's device.

use super::{Accumulator, Center, ObjectiveSums};
use crate::error::Result;
use crate::estimate::centering::Centering;
use crate::estimate::kept::Kept;
use crate::kernels::builtin::Solutions;
use crate::perturbation::Perturbation;
use crate::tuning::DENSE_BELOW_OUTPUTS;
use tch::{Kind, Tensor};

/// Where a chunk's rows go: problems `b .. b + nb`, `rows` samples each.
#[derive(Clone, Copy)]
struct Rows {
    b: i64,
    nb: i64,
    rows: i64,
}

impl Rows {
    /// `t` `[nb · rows, w]` as `[nb, rows, w]`.
    fn per_problem(self, t: &Tensor) -> Result<Tensor> {
        let w = t.size()[1];
        Ok(t.f_view([self.nb, self.rows, w])?)
    }

    /// The flat positions, in a `[batch, w]` tensor, of entries `index` `[nb · rows, m]`
    /// (columns of their row's problem).
    fn flat_in_problems(self, index: &Tensor, w: i64) -> Result<Tensor> {
        let first =
            Tensor::f_arange_start(self.b, self.b + self.nb, (Kind::Int64, index.device()))?
                .f_mul_scalar(w)?
                .f_repeat_interleave_self_int(self.rows, 0, None)?
                .f_unsqueeze(1)?;
        Ok(index.f_add(&first)?.f_flatten(0, -1)?)
    }

    /// The per-problem sum over the rows of `t` `[nb · rows, w]`, float64 `[nb, w]`.
    fn sum(self, t: &Tensor) -> Result<Tensor> {
        Ok(self
            .per_problem(t)?
            .f_sum_dim_intlist(1, false, Kind::Double)?)
    }
}

impl Accumulator {
    /// Adds samples `n0 .. n0 + rows` of problems `b .. b + nb` (several problems only with
    /// all their samples): noise `z` and perturbed inputs `x` `[nb · rows, d]`, problem by
    /// problem, scores `s` (when wanted) and solutions `y`.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        b: i64,
        nb: i64,
        n0: i64,
        z: &Tensor,
        x: &Tensor,
        s: Option<&Tensor>,
        y: &Solutions,
    ) -> Result<()> {
        self.zero_sums();
        let _serial = crate::intraop::serial_on(self.sum_y.device()); // (same bits for any threads)
        let at = Rows {
            b,
            nb,
            rows: z.size()[0] / nb,
        };
        let o = self.o;
        // few outputs: the positions of the ones would all land on a few entries of the
        // sums (atomic adds that serialize on a GPU); dense rows are summed by reductions
        let small = match y {
            Solutions::Indicator(_) if o <= DENSE_BELOW_OUTPUTS => {
                Some(Solutions::Dense(y.dense(o)?))
            }
            _ => None,
        };
        let y = small.as_ref().unwrap_or(y);
        // the dense solutions, made at most once (samples tape, multiplicative objective)
        let mut dense_cache: Option<Tensor> = None;
        let mut dense = || -> Result<Tensor> {
            if dense_cache.is_none() {
                dense_cache = Some(y.dense(o)?);
            }
            Ok(dense_cache.as_ref().expect("just set").shallow_clone())
        };
        match y {
            Solutions::Dense(y) => {
                let _ = self.sum_y.f_narrow(0, b, nb)?.f_add_(&at.sum(y)?)?;
            }
            Solutions::Indicator(index) => {
                let ones = Tensor::f_ones([index.numel() as i64], (Kind::Double, index.device()))?;
                let _ = self.sum_y.f_view([-1])?.f_index_add_(
                    0,
                    &at.flat_in_problems(index, o)?,
                    &ones,
                )?;
            }
        }
        if let Some(s) = s {
            self.add_to_kept(at, n0, s, y, &mut dense)?;
        } else {
            assert!(
                self.kept.is_none(),
                "scores are computed when a Jacobian is wanted"
            );
        }
        if let Some(sums) = &mut self.objective {
            add_objective(
                sums,
                at,
                (z, x),
                y,
                (self.perturbation, self.sigma),
                &mut dense,
            )?;
        }
        Ok(())
    }

    /// Adds the chunk's scores `s` and solutions `y` to what the tape keeps: the Jacobian
    /// sums, or the samples at `n0`.
    fn add_to_kept(
        &mut self,
        at: Rows,
        n0: i64,
        s: &Tensor,
        y: &Solutions,
        dense: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<()> {
        let Rows { b, nb, rows } = at;
        match &mut self.kept {
            Some(Kept::Sums(sum_ys)) => {
                let sum_s = self.sum_s.as_mut().expect("a tape of sums has Σ s_n");
                let _ = sum_s.f_narrow(0, b, nb)?.f_add_(&at.sum(s)?)?;
                match y {
                    Solutions::Dense(y) => {
                        // Σ_n Y_n s_nᵀ per problem: [nb, o, rows] × [nb, rows, d]
                        let _ = sum_ys.f_narrow(0, b, nb)?.f_baddbmm_(
                            &at.per_problem(y)?.f_transpose(1, 2)?,
                            &at.per_problem(s)?,
                        )?;
                    }
                    Solutions::Indicator(index) => {
                        // Σ_n Y_n s_nᵀ with 0/1 Y_n: add each s_n to the rows of its ones
                        // (rows of the [batch · o, d] view).
                        let m = index.size()[1];
                        let src = if m == 1 {
                            s.shallow_clone()
                        } else {
                            s.f_repeat_interleave_self_int(m, 0, None)?
                        };
                        let d = s.size()[1];
                        let _ = sum_ys.f_view([-1, d])?.f_index_add_(
                            0,
                            &at.flat_in_problems(index, self.o)?,
                            &src,
                        )?;
                    }
                }
            }
            Some(Kept::Samples { y: ys, s: ss, .. }) => {
                ys.f_narrow(0, b, nb)?
                    .f_narrow(1, n0, rows)?
                    .f_copy_(&at.per_problem(&dense()?)?)?;
                ss.f_narrow(0, b, nb)?
                    .f_narrow(1, n0, rows)?
                    .f_copy_(&at.per_problem(s)?)?;
            }
            Some(Kept::Solutions(_)) => {
                unreachable!("tapes of solutions are filled by the host paths")
            }
            None => unreachable!("scores are computed when a Jacobian is wanted"),
        }
        Ok(())
    }

    /// y_σ(θ) `[batch, o]` float32: Σ Y_n / n, with libtorch.
    pub(super) fn tensor_mean(&self, nf: f64) -> Result<Tensor> {
        Ok(self.sum_y.f_div_scalar(nf)?.f_to_kind(Kind::Float)?)
    }
}

/// Adds the chunk's terms of the objective: Σ x_n (when kept), Σ ⟨x_n, Y_n⟩ and, for the
/// multiplicative model, Σ exp(σZ_n − σ²/2) ⊙ Y_n.
fn add_objective(
    sums: &mut ObjectiveSums,
    at: Rows,
    (z, x): (&Tensor, &Tensor),
    y: &Solutions,
    (perturbation, sigma): (Perturbation, f64),
    dense: &mut dyn FnMut() -> Result<Tensor>,
) -> Result<()> {
    let Rows { b, nb, .. } = at;
    if sums.inputs.size()[1] > 0 {
        let _ = sums.inputs.f_narrow(0, b, nb)?.f_add_(&at.sum(x)?)?;
    }
    let products = match y {
        Solutions::Dense(y) => x.f_mul(y)?,
        Solutions::Indicator(index) => x.f_gather(1, index, false)?,
    };
    let value = products
        .f_view([nb, -1])?
        .f_sum_dim_intlist(1, false, Kind::Double)?;
    let _ = sums.value.f_narrow(0, b, nb)?.f_add_(&value)?;
    if perturbation == Perturbation::Multiplicative {
        let w = perturbation.weight(z, sigma)?;
        let wy = at.sum(&w.f_mul(&dense()?)?)?;
        let _ = sums.weighted.f_narrow(0, b, nb)?.f_add_(&wy)?;
    }
    Ok(())
}

/// The centering on the device: `center` of `mean` (its own copy: the tape keeps it, never
/// the storage of the output handed to the caller) or of `clean`, and the column scale
/// 1/θ (0 where θ = 0) of `theta`, when the model has one.
pub(super) fn centering(
    center: Center,
    scale: f64,
    mean: &Tensor,
    clean: Option<&Tensor>,
    theta: Option<&Tensor>,
) -> Result<Centering<Tensor>> {
    let center = match center {
        Center::Mean => Some(crate::tensors::copy(mean)?),
        Center::Clean => clean.map(Tensor::shallow_clone),
        Center::Zero => None,
    };
    let col_scale = match theta {
        None => None,
        Some(theta) => {
            let zero = theta.f_eq(0.0)?;
            let inv = theta
                .f_where_scalarother(&zero.f_logical_not()?, 1.0)?
                .f_reciprocal()?;
            Some(inv.f_masked_fill(&zero, 0.0)?.f_to_kind(Kind::Float)?)
        }
    };
    Ok(Centering {
        center,
        col_scale,
        scale,
    })
}

/// J from the Jacobian sums with libtorch: Σ (Y_n − c) s_nᵀ = Σ Y_n s_nᵀ − c (Σ s_n)ᵀ,
/// scaled, times the column scale, in place in `sum_ys` (which becomes the tape's memory).
pub(super) fn jacobian_of_sums(
    sum_s: &Tensor,
    sum_ys: Tensor,
    centering: &Centering<Tensor>,
) -> Result<Tensor> {
    let _serial = crate::intraop::serial_on(sum_ys.device()); // (same bits for any threads)
    let mut j = sum_ys;
    if let Some(c) = &centering.center {
        let s = sum_s.f_to_kind(Kind::Float)?.f_unsqueeze(1)?; // [b, 1, d]
        let _ = j.f_baddbmm_(&c.f_neg()?.f_unsqueeze(2)?, &s)?;
    }
    let _ = j.f_mul_scalar_(centering.scale)?;
    if let Some(cs) = &centering.col_scale {
        let _ = j.f_mul_(&cs.f_unsqueeze(1)?)?;
    }
    Ok(j)
}
