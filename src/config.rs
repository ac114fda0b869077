//! The settings of a perturbed op, validated on the way in.

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::noise::Noise;
use crate::perturbation::Perturbation;
use crate::settings::{Baseline, Path, Sense, TapeForm};

/// The largest number of solver threads a config accepts (C: `PERT_MAX_THREADS`).
pub(crate) const MAX_THREADS: u32 = 1024;

pub use crate::tuning::AUTO_CHUNK_BYTES;

/// The default of [`Config::set_remote_timeout`], in seconds.
pub const DEFAULT_REMOTE_TIMEOUT: f64 = 60.0;
/// The largest remote timeout accepted, in seconds (about 11.6 days).
pub const MAX_REMOTE_TIMEOUT: f64 = 1e6;

/// Settings of a perturbed op. An op copies its config: changing a config later does not
/// change ops made from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    num_samples: u64,
    sigma: f64,
    noise: Noise,
    seed: u64,
    device: DeviceSpec,
    threads: u32,
    max_threads: u32,
    perturbation: Perturbation,
    baseline: Baseline,
    antithetic: bool,
    sense: Sense,
    chunk_bytes: u64,
    max_tape_bytes: u64,
    path: Option<Path>,
    tape_form: Option<TapeForm>,
    solve_ratio: f64,
    linear_objective: bool,
    remote_timeout: f64,
}

impl Default for Config {
    /// The seed's defaults: 1000 samples, sigma 0.05, Normal noise, seed 0, device auto,
    /// one solver thread; additive perturbation, sample-mean baseline, no antithetic
    /// pairs, maximization. On a machine with a CUDA driver, the first config loads
    /// libtorch's CUDA libraries (for "auto"; see `cuda_libraries`), before anything asks
    /// libtorch about CUDA.
    fn default() -> Config {
        crate::cuda_libraries::load();
        Config {
            num_samples: 1000,
            sigma: 0.05,
            noise: Noise::Normal,
            seed: 0,
            device: DeviceSpec::Auto,
            threads: 1,
            max_threads: 0,
            perturbation: Perturbation::Additive,
            baseline: Baseline::SampleMean,
            antithetic: false,
            sense: Sense::Maximize,
            chunk_bytes: 0,
            max_tape_bytes: 0,
            path: None,
            tape_form: None,
            solve_ratio: 1.0,
            linear_objective: false,
            remote_timeout: DEFAULT_REMOTE_TIMEOUT,
        }
    }
}

impl Config {
    /// The default config.
    pub fn new() -> Config {
        Config::default()
    }

    /// Number of perturbed samples per problem; at least 1.
    pub fn set_num_samples(&mut self, num_samples: u64) -> Result<&mut Config> {
        if num_samples == 0 || num_samples > i64::MAX as u64 {
            return Err(Error::invalid(format!(
                "num_samples must be between 1 and {}, got {num_samples}",
                i64::MAX
            )));
        }
        self.num_samples = num_samples;
        Ok(self)
    }

