//! The store's queue against the dispatch rules: the same tasks, the same agents and the same
//! random sequence of claims and reports go to a real database and to the memory queue
//! (`dispatch::memory`, built from `dispatch::rules`), and every answer must agree.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use agentops::dispatch::memory::{MemoryQueue, NewTask};
use agentops::store::queue::{
    AgentCompletion, AgentIdentity, Assignment, Claimer, Completion, Lease, LeasePolicy, Queue,
};
use common::*;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

both_backends!(
    the_store_queue_follows_the_dispatch_rules,
    the_store_backs_off_as_the_rules_say
);

/// `(name, assignee, priority, extra spec lines, dependencies)`; priorities all differ, so
/// the claim order never depends on creation times.
/// A task of the scenario: name, assignee, priority, extra spec lines, dependencies.
type TaskLine = (
    &'static str,
    &'static str,
    i32,
    &'static [&'static str],
    &'static [&'static str],
);

const TASKS: &[TaskLine] = &[
    ("t0", "seed", 95, &[], &[]),
    ("t1", "seed", 90, &[], &["t0"]),
    ("t2", "seed", 85, &["retries: 1"], &[]),
    ("t3", "specialist", 80, &["capabilities: [writing]"], &[]),
    ("t4", "writer", 75, &[], &[]),
    ("t5", "seed", 70, &[], &["t2"]),
    ("t6", "specialist", 65, &[], &[]),
    ("t7", "seed", 60, &["retries: 0"], &[]),
    ("t8", "seed", 55, &[], &["t1", "t7"]),
    ("t9", "specialist", 50, &[], &["t3"]),
];

fn agents() -> Vec<AgentIdentity> {
    let agent = |name: &str, agent_type: &str, capabilities: &[&str]| AgentIdentity {
        name: name.into(),
        agent_type: agent_type.into(),
        capabilities: capabilities.iter().map(|c| (*c).into()).collect(),
        concurrency: 4,
    };
    vec![
        agent("seed-a", "seed", &[]),
        agent("seed-b", "seed", &[]),
        agent("writer", "specialist", &["writing"]),
        agent("helper", "specialist", &[]),
    ]
}

fn retries(extra: &[&str]) -> i32 {
    extra
        .iter()
        .find_map(|line| line.strip_prefix("retries: "))
        .map_or(3, |n| n.parse().unwrap())
}

/// Leases held on one side, by task name, with the holder.
type Held = BTreeMap<String, (String, Assignment)>;

fn lease(a: &Assignment) -> Lease {
    Lease {
        id: a.id,
        run_lease: a.run_lease,
    }
}

/// One side's answers, by task name, for comparison.
fn dealt(claimers: &[Claimer], answers: &[Vec<Assignment>], held: &mut Held) -> Vec<Vec<String>> {
    claimers
        .iter()
        .zip(answers)
        .map(|(claimer, tasks)| {
            tasks
                .iter()
                .map(|task| {
                    held.insert(
                        task.name.clone(),
                        (claimer.agent.name.clone(), task.clone()),
                    );
                    format!(
                        "{} attempt {} lease {}",
                        task.name, task.attempt, task.run_lease
                    )
                })
                .collect()
        })
        .collect()
}

