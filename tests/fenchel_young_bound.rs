//! The lower bound of the Fenchel-Young loss from a call's own draws (issue 28): for an
//! exact solver and a feasible target, loss >= sign * <mean perturbed input - theta, y>
//! for every draw (each sample's solution beats the target on its own input), on every
//! pipeline (fused argmax, host blocks of whole problems and of parts of one, libtorch
//! chunks, two-phase solutions), both perturbations, both noises, both senses; a wrong
//! sense falls below it; the bound is that formula (checked against a draw's own inputs);
//! and keeping it changes no other number.

mod common;

use common::{argmax, argmin, config};
use perturbations::{Builtin, Config, Noise, Perturbation, PerturbedOp, Sense};
use tch::{Device, Kind, Tensor};

fn thetas(batch: i64, d: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([batch, d], (Kind::Float, Device::Cpu))
}

/// One-hot targets: entry (b * 3) % d of problem b.
fn targets(batch: i64, d: i64) -> Tensor {
    let t = Tensor::zeros([batch, d], (Kind::Float, Device::Cpu));
    for b in 0..batch {
        let _ = t.get(b).narrow(0, (b * 3) % d, 1).fill_(1.0);
    }
    t
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// The rounding allowance the library takes off the bound (its documented 1e-4).
const BOUND_ROUNDING: f64 = 1e-4;

/// The bound by its formula, from the perturbed inputs of a draw of `op` at call 0.
fn bound_from_draw(op: &PerturbedOp, theta: &Tensor, y: &Tensor) -> Vec<f64> {
    let draw = op.draw(theta).unwrap();
    let (d, n) = (op.input_numel(), op.config().num_samples() as usize);
    let inputs = draw.inputs();
    let sign = if op.config().sense() == Sense::Maximize {
        1.0
    } else {
        -1.0
    };
    let (theta, y) = (values(theta), values(y));
    (0..theta.len() / d)
        .map(|b| {
            let mut dot = 0.0;
            for i in 0..d {
                let sum: f64 = (0..n).map(|k| f64::from(inputs[(b * n + k) * d + i])).sum();
                dot += (sum / n as f64 - theta[b * d + i]) * y[b * d + i];
            }
            sign * dot
        })
        .collect()
}

/// The loss is at least the bound in every problem, and the bound is its formula (from a
/// twin's draw: the same noise at call 0) less the rounding allowance.
fn holds(make: impl Fn() -> PerturbedOp, theta: &Tensor, y: &Tensor) {
    let op = make();
    let (loss, _, bound) = op.fenchel_young_with_bound(theta, y).unwrap();
    let dots = values(&(theta * y).sum_dim_intlist(1, false, Kind::Double));
    let l1 = values(&y.abs().sum_dim_intlist(1, false, Kind::Double));
    let (loss, bound) = (values(&loss), values(&bound));
    let want = bound_from_draw(&make(), theta, y);
    let sign = if op.config().sense() == Sense::Maximize {
        1.0
    } else {
        -1.0
    };
    for b in 0..loss.len() {
        assert!(
            loss[b] >= bound[b],
            "problem {b}: loss {} below the bound {}",
            loss[b],
            bound[b]
        );
        let objective = sign * loss[b] + dots[b];
        let allowance =
            BOUND_ROUNDING * (objective.abs() + dots[b].abs() + op.config().sigma() * l1[b]);
        let tol = 1e-6 * (1.0 + objective.abs() + dots[b].abs());
        assert!(
            (bound[b] - (want[b] - allowance)).abs() <= tol,
            "problem {b}: bound {} but its formula gives {} less {allowance}",
            bound[b],
            want[b]
        );
    }
}

fn settings(noise: Noise, perturbation: Perturbation, sense: Sense, n: u64) -> Config {
    let mut c = config(noise, 0.7, n, 5);
    c.set_perturbation(perturbation).set_sense(sense);
    c
}

#[test]
fn the_loss_is_never_below_the_bound_on_any_pipeline() {
    let d = 6;
    for (noise, perturbation) in [
        (Noise::Normal, Perturbation::Additive),
        (Noise::Gumbel, Perturbation::Additive),
        (Noise::Normal, Perturbation::Multiplicative),
    ] {
        for n in [1u64, 200, 40_000] {
            for batch in [1i64, 5] {
                let theta = thetas(batch, d, n as i64 + batch);
                let y = targets(batch, d);
                let max = settings(noise, perturbation, Sense::Maximize, n);
                // fused argmax (built-in), the host pipeline (a callback), libtorch chunks
                holds(
                    || PerturbedOp::new_builtin(&max, Builtin::Argmax, &[d]).unwrap(),
                    &theta,
                    &y,
                );
                holds(
                    || PerturbedOp::new(&max, &[d], &[d], argmax).unwrap(),
                    &theta,
                    &y,
                );
                let mut chunks = max.clone();
                chunks.set_libtorch_path(true);
                holds(
                    || PerturbedOp::new(&chunks, &[d], &[d], argmax).unwrap(),
                    &theta,
                    &y,
                );
                // top-1 through the host pipeline's ones
                holds(
                    || PerturbedOp::new_builtin(&max, Builtin::TopK(1), &[d]).unwrap(),
                    &theta,
                    &y,
                );
                let min = settings(noise, perturbation, Sense::Minimize, n);
                holds(
                    || PerturbedOp::new(&min, &[d], &[d], argmin).unwrap(),
                    &theta,
                    &y,
                );
            }
        }
    }
}

#[test]
fn a_wrong_sense_falls_below_the_bound() {
    let (batch, d) = (8, 10);
    let theta = thetas(batch, d, 3);
    let y = targets(batch, d);
    for (sense, solver) in [
        (
            Sense::Maximize,
            argmin as fn(&[f32], usize, &mut [f32]) -> Result<(), String>,
        ),
        (Sense::Minimize, argmax),
    ] {
        let c = settings(Noise::Normal, Perturbation::Additive, sense, 100);
        let op = PerturbedOp::new(&c, &[d], &[d], solver).unwrap();
        let (loss, _, bound) = op.fenchel_young_with_bound(&theta, &y).unwrap();
        let below = values(&(&loss - &bound));
        // the reverse inequality holds for every problem, strictly where y is not the
        // wrong solver's solution of every sample
        assert!(below.iter().all(|&v| v <= 1e-5), "{below:?}");
        assert!(
            below.iter().filter(|&&v| v < -0.1).count() >= 6,
            "{below:?}"
        );
    }
}

#[test]
fn the_bound_is_the_mean_perturbed_input_against_the_target() {
    let (batch, d, n) = (3i64, 5i64, 64u64);
    let theta = thetas(batch, d, 9);
    let y = targets(batch, d);
    for (perturbation, sense) in [
        (Perturbation::Additive, Sense::Maximize),
        (Perturbation::Multiplicative, Sense::Minimize),
    ] {
        let c = settings(Noise::Normal, perturbation, sense, n);
        let op = PerturbedOp::new_external(&c, &[d], &[d]).unwrap();
        let draw = op.draw(&theta).unwrap();
        let inputs = draw.inputs().to_vec();
        let mut solutions = vec![0f32; inputs.len()];
        let count = inputs.len() / d as usize;
        match sense {
            Sense::Maximize => argmax(&inputs, count, &mut solutions).unwrap(),
            Sense::Minimize => argmin(&inputs, count, &mut solutions).unwrap(),
        }
        let (loss, grad, bound) = draw.fenchel_young_with_bound(&solutions, &y).unwrap();
        let (plain_loss, plain_grad) = draw.fenchel_young(&solutions, &y).unwrap();
        assert!(loss.equal(&plain_loss) && grad.equal(&plain_grad));
        let sign = if sense == Sense::Maximize { 1.0 } else { -1.0 };
        let (theta_v, y_v, bound) = (values(&theta), values(&y), values(&bound));
        for b in 0..batch as usize {
            let mut want = 0.0;
            for i in 0..d as usize {
                let mean: f64 = (0..n as usize)
                    .map(|k| f64::from(inputs[(b * n as usize + k) * d as usize + i]))
                    .sum::<f64>()
                    / n as f64;
                want += (mean - theta_v[b * d as usize + i]) * y_v[b * d as usize + i];
            }
            // the formula, less the allowance (1e-4 of a few units here)
            assert!(
                bound[b] <= sign * want && sign * want - bound[b] < 1e-3,
                "{} vs {}",
                bound[b],
                sign * want
            );
        }
    }
}

#[test]
fn keeping_the_bound_changes_no_other_number() {
    let (batch, d) = (4, 7);
    let theta = thetas(batch, d, 4);
    let y = targets(batch, d);
    for n in [30u64, 50_000] {
        let c = settings(Noise::Gumbel, Perturbation::Additive, Sense::Maximize, n);
        for builtin in [true, false] {
            let make = || {
                if builtin {
                    PerturbedOp::new_builtin(&c, Builtin::Argmax, &[d]).unwrap()
                } else {
                    PerturbedOp::new(&c, &[d], &[d], argmax).unwrap()
                }
            };
            let (loss, grad, _) = make().fenchel_young_with_bound(&theta, &y).unwrap();
            let (plain_loss, plain_grad) = make().fenchel_young(&theta, &y).unwrap();
            assert!(
                loss.equal(&plain_loss) && grad.equal(&plain_grad),
                "n {n} builtin {builtin}"
            );
        }
    }
}
