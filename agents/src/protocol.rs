//! The agent protocol (`agents/PROTOCOL.md`): every request and answer body of its HTTP
//! operations, and the NATS names it uses. The controller's API reads and writes these types
//! and the agent runtime's client sends and reads the same ones, so the two sides cannot
//! drift apart.
//!
//! Task ids are strings here: the controller's are UUIDs and it parses them, while an agent
//! treats them as opaque. Durations are `f64` seconds, because the controller sends fractions
//! when its lease or heartbeat is not a whole number of seconds (which also lets tests run at
//! millisecond pace).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use agentops_specs::model::{AgentType, UnknownAgentType};

/// `POST /api/v1/agents/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub name: String,
    #[serde(rename = "type")]
    pub agent_type: AgentType,
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// How many tasks the agent runs at once.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// The token this agent holds, when it registers again: a name held by a live agent is
    /// given only to the holder of its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The 409 answer to a registration under a name a live agent holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameHeld {
    pub error: String,
    /// The name asked for.
    pub agent: String,
    /// When the holder was last seen (registered, claimed, heartbeated, reported).
    pub last_heartbeat: DateTime<Utc>,
    /// When the name is free unless the holder shows up again.
    pub free_after_seconds: f64,
}

/// The 413 and 429 answers: which limit, and when to try again (429).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitExceeded {
    pub error: String,
    /// `body_size`, `rate`, or `agents`.
    pub limit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
}

fn one() -> u32 {
    1
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    #[serde(default)]
    pub agent: String,
    /// The bearer token of every later call; registering again replaces it.
    pub token: String,
    /// Seconds, with fractions: a lease of 2500 ms is 2.5, not 2, and a heartbeat of 500 ms is
    /// 0.5, not 0 (which would have agents heartbeat as fast as they can).
    pub lease_seconds: f64,
    pub heartbeat_seconds: f64,
}

/// `POST /api/v1/claim`: a long-poll for up to `max` tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    #[serde(default = "one")]
    pub max: u32,
    /// How long to wait for work; the controller caps it at 60 s.
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub tasks: Vec<Assignment>,
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
    #[serde(default, serialize_with = "seconds::serialize")]
    pub timeout_seconds: Option<f64>,
    /// The source revision the task was dispatched at.
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The comments of the review that rejected this task's last output (a pull request
    /// closed without merging), when one did: what this attempt should do differently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// Whole seconds go out as integers, as the controller's store holds them; fractions as
/// fractions.
mod seconds {
    use serde::Serializer;

    /// Below 2^53 every integer is exact in an `f64`.
    const EXACT: f64 = 9_007_199_254_740_992.0;

    pub fn serialize<S: Serializer>(value: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match *value {
            None => s.serialize_none(),
            Some(v) if v.fract() == 0.0 && v.abs() < EXACT => s.serialize_some(&(v as i64)),
            Some(v) => s.serialize_some(&v),
        }
    }
}

/// `(task, run_lease)`: which lease a heartbeat is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    pub id: String,
    pub run_lease: i64,
}

/// `POST /api/v1/heartbeat`, also sent when holding nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub tasks: Vec<LeaseRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub tasks: Vec<LeaseState>,
}

/// The answer to a heartbeat, per task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    pub id: String,
    /// The lease is still this agent's and was extended.
    pub held: bool,
    /// The task was cancelled (removed from the source, or by a person): stop.
    #[serde(default)]
    pub cancel: bool,
}

/// `POST /api/v1/tasks/{id}/progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRequest {
    pub run_lease: i64,
    pub message: String,
}

/// `POST /api/v1/tasks/{id}/complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub run_lease: i64,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<OutputFile>,
}

/// One completion of `POST /api/v1/complete`: a [`CompleteRequest`] with its task's id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub id: String,
    pub run_lease: i64,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<OutputFile>,
}

/// `POST /api/v1/complete`: many completions at once. Generic so that a client can send
/// completions it keeps (`CompleteManyRequest<&Completion>`) for a retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteManyRequest<C = Completion> {
    pub tasks: Vec<C>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteManyResponse {
    pub tasks: Vec<CompleteAnswer>,
}

/// Whether one completion of a batch was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteAnswer {
    pub id: String,
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An output a handler stored somewhere; recorded with the task's completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub name: String,
    #[serde(rename = "type", default = "other")]
    pub kind: String,
    /// Where it is: an object-storage key or a branch path.
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

fn other() -> String {
    "other".to_owned()
}

