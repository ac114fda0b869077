//! Solution pools (issue 31): caching perturbed samples, growth, counts, determinism.

mod common;

use common::argmax;
use perturbations::{Builtin, Config, DeviceSpec, Noise, PerturbedOp, Pool, Status};
use std::sync::Arc;
use tch::Tensor;

const D: usize = 6;

fn config(threads: u32, ratio: f64) -> Config {
    let mut c = Config::new();
    c.set_num_samples(400)
        .unwrap()
        .set_sigma(0.7)
        .unwrap()
        .set_threads(threads)
        .unwrap()
        .set_solve_ratio(ratio)
        .unwrap();
    c.set_noise(Noise::Normal)
        .set_seed(17)
        .set_device(DeviceSpec::Cpu)
        .set_linear_objective(true);
    c
}

fn theta() -> Tensor {
    Tensor::from_slice(&[
        0.3f32, -0.2, 1.1, 0.4, -0.9, 0.0, 1.2, 0.1, -0.3, 0.8, 0.5, -1.0, -0.4, 0.6, 0.2, 0.9,
        -0.1, 0.3,
    ])
    .reshape([3, D as i64])
}

/// Every one-hot vector of length D, in index order.
fn one_hots() -> Vec<f32> {
    let mut rows = vec![0.0f32; D * D];
    for i in 0..D {
        rows[i * D + i] = 1.0;
    }
    rows
}

/// Every 0/1 vector of length D with two ones, in lexicographic order of the positions.
fn pairs() -> Vec<f32> {
    let mut rows = Vec::new();
    for i in 0..D {
        for j in i + 1..D {
            let mut row = vec![0.0f32; D];
            row[i] = 1.0;
            row[j] = 1.0;
            rows.extend(row);
        }
    }
    rows
}

