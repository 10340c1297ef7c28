//! Every environment variable a service reads is documented in docs/configuration.md.
//!
//! The settings sections declare their documented names in `ENV` tables and
//! `EnvMap::var` calls; this test reads the sources, collects those names and fails
//! for each one the operator documentation does not mention, so a new knob cannot
//! ship undocumented.

use std::collections::BTreeSet;
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if !path.ends_with("tests") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `("NAME", "field")` pairs and `.var("NAME", …)` calls in non-test code.
fn declared_names(source: &str) -> Vec<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut names = Vec::new();
    for marker in ["(\"", ".var(\""] {
        let mut rest = code;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            let name: String =
                rest.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
            let closes = rest[name.len()..].starts_with("\",");
            if closes
                && name.len() >= 4
                && name.contains('_')
                && name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            {
                names.push(name);
            }
        }
    }
    names
}

#[test]
fn every_environment_variable_is_documented() {
    let root = testkit::workspace_root();
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("services"), &mut files);
    let mut names = BTreeSet::new();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap_or_default();
        names.extend(declared_names(&source));
    }
    assert!(names.contains("MESSAGE_RETRY_MAX_RETRIES"), "the scan finds the retry settings: {names:?}");
    assert!(names.contains("DEDUPLICATION_TTL"), "the scan finds the event store settings");
    let docs = std::fs::read_to_string(root.join("docs/configuration.md")).expect("docs/configuration.md exists");
    let missing: Vec<&String> = names.iter().filter(|name| !docs.contains(name.as_str())).collect();
    assert!(missing.is_empty(), "undocumented in docs/configuration.md: {missing:?}");
}
