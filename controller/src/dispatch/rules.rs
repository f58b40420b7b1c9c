//! The rules of dispatch, as plain functions: when a task is ready, who may take it, in which
//! order ready tasks go and how they are dealt over the claimers of a pool, what a failure or
//! an expired lease leads to, when a dependent is blocked, and which completions of a batch
//! repeat an earlier one.
//!
//! The store's statements (`store::queue_*`) carry these rules out in SQL, one statement per
//! operation, because that is what makes a claim atomic and fast; the memory queue
//! (`memory.rs`) carries them out with these functions. The dispatch tests run the same
//! scenarios on both, so a rule changed in one place and not the other fails there.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::queue::{Claimer, FailOutcome, Lease, LeasePolicy, Refusal};

/// A task's `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    Pending,
    InProgress,
    Review,
    Blocked,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Review => "review",
            TaskStatus::Blocked => "blocked",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

/// What readiness looks at, apart from who may run the task.
#[derive(Debug, Clone, Copy)]
pub struct Readiness<'a> {
    pub status: TaskStatus,
    pub pruned: bool,
    pub not_before: Option<DateTime<Utc>>,
    pub project_suspended: bool,
    /// The status of each dependency, `None` for one that does not exist.
    pub dependencies: &'a [Option<TaskStatus>],
}

/// Pending, not pruned, past its backoff, its project not suspended, and every dependency
/// completed (one that does not exist never is).
pub fn is_ready(task: &Readiness<'_>, now: DateTime<Utc>) -> bool {
    task.status == TaskStatus::Pending
        && !task.pruned
        && task.not_before.is_none_or(|t| t <= now)
        && !task.project_suspended
        && task
            .dependencies
            .iter()
            .all(|d| *d == Some(TaskStatus::Completed))
}

/// How a claimer may come by a task assigned to `assignee`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Assigned to the claimer by name: it goes to that claimer.
    Named,
    /// Assigned to the claimer's role: dealt over the role's claimers.
    Role,
}

/// Whether `claimer` may take a task assigned to `assignee` that needs `capabilities`. A
/// claimer named like its role takes only role work, so the two routes never meet.
pub fn route(claimer: &Claimer, assignee: &str, capabilities: &[String]) -> Option<Route> {
    let agent = &claimer.agent;
    if !capabilities.iter().all(|c| agent.capabilities.contains(c)) {
        return None;
    }
    if assignee == agent.agent_type {
        Some(Route::Role)
    } else if assignee == agent.name {
        Some(Route::Named)
    } else {
        None
    }
}

/// The order ready tasks are handed out in: higher priority first, no priority last, then the
/// older first (`created` is any key that orders by creation).
pub fn claim_order<C: Ord>(a: (Option<i32>, C), b: (Option<i32>, C)) -> Ordering {
    let by_priority = match (a.0, b.0) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    by_priority.then_with(|| a.1.cmp(&b.1))
}

