use perturbations::{rng::Stream, Builtin, Config, DeviceSpec, Noise, PerturbedOp};
use std::time::Instant;
use tch::{Kind, Tensor};
fn time<F: FnMut()>(name: &str, reps: u32, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    println!("{name}: {:?} per call", t.elapsed() / reps);
}
fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1_000_000);
    let mut c = Config::new();
    c.set_num_samples(n).unwrap().set_sigma(0.5).unwrap();
    c.set_noise(Noise::Gumbel).set_device(DeviceSpec::Cpu);
    let theta = Tensor::from_slice(&[-0.6f32, 1.9, -0.2, 1.1, -1.0, -0.6, 1.0, -0.2, 1.8, -1.0])
        .reshape([2, 5]);
    let op = PerturbedOp::new_builtin(&c, Builtin::Argmax, &[5]).unwrap();
    time("forward+tape+vjp N=1e6 B=2", 3, || {
        let (y, tape) = op.forward_with_tape(&theta).unwrap();
        let _ = tape.vjp(&y).unwrap();
    });
    let s = Stream::new(0, 0);
    let m = 600_000usize;
    let mut u = [0u32; 32];
    time("philox 600k words 1 thread", 20, || {
        for g in 0..(m as u64 / 32) {
            s.words32(g, &mut u)
        }
    });
    time("sample 600k gumbel (1 thread words)", 20, || {
        let _ = Noise::Gumbel.sample(&s, 0, m, 1).unwrap();
    });
    time("sample 600k gumbel (2 thread words)", 20, || {
        let _ = Noise::Gumbel.sample(&s, 0, m, 2).unwrap();
    });
    let z = Noise::Gumbel.sample(&s, 0, m, 2).unwrap().view([-1, 5]);
    time("torch log 600k", 20, || {
        let _ = z.log();
    });
    time("score 1-exp(-z)", 20, || {
        let _ = Noise::Gumbel.score(&z).unwrap();
    });
    time("x = theta + sigma z", 20, || {
        let _ = (&z * 0.5) + theta.get(0);
    });
    time("argmax rows 120k x 5", 20, || {
        let _ = z.argmax(1, true);
    });
    let idx = z.argmax(1, false);
    let acc = Tensor::zeros([5, 5], (Kind::Float, tch::Device::Cpu));
    time("index_add 120k x 5", 20, || {
        let _ = acc.shallow_clone().index_add_(0, &idx, &z);
    });
    time("sum dim0 double", 20, || {
        let _ = z.sum_dim_intlist(0, false, Kind::Double);
    });
    time("gather sum", 20, || {
        let _ = z.gather(1, &idx.unsqueeze(1), false).sum(Kind::Double);
    });
}
