//! One MCP session as one agent of the protocol: registered with the agent runtime's client,
//! heartbeating while it lives, holding the tasks it claimed with their fencing tokens, and
//! handing them back when it ends.
//!
//! Every operation is a protocol call (`agents/PROTOCOL.md`) with the `run_lease` the claim
//! gave, so the controller decides about leases and fencing exactly as for any other agent;
//! the session only remembers what it holds so that a tool needs no token from the model.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::IgnoredAny;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::join::Joining;
use crate::protocol::{
    Assignment, ClaimRequest, ClaimResponse, CompleteRequest, FailOutcome, FailRequest,
    FailResponse, OutputFile, ProgressRequest, ProposalRequest, ProposalResponse, QuestionRequest,
    RegisterRequest, ReleaseRequest,
};
use crate::runtime::client::{CALL_TIMEOUT, Client, Error};
use crate::runtime::leases::Leases;

/// The longest a claim waits for work (the protocol's cap).
pub(crate) const MAX_CLAIM_WAIT: Duration = Duration::from_secs(60);

pub(crate) struct Session {
    pub name: String,
    client: Client,
    leases: Leases,
    /// The claim answers of the tasks held, for `list_tasks`.
    tasks: Mutex<HashMap<String, Assignment>>,
    /// Stops the heartbeat.
    stop: CancellationToken,
    closed: AtomicBool,
}

/// Why a tool about a task could not do its work.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskError {
    #[error("this session holds no task `{0}`: claim one with claim_task, see list_tasks")]
    NotHeld(String),
    #[error(transparent)]
    Protocol(#[from] Error),
}

impl Session {
    /// Registers, and heartbeats from then on until [`Session::close`].
    pub async fn join(api: &str, joining: Joining) -> Result<Arc<Session>, Error> {
        let client = Client::new(
            api,
            RegisterRequest {
                name: joining.name.clone(),
                agent_type: joining.agent_type,
                capabilities: joining.capabilities,
                concurrency: 1,
                token: None,
            },
        )?
        .with_enrollment_secret(joining.secret);
        client.register().await?;
        let session = Arc::new(Session {
            name: joining.name,
            client,
            leases: Leases::default(),
            tasks: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            closed: AtomicBool::new(false),
        });
        let beating = session.clone();
        tokio::spawn(async move {
            let stop = beating.stop.clone();
            crate::runtime::heartbeat_loop(&beating.client, &beating.leases, stop).await;
        });
        Ok(session)
    }

    /// The tasks held, after a heartbeat that renews them and drops those the controller
    /// says are lost or cancelled.
    pub async fn held(&self) -> Result<Vec<Assignment>, Error> {
        crate::runtime::beat(&self.client, &self.leases).await?;
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.retain(|id, task| self.leases.holds(id, task.run_lease));
        let mut held: Vec<Assignment> = tasks.values().cloned().collect();
        held.sort_by(|a, b| (&a.project, &a.name).cmp(&(&b.project, &b.name)));
        Ok(held)
    }

    /// Claims one task, waiting up to `wait` for one to be ready.
    pub async fn claim(&self, wait: Duration) -> Result<Option<Assignment>, Error> {
        let wait = wait.min(MAX_CLAIM_WAIT);
        let request = ClaimRequest {
            max: 1,
            wait_ms: wait.as_millis() as u64,
        };
        let sent_at = Instant::now();
        let answer: ClaimResponse = self
            .client
            .post("/api/v1/claim", &request, wait + CALL_TIMEOUT)
            .await?;
        let lease = self.client.session().lease;
        let mut claimed = answer.tasks.into_iter();
        let first = claimed.next();
        if let Some(task) = &first {
            self.hold(task.clone(), sent_at + lease);
        }
        // More than asked for: keep them, they are leased to us and listed like the first.
        for task in claimed {
            self.hold(task, sent_at + lease);
        }
        Ok(first)
    }

    fn hold(&self, task: Assignment, until: Instant) {
        self.leases
            .insert(&task.id, task.run_lease, until, CancellationToken::new());
        self.tasks
            .lock()
            .expect("tasks lock")
            .insert(task.id.clone(), task);
    }

    /// The held task `key` names: its id, or `project/name`.
    fn find(&self, key: &str) -> Result<Assignment, TaskError> {
        let tasks = self.tasks.lock().expect("tasks lock");
        find_held(tasks.values(), key)
            .filter(|task| self.leases.holds(&task.id, task.run_lease))
            .cloned()
            .ok_or_else(|| TaskError::NotHeld(key.to_owned()))
    }

    /// Forgets a task once a report ended it (or the controller says it is not ours).
    fn forget(&self, task: &Assignment) {
        self.leases.remove(&task.id, task.run_lease);
        let mut tasks = self.tasks.lock().expect("tasks lock");
        if tasks
            .get(&task.id)
            .is_some_and(|t| t.run_lease == task.run_lease)
        {
            tasks.remove(&task.id);
        }
    }

