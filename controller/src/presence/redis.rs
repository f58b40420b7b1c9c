//! [`Presence`] in Redis.
//!
//! One multiplexed connection, (re)connected lazily by a `ConnectionManager`: creating a
//! `RedisPresence` does not wait for Redis, and a Redis that goes away and comes back is used
//! again without a restart. Every call is bounded by `timeout` on top of the manager's own
//! connect and response timeouts, so an unreachable Redis costs a caller that long at most.

use std::time::Duration;

use redis::aio::ConnectionManager;
use uuid::Uuid;

use super::{BoxFuture, Presence, PresenceError, agent_key, progress_key, rate_key};
use crate::telemetry::{InternalEvent, PresenceFailed};

pub struct RedisPresence {
    url: String,
    /// Of the keys: the installation's bus prefix.
    prefix: String,
    manager: ConnectionManager,
    timeout: Duration,
    acquire: redis::Script,
}

impl RedisPresence {
    /// Checks the URL; connects on first use. `timeout` bounds every call.
    /// `prefix` starts the installation's keys (its `--bus-prefix`).
    pub fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisPresence, PresenceError> {
        let agentops_agents::redis_client::Redis { shown, manager } =
            agentops_agents::redis_client::connect(url, timeout).map_err(|e| {
                PresenceError::Url {
                    url: e.url,
                    source: e.source,
                }
            })?;
        Ok(RedisPresence {
            url: shown,
            prefix: prefix.to_owned(),
            manager,
            timeout,
            acquire: redis::Script::new(agentops_agents::redis_client::WINDOW_ACQUIRE),
        })
    }

    /// Run `command` on a connection, bounded by the timeout.
    async fn run<T, F>(
        &self,
        doing: &'static str,
        command: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, PresenceError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let error = match tokio::time::timeout(self.timeout, command(self.manager.clone())).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(source)) => PresenceError::Redis { doing, source },
            Err(_) => PresenceError::Timeout {
                doing,
                timeout: self.timeout,
            },
        };
        let presence = self.url.as_str();
        PresenceFailed {
            presence,
            error: &error,
        }
        .emit();
        Err(error)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Presence for RedisPresence {
    fn seen<'a>(
        &'a self,
        agents: &'a [String],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), PresenceError>> {
        Box::pin(async move {
            if agents.is_empty() {
                return Ok(());
            }
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let mut pipe = redis::pipe();
            for agent in agents {
                pipe.cmd("SET")
                    .arg(agent_key(&self.prefix, agent))
                    .arg(&now)
                    .arg("PX")
                    .arg(millis(ttl))
                    .ignore();
            }
            self.run("recording agent presence", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
        })
    }

    fn alive<'a>(
        &'a self,
        agents: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, PresenceError>> {
        Box::pin(async move {
            if agents.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for agent in agents {
                pipe.cmd("EXISTS").arg(agent_key(&self.prefix, agent));
            }
            let found: Vec<i64> = self
                .run("reading agent presence", |mut c| async move {
                    pipe.query_async(&mut c).await
                })
                .await?;
            Ok(found.into_iter().map(|n| n > 0).collect())
        })
    }

    fn last_seen<'a>(
        &'a self,
        agent: &'a str,
    ) -> BoxFuture<'a, Result<Option<chrono::DateTime<chrono::Utc>>, PresenceError>> {
        Box::pin(async move {
            let key = agent_key(&self.prefix, agent);
            let value: Option<String> = self
                .run("reading agent presence", |mut c| async move {
                    redis::cmd("GET").arg(key).query_async(&mut c).await
                })
                .await?;
            // A value that is not a time still means the agent is there: its time is unknown,
            // and taken as now.
            Ok(value.map(|v| {
                chrono::DateTime::parse_from_rfc3339(&v)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .unwrap_or_else(|_| chrono::Utc::now())
            }))
        })
    }

    fn set_progress<'a>(
        &'a self,
        progress: &'a [(Uuid, String)],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), PresenceError>> {
        Box::pin(async move {
            if progress.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for (task, message) in progress {
                pipe.cmd("SET")
                    .arg(progress_key(&self.prefix, *task))
                    .arg(message)
                    .arg("PX")
                    .arg(millis(ttl))
                    .ignore();
            }
            self.run("recording progress", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
        })
    }

    fn progress(&self, task: Uuid) -> BoxFuture<'_, Result<Option<String>, PresenceError>> {
        Box::pin(async move {
            self.run("reading progress", |mut c| async move {
                redis::cmd("GET")
                    .arg(progress_key(&self.prefix, task))
                    .query_async(&mut c)
                    .await
            })
            .await
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limit: u64,
        window: Duration,
    ) -> BoxFuture<'a, Result<bool, PresenceError>> {
        Box::pin(async move {
            let count: u64 = self
                .run("taking from a rate limit", |mut c| async move {
                    self.acquire
                        .key(rate_key(key))
                        .arg(millis(window))
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(count <= limit)
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}
