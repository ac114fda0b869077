//! I-MLE and AI-MLE (issue 30): the forward is the perturbed optimizer's mean from the same
//! draws, the gradients are their formulas on the same solver outputs (one- and two-sided,
//! per sense), the one-sided gradient of Gumbel argmax matches its closed form in
//! expectation, AI-MLE's step and state follow PyEPO, and errors are clear.
#![allow(clippy::needless_range_loop)] // problems are indexed in several arrays at once

mod common;

use common::{argmax, argmin};
use perturbations::{AimleState, Config, Noise, PerturbedOp, Sense, Status};
use tch::Tensor;

const D: usize = 4;

fn config(noise: Noise, sense: Sense, n: u64, threads: u32) -> Config {
    let mut c = common::config(noise, 0.5, n, 9);
    c.set_sense(sense).set_threads(threads).unwrap();
    c
}

fn op(noise: Noise, sense: Sense, n: u64, threads: u32) -> PerturbedOp {
    let solver = match sense {
        Sense::Maximize => argmax,
        Sense::Minimize => argmin,
    };
    PerturbedOp::new(
        &config(noise, sense, n, threads),
        &[D as i64],
        &[D as i64],
        solver,
    )
    .unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn theta() -> Tensor {
    Tensor::from_slice(&[0.3f32, -0.2, 0.9, 0.1, 0.5, 0.5, 0.0, 1.0]).reshape([2, D as i64])
}

fn g() -> Tensor {
    Tensor::from_slice(&[1.0f32, -1.0, 0.5, 0.0, 0.0, 2.0, -0.5, 0.25]).reshape([2, D as i64])
}

/// The perturbed inputs of the op's first call (a twin op's draw) and their solutions.
fn draws(sense: Sense, noise: Noise, n: u64) -> (Vec<f32>, Vec<f32>) {
    let twin = op(noise, sense, n, 1);
    let draw = twin.draw(&theta()).unwrap();
    let x = draw.inputs()[..2 * n as usize * D].to_vec();
    let mut y = vec![0.0; x.len()];
    match sense {
        Sense::Maximize => argmax(&x, x.len() / D, &mut y).unwrap(),
        Sense::Minimize => argmin(&x, x.len() / D, &mut y).unwrap(),
    }
    (x, y)
}

#[test]
fn forward_is_the_perturbed_mean_of_the_same_draws() {
    let sog = Noise::sum_of_gamma(5.0, 10).unwrap();
    for noise in [Noise::Normal, Noise::Gumbel, sog] {
        for threads in [1, 2] {
            let (y, record) = op(noise, Sense::Maximize, 50, threads)
                .imle_forward(&theta())
                .unwrap();
            assert_eq!(record.batch(), 2);
            let twin = op(noise, Sense::Maximize, 50, 1).forward(&theta()).unwrap();
            assert!((y - twin).abs().max().double_value(&[]) < 1e-6, "{noise:?}");
        }
    }
}

#[test]
fn gradients_are_their_formulas_on_the_same_solver_outputs() {
    let n = 20u64;
    for sense in [Sense::Maximize, Sense::Minimize] {
        let s: f32 = if sense == Sense::Minimize { 1.0 } else { -1.0 };
        let (x, y) = draws(sense, Noise::Gumbel, n);
        let solve = |x: &[f32]| {
            let mut out = vec![0.0; x.len()];
            match sense {
                Sense::Maximize => argmax(x, x.len() / D, &mut out).unwrap(),
                Sense::Minimize => argmin(x, x.len() / D, &mut out).unwrap(),
            }
            out
        };
        let gv = host(&g());
        let moved = |shift: f32| {
            let x2: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| v + shift * gv[(i / (n as usize * D)) * D + i % D])
                .collect();
            solve(&x2)
        };
        for lambda in [0.3f64, 2.0] {
            let l = lambda as f32;
            let want_one: Vec<f64> = {
                let y2 = moved(s * l);
                mean_per_problem(
                    &y2.iter().zip(&y).map(|(a, b)| a - b).collect::<Vec<_>>(),
                    n,
                )
                .iter()
                .map(|m| f64::from(s) * m / lambda)
                .collect()
            };
            let want_two: Vec<f64> = {
                let (up, down) = (moved(l), moved(-l));
                mean_per_problem(
                    &up.iter().zip(&down).map(|(a, b)| a - b).collect::<Vec<_>>(),
                    n,
                )
                .iter()
                .map(|m| m / (2.0 * lambda))
                .collect()
            };
            for (two_sided, want) in [(false, want_one), (true, want_two)] {
                let o = op(Noise::Gumbel, sense, n, 2);
                let (_, record) = o.imle_forward(&theta()).unwrap();
                let grad = host(&o.imle_vjp(&record, &g(), lambda, two_sided).unwrap());
                for (a, b) in grad.iter().zip(&want) {
                    assert!(
                        (f64::from(*a) - b).abs() < 1e-6,
                        "{sense:?} {lambda} {two_sided}: {grad:?} vs {want:?}"
                    );
                }
            }
        }
    }
}

