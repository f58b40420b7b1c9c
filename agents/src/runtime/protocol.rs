//! The JSON bodies of `agents/PROTOCOL.md`.
//!
//! Durations are read as `f64` seconds: the controller sends fractions when its lease or
//! heartbeat is not a whole number of seconds, which also lets tests run at millisecond pace.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The role an agent registers as; a task assigned to a role may go to any agent of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentType {
    Cos,
    Seed,
    Specialist,
    Meta,
}

impl AgentType {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentType::Cos => "cos",
            AgentType::Seed => "seed",
            AgentType::Specialist => "specialist",
            AgentType::Meta => "meta",
        }
    }
}

impl fmt::Display for AgentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown agent type `{0}`: expected cos, seed, specialist or meta")]
pub struct UnknownAgentType(String);

impl FromStr for AgentType {
    type Err = UnknownAgentType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            AgentType::Cos,
            AgentType::Seed,
            AgentType::Specialist,
            AgentType::Meta,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| UnknownAgentType(s.to_owned()))
    }
}

/// A task leased to this agent: one element of the claim answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: String,
    /// The fencing token every report about this task carries.
    pub run_lease: i64,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// Exactly one of `prompt`, `run`, `tool` or `plan`, as in the task's spec. Kept as JSON
    /// so that an action kind this agent does not know fails that one task, not the claim.
    pub action: serde_json::Value,
    #[serde(default)]
    pub output: serde_json::Value,
    #[serde(default)]
    pub acceptance_criteria: Vec<String>,
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// The source revision the task was dispatched at.
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The comments of the review that rejected this task's last output (a pull request
    /// closed without merging), when one did.
    #[serde(default)]
    pub review_comments: Option<String>,
}

impl Assignment {
    /// How long the handler may run; `None` when the task sets no (positive) timeout.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_seconds
            .filter(|s| *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
    }
}

