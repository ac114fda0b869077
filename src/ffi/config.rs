//! `pert_config`: the settings an op copies when it is made.

use super::boundary::{self, arg, arg_mut, guard, guard_or};
use super::handle::{handle, Handle};
use super::status::pert_status;
use crate::config::Config;
use crate::device::DeviceSpec;
use crate::error::Error;
use crate::noise::Noise;
use crate::perturbation::Perturbation;
use crate::settings::Baseline;
use crate::settings::Sense;
use std::ffi::{c_char, CStr};

/// Normal noise N(0, 1): score z. The default.
pub const PERT_NOISE_NORMAL: u32 = 0;
/// Gumbel noise: score 1 - exp(-z).
pub const PERT_NOISE_GUMBEL: u32 = 1;
/// Sum-of-Gamma noise (Niepert et al. 2021, the noise of I-MLE): (sum over i = 1..s of
/// Gamma(1/kappa, kappa/i) - log s) / kappa, by default kappa 5 and s = 10 terms (PyEPO's);
/// see `pert_config_set_sum_of_gamma`. It has no closed-form density, so no score: ops with
/// it give no tape (their Jacobian estimate needs one); it serves the Fenchel-Young loss,
/// forward calls without a tape, draws and I-MLE.
pub const PERT_NOISE_SUM_OF_GAMMA: u32 = 2;
/// The most terms of Sum-of-Gamma noise (`pert_config_set_sum_of_gamma`).
pub const PERT_SUM_OF_GAMMA_MAX_TERMS: u32 = 1000;
/// The smallest kappa of Sum-of-Gamma noise.
pub const PERT_SUM_OF_GAMMA_MIN_KAPPA: f64 = 1e-3;
/// The largest kappa of Sum-of-Gamma noise (its variates are made in float32).
pub const PERT_SUM_OF_GAMMA_MAX_KAPPA: f64 = 1e3;

/// Additive perturbation theta + sigma Z. The default.
pub const PERT_PERTURBATION_ADDITIVE: u32 = 0;
/// Multiplicative perturbation theta * exp(sigma Z - sigma^2 / 2), Normal noise only: keeps
/// the sign of each entry (for costs); a zero entry stays zero, with gradient 0.
pub const PERT_PERTURBATION_MULTIPLICATIVE: u32 = 1;

/// Plain estimator: J = sum_n Y_n s_n^T / (N sigma).
pub const PERT_BASELINE_NONE: u32 = 0;
/// Sample-mean baseline: J = sum_n (Y_n - mean Y) s_n^T / ((N - 1) sigma); no extra solve.
/// The default. With num_samples = 1 it is undefined, and the plain estimator is used.
/// At very small N it can add variance: for an entry the samples choose with probability
/// p < 1/N, about N (1 - p) / (N - 1) times the plain estimator's (1.6x at N = 2 and a
/// 5-way tie).
pub const PERT_BASELINE_SAMPLE_MEAN: u32 = 1;
/// Clean-input control variate: J = sum_n (Y_n - y*(theta)) s_n^T / (N sigma); one extra
/// solve per problem (in forward calls that make a tape); stays bounded as sigma -> 0.
/// It helps when y*(theta) is the samples' usual solution (sigma small against the gaps
/// of theta); when it is a rare one it adds variance (about 2.9x the plain estimator's for
/// a Gumbel argmax of 5 entries at sigma = 2, where y*(theta) wins 26% of the samples).
pub const PERT_BASELINE_CLEAN_INPUT: u32 = 2;

/// The solver maximizes <theta, y>. The default.
pub const PERT_SENSE_MAXIMIZE: u32 = 0;
/// The solver minimizes <theta, y> (shortest paths, costs).
pub const PERT_SENSE_MINIMIZE: u32 = 1;

/// The largest value `pert_config_set_threads` accepts.
pub const PERT_MAX_THREADS: u32 = 1024;

/// Settings for ops: number of samples, sigma, noise, seed, device and solver threads.
///
/// Made by `pert_config_new`, freed by `pert_config_free`. An op copies the config when it
/// is made, so a config may be changed or freed right after `pert_op_new`.
/// Threads: a config may be read (by `pert_op_new`) from several threads at once, but must
/// not be changed while another thread uses it.
pub struct pert_config {
    pub(crate) inner: Config,
}

