//! Each crate's top-level modules form layers: a module may use the ones below it, never one
//! that (directly or through others) uses it back. In the filter, configuration is data, the
//! plan is compiled from it by the mechanisms (balance, limit, breaker, auth), and the request
//! path reads the plan; the renderer and the rate-limit service are held to the same rule.
//! This test reads each crate's `src/` and fails naming the first import cycle it finds.
//!
//! A module is a file or directory directly under `src/` (`lib.rs` and `main.rs` are the
//! crate's root, no module); it references another when its code says `crate::other` (a
//! `use crate::{a, b}` group counts each). Comments and unit-test modules
//! (`#[cfg(test)] mod tests { .. }` bodies and files named `tests.rs`) are left out: tests may
//! reach across layers.
#![cfg(not(target_arch = "wasm32"))]
// Helpers outside `#[test]` functions are not covered by clippy.toml's allow-*-in-tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Edges known to close a cycle that is being removed elsewhere: (from, to).
const ALLOWED_EDGES: &[(&str, &str)] = &[];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments, string and char literals (blanked, so `"{"` or a `crate::`
/// in a message counts for nothing).
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.starts_with(b"//") {
            while at < bytes.len() && bytes[at] != b'\n' {
                at += 1;
            }
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while at < bytes.len() {
                if bytes[at..].starts_with(b"/*") {
                    depth += 1;
                    at += 2;
                } else if bytes[at..].starts_with(b"*/") {
                    depth -= 1;
                    at += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    at += 1;
                }
            }
        } else if rest.starts_with(b"r#\"") || rest.starts_with(b"r\"") {
            // Raw string: r"..." or r#"..."# (one level of hashes is all the crate uses).
            let hashes = usize::from(rest[1] == b'#');
            at += 2 + hashes;
            while at < bytes.len() {
                if bytes[at] == b'"' && (hashes == 0 || bytes.get(at + 1) == Some(&b'#')) {
                    at += 1 + hashes;
                    break;
                }
                at += 1;
            }
            out.push_str("\"\"");
        } else if rest[0] == b'"' {
            at += 1;
            while at < bytes.len() && bytes[at] != b'"' {
                at += if bytes[at] == b'\\' { 2 } else { 1 };
            }
            at += 1;
            out.push_str("\"\"");
        } else if rest[0] == b'\'' && is_char_literal(&text[at..]) {
            at += 1;
            while at < bytes.len() && bytes[at] != b'\'' {
                at += if bytes[at] == b'\\' { 2 } else { 1 };
            }
            at += 1;
            out.push_str("' '");
        } else {
            let len = text[at..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[at..at + len]);
            at += len;
        }
    }
    out
}

/// `'a'`, `'\n'`, `'\u{..}'` rather than a lifetime `'a`.
fn is_char_literal(rest: &str) -> bool {
    let mut chars = rest.chars().skip(1);
    match chars.next() {
        Some('\\') => true,
        Some(_) => chars.next() == Some('\''),
        None => false,
    }
}

/// The code with `#[cfg(test)] mod tests { .. }` bodies removed.
fn without_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = rest[at + "#[cfg(test)]".len()..].trim_start();
        let Some(body) = after.strip_prefix("mod tests") else {
            out.push_str("#[cfg(test)]");
            rest = &rest[at + "#[cfg(test)]".len()..];
            continue;
        };
        let body = body.trim_start();
        if let Some(after) = body.strip_prefix(';') {
            // `mod tests;`: its file is skipped by name.
            rest = after;
            continue;
        }
        let mut depth = 0usize;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &body[end..];
    }
    out.push_str(rest);
    out
}

fn ident_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The top-level modules `code` names through `crate::`.
fn referenced(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        // `jairouter_crate::` or `mycrate::` are not the crate root.
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let after = code[at + "crate::".len()..].trim_start();
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start && depth == 0 => {
                        item_start = false;
                        found.insert(ident_at(&group[i..]).to_string());
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident_at(after).to_string());
        }
    }
    found
}

/// A crate's `src/`, from the workspace root (`filter/src`, `envoy/render/src`).
fn crate_src(crate_dir: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    workspace.join(crate_dir).join("src")
}

fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(module) = top_module(src, file) else {
            continue;
        };
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let code = without_test_modules(&code_only(&fs::read_to_string(file).unwrap()));
        for target in referenced(&code) {
            let allowed = ALLOWED_EDGES
                .iter()
                .any(|(from, to)| *from == module && *to == target);
            if target != module && modules.contains(&target) && !allowed {
                graph.get_mut(&module).unwrap().insert(target);
            }
        }
    }
    graph
}

/// `src/x.rs` and `src/x/**` belong to `x`; `lib.rs` and `main.rs` are the root, no module.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// A cycle as `a -> b -> a`, if the graph has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let start = path.iter().position(|p| p == next).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// Fails naming the first import cycle among the top-level modules of `crate_dir`.
fn assert_no_import_cycle(crate_dir: &str) {
    let src = crate_src(crate_dir);
    let graph = module_graph(&src);
    assert!(
        graph.len() > 1,
        "{}: no modules found: is the check still looking?",
        src.display()
    );
    for (module, uses) in &graph {
        let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
        println!("{crate_dir}: {module} -> {}", uses.join(", "));
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between modules of {crate_dir}: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    assert_no_import_cycle("filter");
}

#[test]
fn the_renderers_modules_have_no_import_cycle() {
    assert_no_import_cycle("envoy/render");
}

#[test]
fn the_rate_limit_services_modules_have_no_import_cycle() {
    assert_no_import_cycle("envoy/ratelimit");
}

/// The crates whose modules the tests above check for cycles.
const CHECKED_CRATES: [&str; 3] = ["filter", "envoy/render", "envoy/ratelimit"];

/// Every crate of the workspace (and the fuzz crate beside it) is checked above, or is one
/// source file, which has no modules to form a cycle: a new crate cannot slip past the check.
#[test]
fn every_crate_is_checked_for_import_cycles() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = fs::read_to_string(workspace.join("Cargo.toml")).unwrap();
    let members = manifest
        .split_once("members")
        .and_then(|(_, rest)| rest.split_once('['))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .expect("the workspace's members");
    let mut crates: Vec<String> = members
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect();
    assert!(crates.len() > 1, "no workspace members read from {members}");
    crates.push("filter/fuzz".to_string());
    for member in crates {
        if CHECKED_CRATES.contains(&member.as_str()) {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&workspace.join(&member).join("src"), &mut files);
        assert!(
            files.len() <= 1,
            "{member} has {} source files: add it to CHECKED_CRATES and give it a test",
            files.len()
        );
    }
}

#[test]
fn the_reader_sees_through_comments_strings_and_test_modules() {
    let code = code_only(
        "use crate::{alpha::A, beta::{B, C}, gamma};\n\
         // crate::commented\n\
         let s = \"crate::quoted {\"; let c = '{';\n\
         fn f<'a>(x: &'a str) { crate::delta::f(); }\n\
         #[cfg(test)]\nmod tests { use crate::epsilon; fn g() { if true { } } }\n\
         const Z: u8 = crate::zeta::Z;",
    );
    let found = referenced(&without_test_modules(&code));
    let found: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(found, ["alpha", "beta", "delta", "gamma", "zeta"]);

    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&graph).unwrap().join(" -> "), "a -> b -> c -> a");
    graph.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&graph), None);
}

/// The binding stays thin: the files that call proxy-wasm hold at most this many lines of
/// non-test code, blank lines and comments left out. Logic belongs below `host::Host`.
const MAX_BINDING_LINES: usize = 700;

#[test]
fn only_a_thin_binding_calls_proxy_wasm() {
    let src = crate_src("filter");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut total = 0;
    let mut binding = Vec::new();
    for file in &files {
        let code = without_test_modules(&code_only(&fs::read_to_string(file).unwrap()));
        if !code.contains("proxy_wasm") {
            continue;
        }
        let lines = code.lines().filter(|l| !l.trim().is_empty()).count();
        binding.push(format!("{} ({lines})", file.display()));
        total += lines;
    }
    println!("files calling proxy-wasm: {}", binding.join(", "));
    assert!(
        !binding.is_empty(),
        "the binding was not found: is the check still looking?"
    );
    assert!(
        total <= MAX_BINDING_LINES,
        "{total} lines of non-test code call proxy-wasm (at most {MAX_BINDING_LINES}): {}",
        binding.join(", ")
    );
}
