//! The agent runtime: what every agent does around its own work.
//!
//! An [`Agent`] registers with the controller, long-polls for tasks while it has free slots,
//! runs each task's [`Handler`] under the task's timeout, heartbeats every task it holds,
//! stops a handler whose lease was lost or whose task was cancelled, and reports the
//! [`Outcome`]. On shutdown it stops claiming, cancels its handlers and hands their tasks
//! back. The protocol is `agents/PROTOCOL.md`.
//!
//! ```no_run
//! use agentops_agents::runtime::{Agent, AgentConfig, Assignment, Outcome, TaskContext};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn example() -> Result<(), agentops_agents::runtime::Error> {
//! let config = AgentConfig {
//!     concurrency: 4,
//!     ..AgentConfig::new("http://127.0.0.1:8080", "echo")
//! };
//! let agent = Agent::new(config, |task: Assignment, _ctx: TaskContext| async move {
//!     Outcome::complete(task.action)
//! });
//! agent.run(CancellationToken::new()).await
//! # }
//! ```

pub(crate) mod client;
pub(crate) mod leases;
mod nudges;
mod reports;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use crate::protocol::{
    AgentType, Artifact, Assignment, BusNames, DEFAULT_BUS_PREFIX, InvalidBusPrefix, OutputFile,
    UnknownAgentType,
};
pub use client::Error;

use crate::error_chain;
use crate::protocol::{
    ClaimRequest, ClaimResponse, Completion, FailRequest, HeartbeatRequest, HeartbeatResponse,
    ProgressRequest, QuestionRequest, RegisterRequest,
};
use crate::shutdown::Stop;
use client::{CALL_TIMEOUT, Client};
use leases::{Leases, Verdict};
use nudges::Nudges;
use reports::{Backoff, Pending, Report};

/// How long a claim in flight when claiming stops may still be answered.
const CLAIM_ANSWER_AT_STOP: Duration = Duration::from_secs(2);

/// Who the agent is and how much it takes on.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The controller's base URL, e.g. `http://agentops:8080`.
    pub api: String,
    pub name: String,
    pub agent_type: AgentType,
    pub capabilities: Vec<String>,
    /// Tasks run at once; at least 1.
    pub concurrency: usize,
    /// How long one claim may wait for work (the protocol caps it at 60 s).
    pub claim_wait: Duration,
    /// A NATS server (`nats://…`) carrying the controller's ready-work announcements. When
    /// set, the agent follows its pools (`agentops.dispatch.<type>` and `.<name>`) and takes
    /// an announcement as a reason to try the controller again at once instead of waiting
    /// out a backoff. Without it, or while NATS is unreachable, the agent only long-polls.
    pub nats: Option<String>,
    /// The NATS names the controller uses (its `--bus-prefix`); `agentops` by default.
    pub bus: BusNames,
    /// The enrollment secret presented when registering (the controller's
    /// `--agent-secret`, or this agent's own from its `--agent-secrets` file).
    pub secret: Option<String>,
}

impl AgentConfig {
    /// A `seed` agent with no capabilities that runs one task at a time.
    pub fn new(api: impl Into<String>, name: impl Into<String>) -> AgentConfig {
        AgentConfig {
            api: api.into(),
            name: name.into(),
            agent_type: AgentType::Seed,
            capabilities: Vec::new(),
            concurrency: 1,
            claim_wait: Duration::from_secs(20),
            nats: None,
            bus: BusNames::default(),
            secret: None,
        }
    }
}

/// What an agent does with a task. Implemented for any
/// `Fn(Assignment, TaskContext) -> impl Future<Output = Outcome>`.
///
/// The future is dropped when the task must stop (lease lost, task cancelled, timeout,
/// shutdown); a handler that runs work outside it (a thread, a child process) should stop
/// that work on drop or when [`TaskContext::cancelled`] fires.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, task: Assignment, ctx: TaskContext) -> impl Future<Output = Outcome> + Send;

    /// What the agent does beside its tasks while it is registered (the Seed's search for
    /// work no agent can take), as itself: it should return once `claiming` is cancelled.
    /// Nothing, unless a handler says otherwise.
    fn beside(
        &self,
        line: AgentLine,
        claiming: CancellationToken,
    ) -> impl Future<Output = ()> + Send {
        let _ = (line, claiming);
        async {}
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(Assignment, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    fn handle(&self, task: Assignment, ctx: TaskContext) -> impl Future<Output = Outcome> + Send {
        self(task, ctx)
    }
}

/// How a task ended, as the handler reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Complete {
        result: serde_json::Value,
        artifacts: Vec<Artifact>,
        /// Files the controller commits for the task: on its result branch for review, or
        /// with `output.mode: commit` on the followed branch. Paths must lie within the task's
        /// `output.paths`.
        files: Vec<OutputFile>,
    },
    /// A retryable failure goes back to ready (attempt + 1) until the task's retries are
    /// spent; any other fails the task.
    Fail { error: String, retryable: bool },
    /// Blocks the task until a person answers.
    Question { text: String },
}

