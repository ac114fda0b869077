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
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut map = BTreeMap::new();
    for line in lib.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end_matches(';');
        let (module, names) = match path.split_once("::{") {
            Some((module, names)) => (module, names.trim_end_matches('}').to_string()),
            None => {
                let (module, name) = path.rsplit_once("::").unwrap();
                (module, name.to_string())
            }
        };
        let module: Vec<String> = module.split("::").map(str::to_string).collect();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            map.insert(name.to_string(), module.clone());
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

/// The module paths that the code of `file` (module `module`) refers to.
fn uses(module: &[String], file: &Path) -> BTreeSet<Vec<String>> {
    let text = std::fs::read_to_string(file).unwrap();
    let code = text.split("\n#[cfg(test)]").next().unwrap();
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let line = line.split("//").next().unwrap();
        for (start, _) in line
            .match_indices("crate::")
            .chain(line.match_indices("super::"))
        {
            if line[..start].ends_with("pub(") {
                continue; // pub(crate)
            }
            let path: Vec<String> = line[start..]
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap()
                .split("::")
                .map(str::to_string)
                .collect();
            let mut resolved = match path[0].as_str() {
                "crate" => Vec::new(),
                _ => {
                    // super:: from a file module is its parent folder's module
                    let mut m = module.to_vec();
                    m.pop();
                    m
                }
            };
            resolved.extend(path[1..].iter().filter(|s| !s.is_empty()).cloned());
            found.insert(resolved);
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
        let code = text.split("\n#[cfg(test)]").next().unwrap();
        let lines = code.lines().count();
        assert!(lines <= 600, "{} has {lines} lines", file.display());
    }
}