handle!(pert_config, Config);

/// Makes a config with the defaults: num_samples 1000, sigma 0.05, noise
/// `PERT_NOISE_NORMAL`, seed 0, device "auto", threads 1.
///
/// @param out  Receives the new config on success; untouched on error.
/// @return `PERT_STATUS_OK`, or `PERT_STATUS_NULL_ARGUMENT` when `out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_config_new(out: *mut *mut pert_config) -> pert_status {
    guard(|| {
        let out = unsafe { arg_mut(out, "out") }?;
        *out = pert_config::into_raw(Config::new());
        Ok(())
    })
}

/// Frees a config made by `pert_config_new`. NULL is accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn pert_config_free(config: *mut pert_config) {
    guard_or((), || {
        // SAFETY: a non-NULL config comes from `pert_config_new` and is freed once.
        unsafe { pert_config::free(config) }
    })
}

fn set(config: *mut pert_config, f: impl FnOnce(&mut Config) -> Result<(), Error>) -> pert_status {
    guard(|| f(unsafe { pert_config::borrow_mut(config, "config") }?))
}

/// Sets the number of perturbed samples N per problem (default 1000).
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` when `num_samples` is 0 or above INT64_MAX.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_num_samples(
    config: *mut pert_config,
    num_samples: u64,
) -> pert_status {
    set(config, |c| c.set_num_samples(num_samples).map(|_| ()))
}

/// Sets the noise scale sigma (default 0.05).
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` unless `sigma` is finite and > 0, and within
///         float32's normal range (FLT_MIN to FLT_MAX: the noise is float32).
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_sigma(
    config: *mut pert_config,
    sigma: f64,
) -> pert_status {
    set(config, |c| c.set_sigma(sigma).map(|_| ()))
}

