//! A fake Kubernetes API server for `up --kube` (the library's in-process one, which serves
//! list and watch for the four kinds and records every request), a kubeconfig pointing at it,
//! and the checks every request it got must pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use agentops::cli::fake_kube::{FakeKube, Recorded};
use serde_json::Value;

use super::procs::{Proc, free_port};

pub use agentops_specs::Kind;

pub struct KubeEnv {
    pub fake: FakeKube,
    pub kubeconfig: PathBuf,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub log: PathBuf,
}

impl KubeEnv {
    pub async fn new() -> KubeEnv {
        let fake = FakeKube::start(true)
            .await
            .expect("start the fake API server");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = fake.kubeconfig(dir.path()).unwrap();
        KubeEnv {
            fake,
            kubeconfig,
            addr: format!("127.0.0.1:{}", free_port()),
            log: dir.path().join("controller.log"),
            dir,
        }
    }

    /// `agentops up --kube --namespace team` on `repo` and `database`, with a short status
    /// interval, the embedded agents, and `KUBECONFIG` pointing at the fake server.
    pub fn start(&self, repo: &Path, database: &str, extra: &[&str]) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentops"));
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("AGENTOPS_") || key.starts_with("KUBE") {
                command.env_remove(&*key);
            }
        }
        command
            .arg("up")
            .args(["--kube", "--namespace", "team"])
            .arg("--repo")
            .arg(repo)
            .args(["--database", database])
            .args(["--listen", &self.addr])
            .args(["--heartbeat", "1s", "--status-interval", "300ms"])
            .args(extra)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .env_remove("OPENROUTER_API_KEY")
            .env("AGENTOPS_LOG", "info");
        Proc::spawn("controller", command, &self.log)
    }

    /// Status patches of `plural/name` in namespace `team`, in order, with their bodies.
    pub fn status_patches(&self, plural: &str, name: &str) -> Vec<Value> {
        let path = format!("/apis/agentops.dev/v1alpha1/namespaces/team/{plural}/{name}/status");
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path == path)
            .map(|r| r.body)
            .collect()
    }

    /// The last status applied to `plural/name`.
    pub fn status(&self, plural: &str, name: &str) -> Option<Value> {
        self.status_patches(plural, name)
            .pop()
            .map(|b| b["status"].clone())
    }

    /// Finalizer patches of `plural/name`, with the time each was received.
    pub fn finalizer_patches(&self, plural: &str, name: &str) -> Vec<Recorded> {
        let path = format!("/apis/agentops.dev/v1alpha1/namespaces/team/{plural}/{name}");
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path == path)
            .collect()
    }

    /// Every request the server got is one the controller should make, made as it should be.
    pub fn check_requests(&self) {
        for r in self.fake.requests() {
            let what = format!("{} {} {:?} -> {}", r.method, r.path, r.query, r.status);
            if r.path
                .starts_with("/apis/coordination.k8s.io/v1/namespaces/team/leases/")
                || r.path == "/apis/coordination.k8s.io/v1/namespaces/team/leases"
            {
                // Leader election: the Lease is read (404 before it exists), created and
                // renewed in the namespace, and never refused a write.
                let expected: &[u16] = match r.method.as_str() {
                    "GET" => &[200, 404],
                    "POST" => &[201],
                    "PUT" => &[200],
                    _ => &[],
                };
                assert!(expected.contains(&r.status), "{what}");
                continue;
            }
            match r.method.as_str() {
                "GET" => {
                    assert!(
                        r.path
                            .starts_with("/apis/agentops.dev/v1alpha1/namespaces/team/"),
                        "a read outside the namespace: {what}"
                    );
                    assert_eq!(r.status, 200, "{what}");
                }
                "PATCH" if r.is_status_patch() => {
                    assert_eq!(
                        r.content_type.as_deref(),
                        Some("application/apply-patch+yaml"),
                        "{what}"
                    );
                    assert_eq!(
                        r.query.get("fieldManager").map(String::as_str),
                        Some("agentops"),
                        "{what}"
                    );
                    assert_eq!(
                        r.query.get("force").map(String::as_str),
                        Some("true"),
                        "{what}"
                    );
                    assert_eq!(r.status, 200, "{what}");
                    assert!(r.body["status"].is_object(), "{what}: {}", r.body);
                }
                "PATCH" if r.path.starts_with("/apis/events.k8s.io/") => {
                    assert_eq!(r.status, 200, "{what}");
                }
                "PATCH" => {
                    assert_eq!(
                        r.content_type.as_deref(),
                        Some("application/merge-patch+json"),
                        "{what}"
                    );
                    assert_eq!(
                        r.query.get("fieldManager").map(String::as_str),
                        Some("agentops"),
                        "{what}"
                    );
                    // A conflict is the API server refusing a stale version; the next round
                    // decides again.
                    assert!(matches!(r.status, 200 | 409), "{what}");
                    let finalizers = &r.body["metadata"]["finalizers"];
                    assert!(finalizers.is_array(), "{what}: {}", r.body);
                    assert!(
                        r.body["metadata"]["resourceVersion"].is_string(),
                        "{what}: {}",
                        r.body
                    );
                }
                "POST" if r.path == "/apis/authentication.k8s.io/v1/tokenreviews" => {
                    // An agent's ServiceAccount token, asked about as the API server expects.
                    assert_eq!(r.status, 201, "{what}");
                    assert_eq!(r.body["kind"], "TokenReview", "{what}: {}", r.body);
                    assert!(r.body["spec"]["token"].is_string(), "{what}: {}", r.body);
                }
                "POST" => {
                    assert_eq!(
                        r.path, "/apis/events.k8s.io/v1/namespaces/team/events",
                        "{what}"
                    );
                    assert_eq!(r.status, 201, "{what}");
                    assert_eq!(r.body["reportingController"], "agentops", "{what}");
                }
                _ => panic!("an unexpected request: {what}"),
            }
        }
    }
}

/// The condition `kind` of a status.
pub fn condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}
