//! The safe Rust API with tch tensors: shapes, kinds, errors, determinism, threads.

mod common;

use common::argmax;
use perturbations::{Config, DeviceSpec, Noise, PerturbedOp, Status};
use tch::{Device, Kind, Tensor};

fn config(threads: u32) -> Config {
    let mut c = Config::new();
    c.set_num_samples(5000)
        .unwrap()
        .set_sigma(0.5)
        .unwrap()
        .set_threads(threads)
        .unwrap();
    c.set_noise(Noise::Gumbel)
        .set_seed(99)
        .set_device(DeviceSpec::Cpu);
    c
}

fn theta() -> Tensor {
    Tensor::from_slice(&[-0.6f32, 1.9, -0.2, 1.1, -1.0, -0.6, 1.0, -0.2, 1.8, -1.0]).reshape([2, 5])
}

#[test]
fn forward_and_vjp_match_softmax() {
    let op = PerturbedOp::new(&config(1), &[5], &[5], argmax).unwrap();
    let (y, tape) = op.forward_with_tape(&theta()).unwrap();
    assert_eq!(y.size(), [2, 5]);
    let p = (theta() / 0.5).softmax(-1, Kind::Float);
    // forward entries: s.d. <= 0.5 / sqrt(5000) = 0.0071
    let err = f64::try_from((&y - &p).abs().max()).unwrap();
    assert!(err < 5.0 * 0.5 / 5000f64.sqrt(), "{err}");
    // VJP of g = e_1 against the softmax Jacobian row: s.d. <= 1 / (sigma sqrt(N))
    let g = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
    let _ = g.narrow(1, 1, 1).fill_(1.0);
    let vjp = tape.vjp(&g).unwrap();
    let p1 = p.narrow(1, 1, 1);
    let onehot = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
    let _ = onehot.narrow(1, 1, 1).fill_(1.0);
    let exact = (&p1 * (&onehot - &p)) / 0.5;
    let err = f64::try_from((&vjp - &exact).abs().max()).unwrap();
    assert!(err < 5.0 / (0.5 * 5000f64.sqrt()), "{err}");
}