/// Sets the noise distribution: `PERT_NOISE_NORMAL` (default), `PERT_NOISE_GUMBEL` or
/// `PERT_NOISE_SUM_OF_GAMMA` (with kappa 5 and 10 terms, or the parameters the config
/// already has when its noise is Sum-of-Gamma; `pert_config_set_sum_of_gamma` sets them).
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` for any other number.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_noise(
    config: *mut pert_config,
    noise: u32,
) -> pert_status {
    set(config, |c| {
        let noise = Noise::from_u32(noise)?;
        // Sum-of-Gamma again keeps the parameters set before (in any order of the calls)
        if !matches!(
            (noise, c.noise()),
            (Noise::SumOfGamma(_), Noise::SumOfGamma(_))
        ) {
            c.set_noise(noise);
        }
        Ok(())
    })
}

/// Sets Sum-of-Gamma noise (`PERT_NOISE_SUM_OF_GAMMA`) with its parameters: each noise
/// value is (sum over i = 1..terms of Gamma(1/kappa, kappa/i) - log terms) / kappa, whose
/// mean is (H_terms - log terms) / kappa and variance (sum over i of 1/i^2) / kappa; the sum
/// of kappa such values tends to a standard Gumbel as terms grows. sigma plays the role of
/// I-MLE's temperature tau.
///
/// @param kappa  `PERT_SUM_OF_GAMMA_MIN_KAPPA` (0.001) to `PERT_SUM_OF_GAMMA_MAX_KAPPA` (1000);
///               PyEPO's default 5. The variates are made in float32.
/// @param terms  1 to `PERT_SUM_OF_GAMMA_MAX_TERMS` (1000); PyEPO's default 10.
/// @return `PERT_STATUS_INVALID_ARGUMENT` for a bad kappa or terms (the config unchanged).
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_sum_of_gamma(
    config: *mut pert_config,
    kappa: f64,
    terms: u32,
) -> pert_status {
    set(config, |c| {
        c.set_noise(Noise::sum_of_gamma(kappa, terms)?);
        Ok(())
    })
}

/// Sets the seed of the random stream (default 0). An op's draws are a pure function of
/// (seed, number of earlier forward calls on that op); the library never reads or reseeds
/// libtorch's global generator.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_seed(config: *mut pert_config, seed: u64) -> pert_status {
    set(config, |c| {
        c.set_seed(seed);
        Ok(())
    })
}

/// Sets the device that samples, perturbs and reduces: "auto" (the default), "cpu",
/// "cuda" (device 0) or "cuda:N". Under "auto", ops of built-in solvers and of device
/// solvers (`pert_op_new_device`) run on CUDA device 0 when a GPU is present, else on the
/// CPU (their results then differ in the last bits between the two), and ops whose
/// solutions come from the host (callbacks of pert_op_new and pert_op_new_ex, external ops
/// for the two-phase API) run on the CPU on every machine: their solvers take host memory
/// anyway, the CPU pipeline then avoids a copy to the GPU and back per chunk, and their
/// results for a seed are the same on a machine with a GPU as without. Callbacks of
/// pert_op_new and pert_op_new_ex always receive host memory (on a CUDA op their rows are
/// staged through pinned host memory); device solvers receive the op's. A built-in op that
/// "auto" put on a GPU runs its small calls (under 32 768 perturbed values, batch ×
/// num_samples × input elements, per core the op may use) on the CPU, where they are
/// faster or as fast; such a call (and a two-phase draw of that size) gives bit for bit
/// what a "cpu" op gives.
///
/// @param device  A NUL-terminated string, borrowed for the call.
/// @return `PERT_STATUS_INVALID_ARGUMENT` for another string,
///         `PERT_STATUS_DEVICE_UNAVAILABLE` for a CUDA device this machine does not have.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_device(
    config: *mut pert_config,
    device: *const c_char,
) -> pert_status {
    set(config, |c| {
        let text = unsafe { arg(device, "device") }?;
        // SAFETY: the caller passes a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(text) };
        let text = text
            .to_str()
            .map_err(|_| Error::invalid(format!("device must be UTF-8, got {text:?}")))?;
        let spec = DeviceSpec::parse(text)?;
        spec.resolve()?;
        c.set_device(spec);
        Ok(())
    })
}

/// Sets how many threads call the solver in one forward call (default 1; 0: one per core).
/// With more than one, the solver is called concurrently on disjoint slices of the
/// perturbed problems and must be thread-safe: on the calling thread and on helper threads
/// that the library keeps between calls (shared by all ops; threads of the call's own when
/// they are busy), so thread-local state of a solver may outlive a call. Results do not
/// depend on this number.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` above 1024.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_threads(
    config: *mut pert_config,
    threads: u32,
) -> pert_status {
    set(config, |c| c.set_threads(threads).map(|_| ()))
}

/// Caps the threads of every call of an op made from this config: the most threads it
/// runs at once, the calling thread included, for all of its work (noise, built-ins,
/// sums, gradients and tape products, solver callbacks). 0 (the default): no cap (solver
/// callbacks on `threads` threads, the library's own work on up to one thread per core).
/// With 1, every call of the op stays on one core (its CPU time is about its wall time):
/// for callers inside MPI ranks or OpenMP regions. The OpenMP and MKL thread counts of
/// the calling thread (which libtorch's CPU kernels and the callbacks on that thread see)
/// become the smaller of the cap and their value before the call (a cap never raises
/// them), for the call's duration, and their values before the call are put back after
/// (other threads of the process keep theirs). The cap also holds for a tape's products
/// and a draw's finish. Results do not depend on the cap, bit for bit: the library's own
/// libtorch reductions and products on the CPU run on one thread.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` above 1024. An op refuses a config whose
///         non-zero max_threads is below its threads.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_max_threads(
    config: *mut pert_config,
    max_threads: u32,
) -> pert_status {
    set(config, |c| c.set_max_threads(max_threads).map(|_| ()))
}

/// Sets how the noise enters the input: `PERT_PERTURBATION_ADDITIVE` (default) or
/// `PERT_PERTURBATION_MULTIPLICATIVE` (Normal noise only, and sigma at most 2.6e19, so that
/// sigma^2 / 2 is within float32's range; checked when an op is made). Its samples are
/// theta exp(sigma Z - sigma^2 / 2): beyond sigma of about 20 nearly all underflow to 0.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` for any other number.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_perturbation(
    config: *mut pert_config,
    perturbation: u32,
) -> pert_status {
    set(config, |c| {
        c.set_perturbation(Perturbation::from_u32(perturbation)?);
        Ok(())
    })
}

