//! Link settings that tch's build script applies only to tch's own targets.
//!
//! * RUNPATH to the libtorch folder, so that our cdylib, tests and examples find
//!   libtorch without LD_LIBRARY_PATH; `PERTURBATIONS_RPATH`, when set, replaces it (the
//!   Python package's build sets `$ORIGIN/../torch/lib`: the bundled library finds the
//!   libtorch of the torch installed beside it, wherever the environment is).
//! * libtorch_cuda NOT linked: torch-sys asks for it, and the default `--as-needed` drops
//!   it (nothing refers to its symbols). The library loads it at run time when CUDA is
//!   needed (src/cuda_libraries.rs), so that CPU-only processes do not map it.
//! * A SONAME with the ABI version on the cdylib: the major, and before 1.0 the minor too
//!   (`libperturbations.so.0.1`: 0.1 and 0.2 are incompatible, cargo-c's rule), so that
//!   applications record it instead of the absolute path of the build tree, and two
//!   incompatible versions can be installed side by side (`make build` links
//!   `libperturbations.so.0.1` to the build's `libperturbations.so`, as an install does).
//! * Only `pert_*` exported from the cdylib: rustc exports every `#[no_mangle]` function
//!   of every dependency (torch-sys's `tch_*_stream_*`, bzip2's `bz_internal_error`), which
//!   could collide with other libraries in the host process. A second version script does
//!   not help (ld merges it with rustc's, whose globals win), so the archives of the
//!   dependencies are kept out of the dynamic symbol table with `--exclude-libs,ALL`; our
//!   own crate is linked as object files, so its `pert_*` functions stay exported.
//!
//! * The C++ shim of src/cuda_stream_shim.cpp (libtorch's current CUDA stream with its
//!   C++ exceptions caught), compiled into the crate.
//!
//! This script never writes into the source tree.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda_stream_shim.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(true)
        .flag_if_supported("-Wextra")
        .file("src/cuda_stream_shim.cpp")
        .compile("perturbations_cuda_stream_shim");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report the libtorch lib folder (DEP_TCH_LIBTORCH_LIB)");
    println!("cargo:rerun-if-env-changed=PERTURBATIONS_RPATH");
    let rpath = match std::env::var("PERTURBATIONS_RPATH") {
        Ok(chosen) if !chosen.is_empty() => chosen,
        _ => lib,
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{rpath}");
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the version");
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").expect("cargo sets the version");
    let abi = if major == "0" {
        format!("0.{minor}")
    } else {
        major
    };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libperturbations.so.{abi}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs,ALL");
}
