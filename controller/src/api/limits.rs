//! What one agent may ask of the API: body sizes per endpoint, a rate of claims and reports
//! per agent, and how many agents may hold tokens. Over a limit is a 413 or 429 with a
//! [`LimitExceeded`] body and a count on `/metrics`, never a crash.

use std::num::NonZeroU32;
use std::time::Duration;

use agentops_agents::protocol::LimitExceeded;
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::telemetry::{ApiRefused, InternalEvent};

/// Registration: a name, a type, capabilities.
pub const REGISTER_BODY: usize = 16 << 10;
/// Claims, progress, failures, questions, releases, model usage.
pub const SMALL_BODY: usize = 64 << 10;
/// A heartbeat lists every task held.
pub const HEARTBEAT_BODY: usize = 1 << 20;
/// Output files make completions large.
pub const COMPLETE_BODY: usize = 64 << 20;
/// A proposal's spec files.
pub const PROPOSAL_BODY: usize = 8 << 20;

/// The limits `up` enforces; [`Limits::none`] for benchmarks and tests of other things.
pub struct Limits {
    /// Most agents holding tokens at once.
    pub max_agents: Option<u64>,
    rate: Option<DefaultKeyedRateLimiter<String>>,
}

impl Limits {
    /// `max_agents` agents (0: any number), each making at most `per_second` claims and
    /// reports a second on average, in bursts of up to twice that (0: no rate limit).
    pub fn new(max_agents: u64, per_second: u32) -> Limits {
        let rate = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(per_second.saturating_mul(2)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Limits {
            max_agents: (max_agents > 0).then_some(max_agents),
            rate,
        }
    }

    pub fn none() -> Limits {
        Limits::new(0, 0)
    }

    /// One claim or report of `agent`: `Err(wait)` when it is over its rate.
    pub fn take(&self, agent: &str) -> Result<(), Duration> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check_key(&agent.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The 429 of an agent over its rate.
pub fn rate_limited(agent: &str, wait: Duration) -> Response {
    ApiRefused {
        reason: "rate",
        agent: Some(agent),
        detail: "claims and reports over the agent's rate",
    }
    .emit();
    let seconds = wait.as_secs_f64().max(0.001);
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, seconds.ceil().to_string())],
        Json(LimitExceeded {
            error: format!(
                "agent `{agent}` sends claims and reports faster than this controller allows; \
                 retry in {seconds:.3} s"
            ),
            limit: "rate".to_owned(),
            retry_after_seconds: Some(seconds),
        }),
    )
        .into_response()
}

/// `route` taking bodies up to `max` bytes; a larger one is answered 413 with JSON.
pub fn body_limit<S: Clone + Send + Sync + 'static>(
    route: MethodRouter<S>,
    max: usize,
) -> MethodRouter<S> {
    route
        .layer(axum::extract::DefaultBodyLimit::max(max))
        .layer(axum::middleware::map_response(
            move |response: Response| async move { too_large(response, max) },
        ))
}

/// axum answers an oversized body with a plain-text 413: the protocol answers JSON.
fn too_large(response: Response, max: usize) -> Response {
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE || json {
        return response;
    }
    ApiRefused {
        reason: "body_size",
        agent: None,
        detail: "body over the endpoint's limit",
    }
    .emit();
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(LimitExceeded {
            error: format!("the request body is over this endpoint's limit of {max} bytes"),
            limit: "body_size".to_owned(),
            retry_after_seconds: None,
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_over_its_burst_waits_and_others_do_not() {
        let limits = Limits::new(0, 5);
        for _ in 0..10 {
            assert_eq!(limits.take("a"), Ok(()), "the burst is twice the rate");
        }
        let wait = limits.take("a").expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        assert_eq!(limits.take("b"), Ok(()), "the limit is per agent");
        assert_eq!(Limits::none().take("a"), Ok(()));
        assert_eq!(Limits::new(3, 0).max_agents, Some(3));
        assert_eq!(Limits::none().max_agents, None);
    }
}
