//! The resource types, as they are stored and exchanged once parsed and validated.
//!
//! These are the clean shapes: no source positions. The YAML parser reads a positioned twin of
//! each spec (see `parse.rs`) and converts it, so that validation can point at the line of
//! an offending field while everything downstream works with plain values.
//!
//! The same structs are the custom resources' specs (`ProjectResource`, `TaskResource`,
//! `AgentResource`, `ToolResource`, derived by `kube`), and their schema is what a file in Git
//! may hold: the `#[schemars]` attributes below carry the parser's rules (names, ranges, enums,
//! which fields may be left out) into the CRDs and the published JSON Schemas.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{DEPENDENCY_PATTERN, DNS_LABEL_MAX, DNS_LABEL_PATTERN, NOT_BLANK_PATTERN};
use crate::status::{AgentStatus, ProjectStatus, TaskStatus, ToolStatus};

/// The only apiVersion this build understands.
pub const API_VERSION: &str = "agentops.dev/v1alpha1";
/// Documents whose apiVersion is in another group are not ours and are ignored.
pub const API_GROUP: &str = "agentops.dev";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Project,
    Task,
    Agent,
    Tool,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Project, Kind::Task, Kind::Agent, Kind::Tool];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Project => "Project",
            Kind::Task => "Task",
            Kind::Agent => "Agent",
            Kind::Tool => "Tool",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The resource's plural, as the CRD names it (`kubectl get tasks`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Project => "projects",
            Kind::Task => "tasks",
            Kind::Agent => "agents",
            Kind::Tool => "tools",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Task and project priority: 0–100, or one of the words `critical` (90), `high` (70),
/// `medium` (50) and `low` (30). Stored as the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u8);

impl Priority {
    pub const MAX: u8 = 100;
    pub const WORDS: [(&'static str, u8); 4] =
        [("critical", 90), ("high", 70), ("medium", 50), ("low", 30)];

    pub fn new(value: i64) -> Option<Priority> {
        (0..=i64::from(Self::MAX))
            .contains(&value)
            .then_some(Priority(value as u8))
    }

    pub fn from_word(word: &str) -> Option<Priority> {
        Self::WORDS
            .iter()
            .find(|(w, _)| *w == word)
            .map(|(_, v)| Priority(*v))
    }

    pub fn value(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority(50)
    }
}

impl Serialize for Priority {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PriorityVisitor;
        const EXPECTED: &str = "an integer 0-100 or one of critical, high, medium, low";

        impl serde::de::Visitor<'_> for PriorityVisitor {
            type Value = Priority;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Priority, E> {
                Priority::new(v).ok_or_else(|| {
                    E::custom(format!("priority {v} is out of range: expected {EXPECTED}"))
                })
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Priority, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Priority, E> {
                if let Ok(n) = v.parse::<i64>() {
                    return self.visit_i64(n);
                }
                Priority::from_word(v).ok_or_else(|| {
                    E::custom(format!("unknown priority `{v}`: expected {EXPECTED}"))
                })
            }
        }

        d.deserialize_any(PriorityVisitor)
    }
}

impl JsonSchema for Priority {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Priority".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // The bounds and the pattern sit beside `anyOf` rather than inside it: `minimum` only
        // constrains numbers and `pattern` only strings, and Kubernetes accepts an int-or-string
        // only with the bare `anyOf` of the two types.
        schemars::json_schema!({
            "description": "0-100, or critical (90), high (70), medium (50), low (30)",
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "minimum": 0,
            "maximum": Priority::MAX,
            "pattern": PRIORITY_PATTERN,
        })
    }
}

/// The strings [`Priority`] reads: a word, or a whole number 0-100 written as text (which is
/// what `str::parse::<i64>` accepts in that range: a sign, leading zeros).
pub const PRIORITY_PATTERN: &str = "^(critical|high|medium|low|[+]?0*([0-9]|[1-9][0-9]|100)|-0+)$";

/// A duration written the human way (`30s`, `30m`, `1h 30m`), kept to whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{text}`: {e} (write it like 45s, 30m or 1h30m)"
            ))
        })?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom(format!(
                "invalid duration `{text}`: must be longer than zero"
            )));
        }
        Ok(HumanDuration(Duration::from_secs(
            duration.as_secs().max(1),
        )))
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "a duration longer than zero, such as 45s, 30m or 1h30m",
            "minLength": 1,
        })
    }
}

