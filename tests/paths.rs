//! Every path computes the same estimates, with every tape form: a table of cases, each run
//! through every path a CPU call can take (forced by the hidden `Config::set_path`, not by
//! the size thresholds that choose it) and each tape form (forced by the hidden
//! `Config::set_tape_form`), compared with the host pipeline's tape of sums; each tape
//! says which path made it. A path a call cannot take is refused with INVALID_ARGUMENT.
//! Callbacks run on one thread (in two stages when the call is large enough), on two, and
//! on an op's own workers.

mod common;

use common::{argmax, config};
use perturbations::settings::Path;
use perturbations::{
    Baseline, Builtin, Config, Noise, Perturbation, PerturbedOp, SolveInfo, Status, Tape, TapeForm,
    WorkerSolver,
};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Solver {
    Callback,
    /// A callback on two solver threads.
    Threads2,
    /// A solver with two workers of its own.
    Workers,
    Argmax,
    TopK2,
    Ranks,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    solver: Solver,
    noise: Noise,
    model: Perturbation,
    antithetic: bool,
    baseline: Baseline,
    batch: i64,
    d: i64,
    n: u64,
}

const SIGMA: f64 = 0.3;

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for solver in [
        Solver::Callback,
        Solver::Threads2,
        Solver::Workers,
        Solver::Argmax,
        Solver::TopK2,
        Solver::Ranks,
    ] {
        for (noise, model, antithetic, baseline) in [
            (
                Noise::Gumbel,
                Perturbation::Additive,
                false,
                Baseline::SampleMean,
            ),
            (
                Noise::Normal,
                Perturbation::Additive,
                false,
                Baseline::CleanInput,
            ),
            (
                Noise::Normal,
                Perturbation::Multiplicative,
                false,
                Baseline::None,
            ),
            (
                Noise::Normal,
                Perturbation::Additive,
                true,
                Baseline::SampleMean,
            ),
        ] {
            // whole problems in a block (and a chunk), problems cut into several, and (for
            // a callback on one thread) a call large enough for two stages
            let two_stages = (solver == Solver::Callback).then_some((64, 40, 16));
            for (batch, d, n) in [(3, 5, 64), (2, 6, 1500)].into_iter().chain(two_stages) {
                cases.push(Case {
                    solver,
                    noise,
                    model,
                    antithetic,
                    baseline,
                    batch,
                    d,
                    n,
                });
            }
        }
    }
    cases
}

/// The argmax as a solver with workers.
struct ArgmaxWorkers;

impl WorkerSolver for ArgmaxWorkers {
    fn solve(&self, _: &SolveInfo, x: &[f32], count: usize, y: &mut [f32]) -> Result<(), String> {
        argmax(x, count, y)
    }
}

fn op(c: &Config, case: &Case) -> perturbations::Result<PerturbedOp> {
    let d = [case.d];
    match case.solver {
        Solver::Callback | Solver::Threads2 => PerturbedOp::new(c, &d, &d, argmax),
        Solver::Workers => PerturbedOp::with_workers(c, &d, &d, ArgmaxWorkers),
        Solver::Argmax => PerturbedOp::new_builtin(c, Builtin::Argmax, &d),
        Solver::TopK2 => PerturbedOp::new_builtin(c, Builtin::TopK(2), &d),
        Solver::Ranks => PerturbedOp::new_builtin(c, Builtin::Ranks, &d),
    }
}

/// θ with entries of magnitude 0.5 .. 1.5 (so that 1/θ, the multiplicative model's column
/// scale, is at most 2), and a cotangent and a tangent.
fn inputs(case: &Case) -> (Tensor, Tensor, Tensor) {
    let (b, d) = (case.batch, case.d);
    let k = Tensor::arange(b * d, (tch::Kind::Float, tch::Device::Cpu));
    let theta = ((&k * 1.7).sin() * 0.5 + 1.0) * (&k * 0.9).cos().sign();
    let g = (&k * 2.3).cos();
    let t = (&k * 0.7).sin();
    (theta.reshape([b, d]), g.reshape([b, d]), t.reshape([b, d]))
}

