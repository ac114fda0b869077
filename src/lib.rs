//! Differentiable perturbed optimizers (Berthet et al., "Learning with Differentiable
//! Perturbed Optimizers", NeurIPS 2020) on libtorch.
//!
//! A black-box [`Solver`] y*(θ) becomes the smooth y_σ(θ) = E[y*(θ + σZ)], estimated from
//! N perturbed samples, with a Monte-Carlo Jacobian kept on a [`Tape`]. The safe API here
//! knows nothing of C; the C API (`pert_*`, see `include/perturbations.h`) is a thin layer
//! in [`ffi`].

pub mod autograd;
mod blocks;
pub mod builtin;
pub mod config;
pub mod device;
pub mod error;
pub mod estimator;
pub mod fastmath;
pub mod fenchel_young;
pub mod ffi;
pub mod fused_argmax;
mod input;
pub mod noise;
pub mod op;
pub mod perturbation;
mod replay;
pub mod rng;
pub mod shape;
pub mod solver;
pub mod tape;
pub mod two_phase;

pub use builtin::Builtin;
pub use config::Config;
pub use device::{cuda_device_count, DeviceSpec};
pub use error::{Error, Result, Status};
pub use estimator::Baseline;
pub use fenchel_young::Sense;
pub use noise::Noise;
pub use op::PerturbedOp;
pub use perturbation::Perturbation;
pub use solver::Solver;
pub use tape::Tape;
pub use two_phase::Draw;