    /// Scale of the noise; finite and > 0, within float32's normal range (the noise and
    /// the Jacobian's 1/σ are float32: a σ beyond it would be 0 or inf there).
    pub fn set_sigma(&mut self, sigma: f64) -> Result<&mut Config> {
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(Error::invalid(format!(
                "sigma must be finite and > 0, got {}",
                crate::error::number(sigma)
            )));
        }
        // (as float32, what the noise is scaled by: a double that rounds to FLT_MAX is it)
        let single = sigma as f32;
        if !(single.is_finite() && single >= f32::MIN_POSITIVE) {
            return Err(Error::invalid(format!(
                "sigma must be within float32's normal range ({:e} to {:e}), got {sigma:e}",
                f32::MIN_POSITIVE,
                f32::MAX
            )));
        }
        self.sigma = sigma;
        Ok(self)
    }

    /// Distribution of the noise.
    pub fn set_noise(&mut self, noise: Noise) -> &mut Config {
        self.noise = noise;
        self
    }

    /// Seed of the op's random stream.
    pub fn set_seed(&mut self, seed: u64) -> &mut Config {
        self.seed = seed;
        self
    }

    /// Device for sampling, perturbation and reductions.
    pub fn set_device(&mut self, device: DeviceSpec) -> &mut Config {
        self.device = device;
        self
    }

    /// Number of threads that call the solver; 0 means one per available core.
    /// At most 1024.
    pub fn set_threads(&mut self, threads: u32) -> Result<&mut Config> {
        if threads > MAX_THREADS {
            return Err(Error::invalid(format!(
                "threads must be at most {}, got {threads}",
                MAX_THREADS
            )));
        }
        self.threads = threads;
        Ok(self)
    }

    /// The most threads any call of an op made from this config runs at once, the calling
    /// thread included, for all of its work (noise, built-ins, sums, gradients, solver
    /// calls); 0 (the default): no cap (solver calls on the solver threads, the library's
    /// own work on up to one thread per core). An op refuses a cap below its solver
    /// threads.
    pub fn set_max_threads(&mut self, max_threads: u32) -> Result<&mut Config> {
        if max_threads > MAX_THREADS {
            return Err(Error::invalid(format!(
                "max_threads must be at most {MAX_THREADS}, got {max_threads}"
            )));
        }
        self.max_threads = max_threads;
        Ok(self)
    }

    /// How noise enters the input.
    pub fn set_perturbation(&mut self, perturbation: Perturbation) -> &mut Config {
        self.perturbation = perturbation;
        self
    }

    /// The variance-reduction baseline of the gradient estimator.
    pub fn set_baseline(&mut self, baseline: Baseline) -> &mut Config {
        self.baseline = baseline;
        self
    }

    /// Whether samples come in antithetic pairs (Z, −Z); Normal noise and an even
    /// num_samples only (checked when an op is made).
    pub fn set_antithetic(&mut self, antithetic: bool) -> &mut Config {
        self.antithetic = antithetic;
        self
    }

    /// Whether the solver maximizes or minimizes ⟨θ, y⟩ (used by the Fenchel-Young loss).
    pub fn set_sense(&mut self, sense: Sense) -> &mut Config {
        self.sense = sense;
        self
    }

    /// The share of an op's perturbed samples that go to its solver when the op has a
    /// solution pool, in [0, 1] (default 1: every sample is solved). Each sample is solved
    /// with this probability, decided by the op's own random stream (so the same for any
    /// number of threads); the others are answered by the pool's best member for their
    /// linear objective ⟨x, y⟩ (see [`crate::pool`]). While the pool is empty every sample
    /// is solved; 0 solves none once it holds a solution (PyEPO's `solve_ratio = 0`: the
    /// pool seeded with the training set's solutions answers them all, and the pool losses
    /// never solve their batch). Without a pool every sample is solved. Values below 0 or
    /// above 1 and NaN are refused.
    pub fn set_solve_ratio(&mut self, ratio: f64) -> Result<&mut Config> {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(Error::invalid(format!(
                "solve_ratio must be in [0, 1], got {}",
                crate::error::number(ratio)
            )));
        }
        self.solve_ratio = ratio;
        Ok(self)
    }

    /// Declares that the op's solver, a callback, optimizes a linear objective ⟨x, y⟩ over
    /// a fixed feasible set (in the config's sense): the condition for answering its
    /// samples from a solution pool. Built-in solvers are linear whatever this says.
    /// Default false.
    pub fn set_linear_objective(&mut self, linear: bool) -> &mut Config {
        self.linear_objective = linear;
        self
    }

    /// How long a call waits for a part of its solves that runs elsewhere (a rank of the MPI
    /// component, bindings/mpi) before it fails, in seconds per row of a worker: a block of
    /// r rows handed to a rank of t workers may take this times ceil(r / t), from when the
    /// rank could start on it. In (0, 1e6]; default 60. Ops that solve in this process do
    /// not use it.
    pub fn set_remote_timeout(&mut self, seconds: f64) -> Result<&mut Config> {
        if !(seconds > 0.0 && seconds <= MAX_REMOTE_TIMEOUT) {
            return Err(Error::invalid(format!(
                "remote_timeout must be in (0, {MAX_REMOTE_TIMEOUT}] seconds, got {seconds}"
            )));
        }
        self.remote_timeout = seconds;
        Ok(self)
    }

    /// The remote timeout in seconds (see `set_remote_timeout`).
    pub fn remote_timeout(&self) -> f64 {
        self.remote_timeout
    }

    /// Every setting, one `name=value` line each (names as the setters', in a fixed
    /// order; floats in their shortest exact form), so that two configs hold the same
    /// settings exactly when their descriptions are equal, line for line.
    pub fn describe(&self) -> String {
        let lines: [(&str, String); 18] = [
            ("num_samples", self.num_samples.to_string()),
            ("sigma", format!("{:?}", self.sigma)),
            ("noise", format!("{:?}", self.noise)),
            ("seed", self.seed.to_string()),
            ("device", format!("{:?}", self.device)),
            ("threads", self.threads.to_string()),
            ("max_threads", self.max_threads.to_string()),
            ("perturbation", format!("{:?}", self.perturbation)),
            ("baseline", format!("{:?}", self.baseline)),
            ("antithetic", self.antithetic.to_string()),
            ("sense", format!("{:?}", self.sense)),
            ("chunk_bytes", self.chunk_bytes.to_string()),
            ("max_tape_bytes", self.max_tape_bytes.to_string()),
            ("solve_ratio", format!("{:?}", self.solve_ratio)),
            ("linear_objective", self.linear_objective.to_string()),
            ("remote_timeout", format!("{:?}", self.remote_timeout)),
            ("path", format!("{:?}", self.path)),
            ("tape_form", format!("{:?}", self.tape_form)),
        ];
        lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }

    /// The share of pooled ops' samples that are solved (see `set_solve_ratio`).
    pub fn solve_ratio(&self) -> f64 {
        self.solve_ratio
    }

    /// Whether the solver is declared linear (see `set_linear_objective`).
    pub fn linear_objective(&self) -> bool {
        self.linear_objective
    }

    /// The working memory of one chunk of samples (perturbed inputs, noise, scores and
    /// solutions, on the device and their host copies): samples are drawn, solved and
    /// reduced a chunk at a time (one chunk per solver thread at once), so a forward call's
    /// extra memory is about threads × this plus the tape, whatever num_samples. At least one
    /// sample per chunk is always used. 0 (the default) leaves it to the library: see
    /// [`AUTO_CHUNK_BYTES`].
    pub fn set_chunk_bytes(&mut self, bytes: u64) -> &mut Config {
        self.chunk_bytes = bytes;
        self
    }

    /// The largest tape a forward call may make, in bytes (0, the default: no limit).
    /// A call whose tape would be larger fails with INVALID_ARGUMENT before any work.
    pub fn set_max_tape_bytes(&mut self, bytes: u64) -> &mut Config {
        self.max_tape_bytes = bytes;
        self
    }

    /// Runs CPU ops through the libtorch chunk path that CUDA ops take, instead of the
    /// host pipelines; for tests of that path on machines without a GPU (the same as
    /// `set_path(Some(Path::Cuda))`; off undoes only that).
    #[doc(hidden)]
    pub fn set_libtorch_path(&mut self, on: bool) -> &mut Config {
        if on {
            self.path = Some(Path::Cuda);
        } else if self.path == Some(Path::Cuda) {
            self.path = None;
        }
        self
    }

    /// Forces the path of every forward call (None, the default: chosen per call; see
    /// `OpSpec::path`). A call that cannot take the forced path fails with
    /// INVALID_ARGUMENT. For tests that compare the paths.
    #[doc(hidden)]
    pub fn set_path(&mut self, path: Option<Path>) -> &mut Config {
        self.path = path;
        self
    }

    /// Forces the form of every tape (None, the default: chosen by sizes, see
    /// `TapeForm::choose`); `max_tape_bytes` still applies. For tests that compare the
    /// forms.
    #[doc(hidden)]
    pub fn set_tape_form(&mut self, form: Option<TapeForm>) -> &mut Config {
        self.tape_form = form;
        self
    }

    /// The forced tape form, if any (see `set_tape_form`).
    #[doc(hidden)]
    pub fn tape_form(&self) -> Option<TapeForm> {
        self.tape_form
    }

    /// The forced path, if any (see `set_path`).
    #[doc(hidden)]
    pub fn path(&self) -> Option<Path> {
        self.path
    }

    /// Working memory of one chunk, in bytes (0: chosen by the library).
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }
    /// The largest tape allowed (0: no limit).
    pub fn max_tape_bytes(&self) -> u64 {
        self.max_tape_bytes
    }

    /// Checks the settings that only make sense together; called when an op is made.
    pub fn validate(&self) -> Result<()> {
        if self.noise != Noise::Normal && self.perturbation == Perturbation::Multiplicative {
            return Err(Error::invalid(format!(
                "the multiplicative perturbation needs Normal noise, got {} noise",
                self.noise.name()
            )));
        }
        if self.perturbation == Perturbation::Multiplicative {
            // x = θ·exp(σZ − σ²/2), σ²/2 in float32: beyond it, inf − inf would give NaN
            let sigma = self.sigma as f32;
            if !(0.5 * sigma * sigma).is_finite() {
                return Err(Error::invalid(format!(
                    "the multiplicative perturbation needs sigma^2 / 2 within float32's range \
                     (sigma at most {:e}), got sigma {}",
                    (2.0 * f64::from(f32::MAX)).sqrt() as f32,
                    crate::error::number(self.sigma)
                )));
            }
        }
        if self.antithetic && self.noise != Noise::Normal {
            return Err(Error::invalid(format!(
                "antithetic pairs need symmetric (Normal) noise, got {} noise",
                self.noise.name()
            )));
        }
        if self.max_threads != 0 && self.threads > self.max_threads {
            return Err(Error::invalid(format!(
                "max_threads {} is below threads {}: a call would run more threads than its cap",
                self.max_threads, self.threads
            )));
        }
        if self.antithetic && self.num_samples % 2 == 1 {
            return Err(Error::invalid(format!(
                "antithetic pairs need an even num_samples, got {}",
                self.num_samples
            )));
        }
        Ok(())
    }

    /// How noise enters the input.
    pub fn perturbation(&self) -> Perturbation {
        self.perturbation
    }
    /// The gradient estimator's baseline.
    pub fn baseline(&self) -> Baseline {
        self.baseline
    }
    /// Whether samples come in antithetic pairs.
    pub fn antithetic(&self) -> bool {
        self.antithetic
    }
    /// Maximization or minimization.
    pub fn sense(&self) -> Sense {
        self.sense
    }

    /// Number of perturbed samples per problem.
    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }
    /// Scale of the noise.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }
    /// Distribution of the noise.
    pub fn noise(&self) -> Noise {
        self.noise
    }
    /// Seed of the random stream.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Requested device.
    pub fn device(&self) -> DeviceSpec {
        self.device
    }
    /// Requested solver threads (0: one per core).
    pub fn threads(&self) -> u32 {
        self.threads
    }

    /// The cap on a call's threads (0: none).
    pub fn max_threads(&self) -> u32 {
        self.max_threads
    }

    /// The number of solver threads a forward call uses (threads 0: one per core, within
    /// the cap).
    pub fn effective_threads(&self) -> usize {
        match self.threads {
            0 => self.library_threads().min(MAX_THREADS as usize),
            t => t as usize,
        }
    }

    /// The threads of the library's own work in a call (noise, built-ins, sums,
    /// gradients): one per core, within the cap.
    pub fn library_threads(&self) -> usize {
        let cores = cores();
        match self.max_threads {
            0 => cores,
            cap => cores.min(cap as usize),
        }
    }
}