impl Outcome {
    pub fn complete(result: serde_json::Value) -> Outcome {
        Outcome::Complete {
            result,
            artifacts: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Complete with output files for the controller to commit.
    pub fn complete_with_files(result: serde_json::Value, files: Vec<OutputFile>) -> Outcome {
        Outcome::Complete {
            result,
            artifacts: Vec::new(),
            files,
        }
    }

    pub fn fail(error: impl Into<String>, retryable: bool) -> Outcome {
        Outcome::Fail {
            error: error.into(),
            retryable,
        }
    }

    pub fn question(text: impl Into<String>) -> Outcome {
        Outcome::Question { text: text.into() }
    }
}

/// A handler's line to the runtime while it works on one task.
#[derive(Clone)]
pub struct TaskContext {
    line: AgentLine,
    id: String,
    run_lease: i64,
    cancel: CancellationToken,
}

impl TaskContext {
    pub fn task_id(&self) -> &str {
        &self.id
    }

    /// Fires when the task must stop: its lease was lost, it was cancelled, it timed out, or
    /// the agent is shutting down; and once the handler has returned. Nothing the handler
    /// returns after it fired is reported.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Records a progress update on the task. Sent once, not retried: a lost update is
    /// cheaper than a handler stalled behind an unreachable controller.
    pub async fn progress(&self, message: impl Into<String>) -> Result<(), Error> {
        let body = ProgressRequest {
            run_lease: self.run_lease,
            message: message.into(),
        };
        let path = format!("/api/v1/tasks/{}/progress", self.id);
        self.line
            .shared
            .client
            .post::<_, serde::de::IgnoredAny>(&path, &body, CALL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Records one model call as a `model_usage` row; see [`AgentLine::record_usage`].
    pub async fn record_usage(&self, usage: &crate::llm::UsageRecord) -> Result<(), Error> {
        self.line.record_usage(usage).await
    }

    /// The agent's own line to the controller.
    pub fn line(&self) -> &AgentLine {
        &self.line
    }
}

/// The agent's own line to the controller, as the registered agent and outside any task:
/// what a handler's work beside its tasks ([`Handler::beside`]) calls, and what a
/// [`TaskContext`] calls through.
#[derive(Clone)]
pub struct AgentLine {
    shared: Arc<Shared>,
}

impl AgentLine {
    /// Records one model call as a `model_usage` row (`POST /api/v1/model-usage`); the
    /// controller takes the agent's name from the token. Sent once, like progress.
    pub async fn record_usage(&self, usage: &crate::llm::UsageRecord) -> Result<(), Error> {
        self.shared
            .client
            .post::<_, serde::de::IgnoredAny>("/api/v1/model-usage", usage, CALL_TIMEOUT)
            .await
            .map(drop)
    }

    /// Proposes spec files (`POST /api/v1/proposals`): the controller validates them,
    /// commits them on the kind's proposal branch and opens the pull request.
    pub async fn propose(
        &self,
        proposal: &crate::protocol::ProposalRequest,
    ) -> Result<crate::protocol::ProposalResponse, Error> {
        self.shared
            .client
            .post("/api/v1/proposals", proposal, PROPOSE_TIMEOUT)
            .await
    }

    /// Pending specialist work that no agent can take (`GET /api/v1/specialists/gaps`);
    /// the controller answers a `seed` agent only.
    pub async fn specialist_gaps(&self) -> Result<crate::protocol::SpecialistGaps, Error> {
        self.shared
            .client
            .get("/api/v1/specialists/gaps", CALL_TIMEOUT)
            .await
    }
}

/// What an agent off the controller does with Git, through the controller.
impl TaskContext {
    /// Proposes spec files (`POST /api/v1/proposals`): the controller validates them,
    /// commits them on the kind's proposal branch and opens the pull request.
    pub async fn propose(
        &self,
        proposal: &crate::protocol::ProposalRequest,
    ) -> Result<crate::protocol::ProposalResponse, Error> {
        self.line.propose(proposal).await
    }

    /// The tree this task works on, as the controller serves it: its commit and a tar
    /// archive of its files.
    pub async fn checkout(&self) -> Result<(String, Vec<u8>), Error> {
        let path = format!(
            "/api/v1/tasks/{}/checkout?run_lease={}",
            self.id, self.run_lease
        );
        self.line
            .shared
            .client
            .get_bytes(
                &path,
                crate::protocol::CHECKOUT_COMMIT_HEADER,
                PROPOSE_TIMEOUT,
            )
            .await
    }

    /// The command of the tool `name` (`GET /api/v1/tools/{name}`, counting a use), or
    /// `None` when there is no such tool.
    pub async fn tool(&self, name: &str) -> Result<Option<Vec<String>>, Error> {
        let path = format!("/api/v1/tools/{name}");
        match self
            .line
            .shared
            .client
            .get::<crate::protocol::ToolAnswer>(&path, CALL_TIMEOUT)
            .await
        {
            Ok(answer) => Ok(Some(answer.command)),
            Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The projects at the followed branch's head.
    pub async fn projects(&self) -> Result<Vec<String>, Error> {
        self.line
            .shared
            .client
            .get::<crate::protocol::ProjectsAnswer>("/api/v1/projects", CALL_TIMEOUT)
            .await
            .map(|a| a.projects)
    }
}

/// Proposals and checkouts write or read a Git tree on the controller's side.
pub(crate) const PROPOSE_TIMEOUT: Duration = Duration::from_secs(120);

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id)
            .field("run_lease", &self.run_lease)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// What the loops and the task runners share.
pub(crate) struct Shared {
    client: Client,
    leases: Leases,
    completions: mpsc::Sender<Pending>,
}

pub struct Agent<H> {
    config: AgentConfig,
    handler: Arc<H>,
}

impl<H: Handler> Agent<H> {
    pub fn new(config: AgentConfig, handler: H) -> Agent<H> {
        Agent {
            config,
            handler: Arc::new(handler),
        }
    }

    /// Runs until `shutdown` is cancelled, then stops claiming, cancels the handlers, releases
    /// their tasks, waits for reports still in flight, and returns.
    ///
    /// Fails only when the first registration is refused (a bad name, type or URL); an
    /// unreachable controller is waited for.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        self.run_until(Stop::at_once(shutdown)).await
    }

    /// Runs until `stop` stops claiming; running tasks then go on until they end or `stop`
    /// stops the work, which cancels them and hands them back. Returns once every task is
    /// reported or handed back.
    pub async fn run_until(self, stop: Stop) -> Result<(), Error> {
        let shutdown = stop.claiming().clone();
        let concurrency = self.config.concurrency.max(1);
        let client = Client::new(
            &self.config.api,
            RegisterRequest {
                name: self.config.name.clone(),
                agent_type: self.config.agent_type,
                capabilities: self.config.capabilities.clone(),
                concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
                token: None,
            },
        )?
        .with_enrollment_secret(self.config.secret.clone());
        // Followed from before registering: a controller that comes back announces its work,
        // which ends a registration backoff too.
        let following = CancellationToken::new();
        let _stop_following = following.clone().drop_guard();
        let nudges = match &self.config.nats {
            Some(url) => {
                let pools = vec![
                    self.config.agent_type.as_str().to_owned(),
                    self.config.name.clone(),
                ];
                Nudges::follow(
                    url,
                    &self.config.bus,
                    &self.config.name,
                    pools,
                    following.clone(),
                )
                .await?
            }
            None => Nudges::off(),
        };
        let Some(registered) = shutdown
            .run_until_cancelled(register(&client, &nudges))
            .await
        else {
            return Ok(());
        };
        let session = registered?;
        tracing::info!(
            agent = %self.config.name,
            api = %self.config.api,
            concurrency,
            lease = ?session.lease,
            heartbeat = ?session.heartbeat,
            "registered"
        );

        let (completions, queue) = reports::channel(concurrency);
        let shared = Arc::new(Shared {
            client,
            leases: Leases::default(),
            completions,
        });
        // Heartbeats and the batcher outlive the claim loop: reports of finished tasks may
        // still be in flight, and their leases must stay alive meanwhile.
        let reporting = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), reporting.clone()));
        let batcher = tokio::spawn(reports::batch_completions(
            shared.clone(),
            queue,
            reporting.clone(),
        ));

        let beside = {
            let (handler, claiming) = (self.handler.clone(), shutdown.clone());
            let line = AgentLine {
                shared: shared.clone(),
            };
            tokio::spawn(async move { handler.beside(line, claiming).await })
        };

        let tasks = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(concurrency));
        self.claim(&shared, &slots, &tasks, &nudges, &stop).await;
        if let Err(e) = beside.await {
            tracing::warn!(error = %e, "the agent's work beside its tasks stopped");
        }

        if stop.work().is_cancelled() {
            tracing::info!("shutting down: handing back held tasks");
        } else {
            tracing::info!("stopped claiming: letting running tasks finish");
        }
        tasks.close();
        tasks.wait().await;
        reporting.cancel();
        let _ = tokio::join!(heartbeat, batcher);
        tracing::info!("stopped");
        Ok(())
    }

