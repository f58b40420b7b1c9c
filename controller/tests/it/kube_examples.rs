//! `examples/kubernetes/`: the example projects, agents and tools as custom resources. Each
//! document reads into the specs crate's resource type, passes the same checks as a Git
//! file, and declares exactly what the Git examples declare.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use agentops_specs::{
    AgentResource, Object, ProjectResource, Spec, TaskResource, ToolResource, parse_file, validate,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The spec files under `dir`, relative to it, with their text.
fn spec_files(dir: &Path) -> Vec<(String, String)> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "yaml" || x == "yml")
        })
        .map(|e| {
            let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy();
            let text = std::fs::read_to_string(e.path()).unwrap();
            (rel.replace('\\', "/"), text)
        })
        .collect()
}

/// Parse files as the Git source does, failing on any error.
fn parse_all(files: &[(String, String)]) -> Vec<Object> {
    let mut objects = Vec::new();
    for (rel, text) in files {
        let parsed = parse_file(rel, text.as_bytes());
        assert!(parsed.is_ok(), "{rel}: {:?}", parsed.errors);
        objects.extend(parsed.objects);
    }
    objects
}

fn resource<T: DeserializeOwned>(rel: &str, doc: &Value) -> T {
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{rel}: {} {} is not a valid resource: {e}",
            doc["kind"], doc["metadata"]["name"]
        )
    })
}

#[test]
fn the_kubernetes_examples_are_the_git_examples_as_custom_resources() {
    let dir = examples().join("kubernetes");
    let files = spec_files(&dir);
    assert!(
        !files.is_empty(),
        "no custom resources in {}",
        dir.display()
    );

    // Every document is a custom resource of ours, and reads into its type.
    let mut by_kind_and_name: BTreeMap<(String, String), Spec> = BTreeMap::new();
    for (rel, text) in &files {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{rel}: {e}"));
        for doc in docs {
            assert_eq!(doc["apiVersion"], "agentops.dev/v1alpha1", "{rel}");
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
            let spec = match kind.as_str() {
                "Project" => Spec::Project(resource::<ProjectResource>(rel, &doc).spec),
                "Task" => Spec::Task(resource::<TaskResource>(rel, &doc).spec),
                "Agent" => Spec::Agent(resource::<AgentResource>(rel, &doc).spec),
                "Tool" => Spec::Tool(resource::<ToolResource>(rel, &doc).spec),
                other => panic!("{rel}: a {other}"),
            };
            // In a namespace a name is unique per kind, whatever the task's project.
            let previous = by_kind_and_name.insert((kind.clone(), name.clone()), spec);
            assert!(previous.is_none(), "{rel}: a second {kind} {name}");
        }
    }

    // The Git parser and the checks across objects accept them as they are, outside any
    // `projects/<p>/tasks/` folder: each task names its project.
    let objects = parse_all(&files);
    let validation = validate(&objects);
    assert!(validation.is_ok(), "{:?}", validation.diagnostics);
    assert_eq!(objects.len(), by_kind_and_name.len());
    for object in &objects {
        let key = (object.kind().as_str().to_owned(), object.name().to_owned());
        assert_eq!(
            by_kind_and_name.get(&key),
            Some(&object.spec),
            "{key:?}: the parser reads another spec than the resource type"
        );
    }

    // And they are the Git examples: the same objects, with the same specs.
    let git_files: Vec<(String, String)> = spec_files(&examples())
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with("kubernetes/"))
        .collect();
    let git: BTreeMap<(String, String), Spec> = parse_all(&git_files)
        .into_iter()
        .map(|o| {
            let key = (o.kind().as_str().to_owned(), o.name().to_owned());
            (key, o.spec)
        })
        .collect();
    assert_eq!(
        git.keys().collect::<Vec<_>>(),
        by_kind_and_name.keys().collect::<Vec<_>>(),
        "examples/kubernetes/ declares other objects than the Git examples"
    );
    for (key, spec) in &git {
        assert_eq!(
            &by_kind_and_name[key], spec,
            "{key:?} differs from its Git file"
        );
    }

    // `agentops validate` says the same of the folder.
    let out = Command::new(env!("CARGO_BIN_EXE_agentops"))
        .arg("validate")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{} objects, no errors", objects.len())),
        "{stderr}"
    );
}