/// A goal: a group of tasks with a priority and an accountable agent.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) names its own type_"
)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "Project",
    root = "ProjectResource",
    namespaced,
    status = "ProjectStatus",
    shortname = "aoproj",
    category = "agentops",
    doc = "An agentops Project: a goal, worked through its tasks.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "completed of all tasks that are not cancelled"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectSpec {
    #[schemars(pattern(NOT_BLANK_PATTERN))]
    pub title: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub priority: Priority,
    /// The agent accountable for the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = DNS_LABEL_MAX))]
    pub owner: Option<String>,
    /// When true, nothing of this project is dispatched.
    #[serde(default)]
    pub suspend: bool,
}

/// One piece of work for one agent.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) names its own type_"
)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "Task",
    root = "TaskResource",
    namespaced,
    status = "TaskStatus",
    shortname = "aotask",
    category = "agentops",
    doc = "An agentops Task: one piece of work, dispatched to an agent.",
    printcolumn(name = "Project", type_ = "string", json_path = ".spec.project"),
    printcolumn(name = "Assignee", type_ = "string", json_path = ".spec.assignee"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Agent", type_ = "string", json_path = ".status.agent"),
    printcolumn(name = "Attempt", type_ = "integer", json_path = ".status.attempt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskSpec {
    /// The project the task belongs to. In Git it may be left out of a file under
    /// `projects/<project>/tasks/`, which names it; it is always set once parsed.
    #[schemars(
        default = "no_project",
        pattern(DNS_LABEL_PATTERN),
        length(max = DNS_LABEL_MAX)
    )]
    pub project: String,
    #[schemars(pattern(NOT_BLANK_PATTERN))]
    pub title: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// A role (`cos`, `seed`) or the name of an Agent.
    #[serde(default = "default_assignee")]
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = DNS_LABEL_MAX))]
    pub assignee: String,
    /// An agent must have all of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(NOT_BLANK_PATTERN)))]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub priority: Priority,
    /// `task` (same project) or `project/task`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(DEPENDENCY_PATTERN)))]
    pub depends_on: Vec<String>,
    pub action: Action,
    #[serde(default)]
    pub output: Output,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    #[serde(default = "default_retries")]
    #[schemars(range(max = crate::parse::MAX_RETRIES))]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acceptance_criteria: Vec<String>,
}

pub fn default_assignee() -> String {
    "seed".to_owned()
}

/// Marks `project` optional in the schema, without a default: the parser fills it from the path.
fn no_project() -> Option<String> {
    None
}

pub fn default_retries() -> u32 {
    2
}

/// What a task asks its agent to do. Exactly one kind per task.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// LLM work, done by a Seed.
    Prompt(String),
    /// A command run in a fresh checkout.
    Run(RunAction),
    /// A registered tool.
    Tool(ToolAction),
    /// Chief of Staff: decompose into sub-tasks.
    Plan(PlanAction),
}

/// The shape the parser reads (one mapping of which exactly one key is set, `plan` also when
/// empty or null) rather than what a derive would make of the enum; as one object with
/// optional properties it is also a structural schema, which Kubernetes requires.
impl JsonSchema for Action {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Action".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let run = generator.subschema_for::<RunAction>();
        let tool = generator.subschema_for::<ToolAction>();
        let mut plan = generator.subschema_for::<PlanAction>();
        // `plan:` with nothing after it asks for planning too.
        if plan.get("$ref").is_some() {
            plan = schemars::json_schema!({"anyOf": [plan, {"type": "null"}]});
        } else {
            plan.insert("type".into(), serde_json::json!(["object", "null"]));
        }
        schemars::json_schema!({
            "description": "What the task asks its agent to do: exactly one of prompt, run, tool, plan.",
            "type": "object",
            "properties": {
                "prompt": {
                    "description": "LLM work, done by a Seed.",
                    "type": "string",
                    "pattern": NOT_BLANK_PATTERN,
                },
                "run": run,
                "tool": tool,
                "plan": plan,
            },
            "additionalProperties": false,
            "minProperties": 1,
            "maxProperties": 1,
        })
    }
}