/// The cores this process may use, asked once: `available_parallelism` reads the cgroup
/// files of the process each time (tens of microseconds, a large part of a small call).
pub(crate) fn cores() -> usize {
    // an atomic, not a lock: a child forked while another thread asks must not wait
    static CORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    match CORES.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            CORES.store(cores, std::sync::atomic::Ordering::Relaxed);
            cores
        }
        cores => cores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let c = Config::new();
        assert_eq!(c.num_samples(), 1000);
        assert_eq!(c.sigma(), 0.05);
        assert_eq!(c.noise(), Noise::Normal);
        assert_eq!(c.seed(), 0);
        assert_eq!(c.device(), DeviceSpec::Auto);
        assert_eq!(c.threads(), 1);
        assert_eq!(c.perturbation(), Perturbation::Additive);
        assert_eq!(c.baseline(), Baseline::SampleMean);
        assert!(!c.antithetic());
        assert_eq!(c.sense(), Sense::Maximize);
        c.validate().unwrap();
    }

    #[test]
    fn incompatible_settings_are_refused_with_a_reason() {
        let mut c = Config::new();
        c.set_noise(Noise::Gumbel)
            .set_perturbation(Perturbation::Multiplicative);
        assert!(c.validate().unwrap_err().message().contains("Normal noise"));
        let mut c = Config::new();
        c.set_noise(Noise::Gumbel).set_antithetic(true);
        assert!(c.validate().unwrap_err().message().contains("antithetic"));
        let mut c = Config::new();
        c.set_antithetic(true).set_num_samples(7).unwrap();
        assert_eq!(
            c.validate().unwrap_err().message(),
            "antithetic pairs need an even num_samples, got 7"
        );
        // N = 1 with the default sample-mean baseline: valid (the plain estimator is used)
        let mut c = Config::new();
        c.set_num_samples(1).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn rejects_bad_values_and_keeps_the_old_ones() {
        let mut c = Config::new();
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = c.set_sigma(bad).unwrap_err();
            assert!(
                err.message()
                    .starts_with("sigma must be finite and > 0, got"),
                "{}",
                err.message()
            );
        }
        assert_eq!(
            c.set_sigma(-1.0).unwrap_err().message(),
            "sigma must be finite and > 0, got -1"
        );
        // finite and > 0, but 0 or inf as float32 (or subnormal: 1/sigma overflows)
        for bad in [1e-300, 1e-39, 1e39, 1e300] {
            let err = c.set_sigma(bad).unwrap_err();
            assert!(
                err.message()
                    .starts_with("sigma must be within float32's normal range (1.1754944e-38 to 3.4028235e38), got"),
                "{}",
                err.message()
            );
        }
        // (the limits as printed round to them)
        for good in [
            f64::from(f32::MIN_POSITIVE),
            1.1754944e-38,
            1e-30,
            1e30,
            3.4028235e38,
        ] {
            c.set_sigma(good).unwrap();
        }
        // the multiplicative model also needs sigma^2 / 2 within float32's range
        c.set_perturbation(Perturbation::Multiplicative);
        c.set_sigma(1e20).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err
            .message()
            .starts_with("the multiplicative perturbation needs sigma^2 / 2"));
        c.set_sigma(1e19).unwrap();
        c.validate().unwrap();
        c.set_perturbation(Perturbation::Additive);
        c.set_sigma(0.05).unwrap();
        assert!(c.set_num_samples(0).is_err());
        assert!(c.set_num_samples(u64::MAX).is_err());
        assert_eq!(c, Config::new());
        c.set_sigma(0.5).unwrap().set_num_samples(10).unwrap();
        assert_eq!((c.sigma(), c.num_samples()), (0.5, 10));
    }
}