#[test]
fn wrong_shapes_and_kinds_are_invalid_arguments() {
    let op = PerturbedOp::new(&config(1), &[5], &[5], argmax).unwrap();
    let err = op
        .forward(&Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert_eq!(err.status(), Status::InvalidArgument);
    assert_eq!(
        err.message(),
        "theta must have shape [batch, 5], got [2, 4]"
    );
    let err = op
        .forward(&Tensor::zeros([2, 5], (Kind::Double, Device::Cpu)))
        .unwrap_err();
    assert!(err.message().contains("float32"), "{}", err.message());
    let nan = theta();
    let _ = nan.narrow(1, 2, 1).fill_(f64::NAN);
    assert_eq!(
        op.forward(&nan).unwrap_err().status(),
        Status::NonFiniteInput
    );
    let (_, tape) = op.forward_with_tape(&theta()).unwrap();
    let err = tape
        .vjp(&Tensor::zeros([3, 5], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert_eq!(
        err.message(),
        "grad_output must have shape [2, 5], got [3, 5]"
    );
}

#[test]
fn solver_errors_carry_their_message() {
    let op = PerturbedOp::new(
        &config(1),
        &[5],
        &[5],
        |_: &[f32], _: usize, _: &mut [f32]| Err("infeasible".to_string()),
    )
    .unwrap();
    let err = op.forward(&theta()).unwrap_err();
    assert_eq!(err.status(), Status::SolverFailed);
    assert!(err.message().contains("infeasible"));
}

#[test]
fn results_are_bitwise_equal_for_any_thread_count_and_tape_outlives_op() {
    let run = |threads| {
        let op = PerturbedOp::new(&config(threads), &[5], &[5], argmax).unwrap();
        let (y, tape) = op.forward_with_tape(&theta()).unwrap();
        drop(op);
        (y, tape.jacobian().unwrap())
    };
    let (y1, j1) = run(1);
    for threads in [2, 3, 7] {
        let (y, j) = run(threads);
        assert!(y.equal(&y1) && j.equal(&j1), "threads = {threads}");
    }
}

#[test]
fn threads_share_out_a_batch_and_stay_bitwise_equal_with_a_samples_tape() {
    // 200 outputs x 200 inputs, 150 samples: the samples (150 x 400 floats a problem) are
    // smaller than the sums (200 x 200), so the tape keeps them, written in place by the
    // solver threads; the 5 problems' blocks are spread over the threads.
    let run = |threads: u32, baseline| {
        let mut c = config(threads);
        c.set_num_samples(150).unwrap().set_baseline(baseline);
        c.set_noise(Noise::Normal)
            .set_perturbation(perturbations::Perturbation::Multiplicative);
        let op = PerturbedOp::new(&c, &[200], &[200], argmax).unwrap();
        let theta = Tensor::linspace(0.5, 2.0, 1000, (Kind::Float, Device::Cpu)).reshape([5, 200]);
        let (y, tape) = op.forward_with_tape(&theta).unwrap();
        (y, tape.jacobian().unwrap(), tape.objective().unwrap())
    };
    for baseline in [
        perturbations::Baseline::SampleMean,
        perturbations::Baseline::None,
    ] {
        let (y1, j1, f1) = run(1, baseline);
        for threads in [2, 3] {
            let (y, j, f) = run(threads, baseline);
            assert!(
                y.equal(&y1) && j.equal(&j1) && f.equal(&f1),
                "threads = {threads}, {baseline:?}"
            );
        }
    }
}

#[test]
fn fresh_noise_per_call_and_reproducible_per_seed() {
    let a = PerturbedOp::new(&config(1), &[5], &[5], argmax).unwrap();
    let b = PerturbedOp::new(&config(1), &[5], &[5], argmax).unwrap();
    let a1 = a.forward(&theta()).unwrap();
    let a2 = a.forward(&theta()).unwrap();
    let b1 = b.forward(&theta()).unwrap();
    assert!(!a1.equal(&a2));
    assert!(a1.equal(&b1));
}

#[test]
fn library_never_touches_the_global_torch_rng() {
    tch::manual_seed(1234);
    let expected = Tensor::randn([8], (Kind::Float, Device::Cpu));
    tch::manual_seed(1234);
    let op = PerturbedOp::new(&config(2), &[5], &[5], argmax).unwrap();
    let _ = op.forward_with_tape(&theta()).unwrap();
    let got = Tensor::randn([8], (Kind::Float, Device::Cpu));
    assert!(got.equal(&expected));
}

#[test]
fn large_num_samples_are_chunked_with_bounded_buffers() {
    // 2 problems x 400k samples x 5 floats would be 16 MB of inputs at once; the op works
    // in chunks of 2 MiB and still matches the softmax.
    let mut c = config(2);
    c.set_num_samples(400_000).unwrap();
    let op = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
    let y = op.forward(&theta()).unwrap();
    let p = (theta() / 0.5).softmax(-1, Kind::Float);
    let err = f64::try_from((&y - &p).abs().max()).unwrap();
    assert!(err < 5.0 * 0.5 / 400_000f64.sqrt(), "{err}");
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// No safe call hands out storage of a tape: mutating in place every tensor the API returns
/// (the output y, the Jacobian, the objective, VJP and JVP results) leaves later results of
/// the tape unchanged, for every tape form (sums; samples on the libtorch path, whose centre
/// was the output's storage; solutions redrawn on the host) and baseline.
#[test]
fn tensors_returned_by_the_api_share_no_storage_with_the_tape() {
    use perturbations::Baseline;
    for (n, libtorch) in [(1000u64, false), (3, true), (3, false)] {
        for baseline in [Baseline::None, Baseline::SampleMean, Baseline::CleanInput] {
            let mut c = config(1);
            c.set_num_samples(n).unwrap();
            c.set_libtorch_path(libtorch).set_baseline(baseline);
            let op = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
            let (mut y, tape) = op.forward_with_tape(&theta()).unwrap();
            let case = format!(
                "N {n}, libtorch {libtorch}, {baseline:?}, {}",
                tape.keeps_samples()
            );
            let g =
                Tensor::from_slice(&[1f32, -2., 0.5, 3., 0., 1., 1., -1., 2., 2.]).reshape([2, 5]);
            let (vjp, jvp) = (
                values(&tape.vjp(&g).unwrap()),
                values(&tape.jvp(&g).unwrap()),
            );
            let (jac, obj) = (
                values(&tape.jacobian().unwrap()),
                values(&tape.objective().unwrap()),
            );
            let _ = y.f_mul_scalar_(1000.0).unwrap();
            let _ = tape.jacobian().unwrap().f_mul_scalar_(1000.0).unwrap();
            let _ = tape.objective().unwrap().f_mul_scalar_(1000.0).unwrap();
            let _ = tape.vjp(&g).unwrap().f_mul_scalar_(1000.0).unwrap();
            let _ = tape.jvp(&g).unwrap().f_mul_scalar_(1000.0).unwrap();
            assert_eq!(values(&tape.vjp(&g).unwrap()), vjp, "{case}");
            assert_eq!(values(&tape.jvp(&g).unwrap()), jvp, "{case}");
            assert_eq!(values(&tape.jacobian().unwrap()), jac, "{case}");
            assert_eq!(values(&tape.objective().unwrap()), obj, "{case}");
        }
    }
}

/// A draw keeps its own copy of theta: changing the caller's theta between `draw` and
/// `finish` changes nothing (the draw used to keep the caller's storage, so the objective
/// and the multiplicative Jacobian followed the caller's changes).
#[test]
fn a_draw_keeps_its_own_theta() {
    use perturbations::Perturbation;
    let mut c = config(1);
    c.set_noise(Noise::Normal)
        .set_perturbation(Perturbation::Multiplicative);
    c.set_num_samples(200).unwrap();
    let op = PerturbedOp::new_external(&c, &[5], &[5]).unwrap();
    let mut th = theta();
    let draw = op.draw(&th).unwrap();
    let mut solutions = vec![0f32; draw.count() * 5];
    argmax(draw.inputs(), draw.count(), &mut solutions).unwrap();
    let (_, before) = draw.finish(&solutions, true).unwrap();
    let _ = th.f_mul_scalar_(100.0).unwrap();
    let (_, after) = draw.finish(&solutions, true).unwrap();
    let (before, after) = (before.unwrap(), after.unwrap());
    assert_eq!(
        values(&before.objective().unwrap()),
        values(&after.objective().unwrap())
    );
    assert_eq!(
        values(&before.jacobian().unwrap()),
        values(&after.jacobian().unwrap())
    );
}

/// N = 1 works with the default settings (sample-mean baseline): the sample mean of one
/// sample is undefined, so the call uses the plain estimator, bit for bit; the
/// Fenchel-Young loss works too (the most common setting of decision-focused learning).
#[test]
fn one_sample_works_with_the_default_baseline() {
    use perturbations::{Baseline, Builtin};
    let mut c = config(1);
    c.set_num_samples(1).unwrap();
    assert_eq!(c.baseline(), Baseline::SampleMean);
    let mut plain = c.clone();
    plain.set_baseline(Baseline::None);
    for make in [
        |c: &perturbations::Config| PerturbedOp::new(c, &[5], &[5], argmax).unwrap(),
        |c: &perturbations::Config| PerturbedOp::new_builtin(c, Builtin::Argmax, &[5]).unwrap(),
    ] {
        let (a, b) = (make(&c), make(&plain));
        let (ya, ta) = a.forward_with_tape(&theta()).unwrap();
        let (yb, tb) = b.forward_with_tape(&theta()).unwrap();
        assert_eq!(values(&ya), values(&yb));
        let g = theta().cos();
        let vjp = values(&ta.vjp(&g).unwrap());
        assert_eq!(vjp, values(&tb.vjp(&g).unwrap()));
        assert!(vjp.iter().all(|v| v.is_finite()) && vjp.iter().any(|&v| v != 0.0));
        let y_true =
            Tensor::from_slice(&[0f32, 1., 0., 0., 0., 0., 0., 0., 1., 0.]).reshape([2, 5]);
        let (loss, grad) = a.fenchel_young(&theta(), &y_true).unwrap();
        assert_eq!(loss.size(), [2]);
        assert!(values(&grad).iter().all(|v| v.is_finite()));
    }
}

/// Batch 0 through every pipeline: an empty output and an empty tape whose products work.
#[test]
fn batch_zero_gives_empty_results_and_tapes_in_every_pipeline() {
    use perturbations::{Baseline, Builtin};
    let empty = Tensor::zeros([0, 5], (Kind::Float, Device::Cpu));
    for (n, libtorch, baseline) in [
        (100u64, false, Baseline::SampleMean),
        (3, false, Baseline::SampleMean),
        (100, true, Baseline::CleanInput),
        (3, true, Baseline::None),
    ] {
        let mut c = config(2);
        c.set_num_samples(n).unwrap();
        c.set_libtorch_path(libtorch).set_baseline(baseline);
        let ops = [
            PerturbedOp::new(&c, &[5], &[5], |_: &[f32], count: usize, _: &mut [f32]| {
                assert!(count > 0, "the solver is never called with count 0");
                Ok(())
            })
            .unwrap(),
            PerturbedOp::new_builtin(&c, Builtin::Argmax, &[5]).unwrap(),
            PerturbedOp::new_builtin(&c, Builtin::TopK(2), &[5]).unwrap(),
        ];
        for op in &ops {
            let (y, tape) = op.forward_with_tape(&empty).unwrap();
            assert_eq!(y.size(), [0, 5]);
            assert_eq!(tape.batch(), 0);
            assert_eq!(tape.vjp(&empty).unwrap().size(), [0, 5]);
            assert_eq!(tape.jvp(&empty).unwrap().size(), [0, 5]);
            assert_eq!(tape.jacobian().unwrap().size(), [0, 5, 5]);
            assert_eq!(tape.objective().unwrap().size(), [0]);
            assert_eq!(op.forward(&empty).unwrap().size(), [0, 5]);
            let (loss, grad) = op.fenchel_young(&empty, &empty).unwrap();
            assert_eq!((loss.size(), grad.size()), (vec![0], vec![0, 5]));
        }
    }
}

/// `PerturbedOp::solve` is the solver with no noise, by the op's threads, on every kind of
/// op, and draws no noise (a later forward call equals a fresh op's first).
#[test]
fn solve_is_the_plain_solver_and_draws_no_noise() {
    let x = Tensor::from_slice(&[0.5f32, 1.0, 0.2, 3.0, -1.0, 2.0]).reshape([2, 3]);
    let want = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0, 0.0, 0.0]).reshape([2, 3]);
    for threads in [1, 2] {
        let mut c = common::config(Noise::Gumbel, 0.5, 200, 3);
        c.set_threads(threads).unwrap();
        let callback = PerturbedOp::new(&c, &[3], &[3], argmax).unwrap();
        let builtin = PerturbedOp::new_builtin(&c, perturbations::Builtin::Argmax, &[3]).unwrap();
        for op in [&callback, &builtin] {
            assert!(op.solve(&x).unwrap().equal(&want), "threads {threads}");
        }
        let fresh = PerturbedOp::new(&c, &[3], &[3], argmax).unwrap();
        assert!(callback
            .forward(&x)
            .unwrap()
            .equal(&fresh.forward(&x).unwrap()));
    }
    let c = common::config(Noise::Gumbel, 0.5, 200, 3);
    let op = PerturbedOp::new(&c, &[3], &[3], argmax).unwrap();
    let err = op
        .solve(&Tensor::from_slice(&[f32::NAN, 0.0, 0.0]).reshape([1, 3]))
        .unwrap_err();
    assert_eq!(err.status(), Status::NonFiniteInput);
    let err = op
        .solve(&Tensor::zeros([2, 4], (tch::Kind::Float, tch::Device::Cpu)))
        .unwrap_err();
    assert!(err.message().contains("x must have shape"), "{err}");
    let external = PerturbedOp::new_external(&c, &[3], &[3]).unwrap();
    assert_eq!(
        external.solve(&x).unwrap_err().status(),
        Status::InvalidArgument
    );
}

/// The contract the crate's docs state: inputs are checked, but a result beyond float32's
/// range (here the objective ⟨θ + σZ, y⟩ of a θ near `f32::MAX`) is ±inf in its tensor,
/// as libtorch's own operations give it (the C layer refuses it: tests/c/test_api.c).
#[test]
fn a_result_beyond_float32_is_inf_in_its_tensor() {
    let mut c = config(1);
    c.set_num_samples(16).unwrap();
    let op = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
    let big = Tensor::from_slice(&[3e38f32, 3e38, 3e38, 3e38, 3e38]).reshape([1, 5]);
    let (_, tape) = op.forward_with_tape(&big).unwrap();
    let objective = f32::try_from(tape.objective().unwrap().sum(Kind::Float)).unwrap();
    assert!(objective.is_infinite(), "{objective}");
}
