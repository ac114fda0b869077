//! Noise generation rate on a device against that device's memory bandwidth (issue 15's
//! GPU table): `cargo build --release --example noise_rate`, then
//! `target/release/examples/noise_rate [cpu|cuda] [values]`.
//!
//! Prints one JSON line: the Normal and Gumbel noise made per second by the path the ops
//! of that device use (`Noise::sample_on` on CUDA, `Noise::sample` on all cores on the
//! CPU), the bytes of float32 noise written per second, and the device's copy bandwidth
//! (a float32 tensor copied into another: bytes read + written per second) as the
//! reference. Each rate is the best of 5 timed runs after one warm-up. On CUDA it also
//! gives the rate of the libtorch operations the fused kernel replaces, and whether the
//! kernel ran (or why not).
use perturbations::rng::Stream;
use perturbations::Noise;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn best_seconds(device: Device, mut f: impl FnMut()) -> f64 {
    f();
    sync(device);
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            sync(device);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = match args.get(1).map(String::as_str).unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => panic!("device must be cpu or cuda, got {other}"),
    };
    let count: usize = args
        .get(2)
        .map(|s| s.parse().expect("a number of values"))
        .unwrap_or(100_000_000);
    // loads libtorch's CUDA libraries (a Rust program that makes no Config must, before
    // its first CUDA tensor)
    let gpus = perturbations::cuda_device_count();
    assert!(device == Device::Cpu || gpus > 0, "no CUDA device");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let stream = Stream::new(7, 1);
    let rate = |noise: Noise| {
        let t = best_seconds(device, || {
            let z = match device {
                Device::Cpu => noise.sample(&stream, 0, count, threads),
                _ => noise.sample_on(&stream, 0, count, device),
            }
            .expect("noise");
            assert_eq!(z.size(), [count as i64]);
        });
        count as f64 / t
    };
    let normal = rate(Noise::Normal);
    let gumbel = rate(Noise::Gumbel);
    // on CUDA: the libtorch operations the fused kernel replaces, and whether it ran
    let (ops_normal, kernel) = match device {
        Device::Cuda(i) => {
            let t = best_seconds(device, || {
                let _z = Noise::Normal
                    .sample_on_libtorch(&stream, 0, count, device)
                    .expect("noise");
            });
            (
                count as f64 / t,
                Noise::fused_cuda_kernel(i).unwrap_or_else(|e| e),
            )
        }
        Device::Cpu => (f64::NAN, "cpu".into()),
        _ => unreachable!(),
    };
    let src = Tensor::ones([count as i64], (Kind::Float, device));
    let mut dst = Tensor::zeros([count as i64], (Kind::Float, device));
    let copy = best_seconds(device, || {
        dst.copy_(&src);
    });
    let copy_bytes_per_s = 2.0 * 4.0 * count as f64 / copy;
    println!(
        "{{\"device\": \"{device:?}\", \"values\": {count}, \"normal_per_s\": {normal:.4e}, \
         \"gumbel_per_s\": {gumbel:.4e}, \"normal_bytes_per_s\": {:.4e}, \
         \"copy_bytes_per_s\": {copy_bytes_per_s:.4e}, \"normal_fraction_of_copy\": {:.4}, \
         \"libtorch_ops_normal_per_s\": {ops_normal:.4e}, \"fused_kernel\": {:?}}}",
        normal * 4.0,
        normal * 4.0 / copy_bytes_per_s,
        kernel
    );
}
