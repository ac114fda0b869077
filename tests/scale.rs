//! Performance and scale features: built-in solvers, chunking, the two tape forms and
//! the two-phase API, checked against the callback path and hand computations.

mod common;

use common::{argmax, config, identity};
use perturbations::{Baseline, Builtin, Config, Noise, PerturbedOp, Status};
use tch::{Kind, Tensor};

fn theta() -> Tensor {
    Tensor::from_slice(&[-0.6f32, 1.9, -0.2, 1.1, -1.0, -0.6, 1.0, -0.2, 1.8, -1.0]).reshape([2, 5])
}

/// Whether this machine has a CUDA device (the GPU tests say so and pass where it has none:
/// scripts/gpu-check.sh runs them on one, with PERT_REQUIRE_GPU set, under which a machine
/// without a device fails them instead of passing them unchecked).
fn on_a_gpu() -> bool {
    let gpu = perturbations::cuda_device_count() > 0;
    if !gpu {
        assert!(
            std::env::var_os("PERT_REQUIRE_GPU").is_none_or(|v| v.is_empty()),
            "PERT_REQUIRE_GPU is set, but libtorch sees no CUDA device: nothing would be checked"
        );
        eprintln!("no CUDA device: checked on a GPU by scripts/gpu-check.sh");
    }
    gpu
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    let cpu = tch::Device::Cpu;
    f64::try_from((a.to_device(cpu) - b.to_device(cpu)).abs().max()).unwrap()
}

fn topk(k: usize) -> impl Fn(&[f32], usize, &mut [f32]) -> Result<(), String> {
    move |x, count, y| {
        let d = x.len() / count;
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mut idx: Vec<usize> = (0..d).collect();
            idx.sort_by(|&a, &b| xr[b].partial_cmp(&xr[a]).unwrap());
            yr.fill(0.0);
            idx[..k].iter().for_each(|&i| yr[i] = 1.0);
        }
        Ok(())
    }
}

fn ranks(x: &[f32], count: usize, y: &mut [f32]) -> Result<(), String> {
    let d = x.len() / count;
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        for i in 0..d {
            yr[i] = 1.0 + (0..d).filter(|&j| xr[j] < xr[i]).count() as f32;
        }
    }
    Ok(())
}

#[test]
fn builtin_argmax_matches_softmax_and_the_callback_path() {
    let n = 200_000;
    let c = config(Noise::Gumbel, 0.5, n, 3);
    let builtin = PerturbedOp::new_builtin(&c, Builtin::Argmax, &[5]).unwrap();
    let callback = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
    let (y, tape) = builtin.forward_with_tape(&theta()).unwrap();
    let (y2, tape2) = callback.forward_with_tape(&theta()).unwrap();
    let p = (theta() / 0.5).softmax(-1, Kind::Float);
    assert!(max_abs(&y, &p) < 5.0 * 0.5 / (n as f64).sqrt());
    // same draws, different reductions (counts vs one-hot products): equal up to rounding
    assert!(max_abs(&y, &y2) < 1e-6);
    assert!(max_abs(&tape.jacobian().unwrap(), &tape2.jacobian().unwrap()) < 1e-4);
    let f1 = tape.objective().unwrap();
    let f2 = tape2.objective().unwrap();
    assert!(max_abs(&f1, &f2) < 1e-5);
}

#[test]
fn fused_argmax_matches_the_callback_path_for_every_noise_model() {
    // The CPU built-in argmax runs a fused kernel; the callback path runs libtorch chunks.
    let theta =
        Tensor::from_slice(&[0.5f32, 1.0, 0.2, 0.9, 0.1, 0.7, 0.3, 1.1, 0.4, 0.6]).reshape([2, 5]);
    for (noise, multiplicative, antithetic) in [
        (Noise::Normal, false, true),
        (Noise::Normal, true, false),
        (Noise::Gumbel, false, false),
    ] {
        let mut c = config(noise, 0.3, 4000, 12);
        c.set_antithetic(antithetic);
        if multiplicative {
            c.set_perturbation(perturbations::Perturbation::Multiplicative);
        }
        let a = PerturbedOp::new_builtin(&c, Builtin::Argmax, &[5]).unwrap();
        let b = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
        let (ya, ta) = a.forward_with_tape(&theta).unwrap();
        let (yb, tb) = b.forward_with_tape(&theta).unwrap();
        assert!(
            max_abs(&ya, &yb) < 1e-6,
            "{noise:?} {multiplicative} {antithetic}"
        );
        assert!(max_abs(&ta.jacobian().unwrap(), &tb.jacobian().unwrap()) < 1e-4);
        assert!(max_abs(&ta.objective().unwrap(), &tb.objective().unwrap()) < 1e-4);
        let (la, ga) = a.fenchel_young(&theta, &theta.zeros_like()).unwrap();
        let (lb, gb) = b.fenchel_young(&theta, &theta.zeros_like()).unwrap();
        assert!(max_abs(&la, &lb) < 1e-4 && max_abs(&ga, &gb) < 1e-5);
    }
}

#[test]
fn builtin_topk_and_ranks_match_their_callbacks() {
    let c = config(Noise::Normal, 0.3, 5000, 8);
    for (builtin, solver) in [
        (
            Builtin::TopK(2),
            Box::new(topk(2))
                as Box<dyn Fn(&[f32], usize, &mut [f32]) -> Result<(), String> + Send + Sync>,
        ),
        (Builtin::Ranks, Box::new(ranks)),
    ] {
        let a = PerturbedOp::new_builtin(&c, builtin, &[5]).unwrap();
        let b = PerturbedOp::new(&c, &[5], &[5], solver).unwrap();
        let (ya, ta) = a.forward_with_tape(&theta()).unwrap();
        let (yb, tb) = b.forward_with_tape(&theta()).unwrap();
        assert!(max_abs(&ya, &yb) < 1e-5, "{builtin:?}");
        let (ja, jb) = (ta.jacobian().unwrap(), tb.jacobian().unwrap());
        assert!(
            max_abs(&ja, &jb) < 1e-3 * (1.0 + f64::try_from(jb.abs().max()).unwrap()),
            "{builtin:?}"
        );
    }
    // ranks of 5 entries sum to 15 in every sample, so in the mean too
    let r = PerturbedOp::new_builtin(&c, Builtin::Ranks, &[5])
        .unwrap()
        .forward(&theta())
        .unwrap();
    let sums = Vec::<f64>::try_from(r.sum_dim_intlist(1, false, Kind::Double)).unwrap();
    assert!(sums.iter().all(|s| (s - 15.0).abs() < 1e-4), "{sums:?}");
}

