//! Every tuning constant of the library, one place: what each one trades.
//!
//! **The OpenMP rule.** No libtorch operation that may open a parallel region runs on the
//! CPU between solver calls, nor while solver threads work: libtorch's OpenMP workers keep
//! spinning on their cores after each region (about a millisecond), on the very cores the
//! solver threads need, at a cost larger than the work of a small call. So the CPU paths
//! draw, perturb, solve, sum and finish in Rust on host buffers; a libtorch operation runs
//! on the CPU only where its work outweighs that cost (the thresholds below say where), and
//! then under the call's `max_threads` (module `intraop`).
//!
//! **Bits.** The constants marked *(bits)* change the last bits of results when changed
//! (and `tests/pinned.rs` fails): they cut a problem's sums into pieces whose order of
//! addition they fix, or choose between two computations that round differently (paths,
//! libtorch or Rust, CPU or GPU). The others choose threads or buffers, and results stay the
//! same bit for bit.

use std::time::Duration;

// ---- the host pipeline (pipeline/host) ----------------------------------------------

/// About how many blocks the host pipeline cuts a problem's samples into: more blocks
/// balance the solver threads better, each costs a solver call and a hand-over. *(bits)*
pub(crate) const HOST_BLOCKS: usize = 32;

/// The fewest samples in a host block of part of a problem (fewer only when a chunk is
/// smaller): a block's fixed cost (a solver call, a hand-over) stays small. *(bits)*
pub(crate) const HOST_BLOCK_MIN_ROWS: usize = 512;

/// The most bytes of a host block's buffers (noise, scores, perturbed inputs, solutions):
/// a block stays in a core's L2 cache between its steps, at more blocks per call. *(bits)*
pub(crate) const HOST_BLOCK_BYTES: u64 = 512 << 10;

/// About how many blocks of whole problems a call is cut into when it runs in two stages
/// (noise on a helper, a callback on the calling thread): fewer, larger blocks than
/// [`HOST_BLOCKS`], each worth the hand-over between the two threads.
pub(crate) const TWO_STAGE_BLOCKS: usize = 16;

/// The fewest perturbed values (samples × inputs) of a call for which a built-in solver's
/// host pipeline starts another thread: a smaller share costs less than its hand-over
/// (callbacks, whose work is unknown, get the config's threads).
pub(crate) const HOST_THREAD_VALUES: usize = 16 << 10;

/// The fewest perturbed values in a block of whole problems (fewer only when the call is
/// smaller): a smaller block costs more in its hand-over than it gains in balance.
pub(crate) const WHOLE_BLOCK_MIN_VALUES: usize = 4 << 10;

/// The working memory of one chunk of samples when the config leaves it to the library:
/// 2 MiB on the CPU (cache-sized chunks are the fastest there), 64 MiB on CUDA (fewer,
/// larger kernel launches). It also caps the host blocks of large problems. *(bits)*
pub const AUTO_CHUNK_BYTES: (u64, u64) = (2 << 20, 64 << 20);

/// Rows summed in float32 before they join the float64 sums: the float32 rounding (at most
/// `SUM_TILE` · 2⁻²⁴ relative) stays far below the Monte-Carlo error of any estimate,
/// while the float64 additions are amortized. *(bits)*
pub(crate) const SUM_TILE: usize = 64;

/// The longest solution rows that a two-stage run lists with their values for the sums
/// on the helper ([`crate::kernels::listed::Listed`]): short rows cost the helper more to
/// read from the calling thread's cache than the list costs that thread (1024 × 10 × 1000:
/// 8% faster); a longer row (one-hot of 100: 5% slower) is cheaper to read there whole.
pub(crate) const LISTED_UP_TO: usize = 32;

/// How far ahead of the row being summed its scores are asked for (floats), in the sums of
/// listed rows: a two-stage block's scores were drawn two hand-overs before its sums (they
/// have left L1), and short rows are summed faster than the hardware prefetchers fetch
/// them (1024 × 10 × 1000 in two stages: 9%).
pub(crate) const SUM_PREFETCH_FLOATS: usize = 256;

// ---- the block scheduler and the threads (kernels/blocks, kernels/workers) ----------

/// Blocks per thread that may be done ahead of the next block to combine: more hide a slow
/// block better, at more results held in memory.
pub(crate) const BLOCK_WINDOW: usize = 4;

/// How long a shared helper looks for its next job (yielding its core) before it sleeps:
/// calls in quick succession (a forward call and its VJP, a training loop's mini-batches)
/// find it awake instead of paying its wake-up, at a core's idle time.
pub(crate) const HELPER_SPIN: Duration = Duration::from_micros(200);

/// How long the thread that lent jobs to workers looks for their end (yielding its core)
/// before it sleeps.
pub(crate) const WAIT_SPIN: Duration = Duration::from_micros(100);