fn pool_of(rows: &[f32]) -> Arc<Pool> {
    let pool = Arc::new(Pool::new(&[D as i64], 1000).unwrap());
    pool.add_rows(rows).unwrap();
    pool
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let (a, b) = (
        Vec::<f32>::try_from(a.flatten(0, -1)).unwrap(),
        Vec::<f32>::try_from(b.flatten(0, -1)).unwrap(),
    );
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// With a pool holding every solution, answering 70% of the samples from it gives the
/// results of solving them all, bit for bit: for a callback and for the built-ins whose
/// tie rule (the first of equals) is the pool's (the oldest of equals, here in index
/// order), and the rows solved are counted.
#[test]
fn a_full_pool_answers_as_the_solver_would() {
    type Make = Box<dyn Fn(&Config) -> PerturbedOp>;
    let cases: Vec<(&str, Make, Vec<f32>)> = vec![
        (
            "callback argmax",
            Box::new(|c: &Config| PerturbedOp::new(c, &[D as i64], &[D as i64], argmax).unwrap()),
            one_hots(),
        ),
        (
            "callback argmax, libtorch chunks",
            Box::new(|c: &Config| {
                let mut c = c.clone();
                c.set_libtorch_path(true);
                PerturbedOp::new(&c, &[D as i64], &[D as i64], argmax).unwrap()
            }),
            one_hots(),
        ),
        (
            "built-in argmax",
            Box::new(|c: &Config| {
                PerturbedOp::new_builtin(c, Builtin::Argmax, &[D as i64]).unwrap()
            }),
            one_hots(),
        ),
        (
            "built-in top-2",
            Box::new(|c: &Config| {
                PerturbedOp::new_builtin(c, Builtin::TopK(2), &[D as i64]).unwrap()
            }),
            pairs(),
        ),
    ];
    for (name, make, all) in cases {
        let solved = make(&config(1, 1.0));
        solved.set_pool(Some(pool_of(&all))).unwrap();
        let cached = make(&config(1, 0.3));
        cached.set_pool(Some(pool_of(&all))).unwrap();
        let (y1, t1) = solved.forward_with_tape(&theta()).unwrap();
        let (y2, t2) = cached.forward_with_tape(&theta()).unwrap();
        assert!(same_bits(&y1, &y2), "{name}: forward");
        let g = Tensor::ones([3, D as i64], (tch::Kind::Float, tch::Device::Cpu));
        assert!(
            same_bits(&t1.vjp(&g).unwrap(), &t2.vjp(&g).unwrap()),
            "{name}: vjp"
        );
        let rows = 3 * 400;
        assert_eq!(solved.solver_rows(), rows, "{name}");
        assert!(
            cached.solver_rows() < rows / 2,
            "{name}: {}",
            cached.solver_rows()
        );
        assert_eq!(
            solved.pool().unwrap().len(),
            all.len() / D,
            "{name}: nothing new"
        );
    }
}

/// With solve_ratio 0.3 the rows solved are within 5 standard deviations of 0.3 N batch,
/// and the decisions are the same for any number of threads.
#[test]
fn the_solve_ratio_is_the_share_of_rows_solved() {
    let (n, batch, ratio) = (400u64, 3u64, 0.3);
    let mut results = Vec::new();
    for threads in [1, 2, 3] {
        let op =
            PerturbedOp::new(&config(threads, ratio), &[D as i64], &[D as i64], argmax).unwrap();
        op.set_pool(Some(pool_of(&one_hots()))).unwrap();
        let y = op.forward(&theta()).unwrap();
        let rows = op.solver_rows();
        let total = (n * batch) as f64;
        let sd = (total * ratio * (1.0 - ratio)).sqrt();
        assert!(
            (rows as f64 - ratio * total).abs() < 5.0 * sd,
            "{rows} of {total}"
        );
        results.push((y, rows));
    }
    for (y, rows) in &results[1..] {
        assert!(same_bits(y, &results[0].0));
        assert_eq!(*rows, results[0].1);
    }
}

/// An empty pool grows from the solves (every sample solved while it is empty), in the
/// same order for any number of threads; plain solves add to it too.
#[test]
fn an_empty_pool_grows_from_the_solves() {
    let mut members = Vec::new();
    for threads in [1, 2] {
        let op = PerturbedOp::new(&config(threads, 0.5), &[D as i64], &[D as i64], argmax).unwrap();
        let pool = Arc::new(Pool::new(&[D as i64], 4).unwrap());
        op.set_pool(Some(pool.clone())).unwrap();
        let _ = op.forward(&theta()).unwrap();
        assert_eq!(op.solver_rows(), 3 * 400, "an empty pool answers nothing");
        assert_eq!(pool.len(), 4, "capacity bounds the pool");
        let second = op.solver_rows();
        let _ = op.forward(&theta()).unwrap();
        assert!(
            op.solver_rows() - second < 3 * 400,
            "the second call answers some"
        );
        members.push(Vec::<f32>::try_from(pool.solutions().unwrap().flatten(0, -1)).unwrap());
        let solve = Arc::new(Pool::new(&[D as i64], 10).unwrap());
        op.set_pool(Some(solve.clone())).unwrap();
        let _ = op.solve(&theta()).unwrap();
        assert_eq!(solve.len(), 3); // the three problems' argmaxes: 2, 0 and 3
        let all = Vec::<f32>::try_from(solve.solutions().unwrap().flatten(0, -1)).unwrap();
        assert_eq!(all.iter().position(|&v| v == 1.0), Some(2));
    }
    assert_eq!(members[0], members[1]);
}

/// I-MLE's samples (its forward's and those its VJP moves by ±λg) are answered from a
/// pool holding every solution as the solver would answer them, bit for bit, for one and
/// two sides and for AI-MLE, with fewer rows solved; with solve_ratio 1 every one is solved.
#[test]
fn imle_samples_are_answered_from_the_pool() {
    let make = |ratio: f64| {
        let op = PerturbedOp::new(&config(2, ratio), &[D as i64], &[D as i64], argmax).unwrap();
        op.set_pool(Some(pool_of(&one_hots()))).unwrap();
        op
    };
    let (solved, cached) = (make(1.0), make(0.3));
    let g = Tensor::from_slice(&[0.5f32, -1.0, 0.25, 2.0, 0.0, -0.5]).repeat([3, 1]);
    let (y1, r1) = solved.imle_forward(&theta()).unwrap();
    let (y2, r2) = cached.imle_forward(&theta()).unwrap();
    assert!(same_bits(&y1, &y2), "forward");
    assert_eq!(solved.solver_rows(), 3 * 400);
    let forward_rows = cached.solver_rows();
    assert!(forward_rows < 3 * 400 / 2, "{forward_rows}");
    for two_sided in [false, true] {
        let v1 = solved.imle_vjp(&r1, &g, 0.7, two_sided).unwrap();
        let v2 = cached.imle_vjp(&r2, &g, 0.7, two_sided).unwrap();
        assert!(same_bits(&v1, &v2), "two-sided {two_sided}");
    }
    let (mut s1, mut s2) = (
        perturbations::AimleState::default(),
        perturbations::AimleState::default(),
    );
    let a1 = solved.aimle_vjp(&r1, &g, false, &mut s1).unwrap();
    let a2 = cached.aimle_vjp(&r2, &g, false, &mut s2).unwrap();
    assert!(same_bits(&a1, &a2), "AI-MLE");
    // the VJPs' moved samples too: one side, two sides, AI-MLE's one side
    assert_eq!(solved.solver_rows(), 5 * 3 * 400);
    assert!(cached.solver_rows() - forward_rows < 4 * 3 * 400 / 2);
    assert_eq!(cached.pool().unwrap().len(), D, "nothing new");
}

/// With a pool lacking most optima, a two-sided I-MLE VJP whose step moves no sample's
/// optimum gives exactly zero: each moved pair is two solves or two answers (the forward's
/// decisions, one snapshot), never a solve against an answer.
#[test]
fn imle_moved_pairs_are_both_solved_or_both_answered() {
    let op = PerturbedOp::new(&config(2, 0.5), &[D as i64], &[D as i64], argmax).unwrap();
    op.set_pool(Some(pool_of(&one_hots()[..2 * D]))).unwrap(); // e0 and e1 only
    let (_, record) = op.imle_forward(&theta()).unwrap();
    let g = Tensor::from_slice(&[0.5f32, -1.0, 0.25, 2.0, 0.0, -0.5]).repeat([3, 1]);
    let grad = op.imle_vjp(&record, &g, 1e-7, true).unwrap();
    let grad = Vec::<f32>::try_from(grad.flatten(0, -1)).unwrap();
    assert!(grad.iter().all(|&v| v == 0.0), "{grad:?}");
}

/// A failed I-MLE VJP adds nothing to the pool, even when one of its sides was solved: the
/// solutions join once the whole call has succeeded.
#[test]
fn a_failed_imle_vjp_adds_nothing_to_the_pool() {
    let identity = |x: &[f32], _count: usize, y: &mut [f32]| -> Result<(), String> {
        y.copy_from_slice(x); // every solution its own: each one new to the pool
        Ok(())
    };
    let mut c = config(1, 0.5);
    c.set_num_samples(10).unwrap();
    let op = PerturbedOp::new(&c, &[D as i64], &[D as i64], identity).unwrap();
    let pool = Arc::new(Pool::new(&[D as i64], 10_000).unwrap());
    op.set_pool(Some(pool.clone())).unwrap();
    let theta = Tensor::from_slice(&[-3e38f32, 0.0, 0.0, 0.0, 0.0, 0.0]).reshape([1, D as i64]);
    let (_, record) = op.imle_forward(&theta).unwrap();
    assert_eq!(
        pool.len(),
        10,
        "the forward's samples (an empty pool: all solved)"
    );
    let g = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0]).reshape([1, D as i64]);
    // up: -2e38, solved; down: -4e38 overflows: the call fails
    let e = op.imle_vjp(&record, &g, 1e38, true).unwrap_err();
    assert_eq!(e.status(), Status::NonFiniteInput, "{e}");
    assert_eq!(pool.len(), 10, "nothing added by the failed call");
    let g = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0, 0.0, 0.0]).reshape([1, D as i64]);
    let _ = op.imle_vjp(&record, &g, 1.0, false).unwrap();
    assert!(pool.len() > 10, "a call that succeeds adds its solutions");
}