async fn the_store_queue_follows_the_dispatch_rules<S: TestStore + Queue>() {
    let policy = LeasePolicy {
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        ..LeasePolicy::default()
    };
    let agents = agents();
    for seed in [1u64, 2, 3, 4] {
        let mut env = Env::<S>::new().await;
        let memory = MemoryQueue::new();
        let mut files = vec![(
            "projects/web/project.yaml".to_owned(),
            format!("{API}\nkind: Project\nmetadata:\n  name: web\nspec:\n  title: Web\n"),
        )];
        for (name, assignee, priority, extra, deps) in TASKS {
            let mut spec = format!(
                "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: {name}\n  \
                 assignee: {assignee}\n  priority: {priority}\n  dependsOn: [{}]\n  \
                 action:\n    prompt: Do {name}\n",
                deps.join(", ")
            );
            for line in *extra {
                spec.push_str(&format!("  {line}\n"));
            }
            files.push((format!("projects/web/tasks/{name}.yaml"), spec));
            let capabilities = if extra.contains(&"capabilities: [writing]") {
                vec!["writing".to_owned()]
            } else {
                Vec::new()
            };
            memory.add(NewTask {
                capabilities,
                depends_on: deps.iter().map(|d| format!("web/{d}")).collect(),
                priority: Some(*priority),
                retries: retries(extra),
                ..NewTask::new("web", name, assignee)
            });
        }
        let changes: Vec<(&str, Option<&str>)> = files
            .iter()
            .map(|(path, text)| (path.as_str(), Some(text.as_str())))
            .collect();
        env.commit("tasks", &changes);
        let report = env.sync().await;
        assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
        let store = env.syncer.store();

        let mut rng = StdRng::seed_from_u64(seed);
        let (mut store_held, mut memory_held) = (Held::new(), Held::new());
        // Finished leases, to report again: a stale report must be refused alike.
        let mut finished: Vec<String> = Vec::new();
        let mut log = Vec::new();
        for step in 0..60 {
            let op = rng.random_range(0..10);
            let what = match op {
                0..=3 => {
                    let how_many = rng.random_range(1..=agents.len());
                    let mut claimers: Vec<Claimer> = agents
                        .choose_multiple(&mut rng, how_many)
                        .map(|agent| Claimer {
                            agent: agent.clone(),
                            max: rng.random_range(1..=2),
                        })
                        .collect();
                    claimers.shuffle(&mut rng);
                    let in_store = store.claim(&claimers, &policy).await.unwrap();
                    let in_memory = memory.claim(&claimers, &policy).await.unwrap();
                    let a = dealt(&claimers, &in_store, &mut store_held);
                    let b = dealt(&claimers, &in_memory, &mut memory_held);
                    let names: Vec<&str> = claimers.iter().map(|c| c.agent.name.as_str()).collect();
                    assert_eq!(
                        a, b,
                        "seed {seed} step {step}: claim by {names:?}\n{log:#?}"
                    );
                    format!("claim by {names:?}: {a:?}")
                }
                4..=8 if !store_held.is_empty() => {
                    let name = store_held
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .choose(&mut rng)
                        .unwrap()
                        .clone();
                    let (agent, s) = store_held.remove(&name).unwrap();
                    let (_, m) = memory_held.remove(&name).expect("held on both sides");
                    let kind = op;
                    let retryable = rng.random_bool(0.5);
                    let (a, b) = match kind {
                        4..=6 => {
                            let done = |task: &Assignment| Completion {
                                lease: lease(task),
                                result: serde_json::json!({"summary": "ok"}),
                                artifacts: Vec::new(),
                                review: false,
                            };
                            let (cs, cm) = (done(&s), done(&m));
                            let a = store
                                .complete(&[AgentCompletion {
                                    agent: &agent,
                                    completion: &cs,
                                }])
                                .await
                                .unwrap();
                            let b = memory
                                .complete(&[AgentCompletion {
                                    agent: &agent,
                                    completion: &cm,
                                }])
                                .await
                                .unwrap();
                            (format!("{a:?}"), format!("{b:?}"))
                        }
                        7 => {
                            let a = store
                                .fail(&agent, lease(&s), "no", retryable, &policy)
                                .await
                                .unwrap();
                            let b = memory
                                .fail(&agent, lease(&m), "no", retryable, &policy)
                                .await
                                .unwrap();
                            (format!("{a:?}"), format!("{b:?}"))
                        }
                        _ => {
                            let a = store.release(&agent, lease(&s)).await.unwrap();
                            let b = memory.release(&agent, lease(&m)).await.unwrap();
                            (format!("{a:?}"), format!("{b:?}"))
                        }
                    };
                    assert_eq!(
                        a, b,
                        "seed {seed} step {step}: report {kind} on {name}\n{log:#?}"
                    );
                    finished.push(name.clone());
                    format!("report {kind} (retryable {retryable}) on {name} by {agent}: {a}")
                }
                9 => {
                    let a = store.block_dependents().await.unwrap();
                    let b = memory.block_dependents().await.unwrap();
                    assert_eq!(a, b, "seed {seed} step {step}: blocked\n{log:#?}");
                    format!("blocked {a}")
                }
                _ => continue,
            };
            log.push(what);
            assert_eq!(
                store.queue_depth().await.unwrap(),
                memory.queue_depth().await.unwrap(),
                "seed {seed} step {step}: depth\n{log:#?}"
            );
        }
        let mut in_store: Vec<(String, String, i64)> = env
            .db
            .tasks()
            .await
            .into_iter()
            .map(|t| (t.name, t.status, t.attempt))
            .collect();
        in_store.sort();
        let mut in_memory = Vec::new();
        for (name, ..) in TASKS {
            let id = memory_id(&memory, name);
            let task = memory.task(id).unwrap();
            in_memory.push((
                name.to_string(),
                task.status.as_str().to_owned(),
                task.attempt as i64,
            ));
        }
        in_memory.sort();
        assert_eq!(in_store, in_memory, "seed {seed}: final states\n{log:#?}");
        assert!(
            !finished.is_empty() && in_store.iter().any(|(_, status, _)| status == "completed"),
            "seed {seed}: the sequence finished nothing, so it tested little\n{log:#?}"
        );
    }
}

