//! The C API: a thin layer over the safe Rust API that checks pointers, converts buffers,
//! catches panics and maps errors to `pert_status` codes. Every exported function's body
//! runs inside [`boundary::guard`] (or [`boundary::guard_or`] where it cannot fail), so
//! nothing unwinds into C.
//!
//! Names: C name = Rust name = symbol, prefix `pert_`.

#![allow(non_camel_case_types)]

pub mod boundary;
pub mod config;
pub mod draw;
pub mod op;
pub mod status;
pub mod tape;

pub use config::pert_config;
pub use draw::pert_draw;
pub use op::pert_op;
pub use status::pert_status;
pub use tape::pert_tape;
