//! The CRDs and JSON Schemas generated from the spec types, against the parser: what one
//! accepts the others accept, and the bad inputs that are schema errors are refused by all.

use std::path::{Path, PathBuf};

use agentops_specs::crd::{self, SCRIPT_NEEDS_COMMAND_CEL};
use agentops_specs::names::{DNS_LABEL_MAX, DNS_LABEL_PATTERN, check_dns_label, check_output_path};
use agentops_specs::{API_GROUP, API_VERSION, Kind, Priority, Spec, parse_file, schema};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The printer columns each kind's CRD must carry, in order.
fn columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Project => &["Phase", "Progress", "Age"],
        Kind::Task => &["Project", "Assignee", "Phase", "Agent", "Attempt", "Age"],
        Kind::Agent => &["Type", "Status", "Age"],
        Kind::Tool => &["Type", "Status", "Age"],
    }
}

fn short_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Project => "aoproj",
        Kind::Task => "aotask",
        Kind::Agent => "aoagent",
        Kind::Tool => "aotool",
    }
}

#[test]
fn every_crd_is_a_custom_resource_definition_with_names_columns_and_status() {
    for kind in Kind::ALL {
        let text = crd::to_yaml(kind).unwrap();
        let parsed: CustomResourceDefinition = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{kind} CRD is not a CustomResourceDefinition: {e}"));
        assert_eq!(parsed, crd::crd(kind).unwrap(), "{kind}: YAML round trip");

        let spec = &parsed.spec;
        assert_eq!(
            parsed.metadata.name.as_deref(),
            Some(format!("{}.{API_GROUP}", kind.plural()).as_str())
        );
        assert_eq!(spec.group, API_GROUP);
        assert_eq!(spec.scope, "Namespaced");
        assert_eq!(spec.names.kind, kind.as_str());
        assert_eq!(spec.names.plural, kind.plural());
        assert_eq!(
            spec.names.short_names.as_deref(),
            Some(&[short_name(kind).to_owned()][..])
        );
        assert_eq!(
            spec.names.categories.as_deref(),
            Some(&["agentops".to_owned()][..])
        );

        let [version] = spec.versions.as_slice() else {
            panic!("{kind}: expected one version, got {}", spec.versions.len());
        };
        assert_eq!(format!("{API_GROUP}/{}", version.name), API_VERSION);
        assert!(version.served && version.storage, "{kind}");
        let status = version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref());
        assert!(status.is_some(), "{kind}: no status subresource");
        let names: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, columns(kind), "{kind}: printer columns");

        let schema = version.schema.as_ref().unwrap().open_api_v3_schema.as_ref();
        let properties = schema.unwrap().properties.as_ref().unwrap();
        assert!(
            properties.contains_key("status"),
            "{kind}: no status schema"
        );
        let name = &properties["metadata"].properties.as_ref().unwrap()["name"];
        assert_eq!(name.pattern.as_deref(), Some(DNS_LABEL_PATTERN));
    }
}

#[test]
fn the_tool_crd_states_the_script_command_rule() {
    let tool = crd::crd(Kind::Tool).unwrap();
    let schema = tool.spec.versions[0].schema.as_ref().unwrap();
    let spec = &schema
        .open_api_v3_schema
        .as_ref()
        .unwrap()
        .properties
        .as_ref()
        .unwrap()["spec"];
    let rules: Vec<&str> = spec
        .x_kubernetes_validations
        .iter()
        .flatten()
        .map(|r| r.rule.as_str())
        .collect();
    assert_eq!(rules, [SCRIPT_NEEDS_COMMAND_CEL]);
}

/// The `spec` schema of a kind's CRD as the API server applies it, in the JSON Schema dialect
/// `jsonschema` reads: OpenAPI's `nullable` becomes a `null` type, and an unknown field is an
/// error, as strict field validation (kubectl's default) makes it.
fn crd_spec_validator(kind: Kind) -> jsonschema::Validator {
    let crd = serde_json::to_value(crd::crd(kind).unwrap()).unwrap();
    let mut spec = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec")
        .unwrap()
        .clone();
    nullable_to_null_type(&mut spec);
    strict_fields(&mut spec);
    jsonschema::validator_for(&spec).unwrap()
}

fn strict_fields(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties")
                && !map.contains_key("x-kubernetes-preserve-unknown-fields")
            {
                map.insert("additionalProperties".into(), false.into());
            }
            map.values_mut().for_each(strict_fields);
        }
        Value::Array(items) => items.iter_mut().for_each(strict_fields),
        _ => {}
    }
}

fn nullable_to_null_type(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(ty)) = map.get("type").cloned()
            {
                map.insert("type".into(), json!([ty, "null"]));
            }
            map.values_mut().for_each(nullable_to_null_type);
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_to_null_type),
        _ => {}
    }
}