    /// Claims as many tasks as there are free slots, one long-poll at a time, until shutdown.
    async fn claim(
        &self,
        shared: &Arc<Shared>,
        slots: &Arc<Semaphore>,
        tasks: &TaskTracker,
        nudges: &Nudges,
        stop: &Stop,
    ) {
        let shutdown = stop.claiming();
        let wait_ms = self.config.claim_wait.as_millis().min(60_000) as u64;
        let timeout = Duration::from_millis(wait_ms) + CALL_TIMEOUT;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let Some(first) = shutdown
                .run_until_cancelled(slots.clone().acquire_owned())
                .await
            else {
                return;
            };
            let mut free = vec![first.expect("the slots are never closed")];
            while let Ok(slot) = slots.clone().try_acquire_owned() {
                free.push(slot);
            }

            let claim = ClaimRequest {
                max: u32::try_from(free.len()).unwrap_or(u32::MAX),
                wait_ms,
            };
            let sent_at = Instant::now();
            let mut call = std::pin::pin!(shared.client.post::<_, ClaimResponse>(
                "/api/v1/claim",
                &claim,
                timeout,
            ));
            let answer = match shutdown.run_until_cancelled(call.as_mut()).await {
                Some(answer) => Some(answer),
                // Dropping a claim in flight may strand a task the controller had just leased
                // to us, until that lease expires. When running tasks may still finish, the
                // answer is worth a short wait: a controller that stops claiming answers at
                // once, and what it sent is then run or handed back like any other task.
                None if !stop.work().is_cancelled() => {
                    tokio::time::timeout(CLAIM_ANSWER_AT_STOP, call).await.ok()
                }
                None => None,
            };
            let tasks_claimed = match answer {
                None => return,
                Some(Ok(answer)) => {
                    backoff.reset();
                    answer.tasks
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), "claim failed");
                    let pause = nudges.sleep(backoff.next());
                    if shutdown.run_until_cancelled(pause).await.is_none() {
                        return;
                    }
                    continue;
                }
            };

            let lease = shared.client.session().lease;
            for task in tasks_claimed {
                let cancel = stop.work().child_token();
                shared
                    .leases
                    .insert(&task.id, task.run_lease, sent_at + lease, cancel.clone());
                match free.pop() {
                    Some(slot) => {
                        tasks.spawn(run_task(
                            shared.clone(),
                            self.handler.clone(),
                            task,
                            cancel,
                            slot,
                        ));
                    }
                    None => {
                        tracing::warn!(
                            task = %task.id,
                            "the controller sent more tasks than asked for; handing it back"
                        );
                        let shared = shared.clone();
                        tasks.spawn(async move {
                            shared.release(&task.id, task.run_lease).await;
                            shared.leases.remove(&task.id, task.run_lease);
                        });
                    }
                }
            }
        }
    }
}