/// Sets the variance-reduction baseline of the gradient: `PERT_BASELINE_NONE`,
/// `PERT_BASELINE_SAMPLE_MEAN` (default) or `PERT_BASELINE_CLEAN_INPUT`. All are unbiased;
/// see each constant for the estimator it gives. Under antithetic pairs every baseline
/// gives the same estimator (the pair's scores cancel any constant) and no extra solve.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` for any other number.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_baseline(
    config: *mut pert_config,
    baseline: u32,
) -> pert_status {
    set(config, |c| {
        c.set_baseline(Baseline::from_u32(baseline)?);
        Ok(())
    })
}

/// Sets the share of a pooled op's perturbed samples that its solver solves, in [0, 1]
/// (default 1: all). Each sample is solved with this probability, decided by the op's
/// own random stream (the same for any number of threads); the others are answered from
/// the op's solution pool (see `pert_op_set_pool`). While the pool is empty every sample
/// is solved; 0 solves none once it holds a solution (PyEPO's solve_ratio 0: a pool
/// seeded with the training set's solutions answers every sample, and the pool losses
/// never solve their batch first). Without a pool every sample is solved.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` for a ratio below 0 or above 1, NaN.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_solve_ratio(
    config: *mut pert_config,
    ratio: f64,
) -> pert_status {
    set(config, |c| c.set_solve_ratio(ratio).map(|_| ()))
}

/// Declares that the solver callback optimizes a linear objective <x, y> over a fixed
/// feasible set, in the config's sense (default false): the condition for an op to take
/// a solution pool (`pert_op_set_pool`), which answers samples by their best <x, y>.
/// Built-in solvers are linear whatever this says.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_linear_objective(
    config: *mut pert_config,
    linear: bool,
) -> pert_status {
    set(config, |c| {
        c.set_linear_objective(linear);
        Ok(())
    })
}

/// Sets how long a call waits for a part of its solves that runs elsewhere before it fails,
/// in seconds per row of a worker (default 60): for an op of the MPI component
/// (bindings/mpi), the longest one solve may take on a rank; a block of r rows handed to a
/// rank of t workers may take this times ceil(r / t) seconds, counted from when the rank
/// could start on it (blocks hold at most 32 rows per worker). A rank that is dead or stuck
/// then fails the call on root with `PERT_STATUS_SOLVER_FAILED` naming the rank, instead of
/// a hang. Ops that solve in this process do not use it.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` unless 0 < seconds <= 1e6 (NaN included).
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_remote_timeout(
    config: *mut pert_config,
    seconds: f64,
) -> pert_status {
    set(config, |c| c.set_remote_timeout(seconds).map(|_| ()))
}

/// Makes a copy of a config, with every setting: to change some settings for another op
/// without touching the original.
///
/// @param out  Receives the copy on success; untouched on error. Free it with
///             `pert_config_free`.
/// @return `PERT_STATUS_NULL_ARGUMENT` when `config` or `out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn pert_config_clone(
    config: *const pert_config,
    out: *mut *mut pert_config,
) -> pert_status {
    guard(|| {
        let copy = unsafe { pert_config::borrow(config, "config") }?.clone();
        let out = unsafe { arg_mut(out, "out") }?;
        *out = pert_config::into_raw(copy);
        Ok(())
    })
}

/// Describes every setting of a config as text: one `name=value` line each, ended by a
/// newline, the names those of the setters (`num_samples=1000`, `sigma=0.05`, ...; `path`
/// and `tape_form` are the library's own test settings), in a fixed order, floats in their shortest exact form. Two configs hold the same settings
/// exactly when their texts are equal, line for line (the text of a value may change
/// between versions of the library). Copied into `buf` as `pert_last_error` copies.
///
/// @param buf      Where to copy the text; may be NULL when `buf_len` is 0.
/// @param buf_len  Size of `buf` in bytes; the copy is cut to `buf_len - 1` bytes and
///                 NUL-terminated when `buf_len > 0`.
/// @return The full length of the text in bytes, without the NUL (a return value
///         `>= buf_len` means the copy was cut); 0 for a NULL config (`buf` then gets
///         the empty string).
#[no_mangle]
pub unsafe extern "C" fn pert_config_describe(
    config: *const pert_config,
    buf: *mut c_char,
    buf_len: usize,
) -> usize {
    guard_or(0, || match unsafe { pert_config::get(config) } {
        // SAFETY: the caller gives `buf_len` writable bytes at a non-NULL `buf`
        Some(c) => unsafe { super::boundary::copy_text(&c.describe(), buf, buf_len) },
        None => unsafe { super::boundary::copy_text("", buf, buf_len) },
    })
}

