//! The repository is for its users: nothing in it may point at files they do not have, and the
//! README stays short enough to be read.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Room for the sections new commands add, within what a newcomer reads in one sitting.
const README_LIMIT_BYTES: u64 = 25 * 1024;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the controller crate sits in the workspace")
        .to_owned()
}

/// Every file Git tracks, relative to the workspace root; build output is never tracked, and is
/// left out in case a target directory was added by mistake.
fn tracked_files(root: &Path) -> Vec<PathBuf> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z"])
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git ls-files failed in {}: {}",
        root.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let files: Vec<PathBuf> = output
        .stdout
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| PathBuf::from(String::from_utf8_lossy(name).into_owned()))
        .filter(|path| !path.components().any(|c| c.as_os_str() == "target"))
        .collect();
    assert!(
        files.iter().any(|f| f == Path::new("README.md")),
        "README.md is not among the {} tracked files",
        files.len()
    );
    files
}

/// The references that must not appear, assembled here so that this file does not contain them.
fn forbidden_references() -> Vec<String> {
    let folder = ["sha", "red"].concat();
    vec![
        format!("../{folder}"),
        format!("{folder}/DESIGN.md"),
        format!("{folder}/SEED-SCHEMA.md"),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_file_refers_to_files_outside_the_repository() {
    let root = workspace_root();
    let needles = forbidden_references();
    let mut found = Vec::new();
    let mut read = 0;
    for file in tracked_files(&root) {
        // A file deleted in the working tree but not yet in the index has nothing to check.
        let Ok(bytes) = std::fs::read(root.join(&file)) else {
            continue;
        };
        read += 1;
        for needle in &needles {
            if contains(&bytes, needle.as_bytes()) {
                found.push(format!("{}: mentions {needle}", file.display()));
            }
        }
    }
    assert!(read > 100, "only {read} tracked files could be read");
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_check_finds_a_reference() {
    for needle in forbidden_references() {
        let text = format!("see {needle} for the details");
        assert!(contains(text.as_bytes(), needle.as_bytes()), "{needle}");
    }
    assert!(!contains(
        b"a shared folder",
        forbidden_references()[0].as_bytes()
    ));
}

#[test]
fn readme_stays_within_its_limit() {
    let readme = workspace_root().join("README.md");
    let size = std::fs::metadata(&readme)
        .unwrap_or_else(|e| panic!("{}: {e}", readme.display()))
        .len();
    assert!(
        size <= README_LIMIT_BYTES,
        "README.md is {size} bytes, over its limit of {README_LIMIT_BYTES}: move detail into docs/"
    );
}
