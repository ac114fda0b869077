//! The layering of `src/`: every module uses only modules declared before it in `lib.rs`
//! (the leaves first, the C layer last), and the files of one folder use each other
//! without a cycle. A module's uses are the `crate::` and `super::` paths of its code
//! (comments and `#[cfg(test)]` parts left out).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules in their order in lib.rs.
fn layer_order() -> Vec<String> {
    std::fs::read_to_string(src().join("lib.rs"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .collect()
}

/// The crate-root re-exports of lib.rs (`pub use config::Config;`, `pub use a::{B, C};`):
/// each name with the module it comes from, so that a use of `crate::Config` counts as a
/// use of `config`.
fn reexports() -> BTreeMap<String, Vec<String>> {
    let lib = library_code(&std::fs::read_to_string(src().join("lib.rs")).unwrap());
    let mut map = BTreeMap::new();
    for statement in lib.split(';') {
        let Some(rest) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        for mut path in path_tree(rest) {
            let name = path.pop().unwrap();
            map.insert(name, path);
        }
    }
    map
}

/// Every source file with its module path (`["pipeline", "host"]`; a folder's mod.rs is
/// the folder's module).
fn files() -> Vec<(Vec<String>, PathBuf)> {
    fn walk(dir: &Path, prefix: Vec<String>, out: &mut Vec<(Vec<String>, PathBuf)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let mut module = prefix.clone();
            if path.is_dir() {
                module.push(name);
                walk(&path, module, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                if name != "mod" && name != "lib" {
                    module.push(name);
                }
                out.push((module, path));
            }
        }
    }
    let mut out = Vec::new();
    walk(&src(), Vec::new(), &mut out);
    out
}

/// The library code of a file: its text up to its tests module (`#[cfg(test)]` then
/// `mod`, last in a file by convention; other `#[cfg(test)]` items are code too), with
/// comments removed (a `//` inside a string literal is kept).
fn library_code(text: &str) -> String {
    let code = text.split("\n#[cfg(test)]\nmod ").next().unwrap();
    code.lines()
        .map(|line| {
            let mut in_string = false;
            let bytes = line.as_bytes();
            for i in 0..bytes.len() {
                match bytes[i] {
                    b'"' if i == 0 || bytes[i - 1] != b'\\' => in_string = !in_string,
                    b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
                    _ => {}
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths of a path tree starting at `text` (after `crate::` or `super::`): `a::b`,
/// `a::{b, c::{d, e}}` (over lines too), each as its segments.
fn path_tree(text: &str) -> Vec<Vec<String>> {
    fn tree(chars: &[char], at: &mut usize) -> Vec<Vec<String>> {
        let mut prefix = Vec::new();
        loop {
            while *at < chars.len() && chars[*at].is_whitespace() {
                *at += 1;
            }
            if chars.get(*at) == Some(&'{') {
                *at += 1;
                let mut all = Vec::new();
                loop {
                    // (an empty element: a trailing comma before `}`)
                    for mut sub in tree(chars, at).into_iter().filter(|p| !p.is_empty()) {
                        let mut path = prefix.clone();
                        path.append(&mut sub);
                        all.push(path);
                    }
                    while *at < chars.len() && chars[*at].is_whitespace() {
                        *at += 1;
                    }
                    match chars.get(*at) {
                        Some(',') => *at += 1,
                        Some('}') => {
                            *at += 1;
                            return all;
                        }
                        _ => return all,
                    }
                }
            }
            let start = *at;
            while *at < chars.len() && (chars[*at].is_alphanumeric() || chars[*at] == '_') {
                *at += 1;
            }
            if *at == start {
                return vec![prefix];
            }
            prefix.push(chars[start..*at].iter().collect());
            if chars[*at..].starts_with(&[':', ':']) {
                *at += 2;
            } else {
                return vec![prefix];
            }
        }
    }
    let chars: Vec<char> = text.chars().collect();
    tree(&chars, &mut 0)
}

/// The module paths that the code of `file` (module `module`) refers to, through
/// `crate::` and any number of `super::`.
fn uses(module: &[String], file: &Path) -> BTreeSet<Vec<String>> {
    uses_in(module, &std::fs::read_to_string(file).unwrap())
}

/// The module paths that the code `text` of module `module` refers to.
fn uses_in(module: &[String], text: &str) -> BTreeSet<Vec<String>> {
    let code = library_code(text);
    let mut found = BTreeSet::new();
    let mut starts: Vec<(usize, &str)> = code.match_indices("crate::").collect();
    starts.extend(
        code.match_indices("super::")
            .filter(|(i, _)| !code[..*i].ends_with("super::")),
    );
    for (start, _) in starts {
        if code[..start].ends_with("pub(") || code[..start].ends_with("pub(in ") {
            continue; // pub(crate), pub(super)
        }
        let before = code[..start].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` in a macro, or part of a longer name
        }
        let (mut resolved, rest) = if code[start..].starts_with("crate::") {
            (Vec::new(), &code[start + "crate::".len()..])
        } else {
            // each super:: goes one module up (from a file `a/b.rs` to `a`, from `a/mod.rs`
            // to the crate root)
            let mut m = module.to_vec();
            let mut rest = &code[start..];
            while let Some(r) = rest.strip_prefix("super::") {
                m.pop();
                rest = r;
            }
            (m, rest)
        };
        let base = std::mem::take(&mut resolved);
        for path in path_tree(rest) {
            let mut full = base.clone();
            full.extend(path.into_iter().filter(|s| !s.is_empty() && s != "self"));
            found.insert(full);
        }
    }
    found
}

#[test]
fn modules_use_only_the_layers_below_them_and_no_cycle() {
    let order = layer_order();
    assert!(order.len() > 10, "lib.rs lists the modules: {order:?}");
    let rank = |m: &str| order.iter().position(|o| o == m);
    let files = files();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(m, _)| m.clone()).collect();
    let reexported = reexports();
    assert!(
        reexported.contains_key("Config") && reexported.contains_key("PerturbedOp"),
        "lib.rs re-exports: {reexported:?}"
    );
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (module, file) in &files {
        let Some(top) = module.first() else { continue }; // lib.rs
        let own = rank(top).unwrap_or_else(|| panic!("{top} is not declared in lib.rs"));
        for mut used in uses(module, file) {
            // a path through a crate-root re-export: the module the item comes from
            if let Some(origin) = used.first().and_then(|name| reexported.get(name)) {
                used.splice(0..1, origin.iter().cloned());
            }
            // the longest prefix that is a module of this crate
            let target = (1..=used.len())
                .rev()
                .map(|k| used[..k].to_vec())
                .find(|m| modules.contains(m));
            let Some(target) = target else { continue };
            let other = rank(&target[0]).unwrap();
            if other > own {
                wrong.push(format!("{} uses {}", module.join("::"), target.join("::")));
            } else if other == own && &target != module {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "uses of a higher layer:\n{}",
        wrong.join("\n")
    );
    // within a folder: no cycle (depth-first search)
    fn visit(
        m: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<String>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => panic!("import cycle: {} -> {}", stack.join(" -> "), m.join("::")),
            _ => {}
        }
        state.insert(m.clone(), 1);
        stack.push(m.join("::"));
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, state, stack);
        }
        stack.pop();
        state.insert(m.clone(), 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        visit(m, &graph, &mut state, &mut Vec::new());
    }
    println!(
        "{} files, {} layers, {} uses within folders checked",
        files.len(),
        order.len(),
        graph.values().map(BTreeSet::len).sum::<usize>()
    );
}

/// No source file over 600 lines outside its tests.
#[test]
fn no_file_is_over_600_lines_of_code() {
    for (_, file) in files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("\n#[cfg(test)]\nmod ").next().unwrap();
        let lines = code.lines().count();
        assert!(lines <= 600, "{} has {lines} lines", file.display());
    }
}

/// The parser sees every form a use takes: braces (nested, over lines), `super::super::`,
/// paths in code, a test-only item before the tests module; and skips comments,
/// `pub(crate)` and the tests module.
#[test]
fn the_use_parser_sees_every_form() {
    let module = |m: &str| m.split("::").map(str::to_string).collect::<Vec<_>>();
    let text = "use crate::{tape::Tape, a::{b, c::D}};\n\
                use crate::{\n    noise::Noise,\n    rng::{self, Stream},\n};\n\
                fn f(_: &super::super::pipeline::OpSpec) {}\n\
                pub(crate) fn g() -> crate::Config { todo!() } // crate::not_this\n\
                const URL: &str = \"http://x\"; fn h() { crate::op::run() }\n\
                #[cfg(test)]\nfn only_for_tests() { crate::intraop::cap(0); }\n\
                fn after() { crate::tensors::copy(); }\n\
                #[cfg(test)]\nmod tests { use crate::ffi::x; }\n";
    let found = uses_in(&module("estimate::kept"), text);
    let expect = [
        "tape::Tape",
        "a::b",
        "a::c::D",
        "noise::Noise",
        "rng",
        "rng::Stream",
        "pipeline::OpSpec",
        "Config",
        "op::run",
        "intraop::cap",
        "tensors::copy",
    ];
    for e in expect {
        assert!(found.contains(&module(e)), "{e} not found in {found:?}");
    }
    assert!(
        !found.iter().any(|p| p.contains(&"not_this".to_string())),
        "{found:?}"
    );
    assert!(
        !found.iter().any(|p| p.first().is_some_and(|s| s == "ffi")),
        "{found:?}"
    );
    assert_eq!(found.len(), expect.len(), "{found:?}");
}