/// Tags each solution with its row of the call modulo 700 (so rows 0..500 and 700..1200
/// repeat tags): a solver told where its rows sit.
struct Tagger;

impl perturbations::solver::WorkerSolver for Tagger {
    fn solve(
        &self,
        info: &perturbations::solver::SolveInfo,
        _inputs: &[f32],
        count: usize,
        outputs: &mut [f32],
    ) -> Result<(), String> {
        for k in 0..count {
            outputs[k * D..(k + 1) * D].fill(0.0);
            outputs[k * D] = ((info.first_row + k as u64) % 700) as f32;
        }
        Ok(())
    }
}

/// A call adds what `add_rows` of all its solved rows in row order would: the distinct
/// solutions the pool did not hold, in the order of their last occurrences, the
/// `capacity` that occur last, for any number of workers (the call keeps no more than
/// that many while it runs).
#[test]
fn a_call_adds_its_last_distinct_solutions() {
    // 1200 rows, tag t last at row t + 700 for t < 500, else at row t: by last occurrence
    // the tags run 500..699, then 0..499
    let tagged = |t: f32| {
        let mut row = [0.0f32; D];
        row[0] = t;
        row
    };
    let mut by_hand = Pool::new(&[D as i64], 5).unwrap();
    let mut added = Vec::new();
    for r in 0..1200u64 {
        added.extend(tagged((r % 700) as f32));
    }
    by_hand.add_rows(&tagged(497.0)).unwrap();
    by_hand.add_rows(&added).unwrap();
    let want = Vec::<f32>::try_from(by_hand.solutions().unwrap().flatten(0, -1)).unwrap();
    let tags: Vec<f32> = want.chunks(D).map(|r| r[0]).collect();
    assert_eq!(tags, [494.0, 495.0, 496.0, 498.0, 499.0]); // 497 held: not added again
    for threads in [1, 2, 3] {
        let op = PerturbedOp::with_workers(&config(threads, 1.0), &[D as i64], &[D as i64], Tagger)
            .unwrap();
        let pool = Arc::new(Pool::new(&[D as i64], 5).unwrap());
        pool.add_rows(&tagged(497.0)).unwrap();
        op.set_pool(Some(pool.clone())).unwrap();
        let _ = op.forward(&theta()).unwrap();
        let got = Vec::<f32>::try_from(pool.solutions().unwrap().flatten(0, -1)).unwrap();
        assert_eq!(got, want, "{threads} workers");
    }
    by_hand = Pool::new(&[D as i64], 1000).unwrap();
    by_hand.add_rows(&added).unwrap();
    let tags: Vec<f32> = Vec::<f32>::try_from(by_hand.solutions().unwrap().flatten(0, -1))
        .unwrap()
        .chunks(D)
        .map(|r| r[0])
        .collect();
    let order: Vec<f32> = (500..700).chain(0..500).map(|t| t as f32).collect();
    assert_eq!(tags, order, "by last occurrence");
}

