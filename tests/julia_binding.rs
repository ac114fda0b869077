//! Julia cannot be installed here, so the Julia binding is checked statically: every .jl
//! file under bindings/julia parses without a syntax error (tree-sitter-julia), and every
//! `@ccall` names a function of include/perturbations.h with the right number of arguments
//! and Julia types that match the C types; every C function is wrapped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tree_sitter::{Node, Parser};

/// A C prototype: return type and parameter types, normalized ("const" dropped, no spaces).
#[derive(Debug, Clone, PartialEq)]
struct Prototype {
    ret: String,
    params: Vec<String>,
}

/// The prototypes of the `pert_*` functions of a C header.
fn prototypes(header: &str) -> BTreeMap<String, Prototype> {
    // drop comments and preprocessor lines, then read `ret name(params);` declarations
    let mut text = String::new();
    let mut rest = header;
    while let Some(start) = rest.find("/*") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    text.push_str(rest);
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ")
        .replace("extern \"C\" {", ";")
        .replace('}', ";");
    let mut out = BTreeMap::new();
    for decl in code.split(';') {
        let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
        if decl.starts_with("typedef") {
            continue;
        }
        let Some(open) = decl.find('(') else { continue };
        let head = &decl[..open];
        let Some(name) = head.split([' ', '*']).rfind(|s| !s.is_empty()) else {
            continue;
        };
        if !name.starts_with("pert_") {
            continue;
        }
        let ret = normalize(&head[..head.len() - name.len()]);
        let inner = decl[open + 1..decl.rfind(')').unwrap_or(decl.len())].trim();
        let params = if inner == "void" || inner.is_empty() {
            Vec::new()
        } else {
            inner
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    // drop the parameter's name (the last identifier)
                    let cut = p.rfind([' ', '*']).map_or(0, |i| i + 1);
                    normalize(&p[..cut])
                })
                .collect()
        };
        out.insert(name.to_string(), Prototype { ret, params });
    }
    out
}

fn normalize(c_type: &str) -> String {
    c_type
        .replace("const", " ")
        .replace("struct ", " ")
        .split_whitespace()
        .collect::<String>()
}

/// The Julia types accepted for a C type.
fn julia_types(c_type: &str) -> &'static [&'static str] {
    match c_type {
        "pert_status" | "uint32_t" => &["UInt32", "Cuint"],
        "int32_t" => &["Int32", "Cint"],
        "size_t" => &["Csize_t", "UInt"],
        "uint64_t" => &["UInt64", "Culonglong"],
        "int64_t" => &["Int64", "Clonglong"],
        "double" => &["Cdouble", "Float64"],
        "float" => &["Cfloat", "Float32"],
        "bool" => &["Bool"],
        "void" => &["Cvoid", "Nothing"],
        "char*" => &["Cstring", "Ptr{Cchar}", "Ptr{UInt8}"],
        "float*" => &["Ptr{Float32}", "Ptr{Cfloat}"],
        "int64_t*" => &["Ptr{Int64}", "Ptr{Clonglong}"],
        "uint64_t*" => &["Ref{UInt64}", "Ptr{UInt64}"],
        "uint32_t*" => &["Ref{UInt32}", "Ptr{UInt32}"],
        "size_t*" => &["Ref{Csize_t}", "Ptr{Csize_t}"],
        "void*"
        | "pert_solver_fn"
        | "pert_solver_ex"
        | "pert_worker_init"
        | "pert_worker_fini"
        | "pert_free_hook"
        | "pert_pool_best_fn"
        | "pert_device_solver_fn" => &["Ptr{Cvoid}"],
        // the one struct passed by value or by pointer: the binding's isbits mirror of it
        "pert_aimle_state" => &["AimleState"],
        "pert_aimle_state*" => &["Ref{AimleState}", "Ptr{AimleState}"],
        t if t.starts_with("pert_") && t.ends_with("**") => &["Ref{Ptr{Cvoid}}", "Ptr{Ptr{Cvoid}}"],
        t if t.starts_with("pert_") && t.ends_with('*') => &["Ptr{Cvoid}"],
        _ => &[],
    }
}