/// The memory queue's id of task `name`: it made its own.
fn memory_id(memory: &MemoryQueue, name: &str) -> uuid::Uuid {
    memory
        .ids()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, id)| id)
        .expect("the memory queue holds every task")
}

/// The retry wait the statements compute in SQL is the one `rules::backoff` gives, from the
/// first attempt to past the cap.
async fn the_store_backs_off_as_the_rules_say<S: TestStore + Queue>() {
    let policy = LeasePolicy {
        backoff_base: Duration::from_secs(3),
        backoff_max: Duration::from_secs(100),
        ..LeasePolicy::default()
    };
    let mut env = Env::<S>::new().await;
    let project = format!("{API}\nkind: Project\nmetadata:\n  name: web\nspec:\n  title: Web\n");
    let task = format!(
        "{API}\nkind: Task\nmetadata:\n  name: flaky\nspec:\n  title: flaky\n  retries: 50\n  \
         action:\n    prompt: Try\n"
    );
    env.commit(
        "tasks",
        &[
            ("projects/web/project.yaml", Some(&project)),
            ("projects/web/tasks/flaky.yaml", Some(&task)),
        ],
    );
    env.sync().await;
    let store = env.syncer.store();
    let seed = &agents()[0];
    let claimer = [Claimer {
        agent: seed.clone(),
        max: 1,
    }];
    for attempt in [0, 1, 2, 4, 5, 6, 30] {
        env.db
            .execute(&format!(
                "UPDATE tasks SET attempt = {attempt}, not_before = NULL WHERE name = 'flaky'"
            ))
            .await;
        let claimed = store.claim(&claimer, &policy).await.unwrap();
        let held = &claimed[0][0];
        assert_eq!(held.attempt, attempt);
        let outcome = store
            .fail(&seed.name, lease(held), "again", true, &policy)
            .await
            .unwrap();
        assert_eq!(outcome, Ok(agentops::store::queue::FailOutcome::Retry));
        let expr = env.db.seconds_until("not_before");
        let waits = env
            .db
            .scalar(&format!("SELECT {expr} FROM tasks WHERE name = 'flaky'"))
            .await;
        let expected = agentops::dispatch::rules::backoff(&policy, attempt).as_secs() as i64;
        assert!(
            (waits - expected).abs() <= 1,
            "attempt {attempt}: the store waits {waits} s, the rules {expected} s"
        );
    }
}