/// The first registration: waits out an unreachable controller, fails on a refusal.
async fn register(client: &Client, nudges: &Nudges) -> Result<Arc<client::Session>, Error> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match client.register().await {
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %error_chain(&e), "cannot register yet");
                nudges.sleep(backoff.next()).await;
            }
            // The name is a live agent's (this one's earlier run, killed): it is free once
            // that agent's presence expires.
            Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => {
                tracing::warn!(error = %error_chain(&e), "the name is taken; waiting for it");
                nudges.sleep(backoff.next()).await;
            }
            registered => return registered,
        }
    }
}

/// Runs one task and reports it; the slot is freed only once the report is settled, so the
/// controller never sees more than `concurrency` tasks held.
async fn run_task<H: Handler>(
    shared: Arc<Shared>,
    handler: Arc<H>,
    task: Assignment,
    cancel: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let (id, run_lease) = (task.id.clone(), task.run_lease);
    let span = tracing::info_span!(
        "task",
        id = %id,
        project = %task.project,
        name = %task.name,
        attempt = task.attempt
    );
    async {
        let timeout = task.timeout();
        let ctx = TaskContext {
            line: AgentLine {
                shared: shared.clone(),
            },
            id: id.clone(),
            run_lease,
            cancel: cancel.clone(),
        };
        let work = std::panic::AssertUnwindSafe(handler.handle(task, ctx)).catch_unwind();
        let deadline = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            // A panic is a bug in the agent, which a retry would only repeat.
            done = work => Some(done.unwrap_or_else(|panic| {
                Outcome::fail(format!("the handler panicked: {}", panic_message(&*panic)), false)
            })),
            () = deadline => Some(Outcome::fail(
                format!("timed out after {:?}", timeout.unwrap_or_default()),
                true,
            )),
        };
        // For work the handler started outside its future, which outlives the drop above.
        cancel.cancel();
        match outcome {
            Some(Outcome::Complete {
                result,
                artifacts,
                files,
            }) => {
                shared
                    .complete(Completion {
                        id: id.clone(),
                        run_lease,
                        result,
                        artifacts,
                        files,
                    })
                    .await
            }
            Some(Outcome::Fail { error, retryable }) => {
                tracing::info!(%error, retryable, "failed");
                let report = Report::Fail(FailRequest {
                    run_lease,
                    error,
                    retryable,
                });
                shared.deliver(&id, run_lease, report).await
            }
            Some(Outcome::Question { text }) => {
                let report = Report::Question(QuestionRequest {
                    run_lease,
                    question: text,
                });
                shared.deliver(&id, run_lease, report).await
            }
            // Still held: cancelled by our own shutdown, so hand it back.
            None if shared.leases.holds(&id, run_lease) => shared.release(&id, run_lease).await,
            None => tracing::info!("stopped: the lease was lost or the task cancelled"),
        }
        shared.leases.remove(&id, run_lease);
    }
    .instrument(span)
    .await
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// Heartbeats every held task (and none: it also says the agent is alive), and stops the
/// handlers of tasks the controller says are no longer ours.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    heartbeat_loop(&shared.client, &shared.leases, stop).await
}

