//! The decision-focused methods over the exact solver (SPO+, DBB, NID, PG): closed forms,
//! each formula against the same solver outputs, PyEPO's signs per sense, the same bits for
//! any number of threads, and clear errors.
#![allow(clippy::needless_range_loop)] // problems are indexed in several arrays at once

mod common;

use common::{argmax, argmin};
use perturbations::{Config, Noise, PerturbedOp, Sense, SolveInfo, Status, WorkerSolver};
use tch::Tensor;

const B: usize = 16;
const D: usize = 7;

/// Reproducible values in [-1, 1) (a 64-bit LCG), as a [B, D] tensor.
fn values(seed: u64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..B * D)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_slice(&v).reshape([B as i64, D as i64])
}

fn host(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn config(sense: Sense, threads: u32) -> Config {
    let mut c = common::config(Noise::Normal, 1.0, 4, 1);
    c.set_sense(sense).set_threads(threads).unwrap();
    c
}

type Exact = fn(&[f32], usize, &mut [f32]) -> Result<(), String>;

/// The exact solver of a sense (one-hot of the best entry).
fn exact(sense: Sense) -> Exact {
    match sense {
        Sense::Minimize => argmin,
        Sense::Maximize => argmax,
    }
}

fn op(sense: Sense, threads: u32) -> PerturbedOp {
    PerturbedOp::new(
        &config(sense, threads),
        &[D as i64],
        &[D as i64],
        exact(sense),
    )
    .unwrap()
}

fn solve_here(sense: Sense, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    exact(sense)(x, x.len() / D, &mut y).unwrap();
    y
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// True costs, their optimal solutions and objectives.
fn truth(sense: Sense, seed: u64) -> (Tensor, Tensor, Tensor) {
    let c = values(seed);
    let w = solve_here(sense, &host(&c));
    let z: Vec<f32> = (0..B)
        .map(|i| dot(&host(&c)[i * D..(i + 1) * D], &w[i * D..(i + 1) * D]) as f32)
        .collect();
    (
        c,
        Tensor::from_slice(&w).reshape([B as i64, D as i64]),
        Tensor::from_slice(&z),
    )
}

#[test]
fn spo_plus_is_its_formula_nonnegative_and_zero_at_the_truth() {
    for sense in [Sense::Minimize, Sense::Maximize] {
        let op = op(sense, 1);
        let (c, w, z) = truth(sense, 7);
        let pred = values(8);
        let (loss, grad) = op.spo_plus(&pred, &c, &w, &z).unwrap();
        assert_eq!(
            (loss.size(), grad.size()),
            (vec![B as i64], vec![B as i64, D as i64])
        );
        // the formula on the same solver outputs (PyEPO's SPOPlus, s = +1 minimizing)
        let (p, cv, wv, zv) = (host(&pred), host(&c), host(&w), host(&z));
        let q: Vec<f32> = p.iter().zip(&cv).map(|(&a, &b)| 2.0 * a - b).collect();
        let wq = solve_here(sense, &q);
        let s = if sense == Sense::Minimize { 1.0 } else { -1.0 };
        let (l, g) = (host(&loss), host(&grad));
        for i in 0..B {
            let r = i * D..(i + 1) * D;
            let want = s
                * (-dot(&q[r.clone()], &wq[r.clone()]) + 2.0 * dot(&p[r.clone()], &wv[r.clone()])
                    - f64::from(zv[i]));
            assert_eq!(l[i], want as f32, "{sense:?} problem {i}");
            // >= 0 for an exact solver and consistent truth: beyond q's and z's float32
            // rounding (a few ulps of values within 3)
            assert!(l[i] >= -1e-5, "{sense:?} problem {i}: {}", l[i]);
            for j in r {
                assert_eq!(g[j], (s as f32) * 2.0 * (wv[j] - wq[j]));
            }
        }
        assert!(
            host(&loss).iter().any(|&v| v > 0.1),
            "a wrong prediction costs something"
        );
        // 0 at pred = true cost (up to the rounding of z), with a zero gradient
        let (loss, grad) = op.spo_plus(&c, &c, &w, &z).unwrap();
        assert!(
            host(&loss).iter().all(|&v| v.abs() < 1e-6),
            "{:?}",
            host(&loss)
        );
        assert!(host(&grad).iter().all(|&v| v == 0.0));
    }
}

/// The gradient is SPO+'s (sub)gradient: away from kinks the loss is linear, and a small step
/// changes it by the gradient's inner product with the step (a wrong sign fails this).
#[test]
fn spo_plus_gradient_is_the_slope_of_its_loss() {
    for sense in [Sense::Minimize, Sense::Maximize] {
        let op = op(sense, 1);
        let (c, w, z) = truth(sense, 11);
        let pred = values(12) * 3.0;
        let step = values(13) * 1e-3;
        let (l0, g) = op.spo_plus(&pred, &c, &w, &z).unwrap();
        let (l1, _) = op.spo_plus(&(&pred + &step), &c, &w, &z).unwrap();
        let (l0, g, l1, st) = (host(&l0), host(&g), host(&l1), host(&step));
        for i in 0..B {
            let r = i * D..(i + 1) * D;
            let slope = dot(&g[r.clone()], &st[r]);
            // float32 rounding of losses of size <= ~20
            assert!(
                (f64::from(l1[i] - l0[i]) - slope).abs() < 2e-5,
                "{sense:?} {i}"
            );
        }
    }
}

/// Maximizing is minimizing the negated costs: the same losses, negated gradients.
#[test]
fn spo_plus_maximize_mirrors_minimize() {
    let (c, w, z) = truth(Sense::Maximize, 3);
    let pred = values(4);
    let (lmax, gmax) = op(Sense::Maximize, 1).spo_plus(&pred, &c, &w, &z).unwrap();
    let (lmin, gmin) = op(Sense::Minimize, 1)
        .spo_plus(&-&pred, &-&c, &w, &-&z)
        .unwrap();
    assert!(lmax.allclose(&lmin, 0.0, 1e-6, false));
    assert!(gmax.equal(&-gmin));
    // true_obj as PyEPO keeps it, [batch, 1]
    let (l, _) = op(Sense::Maximize, 1)
        .spo_plus(&pred, &c, &w, &z.reshape([B as i64, 1]))
        .unwrap();
    assert!(l.equal(&lmax));
}

#[test]
fn blackbox_gradient_is_exactly_the_interpolation() {
    for sense in [Sense::Minimize, Sense::Maximize] {
        let op = op(sense, 1);
        let theta = values(21);
        let y = op.solve(&theta).unwrap();
        let g = values(22);
        for lambda in [0.5f64, 10.0, 20.0] {
            let grad = host(&op.blackbox_vjp(&theta, &y, &g, lambda).unwrap());
            let s: f32 = if sense == Sense::Minimize { 1.0 } else { -1.0 };
            let l = lambda as f32;
            let shifted: Vec<f32> = host(&theta)
                .iter()
                .zip(host(&g))
                .map(|(&t, g)| t + s * l * g)
                .collect();
            let w = solve_here(sense, &shifted);
            let want: Vec<f32> = w
                .iter()
                .zip(host(&y))
                .map(|(&w, y)| (w - y) * s / l)
                .collect();
            assert_eq!(grad, want, "{sense:?} lambda {lambda}");
            if lambda >= 10.0 {
                assert!(
                    grad.iter().any(|&v| v != 0.0),
                    "a large step moves the solution"
                );
            }
        }
    }
}

#[test]
fn negative_identity_is_minus_g_minimizing_and_g_maximizing() {
    let g = values(31);
    assert!(op(Sense::Minimize, 1)
        .negative_identity_vjp(&g)
        .unwrap()
        .equal(&-&g));
    assert!(op(Sense::Maximize, 1)
        .negative_identity_vjp(&g)
        .unwrap()
        .equal(&g));
}

#[test]
fn perturbation_gradient_is_its_formula_and_tends_to_the_decision_cost() {
    for sense in [Sense::Minimize, Sense::Maximize] {
        let op = op(sense, 1);
        let s: f64 = if sense == Sense::Minimize { 1.0 } else { -1.0 };
        let (pred, cost) = (values(41), values(42));
        let (p, c) = (host(&pred), host(&cost));
        for two_sided in [true, false] {
            for sigma in [0.3f64, 1.0] {
                let (loss, grad) = op
                    .perturbation_gradient(&pred, &cost, sigma, two_sided)
                    .unwrap();
                let sg = sigma as f32;
                let up = if two_sided { sg } else { 0.0 };
                let plus: Vec<f32> = p.iter().zip(&c).map(|(&a, &b)| a + up * b).collect();
                let minus: Vec<f32> = p.iter().zip(&c).map(|(&a, &b)| a - sg * b).collect();
                let (wp, wm) = (solve_here(sense, &plus), solve_here(sense, &minus));
                let width = if two_sided { 2.0 * sg } else { sg };
                let (l, g) = (host(&loss), host(&grad));
                for i in 0..B {
                    let r = i * D..(i + 1) * D;
                    let diff = dot(&plus[r.clone()], &wp[r.clone()])
                        - dot(&minus[r.clone()], &wm[r.clone()]);
                    assert_eq!(
                        l[i],
                        (s * diff / f64::from(width)) as f32,
                        "{sense:?} {two_sided} {i}"
                    );
                    for j in r {
                        assert_eq!(g[j], (s as f32) * (wp[j] - wm[j]) / width);
                    }
                }
            }
            // a width small enough that no solution changes: the loss is s * <c, y*(pred)>,
            // the predicted decision's true cost, and the gradient 0
            let (loss, grad) = op
                .perturbation_gradient(&pred, &cost, 1e-4, two_sided)
                .unwrap();
            let w = solve_here(sense, &p);
            for i in 0..B {
                let r = i * D..(i + 1) * D;
                let want = s * dot(&c[r.clone()], &w[r]);
                // float32 rounding of pred +- sigma c, divided by sigma: ~ 1e-7 / 1e-4
                assert!(
                    (f64::from(host(&loss)[i]) - want).abs() < 5e-3,
                    "{sense:?} {i}"
                );
            }
            assert!(host(&grad).iter().all(|&v| v == 0.0));
        }
    }
}

struct Workers(Sense);

impl WorkerSolver for Workers {
    fn solve(&self, _: &SolveInfo, x: &[f32], count: usize, y: &mut [f32]) -> Result<(), String> {
        exact(self.0)(x, count, y)
    }
}

/// Every method gives the same bits on one thread, two threads and an op's workers.
#[test]
fn methods_give_the_same_bits_for_any_threads() {
    for sense in [Sense::Minimize, Sense::Maximize] {
        let (c, w, z) = truth(sense, 51);
        let pred = values(52);
        let g = values(53);
        let d = [D as i64];
        let ops = [
            op(sense, 1),
            op(sense, 2),
            PerturbedOp::with_workers(&config(sense, 2), &d, &d, Workers(sense)).unwrap(),
        ];
        let results: Vec<Vec<Tensor>> = ops
            .iter()
            .map(|op| {
                let (l, gr) = op.spo_plus(&pred, &c, &w, &z).unwrap();
                let y = op.solve(&pred).unwrap();
                let dbb = op.blackbox_vjp(&pred, &y, &g, 10.0).unwrap();
                let (pl, pg) = op.perturbation_gradient(&pred, &c, 0.5, true).unwrap();
                vec![l, gr, y, dbb, pl, pg]
            })
            .collect();
        for r in &results[1..] {
            for (a, b) in r.iter().zip(&results[0]) {
                assert!(a.equal(b), "{sense:?}");
            }
        }
    }
}

fn invalid<T>(r: perturbations::Result<T>) -> perturbations::Error {
    r.map(|_| ()).unwrap_err()
}

#[test]
fn methods_refuse_bad_arguments() {
    let op = op(Sense::Minimize, 1);
    let (c, w, z) = truth(Sense::Minimize, 61);
    let pred = values(62);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-50, 1e300] {
        let e = invalid(op.blackbox_vjp(&pred, &pred, &pred, bad));
        assert_eq!(e.status(), Status::InvalidArgument);
        assert!(e.message().contains("lambda"), "{e}");
        let e = invalid(op.perturbation_gradient(&pred, &c, bad, true));
        assert!(
            e.message().contains("sigma") && e.status() == Status::InvalidArgument,
            "{e}"
        );
    }
    let short = Tensor::zeros(
        [B as i64 - 1, D as i64],
        (tch::Kind::Float, tch::Device::Cpu),
    );
    let e = invalid(op.spo_plus(&pred, &short, &w, &z));
    assert!(e.message().contains("true_cost must have the shape"), "{e}");
    let e = invalid(op.spo_plus(&pred, &c, &w, &z.reshape([2, -1])));
    assert!(e.message().contains("true_obj must have shape"), "{e}");
    let e = invalid(op.spo_plus(&pred.reshape([-1, 1, D as i64]), &c, &w, &z));
    assert!(e.message().contains("pred_cost must have shape"), "{e}");
    let nan = pred.copy();
    let _ = nan.get(2).get(3).fill_(f64::NAN);
    let e = invalid(op.spo_plus(&pred, &c, &nan, &z));
    assert_eq!(e.status(), Status::NonFiniteInput);
    assert!(e.message().contains("true_sol[2][3]"), "{e}");
    let e = invalid(op.blackbox_vjp(&pred, &pred, &nan, 10.0));
    assert!(e.message().contains("grad_output[2][3]"), "{e}");
    let e = invalid(op.spo_plus(&pred.to_kind(tch::Kind::Double), &c, &w, &z));
    assert!(e.message().contains("float32"), "{e}");
    // finite inputs whose solve input overflows float32
    let huge = Tensor::full(
        [B as i64, D as i64],
        3e38,
        (tch::Kind::Float, tch::Device::Cpu),
    );
    let e = invalid(op.spo_plus(&huge, &c, &w, &z));
    assert_eq!(e.status(), Status::NonFiniteInput);
    assert!(
        e.message()
            .contains("2 * pred_cost - true_cost is inf at [0][0]"),
        "{e}"
    );
    let e = invalid(op.blackbox_vjp(&huge, &pred, &huge, 10.0));
    assert!(
        e.message().contains("theta + lambda * grad_output is inf"),
        "{e}"
    );
    let e = invalid(op.perturbation_gradient(&huge, &huge, 1.0, true));
    assert!(
        e.message().contains("pred_cost + sigma * true_cost is inf"),
        "{e}"
    );
    // finite inputs whose result overflows float32: refused, not returned as inf
    let theta = Tensor::from_slice(&[5e-40f32, 1e-39, 1.0]).reshape([1, 3]);
    let g = Tensor::from_slice(&[0.0f32, -1.0, 0.0]).reshape([1, 3]);
    let op3 = PerturbedOp::new(&config(Sense::Minimize, 1), &[3], &[3], argmin).unwrap();
    let y = op3.solve(&theta).unwrap();
    let e = invalid(op3.blackbox_vjp(&theta, &y, &g, 1e-39));
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("the black-box gradient is"), "{e}");
    let e = invalid(op3.perturbation_gradient(&theta, &g, 1e-39, true));
    assert!(e.message().contains("the PG gradient is"), "{e}");
    let pred3 = Tensor::from_slice(&[-1.6e38f32, 1.6e38, 0.0]).reshape([1, 3]);
    let cost3 = Tensor::from_slice(&[0.0f32, 0.0, -1e38]).reshape([1, 3]);
    let sol3 = Tensor::from_slice(&[0.0f32, 0.0, 1.0]).reshape([1, 3]);
    let e = invalid(op3.spo_plus(&pred3, &cost3, &sol3, &Tensor::from_slice(&[-1e38f32])));
    assert!(e.message().contains("the SPO+ loss is inf"), "{e}");
    // a solver whose solutions are not the cost's shape has no linear objective
    let cfg = config(Sense::Minimize, 1);
    let ranks = PerturbedOp::new(
        &cfg,
        &[D as i64],
        &[1],
        |_: &[f32], _: usize, y: &mut [f32]| {
            y.fill(0.0);
            Ok(())
        },
    )
    .unwrap();
    for e in [
        invalid(ranks.spo_plus(&pred, &c, &w, &z)),
        invalid(ranks.negative_identity_vjp(&pred)),
        invalid(ranks.blackbox_vjp(&pred, &pred, &pred, 1.0)),
        invalid(ranks.perturbation_gradient(&pred, &c, 1.0, false)),
    ] {
        assert!(
            e.message().contains("needs output_shape == input_shape"),
            "{e}"
        );
    }
    // a failing solver fails the call
    let failing = PerturbedOp::new(
        &cfg,
        &[D as i64],
        &[D as i64],
        |_: &[f32], _: usize, _: &mut [f32]| Err("no solution".to_string()),
    )
    .unwrap();
    let e = invalid(failing.spo_plus(&pred, &c, &w, &z));
    assert_eq!(e.status(), Status::SolverFailed);
    // an empty batch
    let empty = Tensor::zeros([0, D as i64], (tch::Kind::Float, tch::Device::Cpu));
    let (l, g) = op
        .spo_plus(
            &empty,
            &empty,
            &empty,
            &Tensor::zeros([0], (tch::Kind::Float, tch::Device::Cpu)),
        )
        .unwrap();
    assert_eq!((l.size(), g.size()), (vec![0], vec![0, D as i64]));
    assert_eq!(
        op.perturbation_gradient(&empty, &empty, 1.0, true)
            .unwrap()
            .0
            .size(),
        [0]
    );
}