/// One `@ccall lib.name(args::T...)::R` of a Julia file.
#[derive(Debug)]
struct CCall {
    line: usize,
    name: String,
    args: Vec<Option<String>>,
    ret: Option<String>,
}

fn text<'a>(node: Node, src: &'a str) -> &'a str {
    &src[node.byte_range()]
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect()
}

fn collect_ccalls(node: Node, src: &str, out: &mut Vec<CCall>) {
    if node.kind() == "macrocall_expression" && text(node, src).starts_with("@ccall") {
        if let Some(call) = find_ccall(node, src) {
            out.push(call);
        } else {
            out.push(CCall {
                line: node.start_position().row + 1,
                name: String::new(),
                args: vec![],
                ret: None,
            });
        }
        return;
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        collect_ccalls(child, src, out);
    }
}

/// The `lib.name(args)::R` under an `@ccall` node.
fn find_ccall(macro_node: Node, src: &str) -> Option<CCall> {
    let mut stack = vec![macro_node];
    while let Some(node) = stack.pop() {
        if node.kind() == "typed_expression" {
            let call = node.named_child(0)?;
            if call.kind() == "call_expression"
                && call.named_child(0).map(|f| f.kind()) == Some("field_expression")
            {
                let field = call.named_child(0)?;
                let name = text(field.named_child(field.named_child_count() - 1)?, src).to_string();
                let ret = node
                    .named_child(node.named_child_count() - 1)
                    .map(|r| squash(text(r, src)));
                let list = call.named_child(1)?;
                let mut args = Vec::new();
                let mut cursor = list.walk();
                for arg in list.named_children(&mut cursor) {
                    args.push(
                        (arg.kind() == "typed_expression")
                            .then(|| {
                                arg.named_child(arg.named_child_count() - 1)
                                    .map(|t| squash(text(t, src)))
                            })
                            .flatten(),
                    );
                }
                return Some(CCall {
                    line: macro_node.start_position().row + 1,
                    name,
                    args,
                    ret,
                });
            }
        }
        let mut cursor = node.walk();
        stack.extend(node.children(&mut cursor));
    }
    None
}

fn first_error(node: Node) -> Option<Node> {
    if node.is_error() || node.is_missing() {
        return Some(node);
    }
    let mut cursor = node.walk();
    let children: Vec<_> = node.children(&mut cursor).collect();
    children.into_iter().find_map(first_error)
}

/// Problems of one Julia source against the header's prototypes; adds the wrapped names.
fn check_source(
    file: &str,
    src: &str,
    protos: &BTreeMap<String, Prototype>,
    wrapped: &mut Vec<String>,
) -> Vec<String> {
    let mut parser = Parser::new();
    parser
        .set_language(&tree_sitter_julia::LANGUAGE.into())
        .expect("tree-sitter-julia loads");
    let tree = parser.parse(src, None).expect("parse");
    let mut problems = Vec::new();
    if let Some(bad) = first_error(tree.root_node()) {
        let p = bad.start_position();
        problems.push(format!(
            "{file}:{}:{}: syntax error near `{}`",
            p.row + 1,
            p.column + 1,
            text(bad, src).chars().take(40).collect::<String>()
        ));
        return problems;
    }
    let mut calls = Vec::new();
    collect_ccalls(tree.root_node(), src, &mut calls);
    for call in calls {
        let at = format!("{file}:{}", call.line);
        let Some(proto) = protos.get(&call.name) else {
            problems.push(format!(
                "{at}: @ccall of `{}`, which is not a function of include/perturbations.h",
                call.name
            ));
            continue;
        };
        wrapped.push(call.name.clone());
        if call.args.len() != proto.params.len() {
            problems.push(format!(
                "{at}: {} takes {} arguments, the @ccall passes {}",
                call.name,
                proto.params.len(),
                call.args.len()
            ));
            continue;
        }
        for (i, (arg, c_type)) in call.args.iter().zip(&proto.params).enumerate() {
            match arg {
                None => problems.push(format!("{at}: argument {} of {} has no ::Type annotation", i + 1, call.name)),
                Some(t) if !julia_types(c_type).contains(&t.as_str()) => problems.push(format!(
                    "{at}: argument {} of {} is `{t}`, which does not match C `{c_type}` (expected one of {:?})",
                    i + 1,
                    call.name,
                    julia_types(c_type)
                )),
                _ => {}
            }
        }
        match &call.ret {
            Some(r) if julia_types(&proto.ret).contains(&r.as_str()) => {}
            r => problems.push(format!(
                "{at}: {} returns C `{}`, the @ccall says {:?}",
                call.name, proto.ret, r
            )),
        }
    }
    problems
}

