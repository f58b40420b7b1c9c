//! Presence: short-lived facts that need no database and may be lost without harm.
//!
//! - Agent presence: `<prefix>:agent:<name>`, set whenever the agent registers, claims or
//!   heartbeats, expiring after three heartbeats. The controller's liveness pass marks agents
//!   whose presence expired `offline` in the store.
//! - Live progress: `<prefix>:progress:<task>` = the task's last progress message.
//! - A shared rate limiter: a fixed-window counter per key, for the LLM client
//!   (`agentops:rate:<key>`, whatever the prefix: every agent on the Redis shares a provider's
//!   budget).
//!
//! `<prefix>` is the installation's `--bus-prefix` (`agentops` by default), so installations
//! (and benchmarks) that share a Redis keep their agents' names apart.
//!
//! [`RedisPresence`] keeps them in Redis (shared by every controller); [`MemoryPresence`] in
//! the process. Nothing here is the record of anything: the store is. Callers bound every call
//! and carry on without an answer.

mod redis;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

pub use self::redis::RedisPresence;
pub use crate::bus::BoxFuture;

/// Key of an agent's presence in the installation of `prefix`.
pub fn agent_key(prefix: &str, name: &str) -> String {
    format!("{prefix}:agent:{name}")
}

/// Key of a task's live progress in the installation of `prefix`.
pub fn progress_key(prefix: &str, task: Uuid) -> String {
    format!("{prefix}:progress:{task}")
}

/// Key of a rate limiter.
pub fn rate_key(key: &str) -> String {
    format!("agentops:rate:{key}")
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("invalid Redis URL {url}")]
    Url {
        url: String,
        #[source]
        source: ::redis::RedisError,
    },
    #[error("Redis failed while {doing}")]
    Redis {
        doing: &'static str,
        #[source]
        source: ::redis::RedisError,
    },
    #[error("Redis did not answer within {timeout:?} while {doing}")]
    Timeout {
        doing: &'static str,
        timeout: Duration,
    },
}

pub trait Presence: Send + Sync + 'static {
    /// These agents are alive; forget it after `ttl`.
    fn seen<'a>(
        &'a self,
        agents: &'a [String],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), PresenceError>>;

    /// Whether each agent's presence is still there, in order.
    fn alive<'a>(&'a self, agents: &'a [String])
    -> BoxFuture<'a, Result<Vec<bool>, PresenceError>>;

    /// When the agent was last seen, while its presence lasts (`None`: expired or never).
    fn last_seen<'a>(
        &'a self,
        agent: &'a str,
    ) -> BoxFuture<'a, Result<Option<chrono::DateTime<chrono::Utc>>, PresenceError>>;

    /// Each task's latest progress message, kept for `ttl`.
    fn set_progress<'a>(
        &'a self,
        progress: &'a [(Uuid, String)],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), PresenceError>>;

    /// A task's latest progress message, while it lasts.
    fn progress(&self, task: Uuid) -> BoxFuture<'_, Result<Option<String>, PresenceError>>;

    /// Take one from a fixed window of `limit` per `window` under `key`: true if there was one
    /// left. The window starts with its first acquisition.
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limit: u64,
        window: Duration,
    ) -> BoxFuture<'a, Result<bool, PresenceError>>;

    /// What this is, for logs: the Redis URL (without credentials), or `in-memory`.
    fn describe(&self) -> String;
}

/// Presence inside the process: the same keys' meaning, in maps. Entries past their time are
/// ignored on read and pruned on write.
#[derive(Default)]
pub struct MemoryPresence {
    state: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    /// Until when, and when it was seen.
    agents: HashMap<String, (Instant, chrono::DateTime<chrono::Utc>)>,
    progress: HashMap<Uuid, (String, Instant)>,
    windows: HashMap<String, (u64, Instant)>,
}

impl MemoryPresence {
    fn with<T>(&self, f: impl FnOnce(&mut Memory, Instant) -> T) -> T {
        let mut state = self.state.lock().expect("presence lock");
        f(&mut state, Instant::now())
    }
}

impl Presence for MemoryPresence {
    fn seen<'a>(
        &'a self,
        agents: &'a [String],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), PresenceError>> {
        self.with(|m, now| {
            m.agents.retain(|_, (until, _)| *until > now);
            let at = chrono::Utc::now();
            for agent in agents {
                m.agents.insert(agent.clone(), (now + ttl, at));
            }
        });
        Box::pin(async { Ok(()) })
    }

    fn alive<'a>(
        &'a self,
        agents: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, PresenceError>> {
        let alive = self.with(|m, now| {
            agents
                .iter()
                .map(|a| m.agents.get(a).is_some_and(|(until, _)| *until > now))
                .collect()
        });
        Box::pin(async { Ok(alive) })
    }

    fn last_seen<'a>(
        &'a self,
        agent: &'a str,
    ) -> BoxFuture<'a, Result<Option<chrono::DateTime<chrono::Utc>>, PresenceError>> {
        let seen = self.with(|m, now| {
            m.agents
                .get(agent)
                .filter(|(until, _)| *until > now)
                .map(|(_, at)| *at)
        });
        Box::pin(async move { Ok(seen) })
    }

    fn set_progress<'a>(
        &'a self,
        progress: &'a [(Uuid, String)],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), PresenceError>> {
        self.with(|m, now| {
            m.progress.retain(|_, (_, until)| *until > now);
            for (task, message) in progress {
                m.progress.insert(*task, (message.clone(), now + ttl));
            }
        });
        Box::pin(async { Ok(()) })
    }

    fn progress(&self, task: Uuid) -> BoxFuture<'_, Result<Option<String>, PresenceError>> {
        let message = self.with(|m, now| {
            m.progress
                .get(&task)
                .filter(|(_, until)| *until > now)
                .map(|(message, _)| message.clone())
        });
        Box::pin(async { Ok(message) })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limit: u64,
        window: Duration,
    ) -> BoxFuture<'a, Result<bool, PresenceError>> {
        let granted = self.with(|m, now| {
            m.windows.retain(|_, (_, until)| *until > now);
            let (count, _) = m.windows.entry(key.to_owned()).or_insert((0, now + window));
            *count += 1;
            *count <= limit
        });
        Box::pin(async move { Ok(granted) })
    }

    fn describe(&self) -> String {
        "in-memory".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_presence_expires() {
        let p = MemoryPresence::default();
        let names = ["a".to_owned(), "b".to_owned()];
        p.seen(&names[..1], Duration::from_millis(40))
            .await
            .unwrap();
        assert_eq!(p.alive(&names).await.unwrap(), [true, false]);
        let task = Uuid::from_u128(1);
        p.set_progress(&[(task, "half".to_owned())], Duration::from_millis(40))
            .await
            .unwrap();
        assert_eq!(p.progress(task).await.unwrap().as_deref(), Some("half"));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(p.alive(&names).await.unwrap(), [false, false]);
        assert_eq!(p.progress(task).await.unwrap(), None);
    }

    #[tokio::test]
    async fn memory_rate_limiter_is_a_fixed_window() {
        let p = MemoryPresence::default();
        let window = Duration::from_millis(80);
        let mut granted = Vec::new();
        for _ in 0..4 {
            granted.push(p.acquire("llm", 3, window).await.unwrap());
        }
        assert_eq!(granted, [true, true, true, false]);
        assert!(p.acquire("other", 1, window).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(p.acquire("llm", 3, window).await.unwrap());
    }
}
