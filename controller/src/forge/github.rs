//! GitHub (and GitHub Enterprise) through its REST API, with octocrab as the HTTP client.
//!
//! Requests go through octocrab's raw calls so that the status and headers of every answer
//! are seen here: a rate limit (403 or 429 with `x-ratelimit-remaining: 0` or `retry-after`)
//! is waited out and retried, a server error is retried with backoff, and 401, 403 and 422
//! become errors that say what to fix.

use crate::telemetry::{ForgeResponded, InternalEvent};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Forge, ForgeError, Proposal, PullRequest, ReviewRef, ReviewState};

/// How GitHub is reached and how patiently.
#[derive(Debug, Clone)]
pub struct GitHubConfig {
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise.
    pub api_url: String,
    pub token: String,
    pub owner: String,
    pub repo: String,
    /// Attempts per request, rate limits and server errors included.
    pub attempts: u32,
    /// The longest a rate limit is waited out; a longer one fails the request at once.
    pub max_wait: Duration,
    /// The wait after a server error, doubled each time.
    pub backoff: Duration,
}

impl GitHubConfig {
    pub fn new(api_url: &str, token: &str, owner: &str, repo: &str) -> GitHubConfig {
        GitHubConfig {
            api_url: api_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            attempts: 4,
            max_wait: Duration::from_secs(60),
            backoff: Duration::from_millis(500),
        }
    }
}

pub struct GitHub {
    client: octocrab::Octocrab,
    config: GitHubConfig,
}

#[derive(Deserialize)]
struct PullBody {
    number: u64,
    html_url: String,
    state: String,
    #[serde(default)]
    merged: bool,
    #[serde(default)]
    merged_at: Option<String>,
}

#[derive(Deserialize)]
struct User {
    login: String,
}

#[derive(Deserialize)]
struct CommentBody {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    user: Option<User>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    state: Option<String>,
}

enum Method {
    Get,
    Post(Value),
}

