//! Differentiable perturbed optimizers (Berthet et al., "Learning with Differentiable
//! Perturbed Optimizers", NeurIPS 2020) on libtorch.
//!
//! A black-box [`Solver`] y*(θ) becomes the smooth y_σ(θ) = E[y*(θ + σZ)], estimated from
//! N perturbed samples, with a Monte-Carlo Jacobian kept on a [`Tape`]. The safe API here
//! knows nothing of C; the C API (`pert_*`, see `include/perturbations.h`) is a thin layer
//! in [`ffi`].
//!
//! Inputs are checked here as the C API checks them (shapes, finiteness, sizes). The
//! results of forward calls, tapes and the Fenchel-Young loss are returned as computed, as
//! libtorch's own operations return theirs: a result beyond float32's range is ±inf (or NaN
//! where an inf meets an inf, in a Jacobian say) in its tensor, where the C layer refuses
//! it (`PERT_STATUS_INVALID_ARGUMENT`) before writing anything. The decision-focused
//! methods ([`methods`]) check their results here.
//!
//! [`autograd`] is differentiable once: tch has no custom backward, so a second derivative
//! through it (a gradient penalty, a Hessian) is not refused but lacks the terms of the
//! Jacobian estimate's own derivative and, for the Fenchel-Young loss, the Jacobian term:
//! it is not the true one. The C++ and Python adapters refuse it.

// The fault-injection build of `make check-deep` (nightly, `--cfg pert_fault_injection`):
// a failed allocation panics (caught at the C boundary) instead of aborting, so that the
// harness can fail every allocation of a call in turn (tests/fault).
#![cfg_attr(pert_fault_injection, feature(alloc_error_hook))]
// No function of the library over 100 lines (clippy.toml), test code aside: `make lint`
// (run by `make test`) denies every clippy warning.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

// The layers, from the leaves up (see ARCHITECTURE.md): a module uses only modules
// declared before it here, never one after (tests/architecture.rs checks it).

// leaves: errors, interrupts, shapes, the counter-based streams, fast math, locks a forked
// child can take, plain settings, Sum-of-Gamma variates, the tuning constants
pub mod error;
mod fastmath;
mod fork_safe;
mod interrupt;
pub mod rng;
pub mod settings;
mod shape;
pub mod solver;
mod sum_of_gamma;
mod tuning;
mod uninit;

// dot products in a fixed order (on fast math's AVX check), and loops compiled for the
// widest vectors the CPU has, which may call them
mod dot;
mod vectorized;

// libtorch's CUDA libraries loaded on demand, its current CUDA stream, and NVRTC, CUDA's
// run-time compiler (found beside them), for the fused noise kernel
mod cuda_libraries;
mod cuda_stream;
mod nvrtc;

// settings with their code, and helpers: devices, noise, perturbations, input checks,
// the fused noise kernel of CUDA ops, libtorch's per-thread thread counts, tensor and
// host-buffer helpers
mod cuda_noise;
pub mod device;
mod input;
mod intraop;
pub mod noise;
pub mod perturbation;
mod tensors;

pub mod config;

// the solution pool (distinct solutions for expensive solvers), and what a call adds to it
pub mod pool;
mod recent;
pub mod report;

// kernels: the block scheduler, host sums, built-in solvers, the fused argmax
mod kernels;

// estimation: the accumulator and the tape forms (sums, samples, replayed solutions)
pub mod estimate;

// pipelines: the plan of a call, the host pipeline, the libtorch pipeline, solver calls
mod pipeline;

// the public API
pub mod fenchel_young;
pub mod tape;
pub mod two_phase;

pub mod op;

// decision-focused learning over the op's exact solver (SPO+, DBB, NID, PG)
pub mod methods;

pub mod autograd;

// the C layer
pub mod ffi;

pub use config::Config;
pub use device::{cuda_device_count, DeviceSpec};
pub use error::{Error, Result, Status};
pub use kernels::builtin::Builtin;
pub use methods::{AimleState, ImleRecord, PoolLoss};
pub use noise::Noise;
pub use op::PerturbedOp;
pub use perturbation::Perturbation;
pub use pool::Pool;
pub use settings::{Baseline, Sense, TapeForm};
pub use solver::{DeviceSolver, SolveInfo, Solver, WorkerSolver};
pub use tape::Tape;
pub use two_phase::Draw;
