use perturbations::noise::Noise;
use perturbations::rng::Stream;
use std::time::Instant;
fn main() {
    let s = Stream::new(0, 0);
    let mut z = vec![0f32; 10_000_000];
    let mut sc = vec![0f32; 10_000_000];
    for _ in 0..2 {
        let t = Instant::now();
        Noise::Gumbel.fill_with_score(&s, 0, &mut z, &mut sc);
        println!("gumbel fill_with_score 1e7 (1 thread): {:?}", t.elapsed());
        let t = Instant::now();
        Noise::Gumbel.fill(&s, 0, &mut z);
        println!("gumbel fill 1e7 (1 thread): {:?}", t.elapsed());
        let t = Instant::now();
        Noise::Normal.fill(&s, 0, &mut z);
        println!("normal fill 1e7 (1 thread): {:?}", t.elapsed());
        let mut w = [0u32; 32];
        let mut acc = 0u32;
        let t = Instant::now();
        for g in 0..10_000_000u64 / 32 {
            s.words32(g, &mut w);
            for x in w {
                acc = acc.wrapping_add(x);
            }
        }
        println!("words 1e7: {:?} {acc}", t.elapsed());
    }
}