/// Read as the parser and the schema read an action, so that a custom resource the API server
/// accepted deserializes too: one mapping with exactly one of the four keys, `plan` also when
/// null.
impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct OneOf {
            #[serde(default)]
            prompt: Option<String>,
            #[serde(default)]
            run: Option<RunAction>,
            #[serde(default)]
            tool: Option<ToolAction>,
            #[serde(default, deserialize_with = "present")]
            plan: Option<Option<PlanAction>>,
        }

        fn present<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Option<PlanAction>>, D::Error> {
            Option::<PlanAction>::deserialize(d).map(Some)
        }

        let OneOf {
            prompt,
            run,
            tool,
            plan,
        } = OneOf::deserialize(d)?;
        let mut given = [
            prompt.map(Action::Prompt),
            run.map(Action::Run),
            tool.map(Action::Tool),
            plan.map(|p| Action::Plan(p.unwrap_or_default())),
        ]
        .into_iter()
        .flatten();
        match (given.next(), given.next()) {
            (Some(action), None) => Ok(action),
            (None, _) => Err(serde::de::Error::custom(
                "action must have exactly one of prompt, run, tool, plan; it has none",
            )),
            (Some(_), Some(_)) => Err(serde::de::Error::custom(
                "action must have exactly one of prompt, run, tool, plan; it has several",
            )),
        }
    }
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Prompt(_) => "prompt",
            Action::Run(_) => "run",
            Action::Tool(_) => "tool",
            Action::Plan(_) => "plan",
        }
    }
}

/// A command run in a fresh checkout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunAction {
    /// The program and its arguments.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
}

/// A registered tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolAction {
    /// The Tool's name.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = DNS_LABEL_MAX))]
    pub name: String,
    /// Arguments filled into the tool's `{braces}`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub with: serde_json::Map<String, serde_json::Value>,
}

/// Chief of Staff: decompose into sub-tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanAction {
    /// The request to plan from; the task's description when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Output {
    #[serde(default)]
    pub mode: OutputMode,
    /// Where the agent may write, relative to the repository root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "output_paths_schema")]
    pub paths: Vec<String>,
}

/// [`crate::names::check_output_path`] as a schema: relative, no `:`, no `..`, `.git` or
/// `.agentops` part, no control characters.
fn output_paths_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Where the agent may write, relative to the repository root.",
        "type": "array",
        "items": {
            "type": "string",
            "pattern": "^[^/\\\\:][^:]*$",
            "not": {
                "pattern": "(^|[/\\\\])(\\.\\.|\\.git|\\.agentops)([/\\\\]|$)|[\\x00-\\x1f\\x7f-\\x9f]",
            },
        },
    })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OutputMode {
    #[default]
    PullRequest,
    Commit,
    None,
}

/// The role an agent has: a task assigned to a role may go to any agent of it. The same names
/// in an Agent spec, in the agent protocol's registration and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentType {
    Cos,
    Seed,
    Specialist,
    Meta,
}

impl AgentType {
    pub const ALL: [AgentType; 4] = [
        AgentType::Cos,
        AgentType::Seed,
        AgentType::Specialist,
        AgentType::Meta,
    ];

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
pub struct UnknownAgentType(pub String);

impl std::str::FromStr for AgentType {
    type Err = UnknownAgentType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AgentType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownAgentType(s.to_owned()))
    }
}

/// A worker that takes tasks: a role, what it can do, and the models it uses.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) names its own type_"
)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "Agent",
    root = "AgentResource",
    namespaced,
    status = "AgentStatus",
    shortname = "aoagent",
    category = "agentops",
    doc = "An agentops Agent: a worker that takes tasks.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    #[serde(rename = "type")]
    pub agent_type: AgentType,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(NOT_BLANK_PATTERN)))]
    pub capabilities: Vec<String>,
    /// Tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(NOT_BLANK_PATTERN)))]
    pub models: Vec<String>,
    /// How many tasks the agent works on at once.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = crate::parse::MAX_CONCURRENCY))]
    pub concurrency: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instructions: String,
}

pub fn default_concurrency() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolType {
    Function,
    Api,
    Script,
    Service,
}

impl ToolType {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolType::Function => "function",
            ToolType::Api => "api",
            ToolType::Script => "script",
            ToolType::Service => "service",
        }
    }
}

/// Something an agent can call: a function, an API, a script or a service.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) names its own type_"
)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "agentops.dev",
    version = "v1alpha1",
    kind = "Tool",
    root = "ToolResource",
    namespaced,
    status = "ToolStatus",
    shortname = "aotool",
    category = "agentops",
    doc = "An agentops Tool: something an agent can call.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolSpec {
    #[serde(rename = "type")]
    pub tool_type: ToolType,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Arguments in `{braces}` are filled from the task's `with`. A script tool needs one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The agent (or role) that registered the tool.
    #[serde(default = "default_assignee")]
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = DNS_LABEL_MAX))]
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec")]
pub enum Spec {
    Project(ProjectSpec),
    Task(TaskSpec),
    Agent(AgentSpec),
    Tool(ToolSpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Project(_) => Kind::Project,
            Spec::Task(_) => Kind::Task,
            Spec::Agent(_) => Kind::Agent,
            Spec::Tool(_) => Kind::Tool,
        }
    }
}

