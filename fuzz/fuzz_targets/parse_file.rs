//! Arbitrary bytes through `parse_file` and `validate`: nothing may panic, hang or report a
//! position outside the file.
//!
//! The first byte picks the path the bytes are read as, so that the project-from-directory rule
//! (`projects/<p>/tasks/`) and both extensions are exercised; the rest is the file.

#![no_main]

use agentops_specs::{parse_file, validate};
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 6] = [
    "spec.yaml",
    "projects/p/tasks/t.yaml",
    "projects/p/tasks/nested/t.yml",
    "projects/Not_A_Label/tasks/t.yaml",
    "projects/p/project.yml",
    "agents/a.yaml",
];

fuzz_target!(|data: &[u8]| {
    let (path, bytes) = match data.split_first() {
        Some((first, rest)) => (PATHS[usize::from(*first) % PATHS.len()], rest),
        None => (PATHS[0], data),
    };
    let parsed = parse_file(path, bytes);
    // Lines as YAML counts them: `\n`, `\r\n` or a lone `\r` ends one.
    let lines = bytes
        .iter()
        .enumerate()
        .filter(|&(i, b)| *b == b'\n' || (*b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count()
        + 1;
    for d in &parsed.errors {
        assert_eq!(d.path, path);
        assert!(d.line >= 1 && d.column >= 1, "{d}");
        assert!(d.line as usize <= lines, "{d}: the file has {lines} lines");
        assert!(!d.message.starts_with("internal error"), "{d}");
    }
    assert!(parsed.errors.is_empty() || parsed.ours);
    assert!(parsed.objects.is_empty() || parsed.ours);

    // The same bytes give the same answer: no state leaks from one parse into the next.
    assert_eq!(parse_file(path, bytes), parsed);

    let validation = validate(&parsed.objects);
    assert_eq!(validation.invalid.len(), parsed.objects.len());
    for d in &validation.diagnostics {
        assert_eq!(d.path, path);
        assert!(d.line >= 1 && d.column >= 1, "{d}");
    }

    // Everything declared twice: every object is then a duplicate of itself.
    let twice: Vec<_> = parsed
        .objects
        .iter()
        .chain(&parsed.objects)
        .cloned()
        .collect();
    let validation = validate(&twice);
    assert!(parsed.objects.is_empty() || !validation.is_ok());
});
