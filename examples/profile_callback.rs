use perturbations::{Config, DeviceSpec, Noise, PerturbedOp};
use std::time::Instant;
use tch::Tensor;
fn main() {
    let threads: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1);
    let chunk: u64 = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(16 << 20);
    let mut c = Config::new();
    c.set_num_samples(100_000)
        .unwrap()
        .set_sigma(0.05)
        .unwrap()
        .set_threads(threads)
        .unwrap();
    c.set_noise(Noise::Normal).set_device(DeviceSpec::Cpu);
    c.set_chunk_bytes(chunk).unwrap();
    let d = 13;
    let solve = |x: &[f32], count: usize, y: &mut [f32]| -> Result<(), String> {
        // a stand-in with the cost of the example's Bellman-Ford: ~100 flops a row
        for (xr, yr) in x.chunks_exact(13).zip(y.chunks_exact_mut(13)) {
            let mut acc = 0f32;
            for _ in 0..8 {
                for v in xr {
                    acc = acc.max(acc * 0.5 + v);
                }
            }
            for (i, o) in yr.iter_mut().enumerate() {
                *o = if (acc * (i as f32 + 1.0)) > 1.0 {
                    1.0
                } else {
                    0.0
                };
            }
        }
        let _ = count;
        Ok(())
    };
    let op = PerturbedOp::new(&c, &[d], &[d], solve).unwrap();
    let theta = Tensor::ones([1, d], (tch::Kind::Float, tch::Device::Cpu)) * 0.3;
    for _ in 0..3 {
        let t = Instant::now();
        let (y, tape) = op.forward_with_tape(&theta).unwrap();
        let _ = tape.vjp(&y).unwrap();
        println!("threads {threads}: {:?}", t.elapsed());
    }
    let x = vec![0.3f32; 100_000 * 13];
    let mut y = vec![0f32; 100_000 * 13];
    let t = Instant::now();
    solve(&x, 100_000, &mut y).unwrap();
    println!("solve alone: {:?}", t.elapsed());
}
