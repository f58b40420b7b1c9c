//! The one way the controller and the agents connect to Redis.
//!
//! One multiplexed connection, (re)connected lazily by a `ConnectionManager`: connecting does
//! not wait for Redis, and a Redis that goes away and comes back is used again without a
//! restart. The manager's connect and response timeouts are the caller's `timeout`, so an
//! unreachable Redis costs a call that long at most (callers bound each call by it too).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Count one more in a fixed window and start the window's clock with its first count (`KEYS[1]`
/// the window's key, `ARGV[1]` its length in milliseconds); the `PTTL` check mends a key left
/// without a TTL. The controller's presence and the agents' rate limiter share windows under
/// the same keys, so they must count the same way.
pub const WINDOW_ACQUIRE: &str = "\
    local n = redis.call('INCR', KEYS[1]) \
    if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then \
        redis.call('PEXPIRE', KEYS[1], ARGV[1]) \
    end \
    return n";

/// A lazily connected Redis, and its URL as messages show it (without the password).
pub struct Redis {
    pub shown: String,
    pub manager: ConnectionManager,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL {url}")]
pub struct InvalidRedisUrl {
    /// Without its password.
    pub url: String,
    #[source]
    pub source: redis::RedisError,
}

/// Checks the URL; connects on first use.
pub fn connect(url: &str, timeout: Duration) -> Result<Redis, InvalidRedisUrl> {
    let shown = crate::redact(url);
    let invalid = |source| InvalidRedisUrl {
        url: shown.clone(),
        source,
    };
    let client = redis::Client::open(url).map_err(invalid)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
    Ok(Redis { shown, manager })
}