fn julia_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            julia_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "jl") {
            out.push(path);
        }
    }
}

fn header_prototypes() -> BTreeMap<String, Prototype> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    prototypes(&std::fs::read_to_string(root.join("include/perturbations.h")).unwrap())
}

/// C functions the Julia binding does not wrap yet, each with the reason (kept short:
/// every entry is work left to do).
const NOT_YET_IN_JULIA: &[(&str, &str)] = &[];

#[test]
fn the_julia_binding_parses_and_matches_the_header() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos = header_prototypes();
    assert!(
        protos.len() > 30,
        "header parsed to {} prototypes",
        protos.len()
    );
    let mut files = Vec::new();
    julia_files(&root.join("bindings/julia"), &mut files);
    assert!(files.len() >= 3, "found {files:?}");
    let mut wrapped = Vec::new();
    let mut problems = Vec::new();
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        problems.extend(check_source(
            &f.strip_prefix(root).unwrap().display().to_string(),
            &src,
            &protos,
            &mut wrapped,
        ));
    }
    for name in protos.keys() {
        if !wrapped.contains(name) && !NOT_YET_IN_JULIA.iter().any(|(n, _)| n == name) {
            problems.push(format!(
                "{name} of include/perturbations.h has no @ccall in the Julia binding"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "Julia binding problems:\n{}",
        problems.join("\n")
    );
    eprintln!(
        "{} files, {} @ccalls checked against {} C functions",
        files.len(),
        wrapped.len(),
        protos.len()
    );
}

#[test]
fn header_prototypes_are_read_correctly() {
    let protos = header_prototypes();
    assert_eq!(
        protos["pert_forward"],
        Prototype {
            ret: "pert_status".into(),
            params: vec![
                "pert_op*".into(),
                "float*".into(),
                "size_t".into(),
                "float*".into(),
                "pert_tape**".into()
            ]
        }
    );
    assert_eq!(
        protos["pert_version"],
        Prototype {
            ret: "char*".into(),
            params: vec![]
        }
    );
    assert_eq!(protos["pert_op_free"].ret, "void");
}

/// The checker must catch planted mismatches.
#[test]
fn planted_mismatches_are_reported() {
    let protos = header_prototypes();
    let check = |src: &str| check_source("planted.jl", src, &protos, &mut Vec::new());
    let good = "f(t) = @ccall lib.pert_tape_batch(t::Ptr{Cvoid})::Csize_t\n";
    assert!(check(good).is_empty(), "{:?}", check(good));
    let cases = [
        (
            "f(t) = @ccall lib.pert_tape_batch(t::Ptr{Cvoid}, 1::Cint)::Csize_t\n",
            "takes 1 arguments",
        ),
        (
            "f(t) = @ccall lib.pert_tape_batch(t::Ptr{Float32})::Csize_t\n",
            "does not match C `pert_tape*`",
        ),
        (
            "f(c) = @ccall lib.pert_config_set_seed(c::Ptr{Cvoid}, 1::Int32)::UInt32\n",
            "does not match C `uint64_t`",
        ),
        (
            "f(c) = @ccall lib.pert_config_set_sigma(c::Ptr{Cvoid}, 1.0::Float32)::UInt32\n",
            "does not match C `double`",
        ),
        (
            "f(t) = @ccall lib.pert_tape_batch(t::Ptr{Cvoid})::Int32\n",
            "returns C `size_t`",
        ),
        (
            "f(t) = @ccall lib.pert_tape_batchh(t::Ptr{Cvoid})::Csize_t\n",
            "not a function",
        ),
        (
            "f(t) = @ccall lib.pert_tape_batch(t)::Csize_t\n",
            "no ::Type annotation",
        ),
        ("function f(t)\n    x = (1, 2\nend\n", "syntax error"),
    ];
    for (src, expected) in cases {
        let problems = check(src);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{src:?} gave {problems:?}, expected {expected:?}"
        );
    }
}

/// The binding's source, parsed.
fn binding_source() -> (String, tree_sitter::Tree) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src =
        std::fs::read_to_string(root.join("bindings/julia/Perturbations/src/Perturbations.jl"))
            .unwrap();
    let mut parser = Parser::new();
    parser
        .set_language(&tree_sitter_julia::LANGUAGE.into())
        .expect("tree-sitter-julia loads");
    let tree = parser.parse(&src, None).expect("parse");
    (src, tree)
}