impl GitHub {
    pub fn new(config: GitHubConfig) -> Result<GitHub, ForgeError> {
        let client = octocrab::Octocrab::builder()
            .base_uri(config.api_url.as_str())
            .map_err(|_| ForgeError::BadUrl(config.api_url.clone()))?
            .personal_token(config.token.clone())
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|source| ForgeError::Transport {
                api: config.api_url.clone(),
                source,
            })?;
        Ok(GitHub { client, config })
    }

    fn repo_path(&self) -> String {
        format!("/repos/{}/{}", self.config.owner, self.config.repo)
    }

    /// One API call with the retries the answer calls for. Returns the status and JSON body
    /// of a final 2xx or 422 (which the caller interprets); anything else is an error.
    async fn call(
        &self,
        what: &str,
        path: &str,
        method: Method,
    ) -> Result<(StatusCode, Value), ForgeError> {
        let api = self.config.api_url.clone();
        let attempts = self.config.attempts.max(1);
        let mut backoff = self.config.backoff;
        let mut last_wait = Duration::ZERO;
        for attempt in 1..=attempts {
            let response = match &method {
                Method::Get => self.client._get(path).await,
                Method::Post(body) => self.client._post(path, Some(body)).await,
            }
            .map_err(|source| ForgeError::Transport {
                api: api.clone(),
                source,
            })?;
            let status = response.status();
            ForgeResponded {
                what,
                status: status.as_u16(),
            }
            .emit();
            let headers = response.headers().clone();
            let text = self
                .client
                .body_to_string(response)
                .await
                .map_err(|source| ForgeError::Transport {
                    api: api.clone(),
                    source,
                })?;
            let body: Value = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).map_err(|source| ForgeError::Decode {
                    api: api.clone(),
                    what: what.to_owned(),
                    source,
                })?
            };
            let message = error_message(&body);
            if status.is_success() || status == StatusCode::UNPROCESSABLE_ENTITY {
                return Ok((status, body));
            }
            if let Some(wait) = rate_limit_wait(status, &headers) {
                last_wait = wait;
                if wait > self.config.max_wait || attempt == attempts {
                    return Err(ForgeError::RateLimited {
                        api,
                        attempts: attempt,
                        retry_after: wait,
                    });
                }
                tracing::warn!(what, ?wait, "GitHub rate limit; waiting");
                tokio::time::sleep(wait).await;
                continue;
            }
            match status {
                StatusCode::UNAUTHORIZED => return Err(ForgeError::Unauthorized { api, message }),
                StatusCode::FORBIDDEN => return Err(ForgeError::Forbidden { api, message }),
                s if s.is_server_error() && attempt < attempts => {
                    tracing::warn!(what, status = s.as_u16(), "GitHub server error; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                s => {
                    return Err(ForgeError::Status {
                        api,
                        what: what.to_owned(),
                        status: s.as_u16(),
                        message,
                    });
                }
            }
        }
        Err(ForgeError::RateLimited {
            api,
            attempts,
            retry_after: last_wait,
        })
    }

    async fn get(&self, what: &str, path: &str) -> Result<Value, ForgeError> {
        let (status, body) = self.call(what, path, Method::Get).await?;
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            return Err(self.unprocessable(what, &body));
        }
        Ok(body)
    }

    fn unprocessable(&self, what: &str, body: &Value) -> ForgeError {
        ForgeError::Unprocessable {
            api: self.config.api_url.clone(),
            what: what.to_owned(),
            message: error_message(body),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        body: Value,
    ) -> Result<T, ForgeError> {
        serde_json::from_value(body).map_err(|source| ForgeError::Decode {
            api: self.config.api_url.clone(),
            what: what.to_owned(),
            source,
        })
    }

    /// The open pull request whose head is `branch`, if there is one.
    pub async fn find_open(&self, branch: &str) -> Result<Option<PullRequest>, ForgeError> {
        let path = format!(
            "{}/pulls?state=open&head={}:{}",
            self.repo_path(),
            self.config.owner,
            encode(branch)
        );
        let body = self.get("listing pull requests", &path).await?;
        let pulls: Vec<PullBody> = self.decode("listing pull requests", body)?;
        Ok(pulls.into_iter().next().map(|p| PullRequest {
            number: p.number,
            url: p.html_url,
        }))
    }

    pub async fn open_pull_request(&self, proposal: &Proposal) -> Result<PullRequest, ForgeError> {
        if let Some(existing) = self.find_open(&proposal.branch).await? {
            return Ok(existing);
        }
        let what = format!("opening a pull request for {}", proposal.branch);
        let body = json!({
            "title": proposal.title,
            "head": proposal.branch,
            "base": proposal.base,
            "body": proposal.body,
        });
        let path = format!("{}/pulls", self.repo_path());
        let (status, answer) = self.call(&what, &path, Method::Post(body)).await?;
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            // Opened by someone (or an earlier run) since the lookup: reuse it.
            if error_message(&answer).contains("already exists")
                && let Some(existing) = self.find_open(&proposal.branch).await?
            {
                return Ok(existing);
            }
            return Err(self.unprocessable(&what, &answer));
        }
        let pull: PullBody = self.decode(&what, answer)?;
        Ok(PullRequest {
            number: pull.number,
            url: pull.html_url,
        })
    }

    pub async fn pull_request_state(&self, number: u64) -> Result<ReviewState, ForgeError> {
        let what = format!("reading pull request #{number}");
        let body = self
            .get(&what, &format!("{}/pulls/{number}", self.repo_path()))
            .await?;
        let pull: PullBody = self.decode(&what, body)?;
        if pull.merged || pull.merged_at.is_some() {
            return Ok(ReviewState::Merged { how: pull.html_url });
        }
        if pull.state == "open" {
            return Ok(ReviewState::Open);
        }
        Ok(ReviewState::Closed {
            comments: self.comments(number).await?,
        })
    }

    /// Everything reviewers said on a pull request: review summaries, line comments and the
    /// conversation, oldest first within each.
    async fn comments(&self, number: u64) -> Result<String, ForgeError> {
        let repo = self.repo_path();
        let mut lines = Vec::new();
        for (what, path) in [
            ("reading reviews", format!("{repo}/pulls/{number}/reviews")),
            (
                "reading review comments",
                format!("{repo}/pulls/{number}/comments"),
            ),
            (
                "reading comments",
                format!("{repo}/issues/{number}/comments"),
            ),
        ] {
            let body = self.get(what, &path).await?;
            let comments: Vec<CommentBody> = self.decode(what, body)?;
            for c in comments {
                let text = c.body.unwrap_or_default();
                if text.trim().is_empty() {
                    continue;
                }
                let who = c.user.map_or_else(|| "someone".to_owned(), |u| u.login);
                let mut line = who;
                if let Some(state) = c.state.filter(|s| s != "COMMENTED") {
                    line.push_str(&format!(" ({})", state.to_lowercase().replace('_', " ")));
                }
                if let Some(path) = c.path {
                    line.push_str(&format!(" on {path}"));
                }
                line.push_str(": ");
                line.push_str(text.trim());
                lines.push(line);
            }
        }
        Ok(lines.join("\n"))
    }
}