/// How long a stage of a two-stage run looks for its next block before it sleeps.
pub(crate) const TWO_STAGE_SPIN: Duration = Duration::from_micros(100);

/// The stack of a worker thread: a solver's recursion gets what a main thread gets, at
/// that much address space per worker.
pub(crate) const WORKER_STACK_BYTES: usize = 8 << 20;

// ---- the fused CPU argmax (kernels/fused_argmax) ------------------------------------

/// Samples per block of the fused argmax (the unit of work of a thread): larger blocks
/// cost fewer per-block sums, smaller ones balance the cores better. *(bits)*
pub(crate) const FUSED_BLOCK: usize = 1 << 15;

/// Rows drawn at a time within a fused block, kept in cache.
pub(crate) const FUSED_TILE: usize = 256;

/// The largest input_numel² the fused kernel handles: its per-block sums are that many
/// doubles (beyond, the host pipeline's sparse sums are cheaper). *(bits: it chooses the
/// path)*
pub(crate) const FUSED_MAX_SUMS: usize = 4096;

// ---- the built-in solvers (kernels/builtin, kernels/largest) ------------------------

/// The shortest rows that the ranks built-in sorts by radix (shorter: by comparisons).
pub(crate) const RADIX_MIN: usize = 256;

/// The longest rows the ranks built-in ranks by counting (beyond: by sorting; counting
/// costs a comparison per pair of entries, without branches).
pub(crate) const RANKS_COUNTED_UP_TO: usize = 16;

/// The longest rows whose argmax is a plain scan (one pass); longer rows take a vectorized
/// maximum, then a search for its first occurrence (two passes, each faster).
pub(crate) const SCANNED_UP_TO: usize = 16;

/// The most candidates top-k ranks by counting (beyond: by selection).
pub(crate) const TOP_K_RANKED_BY_COUNTING: usize = 64;

// ---- estimates and tapes (estimate/) -------------------------------------------------

/// Outputs per problem up to which the libtorch accumulator sums 0/1 solutions as dense
/// rows: with few outputs the positions of the ones would all land on a few entries
/// (atomic adds that serialize on a GPU), where dense rows are summed by reductions.
/// *(bits)*
pub(crate) const DENSE_BELOW_OUTPUTS: i64 = 64;

/// The most Jacobian entries a CPU call finishes in Rust; beyond, libtorch's parallel
/// products are worth their start-up (see the OpenMP rule above). *(bits)*
pub(crate) const HOST_FINISH_ENTRIES: usize = 1 << 20;

/// The most bytes of scores a CPU tape of samples keeps; beyond, they are drawn again for
/// each product (memory against the time of a draw).
pub(crate) const KEEP_SCORES_BYTES: usize = 16 << 20;

/// Samples whose scores a product with a CPU tape draws again at a time (even, for
/// antithetic pairs): a tile stays in cache.
pub(crate) const REPLAY_TILE: usize = 64;

/// The fewest entries of the sums (samples × width) that a thread of a product with a CPU
/// tape is started for: a smaller share costs less than its hand-over.
pub(crate) const PRODUCT_WORK: usize = 1 << 16;

/// About how many entries of the sums (samples × width) a block of a product with a CPU
/// tape holds (whole problems; fewer when the batch is small): a block's hand-over to a
/// thread stays small against its work.
pub(crate) const REPLAY_BLOCK_WORK: usize = 1 << 14;

/// The largest Jacobian of one problem (o · d entries) whose JVP rows are summed in order,
/// one product after the other; larger ones are summed in eight lanes (faster, other
/// bits). Decided by one problem's size, never the batch's. *(bits)*
pub(crate) const SEQUENTIAL_UP_TO: usize = 1 << 12;

// ---- devices (device, cuda_noise) ----------------------------------------------------

/// Perturbed values per core (that the op may use) below which a call of a built-in op
/// runs on the CPU under the "auto" device: measured on an H100 machine with 16 cores
/// (README, "On a GPU"), the CPU won up to 320 000 values (argmax of 32 problems × 10 ×
/// 1000 samples: 0.31 ms against 0.73 ms) and the GPU from 1 024 000 on (1024 × 100 × 10:
/// 0.95 ms against 2.82 ms); 32 768 a core puts that machine's limit at 524 288 values,
/// and a machine with fewer cores sends less to its CPU. *(bits: CPU or GPU)*
pub(crate) const AUTO_CPU_VALUES_PER_CORE: u128 = 32_768;

/// Threads per block of the CUDA noise kernel: a multiple of the warp size that keeps the
/// kernel's registers within an SM's budget.
pub(crate) const CUDA_NOISE_THREADS: u64 = 256;