/// Nodes of `kind` whose text starts with `prefix`.
fn nodes<'t>(node: Node<'t>, src: &str, kind: &str, prefix: &str, out: &mut Vec<Node<'t>>) {
    if node.kind() == kind && text(node, src).starts_with(prefix) {
        out.push(node);
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        nodes(child, src, kind, prefix, out);
    }
}

/// The name of the function definition enclosing `node`, if any.
fn enclosing_function<'s>(mut node: Node, src: &'s str) -> Option<&'s str> {
    while let Some(parent) = node.parent() {
        if parent.kind() == "function_definition" {
            let signature = text(parent, src)
                .trim_start_matches("function")
                .trim_start();
            return signature.split(['(', ' ']).next();
        }
        node = parent;
    }
    None
}

/// The library is found at load time, never frozen at precompile time: no `const` is
/// computed from ENV, `__init__` assigns the global the @ccalls name and checks the
/// library's major.minor against the package's.
#[test]
fn the_julia_library_is_resolved_at_load_time_and_version_checked() {
    let (src, tree) = binding_source();
    for line in src.lines() {
        let code = line.split('#').next().unwrap();
        assert!(
            !(code.trim_start().starts_with("const") && code.contains("ENV")),
            "a const computed from ENV is frozen at precompile time: {line}"
        );
    }
    let mut inits = Vec::new();
    nodes(
        tree.root_node(),
        &src,
        "function_definition",
        "function __init__",
        &mut inits,
    );
    assert_eq!(inits.len(), 1, "one __init__");
    let init = text(inits[0], &src);
    assert!(
        init.contains("global libperturbations = find_library()"),
        "{init}"
    );
    assert!(
        init.contains("LIBRARY_VERSION") && init.contains("version()"),
        "{init}"
    );
    assert!(
        src.contains("Libdl.dlext"),
        "the library's extension comes from Libdl.dlext"
    );
    assert!(
        !src.contains("\nconst libperturbations"),
        "the library path is a global assigned at load time"
    );
}