#[test]
fn builtins_work_along_the_last_dimension_of_any_shape() {
    let c = config(Noise::Gumbel, 0.5, 50_000, 4);
    let op = PerturbedOp::new_builtin(&c, Builtin::Argmax, &[2, 5]).unwrap();
    let y = op.forward(&theta().reshape([1, 2, 5])).unwrap();
    let p = (theta() / 0.5).softmax(-1, Kind::Float).reshape([1, 2, 5]);
    assert!(max_abs(&y, &p) < 5.0 * 0.5 / 50_000f64.sqrt());
    let err = PerturbedOp::new_builtin(&c, Builtin::TopK(6), &[2, 5]).unwrap_err();
    assert_eq!(err.status(), Status::InvalidArgument);
}

#[test]
fn results_do_not_depend_on_the_chunk_size() {
    let mut small = config(Noise::Normal, 0.4, 3000, 5);
    small.set_chunk_bytes(1000); // about 10 samples a chunk
    let large = config(Noise::Normal, 0.4, 3000, 5);
    for make in [
        |c: &Config| PerturbedOp::new(c, &[5], &[5], argmax).unwrap(),
        |c: &Config| PerturbedOp::new_builtin(c, Builtin::Argmax, &[5]).unwrap(),
    ] {
        let (y1, t1) = make(&small).forward_with_tape(&theta()).unwrap();
        let (y2, t2) = make(&large).forward_with_tape(&theta()).unwrap();
        assert!(max_abs(&y1, &y2) < 1e-6);
        assert!(max_abs(&t1.jacobian().unwrap(), &t2.jacobian().unwrap()) < 1e-4);
    }
}

/// A solver as a plain function: perturbed inputs, count, solutions.
type SolveFn = fn(&[f32], usize, &mut [f32]) -> Result<(), String>;

/// J computed by hand from the two-phase API's perturbed inputs: additive noise, so
/// z_n = (x_n − θ)/σ, Normal scores s_n = z_n, sample-mean baseline.
fn hand_jacobian(c: &Config, theta_row: &[f32], solve: SolveFn) -> (Vec<f64>, Tensor) {
    let d = theta_row.len();
    let n = c.num_samples() as usize;
    let op = PerturbedOp::new(c, &[d as i64], &[d as i64], solve).unwrap();
    let draw = op
        .draw(&Tensor::from_slice(theta_row).reshape([1, d as i64]))
        .unwrap();
    let x = draw.inputs();
    let mut y = vec![0f32; x.len()];
    solve(x, n, &mut y).unwrap();
    let sigma = c.sigma();
    let mean: Vec<f64> = (0..d)
        .map(|i| (0..n).map(|k| f64::from(y[k * d + i])).sum::<f64>() / n as f64)
        .collect();
    let mut j = vec![0f64; d * d];
    for k in 0..n {
        for i in 0..d {
            for l in 0..d {
                let z = (f64::from(x[k * d + l]) - f64::from(theta_row[l])) / sigma;
                j[i * d + l] +=
                    (f64::from(y[k * d + i]) - mean[i]) * z / ((n as f64 - 1.0) * sigma);
            }
        }
    }
    let (_, tape) = draw.finish(&y, true).unwrap();
    (j, tape.unwrap().jacobian().unwrap())
}

#[test]
fn both_tape_forms_give_the_estimator_computed_by_hand() {
    let theta_row = [0.3f32, -0.1, 0.2, 0.0, 0.5, 0.1, -0.3, 0.25];
    // N = 3: samples (3 x 16 floats) are smaller than sums (8 x 8): the tape keeps samples;
    // N = 400: it keeps sums.
    for (n, keeps_samples) in [(3u64, true), (400, false)] {
        let c = config(Noise::Normal, 0.5, n, 6);
        let op = PerturbedOp::new(&c, &[8], &[8], argmax).unwrap();
        let (_, tape) = op
            .forward_with_tape(&Tensor::from_slice(&theta_row).reshape([1, 8]))
            .unwrap();
        assert_eq!(tape.keeps_samples(), keeps_samples, "N = {n}");
        let (want, got) = hand_jacobian(&c, &theta_row, argmax);
        let got = Vec::<f64>::try_from(got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        for (a, b) in got.iter().zip(&want) {
            // the perturbed inputs are float32: z carries ~1e-7/σ rounding
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "N = {n}: {a} vs {b}"
            );
        }
        // VJP and JVP of the samples form agree with its Jacobian
        let v = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 2.0, 0.0, 0.3, -0.7, 1.5]).reshape([1, 8]);
        let j = tape.jacobian().unwrap();
        let jtv = v.unsqueeze(1).matmul(&j).squeeze_dim(1);
        let jv = j.matmul(&v.unsqueeze(2)).squeeze_dim(2);
        assert!(max_abs(&tape.vjp(&v).unwrap(), &jtv) < 1e-5);
        assert!(max_abs(&tape.jvp(&v).unwrap(), &jv) < 1e-5);
    }
}

