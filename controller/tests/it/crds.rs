//! `agentops crds` and `agentops schema`, the binary end to end: the committed `crds/` and
//! `schemas/` are exactly what it generates, and the schemas it writes accept every example
//! and refuse the bad inputs that are schema errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use agentops_specs::{API_GROUP, parse_file};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The binary with no `AGENTOPS_*` from the caller's environment.
fn agentops(args: &[&str]) -> (String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentops"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTOPS_") {
            command.env_remove(key);
        }
    }
    let output = command.args(args).output().expect("run agentops");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "agentops {args:?}: {stderr}");
    (stdout, stderr)
}

/// Files of a directory, by name, with their bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Generate into a fresh directory and compare with the committed one, byte for byte.
fn assert_committed(command: &str, committed: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join(committed);
    let (_, stderr) = agentops(&[command, "--dir", dir.to_str().unwrap()]);
    let generated = files(&dir);
    let regenerate = format!(
        "{committed}/ is not what `agentops {command}` generates; regenerate it with\n    \
         cargo run -p agentops -- {command} --dir {committed}"
    );
    let names = |files: &[(String, Vec<u8>)]| files.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    let on_disk = files(&repo().join(committed));
    assert_eq!(names(&on_disk), names(&generated), "{regenerate}");
    for ((name, want), (_, have)) in generated.iter().zip(&on_disk) {
        assert!(want == have, "{committed}/{name} differs. {regenerate}");
        assert!(stderr.contains(name), "stderr names no {name}: {stderr}");
    }
    out
}

#[test]
fn committed_crds_are_what_agentops_crds_generates() {
    let out = assert_committed("crds", "crds");
    // The Helm chart installs the same files.
    let chart = "charts/agentops/crds";
    let generated = files(&out.path().join("crds"));
    let in_chart = files(&repo().join(chart));
    assert!(
        generated == in_chart,
        "{chart}/ is not what `agentops crds` generates; regenerate it with\n    \
         cargo run -p agentops -- crds --dir {chart}"
    );
    let (stream, _) = agentops(&["crds"]);
    let mut expected = String::new();
    for name in ["projects", "tasks", "agents", "tools"] {
        let file = out.path().join(format!("crds/{API_GROUP}_{name}.yaml"));
        expected.push_str("---\n");
        expected.push_str(&std::fs::read_to_string(file).unwrap());
    }
    assert_eq!(
        stream, expected,
        "`agentops crds` prints the files as one stream"
    );
}

#[test]
fn committed_schemas_are_what_agentops_schema_generates() {
    let out = assert_committed("schema", "schemas");
    let (all, _) = agentops(&["schema"]);
    let file = std::fs::read_to_string(out.path().join("schemas/all.json")).unwrap();
    assert_eq!(all, file, "`agentops schema` prints all.json");
}

/// The schemas the binary writes, by file name.
fn generated_schemas() -> (tempfile::TempDir, Vec<(String, jsonschema::Validator)>) {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("schemas");
    agentops(&["schema", "--dir", dir.to_str().unwrap()]);
    let validators = files(&dir)
        .into_iter()
        .map(|(name, bytes)| {
            let schema: Value = serde_json::from_slice(&bytes).unwrap();
            let validator = jsonschema::validator_for(&schema)
                .unwrap_or_else(|e| panic!("{name} is not a valid JSON Schema: {e}"));
            (name, validator)
        })
        .collect();
    (out, validators)
}

fn validator<'a>(
    schemas: &'a [(String, jsonschema::Validator)],
    name: &str,
) -> &'a jsonschema::Validator {
    &schemas
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no schema {name}"))
        .1
}

/// The documents of a YAML stream that are ours, as JSON.
fn documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|doc| {
            doc.get("apiVersion")
                .and_then(Value::as_str)
                .is_some_and(|v| v.starts_with(API_GROUP))
        })
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect()
}

