//! `POST /hooks/github`: GitHub tells us something changed. A delivery only nudges the poll
//! (and the review check); what changed is read from Git and the forge as always, so a forged
//! or repeated delivery can at worst cost one extra fetch — and an unsigned one not even that.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;

use super::ApiState;
use crate::source::watch::Nudger;
use crate::store::queue::Queue;

/// What the webhook checks deliveries with and whom it wakes.
#[derive(Clone)]
pub struct Hooks {
    /// The webhook's secret; `None` refuses every delivery.
    pub secret: Option<String>,
    /// Asks for a sync.
    pub sync: Nudger,
    /// Asks for a review check (pull requests merged or closed).
    pub review: Arc<Notify>,
}

/// Whether `signature` (the `X-Hub-Signature-256` header, `sha256=<hex>`) is the HMAC-SHA256
/// of `body` under `secret`. The comparison takes the same time wherever the first
/// difference is.
pub fn verify(secret: &[u8], body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex_digest) = signature.and_then(|s| s.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

pub(super) async fn github<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(hooks) = &state.hooks else {
        return answer(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "this controller has no webhook"}),
        );
    };
    let Some(secret) = &hooks.secret else {
        return answer(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "no webhook secret is configured (--webhook-secret)"}),
        );
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !verify(secret.as_bytes(), &body, signature) {
        tracing::warn!("webhook: refused a delivery with a missing or wrong signature");
        return answer(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "missing or wrong X-Hub-Signature-256"}),
        );
    }
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match event {
        "ping" => answer(StatusCode::OK, serde_json::json!({"ok": true})),
        "push" | "pull_request" | "pull_request_review" => {
            hooks.sync.nudge();
            hooks.review.notify_one();
            answer(
                StatusCode::ACCEPTED,
                serde_json::json!({"ok": true, "nudged": true}),
            )
        }
        other => answer(
            StatusCode::ACCEPTED,
            serde_json::json!({"ok": true, "ignored": other}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn verifies_github_signatures() {
        // GitHub's documented example: secret "It's a Secret to Everybody", body "Hello, World!".
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some(good)
        ));
        assert!(!verify(b"another secret", b"Hello, World!", Some(good)));
        assert!(!verify(
            b"It's a Secret to Everybody",
            b"Hello, World?",
            Some(good)
        ));
        assert!(!verify(b"s", b"b", None));
        assert!(!verify(b"s", b"b", Some("sha1=abcd")));
        assert!(!verify(b"s", b"b", Some("sha256=not-hex")));
        assert!(verify(b"s", b"b", Some(&sign(b"s", b"b"))));
    }
}