/// An output a handler stored somewhere; recorded with the task's completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Where it is: an object-storage key or a branch path.
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// A file for the controller to commit as (part of) a task's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Relative to the repository root, within the task's `output.paths`.
    pub path: String,
    /// The content as text…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// …or as base64, for bytes that are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// `file` (the default) or `executable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl OutputFile {
    pub fn text(path: impl Into<String>, content: impl Into<String>) -> OutputFile {
        OutputFile {
            path: path.into(),
            content: Some(content.into()),
            content_base64: None,
            mode: None,
        }
    }

    /// Any bytes: sent as text when they are UTF-8, as base64 otherwise.
    pub fn bytes(path: impl Into<String>, content: Vec<u8>) -> OutputFile {
        use base64::Engine as _;
        match String::from_utf8(content) {
            Ok(text) => OutputFile::text(path, text),
            Err(e) => OutputFile {
                path: path.into(),
                content: None,
                content_base64: Some(
                    base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
                ),
                mode: None,
            },
        }
    }

    pub fn executable(mut self) -> OutputFile {
        self.mode = Some("executable".to_owned());
        self
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct RegisterRequest {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: AgentType,
    pub capabilities: Vec<String>,
    pub concurrency: usize,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RegisterResponse {
    pub token: String,
    pub lease_seconds: f64,
    pub heartbeat_seconds: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct ClaimRequest {
    pub max: usize,
    pub wait_ms: u64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ClaimResponse {
    pub tasks: Vec<Assignment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct LeaseRef {
    pub id: String,
    pub run_lease: i64,
}

#[derive(Debug, Serialize)]
pub(crate) struct HeartbeatRequest<'a> {
    pub tasks: &'a [LeaseRef],
}

#[derive(Debug, Deserialize)]
pub(crate) struct HeartbeatResponse {
    pub tasks: Vec<LeaseState>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct LeaseState {
    pub id: String,
    pub held: bool,
    #[serde(default)]
    pub cancel: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Completion {
    pub id: String,
    pub run_lease: i64,
    pub result: serde_json::Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<OutputFile>,
}

#[derive(Debug, Serialize)]
pub(crate) struct CompleteRequest<'a> {
    pub tasks: Vec<&'a Completion>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompleteResponse {
    pub tasks: Vec<CompleteAnswer>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompleteAnswer {
    pub id: String,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// A report about one task, sent to `/api/v1/tasks/{id}/{verb}`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum Report {
    Progress {
        run_lease: i64,
        message: String,
    },
    Fail {
        run_lease: i64,
        error: String,
        retryable: bool,
    },
    Question {
        run_lease: i64,
        question: String,
    },
    Release {
        run_lease: i64,
    },
}

impl Report {
    pub fn verb(&self) -> &'static str {
        match self {
            Report::Progress { .. } => "progress",
            Report::Fail { .. } => "fail",
            Report::Question { .. } => "question",
            Report::Release { .. } => "release",
        }
    }
}

/// The prefix of every NATS name when none is configured.
pub const DEFAULT_BUS_PREFIX: &str = "agentops";

/// The NATS names of one installation, all derived from one prefix (`agentops` unless
/// configured): events on `<prefix>.events.<type>` in the stream `<PREFIX>_EVENTS`,
/// announcements on `<prefix>.dispatch.<pool>` in `<PREFIX>_DISPATCH`, read through the
/// durable consumers `<prefix>-<pool>`.
///
/// Two installations on one NATS server keep apart by taking different prefixes; so do a
/// benchmark and the installation it runs next to. The controller and its agents must agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusNames {
    prefix: String,
}

#[derive(Debug, thiserror::Error)]
#[error("bus prefix {0:?}: use 1 to 32 ASCII letters, digits, '-' or '_'")]
pub struct InvalidBusPrefix(pub String);

impl BusNames {
    /// A prefix is one subject token and part of a stream name, so only characters both
    /// allow without escaping.
    pub fn new(prefix: &str) -> Result<BusNames, InvalidBusPrefix> {
        let valid = (1..=32).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(BusNames {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(InvalidBusPrefix(prefix.to_owned()))
        }
    }

    /// `<prefix>.events`: an event of type `t` goes on `<prefix>.events.t`.
    pub fn events_subjects(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// `<prefix>.dispatch`: ready work for pool `p` is announced on `<prefix>.dispatch.p`.
    pub fn dispatch_subjects(&self) -> String {
        format!("{}.dispatch", self.prefix)
    }

    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.prefix.to_ascii_uppercase())
    }

    pub fn dispatch_stream(&self) -> String {
        format!("{}_DISPATCH", self.prefix.to_ascii_uppercase())
    }

    /// The durable consumer the agents of `pool` share.
    pub fn consumer(&self, pool: &str) -> String {
        format!("{}-{pool}", self.prefix)
    }
}

impl Default for BusNames {
    fn default() -> Self {
        BusNames {
            prefix: DEFAULT_BUS_PREFIX.to_owned(),
        }
    }
}

impl FromStr for BusNames {
    type Err = InvalidBusPrefix;

    fn from_str(prefix: &str) -> Result<Self, Self::Err> {
        BusNames::new(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_claim_example_of_the_protocol() {
        let task: Assignment = serde_json::from_str(
            r#"{"id": "5b1e", "run_lease": 7, "attempt": 0,
                "project": "launch-website", "name": "draft-copy",
                "title": "Draft the landing page copy", "description": "",
                "action": {"prompt": "Write … into site/copy.md"},
                "output": {"mode": "pull-request", "paths": ["site/"]},
                "acceptance_criteria": ["copy.md exists"],
                "timeout_seconds": 1800, "revision": "main@sha1:abc",
                "lease_expires_at": "2026-11-25T10:00:30.000Z"}"#,
        )
        .unwrap();
        assert_eq!(task.run_lease, 7);
        assert_eq!(task.timeout(), Some(Duration::from_secs(1800)));
        assert_eq!(task.action["prompt"], "Write … into site/copy.md");
        assert!(task.lease_expires_at.is_some());
    }

    #[test]
    fn a_null_or_zero_timeout_means_none() {
        for timeout in ["null", "0", "-1"] {
            let task: Assignment = serde_json::from_str(&format!(
                r#"{{"id": "a", "run_lease": 1, "action": {{}}, "timeout_seconds": {timeout}}}"#
            ))
            .unwrap();
            assert_eq!(task.timeout(), None, "timeout_seconds: {timeout}");
        }
    }

    #[test]
    fn reports_serialize_as_their_protocol_bodies() {
        let fail = Report::Fail {
            run_lease: 3,
            error: "boom".into(),
            retryable: true,
        };
        assert_eq!(fail.verb(), "fail");
        assert_eq!(
            serde_json::to_value(&fail).unwrap(),
            serde_json::json!({"run_lease": 3, "error": "boom", "retryable": true})
        );
        assert_eq!(
            serde_json::to_value(Report::Release { run_lease: 3 }).unwrap(),
            serde_json::json!({"run_lease": 3})
        );
    }

    #[test]
    fn output_files_are_text_or_base64() {
        assert_eq!(
            serde_json::to_value(OutputFile::text("site/a.md", "hi")).unwrap(),
            serde_json::json!({"path": "site/a.md", "content": "hi"})
        );
        assert_eq!(
            serde_json::to_value(OutputFile::bytes("site/b.bin", vec![0xff, 0x00]).executable())
                .unwrap(),
            serde_json::json!({"path": "site/b.bin", "content_base64": "/wA=", "mode": "executable"})
        );
    }

    #[test]
    fn agent_types_round_trip() {
        for name in ["cos", "seed", "specialist", "meta"] {
            assert_eq!(name.parse::<AgentType>().unwrap().as_str(), name);
        }
        assert!("boss".parse::<AgentType>().is_err());
    }

    #[test]
    fn bus_names_follow_the_prefix() {
        let default = BusNames::default();
        assert_eq!(default.events_stream(), "AGENTOPS_EVENTS");
        assert_eq!(default.dispatch_stream(), "AGENTOPS_DISPATCH");
        assert_eq!(default.events_subjects(), "agentops.events");
        assert_eq!(default.dispatch_subjects(), "agentops.dispatch");
        assert_eq!(default.consumer("seed"), "agentops-seed");

        let bench: BusNames = "bench_42-a".parse().unwrap();
        assert_eq!(bench.events_stream(), "BENCH_42-A_EVENTS");
        assert_eq!(bench.dispatch_subjects(), "bench_42-a.dispatch");
        assert_eq!(bench.consumer("writer"), "bench_42-a-writer");

        for bad in ["", "a.b", "a b", "a*", "a>", "ä", &"x".repeat(33)] {
            let error = bad.parse::<BusNames>().unwrap_err();
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
    }
}
