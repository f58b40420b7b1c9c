//! The bad-input and good-input corpora under `specs/corpus/`.
//!
//! A case is either one file (`bad/<name>.yaml`, `.yml`) or a directory (`bad/<name>/`) whose
//! files are read with their paths relative to it, as the Git source would read a repository.
//! Every bad case has a sidecar `bad/<name>.expected` listing the diagnostics the case must
//! produce, one per line:
//!
//! ```text
//! path:line:column: message substring
//! ```
//!
//! The path, line and column must match exactly and the message must contain the substring.
//! Blank lines and lines starting with `#` are comments. The produced set must equal the
//! expected set: nothing missing, nothing extra. Good cases (`good/`) must produce nothing.
//!
//! Set `AGENTOPS_CORPUS_SHOW=1` to print what every case produces.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

use agentops_specs::{Diagnostic, Object, Skeleton, is_spec_path, parse_file, validate};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The case's files as `(path in diagnostics, bytes)`, sorted by path.
fn case_files(case: &Path) -> Vec<(String, Vec<u8>)> {
    if case.is_file() {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        return vec![(name, fs::read(case).unwrap())];
    }
    let mut files = Vec::new();
    let mut dirs = vec![case.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(case)
                .unwrap()
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            if is_spec_path(&rel) {
                files.push((rel, fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// Parse every file of a case and validate all its objects together, as one sync would.
pub fn run_case(files: &[(String, Vec<u8>)]) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let mut objects: Vec<Object> = Vec::new();
    for (path, bytes) in files {
        let parsed = parse_file(path, bytes);
        assert!(
            parsed.errors.iter().all(|d| d.path == *path),
            "{path}: a diagnostic names another file: {:?}",
            parsed.errors
        );
        assert!(
            parsed.errors.is_empty() || parsed.ours,
            "{path}: errors in a file that is not ours"
        );
        diagnostics.extend(parsed.errors);
        objects.extend(parsed.objects);
    }
    let validation = validate(&objects);
    assert_eq!(validation.invalid.len(), objects.len());
    // The controller validates skeletons: they must reach the objects' verdict exactly.
    let skeletons: Vec<Skeleton> = objects
        .iter()
        .map(|o| o.skeleton(o.origin.path.as_str().into()))
        .collect();
    let of_skeletons = validate(&skeletons);
    assert_eq!(of_skeletons.diagnostics, validation.diagnostics);
    assert_eq!(of_skeletons.invalid, validation.invalid);
    diagnostics.extend(validation.diagnostics);
    diagnostics.sort();
    diagnostics
}

#[derive(Debug)]
struct Expected {
    path: String,
    line: u32,
    column: u32,
    substring: String,
}

impl Expected {
    fn matches(&self, d: &Diagnostic) -> bool {
        d.path == self.path
            && d.line == self.line
            && d.column == self.column
            && d.message.contains(&self.substring)
    }
}

fn parse_expected(sidecar: &Path) -> Vec<Expected> {
    let text = fs::read_to_string(sidecar).unwrap_or_else(|e| panic!("{}: {e}", sidecar.display()));
    let mut expected = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            panic!(
                "{}:{}: not `path:line:column: message`",
                sidecar.display(),
                n + 1
            )
        };
        let mut parts = line.splitn(4, ':');
        let (Some(path), Some(l), Some(c), Some(rest)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bad()
        };
        let (Ok(l), Ok(c)) = (l.parse(), c.parse()) else {
            bad()
        };
        let Some(substring) = rest.strip_prefix(' ').filter(|s| !s.is_empty()) else {
            bad()
        };
        expected.push(Expected {
            path: path.to_owned(),
            line: l,
            column: c,
            substring: substring.to_owned(),
        });
    }
    expected
}

/// Pairs expected lines with produced diagnostics; returns the unmatched of each side.
fn compare<'a>(
    expected: &'a [Expected],
    actual: &'a [Diagnostic],
) -> (Vec<&'a Expected>, Vec<&'a Diagnostic>) {
    // Longest substrings first, so that a short one cannot steal a diagnostic a more specific
    // line needs.
    let mut order: Vec<&Expected> = expected.iter().collect();
    order.sort_by_key(|e| std::cmp::Reverse(e.substring.len()));
    let mut used = vec![false; actual.len()];
    let mut missing = Vec::new();
    for e in order {
        match (0..actual.len()).find(|&i| !used[i] && e.matches(&actual[i])) {
            Some(i) => used[i] = true,
            None => missing.push(e),
        }
    }
    let extra = actual
        .iter()
        .zip(&used)
        .filter(|(_, used)| !**used)
        .map(|(d, _)| d)
        .collect();
    (missing, extra)
}

/// The cases of one corpus folder: `(name, case path)`.
fn cases(folder: &str) -> Vec<(String, PathBuf)> {
    let dir = corpus_dir().join(folder);
    let mut cases = Vec::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            cases.push((name, path));
        } else if let Some(stem) = name
            .strip_suffix(".yaml")
            .or_else(|| name.strip_suffix(".yml"))
        {
            cases.push((stem.to_owned(), path));
        }
    }
    cases.sort();
    cases
}

fn show() -> bool {
    std::env::var_os("AGENTOPS_CORPUS_SHOW").is_some()
}

/// Runs a case, turning a panic into a failure message.
fn run_guarded(name: &str, case: &Path) -> Result<Vec<Diagnostic>, String> {
    let files = case_files(case);
    assert!(!files.is_empty(), "case {name} has no YAML file");
    panic::catch_unwind(|| run_case(&files)).map_err(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!("case {name} panicked: {why}")
    })
}

#[test]
fn bad_corpus() {
    let bad = corpus_dir().join("bad");
    let cases = cases("bad");
    assert!(cases.len() >= 35, "only {} bad cases", cases.len());

    let mut failures = Vec::new();
    for (name, case) in &cases {
        let sidecar = bad.join(format!("{name}.expected"));
        let expected = if show() && !sidecar.exists() {
            Vec::new()
        } else {
            parse_expected(&sidecar)
        };
        assert!(
            show() || !expected.is_empty(),
            "{}: expects nothing",
            sidecar.display()
        );
        let actual = match run_guarded(name, case) {
            Ok(actual) => actual,
            Err(failure) => {
                failures.push(failure);
                continue;
            }
        };
        if show() {
            println!("== {name}");
            for d in &actual {
                println!("{d}");
            }
        }
        let (missing, extra) = compare(&expected, &actual);
        if !missing.is_empty() || !extra.is_empty() {
            let mut msg = format!("case {name}:");
            for e in missing {
                msg += &format!(
                    "\n  missing   {}:{}:{}: …{}…",
                    e.path, e.line, e.column, e.substring
                );
            }
            for d in extra {
                msg += &format!("\n  unexpected {d}");
            }
            failures.push(msg);
        }
    }

    // Every sidecar belongs to a case.
    for entry in fs::read_dir(&bad).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".expected") {
            assert!(
                cases.iter().any(|(n, _)| n == stem),
                "{name} has no case next to it"
            );
        }
    }

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn good_corpus() {
    let cases = cases("good");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for (name, case) in &cases {
        match run_guarded(name, case) {
            Ok(actual) if actual.is_empty() => {}
            Ok(actual) => failures.push(format!(
                "case {name}:\n  {}",
                actual
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )),
            Err(failure) => failures.push(failure),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