#[test]
fn bad_pools_and_ratios_are_refused() {
    let mut c = Config::new();
    for bad in [-0.5, -1e-300, 1.5, f64::NAN, f64::INFINITY] {
        let e = c.set_solve_ratio(bad).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        assert!(e.message().contains("solve_ratio must be in [0, 1]"), "{e}");
    }
    c.set_solve_ratio(0.0).unwrap();
    let mut plain = config(1, 0.5);
    plain.set_linear_objective(false);
    let op = PerturbedOp::new(&plain, &[D as i64], &[D as i64], argmax).unwrap();
    let e = op.set_pool(Some(pool_of(&one_hots()))).unwrap_err();
    assert!(
        e.message()
            .contains("declare the solver's objective linear"),
        "{e}"
    );
    let op = PerturbedOp::new(&config(1, 0.5), &[D as i64], &[D as i64], argmax).unwrap();
    let wrong = Arc::new(Pool::new(&[D as i64 + 1], 3).unwrap());
    let e = op.set_pool(Some(wrong)).unwrap_err();
    assert!(e.message().contains("output shape"), "{e}");
    let two_phase = PerturbedOp::new_external(&config(1, 0.5), &[D as i64], &[D as i64]).unwrap();
    assert!(two_phase.set_pool(Some(pool_of(&one_hots()))).is_err());
    op.set_pool(None).unwrap();
    assert!(op.pool().is_none());
}

/// One-hot argmin over 3 entries (the first of equals).
fn argmin3(x: &[f32], count: usize, y: &mut [f32]) -> Result<(), String> {
    for r in 0..count {
        let row = &x[3 * r..3 * r + 3];
        let mut best = 0;
        for i in 1..3 {
            if row[i] < row[best] {
                best = i;
            }
        }
        for i in 0..3 {
            y[3 * r + i] = if i == best { 1.0 } else { 0.0 };
        }
    }
    Ok(())
}

