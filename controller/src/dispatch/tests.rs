//! The dispatcher's claim loop, group commit and sweeps, over the memory queue.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::memory::{MemoryQueue, NewTask};
use super::rules::TaskStatus;
use super::*;

fn agent(name: &str, agent_type: &str) -> AgentIdentity {
    AgentIdentity {
        name: name.into(),
        agent_type: agent_type.into(),
        capabilities: Vec::new(),
        concurrency: 1,
    }
}

fn config(policy: LeasePolicy) -> DispatchConfig {
    DispatchConfig {
        policy,
        ..DispatchConfig::default()
    }
}

fn lease_of(task: &Assignment) -> Lease {
    Lease {
        id: task.id,
        run_lease: task.run_lease,
    }
}

fn done(task: &Assignment) -> Completion {
    Completion {
        lease: lease_of(task),
        result: serde_json::json!({"summary": "done"}),
        artifacts: Vec::new(),
        review: false,
    }
}

/// Forty agents asking at once for twenty-five tasks: each task goes to one agent, and the
/// claims reach the queue in a few batches rather than one statement per agent.
#[tokio::test]
async fn concurrent_claims_are_batched_and_never_share_a_task() {
    let queue = MemoryQueue::with_latency(Duration::from_millis(20));
    for n in 0..25 {
        queue.add(NewTask::new("p", &format!("t{n}"), "seed"));
    }
    let dispatcher = Dispatcher::new(queue, DispatchConfig::default());
    let _loops = dispatcher.start();
    let claims: Vec<_> = (0..40)
        .map(|n| {
            let dispatcher = Arc::clone(&dispatcher);
            tokio::spawn(async move {
                dispatcher
                    .claim(
                        &agent(&format!("seed-{n}"), "seed"),
                        1,
                        Duration::from_millis(300),
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut leased = 0;
    for claim in claims {
        let tasks = claim.await.unwrap();
        assert!(tasks.len() <= 1, "max 1 was asked for");
        for task in tasks {
            leased += 1;
            assert!(ids.insert(task.id), "task {} leased twice", task.name);
            assert_eq!(task.run_lease, 1);
        }
    }
    assert_eq!(leased, 25);
    let (claim_calls, _) = dispatcher.queue().calls();
    assert!(
        claim_calls < 20,
        "{claim_calls} claim batches for 40 claimers"
    );
}

/// Completions arriving together are written together; a repeat of one that completed is
/// refused.
#[tokio::test]
async fn completions_arriving_together_are_one_batch() {
    let queue = MemoryQueue::with_latency(Duration::from_millis(20));
    for n in 0..30 {
        queue.add(NewTask::new("p", &format!("t{n}"), "seed"));
    }
    let agents: Vec<AgentIdentity> = (0..30)
        .map(|n| agent(&format!("seed-{n}"), "seed"))
        .collect();
    let claimers: Vec<Claimer> = agents
        .iter()
        .map(|a| Claimer {
            agent: a.clone(),
            max: 1,
        })
        .collect();
    let leased = queue
        .claim(&claimers, &LeasePolicy::default())
        .await
        .unwrap();
    let dispatcher = Dispatcher::new(queue, DispatchConfig::default());
    let reports: Vec<_> = agents
        .iter()
        .zip(&leased)
        .map(|(agent, tasks)| {
            assert_eq!(tasks.len(), 1, "dealt one each");
            let dispatcher = Arc::clone(&dispatcher);
            let (agent, completion) = (agent.clone(), done(&tasks[0]));
            tokio::spawn(async move { dispatcher.complete(&agent, &[completion]).await.unwrap() })
        })
        .collect();
    for report in reports {
        assert_eq!(report.await.unwrap(), vec![Ok(())]);
    }
    let (_, complete_calls) = dispatcher.queue().calls();
    assert!(
        complete_calls < 15,
        "{complete_calls} batches for 30 completions"
    );
    for tasks in &leased {
        assert_eq!(
            dispatcher.queue().task(tasks[0].id).unwrap().status,
            TaskStatus::Completed
        );
    }
    let again = dispatcher
        .complete(&agents[0], &[done(&leased[0][0])])
        .await
        .unwrap();
    assert_eq!(again, vec![Err(Refusal::NotHeld)]);
}

/// A retryable failure comes back after its backoff with attempt + 1; a lease that runs out
/// does too, once the dispatcher has given agents one lease to check in.
#[tokio::test]
async fn failures_and_expired_leases_retry_after_the_backoff() {
    let policy = LeasePolicy {
        lease: Duration::from_millis(80),
        backoff_base: Duration::from_millis(150),
        backoff_max: Duration::from_secs(10),
    };
    let queue = MemoryQueue::new();
    let id = queue.add(NewTask::new("p", "flaky", "seed"));
    let dispatcher = Dispatcher::new(queue, config(policy));
    let _loops = dispatcher.start();
    let seed = agent("seed-1", "seed");
    let claim = |wait| {
        let dispatcher = Arc::clone(&dispatcher);
        let seed = seed.clone();
        async move { dispatcher.claim(&seed, 1, wait).await.unwrap() }
    };

    let first = claim(Duration::from_millis(100)).await;
    assert_eq!(first.len(), 1);
    let outcome = dispatcher
        .fail(&seed, lease_of(&first[0]), "boom", true)
        .await
        .unwrap();
    assert_eq!(outcome, Ok(FailOutcome::Retry));
    let task = dispatcher.queue().task(id).unwrap();
    assert_eq!((task.status, task.attempt), (TaskStatus::Pending, 1));
    assert!(
        claim(Duration::from_millis(20)).await.is_empty(),
        "still backing off"
    );
    let second = claim(Duration::from_secs(2)).await;
    assert_eq!(second.len(), 1, "ready once the backoff passed");
    assert_eq!((second[0].attempt, second[0].run_lease), (1, 2));

    // Left to run out: past the dispatcher's first lease, the sweep retries it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    dispatcher.sweep().await.unwrap();
    let task = dispatcher.queue().task(id).unwrap();
    assert_eq!((task.status, task.attempt), (TaskStatus::Pending, 2));
    assert_eq!(task.error.as_deref(), Some("lease expired"));
    let late = dispatcher
        .complete(&seed, &[done(&second[0])])
        .await
        .unwrap();
    assert_eq!(
        late,
        vec![Err(Refusal::NotHeld)],
        "fenced out by the expiry"
    );
}

/// The sweep blocks a dependent of a failed task and names the dependency.
#[tokio::test]
async fn a_dependent_of_a_failed_task_is_blocked() {
    let queue = MemoryQueue::new();
    let first = queue.add(NewTask::new("p", "first", "seed"));
    let then = queue.add(NewTask {
        depends_on: vec!["p/first".into()],
        ..NewTask::new("p", "then", "seed")
    });
    let dispatcher = Dispatcher::new(queue, DispatchConfig::default());
    let seed = agent("seed-1", "seed");
    let _loops = dispatcher.start();
    let tasks = dispatcher
        .claim(&seed, 5, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "the dependent waits");
    assert_eq!(tasks[0].id, first);
    let failed = dispatcher
        .fail(&seed, lease_of(&tasks[0]), "no", false)
        .await
        .unwrap();
    assert_eq!(failed, Ok(FailOutcome::Failed));
    dispatcher.sweep().await.unwrap();
    let blocked = dispatcher.queue().task(then).unwrap();
    assert_eq!(blocked.status, TaskStatus::Blocked);
    assert_eq!(
        blocked.status_message.as_deref(),
        Some("dependency p/first failed")
    );
}

/// Once claiming stops, a ready task is leased to nobody, and held ones can still finish.
#[tokio::test]
async fn after_stop_claiming_nothing_is_leased_but_reports_are_taken() {
    let queue = MemoryQueue::new();
    queue.add(NewTask::new("p", "a", "seed"));
    queue.add(NewTask::new("p", "b", "seed"));
    let dispatcher = Dispatcher::new(queue, DispatchConfig::default());
    let seed = agent("seed-1", "seed");
    let _loops = dispatcher.start();
    let held = dispatcher
        .claim(&seed, 1, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    dispatcher.stop_claiming().await;
    let after = dispatcher
        .claim(&seed, 1, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(after.is_empty());
    let answer = dispatcher.complete(&seed, &[done(&held[0])]).await.unwrap();
    assert_eq!(answer, vec![Ok(())]);
}

/// Agents of one role share its tasks round-robin; a task named for an agent goes to it.
#[tokio::test]
async fn role_tasks_are_dealt_and_named_tasks_go_to_their_agent() {
    let queue = MemoryQueue::new();
    for n in 0..4 {
        queue.add(NewTask::new("p", &format!("role-{n}"), "specialist"));
    }
    let named = queue.add(NewTask {
        priority: Some(10),
        ..NewTask::new("p", "for-b", "writer-b")
    });
    let claimers: Vec<Claimer> = ["writer-a", "writer-b"]
        .iter()
        .map(|name| Claimer {
            agent: agent(name, "specialist"),
            max: 3,
        })
        .collect();
    let dealt = queue
        .claim(&claimers, &LeasePolicy::default())
        .await
        .unwrap();
    let names = |tasks: &[Assignment]| tasks.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    // writer-b's named task takes one of its three slots; the role's four go slot by slot.
    assert_eq!(names(&dealt[0]), ["role-0", "role-2"]);
    assert_eq!(names(&dealt[1]), ["role-1", "role-3", "for-b"]);
    assert_eq!(dealt[1][2].id, named, "lowest priority last");
}