#[test]
fn two_phase_gives_the_callback_results() {
    for (baseline, noise, multiplicative, antithetic) in [
        (Baseline::SampleMean, Noise::Gumbel, false, false),
        (Baseline::CleanInput, Noise::Gumbel, false, false),
        (Baseline::SampleMean, Noise::Normal, true, false),
        (Baseline::CleanInput, Noise::Normal, false, true),
    ] {
        let mut c = config(noise, 0.5, 4000, 9);
        c.set_baseline(baseline).set_antithetic(antithetic);
        if multiplicative {
            c.set_perturbation(perturbations::Perturbation::Multiplicative);
        }
        let callback = PerturbedOp::new(&c, &[5], &[5], argmax).unwrap();
        let external = PerturbedOp::new_external(&c, &[5], &[5]).unwrap();
        let (y1, t1) = callback.forward_with_tape(&theta()).unwrap();
        let draw = external.draw(&theta()).unwrap();
        drop(external); // a draw outlives its op
        let extra = if baseline == Baseline::CleanInput && !antithetic {
            2
        } else {
            0
        };
        assert_eq!(draw.count(), 2 * 4000 + extra);
        let mut solutions = vec![0f32; draw.count() * 5];
        argmax(draw.inputs(), draw.count(), &mut solutions).unwrap();
        let (y2, t2) = draw.finish(&solutions, true).unwrap();
        let t2 = t2.unwrap();
        assert!(
            max_abs(&y1, &y2) == 0.0,
            "{baseline:?} {multiplicative} {antithetic}"
        );
        assert!(
            max_abs(&t1.jacobian().unwrap(), &t2.jacobian().unwrap()) == 0.0,
            "{baseline:?}"
        );
        assert!(max_abs(&t1.objective().unwrap(), &t2.objective().unwrap()) == 0.0);
        solutions[7] = f32::NAN;
        assert_eq!(
            draw.finish(&solutions, false).unwrap_err().status(),
            Status::NonFiniteInput
        );
        assert!(draw
            .finish(&solutions[1..], false)
            .unwrap_err()
            .message()
            .contains("solutions must hold"));
    }
    let external =
        PerturbedOp::new_external(&config(Noise::Normal, 0.5, 10, 0), &[5], &[5]).unwrap();
    let err = external.forward(&theta()).unwrap_err();
    assert!(err.message().contains("two-phase"), "{}", err.message());
}

#[test]
fn tape_limit_is_respected_before_any_work() {
    let mut c = config(Noise::Normal, 0.5, 100, 0);
    c.set_max_tape_bytes(10 * 10 * 4 - 1);
    let op = PerturbedOp::new(&c, &[10], &[10], identity).unwrap();
    let theta = Tensor::zeros([1, 10], (Kind::Float, tch::Device::Cpu));
    let err = op.forward_with_tape(&theta).unwrap_err();
    assert_eq!(err.status(), Status::InvalidArgument);
    assert!(
        err.message().contains("above max_tape_bytes 399"),
        "{}",
        err.message()
    );
    let _ = op.forward(&theta).unwrap();
}

#[test]
fn the_libtorch_path_of_cuda_ops_matches_the_cpu_host_paths() {
    // CUDA ops take a libtorch chunk path; on the CPU it can be forced, and must give what
    // the CPU's host pipelines give (up to float rounding) for every solver kind and model.
    libtorch_path_matches_the_host_paths(tch::Device::Cpu, |c| {
        c.set_libtorch_path(true);
    });
}

#[test]
fn the_libtorch_path_sums_the_ones_of_wide_outputs_as_the_host_paths() {
    // Above 64 outputs the libtorch path adds the positions of the ones (not dense rows)
    // into the sums, across several problems per chunk or parts of one.
    let theta = Tensor::linspace(-1.0, 1.0, 300, (Kind::Float, tch::Device::Cpu))
        .reshape([3, 100])
        .sin();
    let g = (&theta * 7.0).cos();
    for builtin in [Builtin::Argmax, Builtin::TopK(3)] {
        for (chunk, baseline) in [
            (0, Baseline::SampleMean),
            (40 * 4 * 700, Baseline::CleanInput),
        ] {
            let mut host = config(Noise::Normal, 0.3, 200, 9);
            host.set_baseline(baseline);
            let mut torch = host.clone();
            torch.set_libtorch_path(true).set_chunk_bytes(chunk);
            let op = |c: &Config| PerturbedOp::new_builtin(c, builtin, &[100]).unwrap();
            let (ya, ta) = op(&host).forward_with_tape(&theta).unwrap();
            let (yb, tb) = op(&torch).forward_with_tape(&theta).unwrap();
            let what = format!("{builtin:?} chunk {chunk}");
            assert!(max_abs(&ya, &yb) < 1e-5, "{what}");
            let (va, vb) = (ta.vjp(&g).unwrap(), tb.vjp(&g).unwrap());
            let scale = 1.0 + f64::try_from(va.abs().max()).unwrap();
            assert!(max_abs(&va, &vb) < 1e-4 * scale, "vjp {what}");
            let (fa, fb) = (ta.objective().unwrap(), tb.objective().unwrap());
            assert!(
                max_abs(&fa, &fb) < 1e-4 * (1.0 + f64::try_from(fa.abs().max()).unwrap()),
                "{what}"
            );
        }
    }
}

#[test]
fn cuda_ops_match_the_cpu_host_paths_on_a_gpu() {
    // The same on a GPU (scripts/gpu-check.sh runs the test binaries on one): CUDA ops of
    // every solver kind and model equal the CPU's host pipelines up to float rounding.
    if !on_a_gpu() {
        return;
    }
    libtorch_path_matches_the_host_paths(tch::Device::Cuda(0), |c| {
        c.set_device(perturbations::DeviceSpec::Cuda(0));
    });
}

/// (first value, count) of the noise checks: blocks of four words started and ended
/// inside, 2^32 words crossed, and block counters whose high word is set (2^34 values and
/// beyond: the block index's bits 32 and up), up to 2^62.
const OFFSETS: [(u64, usize); 8] = [
    (0, 1),
    (1, 6),
    (3, 1001),
    ((1 << 32) - 5, 100_003),
    ((1 << 34) - 6, 13),
    ((1 << 34) + 1, 1001),
    ((1 << 40) + 3, 70_001),
    ((1 << 62) - 2, 9),
];

