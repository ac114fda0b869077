//! Pinned results of every pipeline for fixed seeds, so that a refactoring cannot change
//! them unnoticed: the fused argmax kernel, the host pipeline (callback and built-ins, tapes
//! of sums and of redrawn solutions, several threads), the libtorch chunk path, the
//! two-phase API and the Fenchel-Young loss.
//!
//! Values made by the library's own code (noise, host sums, replayed products) are compared
//! bit for bit: they are the same on every x86-64 CPU. Values that pass through a libtorch
//! reduction or matrix product, whose rounding may depend on the CPU's kernels, are
//! compared within 2e-6. `PERT_PIN_PRINT=1 cargo test --release --test pinned --
//! --nocapture` prints the values (to pin them again after a deliberate change).

mod common;

use common::{argmax, config};
use perturbations::{Baseline, Builtin, Noise, Perturbation, PerturbedOp};
use tch::{Kind, Tensor};

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn theta(batch: i64, d: i64) -> Tensor {
    let v: Vec<f32> = (0..batch * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.13)
        .collect();
    Tensor::from_slice(&v).reshape([batch, d])
}

/// Checks `got` against `want`: bit for bit when `exact`, else within 2e-6.
fn check(name: &str, got: &[f32], want: &[f32], exact: bool) {
    if std::env::var_os("PERT_PIN_PRINT").is_some() {
        println!("{name}: &{got:?},");
        return;
    }
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if exact {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs pinned {w}");
        } else {
            assert!((g - w).abs() <= 2e-6, "{name}[{i}]: {g} vs pinned {w}");
        }
    }
}

/// Forward output and the VJP of a fixed cotangent.
fn forward_vjp(op: &PerturbedOp, theta: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let (y, tape) = op.forward_with_tape(theta).unwrap();
    let g = theta.sin();
    (values(&y), values(&tape.vjp(&g).unwrap()))
}

#[test]
fn fused_argmax_kernel() {
    let mut c = config(Noise::Gumbel, 0.5, 2000, 1);
    c.set_threads(2).unwrap();
    let op = PerturbedOp::new_builtin(&c, Builtin::Argmax, &[5]).unwrap();
    let th = theta(2, 5);
    check(
        "fused_forward",
        &values(&op.forward(&th).unwrap()),
        FUSED_FORWARD,
        true,
    );
    let (y, vjp) = forward_vjp(&op, &th);
    check("fused_tape_forward", &y, FUSED_TAPE_FORWARD, true);
    check("fused_vjp", &vjp, FUSED_VJP, false);
}

#[test]
fn host_callback_with_a_tape_of_solutions() {
    let mut c = config(Noise::Normal, 0.7, 48, 2);
    c.set_threads(2).unwrap();
    let op = PerturbedOp::new(&c, &[64], &[64], argmax).unwrap();
    let th = theta(3, 64);
    let (y, tape) = op.forward_with_tape(&th).unwrap();
    assert!(tape.keeps_samples());
    let vjp = values(&tape.vjp(&th.sin()).unwrap());
    // the first and last problem's first 8 entries and every 16th VJP entry
    let pick = |v: &[f32]| -> Vec<f32> { v.iter().step_by(16).copied().collect() };
    check(
        "callback_forward",
        &pick(&values(&y)),
        CALLBACK_FORWARD,
        true,
    );
    check("callback_vjp", &pick(&vjp), CALLBACK_VJP, true);
}

#[test]
fn host_topk_antithetic_with_a_tape_of_sums() {
    let mut c = config(Noise::Normal, 0.4, 500, 3);
    c.set_antithetic(true);
    let op = PerturbedOp::new_builtin(&c, Builtin::TopK(2), &[6]).unwrap();
    let (y, vjp) = forward_vjp(&op, &theta(2, 6));
    check("topk_forward", &y, TOPK_FORWARD, true);
    check("topk_vjp", &vjp, TOPK_VJP, false);
}

#[test]
fn host_ranks_multiplicative_with_a_tape_of_solutions() {
    let mut c = config(Noise::Normal, 0.3, 3, 4);
    c.set_perturbation(Perturbation::Multiplicative);
    let op = PerturbedOp::new_builtin(&c, Builtin::Ranks, &[5]).unwrap();
    let (y, vjp) = forward_vjp(&op, &theta(2, 5));
    check("ranks_forward", &y, RANKS_FORWARD, true);
    check("ranks_vjp", &vjp, RANKS_VJP, true);
}

#[test]
fn libtorch_chunk_path() {
    let mut c = config(Noise::Gumbel, 0.5, 400, 5);
    c.set_libtorch_path(true).set_baseline(Baseline::CleanInput);
    c.set_chunk_bytes(2048);
    let op = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
    let (y, vjp) = forward_vjp(&op, &theta(2, 5));
    check("libtorch_forward", &y, LIBTORCH_FORWARD, false);
    check("libtorch_vjp", &vjp, LIBTORCH_VJP, false);
}

