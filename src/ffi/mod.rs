//! The C API: a thin layer over the safe Rust API that checks pointers, converts buffers,
//! catches panics and maps errors to `pert_status` codes. Every exported function's body
//! runs inside `boundary::guard` (or `boundary::guard_or` where it cannot fail), so
//! nothing unwinds into C.
//!
//! Names: C name = Rust name = symbol, prefix `pert_`.

#![allow(non_camel_case_types)]
// Each exported function's safety contract is its C contract, documented on it (pointers
// valid for the documented sizes, handles from this library, not used after their _free).
#![allow(clippy::missing_safety_doc)]

pub mod boundary;
pub mod config;
pub mod draw;
pub mod free_hook;
mod handle;
pub mod imle;
pub mod methods;
pub mod op;
pub mod pool;
pub mod solver;
pub mod status;
pub mod tape;

pub use config::pert_config;
pub use draw::pert_draw;
pub use op::pert_op;
pub use pool::pert_pool;
pub use status::pert_status;
pub use tape::pert_tape;