#[test]
fn the_libtorch_noise_equals_the_cpu_noise_at_every_offset() {
    // The libtorch operations that CUDA ops fall back on (int64 arithmetic for the Philox
    // rounds), run on the CPU here, against the CPU sampler: the same words, so the same
    // values up to the float rounding of the transforms, also where the block counter's
    // high word is set.
    for (seed, id) in [(0u64, 0u64), (u64::MAX, 1 << 40)] {
        let stream = perturbations::rng::Stream::new(seed, id);
        for noise in [Noise::Normal, Noise::Gumbel] {
            for (first, count) in OFFSETS {
                let cpu = noise.sample(&stream, first, count, 2).unwrap();
                let ops = noise
                    .sample_on_libtorch(&stream, first, count, tch::Device::Cpu)
                    .unwrap();
                let what = format!("{noise:?} seed {seed} stream {id} first {first} count {count}");
                assert_eq!(ops.size(), [count as i64], "{what}");
                assert!(max_abs(&cpu, &ops) < 4e-6 * 17.0, "{what}");
            }
        }
    }
    // the words themselves: block 2^32 + 5 is Philox of the counter (5, 1, stream)
    let stream = perturbations::rng::Stream::new(7, 9);
    let key = [7u32, 0];
    assert_eq!(
        stream.block((1 << 32) + 5),
        perturbations::rng::philox4x32([5, 1, 9, 0], key)
    );
}

#[test]
fn the_cuda_noise_kernel_equals_the_cpu_noise_on_a_gpu() {
    // The fused CUDA noise kernel (and the libtorch operations it replaces) against the CPU
    // sampler: the same Philox words, so equal values up to the float rounding of the
    // transforms (|Normal| < 5.8, Gumbel < 16.7: a few ulps of a value below 17), at
    // offsets that start and end inside a block of four words, across 2^32 words, and
    // with the block counter's high word set.
    if !on_a_gpu() {
        return;
    }
    Noise::fused_cuda_kernel(0).expect("the fused noise kernel runs on this GPU");
    let cuda = tch::Device::Cuda(0);
    for (seed, id) in [(0u64, 0u64), (11, 3), (u64::MAX, 1 << 40)] {
        let stream = perturbations::rng::Stream::new(seed, id);
        for noise in [Noise::Normal, Noise::Gumbel] {
            for (first, count) in OFFSETS {
                let cpu = noise.sample(&stream, first, count, 2).unwrap();
                let kernel = noise.sample_on(&stream, first, count, cuda).unwrap();
                let ops = noise
                    .sample_on_libtorch(&stream, first, count, cuda)
                    .unwrap();
                assert_eq!(kernel.size(), [count as i64]);
                let what = format!("{noise:?} seed {seed} stream {id} first {first} count {count}");
                let tol = 4e-6 * 17.0;
                assert!(max_abs(&cpu, &kernel) < tol, "kernel vs CPU: {what}");
                assert!(max_abs(&ops, &kernel) < tol, "kernel vs libtorch: {what}");
            }
        }
    }
}

#[test]
fn auto_runs_small_builtin_calls_on_the_cpu_on_a_gpu() {
    // Under "auto" a built-in op goes to the GPU, but a call of fewer than 32 768 perturbed
    // values per core runs on the CPU (faster there): bit for bit what a "cpu" op gives,
    // tape included. A large call gives what a "cuda" op gives.
    if !on_a_gpu() {
        return;
    }
    let mut auto = config(Noise::Normal, 0.5, 100, 5);
    auto.set_device(perturbations::DeviceSpec::Auto);
    let mut cpu = auto.clone();
    cpu.set_device(perturbations::DeviceSpec::Cpu);
    let mut cuda = auto.clone();
    cuda.set_device(perturbations::DeviceSpec::Cuda(0));
    let make = |c: &Config| PerturbedOp::new_builtin(c, Builtin::TopK(3), &[1000]).unwrap();
    let (op_auto, op_cpu, op_cuda) = (make(&auto), make(&cpu), make(&cuda));
    assert_eq!(op_auto.device(), tch::Device::Cuda(0));
    // 2 problems x 100 samples x 1000: 200 000 values, small on any machine of 7+ cores
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let small = Tensor::linspace(-1.0, 1.0, 2000, (Kind::Float, tch::Device::Cpu))
        .reshape([2, 1000])
        .sin();
    let g = (&small * 5.0).cos();
    let (ya, ta) = op_auto.forward_with_tape(&small).unwrap();
    let (yc, tc) = op_cpu.forward_with_tape(&small).unwrap();
    if cores >= 7 {
        assert_eq!(max_abs(&ya, &yc), 0.0);
        assert_eq!(max_abs(&ta.vjp(&g).unwrap(), &tc.vjp(&g).unwrap()), 0.0);
        assert_eq!(ta.jacobian().unwrap().device(), tch::Device::Cpu);
        // a two-phase draw of that size too (fresh ops: the same call count)
        let (da, dc) = (
            make(&auto).draw(&small).unwrap(),
            make(&cpu).draw(&small).unwrap(),
        );
        assert_eq!(da.inputs(), dc.inputs());
    }
    // 512 problems: 51.2 million values, large on any machine of fewer than 1562 cores
    let large = Tensor::linspace(-1.0, 1.0, 512_000, (Kind::Float, tch::Device::Cpu))
        .reshape([512, 1000])
        .sin();
    let ya = op_auto.forward(&large).unwrap(); // its second call
    let _ = op_cuda.forward(&small).unwrap(); // so that the large call is the second here too
    let yg = op_cuda.forward(&large).unwrap();
    assert!(max_abs(&ya, &yg) < 1e-6, "{}", max_abs(&ya, &yg));
}

/// σ of the comparison of the libtorch path with the host paths.
const SIGMA: f64 = 0.4;

/// The most samples of a problem of `n` whose solutions may flip between two draws of the
/// same noise rounded differently (see [`flips`]). A flip needs two of a sample's perturbed
/// inputs within the rounding difference of each other (under 1e-6 here: σ = 0.4 times the
/// noise values' difference of a few ulps), and the gaps between this test's perturbed
/// inputs have densities below 3 near 0 (additive Normal 0.71, Gumbel 0.63, the
/// multiplicative pair 0.1 and 0.2 about 2.7), over at most 10 pairs of outputs (ranks):
/// under 1e-4 of the samples flip, λ = 1e-4·n are expected per problem, and this is the
/// least count that more flips exceed with odds below 3e-6 (Poisson): 4 at n = 2000 (λ =
/// 0.2), 1 at n = 4.
fn max_flips(n: u64) -> f64 {
    let lambda = 1e-4 * n as f64;
    let (mut k, mut term, mut below) = (0.0, (-lambda).exp(), (-lambda).exp());
    while 1.0 - below >= 3e-6 {
        k += 1.0;
        term *= lambda / k;
        below += term;
    }
    k
}