/// Every `unsafe_wrap` of memory that a handle owns sits inside `GC.@preserve` (else the
/// finalizer may free it mid-copy); the trampolines' wraps are of the callback's own
/// arguments, valid for the call.
#[test]
fn julia_pointers_into_handles_are_preserved() {
    let (src, tree) = binding_source();
    let mut wraps = Vec::new();
    nodes(
        tree.root_node(),
        &src,
        "call_expression",
        "unsafe_wrap",
        &mut wraps,
    );
    assert!(wraps.len() >= 3, "found {} unsafe_wrap calls", wraps.len());
    for wrap in wraps {
        if matches!(
            enclosing_function(wrap, &src),
            Some("trampoline" | "trampoline_ex")
        ) {
            continue;
        }
        let mut preserved = false;
        let mut node = wrap;
        while let Some(parent) = node.parent() {
            if parent.kind() == "macrocall_expression"
                && text(parent, &src).starts_with("GC.@preserve")
            {
                preserved = true;
            }
            node = parent;
        }
        assert!(
            preserved,
            "line {}: `{}` is not inside GC.@preserve",
            wrap.start_position().row + 1,
            text(wrap, &src)
        );
    }
}

/// Handles cannot be copied, can be freed early (close / free!, do-block forms), ops take
/// a lock per call, the rrules handle zero cotangents and project onto the input's type,
/// the Fenchel-Young rrule gives y_true's tangent, and forward has an frule.
#[test]
fn julia_handles_and_rules_are_complete() {
    let (src, tree) = binding_source();
    assert!(src.contains("const Handle = Union{Config, Op, Tape, Draw, ImleRecord, Pool}"));
    assert!(src.contains("Base.deepcopy_internal(x::Handle, ::IdDict)"));
    assert!(src.contains("Base.close(x::Handle) = free!(x)"));
    assert!(src.contains("export") && src.contains("free!"));
    assert!(src.contains("function forward_with_tape(f::Function, op::Op"));
    assert!(src.contains("function Draw(f::Function, op::Op"));
    let mut calls = Vec::new();
    nodes(
        tree.root_node(),
        &src,
        "function_definition",
        "function call(f, op::Op)",
        &mut calls,
    );
    assert_eq!(calls.len(), 1);
    assert!(text(calls[0], &src).contains("lock(op.lock)"));
    let mut rules = Vec::new();
    nodes(
        tree.root_node(),
        &src,
        "function_definition",
        "function ChainRulesCore.rrule",
        &mut rules,
    );
    assert_eq!(
        rules.len(),
        13,
        "rrules of forward, fenchel_young, spo_plus, perturbation_gradient, blackbox, negative_identity, imle, aimle, nce, cmap and the three LTR losses"
    );
    for rule in &rules {
        let body = text(*rule, &src);
        // the losses' rules share loss_pullback, which handles the zero tangent
        assert!(
            (body.contains("AbstractZero") || body.contains("loss_pullback("))
                && body.contains("ProjectTo"),
            "{body}"
        );
    }
    let mut helper = Vec::new();
    nodes(
        tree.root_node(),
        &src,
        "function_definition",
        "function loss_pullback(",
        &mut helper,
    );
    assert_eq!(helper.len(), 1);
    assert!(text(helper[0], &src).contains("AbstractZero"));
    assert!(text(helper[0], &src).contains("@not_implemented"));
    assert!(
        text(rules[1], &src).contains("project_y("),
        "y_true's tangent"
    );
    let mut frules = Vec::new();
    nodes(
        tree.root_node(),
        &src,
        "function_definition",
        "function ChainRulesCore.frule",
        &mut frules,
    );
    assert_eq!(frules.len(), 1);
    assert!(text(frules[0], &src).contains("jvp(tape"));
    assert!(src.contains("set!(c::Config, ::Val{:device}, v::Symbol)"));
}