#[test]
fn every_example_names_a_schema_that_accepts_each_of_its_documents() {
    let (_out, schemas) = generated_schemas();
    let all = validator(&schemas, "all.json");
    let examples = repo().join("examples");
    // kubernetes/ holds the same objects as custom resources; `agentops validate` checks the
    // Git examples without it (kube_examples:: checks it on its own).
    let git_examples = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let mut checked_git = 0;
    for file in yaml_files(&examples) {
        let rel = file
            .strip_prefix(&examples)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let first = text.lines().next().unwrap_or_default();
        let target = first
            .strip_prefix("# yaml-language-server: $schema=")
            .unwrap_or_else(|| panic!("{rel}: the first line names no schema: {first:?}"));
        // The path is relative to the file, as the editor resolves it.
        let target = file.parent().unwrap().join(target);
        let canonical = target
            .canonicalize()
            .unwrap_or_else(|e| panic!("{rel}: {} does not exist: {e}", target.display()));
        assert_eq!(
            canonical.parent().unwrap(),
            repo().join("schemas").canonicalize().unwrap(),
            "{rel}: the schema is not one of schemas/"
        );
        let name = canonical
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let named = validator(&schemas, &name);
        let docs = documents(&text);
        if !rel.starts_with("kubernetes/") {
            checked_git += docs.len();
            let copy = git_examples.path().join(&rel);
            std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
            std::fs::write(copy, &text).unwrap();
        }
        assert!(!docs.is_empty(), "{rel}: no document");
        for doc in docs {
            let errors: Vec<String> = named.iter_errors(&doc).map(|e| e.to_string()).collect();
            assert!(
                errors.is_empty(),
                "{rel}: {name} refuses a document: {errors:?}"
            );
            assert!(all.is_valid(&doc), "{rel}: all.json refuses a document");
            checked += 1;
        }
        assert!(
            parse_file(&rel, text.as_bytes()).is_ok(),
            "{rel}: the parser refuses it"
        );
    }
    assert!(checked >= 16, "only {checked} documents");

    // And the header comment leaves the files valid specs.
    let (_, stderr) = agentops(&["validate", git_examples.path().to_str().unwrap()]);
    assert!(
        stderr.contains(&format!("{checked_git} objects, no errors")),
        "{stderr}"
    );
}

/// Bad cases whose error a schema can state: unknown fields, wrong types, bad enum values,
/// bad names, numbers out of range, missing required fields. The others are about the file
/// (syntax, encoding, size), about references between objects, or about the file's path.
const SCHEMA_ERRORS: &[&str] = &[
    "action-missing.yaml",
    "action-none.yaml",
    "action-two.yaml",
    "agent-concurrency-zero.yaml",
    "agent-type-unknown.yml",
    "api-version-v2.yaml",
    "assignee-invalid.yaml",
    "capabilities-string.yaml",
    "crlf-line-endings.yaml",
    "depends-on-malformed.yaml",
    "kind-missing.yaml",
    "kind-unknown.yaml",
    "metadata-empty.yaml",
    "metadata-null.yaml",
    "missing-metadata-name.yaml",
    "missing-metadata.yaml",
    "missing-spec.yaml",
    "missing-title.yaml",
    "name-empty.yaml",
    "name-leading-dash.yaml",
    "name-too-long.yaml",
    "name-underscore.yaml",
    "name-uppercase.yaml",
    "output-mode-unknown.yaml",
    "output-path-absolute.yaml",
    "output-path-agentops.yaml",
    "output-path-dotdot.yaml",
    "output-path-git.yaml",
    "priority-negative.yaml",
    "priority-out-of-range.yaml",
    "priority-unknown-word.yaml",
    "priority-wrong-type.yaml",
    "prompt-empty.yaml",
    "retries-negative.yaml",
    "retries-too-many.yaml",
    "retries-wrong-type.yaml",
    "run-empty-command.yaml",
    "several-bad-documents.yaml",
    "spec-null.yaml",
    "title-empty.yaml",
    "title-list.yaml",
    "tool-action-bad-name.yaml",
    "tool-script-without-command.yaml",
    "unknown-field-action.yaml",
    "unknown-field-agent.yaml",
    "unknown-field-metadata.yaml",
    "unknown-field-output.yaml",
    "unknown-field-run.yaml",
    "unknown-field-spec.yaml",
    "unknown-field-tool.yaml",
    "unknown-field-top-level.yaml",
];

#[test]
fn the_schema_refuses_the_bad_cases_that_are_schema_errors() {
    let (_out, schemas) = generated_schemas();
    let all = validator(&schemas, "all.json");
    let bad = repo().join("specs/corpus/bad");
    for case in SCHEMA_ERRORS {
        let text = std::fs::read_to_string(bad.join(case)).unwrap();
        let parsed = parse_file(case, text.as_bytes());
        assert!(!parsed.is_ok(), "{case}: the parser accepts it");
        let docs = documents(&text);
        let refused = docs.iter().filter(|doc| !all.is_valid(doc)).count();
        // Each of these cases has one bad document, but for the one made of four bad ones.
        let expected = if *case == "several-bad-documents.yaml" {
            4
        } else {
            1
        };
        assert_eq!(
            refused,
            expected,
            "{case}: all.json refuses {refused} of its {} documents",
            docs.len()
        );
        // The kind's own schema, the one an editor would use for the file, refuses it too.
        for doc in &docs {
            let Some(kind) = doc.get("kind").and_then(Value::as_str) else {
                continue;
            };
            let name = format!("{}.json", kind.to_ascii_lowercase());
            if let Some((_, own)) = schemas.iter().find(|(n, _)| *n == name)
                && !all.is_valid(doc)
            {
                assert!(
                    !own.is_valid(doc),
                    "{case}: {name} accepts what all.json refuses"
                );
            }
        }
    }
}