/// The largest number of flipped samples of a problem between `ya` and `yb`, means over
/// `n` samples of one draw each of the same noise where the two draws round differently:
/// on a GPU the CUDA kernel's transforms and the CPU's differ by up to about 1e-6 in each
/// value, so a perturbed input can land on the other side of a tie, and that sample's
/// solution flips (a one-hot or top-k row moves a 1, ranks swap two adjacent values):
/// y then moves by 1/N in two entries. Checks that y's differences have that form (each
/// entry of N·(ya − yb) a whole number, up to float32 rounding, for N up to about 10⁴;
/// summing to 0 over each problem, as a moved 1 or a swap does; a lost or doubled sample
/// does not), and that no problem has more than [`max_flips`]. The count is a lower
/// bound: two opposite flips of one problem cancel in y (odds about λ²/8 a problem, λ
/// the expected flips, under 0.005 at λ = 0.2, under 3e-4 at the likelier λ ≲ 0.05), and
/// the seeds are fixed, so a machine where that happens fails the products' checks each
/// time, with y equal: the message says so.
fn flips(ya: &Tensor, yb: &Tensor, n: u64, what: &str) -> f64 {
    let cpu = tch::Device::Cpu;
    let as_f64 = |t: &Tensor| t.to_device(cpu).to_kind(Kind::Double);
    let scaled = (as_f64(ya) - as_f64(yb)) * n as f64;
    let off = f64::try_from((&scaled - scaled.round()).abs().max()).unwrap();
    assert!(
        off < 0.01,
        "{what}: y differs by {off}/N beyond whole flipped samples"
    );
    let problems = scaled.size()[0];
    let whole = scaled.round().reshape([problems, -1]);
    let net = f64::try_from(whole.sum_dim_intlist(1, false, Kind::Double).abs().max()).unwrap();
    assert!(
        net == 0.0,
        "{what}: y's sum over a problem moved by {net}/N (a flip moves none)"
    );
    let per_problem = whole.abs().sum_dim_intlist(1, false, Kind::Double) / 2.0;
    let most = f64::try_from(per_problem.max()).unwrap();
    let most_expected = max_flips(n);
    assert!(
        most <= most_expected,
        "{what}: {most} samples of a problem flipped (at most {most_expected} expected)"
    );
    if most > 0.0 {
        eprintln!("{what}: up to {most} flipped samples a problem (rounding at a tie)");
    }
    most
}

#[test]
fn flips_counts_whole_flipped_samples_and_nothing_else() {
    // (the GPU comparison's helper, checked here: two problems of 5 outputs, N = 2000)
    let n = 2000u64;
    let ya = Tensor::from_slice(&[0.2f32, 0.3, 0.1, 0.25, 0.15, 0.0, 0.5, 0.5, 0.0, 0.0])
        .reshape([2, 5]);
    let step = 1.0 / n as f64;
    let moved = |moves: &[(i64, f64)]| {
        let yb = ya.copy();
        for &(i, by) in moves {
            let _ = yb.view([-1]).get(i).g_add_scalar_(by);
        }
        yb
    };
    assert_eq!((max_flips(2000), max_flips(4)), (4.0, 1.0));
    assert_eq!(flips(&ya, &ya, n, "same"), 0.0);
    // one sample of problem 0 moves its 1 from output 1 to output 3; two of problem 1
    let yb = moved(&[(1, -step), (3, step), (6, -2.0 * step), (7, 2.0 * step)]);
    assert_eq!(flips(&ya, &yb, n, "flips"), 2.0);
    // a difference that is not whole samples, and too many flips, fail
    let part = moved(&[(0, 0.3 * step), (1, -0.3 * step)]);
    let many = moved(&[(0, 5.0 * step), (1, -5.0 * step)]);
    // and a sample lost (a 1 gone from a problem, nothing gained)
    let lost = moved(&[(2, -step)]);
    for (yb, why) in [
        (part, "beyond whole flipped samples"),
        (many, "5 samples of a problem flipped"),
        (lost, "sum over a problem moved by 1/N"),
    ] {
        let panic = std::panic::catch_unwind(|| flips(&ya, &yb, n, "bad")).unwrap_err();
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains(why), "{message}");
    }
}

