//! The checked-in header must equal what cbindgen generates from the sources now.
//! `PERT_UPDATE_HEADER=1 cargo test --test header` (or `make header`) rewrites it.

use std::path::PathBuf;

/// cbindgen's own `// ...` comments after `#endif` and the closing brace of `extern "C"`
/// as `/* ... */`: C89 has no line comments (`gcc -std=c89 -pedantic` warns at each).
fn c89_comments(header: &str) -> String {
    header
        .lines()
        .map(|line| match line.split_once("//") {
            Some((code, comment)) if line.starts_with("#endif") || line.starts_with('}') => {
                format!("{code}/* {} */", comment.trim())
            }
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn header_is_up_to_date() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let generated = c89_comments(&String::from_utf8(generated).unwrap());
    let path = root.join("include/perturbations.h");
    if std::env::var_os("PERT_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/perturbations.h is stale: run `make header` and commit the result"
    );
}

#[test]
fn version_macros_match_cargo_toml() {
    use perturbations::ffi::status::{PERT_VERSION_MAJOR, PERT_VERSION_MINOR, PERT_VERSION_PATCH};
    let v = [
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH"),
    ];
    let v: Vec<u32> = v.iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(
        v,
        [PERT_VERSION_MAJOR, PERT_VERSION_MINOR, PERT_VERSION_PATCH]
    );
    let runtime = unsafe { std::ffi::CStr::from_ptr(perturbations::ffi::status::pert_version()) };
    assert_eq!(runtime.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}
