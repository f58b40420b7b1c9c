//! `/mcp`: the MCP server over streamable HTTP, so that an MCP client joins as an agent
//! without a process of its own (docs/mcp.md).
//!
//! The tools are the same implementation as `agentops mcp` (agents::mcp): each session is an
//! agent that speaks the agent protocol to this controller over loopback HTTP. That keeps one
//! implementation, and every MCP call passes the very checks an agent's call does
//! (enrollment, tokens, leases, fencing, body limits) because it *is* such a call.
//!
//! Enrollment: the session registers with the bearer token of the request that opened it as
//! its enrollment secret. Registering over loopback would pass the loopback-only rule of a
//! controller without secrets for every peer, so that rule is applied here, to the peer of
//! the `/mcp` request itself, before any session exists.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use super::enroll::{Enrollment, Refused};
use agentops_agents::mcp::{McpConfig, http_service};

/// The routes of `/mcp` for a controller whose API agents reach at `api_url`.
pub fn router(api_url: &str, enrollment: &Enrollment, shutdown: CancellationToken) -> Router {
    let loopback_only = !enrollment.requires_secret();
    let service = http_service(McpConfig::new(api_url), loopback_only, shutdown);
    Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(
            loopback_only,
            only_loopback,
        ))
}

/// Without an enrollment secret, only peers on this machine may open sessions.
async fn only_loopback(
    State(loopback_only): State<bool>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    if loopback_only && !peer.is_some_and(|p| p.ip().is_loopback()) {
        use crate::telemetry::InternalEvent;
        let refused = Refused::NotLoopback;
        crate::telemetry::RegistrationRefused {
            refused,
            name: "(mcp session)",
            peer,
        }
        .emit();
        return (
            StatusCode::FORBIDDEN,
            axum::Json(
                serde_json::json!({"error": refused.message(), "reason": refused.metric_label()}),
            ),
        )
            .into_response();
    }
    next.run(request).await
}

/// The URL this process reaches its own API at: the address it listens on, with a wildcard
/// address (`0.0.0.0`, `::`) replaced by loopback.
pub fn loopback_url(listening: SocketAddr) -> String {
    let mut addr = listening;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_api_is_reached_over_loopback() {
        for (listening, url) in [
            ("0.0.0.0:7700", "http://127.0.0.1:7700"),
            ("[::]:7700", "http://[::1]:7700"),
            ("127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("10.1.2.3:80", "http://10.1.2.3:80"),
        ] {
            assert_eq!(loopback_url(listening.parse().unwrap()), url, "{listening}");
        }
    }
}