/// What a call with a tape gives: y, J, Jᵀg, J t and F.
struct Results {
    y: Tensor,
    j: Tensor,
    vjp: Tensor,
    jvp: Tensor,
    f: Tensor,
}

fn results(y: Tensor, tape: &Tape, g: &Tensor, t: &Tensor) -> Results {
    Results {
        y,
        j: tape.jacobian().unwrap(),
        vjp: tape.vjp(g).unwrap(),
        jvp: tape.jvp(t).unwrap(),
        f: tape.objective().unwrap(),
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

/// Two paths draw the same noise and add the same terms in other orders (float32 tiles of
/// up to 64 rows on the host paths, whole chunks of up to N rows in libtorch's products),
/// so they differ by float32 rounding alone: for each, at most K·2⁻²⁴ times the sum of the
/// terms' magnitudes, K ≤ N + 64 the longest float32 sum. With the sum of magnitudes at
/// most N·`term` (a bound of one term) and the estimate divided by N, the two differ by at
/// most 2·(N + 64)·2⁻²⁴·`term`.
///
/// The CUDA path's arithmetic on a CPU also draws the noise with libtorch's transforms,
/// which round each value their own way (by up to 1e-6): a solver's decision (argmax,
/// top-k, ranks) flips where that moves a perturbed input across a tie, changing y by 1/N.
/// None does with these seeds: the noise is a pure function of the seed, and libtorch's
/// CPU transforms compute each lane alike on every vector width, so this is not a matter
/// of chance on another machine.
fn rounding(n: u64, term: f64) -> f64 {
    2.0 * (n + 64) as f64 * f64::from(f32::EPSILON) / 2.0 * term
}

/// Bounds of one sample's terms: |Y| (2 for one-hot and top-2 rows, d for ranks), |z| and
/// |s| (the uniforms have 23 bits, u in [2⁻²⁴, 1 − 2⁻²⁴]: a Normal |z| ≤ √(2·24·ln 2) <
/// 6; a Gumbel z = −ln(−ln u) lies in (−2.9, 16.7) and its score 1 − e^{−z} in (−16, 1)),
/// |x| and 1/|θ| (≤ 2).
struct Bounds {
    y: f64,
    s: f64,
    x: f64,
    col: f64,
}

fn bounds(case: &Case) -> Bounds {
    let z: f64 = if case.noise == Noise::Normal {
        6.0
    } else {
        17.0
    };
    let y = if case.solver == Solver::Ranks {
        case.d as f64
    } else {
        2.0
    };
    let (x, col) = match case.model {
        Perturbation::Additive => (1.5 + SIGMA * z, 1.0),
        Perturbation::Multiplicative => (1.5 * (SIGMA * z).exp(), 2.0),
    };
    Bounds { y, s: z, x, col }
}

/// `a` and `b` (results of two paths) agree up to rounding.
fn agree(a: &Results, b: &Results, case: &Case, what: &str) {
    let k = bounds(case);
    let n = case.n;
    let d = case.d as f64;
    // Y − c is at most 2·|Y|; a product sums d (or o) entries of g or t, each at most 1
    let j_term = 2.0 * k.y * k.s * k.col / SIGMA;
    let checks = [
        ("y", &a.y, &b.y, rounding(n, k.y)),
        ("J", &a.j, &b.j, rounding(n, j_term)),
        ("vjp", &a.vjp, &b.vjp, rounding(n, d * j_term)),
        ("jvp", &a.jvp, &b.jvp, rounding(n, d * j_term)),
        ("F", &a.f, &b.f, rounding(n, d * k.y * k.x)),
    ];
    for (name, x, y, tol) in checks {
        let diff = max_abs(x, y);
        assert!(diff <= tol, "{what}: {name} differs by {diff} > {tol}");
    }
}

/// The config of `case`, with `path` and `form` forced.
fn config_of(case: &Case, path: Option<Path>, form: Option<TapeForm>) -> Config {
    let mut c = config(case.noise, SIGMA, case.n, 11);
    let threads = match case.solver {
        Solver::Threads2 | Solver::Workers => 2,
        _ => 1,
    };
    c.set_threads(threads).unwrap();
    c.set_perturbation(case.model)
        .set_antithetic(case.antithetic)
        .set_baseline(case.baseline)
        .set_path(path)
        .set_tape_form(form);
    c
}

/// Whether a CPU call of `case` can take `path` with a tape of `form` (None: no tape).
fn possible(case: &Case, path: Path, form: Option<TapeForm>) -> bool {
    match path {
        Path::FusedArgmax => case.solver == Solver::Argmax && form != Some(TapeForm::Samples),
        Path::Host | Path::Chunks | Path::Cuda => true,
    }
}

#[test]
fn every_path_and_tape_form_gives_the_same_estimates() {
    let paths = [Path::Host, Path::FusedArgmax, Path::Chunks, Path::Cuda];
    let forms = [TapeForm::Sums, TapeForm::Samples];
    let mut compared = 0;
    for case in cases() {
        let (theta, g, t) = inputs(&case);
        let reference = {
            let c = config_of(&case, Some(Path::Host), Some(TapeForm::Sums));
            let (y, tape) = op(&c, &case).unwrap().forward_with_tape(&theta).unwrap();
            assert!(!tape.keeps_samples());
            results(y, &tape, &g, &t)
        };
        for path in paths {
            for form in forms {
                let what = format!("{case:?} on {path:?} with a tape of {form:?}");
                let c = config_of(&case, Some(path), Some(form));
                let op = op(&c, &case).unwrap();
                let made = op.forward_with_tape(&theta);
                if !possible(&case, path, Some(form)) {
                    let err = made.expect_err(&what);
                    assert_eq!(err.status(), Status::InvalidArgument, "{what}: {err}");
                    continue;
                }
                let (y, tape) = made.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(tape.path(), Some(path), "{what}: the path taken");
                assert_eq!(tape.keeps_samples(), form == TapeForm::Samples, "{what}");
                agree(&reference, &results(y, &tape, &g, &t), &case, &what);
                // without a tape (a new op: its first call draws the same noise)
                let y = self::op(&c, &case).unwrap().forward(&theta).unwrap();
                let tol = rounding(case.n, bounds(&case).y);
                assert!(max_abs(&reference.y, &y) <= tol, "{what}: forward");
                compared += 1;
            }
            // the two-phase API: the draw's inputs solved by the same solver give the
            // same y, whatever path the solutions take (the built-in argmax's op hands
            // them to the fused kernel)
            if matches!(
                case.solver,
                Solver::Callback | Solver::Threads2 | Solver::Argmax
            ) {
                let c = config_of(&case, Some(path), None);
                let what = format!("{case:?}: a draw on {path:?}");
                let op = op(&c, &case).unwrap();
                match op.draw(&theta) {
                    Err(e) => {
                        assert!(!possible(&case, path, None), "{what}: {e}");
                        assert_eq!(e.status(), Status::InvalidArgument, "{what}");
                    }
                    Ok(draw) => {
                        let mut solutions = vec![0f32; draw.count() * case.d as usize];
                        argmax(draw.inputs(), draw.count(), &mut solutions).unwrap();
                        let (y, tape) = draw.finish(&solutions, true).unwrap();
                        let tape = tape.expect("a tape was asked for");
                        assert_eq!(tape.path(), Some(path), "{what}: the path taken");
                        agree(&reference, &results(y, &tape, &g, &t), &case, &what);
                        compared += 1;
                    }
                }
            }
        }
    }
    // 6 solvers × 4 settings × 2 sizes, and 4 two-stage cases: host, chunks and the CUDA
    // arithmetic with each form (6), the fused argmax with sums (1 for the argmax), and
    // the draws of the callbacks and the argmax
    assert!(compared >= 52 * 6 + 8 + 28 * 3, "{compared} comparisons");
}
