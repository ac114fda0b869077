//! Solvers and settings shared by the Rust integration tests.
#![allow(dead_code)]

use perturbations::{Config, DeviceSpec, Noise};

/// A CPU config with these settings (and the defaults otherwise).
pub fn config(noise: Noise, sigma: f64, n: u64, seed: u64) -> Config {
    let mut c = Config::new();
    c.set_num_samples(n).unwrap().set_sigma(sigma).unwrap();
    c.set_noise(noise)
        .set_seed(seed)
        .set_device(DeviceSpec::Cpu);
    c
}

/// One-hot of the best entry of each row under `better(a, b)`.
fn one_hot_best(x: &[f32], count: usize, y: &mut [f32], better: impl Fn(f32, f32) -> bool) {
    let d = x.len() / count;
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let best = (0..d).fold(0, |b, i| if better(xr[i], xr[b]) { i } else { b });
        yr.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i == best) as u8 as f32);
    }
}

/// One-hot argmax of each row.
pub fn argmax(x: &[f32], count: usize, y: &mut [f32]) -> Result<(), String> {
    one_hot_best(x, count, y, |a, b| a > b);
    Ok(())
}

/// One-hot argmin of each row.
pub fn argmin(x: &[f32], count: usize, y: &mut [f32]) -> Result<(), String> {
    one_hot_best(x, count, y, |a, b| a < b);
    Ok(())
}

/// The identity.
pub fn identity(x: &[f32], _: usize, y: &mut [f32]) -> Result<(), String> {
    y.copy_from_slice(x);
    Ok(())
}
