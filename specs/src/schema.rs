//! JSON Schemas of whole spec files, for editors (`# yaml-language-server: $schema=…`).
//!
//! Each describes one document as the parser reads it from Git: `apiVersion` and `kind` fixed,
//! `metadata` with the name rule, and the `spec` from the same derive as the CRDs. A document
//! has no `status` in Git: the controller writes status elsewhere.

use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

use crate::model::{API_VERSION, AgentSpec, Kind, ProjectSpec, TaskSpec, ToolSpec};
use crate::names::{DNS_LABEL_MAX, DNS_LABEL_PATTERN};

/// `task.json`, the name `agentops schema --dir` writes the schema of a kind under.
pub fn file_name(kind: Kind) -> String {
    format!("{}.json", kind.as_str().to_ascii_lowercase())
}

/// The schema that any agentops document matches, chosen by its `kind`: for files that hold
/// documents of several kinds, since an editor takes one schema per file.
pub const ALL_FILE_NAME: &str = "all.json";

/// The schema of one kind's documents.
pub fn document_schema(kind: Kind) -> Value {
    let mut generator = generator();
    let document = document(kind, &mut generator);
    root(
        &format!("agentops {kind}"),
        document,
        generator.take_definitions(true),
    )
}

/// The schema of a document of any of the four kinds.
pub fn all_schema() -> Value {
    let mut generator = generator();
    let mut defs = Map::new();
    let mut cases = Vec::new();
    for kind in Kind::ALL {
        let name = format!("{kind}Document");
        defs.insert(name.clone(), document(kind, &mut generator));
        cases.push(json!({
            "if": {"properties": {"kind": {"const": kind.as_str()}}, "required": ["kind"]},
            "then": {"$ref": format!("#/$defs/{name}")},
        }));
    }
    defs.extend(generator.take_definitions(true));
    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    root(
        "agentops resource",
        json!({
            "type": "object",
            "required": ["apiVersion", "kind"],
            "properties": {"kind": {"enum": kinds}},
            "allOf": cases,
        }),
        defs,
    )
}

fn generator() -> SchemaGenerator {
    SchemaSettings::draft2020_12().into_generator()
}

fn root(title: &str, body: Value, defs: Map<String, Value>) -> Value {
    let mut schema = Map::new();
    schema.insert(
        "$schema".into(),
        "https://json-schema.org/draft/2020-12/schema".into(),
    );
    schema.insert("title".into(), title.into());
    if let Value::Object(body) = body {
        schema.extend(body);
    }
    if !defs.is_empty() {
        schema.insert("$defs".into(), Value::Object(defs));
    }
    Value::Object(schema)
}

fn document(kind: Kind, generator: &mut SchemaGenerator) -> Value {
    let spec = match kind {
        Kind::Project => generator.subschema_for::<ProjectSpec>(),
        Kind::Task => generator.subschema_for::<TaskSpec>(),
        Kind::Agent => generator.subschema_for::<AgentSpec>(),
        Kind::Tool => generator.subschema_for::<ToolSpec>(),
    };
    let mut spec = spec.to_value();
    if kind == Kind::Tool {
        // The one rule across fields of a spec that a schema can state: the CRD says it in CEL.
        spec = json!({
            "allOf": [spec],
            "if": {"properties": {"type": {"const": "script"}}, "required": ["type"]},
            "then": {"required": ["command"], "properties": {"command": {"minItems": 1}}},
        });
    }
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": false,
        "properties": {
            "apiVersion": {"const": API_VERSION},
            "kind": {"const": kind.as_str()},
            "metadata": metadata(),
            "spec": spec,
        },
    })
}

fn metadata() -> Value {
    let text_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    json!({
        "type": "object",
        "required": ["name"],
        "additionalProperties": false,
        "properties": {
            "name": {
                "description": "A DNS-1123 label: lowercase letters, digits and '-', at most 63 characters.",
                "type": "string",
                "pattern": DNS_LABEL_PATTERN,
                "maxLength": DNS_LABEL_MAX,
            },
            "namespace": {
                "description": "Read when the file is applied as a custom resource; not used from Git.",
                "type": "string",
            },
            "labels": text_map,
            "annotations": text_map,
        },
    })
}
