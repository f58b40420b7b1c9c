//! A custom resource as the Kubernetes source keeps it: where it is, what state it is in, and
//! its spec as the YAML document the Git source would read, so that one parser checks both.
//! Pure: nothing here talks to the API server.

use std::collections::BTreeMap;
use std::sync::Arc;

use agentops_specs::{API_VERSION, Kind};
use kube::api::DynamicObject;
use serde_json::{Value, json};

/// Held on tasks and projects so that deleting one cancels its work before it goes.
pub const FINALIZER: &str = "agentops.dev/cancel";

/// The annotation `kubectl apply` keeps the whole object in: not part of the spec.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The source name of a namespace.
pub fn source_name(namespace: &str) -> String {
    format!("kube:{namespace}")
}

/// The namespace of a `kube:<namespace>` source name.
pub fn namespace_of_source(source: &str) -> Option<&str> {
    source.strip_prefix("kube:")
}

/// Where a custom resource is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CrRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl CrRef {
    /// The path diagnostics and the store know the resource by: `<namespace>/<plural>/<name>`.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.kind.plural(), self.name)
    }

    /// The resource a [`CrRef::path`] names.
    pub fn from_path(path: &str) -> Option<CrRef> {
        let mut parts = path.splitn(3, '/');
        let namespace = parts.next()?;
        let plural = parts.next()?;
        let name = parts.next()?;
        let kind = Kind::ALL.into_iter().find(|k| k.plural() == plural)?;
        Some(CrRef {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// One custom resource as last seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub cr: CrRef,
    pub uid: Option<String>,
    pub resource_version: String,
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set: the resource waits for its finalizers.
    pub deleting: bool,
    /// Its finalizers hold [`FINALIZER`].
    pub has_finalizer: bool,
    pub finalizers: Vec<String>,
    /// A task's `spec.project` as written.
    pub project: Option<String>,
    /// `apiVersion`, `kind`, `metadata` (name, labels, annotations) and `spec`, as YAML.
    pub document: Arc<[u8]>,
}

impl Resource {
    /// `None` for an object without a name or namespace, which the API server never sends.
    pub fn from_dynamic(kind: Kind, object: &DynamicObject) -> Option<Resource> {
        let meta = &object.metadata;
        let name = meta.name.clone()?;
        let namespace = meta.namespace.clone()?;
        let spec = object.data.get("spec").cloned().unwrap_or(Value::Null);
        let project = match kind {
            Kind::Task => spec
                .get("project")
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let mut metadata = serde_json::Map::new();
        metadata.insert("name".into(), Value::String(name.clone()));
        if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
            metadata.insert("labels".into(), json!(labels));
        }
        let annotations: BTreeMap<&String, &String> = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| *k != LAST_APPLIED)
            .collect();
        if !annotations.is_empty() {
            metadata.insert("annotations".into(), json!(annotations));
        }
        let document = json!({
            "apiVersion": API_VERSION,
            "kind": kind.as_str(),
            "metadata": metadata,
            "spec": spec,
        });
        // A JSON value always has a YAML spelling; JSON text is YAML as a last resort.
        let document = serde_saphyr::to_string(&document)
            .unwrap_or_else(|_| document.to_string())
            .into_bytes()
            .into();
        Some(Resource {
            cr: CrRef {
                kind,
                namespace,
                name,
            },
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            generation: meta.generation,
            deleting: meta.deletion_timestamp.is_some(),
            has_finalizer: meta.finalizers.iter().flatten().any(|f| f == FINALIZER),
            finalizers: meta.finalizers.clone().unwrap_or_default(),
            project,
            document,
        })
    }

    /// Whether the resource carries work that deleting it must cancel first.
    pub fn wants_finalizer(&self) -> bool {
        matches!(self.cr.kind, Kind::Task | Kind::Project)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentops_specs::parse_file;

    fn task(extra_meta: Value, spec: Value) -> DynamicObject {
        let mut value = json!({
            "apiVersion": "agentops.dev/v1alpha1",
            "kind": "Task",
            "metadata": {"name": "draft", "namespace": "team", "resourceVersion": "7",
                "generation": 2, "uid": "u-1"},
            "spec": spec,
        });
        for (k, v) in extra_meta.as_object().unwrap() {
            value["metadata"][k] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_task_becomes_the_document_the_git_parser_reads() {
        let object = task(
            json!({"labels": {"team": "web"}, "annotations": {LAST_APPLIED: "{}", "note": "x"},
                "finalizers": [FINALIZER]}),
            json!({"project": "web", "title": "Draft", "action": {"prompt": "go"}}),
        );
        let resource = Resource::from_dynamic(Kind::Task, &object).unwrap();
        assert_eq!(resource.cr.path(), "team/tasks/draft");
        assert_eq!(
            CrRef::from_path("team/tasks/draft"),
            Some(resource.cr.clone())
        );
        assert_eq!(resource.project.as_deref(), Some("web"));
        assert_eq!(resource.resource_version, "7");
        assert!(resource.has_finalizer && !resource.deleting);
        let parsed = parse_file(&resource.cr.path(), &resource.document);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let object = &parsed.objects[0];
        assert_eq!(object.metadata.labels["team"], "web");
        assert_eq!(
            object.metadata.annotations.len(),
            1,
            "{:?}",
            object.metadata
        );
        assert_eq!(
            object.key(),
            agentops_specs::ObjectKey::Task {
                project: "web".into(),
                name: "draft".into()
            }
        );
    }

    #[test]
    fn a_spec_the_parser_refuses_is_reported_at_the_resource_path() {
        let object = task(json!({}), json!({"project": "web", "title": "Draft"}));
        let resource = Resource::from_dynamic(Kind::Task, &object).unwrap();
        let parsed = parse_file(&resource.cr.path(), &resource.document);
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);
        assert_eq!(parsed.errors[0].path, "team/tasks/draft");
        assert!(
            parsed.errors[0].message.contains("action"),
            "{:?}",
            parsed.errors
        );
    }

    #[test]
    fn source_names_carry_the_namespace() {
        assert_eq!(source_name("team"), "kube:team");
        assert_eq!(namespace_of_source("kube:team"), Some("team"));
        assert_eq!(namespace_of_source("default"), None);
        assert_eq!(CrRef::from_path("team/widgets/x"), None);
    }
}
