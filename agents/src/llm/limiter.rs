//! A rate limiter shared by the agents that call the same providers: a fixed window of
//! `requests` per `per` under each key. [`RedisRateLimiter`] shares it across processes (the
//! keys are the controller's presence keys, `agentops:rate:<key>`, so an embedded agent and a
//! remote one draw on the same budget); [`MemoryRateLimiter`] shares it within one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
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

/// Count one more in the window and start the window's clock with its first count; the
/// `PTTL` check mends a key left without a TTL. The same script as the controller's presence.
const ACQUIRE: &str = "\
    local n = redis.call('INCR', KEYS[1]) \
    if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then \
        redis.call('PEXPIRE', KEYS[1], ARGV[1]) \
    end \
    return n";

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
        let shown = redact(url);
        let client = redis::Client::open(url).map_err(|source| RateLimitError::Url {
            url: shown.clone(),
            source,
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|source| {
                RateLimitError::Url {
                    url: shown.clone(),
                    source,
                }
            })?;
        Ok(RedisRateLimiter {
            url: shown,
            manager,
            timeout,
            script: redis::Script::new(ACQUIRE),
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

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
        }
        None => url.to_owned(),
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

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("redis://user:pw@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }
}
