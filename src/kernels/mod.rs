//! Kernels: the work done per sample and per block, on host buffers or tensors, with no
//! knowledge of ops or tapes: the block scheduler that shares work among threads, the sums
//! of a problem's samples, the built-in solvers and their selection of a row's largest
//! entries, the fused argmax kernel, and the persistent worker threads of ops whose
//! solvers keep state per thread.

pub(crate) mod blocks;
pub mod builtin;
pub(crate) mod fused_argmax;
pub(crate) mod largest;
pub(crate) mod listed;
pub(crate) mod nonzero;
mod row_vectors;
pub(crate) mod sums;
pub(crate) mod two_stages;
pub(crate) mod workers;