impl Forge for GitHub {
    fn propose<'a>(
        &'a self,
        proposal: &'a Proposal,
    ) -> BoxFuture<'a, Result<Option<PullRequest>, ForgeError>> {
        Box::pin(async move { self.open_pull_request(proposal).await.map(Some) })
    }

    fn review_state<'a>(
        &'a self,
        review: &'a ReviewRef,
    ) -> BoxFuture<'a, Result<ReviewState, ForgeError>> {
        Box::pin(async move {
            match review.pull_request {
                Some(number) => self.pull_request_state(number).await,
                None => Ok(ReviewState::Open),
            }
        })
    }
}

/// A rate limit, and how long to wait it out: 429, or 403 with no requests left or a
/// `retry-after`. GitHub's secondary limits send `retry-after`; the primary one sends
/// `x-ratelimit-reset` (epoch seconds).
fn rate_limit_wait(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok());
    let exhausted = header("x-ratelimit-remaining").is_some_and(|v| v.trim() == "0");
    let limited = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::FORBIDDEN && (exhausted || retry_after.is_some()));
    if !limited {
        return None;
    }
    if let Some(seconds) = retry_after {
        return Some(Duration::from_secs(seconds));
    }
    let reset = header("x-ratelimit-reset").and_then(|v| v.trim().parse::<i64>().ok());
    let now = chrono::Utc::now().timestamp();
    Some(match reset {
        Some(reset) if reset > now => Duration::from_secs((reset - now) as u64),
        _ => Duration::from_secs(60),
    })
}

/// GitHub's `message`, with the `errors` details it gives on a 422.
fn error_message(body: &Value) -> String {
    let mut message = body
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        let details: Vec<String> = errors
            .iter()
            .map(|e| {
                e.get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| e.to_string())
            })
            .collect();
        if !details.is_empty() {
            message.push_str(": ");
            message.push_str(&details.join("; "));
        }
    }
    if message.is_empty() {
        message = body.to_string();
    }
    message
}

/// A branch name inside a query string.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_are_recognised() {
        let mut h = HeaderMap::new();
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h), None);
        assert_eq!(
            rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, &h),
            Some(Duration::from_secs(60))
        );
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(
            rate_limit_wait(StatusCode::FORBIDDEN, &h),
            Some(Duration::from_secs(3))
        );
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", "0".parse().unwrap());
        let reset = chrono::Utc::now().timestamp() + 30;
        h.insert("x-ratelimit-reset", reset.to_string().parse().unwrap());
        let wait = rate_limit_wait(StatusCode::FORBIDDEN, &h).unwrap();
        assert!(wait <= Duration::from_secs(30) && wait >= Duration::from_secs(28));
    }

    #[test]
    fn error_messages_include_the_422_details() {
        let body = json!({"message": "Validation Failed",
            "errors": [{"resource": "PullRequest", "message": "No commits between main and x"}]});
        assert_eq!(
            error_message(&body),
            "Validation Failed: No commits between main and x"
        );
    }

    #[test]
    fn branch_names_are_encoded_for_queries() {
        assert_eq!(encode("agentops/web/draft-copy"), "agentops/web/draft-copy");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