/// The pool-based losses against their closed forms on a pool of the three one-hot
/// vectors (worked by hand: pred (1, 2, 4), c (3, 1, 2), w* = e1), minimizing and
/// maximizing.
#[test]
fn pool_losses_match_their_closed_forms() {
    use perturbations::{PoolLoss, Sense};
    let t = |v: &[f32]| Tensor::from_slice(v).reshape([1, 3]);
    let (pred, cost, sol) = (
        t(&[1.0, 2.0, 4.0]),
        t(&[3.0, 1.0, 2.0]),
        t(&[0.0, 1.0, 0.0]),
    );
    let mut c = config(1, 1.0);
    c.set_sense(Sense::Minimize);
    let op = PerturbedOp::new(&c, &[3], &[3], argmin3).unwrap();
    let e = op.pool_loss(PoolLoss::Nce, &pred, &sol).unwrap_err();
    assert!(e.message().contains("needs the op's solution pool"), "{e}");
    let pool = Arc::new(Pool::new(&[3], 10).unwrap());
    op.set_pool(Some(pool.clone())).unwrap();
    pool.add_rows(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
        .unwrap();
    let check = |op: &PerturbedOp, loss: PoolLoss, target: &Tensor, want: f64, grad: [f64; 3]| {
        let (l, g) = op.pool_loss(loss, &pred, target).unwrap();
        let l = f64::try_from(l.get(0)).unwrap();
        assert!((l - want).abs() < 1e-6, "{loss:?}: loss {l}, want {want}");
        let g = Vec::<f32>::try_from(g.flatten(0, -1)).unwrap();
        for k in 0..3 {
            assert!(
                (f64::from(g[k]) - grad[k]).abs() < 1e-6,
                "{loss:?}: grad {g:?}, want {grad:?}"
            );
        }
    };
    let third = 1.0 / 3.0;
    check(
        &op,
        PoolLoss::Nce,
        &sol,
        -third,
        [-third, 2.0 * third, -third],
    );
    check(&op, PoolLoss::Cmap, &sol, 1.0, [-1.0, 1.0, 0.0]);
    check(
        &op,
        PoolLoss::LtrPointwise,
        &cost,
        3.0,
        [-4.0 * third, 2.0 * third, 4.0 * third],
    );
    check(&op, PoolLoss::LtrPairwise, &cost, 0.5, [-0.5, 0.5, 0.0]);
    // listwise: p = softmax(-c), q = softmax(-pred)
    let softmax = |v: [f64; 3]| {
        let z: f64 = v.iter().map(|x| x.exp()).sum();
        v.map(|x| x.exp() / z)
    };
    let (p, q) = (softmax([-3.0, -1.0, -2.0]), softmax([-1.0, -2.0, -4.0]));
    let want = -(0..3).map(|j| p[j] * q[j].ln()).sum::<f64>();
    check(
        &op,
        PoolLoss::LtrListwise,
        &cost,
        want,
        [p[0] - q[0], p[1] - q[1], p[2] - q[2]],
    );
    assert_eq!(
        pool.len(),
        3,
        "the refreshes (argmin of pred: e0) added nothing new"
    );
    // maximizing: the margins change sign (argmax solver: e2 joins nothing new either)
    let mut c = config(1, 1.0);
    c.set_sense(Sense::Maximize);
    let max = PerturbedOp::new(&c, &[3], &[3], argmax).unwrap();
    max.set_pool(Some(pool.clone())).unwrap();
    check(
        &max,
        PoolLoss::Nce,
        &sol,
        third,
        [third, -2.0 * third, third],
    );
    check(&max, PoolLoss::Cmap, &sol, 2.0, [0.0, -1.0, 1.0]);
    // pairwise maximizing: w_b = argmax c = e0; diffs -(1 - (1, 2, 4)) = (0, 1, 3)
    check(&max, PoolLoss::LtrPairwise, &cost, 2.0, [-1.0, 0.5, 0.5]);
    let mut rare = config(1, 1e-9);
    rare.set_sense(Sense::Maximize);
    let rare_op = PerturbedOp::new(&rare, &[3], &[3], argmax).unwrap();
    rare_op
        .set_pool(Some(Arc::new(Pool::new(&[3], 10).unwrap())))
        .unwrap();
    let e = rare_op.pool_loss(PoolLoss::Nce, &pred, &sol).unwrap_err();
    assert!(e.message().contains("pool is empty"), "{e}");
}

/// A pooled callback op gives, bit for bit, what the same op gives without a pool when
/// the pool holds every solution (the same host path, dense rows either way); a plain
/// callback gets a block's solved rows gathered into one call, not a call per run.
#[test]
fn pooled_equals_unpooled_and_plain_callbacks_get_gathered_rows() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = {
        let calls = calls.clone();
        move |x: &[f32], count: usize, y: &mut [f32]| {
            calls.fetch_add(1, Ordering::Relaxed);
            argmax(x, count, y)
        }
    };
    let plain = PerturbedOp::new(&config(2, 1.0), &[D as i64], &[D as i64], argmax).unwrap();
    let pooled = PerturbedOp::new(&config(2, 0.3), &[D as i64], &[D as i64], counted).unwrap();
    pooled.set_pool(Some(pool_of(&one_hots()))).unwrap();
    let (y1, t1) = plain.forward_with_tape(&theta()).unwrap();
    let (y2, t2) = pooled.forward_with_tape(&theta()).unwrap();
    assert!(same_bits(&y1, &y2));
    let g = Tensor::ones([3, D as i64], (tch::Kind::Float, tch::Device::Cpu));
    assert!(same_bits(&t1.vjp(&g).unwrap(), &t2.vjp(&g).unwrap()));
    let solved = pooled.solver_rows() as usize;
    let made = calls.load(Ordering::Relaxed);
    assert!(made * 3 < solved, "{made} solver calls for {solved} rows");
}