/// The claimers' positions grouped by pool (role and capabilities), each group in the
/// claimers' order, the groups in the order of their first claimer.
pub fn pools(claimers: &[Claimer]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut index: HashMap<(&str, &[String]), usize> = HashMap::new();
    for (i, claimer) in claimers.iter().enumerate() {
        let group = *index.entry(claimer.pool()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push(i);
    }
    groups
}

/// Deal `picked` tasks, in claim order, over claimers with `free_slots` each: the first slot
/// of every claimer in turn, then the second, and so on, so that a few ready tasks spread
/// over the waiting agents instead of all going to the first. Returns the claimer of each
/// dealt task; tasks beyond the free slots are not dealt.
pub fn deal(free_slots: &[u32], picked: usize) -> Vec<usize> {
    let mut dealt = Vec::with_capacity(picked.min(free_slots.iter().map(|&s| s as usize).sum()));
    let mut slot = 0;
    while dealt.len() < picked {
        let before = dealt.len();
        for (claimer, &free) in free_slots.iter().enumerate() {
            if free > slot && dealt.len() < picked {
                dealt.push(claimer);
            }
        }
        if dealt.len() == before {
            break;
        }
        slot += 1;
    }
    dealt
}

/// What a failure of attempt `attempt` (0-based) of a task allowed `retries` retries leads to.
/// An expired lease is a retryable failure.
pub fn fail_outcome(retryable: bool, attempt: i32, retries: i32) -> FailOutcome {
    if retryable && attempt < retries {
        FailOutcome::Retry
    } else {
        FailOutcome::Failed
    }
}

/// The wait before the retry that follows attempt `attempt` (0-based): the base, doubled for
/// each attempt after the first, up to the cap. The store's statements compute the same in
/// SQL (`{backoff}` in `store/sql.rs`); `tests/queue_rules.rs` holds the two to each other on
/// both engines.
pub fn backoff(policy: &LeasePolicy, attempt: i32) -> Duration {
    let factor = 1u32 << attempt.clamp(0, 20);
    policy
        .backoff_base
        .saturating_mul(factor)
        .min(policy.backoff_max)
}

/// When the retry that follows attempt `attempt` becomes ready.
pub fn retry_at(now: DateTime<Utc>, policy: &LeasePolicy, attempt: i32) -> DateTime<Utc> {
    now + chrono::Duration::from_std(backoff(policy, attempt)).unwrap_or(chrono::Duration::MAX)
}

/// Why a pending task is blocked: its first dependency, in the order written, that failed or
/// was cancelled. `None` while none did.
pub fn block_reason<'a>(
    dependencies: impl IntoIterator<Item = (&'a str, Option<TaskStatus>)>,
) -> Option<String> {
    dependencies
        .into_iter()
        .find_map(|(name, status)| match status {
            Some(s @ (TaskStatus::Failed | TaskStatus::Cancelled)) => {
                Some(format!("dependency {name} {}", s.as_str()))
            }
            _ => None,
        })
}

/// For each completion of a batch, the earlier one with the same lease that it repeats. A
/// repeat is not written: the first decides.
pub fn repeats(leases: impl IntoIterator<Item = Lease>) -> Vec<Option<usize>> {
    let mut first = HashMap::new();
    leases
        .into_iter()
        .enumerate()
        .map(|(i, lease)| match first.get(&lease) {
            Some(&earlier) => Some(earlier),
            None => {
                first.insert(lease, i);
                None
            }
        })
        .collect()
}

/// One answer per completion: `written[i]` for those written, and for a repeat, refused when
/// its first completed the task or refused like its first.
pub fn completion_answers(
    written: Vec<Option<Result<(), Refusal>>>,
    repeats: &[Option<usize>],
) -> Vec<Result<(), Refusal>> {
    let mut answers: Vec<Result<(), Refusal>> = Vec::with_capacity(repeats.len());
    for (i, repeat) in repeats.iter().enumerate() {
        let answer = match repeat {
            Some(first) => match answers[*first] {
                Ok(()) => Err(Refusal::NotHeld),
                refused => refused,
            },
            None => written[i].unwrap_or(Err(Refusal::NotHeld)),
        };
        answers.push(answer);
    }
    answers
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::store::queue::AgentIdentity;

    fn claimer(name: &str, agent_type: &str, capabilities: &[&str]) -> Claimer {
        Claimer {
            agent: AgentIdentity {
                name: name.into(),
                agent_type: agent_type.into(),
                capabilities: capabilities.iter().map(|c| (*c).into()).collect(),
                concurrency: 1,
            },
            max: 1,
        }
    }

    fn ready(status: TaskStatus, dependencies: &[Option<TaskStatus>]) -> bool {
        let task = Readiness {
            status,
            pruned: false,
            not_before: None,
            project_suspended: false,
            dependencies,
        };
        is_ready(&task, Utc::now())
    }

    #[test]
    fn only_a_pending_task_with_every_dependency_completed_is_ready() {
        use TaskStatus::*;
        assert!(ready(Pending, &[]));
        assert!(ready(Pending, &[Some(Completed), Some(Completed)]));
        assert!(!ready(Pending, &[Some(Completed), Some(Review)]));
        assert!(
            !ready(Pending, &[None]),
            "a missing dependency never completes"
        );
        for status in [InProgress, Review, Blocked, Completed, Failed, Cancelled] {
            assert!(!ready(status, &[]), "{status:?}");
        }
    }

    #[test]
    fn backoff_suspension_and_pruning_hold_a_task_back() {
        let now = Utc::now();
        let base = Readiness {
            status: TaskStatus::Pending,
            pruned: false,
            not_before: None,
            project_suspended: false,
            dependencies: &[],
        };
        let later = now + chrono::Duration::seconds(1);
        assert!(!is_ready(
            &Readiness {
                not_before: Some(later),
                ..base
            },
            now
        ));
        assert!(is_ready(
            &Readiness {
                not_before: Some(now),
                ..base
            },
            now
        ));
        assert!(!is_ready(
            &Readiness {
                project_suspended: true,
                ..base
            },
            now
        ));
        assert!(!is_ready(
            &Readiness {
                pruned: true,
                ..base
            },
            now
        ));
    }

    #[test]
    fn a_task_goes_to_its_role_or_to_the_agent_it_names_if_capable() {
        let writer = claimer("writer-1", "specialist", &["writing"]);
        assert_eq!(route(&writer, "specialist", &[]), Some(Route::Role));
        assert_eq!(
            route(&writer, "writer-1", &["writing".into()]),
            Some(Route::Named)
        );
        assert_eq!(route(&writer, "writer-1", &["research".into()]), None);
        assert_eq!(route(&writer, "seed", &[]), None);
        // Named like its role: the task is role work.
        let seed = claimer("seed", "seed", &[]);
        assert_eq!(route(&seed, "seed", &[]), Some(Route::Role));
    }

    #[test]
    fn higher_priority_goes_first_then_older_and_no_priority_last() {
        let mut tasks = vec![(None, 0), (Some(50), 2), (Some(90), 3), (Some(50), 1)];
        tasks.sort_by(|a, b| claim_order(*a, *b));
        assert_eq!(
            tasks,
            vec![(Some(90), 3), (Some(50), 1), (Some(50), 2), (None, 0)]
        );
    }

    #[test]
    fn dealing_spreads_a_few_tasks_over_the_claimers() {
        assert_eq!(deal(&[32, 32, 32], 2), vec![0, 1]);
        assert_eq!(deal(&[2, 1, 3], 6), vec![0, 1, 2, 0, 2, 2]);
        assert_eq!(deal(&[1, 1], 5), vec![0, 1], "more tasks than slots");
        assert_eq!(deal(&[0, 2], 2), vec![1, 1]);
        assert!(deal(&[], 3).is_empty());
    }

    #[test]
    fn claimers_of_one_role_and_capabilities_share_a_pool() {
        let claimers = [
            claimer("a", "seed", &[]),
            claimer("b", "specialist", &["x"]),
            claimer("c", "seed", &[]),
            claimer("d", "specialist", &["y"]),
            claimer("e", "specialist", &["x"]),
        ];
        assert_eq!(pools(&claimers), vec![vec![0, 2], vec![1, 4], vec![3]]);
    }

    #[test]
    fn the_first_failed_or_cancelled_dependency_blocks() {
        use TaskStatus::*;
        assert_eq!(
            block_reason([("p/a", Some(Completed)), ("p/b", Some(Pending))]),
            None
        );
        assert_eq!(
            block_reason([
                ("p/a", Some(Pending)),
                ("p/b", Some(Cancelled)),
                ("p/c", Some(Failed))
            ]),
            Some("dependency p/b cancelled".into())
        );
        assert_eq!(block_reason([("p/a", None)]), None, "missing is waited for");
    }

    #[test]
    fn a_repeat_completion_is_refused_once_its_first_completed() {
        let lease = |n| Lease {
            id: Uuid::from_u128(n),
            run_lease: 1,
        };
        let batch = [lease(1), lease(2), lease(1), lease(2)];
        let repeats = repeats(batch);
        assert_eq!(repeats, vec![None, None, Some(0), Some(1)]);
        let written = vec![Some(Ok(())), Some(Err(Refusal::NotHeld)), None, None];
        assert_eq!(
            completion_answers(written, &repeats),
            vec![
                Ok(()),
                Err(Refusal::NotHeld),
                Err(Refusal::NotHeld),
                Err(Refusal::NotHeld)
            ]
        );
    }

    proptest! {
        /// Every dealt task goes to one claimer with a free slot, no claimer gets more than
        /// its slots, as many are dealt as fit, and claimers with room left differ by at most
        /// one task.
        #[test]
        fn dealing_is_complete_bounded_and_fair(
            free in prop::collection::vec(0u32..8, 0..12),
            picked in 0usize..80,
        ) {
            let dealt = deal(&free, picked);
            let capacity: usize = free.iter().map(|&s| s as usize).sum();
            prop_assert_eq!(dealt.len(), picked.min(capacity));
            let mut got = vec![0u32; free.len()];
            for &claimer in &dealt {
                got[claimer] += 1;
            }
            for (claimer, (&g, &f)) in got.iter().zip(&free).enumerate() {
                prop_assert!(g <= f, "claimer {} got {} of {} slots", claimer, g, f);
            }
            let unfilled: Vec<u32> = got.iter().zip(&free).filter(|(g, f)| g < f).map(|(g, _)| *g).collect();
            if let (Some(lo), Some(hi)) = (unfilled.iter().min(), got.iter().max()) {
                prop_assert!(hi - lo <= 1, "uneven deal {:?} of {:?}", got, free);
            }
        }

        /// The retry waits grow from the base, double each time, and stop at the cap.
        #[test]
        fn backoff_doubles_up_to_its_cap(base_ms in 1u64..10_000, cap_ms in 1u64..1_000_000, attempt in -3i32..64) {
            let policy = LeasePolicy {
                lease: Duration::from_secs(30),
                backoff_base: Duration::from_millis(base_ms),
                backoff_max: Duration::from_millis(cap_ms),
            };
            let wait = backoff(&policy, attempt);
            prop_assert!(wait <= policy.backoff_max);
            prop_assert!(wait <= backoff(&policy, attempt + 1));
            if attempt <= 0 {
                prop_assert_eq!(wait, policy.backoff_base.min(policy.backoff_max));
            } else if attempt < 20 && wait < policy.backoff_max {
                prop_assert_eq!(wait, backoff(&policy, attempt - 1) * 2);
            }
        }

        /// A failure retries exactly while it is retryable and retries remain.
        #[test]
        fn a_failure_retries_while_retries_remain(retryable: bool, attempt in 0i32..10, retries in 0i32..10) {
            let outcome = fail_outcome(retryable, attempt, retries);
            prop_assert_eq!(outcome == FailOutcome::Retry, retryable && attempt < retries);
        }

        /// Each lease is written once per batch, by its first completion.
        #[test]
        fn repeats_point_at_the_first_of_their_lease(ids in prop::collection::vec(0u128..6, 0..30)) {
            let leases: Vec<Lease> = ids.iter().map(|&n| Lease { id: Uuid::from_u128(n), run_lease: 1 }).collect();
            let repeats = repeats(leases.iter().copied());
            for (i, repeat) in repeats.iter().enumerate() {
                let first = leases.iter().position(|l| *l == leases[i]).unwrap();
                prop_assert_eq!(*repeat, (first != i).then_some(first));
            }
        }
    }
}

/// When the live agent holding a name was last seen, if a live agent holds it: presence that
/// has not expired, or an agent the store saw (and did not mark `offline`) within `ttl`.
pub fn live_holder(
    presence: Option<chrono::DateTime<Utc>>,
    stored: Option<&crate::store::queue::AgentLiveness>,
    ttl: std::time::Duration,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let from_store = stored
        .filter(|a| matches!(a.status.as_str(), "idle" | "busy") && !a.pruned)
        .and_then(|a| a.last_seen)
        .filter(|ago| *ago <= ttl)
        .and_then(|ago| chrono::Duration::from_std(ago).ok())
        .map(|ago| now - ago);
    match (presence, from_store) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod holder_tests {
    use super::*;
    use crate::store::queue::AgentLiveness;

    fn stored(status: &str, seen: Option<u64>) -> AgentLiveness {
        AgentLiveness {
            name: "a".to_owned(),
            status: status.to_owned(),
            pruned: false,
            last_seen: seen.map(Duration::from_secs),
        }
    }

    #[test]
    fn a_name_is_held_while_presence_or_the_store_saw_its_agent_lately() {
        let now = Utc::now();
        let ttl = Duration::from_secs(30);
        let seen = now - chrono::Duration::seconds(4);
        assert_eq!(live_holder(Some(seen), None, ttl, now), Some(seen));
        assert_eq!(
            live_holder(None, Some(&stored("idle", Some(10))), ttl, now),
            Some(now - chrono::Duration::seconds(10)),
            "a restarted controller's empty presence gives nothing away"
        );
        assert_eq!(
            live_holder(Some(seen), Some(&stored("busy", Some(20))), ttl, now),
            Some(seen),
            "the latest sign of life is the one named"
        );
        assert_eq!(
            live_holder(None, Some(&stored("idle", Some(31))), ttl, now),
            None
        );
        assert_eq!(
            live_holder(None, Some(&stored("offline", Some(1))), ttl, now),
            None
        );
        assert_eq!(
            live_holder(None, Some(&stored("idle", None)), ttl, now),
            None
        );
        assert_eq!(live_holder(None, None, ttl, now), None);
    }
}