/// The checks of the two tests above, with `set` making the config of the libtorch side,
/// whose inputs and cotangents are on `device`. On the CPU both sides draw the same noise
/// values; on a GPU they differ by rounding, and a few samples' solutions may flip
/// ([`flips`]): the products' bounds then grow by what those samples' terms can add.
fn libtorch_path_matches_the_host_paths(device: tch::Device, set: impl Fn(&mut Config)) {
    let theta =
        Tensor::from_slice(&[0.5f32, 1.0, 0.2, 0.9, 0.1, 0.7, 0.3, 1.1, 0.4, 0.6]).reshape([2, 5]);
    type Make = fn(&Config) -> PerturbedOp;
    let makes: [(&str, Make); 6] = [
        ("callback", |c| {
            PerturbedOp::new(c, &[5], &[5], argmax).unwrap()
        }),
        ("argmax", |c| {
            PerturbedOp::new_builtin(c, Builtin::Argmax, &[5]).unwrap()
        }),
        ("top-2", |c| {
            PerturbedOp::new_builtin(c, Builtin::TopK(2), &[5]).unwrap()
        }),
        ("ranks", |c| {
            PerturbedOp::new_builtin(c, Builtin::Ranks, &[5]).unwrap()
        }),
        ("small N (samples tape)", |c| {
            PerturbedOp::new(c, &[5], &[5], argmax).unwrap()
        }),
        ("small N ranks (samples tape, whole rows)", |c| {
            PerturbedOp::new_builtin(c, Builtin::Ranks, &[5]).unwrap()
        }),
    ];
    for (name, make) in makes {
        for (noise, multiplicative, antithetic, baseline, rep) in [
            (Noise::Gumbel, false, false, Baseline::SampleMean, 0),
            (Noise::Gumbel, false, false, Baseline::SampleMean, 1),
            (Noise::Normal, true, false, Baseline::CleanInput, 0),
            (Noise::Normal, true, false, Baseline::CleanInput, 1),
            (Noise::Normal, false, true, Baseline::None, 0),
            (Noise::Normal, false, true, Baseline::None, 1),
        ] {
            let n = if name.starts_with("small") { 4 } else { 2000 };
            let mut host = config(noise, SIGMA, n, 21);
            host.set_antithetic(antithetic).set_baseline(baseline);
            if multiplicative {
                host.set_perturbation(perturbations::Perturbation::Multiplicative);
            }
            let mut torch = host.clone();
            set(&mut torch);
            // chunks of several whole problems (the automatic size), and of parts of one
            // (about 100 samples)
            let chunk = if n > 4 { [0, 100 * 4 * 35] } else { [0, 0] }[rep];
            torch.set_chunk_bytes(chunk);
            let (ya, ta) = make(&host).forward_with_tape(&theta).unwrap();
            let (yb, tb) = make(&torch)
                .forward_with_tape(&theta.to_device(device))
                .unwrap();
            let what = format!(
                "{name} {noise:?} multiplicative={multiplicative} antithetic={antithetic} chunk={chunk}"
            );
            assert_eq!(ta.keeps_samples(), tb.keeps_samples(), "{what}");
            let scale = 1.0 + f64::try_from(ya.abs().max()).unwrap();
            // y equal up to rounding, plus (on a GPU) whole flipped samples: how many
            let same_y = |yb: &Tensor, what: &str| {
                let flipped = if device.is_cuda() {
                    flips(&ya, yb, n, what)
                } else {
                    0.0
                };
                let diff = max_abs(&ya, yb);
                assert!(
                    diff < 1e-5 * scale + flipped / n as f64,
                    "{what}: y by {diff}"
                );
                flipped
            };
            let flipped = same_y(&yb, &what);
            // a flipped sample's term: (Y − c)·s·col / σ, Y − c moving by 1 in two outputs
            // (and c by 1/N), |s| < 6 (Normal) or 16 (Gumbel's score), col = 1/|θ| ≤ 10
            // (multiplicative) or 1
            let s_bound = if noise == Noise::Normal { 6.0 } else { 16.0 };
            let col = if multiplicative { 10.0 } else { 1.0 };
            let flip_j = flipped * 2.0 * s_bound * col / SIGMA / n as f64;
            let j = ta.jacobian().unwrap();
            let jscale = 1.0 + f64::try_from(j.abs().max()).unwrap();
            assert!(
                max_abs(&j, &tb.jacobian().unwrap()) < 1e-4 * jscale + flip_j,
                "{what}{}",
                if device.is_cuda() {
                    " (on a GPU, with y equal up to whole flips: two opposite flips may have \
                     cancelled in y, see `flips`)"
                } else {
                    ""
                }
            );
            // the products, whichever form the tape has (a CPU tape of samples keeps their
            // solutions and draws the scores again; the libtorch path keeps both)
            let g = Tensor::from_slice(&[1.0f32, -0.5, 0.25, 2.0, 0.0, -1.0, 0.5, 0.3, 0.0, 1.5])
                .reshape([2, 5]);
            let gd = g.to_device(device);
            let (va, vb) = (ta.vjp(&g).unwrap(), tb.vjp(&gd).unwrap());
            // (a flip changes two outputs' rows of J: a VJP by 2·|g|max times a row's
            // change, a JVP by the 5 entries of g, at most 2, times it)
            let vscale = 1.0 + f64::try_from(va.abs().max()).unwrap();
            assert!(
                max_abs(&va, &vb) < 1e-4 * vscale + 2.0 * 2.0 * flip_j,
                "vjp {what}"
            );
            let (ja, jb) = (ta.jvp(&g).unwrap(), tb.jvp(&gd).unwrap());
            let jvscale = 1.0 + f64::try_from(ja.abs().max()).unwrap();
            assert!(
                max_abs(&ja, &jb) < 1e-4 * jvscale + 5.0 * 2.0 * flip_j,
                "jvp {what}"
            );
            let fscale = 1.0 + f64::try_from(ta.objective().unwrap().abs().max()).unwrap();
            assert!(
                max_abs(&ta.objective().unwrap(), &tb.objective().unwrap()) < 1e-4 * fscale,
                "{what}"
            );
            // and the two-phase API over the libtorch path
            let draw = PerturbedOp::new_external(&torch, &[5], &[5])
                .unwrap()
                .draw(&theta.to_device(device))
                .unwrap();
            if name == "callback" {
                let mut sol = vec![0f32; draw.count() * 5];
                argmax(draw.inputs(), draw.count(), &mut sol).unwrap();
                let (yd, _) = draw.finish(&sol, false).unwrap();
                same_y(&yd, &format!("two-phase {what}"));
            }
        }
    }
}

#[test]
fn cpu_tapes_of_samples_keep_the_scores_only_while_small() {
    // top-10 of 1000, N = 100: with 4 problems the tape keeps the scores (4 x 100 x 1000
    // floats, 1.6 MB); with 200 problems they would take 80 MB, above the 16 MiB a tape
    // keeps, so it keeps each sample's 10 (index, value) pairs and draws the scores again.
    // Problem b's draws are the same in both calls (the first of a fresh op each), so the
    // products of the first 4 problems are equal bit for bit; and they equal those of the
    // libtorch path, which keeps the samples.
    let c = config(Noise::Normal, 0.5, 100, 3);
    let theta = Tensor::linspace(-2.0, 2.0, 200_000, (Kind::Float, tch::Device::Cpu))
        .reshape([200, 1000])
        .sin();
    let small = theta.narrow(0, 0, 4);
    let g = (&theta * 3.0).cos();
    let g_small = g.narrow(0, 0, 4);
    let op = PerturbedOp::new_builtin(&c, Builtin::TopK(10), &[1000]).unwrap();
    let (y, tape) = op.forward_with_tape(&small).unwrap();
    assert!(tape.keeps_samples());
    let scores = 4 * 100 * 1000 * 4;
    assert!(
        tape.bytes() >= scores,
        "the tape holds {} bytes",
        tape.bytes()
    );
    let op = PerturbedOp::new_builtin(&c, Builtin::TopK(10), &[1000]).unwrap();
    let (y_big, tape_big) = op.forward_with_tape(&theta).unwrap();
    let samples = 200 * 100 * 2000 * 4;
    assert!(
        tape_big.bytes() * 20 < samples,
        "the tape holds {} bytes",
        tape_big.bytes()
    );
    assert!(max_abs(&y, &y_big.narrow(0, 0, 4)) == 0.0);
    let a = tape.vjp(&g_small).unwrap();
    let a_big = tape_big.vjp(&g).unwrap().narrow(0, 0, 4);
    assert!(max_abs(&a, &a_big) == 0.0, "kept and drawn again differ");
    let mut torch = c.clone();
    torch.set_libtorch_path(true);
    let op = PerturbedOp::new_builtin(&torch, Builtin::TopK(10), &[1000]).unwrap();
    let (y2, tape2) = op.forward_with_tape(&small).unwrap();
    assert!(tape2.bytes() >= 4 * 100 * 2000 * 4);
    assert!(max_abs(&y, &y2) < 1e-6);
    let b = tape2.vjp(&g_small).unwrap();
    let scale = 1.0 + f64::try_from(a.abs().max()).unwrap();
    assert!(max_abs(&a, &b) < 1e-4 * scale, "{}", max_abs(&a, &b));
}