/// The examples have their own environment (they use Zygote, which only the package's test
/// target has).
#[test]
fn julia_examples_have_their_own_project() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("bindings/julia/examples");
    let project =
        std::fs::read_to_string(root.join("Project.toml")).expect("examples/Project.toml");
    for file in std::fs::read_dir(&root).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|e| e == "jl") {
            let src = std::fs::read_to_string(&path).unwrap();
            for line in src.lines().filter(|l| l.starts_with("using ")) {
                for package in line["using ".len()..].split(',').map(str::trim) {
                    if package == "Random" || package == "LinearAlgebra" {
                        assert!(
                            project.contains(package),
                            "{package} (stdlib) in examples/Project.toml"
                        );
                    } else {
                        assert!(
                            project.contains(&format!("{package} = ")),
                            "{}: {package} missing from examples/Project.toml",
                            path.display()
                        );
                    }
                }
            }
        }
    }
}

/// The Julia `CSolveInfo` (inside the `SolveInfo` a solver gets) has the fields of C
/// `pert_solve_info`, in order, with the same
/// types, and the callbacks handed to the library have the C typedefs' signatures.
#[test]
fn julia_solve_info_and_callbacks_match_the_header() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/perturbations.h")).unwrap();
    let start = header
        .find("typedef struct pert_solve_info {")
        .expect("the C struct");
    let body = &header[start..start + header[start..].find("} pert_solve_info;").unwrap()];
    // the comments out, then `type name;` declarations after the opening brace
    let mut code = String::new();
    let mut rest = &body[body.find('{').unwrap() + 1..];
    while let Some(open) = rest.find("/*") {
        code.push_str(&rest[..open]);
        rest = &rest[open + rest[open..].find("*/").unwrap() + 2..];
    }
    code.push_str(rest);
    let c_fields: Vec<(String, String)> = code
        .split(';')
        .filter_map(|decl| {
            // `type name` or `const type *name`: the name last, its stars to the type
            let words: Vec<&str> = decl.split_whitespace().collect();
            let (last, ty) = words.split_last()?;
            let stars = last.chars().take_while(|&c| c == '*').count();
            let name = last.trim_start_matches('*').to_string();
            Some((name, normalize(&(ty.join(" ") + &"*".repeat(stars)))))
        })
        .collect();
    let (src, _) = binding_source();
    let start = src.find("struct CSolveInfo\n").expect("the Julia struct");
    let end = start + src[start..].find("\nend").unwrap();
    let julia_fields: Vec<(String, String)> = src[start..end]
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().split_once("::"))
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(c_fields.len(), 10, "C fields: {c_fields:?}");
    assert_eq!(
        julia_fields.len(),
        c_fields.len(),
        "Julia fields: {julia_fields:?}"
    );
    for ((cn, ct), (jn, jt)) in c_fields.iter().zip(&julia_fields) {
        assert_eq!(cn, jn, "field order");
        assert!(
            julia_types(ct).contains(&jt.as_str()),
            "{cn}: C {ct} vs Julia {jt}"
        );
    }
    for expected in [
        "@cfunction(trampoline, Int32, (Ptr{Cvoid}, Ptr{Float32}, Csize_t, Ptr{Float32}))",
        "@cfunction(trampoline_ex, Int32, (Ptr{Cvoid}, Ptr{CSolveInfo}, Ptr{Float32}, Csize_t, Ptr{Float32}))",
        "@cfunction(init_trampoline, Int32, (Ptr{Cvoid}, UInt32))",
        "@cfunction(fini_trampoline, Cvoid, (Ptr{Cvoid}, UInt32))",
        "@cfunction(device_trampoline, Int32,\n        (Ptr{Cvoid}, Ptr{CSolveInfo}, Ptr{Float32}, Csize_t, Ptr{Float32}, Ptr{Cvoid}))",
    ] {
        assert!(src.contains(expected), "the binding lacks `{expected}`");
    }
    for typedef in [
        "typedef int32_t (*pert_solver_fn)(void *user_data, const float *inputs, size_t count, float *outputs);",
        "typedef int32_t (*pert_worker_init)(void *user_data, uint32_t worker);",
        "typedef void (*pert_worker_fini)(void *user_data, uint32_t worker);",
    ] {
        assert!(header.contains(typedef), "the header changed: `{typedef}`");
    }
    assert!(squash(&header).contains(&squash(
        "typedef int32_t (*pert_solver_ex)(void *user_data, const struct pert_solve_info *info, const float *inputs, size_t count, float *outputs);"
    )));
}