#[test]
fn two_phase_draw_and_finish() {
    let c = config(Noise::Normal, 0.6, 100, 6);
    let op = PerturbedOp::new_external(&c, &[4], &[4]).unwrap();
    let draw = op.draw(&theta(2, 4)).unwrap();
    let mut solutions = vec![0f32; draw.count() * 4];
    argmax(draw.inputs(), draw.count(), &mut solutions).unwrap();
    let (y, tape) = draw.finish(&solutions, true).unwrap();
    check(
        "two_phase_inputs",
        &draw.inputs()[..12],
        TWO_PHASE_INPUTS,
        true,
    );
    check("two_phase_forward", &values(&y), TWO_PHASE_FORWARD, true);
    let vjp = values(&tape.unwrap().vjp(&theta(2, 4).sin()).unwrap());
    check("two_phase_vjp", &vjp, TWO_PHASE_VJP, false);
}

#[test]
fn fenchel_young_loss_and_gradient() {
    let c = config(Noise::Gumbel, 0.5, 500, 7);
    let op = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
    let th = theta(2, 5);
    let y_true = Tensor::from_slice(&[0f32, 1., 0., 0., 0., 0., 0., 0., 0., 1.]).reshape([2, 5]);
    let (loss, grad) = op.fenchel_young(&th, &y_true).unwrap();
    check("fy_loss", &values(&loss), FY_LOSS, false);
    check("fy_grad", &values(&grad), FY_GRAD, true);
}
const FUSED_FORWARD: &[f32] = &[
    0.064, 0.161, 0.482, 0.073, 0.22, 0.3165, 0.0475, 0.151, 0.424, 0.061,
];
const FUSED_TAPE_FORWARD: &[f32] = &[
    0.0605, 0.1785, 0.4695, 0.0835, 0.208, 0.3385, 0.053, 0.1455, 0.393, 0.07,
];
const FUSED_VJP: &[f32] = &[
    -0.078961715,
    -0.06519704,
    0.29238954,
    -0.082011506,
    -0.032707043,
    0.08832421,
    -0.07085495,
    -0.08028177,
    0.17240757,
    -0.0963832,
];
const CALLBACK_FORWARD: &[f32] = &[
    0.0,
    0.041666668,
    0.020833334,
    0.0,
    0.0,
    0.0,
    0.083333336,
    0.020833334,
    0.020833334,
    0.0,
    0.0,
    0.0,
];
const CALLBACK_VJP: &[f32] = &[
    0.0050316597,
    -0.013277793,
    0.010086341,
    0.00081598264,
    0.023453837,
    -0.060516518,
    0.030877437,
    0.0052175927,
    0.08683522,
    0.051014308,
    -0.09226104,
    -0.016892226,
];
const TOPK_FORWARD: &[f32] = &[
    0.022, 0.172, 0.688, 0.042, 0.264, 0.812, 0.054, 0.384, 0.874, 0.126, 0.544, 0.018,
];
const TOPK_VJP: &[f32] = &[
    -0.0892379,
    -0.2023507,
    0.29417393,
    -0.22113994,
    -0.15404175,
    0.24334762,
    -0.11007961,
    -0.02071323,
    0.2513805,
    -0.23372379,
    0.12899058,
    -0.07500668,
];
const RANKS_FORWARD: &[f32] = &[
    1.3333334, 3.0, 5.0, 1.6666666, 4.0, 4.3333335, 1.6666666, 3.0, 4.6666665, 1.3333334,
];
const RANKS_VJP: &[f32] = &[
    -0.17550045,
    0.7112041,
    0.64267415,
    0.35830197,
    -0.0,
    -0.6663387,
    -0.4411016,
    -1.9356164,
    0.53796405,
    1.3659325,
];
const LIBTORCH_FORWARD: &[f32] = &[
    0.0425, 0.1375, 0.49, 0.075, 0.255, 0.2675, 0.06, 0.16, 0.435, 0.0775,
];
const LIBTORCH_VJP: &[f32] = &[
    -0.025878845,
    -0.008169161,
    0.26867124,
    -0.08667284,
    -0.06613202,
    0.1191278,
    -0.04496778,
    -0.12966496,
    0.14810543,
    -0.06569885,
];
const TWO_PHASE_INPUTS: &[f32] = &[
    -1.625205,
    0.12950498,
    -0.032190174,
    0.4008947,
    0.008180678,
    1.0639155,
    -0.13851511,
    -1.5429648,
    1.0058138,
    0.13238648,
    0.002281189,
    -0.7481656,
];
const TWO_PHASE_FORWARD: &[f32] = &[0.08, 0.2, 0.66, 0.06, 0.24, 0.47, 0.07, 0.22];
const TWO_PHASE_VJP: &[f32] = &[
    -0.19932617,
    -0.17983362,
    0.3595434,
    -0.08903768,
    -0.090767965,
    0.20922673,
    -0.14757934,
    -0.085587434,
];
const FY_LOSS: &[f32] = &[1.1970792, 1.6258621];
const FY_GRAD: &[f32] = &[
    0.066, -0.858, 0.49, 0.078, 0.224, 0.322, 0.062, 0.172, 0.382, -0.938,
];