/// A callback on one solver thread, with a core to spare and enough work, runs in two
/// stages: the noise of the next block drawn on a helper while the calling thread solves.
/// The callback still runs on the calling thread only (the contract of threads = 1), the
/// results equal those of two solver threads and of max_threads 1 (one stage) bit for bit,
/// and a failure in any block is an error with nothing returned. Both tape forms: 64
/// problems x 1000 inputs x 4 samples (256 000 perturbed values, blocks of whole problems,
/// a tape of samples), and 8 problems x 10 inputs x 4000 samples (320 000 values, a tape of
/// Jacobian sums, each problem in several blocks).
#[test]
fn a_one_thread_callback_in_two_stages_stays_on_the_calling_thread() {
    for (batch, d, n) in [(64i64, 1000i64, 4u64), (8, 10, 4000)] {
        one_thread_callback_in_two_stages(batch, d, n);
    }
}

fn one_thread_callback_in_two_stages(batch: i64, d: i64, n: u64) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    let theta = Tensor::linspace(-3.0, 3.0, batch * d, (Kind::Float, tch::Device::Cpu))
        .reshape([batch, d])
        .cos();
    let g = (&theta * 1.7).sin();
    let run = |threads: u32, max_threads: u32| {
        let mut c = config(Noise::Normal, 0.5, n, 11);
        c.set_threads(threads).unwrap();
        c.set_max_threads(max_threads).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let op = PerturbedOp::new(&c, &[d], &[d], move |x: &[f32], rows, y: &mut [f32]| {
            record.lock().unwrap().push(std::thread::current().id());
            argmax(x, rows, y)
        })
        .unwrap();
        let (y, tape) = op.forward_with_tape(&theta).unwrap();
        let v = tape.vjp(&g).unwrap();
        let threads_seen = seen.lock().unwrap().clone();
        (y, v, threads_seen)
    };
    let (y1, v1, seen) = run(1, 0);
    assert!(
        seen.len() > 1,
        "one solver call for the whole call ({batch}x{d}x{n})"
    );
    let me = std::thread::current().id();
    assert!(
        seen.iter().all(|&t| t == me),
        "a callback of threads = 1 ran off the calling thread"
    );
    for (threads, max_threads) in [(2, 0), (1, 1)] {
        let (y, v, _) = run(threads, max_threads);
        assert_eq!(
            max_abs(&y, &y1),
            0.0,
            "{batch}x{d}x{n}: threads {threads}, max_threads {max_threads}"
        );
        assert_eq!(
            max_abs(&v, &v1),
            0.0,
            "{batch}x{d}x{n}: threads {threads}, max_threads {max_threads}"
        );
    }
    // a failure in the first, a middle and the last block
    let calls = seen.len();
    for fail_at in [0, calls / 2, calls - 1] {
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let op = PerturbedOp::new(
            &config(Noise::Normal, 0.5, n, 11),
            &[d],
            &[d],
            move |x: &[f32], rows, y: &mut [f32]| {
                if counter.fetch_add(1, SeqCst) == fail_at {
                    return Err("no solution".into());
                }
                argmax(x, rows, y)
            },
        )
        .unwrap();
        let Err(err) = op.forward_with_tape(&theta) else {
            panic!("a failure at solver call {fail_at} was not reported");
        };
        assert_eq!(err.status(), Status::SolverFailed, "{err}");
        assert!(err.to_string().contains("no solution"), "{err}");
    }
}