    /// Posts a report about a held task. A refusal that says the lease is gone (409) or the
    /// task is (404) forgets it; so does success when `ends` (the task is no longer held).
    async fn report<B, R>(
        &self,
        key: &str,
        verb: &str,
        body: impl FnOnce(i64) -> B,
        ends: bool,
    ) -> Result<(Assignment, R), TaskError>
    where
        B: serde::Serialize,
        R: serde::de::DeserializeOwned,
    {
        let task = self.find(key)?;
        let path = format!("/api/v1/tasks/{}/{verb}", task.id);
        match self
            .client
            .post::<_, R>(&path, &body(task.run_lease), CALL_TIMEOUT)
            .await
        {
            Ok(answer) => {
                if ends {
                    self.forget(&task);
                }
                Ok((task, answer))
            }
            Err(e) => {
                if matches!(e.status().map(|s| s.as_u16()), Some(404 | 409)) {
                    self.forget(&task);
                }
                Err(e.into())
            }
        }
    }

    pub async fn progress(&self, key: &str, message: String) -> Result<Assignment, TaskError> {
        let body = |run_lease| ProgressRequest { run_lease, message };
        let (task, IgnoredAny) = self.report(key, "progress", body, false).await?;
        Ok(task)
    }

    pub async fn complete(
        &self,
        key: &str,
        result: serde_json::Value,
        files: Vec<OutputFile>,
    ) -> Result<Assignment, TaskError> {
        let body = |run_lease| CompleteRequest {
            run_lease,
            result,
            artifacts: Vec::new(),
            files,
        };
        let (task, IgnoredAny) = self.report(key, "complete", body, true).await?;
        Ok(task)
    }

    pub async fn fail(
        &self,
        key: &str,
        error: String,
        retryable: bool,
    ) -> Result<(Assignment, FailOutcome), TaskError> {
        let body = |run_lease| FailRequest {
            run_lease,
            error,
            retryable,
        };
        let (task, answer): (_, FailResponse) = self.report(key, "fail", body, true).await?;
        Ok((task, answer.outcome))
    }

    pub async fn question(&self, key: &str, question: String) -> Result<Assignment, TaskError> {
        let body = |run_lease| QuestionRequest {
            run_lease,
            question,
        };
        let (task, IgnoredAny) = self.report(key, "question", body, true).await?;
        Ok(task)
    }

    /// Puts up spec files for review (`POST /api/v1/proposals`): the controller checks them,
    /// commits them on the proposal's branch and opens the pull request.
    pub async fn propose(&self, request: &ProposalRequest) -> Result<ProposalResponse, Error> {
        self.client
            .post(
                "/api/v1/proposals",
                request,
                crate::runtime::PROPOSE_TIMEOUT,
            )
            .await
    }

    /// Stops heartbeating and hands back every task still held, ready again at once for
    /// another agent. Once; later calls do nothing.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop.cancel();
        let held: Vec<Assignment> = self
            .tasks
            .lock()
            .expect("tasks lock")
            .drain()
            .map(|(_, task)| task)
            .collect();
        for task in held {
            let path = format!("/api/v1/tasks/{}/release", task.id);
            let body = ReleaseRequest {
                run_lease: task.run_lease,
            };
            match self
                .client
                .post::<_, IgnoredAny>(&path, &body, CALL_TIMEOUT)
                .await
            {
                Ok(_) => tracing::info!(agent = %self.name, task = %task.id, "handed back"),
                Err(e) => tracing::warn!(
                    agent = %self.name,
                    task = %task.id,
                    error = %crate::error_chain(&e),
                    "cannot hand the task back; its lease will expire"
                ),
            }
            self.leases.remove(&task.id, task.run_lease);
        }
    }
}

/// The task `key` names among `tasks`: by id, or by `project/name`.
pub(crate) fn find_held<'a>(
    tasks: impl IntoIterator<Item = &'a Assignment>,
    key: &str,
) -> Option<&'a Assignment> {
    let key = key.trim();
    tasks.into_iter().find(|task| {
        task.id == key
            || key
                .split_once('/')
                .is_some_and(|(project, name)| task.project == project && task.name == name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, project: &str, name: &str) -> Assignment {
        serde_json::from_value(serde_json::json!({
            "id": id, "run_lease": 1, "project": project, "name": name, "action": {}
        }))
        .unwrap()
    }

    #[test]
    fn a_task_is_found_by_id_or_project_and_name() {
        let tasks = [task("5b1e", "site", "copy"), task("5b1f", "site", "page")];
        assert_eq!(
            find_held(&tasks, "5b1f").map(|t| &t.name),
            Some(&"page".into())
        );
        assert_eq!(
            find_held(&tasks, " site/copy ").map(|t| &t.id),
            Some(&"5b1e".into())
        );
        assert!(find_held(&tasks, "site/none").is_none());
        assert!(find_held(&tasks, "copy").is_none());
    }
}