/// How objects are identified across the repository: tasks by project and name, the others
/// by name alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ObjectKey {
    Project(String),
    Task { project: String, name: String },
    Agent(String),
    Tool(String),
}

impl ObjectKey {
    pub fn kind(&self) -> Kind {
        match self {
            ObjectKey::Project(_) => Kind::Project,
            ObjectKey::Task { .. } => Kind::Task,
            ObjectKey::Agent(_) => Kind::Agent,
            ObjectKey::Tool(_) => Kind::Tool,
        }
    }
}

impl ObjectKey {
    pub fn as_key_ref(&self) -> KeyRef<'_> {
        match self {
            ObjectKey::Project(n) => KeyRef::Project(n),
            ObjectKey::Task { project, name } => KeyRef::Task { project, name },
            ObjectKey::Agent(n) => KeyRef::Agent(n),
            ObjectKey::Tool(n) => KeyRef::Tool(n),
        }
    }

    /// The object's own name: a task's without its project.
    pub fn name(&self) -> &str {
        self.as_key_ref().name()
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_key_ref().fmt(f)
    }
}

/// An [`ObjectKey`] that borrows its names, so that sets and maps of many keys need not copy
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyRef<'a> {
    Project(&'a str),
    Task { project: &'a str, name: &'a str },
    Agent(&'a str),
    Tool(&'a str),
}

impl<'a> KeyRef<'a> {
    pub fn name(self) -> &'a str {
        match self {
            KeyRef::Project(n) | KeyRef::Agent(n) | KeyRef::Tool(n) => n,
            KeyRef::Task { name, .. } => name,
        }
    }
}

impl fmt::Display for KeyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Project(n) => write!(f, "Project {n}"),
            KeyRef::Task { project, name } => write!(f, "Task {project}/{name}"),
            KeyRef::Agent(n) => write!(f, "Agent {n}"),
            KeyRef::Tool(n) => write!(f, "Tool {n}"),
        }
    }
}

/// A 1-based line and column in a source file.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// Where an object was declared, with the positions validation needs to point at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Relative to the synced root, with `/` separators.
    pub path: String,
    pub document: Pos,
    pub name: Pos,
    /// The task's `project` field, or the document when the project came from the path.
    pub project: Pos,
    /// One per `dependsOn` entry, in order.
    pub depends_on: Vec<Pos>,
    pub action: Pos,
}

/// One declared resource, parsed and checked on its own (not yet against its neighbours).
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub metadata: ObjectMeta,
    pub spec: Spec,
    pub origin: Origin,
}

impl Object {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn key(&self) -> ObjectKey {
        let name = self.metadata.name.clone();
        match &self.spec {
            Spec::Project(_) => ObjectKey::Project(name),
            Spec::Task(t) => ObjectKey::Task {
                project: t.project.clone(),
                name,
            },
            Spec::Agent(_) => ObjectKey::Agent(name),
            Spec::Tool(_) => ObjectKey::Tool(name),
        }
    }
}

/// What the checks across objects read of an object: its key, its dependencies and the
/// positions they report at. A controller keeps this of every object between syncs, a small
/// part of the whole object, and reads the object again when it has to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skeleton {
    pub key: ObjectKey,
    /// The file's path: one allocation shared by the skeletons of all its objects.
    pub path: Arc<str>,
    pub document: Pos,
    pub name: Pos,
    /// The task's `project` field, or the document when the project came from the path.
    pub project: Pos,
    /// `dependsOn` entries as written, each with its position.
    pub depends_on: Box<[(Box<str>, Pos)]>,
}

impl Object {
    /// The skeleton of this object. `path` is `origin.path`, passed in so that the objects of
    /// one file can share it.
    pub fn skeleton(&self, path: Arc<str>) -> Skeleton {
        debug_assert_eq!(*path, *self.origin.path);
        let depends_on = match &self.spec {
            Spec::Task(t) => t
                .depends_on
                .iter()
                .enumerate()
                .map(|(n, dep)| {
                    let pos = self.origin.depends_on.get(n).copied().unwrap_or_default();
                    (dep.as_str().into(), pos)
                })
                .collect(),
            _ => Box::default(),
        };
        Skeleton {
            key: self.key(),
            path,
            document: self.origin.document,
            name: self.origin.name,
            project: self.origin.project,
            depends_on,
        }
    }
}
