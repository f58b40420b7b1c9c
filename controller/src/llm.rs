//! What the embedded agents need from the controller to call models: the controller's
//! presence (Redis with `--redis`, else memory) as their shared rate limiter, so embedded and
//! remote agents draw on the same per-provider budget (`agentops:rate:llm:<provider>`).
//! Their usage goes to the store through [`crate::store::usage::StoreUsageSink`].

use std::sync::Arc;

use agentops_agents::llm::{RateLimit, RateLimitError, RateLimiter};
use futures::future::BoxFuture;

use crate::presence::Presence;

pub struct PresenceRateLimiter(pub Arc<dyn Presence>);

impl RateLimiter for PresenceRateLimiter {
    fn try_acquire<'a>(
        &'a self,
        key: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<bool, RateLimitError>> {
        Box::pin(async move {
            self.0
                .acquire(key, limit.requests, limit.per)
                .await
                .map_err(|e| RateLimitError::Other(Box::new(e)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::presence::MemoryPresence;

    #[tokio::test]
    async fn the_presence_window_limits_calls() {
        let limiter = PresenceRateLimiter(Arc::new(MemoryPresence::default()));
        let limit = RateLimit {
            requests: 2,
            per: Duration::from_secs(60),
        };
        let mut taken = Vec::new();
        for _ in 0..3 {
            taken.push(limiter.try_acquire("llm:openai", limit).await.unwrap());
        }
        assert_eq!(taken, [true, true, false]);
        assert!(limiter.try_acquire("llm:anthropic", limit).await.unwrap());
    }
}