/// SPO+, DBB and PG grow the pool with their solves only when the call succeeds: a call
/// whose results overflow float32 after its solves adds nothing (as I-MLE's).
#[test]
fn a_failed_method_call_adds_nothing_to_the_pool() {
    let identity = |x: &[f32], _count: usize, y: &mut [f32]| -> Result<(), String> {
        y.copy_from_slice(x); // every solution its own: each one new to the pool
        Ok(())
    };
    let c = config(1, 1.0);
    let op = PerturbedOp::new(&c, &[D as i64], &[D as i64], identity).unwrap();
    let pool = Arc::new(Pool::new(&[D as i64], 10_000).unwrap());
    op.set_pool(Some(pool.clone())).unwrap();
    let row = |v: [f32; D]| Tensor::from_slice(&v).reshape([1, D as i64]);
    let big = row([3e38, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // DBB: g = 0, so w = θ = (-3e38, ...), against y = (3e38, ...): (w - y) / λ overflows
    let theta = row([-3e38, 0.5, 0.5, 0.5, 0.5, 0.5]);
    let g = row([0.0; D]);
    let e = op.blackbox_vjp(&theta, &big, &g, 10.0).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    // SPO+: q = 2ĉ - c = -3e38 solved to itself, w = 3e38: 2(w - w*(q)) overflows
    let (pred, cost) = (row([0.0; D]), big.copy());
    let obj = Tensor::from_slice(&[0.0f32]);
    let e = op.spo_plus(&pred, &cost, &big, &obj).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    // PG: ĉ ± σc = ±3e38 solved to themselves: w₊ - w₋ overflows
    let zero = row([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let e = op
        .perturbation_gradient(&zero, &big, 1.0, true)
        .unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    assert_eq!(pool.len(), 0, "nothing added by the failed calls");
    // the same calls that succeed add their solutions
    let _ = op.blackbox_vjp(&zero, &zero, &g, 10.0).unwrap();
    assert_eq!(pool.len(), 1, "DBB's solution");
    // q = 2ĉ - c = 2 - (0, 1, ..., 5): a new solution
    let _ = op.spo_plus(&row([1.0; D]), &zero, &zero, &obj).unwrap();
    assert_eq!(pool.len(), 2, "SPO+'s solution");
    let _ = op
        .perturbation_gradient(&zero, &row([1.0; D]), 1.0, true)
        .unwrap();
    assert_eq!(pool.len(), 4, "PG's two solutions");
}
