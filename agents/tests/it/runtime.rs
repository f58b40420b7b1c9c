//! The runtime against a fake controller: claims, batched completions, failures, timeouts,
//! lost leases, refused and unreachable reports, shutdown and re-registration.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentops_agents::runtime::{
    Agent, AgentConfig, Assignment, Error, Handler, Outcome, OutputFile, TaskContext,
};
use axum::http::StatusCode;
use common::{Fake, id, task};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Running {
    shutdown: CancellationToken,
    agent: JoinHandle<Result<(), Error>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.agent)
            .await
            .expect("the agent stops within 5 s")
            .expect("the agent does not panic")
            .expect("the agent ran");
    }
}

fn start(fake: &Fake, concurrency: usize, handler: impl Handler) -> Running {
    let config = AgentConfig {
        concurrency,
        capabilities: vec!["testing".into()],
        ..AgentConfig::new(fake.url.clone(), "tester")
    };
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(Agent::new(config, handler).run(shutdown.clone()));
    Running { shutdown, agent }
}

/// Counts the handlers that were dropped, which is how a cancelled handler ends.
#[derive(Clone, Default)]
struct Drops(Arc<AtomicUsize>);

struct DropGuard(Drops);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drops {
    fn guard(&self) -> DropGuard {
        DropGuard(self.clone())
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A handler that completes a task named `quick` at once, and otherwise starts, tells the
/// test its cancellation token, and waits forever.
fn hang(drops: Drops, started: mpsc::UnboundedSender<CancellationToken>) -> impl Handler {
    move |task: Assignment, ctx: TaskContext| {
        let drops = drops.clone();
        let started = started.clone();
        async move {
            if task.name == "quick" {
                return Outcome::complete(json!("done"));
            }
            let _guard = drops.guard();
            started.send(ctx.cancellation().clone()).unwrap();
            std::future::pending::<Outcome>().await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_up_to_its_free_slots_and_batches_completions() {
    let fake = Fake::start().await;
    for i in 0..64 {
        fake.push(task(
            &format!("t{i}"),
            json!({"prompt": format!("task {i}")}),
        ));
    }
    let running = start(
        &fake,
        16,
        |task: Assignment, _ctx: TaskContext| async move {
            Outcome::complete(json!({"done": task.name}))
        },
    );
    fake.wait_until("all 64 tasks are completed", |s| s.completed.len() == 64)
        .await;
    running.stop().await;

    fake.assert_clean();
    fake.with(|s| {
        assert_eq!(s.registrations.len(), 1);
        let registration = &s.registrations[0];
        assert_eq!(registration["name"], "tester");
        assert_eq!(registration["type"], "seed");
        assert_eq!(registration["capabilities"], json!(["testing"]));
        assert_eq!(registration["concurrency"], 16);
        assert_eq!(s.claims[0], 16, "the first claim asks for every slot");
        let mut ids = s.completed_ids();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 64, "each task completed once");
        for (id, result) in &s.completed {
            assert_eq!(format!("id-{}", result["done"].as_str().unwrap()), *id);
        }
        let largest = s.complete_requests.iter().max().copied().unwrap_or(0);
        assert!(
            largest > 1 && s.complete_requests.len() < 64,
            "completions are batched: {:?}",
            s.complete_requests
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_carry_output_files() {
    let fake = Fake::start().await;
    fake.push(task("writer", json!({"prompt": "write"})));
    let running = start(
        &fake,
        1,
        |_task: Assignment, _ctx: TaskContext| async move {
            Outcome::complete_with_files(
                json!({"summary": "wrote"}),
                vec![
                    OutputFile::text("site/copy.md", "# Hi\n"),
                    OutputFile::bytes("site/logo.bin", vec![0, 0xff]).executable(),
                ],
            )
        },
    );
    fake.wait_until("the task completes", |s| s.completed.len() == 1)
        .await;
    running.stop().await;
    fake.with(|s| {
        assert_eq!(
            s.completed_files,
            [(
                id("writer"),
                json!([{"path": "site/copy.md", "content": "# Hi\n"},
                       {"path": "site/logo.bin", "content_base64": "AP8=", "mode": "executable"}])
            )]
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_while_holding_nothing() {
    let fake = Fake::start().await;
    let running = start(&fake, 1, |_task: Assignment, _ctx: TaskContext| async {
        Outcome::complete(json!(null))
    });
    fake.wait_until("three heartbeats", |s| s.heartbeats >= 3)
        .await;
    running.stop().await;
    fake.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_failures_panics_questions_and_progress() {
    let fake = Fake::start().await;
    fake.push(task("flaky", json!({"prompt": "x"})));
    fake.push(task("broken", json!({"prompt": "x"})));
    fake.push(task("unsure", json!({"prompt": "x"})));
    fake.push(task("buggy", json!({"prompt": "x"})));
    let running = start(&fake, 4, |task: Assignment, ctx: TaskContext| async move {
        match task.name.as_str() {
            "flaky" => Outcome::fail("the network blinked", true),
            "broken" => Outcome::fail("the input is wrong", false),
            "buggy" => panic!("index out of bounds"),
            _ => {
                ctx.progress("read the brief").await.unwrap();
                Outcome::question("Which tone?")
            }
        }
    });
    fake.wait_until("four reports arrive", |s| {
        s.failed.len() == 3 && s.questions.len() == 1
    })
    .await;
    running.stop().await;

    fake.assert_clean();
    fake.with(|s| {
        let mut failed = s.failed.clone();
        failed.sort();
        assert_eq!(
            failed,
            [
                (id("broken"), "the input is wrong".to_owned(), false),
                (
                    id("buggy"),
                    "the handler panicked: index out of bounds".to_owned(),
                    false
                ),
                (id("flaky"), "the network blinked".to_owned(), true),
            ]
        );
        assert_eq!(s.questions, [(id("unsure"), "Which tone?".to_owned())]);
        assert_eq!(s.progress, [(id("unsure"), "read the brief".to_owned())]);
        assert!(s.completed.is_empty() && s.released.is_empty());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_task_fails_retryable_and_its_handler_is_stopped() {
    let fake = Fake::start().await;
    let mut slow = task("slow", json!({"prompt": "x"}));
    slow["timeout_seconds"] = json!(0.1);
    fake.push(slow);
    let drops = Drops::default();
    let (started, mut tokens) = mpsc::unbounded_channel();
    let running = start(&fake, 1, hang(drops.clone(), started));
    let token = tokens.recv().await.unwrap();
    fake.wait_until("the task fails", |s| !s.failed.is_empty())
        .await;
    running.stop().await;

    fake.assert_clean();
    fake.with(|s| {
        assert_eq!(s.failed.len(), 1);
        let (task, error, retryable) = &s.failed[0];
        assert_eq!(task, &id("slow"));
        assert!(error.contains("timed out"), "{error}");
        assert!(*retryable);
        assert!(s.completed.is_empty() && s.released.is_empty());
    });
    assert!(token.is_cancelled());
    assert_eq!(drops.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_cancelled_task_is_stopped_and_not_reported() {
    let fake = Fake::start().await;
    fake.push(task("lost", json!({"prompt": "x"})));
    fake.push(task("cancelled", json!({"prompt": "x"})));
    let drops = Drops::default();
    let (started, mut tokens) = mpsc::unbounded_channel();
    let running = start(&fake, 2, hang(drops.clone(), started));
    let first = tokens.recv().await.unwrap();
    let second = tokens.recv().await.unwrap();
    fake.wait_until("the agent heartbeats both tasks", |s| s.heartbeats > 1)
        .await;
    fake.with(|s| {
        s.lose.insert(id("lost"));
        s.cancel.insert(id("cancelled"));
    });
    for token in [first, second] {
        tokio::time::timeout(Duration::from_secs(2), token.cancelled())
            .await
            .expect("the handler is cancelled");
    }
    // The freed slots are claimed again.
    fake.push(task("quick", json!({"prompt": "x"})));
    fake.wait_until("the next task completes", |s| s.completed.len() == 1)
        .await;
    running.stop().await;

    fake.assert_clean();
    assert_eq!(drops.count(), 2, "both handlers were dropped");
    fake.with(|s| {
        assert_eq!(s.completed_ids(), [id("quick")]);
        assert!(s.failed.is_empty() && s.released.is_empty() && s.questions.is_empty());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_completion_is_dropped_without_retry() {
    let fake = Fake::start().await;
    fake.with(|s| s.refuse_completions = 1);
    fake.push(task("first", json!({"prompt": "x"})));
    let running = start(&fake, 1, |_task: Assignment, _ctx: TaskContext| async {
        Outcome::complete(json!("done"))
    });
    fake.wait_until("the completion is refused", |s| {
        s.complete_requests.len() == 1
    })
    .await;
    // Longer than a few retries would take.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(fake.with(|s| s.complete_requests.len()), 1, "no retry");
    // The slot was freed for the next task.
    fake.push(task("second", json!({"prompt": "x"})));
    fake.wait_until("the next task completes", |s| !s.completed.is_empty())
        .await;
    running.stop().await;

    fake.assert_clean();
    fake.with(|s| {
        assert_eq!(s.completed_ids(), [id("second")]);
        assert_eq!(s.complete_requests, [1, 1]);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_is_retried_while_the_controller_is_unavailable() {
    let fake = Fake::start().await;
    fake.with(|s| s.fail_completions = 3);
    fake.push(task("patient", json!({"prompt": "x"})));
    let running = start(&fake, 1, |_task: Assignment, _ctx: TaskContext| async {
        Outcome::complete(json!("done"))
    });
    fake.wait_until("the task completes", |s| !s.completed.is_empty())
        .await;
    running.stop().await;

    fake.assert_clean();
    fake.with(|s| {
        assert_eq!(s.completed_ids(), [id("patient")]);
        assert_eq!(
            s.complete_requests,
            [1, 1, 1, 1],
            "three refusals, then accepted"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_handlers_and_releases_their_tasks() {
    let fake = Fake::start().await;
    for name in ["a", "b", "c"] {
        fake.push(task(name, json!({"prompt": "x"})));
    }
    let drops = Drops::default();
    let (started, mut tokens) = mpsc::unbounded_channel();
    let running = start(&fake, 3, hang(drops.clone(), started));
    for _ in 0..3 {
        tokens.recv().await.unwrap();
    }
    let claims = fake.with(|s| s.claims.len());
    running.stop().await;

    fake.assert_clean();
    assert_eq!(drops.count(), 3, "every handler was stopped");
    fake.with(|s| {
        let mut released = s.released.clone();
        released.sort();
        assert_eq!(released, [id("a"), id("b"), id("c")]);
        assert_eq!(s.held_count(), 0);
        assert_eq!(s.claims.len(), claims, "no claim after shutdown");
        assert!(s.completed.is_empty() && s.failed.is_empty());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_means_registering_again_once() {
    let fake = Fake::start().await;
    let names = ["a", "b", "c", "d"];
    for name in names {
        fake.push(task(name, json!({"prompt": "x"})));
    }
    // The handlers report progress together once the token is revoked: four requests
    // refused at once must lead to one registration, not four.
    let gate = CancellationToken::new();
    let handler_gate = gate.clone();
    let running = start(&fake, 4, move |_task: Assignment, ctx: TaskContext| {
        let gate = handler_gate.clone();
        async move {
            gate.cancelled().await;
            match ctx.progress("halfway").await {
                Ok(()) => Outcome::complete(json!("done")),
                Err(e) => Outcome::fail(e.to_string(), false),
            }
        }
    });
    fake.wait_until("the agent holds all tasks", |s| s.held_count() == 4)
        .await;
    fake.with(|s| {
        s.revoke_token();
        s.gather_refusals = 4;
    });
    gate.cancel();
    fake.wait_until("the tasks complete", |s| s.completed.len() == 4)
        .await;
    running.stop().await;

    fake.with(|s| {
        assert!(s.violations.is_empty(), "{:#?}", s.violations);
        assert!(s.unauthorized >= 4, "the old token was refused");
        assert_eq!(s.registrations.len(), 2, "registered again, once");
        assert_eq!(s.progress.len(), 4);
        assert!(s.failed.is_empty(), "{:?}", s.failed);
    });
}

#[tokio::test]
async fn a_refused_registration_fails_the_run() {
    let fake = Fake::start().await;
    let config = AgentConfig {
        name: String::new(),
        ..AgentConfig::new(fake.url.clone(), "")
    };
    let handler = |_task: Assignment, _ctx: TaskContext| async { Outcome::complete(json!(null)) };
    let error = Agent::new(config, handler)
        .run(CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::BAD_REQUEST), "{error}");
}