/// A solver on workers learns each row's problem from `first_row` and `batch`: every method
/// names only the call's problems (PG makes two solves of the batch, not one of twice as many).
struct Checking(Sense, usize);

impl WorkerSolver for Checking {
    fn solve(
        &self,
        info: &SolveInfo,
        x: &[f32],
        count: usize,
        y: &mut [f32],
    ) -> Result<(), String> {
        if !info.clean || info.batch != self.1 || info.first_row as usize + count > self.1 {
            return Err(format!(
                "rows {} + {count} of a batch of {} (clean {})",
                info.first_row, info.batch, info.clean
            ));
        }
        exact(self.0)(x, count, y)
    }
}

#[test]
fn worker_solvers_see_the_calls_problems() {
    for threads in [1, 2] {
        let op = PerturbedOp::with_workers(
            &config(Sense::Minimize, threads),
            &[D as i64],
            &[D as i64],
            Checking(Sense::Minimize, B),
        )
        .unwrap();
        let (c, w, z) = truth(Sense::Minimize, 71);
        let pred = values(72);
        let (loss, _) = op.spo_plus(&pred, &c, &w, &z).unwrap();
        assert_eq!(loss.size(), [B as i64]);
        let y = op.solve(&pred).unwrap();
        let g = op.blackbox_vjp(&pred, &y, &values(73), 10.0).unwrap();
        assert_eq!(g.size(), [B as i64, D as i64]);
        for two_sided in [true, false] {
            let (loss, _) = op.perturbation_gradient(&pred, &c, 0.5, two_sided).unwrap();
            assert_eq!(loss.size(), [B as i64]);
        }
    }
}
