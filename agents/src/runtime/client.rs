//! HTTP calls to the controller, with the agent's token and re-registration on a 401.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::protocol::{ErrorBody, ProposalRefused, RegisterRequest, RegisterResponse};

/// Every call but the long-poll claim: a controller that takes longer is treated as unreachable.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Heartbeats are scheduled this often at most, whatever the controller asks.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("{url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
    #[error("POST {url} answered a body that is not the expected JSON")]
    Decode {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url} answered a body that is not the expected JSON")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot use the NATS server {url}")]
    Nats {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

impl Error {
    /// The controller's answer, when there was one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the same request may succeed later: the controller was unreachable, slow,
    /// overloaded or restarting. Anything else it said is its final word.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { source, .. } => !source.is_builder(),
            Error::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Error::Client(_) | Error::Decode { .. } | Error::Json { .. } | Error::Nats { .. } => {
                false
            }
        }
    }
}

/// What registration gave us. `epoch` counts registrations, so that many requests refused at
/// once with the same stale token trigger one re-registration, not one each.
#[derive(Debug)]
pub(crate) struct Session {
    token: String,
    epoch: u64,
    pub lease: Duration,
    pub heartbeat: Duration,
}

pub(crate) struct Client {
    http: reqwest::Client,
    api: String,
    identity: RegisterRequest,
    session: RwLock<Arc<Session>>,
    reregistering: tokio::sync::Mutex<()>,
    enrollment_secret: Option<String>,
}

/// One HTTP client for every agent in the process. Building one loads and parses the
/// system's CA bundle (some 40 ms of CPU with OpenSSL), which fifty agents in one process
/// paid fifty times over before their first claim; reqwest's client is a handle to a shared
/// connection pool and is meant to be reused.
fn shared_http() -> Result<reqwest::Client, Error> {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(http) = HTTP.get() {
        return Ok(http.clone());
    }
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(Error::Client)?;
    Ok(HTTP.get_or_init(|| http).clone())
}

impl Client {
    pub fn new(api: &str, identity: RegisterRequest) -> Result<Client, Error> {
        Ok(Client {
            http: shared_http()?,
            api: api.trim_end_matches('/').to_owned(),
            identity,
            session: RwLock::new(Arc::new(Session {
                token: String::new(),
                epoch: 0,
                lease: Duration::from_secs(30),
                heartbeat: Duration::from_secs(10),
            })),
            reregistering: tokio::sync::Mutex::new(()),
            enrollment_secret: None,
        })
    }

    /// Register with this secret as the bearer token.
    pub fn with_enrollment_secret(mut self, secret: Option<String>) -> Client {
        self.enrollment_secret = secret;
        self
    }

    pub fn session(&self) -> Arc<Session> {
        self.session.read().expect("session lock").clone()
    }

    /// Registers (again), which invalidates every earlier token of this agent's name.
    pub async fn register(&self) -> Result<Arc<Session>, Error> {
        let mut identity = self.identity.clone();
        let held = self.session().token.clone();
        identity.token = Some(held).filter(|t| !t.is_empty());
        let answer: RegisterResponse = self
            .send(
                "/api/v1/agents/register",
                &identity,
                self.enrollment_secret.as_deref(),
                CALL_TIMEOUT,
            )
            .await?;
        let seconds = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
        let mut session = self.session.write().expect("session lock");
        *session = Arc::new(Session {
            token: answer.token,
            epoch: session.epoch + 1,
            lease: seconds(answer.lease_seconds),
            heartbeat: seconds(answer.heartbeat_seconds).max(MIN_HEARTBEAT),
        });
        Ok(session.clone())
    }

    /// An authenticated call. A 401 means the controller forgot or replaced our token (it
    /// restarted, or another process registered our name): register once and try again.
    pub async fn post<B, R>(&self, path: &str, body: &B, timeout: Duration) -> Result<R, Error>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let session = self.session();
        match self.send(path, body, Some(&session.token), timeout).await {
            Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                let session = self.reregister(session.epoch).await?;
                self.send(path, body, Some(&session.token), timeout).await
            }
            answer => answer,
        }
    }

    /// An authenticated GET answering JSON; a 401 registers again once, as [`Self::post`].
    pub async fn get<R: DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<R, Error> {
        let (_, body) = self.get_raw(path, None, timeout).await?;
        let url = format!("{}{path}", self.api);
        serde_json::from_slice(&body).map_err(|source| Error::Json { url, source })
    }

    /// An authenticated GET answering bytes, with the value of `header`.
    pub async fn get_bytes(
        &self,
        path: &str,
        header: &str,
        timeout: Duration,
    ) -> Result<(String, Vec<u8>), Error> {
        self.get_raw(path, Some(header), timeout).await
    }

    async fn get_raw(
        &self,
        path: &str,
        header: Option<&str>,
        timeout: Duration,
    ) -> Result<(String, Vec<u8>), Error> {
        let session = self.session();
        match self.fetch(path, header, &session.token, timeout).await {
            Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                let session = self.reregister(session.epoch).await?;
                self.fetch(path, header, &session.token, timeout).await
            }
            answer => answer,
        }
    }

    async fn fetch(
        &self,
        path: &str,
        header: Option<&str>,
        token: &str,
        timeout: Duration,
    ) -> Result<(String, Vec<u8>), Error> {
        let url = format!("{}{path}", self.api);
        let request = self.http.get(&url).timeout(timeout).bearer_auth(token);
        let response = match request.send().await {
            Ok(response) => response,
            Err(source) => return Err(Error::Transport { url, source }),
        };
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Error::Status {
                url,
                status,
                message: error_message(&body),
            });
        }
        let value = header
            .and_then(|h| response.headers().get(h))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.bytes().await.map_err(|source| Error::Transport {
            url: url.clone(),
            source,
        })?;
        Ok((value, body.to_vec()))
    }

    async fn reregister(&self, refused_epoch: u64) -> Result<Arc<Session>, Error> {
        let _one_at_a_time = self.reregistering.lock().await;
        let current = self.session();
        if current.epoch != refused_epoch {
            return Ok(current);
        }
        tracing::warn!(
            agent = %self.identity.name,
            "the controller refused our token; registering again"
        );
        self.register().await
    }

    async fn send<B, R>(
        &self,
        path: &str,
        body: &B,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<R, Error>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let url = format!("{}{path}", self.api);
        let mut request = self.http.post(&url).json(body).timeout(timeout);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(source) => return Err(Error::Transport { url, source }),
        };
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Error::Status {
                url,
                status,
                message: error_message(&body),
            });
        }
        response
            .json()
            .await
            .map_err(|source| Error::Decode { url, source })
    }
}

/// The `error` of a `{"error": …}` answer with the `problems` of a refused proposal after it,
/// else the start of whatever the body was.
fn error_message(body: &str) -> String {
    if let Ok(refusal) = serde_json::from_str::<ProposalRefused>(body) {
        return format!("{}: {}", refusal.error, refusal.problems.join("; "));
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(refusal) => refusal.error,
        Err(_) => body.trim().chars().take(300).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_message_carries_a_refused_proposals_problems() {
        let refused = r#"{"error":"the project proposal `web` was refused","problems":["projects/web/project.yaml:3:5: unknown field `titel`","/etc/x: absolute paths are refused"]}"#;
        assert_eq!(
            error_message(refused),
            "the project proposal `web` was refused: projects/web/project.yaml:3:5: unknown field `titel`; /etc/x: absolute paths are refused"
        );
        assert_eq!(error_message(r#"{"error":"no such task"}"#), "no such task");
        assert_eq!(error_message("  gateway down \n"), "gateway down");
    }
}