/// Draws the samples in antithetic pairs (Z, -Z) (default false): the Jacobian becomes
/// sum over pairs of (Y(Z) - Y(-Z)) Z^T / (N sigma). Needs Normal noise and an even
/// num_samples; `pert_op_new` checks both. It helps when Y(-Z) is close to Y(Z) (theta's
/// winner is clear at the scale of sigma); at an exact tie Y(-Z) mirrors Y(Z), a pair's
/// two terms are equal and it doubles the plain estimator's variance (a 2-way argmax
/// tie along e0 - e1), and the baselines are then no help either (see
/// `pert_config_set_baseline`).
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_antithetic(
    config: *mut pert_config,
    antithetic: bool,
) -> pert_status {
    set(config, |c| {
        c.set_antithetic(antithetic);
        Ok(())
    })
}

/// Says whether the solver maximizes (`PERT_SENSE_MAXIMIZE`, default) or minimizes
/// (`PERT_SENSE_MINIMIZE`) <theta, y>. This sets the sign of the Fenchel-Young loss and
/// of its sense bound, the signs of the decision-focused methods and the pool losses
/// (PyEPO's per sense), and which pool member is a sample's best. The built-in solvers
/// maximize: `pert_op_new_builtin` refuses a config that says minimize.
///
/// @return `PERT_STATUS_INVALID_ARGUMENT` for any other number.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_sense(
    config: *mut pert_config,
    sense: u32,
) -> pert_status {
    set(config, |c| {
        c.set_sense(Sense::from_u32(sense)?);
        Ok(())
    })
}

/// Sets the working memory of one chunk of samples, in bytes. Samples are drawn, solved and
/// reduced at most a chunk at a time (one chunk per solver thread at once), so a forward
/// call's extra memory is about threads * chunk_bytes plus its tape, whatever num_samples.
/// A chunk holds at least one sample. On the CPU the library cuts each problem's samples
/// into smaller blocks still: about num_samples / 32 (so that threads share the work
/// evenly), at least 512 samples, and at most 512 KiB of buffers (so that a block stays in
/// cache) unless the Jacobian sums it keeps are larger. The results do not depend on it
/// beyond float rounding.
/// 0 (the default) leaves it to the library: 2 MiB on the CPU, 64 MiB on CUDA.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_chunk_bytes(
    config: *mut pert_config,
    bytes: u64,
) -> pert_status {
    set(config, |c| {
        c.set_chunk_bytes(bytes);
        Ok(())
    })
}

/// Sets the largest tape a forward call may make, in bytes (default 0: no limit). A tape
/// keeps, per problem, the Jacobian's sums (output_numel * input_numel floats) or, when
/// num_samples * (output_numel + input_numel) floats would not take more than twice that,
/// the samples. On the CPU (ops of device solvers aside) a tape of samples keeps their
/// solutions (the non-zero entries of sparse ones as index-value pairs), and their scores
/// (num_samples * input_numel floats a problem) only while those take at most 16 MiB in
/// all and the tape stays within this limit whatever its solutions take: other scores are
/// drawn again from the call's stream when a gradient is asked, bit for bit the same (such
/// a tape usually takes far less than the bound).
/// A call whose tape could be larger than the limit fails with
/// `PERT_STATUS_INVALID_ARGUMENT` before any work.
#[no_mangle]
pub unsafe extern "C" fn pert_config_set_max_tape_bytes(
    config: *mut pert_config,
    bytes: u64,
) -> pert_status {
    set(config, |c| {
        c.set_max_tape_bytes(bytes);
        Ok(())
    })
}
/// The number of CUDA devices libtorch sees: 0 on a machine without a GPU.
///
/// The library does not link libtorch_cuda: on a machine with a CUDA driver it loads it
/// (from the folder of the libtorch in use) the first time a config is made (whatever its
/// device), this function is called or a CUDA device is asked for; a process on a machine
/// without a driver never maps it. libtorch decides once per process whether CUDA exists, so an application that
/// queries libtorch about CUDA itself before any of these calls (without linking
/// libtorch_cuda) sees no device here, and `"cuda"` then fails with a message saying so.
#[no_mangle]
pub extern "C" fn pert_cuda_device_count() -> i32 {
    guard_or(0, || {
        i32::try_from(crate::device::cuda_device_count()).unwrap_or(i32::MAX)
    })
}

