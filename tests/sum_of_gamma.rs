//! Sum-of-Gamma noise on ops (issue 30): forward calls, the Fenchel-Young loss and draws
//! work on every path, the same bits as a callback on the same draws; a tape (which needs a
//! score) is refused with a clear error; settings that need other noise are refused.

mod common;

use common::argmax;
use perturbations::{Builtin, Config, Noise, Perturbation, PerturbedOp, Status};
use tch::Tensor;

fn config(threads: u32) -> Config {
    let mut c = common::config(Noise::sum_of_gamma(5.0, 10).unwrap(), 0.5, 300, 4);
    c.set_threads(threads).unwrap();
    c
}

fn theta() -> Tensor {
    Tensor::from_slice(&[0.3f32, -0.2, 0.9, 0.1, 0.5, 0.5, 0.0, 1.0]).reshape([2, 4])
}

#[test]
fn forward_and_fenchel_young_run_with_the_same_draws_on_every_solver() {
    let mut outs = Vec::new();
    for threads in [1, 2] {
        let c = config(threads);
        let callback = PerturbedOp::new(&c, &[4], &[4], argmax).unwrap();
        let builtin = PerturbedOp::new_builtin(&c, Builtin::Argmax, &[4]).unwrap();
        for op in [&callback, &builtin] {
            let y = op.forward(&theta()).unwrap();
            // a distribution over the 4 entries per problem
            let sums = Vec::<f32>::try_from(y.sum_dim_intlist(1, false, tch::Kind::Float)).unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
            outs.push(y);
        }
    }
    for y in &outs[1..] {
        assert!(
            y.equal(&outs[0]),
            "the same draws on every solver and thread count"
        );
    }
    // the Fenchel-Young gradient is y_sigma(theta) - y_true from the same draws
    let c = config(1);
    let op = PerturbedOp::new(&c, &[4], &[4], argmax).unwrap();
    let y_true = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]).reshape([2, 4]);
    let (loss, grad) = op.fenchel_young(&theta(), &y_true).unwrap();
    assert!((grad + &y_true - &outs[0]).abs().max().double_value(&[]) < 1e-6);
    assert_eq!(loss.size(), [2]);
    // the draws of the two-phase API are the forward call's
    let fresh = PerturbedOp::new(&c, &[4], &[4], argmax).unwrap();
    let draw = fresh.draw(&theta()).unwrap();
    let x = draw.inputs().to_vec();
    let mut solutions = vec![0.0f32; x.len()];
    argmax(&x, x.len() / 4, &mut solutions).unwrap();
    let (y, tape) = draw.finish(&solutions, false).unwrap();
    assert!(tape.is_none() && y.equal(&outs[0]));
}

#[test]
fn a_tape_is_refused_clearly() {
    let op = PerturbedOp::new(&config(1), &[4], &[4], argmax).unwrap();
    let err = op.forward_with_tape(&theta()).unwrap_err();
    assert_eq!(err.status(), Status::InvalidArgument);
    assert!(
        err.message()
            .contains("Sum-of-Gamma noise has no closed-form density"),
        "{err}"
    );
    let draw = op.draw(&theta()).unwrap();
    let rows = draw.inputs().len() / 4;
    let err = draw.finish(&vec![0.25f32; rows * 4], true).unwrap_err();
    assert!(err.message().contains("no Jacobian estimate"), "{err}");
}

#[test]
fn settings_that_need_other_noise_are_refused() {
    let mut c = config(1);
    c.set_perturbation(Perturbation::Multiplicative);
    let err = PerturbedOp::new(&c, &[4], &[4], argmax).unwrap_err();
    assert!(
        err.message()
            .contains("needs Normal noise, got Sum-of-Gamma noise"),
        "{err}"
    );
    let mut c = config(1);
    c.set_antithetic(true);
    let err = PerturbedOp::new(&c, &[4], &[4], argmax).unwrap_err();
    assert!(
        err.message()
            .contains("antithetic pairs need symmetric (Normal) noise, got Sum-of-Gamma"),
        "{err}"
    );
}
