//! The CustomResourceDefinitions of the four kinds, as `kubectl apply` takes them.
//!
//! `kube` derives each CRD from the spec and status structs of [`crate::model`] and
//! [`crate::status`]; this module adds what the derive cannot say and the API server can check:
//! the name rule on `metadata.name`, and the rule that a script tool has a command.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};

use crate::model::{AgentResource, Kind, ProjectResource, TaskResource, ToolResource};
use crate::names::{DNS_LABEL_MAX, DNS_LABEL_PATTERN};

#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("the {kind} CRD does not convert to JSON and back")]
    Json {
        kind: Kind,
        #[source]
        source: serde_json::Error,
    },
    #[error("the {kind} CRD does not serialize to YAML")]
    Yaml {
        kind: Kind,
        #[source]
        source: serde_saphyr::ser::Error,
    },
}

/// The CRD of one kind.
pub fn crd(kind: Kind) -> Result<CustomResourceDefinition, CrdError> {
    let derived = match kind {
        Kind::Project => ProjectResource::crd(),
        Kind::Task => TaskResource::crd(),
        Kind::Agent => AgentResource::crd(),
        Kind::Tool => ToolResource::crd(),
    };
    let json_error = |source| CrdError::Json { kind, source };
    let mut value = serde_json::to_value(derived).map_err(json_error)?;
    if let Some(schema) = value.pointer_mut("/spec/versions/0/schema/openAPIV3Schema") {
        complete_schema(kind, schema);
    }
    serde_json::from_value(value).map_err(json_error)
}

/// `agentops.dev_tasks.yaml`, the name `agentops crds --dir` writes a CRD under.
pub fn file_name(kind: Kind) -> String {
    format!("{}_{}.yaml", crate::model::API_GROUP, kind.plural())
}

/// One CRD as a YAML document.
pub fn to_yaml(kind: Kind) -> Result<String, CrdError> {
    let crd = crd(kind)?;
    serde_saphyr::to_string(&crd).map_err(|source| CrdError::Yaml { kind, source })
}

/// All four CRDs as one multi-document YAML stream, in [`Kind::ALL`] order.
pub fn to_yaml_stream() -> Result<String, CrdError> {
    let mut out = String::new();
    for kind in Kind::ALL {
        out.push_str("---\n");
        out.push_str(&to_yaml(kind)?);
    }
    Ok(out)
}

fn complete_schema(kind: Kind, schema: &mut Value) {
    // Kubernetes lets a CRD constrain `metadata.name` and nothing else of the metadata.
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        properties.insert(
            "metadata".into(),
            json!({
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "pattern": DNS_LABEL_PATTERN,
                        "maxLength": DNS_LABEL_MAX,
                    },
                },
            }),
        );
    }
    structural(schema);
    if kind == Kind::Tool
        && let Some(spec) = schema.pointer_mut("/properties/spec")
        && let Some(spec) = spec.as_object_mut()
    {
        spec.insert(
            "x-kubernetes-validations".into(),
            json!([{
                "rule": SCRIPT_NEEDS_COMMAND_CEL,
                "message": "a script tool needs a `command`",
                "fieldPath": ".command",
            }]),
        );
    }
}

/// [`crate::parse`]'s rule that a script tool names a command, as a CEL rule.
pub const SCRIPT_NEEDS_COMMAND_CEL: &str =
    "self.type != 'script' || (has(self.command) && size(self.command) > 0)";

/// Two things a structural schema says its own way. An int-or-string may only carry
/// `anyOf: [{type: integer}, {type: string}]` exactly, and the derive's structural rewrite strips
/// the types out of every `anyOf`: put them back. A map of arbitrary values is
/// `x-kubernetes-preserve-unknown-fields` rather than `additionalProperties: true`.
fn structural(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                map.insert(
                    "anyOf".into(),
                    json!([{"type": "integer"}, {"type": "string"}]),
                );
                // The parser refuses a null priority; the derive marks every optional
                // int-or-string nullable.
                map.remove("nullable");
            }
            // A map of any JSON (a tool's `with`): Kubernetes keeps it only when told to.
            if map.get("additionalProperties") == Some(&Value::Bool(true)) {
                map.remove("additionalProperties");
                map.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
            }
            for value in map.values_mut() {
                structural(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(structural),
        _ => {}
    }
}