fn name_validator() -> jsonschema::Validator {
    jsonschema::validator_for(&json!({
        "type": "string",
        "pattern": DNS_LABEL_PATTERN,
        "maxLength": DNS_LABEL_MAX,
    }))
    .unwrap()
}

/// Every document of ours in a file, as JSON, with its kind.
fn documents(text: &str) -> Vec<(Option<Kind>, Value)> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|doc| {
            doc.get("apiVersion")
                .and_then(Value::as_str)
                .is_some_and(|v| v.starts_with(API_GROUP))
        })
        .map(|doc| {
            let kind = doc
                .get("kind")
                .and_then(Value::as_str)
                .and_then(Kind::parse);
            (kind, doc)
        })
        .collect()
}

fn spec_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if agentops_specs::is_spec_path(&path.to_string_lossy()) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_and_good_case_is_accepted_by_the_crds_the_schemas_and_the_parser() {
    let crd_specs = Kind::ALL.map(crd_spec_validator);
    let documents_schemas =
        Kind::ALL.map(|k| jsonschema::validator_for(&schema::document_schema(k)).unwrap());
    let names = name_validator();
    let mut checked = 0;
    // A good case is a file or a directory read as a repository of its own, like the examples.
    let mut roots = vec![root().join("examples")];
    for case in std::fs::read_dir(root().join("specs/corpus/good")).unwrap() {
        roots.push(case.unwrap().path());
    }
    for dir in roots {
        let files = if dir.is_file() {
            vec![dir.clone()]
        } else {
            spec_files(&dir)
        };
        for file in files {
            let rel = match file.strip_prefix(&dir) {
                Ok(rel) if !rel.as_os_str().is_empty() => rel.to_string_lossy().replace('\\', "/"),
                _ => file.file_name().unwrap().to_string_lossy().into_owned(),
            };
            let bytes = std::fs::read(&file).unwrap();
            let parsed = parse_file(&rel, &bytes);
            assert!(
                parsed.is_ok(),
                "{rel}: the parser refuses it: {:?}",
                parsed.errors
            );
            if !parsed.ours {
                continue;
            }
            let text = String::from_utf8(bytes).unwrap();
            for (in_file, (kind, doc)) in documents(&text).into_iter().enumerate() {
                let kind = kind.unwrap_or_else(|| panic!("{rel}: a document without a kind"));
                let at = Kind::ALL.iter().position(|k| *k == kind).unwrap();
                let errors: Vec<String> = crd_specs[at]
                    .iter_errors(&doc["spec"])
                    .map(|e| e.to_string())
                    .collect();
                assert!(
                    errors.is_empty(),
                    "{rel}: the {kind} CRD refuses its spec: {errors:?}"
                );
                assert!(
                    names.is_valid(&doc["metadata"]["name"]),
                    "{rel}: CRD refuses the name"
                );
                let errors: Vec<String> = documents_schemas[at]
                    .iter_errors(&doc)
                    .map(|e| e.to_string())
                    .collect();
                assert!(
                    errors.is_empty(),
                    "{rel}: {kind} schema refuses it: {errors:?}"
                );
                assert_reads_as_parsed(&rel, &doc, &parsed.objects[in_file]);
                checked += 1;
            }
        }
    }
    assert!(checked >= 16, "only {checked} documents checked");
}

/// A custom resource's spec, read by the model's own `Deserialize` (as `kube` reads one from the
/// API server), is the spec the parser read from the same document. A task's project is the
/// one thing a custom resource must say that a file may leave to its path.
fn assert_reads_as_parsed(rel: &str, doc: &Value, parsed: &agentops_specs::Object) {
    let mut spec = doc["spec"].clone();
    let read = match &parsed.spec {
        Spec::Project(_) => serde_json::from_value(spec).map(Spec::Project),
        Spec::Task(t) => {
            spec["project"] = json!(t.project);
            serde_json::from_value(spec).map(Spec::Task)
        }
        Spec::Agent(_) => serde_json::from_value(spec).map(Spec::Agent),
        Spec::Tool(_) => serde_json::from_value(spec).map(Spec::Tool),
    };
    let read = read.unwrap_or_else(|e| panic!("{rel}: the model does not read the spec: {e}"));
    assert_eq!(read, parsed.spec, "{rel}: {}", parsed.name());
}

/// Bad cases whose error lies in a spec or a name, which a CRD can refuse (the others are about
/// the file: YAML syntax, apiVersion, size, or references between objects).
const CRD_REFUSES: &[&str] = &[
    "action-missing.yaml",
    "action-none.yaml",
    "action-two.yaml",
    "agent-concurrency-zero.yaml",
    "agent-type-unknown.yml",
    "assignee-invalid.yaml",
    "capabilities-string.yaml",
    "crlf-line-endings.yaml",
    "depends-on-malformed.yaml",
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
    "title-empty.yaml",
    "title-list.yaml",
    "tool-action-bad-name.yaml",
    "unknown-field-action.yaml",
    "unknown-field-agent.yaml",
    "unknown-field-output.yaml",
    "unknown-field-run.yaml",
    "unknown-field-spec.yaml",
    "unknown-field-tool.yaml",
];

