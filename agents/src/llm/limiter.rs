//! A rate limiter shared by the agents that call the same providers: a fixed window of
//! `requests` per `per` under each key. [`RedisRateLimiter`] shares it across processes (the
//! keys are the controller's presence keys, `agentops:rate:<key>`, so an embedded agent and a
//! remote one draw on the same budget); [`MemoryRateLimiter`] shares it within one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

/// How many calls a window allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u64,
    pub per: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("invalid Redis URL {url}")]
    Url {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis {url} failed while taking from a rate limit")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// From a limiter kept elsewhere (the controller's presence).
    #[error("the rate limiter failed")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub trait RateLimiter: Send + Sync {
    /// Takes one call from `key`'s current window: true if the window had one left. A window
    /// starts with its first call.
    fn try_acquire<'a>(
        &'a self,
        key: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<bool, RateLimitError>>;
}

/// Windows in this process.
#[derive(Debug, Default)]
pub struct MemoryRateLimiter {
    windows: Mutex<HashMap<String, (u64, Instant)>>,
}

impl RateLimiter for MemoryRateLimiter {
    fn try_acquire<'a>(
        &'a self,
        key: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<bool, RateLimitError>> {
        let now = Instant::now();
        let allowed = {
            let mut windows = self.windows.lock().expect("rate limiter lock");
            let window = windows.entry(key.to_owned()).or_insert((0, now));
            if now.duration_since(window.1) >= limit.per {
                *window = (0, now);
            }
            window.0 += 1;
            window.0 <= limit.requests
        };
        Box::pin(async move { Ok(allowed) })
    }
}

/// Windows in Redis, shared by every process that uses the same server.
pub struct RedisRateLimiter {
    url: String,
    manager: ConnectionManager,
    timeout: Duration,
    script: redis::Script,
}

impl RedisRateLimiter {
    /// Checks the URL; connects on first use, and again after Redis comes back.
    pub fn connect(url: &str, timeout: Duration) -> Result<RedisRateLimiter, RateLimitError> {
        let crate::redis_client::Redis { shown, manager } =
            crate::redis_client::connect(url, timeout).map_err(|e| RateLimitError::Url {
                url: e.url,
                source: e.source,
            })?;
        Ok(RedisRateLimiter {
            url: shown,
            manager,
            timeout,
            script: redis::Script::new(crate::redis_client::WINDOW_ACQUIRE),
        })
    }
}

impl RateLimiter for RedisRateLimiter {
    fn try_acquire<'a>(
        &'a self,
        key: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<bool, RateLimitError>> {
        Box::pin(async move {
            let mut connection = self.manager.clone();
            let window = u64::try_from(limit.per.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            let mut invocation = self.script.key(format!("agentops:rate:{key}"));
            invocation.arg(window);
            let count = invocation.invoke_async::<u64>(&mut connection);
            match tokio::time::timeout(self.timeout, count).await {
                Ok(Ok(count)) => Ok(count <= limit.requests),
                Ok(Err(source)) => Err(RateLimitError::Redis {
                    url: self.url.clone(),
                    source,
                }),
                Err(_) => Err(RateLimitError::Timeout {
                    url: self.url.clone(),
                    timeout: self.timeout,
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_memory_window_allows_its_budget_then_opens_again() {
        let limiter = MemoryRateLimiter::default();
        let limit = RateLimit {
            requests: 2,
            per: Duration::from_secs(1),
        };
        assert!(limiter.try_acquire("a", limit).await.unwrap());
        assert!(limiter.try_acquire("a", limit).await.unwrap());
        assert!(!limiter.try_acquire("a", limit).await.unwrap());
        // Keys are counted apart.
        assert!(limiter.try_acquire("b", limit).await.unwrap());
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(limiter.try_acquire("a", limit).await.unwrap());
    }
}