/// A callback on one thread in two stages lists the non-zero entries of its short solution
/// rows, with their values and inputs, for the sums on the helper: every estimate equals,
/// bit for bit, that of two solver threads (whose sums read the rows themselves), for
/// one-hot, dense and narrower rows, both noises and both models, with a tape of Jacobian
/// sums (N = 4000), without a tape, and for the Fenchel-Young loss; a non-finite solution
/// in a middle block is the same error. (On a machine of one core neither takes two
/// stages, and they agree all the same.)
#[test]
fn short_rows_listed_in_two_stages_give_the_bits_of_two_threads() {
    use perturbations::Perturbation;
    let (batch, d, n) = (8i64, 12i64, 4000u64);
    let cpu = (Kind::Float, tch::Device::Cpu);
    let theta = (Tensor::arange(batch * d, cpu) * 0.37)
        .sin()
        .reshape([batch, d])
        + 1.5;
    // one-hot; signs of the entries beyond 1.4 (mostly non-zero: dense rows); the one-hot
    // of the best of the first 6 entries (6 outputs)
    type Solve = fn(&[f32], usize, &mut [f32]) -> Result<(), String>;
    let signs: Solve = |x, _, y| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = if (x - 1.4).abs() < 0.05 {
                0.0
            } else {
                (x - 1.4).signum()
            };
        }
        Ok(())
    };
    let narrower: Solve = |x, count, y| {
        let first: Vec<f32> = x.chunks_exact(12).flat_map(|r| r[..6].to_vec()).collect();
        argmax(&first, count, y)
    };
    let bits = |t: &Tensor| {
        Vec::<f32>::try_from(t.flatten(0, -1))
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    for (noise, model) in [
        (Noise::Normal, Perturbation::Additive),
        (Noise::Gumbel, Perturbation::Additive),
        (Noise::Normal, Perturbation::Multiplicative),
    ] {
        for (name, solve, o) in [
            ("one-hot", argmax as Solve, d),
            ("signs", signs, d),
            ("narrower", narrower, 6),
        ] {
            let run = |threads: u32| {
                let mut c = config(noise, 0.5, n, 11);
                c.set_threads(threads).unwrap().set_perturbation(model);
                let op = || PerturbedOp::new(&c, &[d], &[o], solve).unwrap();
                let (y, tape) = op().forward_with_tape(&theta).unwrap();
                let g = (Tensor::arange(batch * o, cpu) * 1.3)
                    .cos()
                    .reshape([batch, o]);
                let mut out = vec![
                    bits(&y),
                    bits(&tape.vjp(&g).unwrap()),
                    bits(&tape.jvp(&theta.cos()).unwrap()),
                ];
                // without a tape, and the loss (new ops: their first call draws the same noise)
                out.push(bits(&op().forward(&theta).unwrap()));
                if o == d {
                    out.push(bits(&tape.objective().unwrap()));
                    let y_true = (&theta * 2.0).sin().ge(0.5).to_kind(Kind::Float);
                    let (loss, grad) = op().fenchel_young(&theta, &y_true).unwrap();
                    out.extend([bits(&loss), bits(&grad)]);
                }
                out
            };
            let names = [
                "y",
                "vjp",
                "jvp",
                "y without a tape",
                "F",
                "loss",
                "gradient",
            ];
            let (one, two) = (run(1), run(2));
            assert_eq!(one.len(), two.len());
            for ((a, b), out) in one.iter().zip(&two).zip(names) {
                // (bits compared; a difference named, not printed whole)
                assert!(
                    a == b,
                    "{name} rows, {noise:?} noise, {model:?}: {out} differs"
                );
            }
        }
    }
    // a NaN in a middle block (the rows of problem 5, whose first input is 100, not
    // perturbed as far as 50): earlier blocks were summed from their lists; the same error
    // either way, naming the same row and output
    let marked = theta.copy();
    let _ = marked.get(5).get(0).fill_(100.0);
    let bad: Solve = |x, count, y| {
        argmax(x, count, y)?;
        if let Some(r) = x.chunks_exact(12).position(|row| row[0] > 50.0) {
            y[r * 12 + 5] = f32::NAN;
        }
        Ok(())
    };
    let fail = |threads: u32| {
        let mut c = config(Noise::Normal, 0.5, n, 11);
        c.set_threads(threads).unwrap();
        let op = PerturbedOp::new(&c, &[d], &[d], bad).unwrap();
        op.forward_with_tape(&marked)
            .expect_err("a NaN solution")
            .to_string()
    };
    assert!(fail(1).contains("problem 5"), "{}", fail(1));
    assert_eq!(fail(1), fail(2));
}

/// The Fenchel-Young loss and gradient of a built-in top-k equal, bit for bit, those of the
/// same draws solved outside and handed back through the two-phase API, for sparse rows
/// (k = 3 of 8) and rows with more ones than zeros (k = 5 of 8), which the sums take as
/// whole vectors either way.
#[test]
fn builtin_top_k_and_its_two_phase_draws_give_the_same_loss_bits() {
    let theta = Tensor::linspace(-2.0, 2.0, 32, (Kind::Float, tch::Device::Cpu))
        .reshape([4, 8])
        .sin();
    let y_true = Tensor::zeros([4, 8], (Kind::Float, tch::Device::Cpu));
    let bits = |t: &Tensor| -> Vec<u32> {
        Vec::<f32>::try_from(t.flatten(0, -1))
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    for k in [3usize, 5] {
        let c = config(Noise::Normal, 1.0, 1000, 7);
        let op = PerturbedOp::new_builtin(&c, Builtin::TopK(k as i64), &[8]).unwrap();
        let (l1, g1) = op.fenchel_young(&theta, &y_true).unwrap();
        let op = PerturbedOp::new_builtin(&c, Builtin::TopK(k as i64), &[8]).unwrap();
        let draw = op.draw(&theta).unwrap();
        let mut sol = vec![0f32; draw.count() * 8];
        for (xr, yr) in draw.inputs().chunks_exact(8).zip(sol.chunks_exact_mut(8)) {
            let mut order: Vec<usize> = (0..8).collect();
            order.sort_by(|&a, &b| xr[b].total_cmp(&xr[a]).then(a.cmp(&b)));
            for &i in &order[..k] {
                yr[i] = 1.0;
            }
        }
        let (l2, g2) = draw.fenchel_young(&sol, &y_true).unwrap();
        assert_eq!(bits(&g1), bits(&g2), "top-{k}: gradient");
        assert_eq!(bits(&l1), bits(&l2), "top-{k}: loss");
    }
}

/// A tape that keeps its samples' scores stays within max_tape_bytes, dense solutions
/// included (ranks: every entry non-zero); scores that would not fit are drawn again.
#[test]
fn kept_scores_stay_within_the_tape_limit() {
    let mut c = config(Noise::Normal, 1.0, 8, 1);
    let limit = 100u64 * 8 * 16 * 4; // batch · N · (o + d) floats
    c.set_max_tape_bytes(limit);
    let op = PerturbedOp::new_builtin(&c, Builtin::Ranks, &[8]).unwrap();
    let theta = Tensor::linspace(-1.0, 1.0, 800, (Kind::Float, tch::Device::Cpu)).reshape([100, 8]);
    let (_, tape) = op.forward_with_tape(&theta).unwrap();
    assert!(tape.bytes() as u64 <= limit, "{} bytes", tape.bytes());
    // without the limit the scores are kept
    let op =
        PerturbedOp::new_builtin(&config(Noise::Normal, 1.0, 8, 1), Builtin::Ranks, &[8]).unwrap();
    let (_, kept) = op.forward_with_tape(&theta).unwrap();
    assert!(
        kept.bytes() >= 100 * 8 * 8 * 4 + tape.bytes() / 2,
        "{}",
        kept.bytes()
    );
}