/// Whether a call on CUDA device `device` can run on this thread now. Every call on a CUDA
/// op checks this itself before it enqueues anything; call it before work of your own that
/// a refused call would make useless, such as copying a CUDA tensor to the host for the
/// call (the C++ adapter and the Python package do). Any thread.
///
/// On a machine with a CUDA driver this loads libtorch's CUDA libraries, as
/// `pert_cuda_device_count` does; it starts no CUDA context.
///
/// @return `PERT_STATUS_DEVICE_UNAVAILABLE` when there is no such CUDA device, in a child
///         forked after its parent started CUDA through this library (a child of a parent
///         whose CUDA something else started fails in the call), when libtorch's current stream of that
///         device on this thread is capturing a CUDA graph or is in an invalidated capture
///         (a call cannot be captured: it reads results on the host and calls host
///         solvers), or when a CUDA context other than a device's primary context is current
///         on this thread (another library's, such as PyCUDA's, or a torch green context:
///         libtorch and this library work in the devices' primary contexts);
///         `PERT_STATUS_TORCH_ERROR` when libtorch cannot give its current stream (or the
///         driver cannot say whether it captures); `PERT_STATUS_INVALID_ARGUMENT` when
///         `device` is negative.
#[no_mangle]
pub extern "C" fn pert_cuda_check_thread(device: i32) -> pert_status {
    guard(|| {
        let index = usize::try_from(device).map_err(|_| {
            Error::invalid(format!(
                "device must be a CUDA device index >= 0, got {device}"
            ))
        })?;
        crate::device::check_cuda_thread(index)
    })
}

/// A text report of what this process found of CUDA and how each device draws its noise,
/// for logs and bug reports: one `name: value` line per item (the library's version, the
/// libtorch folder, the CUDA driver's version or why there is none or why it did not
/// start, libtorch's CUDA runtime, the devices libtorch sees and why fewer than the
/// driver, NVRTC, then for each CUDA device `noise on cuda:N (name, sm_XY): fused kernel,
/// CUBIN sm_XY` or `...: libtorch operations (the slow path): why`, the stream the kernel
/// is ordered on (`CUDA noise kernel runs on: libtorch's current stream ...`), and the
/// CPU's sampler).
/// Where the fused kernel is unavailable, CUDA ops still give the same values, about 90
/// times slower; the library then also says so once on stderr, unless the environment
/// variable `PERTURBATIONS_QUIET` is set (not empty, not "0"). On a machine with a CUDA
/// driver, the report loads libtorch's CUDA libraries and the noise kernel on each device,
/// as the first CUDA op would. Any thread.
///
/// @param buf  Receives the report, NUL-terminated, cut to `*len - 1` bytes when longer;
///             may be NULL when `*len` is 0 (to ask for the length).
/// @param len  In: the size of `buf` in bytes. Out: the report's full length in bytes,
///             without the NUL (a value `>=` the size given means the copy was cut: call
///             again with `*len + 1` bytes).
/// @return `PERT_STATUS_NULL_ARGUMENT` when `len` is NULL, or `buf` is NULL with `*len`
///         > 0 (nothing written).
#[no_mangle]
pub unsafe extern "C" fn pert_device_report(buf: *mut c_char, len: *mut usize) -> pert_status {
    guard(|| {
        let len = unsafe { arg_mut(len, "len") }?;
        if buf.is_null() && *len > 0 {
            return Err(boundary::null("buf"));
        }
        let report = crate::report::device_report();
        // SAFETY: the caller gives `*len` writable bytes at a non-NULL `buf`.
        *len = unsafe { boundary::copy_text(&report, buf, *len) };
        Ok(())
    })
}