fn mean_per_problem(v: &[f32], n: u64) -> Vec<f64> {
    let n = n as usize;
    let mut out = vec![0.0; 2 * D];
    for b in 0..2 {
        for k in 0..n {
            for j in 0..D {
                out[b * D + j] += f64::from(v[(b * n + k) * D + j]) / n as f64;
            }
        }
    }
    out
}

/// With Gumbel noise the argmax's mean is softmax(θ/σ): in expectation the one-sided I-MLE
/// gradient (maximize: target θ − λg) is (p(θ) − p(θ − λg)) / λ, p = softmax(·/σ). Each
/// sample's difference is in {−1, 0, 1} per entry, so its variance is at most 1: the mean of
/// N has standard error below 1/(λ√N).
#[test]
fn one_sided_gradient_matches_its_expectation_for_gumbel_argmax() {
    let (n, sigma, lambda) = (40_000u64, 0.5f64, 0.5f64);
    let o = op(Noise::Gumbel, Sense::Maximize, n, 2);
    let (_, record) = o.imle_forward(&theta()).unwrap();
    let grad = host(&o.imle_vjp(&record, &g(), lambda, false).unwrap());
    let (t, gv) = (host(&theta()), host(&g()));
    let softmax = |v: &[f64]| {
        let m = v.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = v.iter().map(|x| ((x - m) / sigma).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect::<Vec<_>>()
    };
    for b in 0..2 {
        let th: Vec<f64> = (0..D).map(|j| f64::from(t[b * D + j])).collect();
        let moved: Vec<f64> = (0..D)
            .map(|j| th[j] - lambda * f64::from(gv[b * D + j]))
            .collect();
        let (p, q) = (softmax(&th), softmax(&moved));
        for j in 0..D {
            let want = (p[j] - q[j]) / lambda;
            let tolerance = 5.0 / (lambda * (n as f64).sqrt());
            assert!(
                (f64::from(grad[b * D + j]) - want).abs() < tolerance,
                "[{b}][{j}] {} vs {want}",
                grad[b * D + j]
            );
        }
    }
}

#[test]
fn aimle_step_and_state_follow_pyepo() {
    let n = 30u64;
    let o = op(Noise::Gumbel, Sense::Maximize, n, 1);
    let (_, record) = o.imle_forward(&theta()).unwrap();
    let mut state = AimleState::default();
    let grad = o.aimle_vjp(&record, &g(), false, &mut state).unwrap();
    // λ = α ‖θ‖ / ‖g‖ with α = 1: the same as I-MLE with that λ
    let norm = |t: &Tensor| {
        host(t)
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let lambda = f64::from((norm(&theta()) / norm(&g())) as f32);
    let want = o.imle_vjp(&record, &g(), lambda, false).unwrap();
    assert!((&grad - &want).abs().max().double_value(&[]) < 1e-6);
    let nonzero = host(&grad).iter().filter(|v| v.abs() > 1e-8).count() as f64 / (2 * D) as f64;
    assert!((state.grad_norm_avg - (0.9 + 0.1 * nonzero)).abs() < 1e-12);
    assert!(
        (state.alpha
            - if state.grad_norm_avg < 1.0 {
                1.001
            } else {
                0.999
            })
        .abs()
            < 1e-12
    );
    // a zero upstream gradient: no step, a zero gradient, α up
    let mut state = AimleState::default();
    let zero = o
        .aimle_vjp(&record, &g().zeros_like(), true, &mut state)
        .unwrap();
    assert!(host(&zero).iter().all(|&v| v == 0.0));
    assert!((state.alpha - 1.001).abs() < 1e-12 && (state.grad_norm_avg - 0.9).abs() < 1e-12);
    let mut bad = AimleState {
        alpha: f64::NAN,
        ..AimleState::default()
    };
    let err = o.aimle_vjp(&record, &g(), false, &mut bad).unwrap_err();
    assert!(err.message().contains("AI-MLE state"), "{err}");
}

#[test]
fn errors_are_clear() {
    let o = op(Noise::Normal, Sense::Maximize, 10, 1);
    let (_, record) = o.imle_forward(&theta()).unwrap();
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = o.imle_vjp(&record, &g(), bad, false).unwrap_err();
        assert!(
            err.message().contains("lambda must be finite and > 0"),
            "{err}"
        );
    }
    let other = op(Noise::Normal, Sense::Maximize, 10, 1);
    let err = other.imle_vjp(&record, &g(), 1.0, false).unwrap_err();
    assert!(err.message().contains("comes from another op"), "{err}");
    let err = o
        .imle_vjp(&record, &g().narrow(0, 0, 1), 1.0, false)
        .unwrap_err();
    assert!(
        err.message().contains("grad_output must have the shape"),
        "{err}"
    );
    let nan = g().copy();
    let _ = nan.get(1).get(2).fill_(f64::NAN);
    let err = o.imle_vjp(&record, &nan, 1.0, false).unwrap_err();
    assert_eq!(err.status(), Status::NonFiniteInput);
    let scalar = PerturbedOp::new(
        &config(Noise::Normal, Sense::Maximize, 10, 1),
        &[D as i64],
        &[1],
        |_: &[f32], _: usize, y: &mut [f32]| {
            y.fill(0.0);
            Ok(())
        },
    )
    .unwrap();
    let err = scalar.imle_forward(&theta()).unwrap_err();
    assert!(
        err.message()
            .contains("I-MLE needs output_shape == input_shape"),
        "{err}"
    );
}

#[test]
fn an_empty_batch_gives_empty_results_and_moves_nothing() {
    let o = op(Noise::Gumbel, Sense::Maximize, 10, 2);
    let twin = op(Noise::Gumbel, Sense::Maximize, 10, 2);
    let empty = theta().narrow(0, 0, 0);
    let (y, record) = o.imle_forward(&empty).unwrap();
    assert_eq!(y.size(), vec![0, D as i64]);
    assert_eq!(record.batch(), 0);
    let grad = o.imle_vjp(&record, &empty, 1.0, true).unwrap();
    assert_eq!(grad.size(), vec![0, D as i64]);
    // λ is still checked, and the record still belongs to its op
    assert!(o.imle_vjp(&record, &empty, 0.0, false).is_err());
    assert!(twin.imle_vjp(&record, &empty, 1.0, false).is_err());
    let mut state = AimleState::default();
    let grad = o.aimle_vjp(&record, &empty, false, &mut state).unwrap();
    assert_eq!(grad.size(), vec![0, D as i64]);
    assert_eq!(state, AimleState::default(), "no step to adapt");
    // the empty call drew nothing: the next call draws what the twin's first does
    let (a, _) = o.imle_forward(&theta()).unwrap();
    let (b, _) = twin.imle_forward(&theta()).unwrap();
    assert_eq!(host(&a), host(&b));
}