/// The raw `ccall`s through function pointers looked up at load time (the calls made in a
/// GC-safe region) have the types of the header's prototypes, like the @ccalls.
#[test]
fn julia_gc_safe_calls_match_the_header() {
    let protos = header_prototypes();
    let (src, _) = binding_source();
    let mut checked = 0;
    let mut rest = src.as_str();
    while let Some(at) = rest.find("fn = PERT_") {
        rest = &rest[at + "fn = ".len()..];
        let constant = &rest[..rest.find("[]").unwrap()];
        let c_name = constant.to_lowercase();
        let proto = protos
            .get(&c_name)
            .unwrap_or_else(|| panic!("{c_name} is not in the header"));
        assert!(
            src.contains(&format!("{constant}[] = Libdl.dlsym(handle, :{c_name})")),
            "{constant} is not looked up as :{c_name}"
        );
        let call = &rest[rest.find("ccall(fn, ").unwrap() + "ccall(fn, ".len()..];
        let ret = &call[..call.find(',').unwrap()];
        let types_start = call.find('(').unwrap();
        let mut depth = 0;
        let mut end = types_start;
        for (i, ch) in call[types_start..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = types_start + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let types: Vec<String> = call[types_start + 1..end]
            .split(',')
            .map(squash)
            .filter(|t| !t.is_empty())
            .collect();
        assert_eq!(
            types.len(),
            proto.params.len(),
            "{c_name}: {types:?} vs {:?}",
            proto.params
        );
        for (t, c) in types.iter().zip(&proto.params) {
            assert!(
                julia_types(c).contains(&t.as_str()),
                "{c_name}: {t} does not match C {c}"
            );
        }
        assert!(
            julia_types(&proto.ret).contains(&ret),
            "{c_name} returns C {}, ccall says {ret}",
            proto.ret
        );
        checked += 1;
    }
    // the pool-based losses' one caller, checked against each of their five prototypes
    let generic = &src[src.find("fn = which[]").expect("gc_safe_pool_loss")..];
    let call = &generic[generic.find("ccall(fn, ").unwrap() + "ccall(fn, ".len()..];
    let types_start = call.find('(').unwrap();
    let types: Vec<String> = call
        [types_start + 1..types_start + call[types_start..].find(')').unwrap()]
        .split(',')
        .map(squash)
        .filter(|t| !t.is_empty())
        .collect();
    for c_name in [
        "pert_nce",
        "pert_cmap",
        "pert_ltr_pointwise",
        "pert_ltr_pairwise",
        "pert_ltr_listwise",
    ] {
        let proto = &protos[c_name];
        let constant = c_name.to_uppercase();
        assert!(
            src.contains(&format!("{constant}[] = Libdl.dlsym(handle, :{c_name})")),
            "{constant} is not looked up as :{c_name}"
        );
        assert_eq!(types.len(), proto.params.len(), "{c_name}: {types:?}");
        for (t, c) in types.iter().zip(&proto.params) {
            assert!(
                julia_types(c).contains(&t.as_str()),
                "{c_name}: {t} does not match C {c}"
            );
        }
    }
    assert_eq!(
        checked, 10,
        "pert_forward, pert_fenchel_young, pert_op_solve, pert_op_free and the methods that solve \
         (pert_spo_plus, pert_blackbox_vjp, pert_perturbation_gradient, pert_imle_forward, \
         pert_imle_vjp, pert_aimle_vjp) are called GC-safe"
    );
}

/// The README's Julia blocks (checked statically, as the binding is: Julia cannot be
/// installed here): the install commands develop the package of this checkout, and the
/// example parses, uses only names the package exports (or Julia's own), and sets only
/// config keywords the package has a setter for (`set!(c, ::Val{:name}, ...)`). Argument
/// order and shapes are not checked (`julia-test` runs the package's own tests where Julia
/// is installed).
#[test]
fn the_readme_julia_blocks_match_the_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = |tag: &str| -> String {
        let marker = format!("<!-- readme-test: {tag} -->");
        let start = readme
            .find(&marker)
            .unwrap_or_else(|| panic!("README has {marker}"));
        let rest = &readme[start..];
        let open = rest.find("```").unwrap();
        let body = &rest[open..];
        let first = body.find('\n').unwrap() + 1;
        let end = body[first..].find("\n```").unwrap();
        body[first..first + end].to_string()
    };
    let install = block("julia install");
    let package = install
        .split("Pkg.develop(path=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("Pkg.develop(path=...)");
    assert!(
        root.join(package).join("Project.toml").is_file(),
        "{package} is the package"
    );
    assert!(install.contains("PERTURBATIONS_LIB=$PWD/target/release/libperturbations.so"));
    let example = block("julia example");
    let mut parser = Parser::new();
    parser
        .set_language(&tree_sitter_julia::LANGUAGE.into())
        .unwrap();
    let tree = parser.parse(&example, None).unwrap();
    assert!(
        first_error(tree.root_node()).is_none(),
        "the README's Julia example parses"
    );
    let (src, _) = binding_source();
    let exported: Vec<&str> = src
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .flat_map(|l| l.split(',').map(str::trim))
        .collect();
    let julia_own = ["Float32", "maximum", "dims", "Perturbations"];
    let mut calls = Vec::new();
    nodes(
        tree.root_node(),
        &example,
        "call_expression",
        "",
        &mut calls,
    );
    let mut names = Vec::new();
    nodes(tree.root_node(), &example, "identifier", "", &mut names);
    let used: std::collections::BTreeSet<&str> = names
        .iter()
        .map(|n| text(*n, &example))
        .filter(|n| {
            n.chars().next().is_some_and(char::is_uppercase)
                || calls
                    .iter()
                    .any(|c| text(*c, &example).starts_with(&format!("{n}(")))
        })
        .collect();
    for name in &used {
        assert!(
            exported.contains(name) || julia_own.contains(name),
            "the README's Julia example uses {name}, which the package does not export"
        );
    }
    for needed in ["Op", "Config", "forward_with_tape", "vjp"] {
        assert!(used.contains(needed), "{needed} in the example: {used:?}");
    }
    let config_call = example
        .split("Config(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the example makes a Config");
    for keyword in config_call.split(',').filter_map(|kv| kv.split('=').next()) {
        let keyword = keyword.trim();
        assert!(
            src.contains(&format!("::Val{{:{keyword}}}")),
            "the README's Config keyword {keyword} has no setter in the package"
        );
    }
}

/// A docstring documents the expression after it: one directly followed by another string
/// (a docstring left behind when code moved) makes Julia try to document a string, which
/// fails when the package loads ("cannot document the following expression").
#[test]
fn julia_docstrings_document_code() {
    let mut files = Vec::new();
    julia_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("bindings/julia"),
        &mut files,
    );
    let mut orphans = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut in_doc = false;
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            let ends_doc = if in_doc {
                t.ends_with("\"\"\"")
            } else if t.starts_with("\"\"\"") && !line.starts_with(' ') {
                // a top-level docstring: one line, or the first of several
                if t.len() >= 6 && t.ends_with("\"\"\"") {
                    true
                } else {
                    in_doc = true;
                    false
                }
            } else {
                false
            };
            if ends_doc {
                in_doc = false;
                if let Some(next) = lines.get(i + 1) {
                    if next.trim_start().starts_with('"') {
                        orphans.push(format!("{}:{}", file.display(), i + 2));
                    }
                }
            }
        }
    }
    assert!(
        orphans.is_empty(),
        "a docstring followed by a string: {orphans:?}"
    );
}