/// Heartbeats every `heartbeat` the controller asked for, until `stop`.
pub(crate) async fn heartbeat_loop(client: &Client, leases: &Leases, stop: CancellationToken) {
    loop {
        let session = client.session();
        match stop.run_until_cancelled(beat(client, leases)).await {
            None => return,
            Some(Ok(verdicts)) => {
                for (task, verdict) in verdicts {
                    match verdict {
                        Verdict::Renewed => {}
                        Verdict::Lost => tracing::warn!(%task, "lease lost; stopping the task"),
                        Verdict::Cancelled => tracing::info!(%task, "task cancelled; stopping it"),
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %error_chain(&e), "heartbeat failed"),
        }
        let pause = tokio::time::sleep(session.heartbeat);
        if stop.run_until_cancelled(pause).await.is_none() {
            return;
        }
    }
}

/// One heartbeat: renews the held leases, and forgets (and cancels) those the controller says
/// are lost or cancelled.
pub(crate) async fn beat(
    client: &Client,
    leases: &Leases,
) -> Result<Vec<(String, Verdict)>, Error> {
    let session = client.session();
    let request = HeartbeatRequest {
        tasks: leases.snapshot(),
    };
    let sent_at = Instant::now();
    let answer: HeartbeatResponse = client
        .post("/api/v1/heartbeat", &request, CALL_TIMEOUT)
        .await?;
    Ok(leases.apply(&request.tasks, &answer.tasks, sent_at, session.lease))
}