/// A file for the controller to commit as (part of) a task's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputFile {
    /// Relative to the repository root, within the task's `output.paths`.
    pub path: String,
    /// The content as text…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// …or as base64, for bytes that are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// `file` (the default) or `executable`; `symlink` is always refused.
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

/// `POST /api/v1/tasks/{id}/fail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailRequest {
    pub run_lease: i64,
    pub error: String,
    /// Whether another attempt may succeed.
    #[serde(default)]
    pub retryable: bool,
}

/// The answer to a failure: what became of the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailResponse {
    pub ok: bool,
    pub outcome: FailOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailOutcome {
    /// Ready again after the backoff, with attempt + 1.
    Retry,
    /// Retries spent, or the failure was not retryable.
    Failed,
}

/// `POST /api/v1/tasks/{id}/question`: the task is blocked until a person answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuestionRequest {
    pub run_lease: i64,
    pub question: String,
}

/// `POST /api/v1/tasks/{id}/release`: the task handed back unstarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub run_lease: i64,
}

/// `POST /api/v1/model-usage`: one call to one model, a `model_usage` row. Latency, success and error go to the row's
/// `metadata`, which the original schema keeps for such extras.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Who called; the controller's endpoint takes it from the token instead.
    #[serde(default)]
    pub agent: String,
    pub model: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default)]
    pub prompt_tokens: Option<u32>,
    #[serde(default)]
    pub completion_tokens: Option<u32>,
    #[serde(default)]
    pub total_tokens: Option<u32>,
    #[serde(default)]
    pub estimated_cost_usd: Option<f64>,
    pub latency_ms: u64,
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to a report that was recorded: `{"ok": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub ok: bool,
}

impl Ack {
    pub const OK: Ack = Ack { ok: true };
}

/// The body of every refusal (4xx) and failure (5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What a proposal proposes; it decides the branch: `agentops/proposals/<name>` for a
/// project, `…/tool-<name>` for a tool, `…/agent-<name>` for a specialist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProposalKind {
    Project,
    Tool,
    Agent,
}

impl ProposalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProposalKind::Project => "project",
            ProposalKind::Tool => "tool",
            ProposalKind::Agent => "agent",
        }
    }

    /// The branch a proposal of this kind and name goes on.
    pub fn branch(self, name: &str) -> String {
        match self {
            ProposalKind::Project => format!("agentops/proposals/{name}"),
            ProposalKind::Tool => format!("agentops/proposals/tool-{name}"),
            ProposalKind::Agent => format!("agentops/proposals/agent-{name}"),
        }
    }
}

/// `POST /api/v1/proposals`: spec files (a project, a tool, a specialist) for the controller
/// to validate, commit on the kind's proposal branch and put up for review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposalRequest {
    pub kind: ProposalKind,
    /// A DNS label: the project's, tool's or agent's name.
    pub name: String,
    /// The commit's and pull request's title.
    pub title: String,
    #[serde(default)]
    pub body: String,
    /// Relative to the specs' root (the repository's subpath, if it has one).
    pub files: Vec<OutputFile>,
}

/// The answer to a proposal that was put up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalResponse {
    pub branch: String,
    pub commit: String,
    /// The pull request's URL, when the controller has a forge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<String>,
}

/// The 400 answer to a proposal that was refused: one message per problem, each starting with
/// `path` or `path:line:column`. Nothing was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalRefused {
    pub error: String,
    pub problems: Vec<String>,
}

/// `GET /api/v1/specialists/gaps`, for a `seed` agent: the capability sets that pending
/// `specialist` work needs and no registered agent has, each once, and the names agents
/// hold (a drafted specialist takes another).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialistGaps {
    pub gaps: Vec<SpecialistGap>,
    pub taken: Vec<String>,
}

/// Work no agent can take: the capabilities it needs, and the first such task's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialistGap {
    pub capabilities: Vec<String>,
    pub title: String,
    #[serde(default)]
    pub description: String,
}

/// `GET /api/v1/tasks/{id}/checkout?run_lease=N` answers a tar archive of the task's revision
/// (regular files and executables, no symlinks); this header names its commit.
pub const CHECKOUT_COMMIT_HEADER: &str = "x-agentops-commit";

/// The query of a checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutQuery {
    pub run_lease: i64,
}

/// `GET /api/v1/tools/{name}`: the command of a registered tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolAnswer {
    pub name: String,
    /// Empty when the tool's spec gives none.
    pub command: Vec<String>,
}

/// `GET /api/v1/projects`: the names of the projects at the followed branch's head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectsAnswer {
    pub projects: Vec<String>,
}

/// `GET /api/v1/agents/{name}/spec`: an `Agent` spec as an agent process runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpecAnswer {
    pub name: String,
    #[serde(rename = "type")]
    pub agent_type: AgentType,
    pub capabilities: Vec<String>,
    pub concurrency: u32,
    pub models: Vec<String>,
    pub instructions: String,
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

    /// The prefix itself, as `--bus-prefix` takes it.
    pub fn prefix(&self) -> &str {
        &self.prefix
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

    /// Reads `json` as a `T` and writes it back: it must come out as the same document, so a
    /// renamed field, a field no longer left out when empty, or a number that changed kind
    /// (`30` for `30.0`) fails.
    fn round_trip<T: Serialize + serde::de::DeserializeOwned>(json: &str) -> T {
        let value: T = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        let expected: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_value(&value).unwrap(), expected, "{json}");
        value
    }

    #[test]
    fn registration_bodies_round_trip() {
        let request: RegisterRequest = round_trip(
            r#"{"name": "copywriter", "type": "specialist", "capabilities": ["writing"],
                "concurrency": 2}"#,
        );
        assert_eq!(request.agent_type, AgentType::Specialist);
        let answer: RegisterResponse = round_trip(
            r#"{"agent": "copywriter", "token": "t0k3n", "lease_seconds": 30.0,
                "heartbeat_seconds": 0.5}"#,
        );
        assert_eq!(answer.heartbeat_seconds, 0.5);

        let minimal: RegisterRequest =
            serde_json::from_str(r#"{"name": "a", "type": "seed"}"#).unwrap();
        assert_eq!((minimal.capabilities.len(), minimal.concurrency), (0, 1));
        let error = serde_json::from_str::<RegisterRequest>(r#"{"name": "a", "type": "boss"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("boss"), "{error}");
        // Whole seconds as integers are read too.
        let whole: RegisterResponse =
            serde_json::from_str(r#"{"token": "t", "lease_seconds": 30, "heartbeat_seconds": 10}"#)
                .unwrap();
        assert_eq!(whole.lease_seconds, 30.0);
    }

    #[test]
    fn claim_bodies_round_trip() {
        let request: ClaimRequest = round_trip(r#"{"max": 4, "wait_ms": 20000}"#);
        assert_eq!(request.max, 4);
        let defaults: ClaimRequest = serde_json::from_str("{}").unwrap();
        assert_eq!((defaults.max, defaults.wait_ms), (1, 0));

        let answer: ClaimResponse = round_trip(
            r#"{"tasks": [{
                "id": "5b1e", "run_lease": 7, "attempt": 0,
                "project": "launch-website", "name": "draft-copy",
                "title": "Draft the landing page copy", "description": "",
                "action": {"prompt": "Write … into site/copy.md"},
                "output": {"mode": "pull-request", "paths": ["site/"]},
                "acceptance_criteria": ["copy.md exists"],
                "timeout_seconds": 1800, "revision": "main@sha1:abc",
                "lease_expires_at": "2026-11-25T10:00:30.500Z"
            }, {
                "id": "5b1f", "run_lease": 2, "attempt": 1,
                "project": "p", "name": "t", "title": "", "description": "",
                "action": {"run": {"command": "true"}}, "output": null,
                "acceptance_criteria": [], "timeout_seconds": 2.5, "revision": null,
                "lease_expires_at": "2026-11-25T10:00:30Z",
                "review_comments": "Shorter, please."
            }]}"#,
        );
        assert_eq!(answer.tasks[0].timeout(), Some(Duration::from_secs(1800)));
        assert_eq!(answer.tasks[1].timeout(), Some(Duration::from_millis(2500)));
        assert_eq!(
            answer.tasks[1].review_comments.as_deref(),
            Some("Shorter, please.")
        );
        let empty: ClaimResponse = round_trip(r#"{"tasks": []}"#);
        assert!(empty.tasks.is_empty());
    }

    #[test]
    fn heartbeat_bodies_round_trip() {
        let request: HeartbeatRequest =
            round_trip(r#"{"tasks": [{"id": "5b1e", "run_lease": 7}]}"#);
        assert_eq!(request.tasks[0].run_lease, 7);
        let answer: HeartbeatResponse = round_trip(
            r#"{"tasks": [{"id": "5b1e", "held": true, "cancel": false},
                          {"id": "5b1f", "held": false, "cancel": true}]}"#,
        );
        assert!(answer.tasks[1].cancel);
        let idle: HeartbeatRequest = serde_json::from_str("{}").unwrap();
        assert!(idle.tasks.is_empty());
    }

    #[test]
    fn report_bodies_round_trip() {
        let progress: ProgressRequest =
            round_trip(r#"{"run_lease": 7, "message": "drafted the headline"}"#);
        assert_eq!(progress.message, "drafted the headline");
        let fail: FailRequest =
            round_trip(r#"{"run_lease": 7, "error": "boom", "retryable": true}"#);
        assert!(fail.retryable);
        let retry: FailResponse = round_trip(r#"{"ok": true, "outcome": "retry"}"#);
        assert_eq!(retry.outcome, FailOutcome::Retry);
        let failed: FailResponse = round_trip(r#"{"ok": true, "outcome": "failed"}"#);
        assert_eq!(failed.outcome, FailOutcome::Failed);
        let question: QuestionRequest =
            round_trip(r#"{"run_lease": 7, "question": "Which tone?"}"#);
        assert_eq!(question.question, "Which tone?");
        let release: ReleaseRequest = round_trip(r#"{"run_lease": 7}"#);
        assert_eq!(release.run_lease, 7);
        assert_eq!(round_trip::<Ack>(r#"{"ok": true}"#), Ack::OK);
        let refusal: ErrorBody = round_trip(r#"{"error": "no such task"}"#);
        assert_eq!(refusal.error, "no such task");
        let not_retryable: FailRequest =
            serde_json::from_str(r#"{"run_lease": 7, "error": "boom"}"#).unwrap();
        assert!(!not_retryable.retryable);
    }

    #[test]
    fn completion_bodies_round_trip() {
        let with_artifacts: CompleteRequest = round_trip(
            r#"{"run_lease": 7, "result": {"summary": "wrote the copy"},
                "artifacts": [{"name": "copy.md", "type": "document", "key": "site/copy.md",
                               "size_bytes": 812, "mime_type": "text/markdown"},
                              {"name": "notes", "type": "other", "key": "k"}]}"#,
        );
        assert_eq!(with_artifacts.artifacts[0].size_bytes, Some(812));
        let with_files: CompleteRequest = round_trip(
            r##"{"run_lease": 7, "result": {"summary": "wrote the copy"},
                "files": [{"path": "site/copy.md", "content": "# Welcome\n"},
                          {"path": "site/logo.png", "content_base64": "iVBORw0KGgo="},
                          {"path": "site/build.sh", "content": "#!/bin/sh\n",
                           "mode": "executable"}]}"##,
        );
        assert_eq!(with_files.files[2].mode.as_deref(), Some("executable"));

        let many: CompleteManyRequest = round_trip(
            r#"{"tasks": [{"id": "5b1e", "run_lease": 7, "result": {"summary": "done"}},
                          {"id": "5b1f", "run_lease": 3, "result": null,
                           "files": [{"path": "site/a.md", "content": "a"}]}]}"#,
        );
        let borrowed = CompleteManyRequest {
            tasks: many.tasks.iter().collect(),
        };
        assert_eq!(
            serde_json::to_value(&borrowed).unwrap(),
            serde_json::to_value(&many).unwrap()
        );
        let answers: CompleteManyResponse = round_trip(
            r#"{"tasks": [{"id": "5b1e", "ok": true},
                          {"id": "5b1f", "ok": false, "error": "no such task"}]}"#,
        );
        assert!(!answers.tasks[1].ok);

        let bare: CompleteRequest =
            serde_json::from_str(r#"{"run_lease": 7, "artifacts": [{"name": "a", "key": "k"}]}"#)
                .unwrap();
        assert_eq!(bare.result, serde_json::Value::Null);
        assert_eq!(bare.artifacts[0].kind, "other");
        let error = serde_json::from_str::<OutputFile>(r#"{"path": "a", "contents": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("contents"), "{error}");
    }

    #[test]
    fn model_usage_round_trips() {
        let call: UsageRecord = round_trip(
            r#"{"agent": "copywriter", "model": "openai/gpt-4o-mini", "provider": "openai",
                "task_id": "5b1e", "prompt_tokens": 812, "completion_tokens": 240,
                "total_tokens": 1052, "estimated_cost_usd": 0.000266, "latency_ms": 1830,
                "success": true}"#,
        );
        assert_eq!(call.total_tokens, Some(1052));
        let failed: UsageRecord = round_trip(
            r#"{"agent": "", "model": "m", "provider": "p", "prompt_tokens": null,
                "completion_tokens": null, "total_tokens": null, "estimated_cost_usd": null,
                "latency_ms": 5, "success": false, "error": "timed out"}"#,
        );
        assert_eq!(failed.error.as_deref(), Some("timed out"));
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