#[test]
fn the_crds_refuse_the_bad_cases_that_are_spec_errors() {
    let crd_specs = Kind::ALL.map(crd_spec_validator);
    let names = name_validator();
    for case in CRD_REFUSES {
        let path = root().join("specs/corpus/bad").join(case);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !parse_file(case, text.as_bytes()).is_ok(),
            "{case}: the parser accepts it"
        );
        let docs = documents(&text);
        assert!(!docs.is_empty(), "{case}: no document of ours");
        let refused = docs
            .iter()
            .filter(|(kind, doc)| {
                let kind = kind.unwrap();
                let at = Kind::ALL.iter().position(|k| *k == kind).unwrap();
                !crd_specs[at].is_valid(&doc["spec"]) || !names.is_valid(&doc["metadata"]["name"])
            })
            .count();
        let bad = if *case == "several-bad-documents.yaml" {
            4
        } else {
            1
        };
        assert_eq!(
            refused,
            bad,
            "{case}: {refused} of {} documents refused",
            docs.len()
        );
    }
}

#[test]
fn the_name_pattern_is_the_parsers_name_rule() {
    let names = name_validator();
    let long = "a".repeat(63);
    let too_long = "a".repeat(64);
    for name in [
        "a",
        "draft-copy",
        "x1",
        "1x",
        "a-b-c",
        &long,
        &too_long,
        "",
        "-a",
        "a-",
        "A",
        "a_b",
        "a.b",
        "ä",
        "a b",
        "a\n",
        "--",
        "0",
    ] {
        assert_eq!(
            names.is_valid(&json!(name)),
            check_dns_label(name).is_ok(),
            "{name:?}"
        );
    }
}

#[test]
fn the_output_path_schema_is_the_parsers_path_rule() {
    let crd = serde_json::to_value(crd::crd(Kind::Task).unwrap()).unwrap();
    let item = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/output/properties/paths/items")
        .unwrap();
    let paths = jsonschema::validator_for(item).unwrap();
    for path in [
        "site/",
        "site/copy.md",
        "docs",
        "a/.gitkeep",
        "a..b",
        ".github/x",
        "x/.agentops2",
        "",
        "/etc",
        "\\x",
        "../x",
        "a/../../b",
        "a/..",
        ".git",
        ".git/config",
        "a/.git/b",
        ".agentops/status",
        "C:/x",
        "a\\..\\b",
        "a\u{7}b",
        "a\u{85}b",
    ] {
        assert_eq!(
            paths.is_valid(&json!(path)),
            check_output_path(path).is_ok(),
            "{path:?}"
        );
    }
}

#[test]
fn the_priority_schema_is_what_priority_reads() {
    let crd = serde_json::to_value(crd::crd(Kind::Task).unwrap()).unwrap();
    let mut schema = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/priority")
        .unwrap()
        .clone();
    nullable_to_null_type(&mut schema);
    let crd_priority = jsonschema::validator_for(&schema).unwrap();
    let mut values: Vec<Value> = (-3..=103).map(|n| json!(n)).collect();
    for text in [
        "critical", "high", "medium", "low", "urgent", "High", "", "0", "100", "101", "-0", "-1",
        "+5", "007", "0100", "1e2", " 5", "5.0",
    ] {
        values.push(json!(text));
    }
    values.extend([
        json!(50.5),
        json!(true),
        json!(null),
        json!([1]),
        json!({"a": 1}),
    ]);
    for value in values {
        let read = serde_json::from_value::<Priority>(value.clone()).is_ok();
        assert_eq!(crd_priority.is_valid(&value), read, "{value}");
    }
}

#[test]
fn an_action_reads_as_the_parser_reads_it() {
    use agentops_specs::{Action, PlanAction};
    let read = |v: Value| serde_json::from_value::<Action>(v);
    assert_eq!(
        read(json!({"plan": null})).unwrap(),
        Action::Plan(PlanAction::default())
    );
    assert_eq!(
        read(json!({"plan": {}})).unwrap(),
        Action::Plan(PlanAction::default())
    );
    assert_eq!(
        read(json!({"prompt": "go"})).unwrap(),
        Action::Prompt("go".into())
    );
    for bad in [
        json!({}),
        json!({"prompt": "a", "plan": {}}),
        json!({"pormpt": "a"}),
    ] {
        assert!(read(bad.clone()).is_err(), "{bad}");
    }
    // What the model writes (the store keeps it) reads back.
    for action in [
        Action::Prompt("go".into()),
        Action::Plan(PlanAction {
            request: Some("r".into()),
        }),
    ] {
        assert_eq!(
            read(serde_json::to_value(&action).unwrap()).unwrap(),
            action
        );
    }
}
