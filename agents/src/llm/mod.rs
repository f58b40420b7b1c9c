//! A client for OpenAI-compatible chat completions; OpenRouter by default.
//!
//! Models are tried in order. A model that answers 429 or a 5xx, times out, cannot be reached
//! or answers something that is not a chat completion is left for the next one after a
//! backoff; any other refusal (a bad key, a malformed request) ends the call, because the next
//! model would be told the same. Every attempt that reached the provider becomes one
//! [`UsageRecord`] for the caller's [`UsageSink`] (a `model_usage` row), failures included,
//! so that both spend and error rates show. Agents that share a [`RateLimiter`] share its
//! budget, counted per provider (the part of the model name before `/`).

mod limiter;
mod pricing;
mod usage;

use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use limiter::{MemoryRateLimiter, RateLimit, RateLimitError, RateLimiter, RedisRateLimiter};
pub use pricing::{Price, Pricing};
pub use usage::{Caller, MemoryUsage, NoUsage, UsageError, UsageRecord, UsageSink};

/// OpenRouter's OpenAI-compatible API.
pub const OPENROUTER_URL: &str = "https://openrouter.ai/api/v1";
/// The environment variable holding the API key; without it agents work offline.
pub const API_KEY_ENV: &str = "OPENROUTER_API_KEY";
/// The original system's order: Groq's Llama 3.3 70B, then OpenAI gpt-4o-mini, then
/// Anthropic Claude 3.5 Sonnet, by their OpenRouter names.
pub const DEFAULT_MODELS: [&str; 3] = [
    "meta-llama/llama-3.3-70b-instruct",
    "openai/gpt-4o-mini",
    "anthropic/claude-3.5-sonnet",
];

/// The longest pause between two models, whatever a `Retry-After` asks for: a caller waiting
/// on a person's request should hear back in seconds, not minutes.
const MAX_PAUSE: Duration = Duration::from_secs(10);
/// How much of an error body a failure message carries.
const MESSAGE_LIMIT: usize = 300;

#[derive(Clone)]
pub struct LlmConfig {
    /// Up to and excluding `/chat/completions`, e.g. `https://openrouter.ai/api/v1`.
    pub base_url: String,
    pub api_key: String,
    /// Tried in order.
    pub models: Vec<String>,
    /// One attempt at one model, answer included.
    pub timeout: Duration,
    /// The pause before the second model; it doubles for each further one.
    pub backoff: Duration,
    pub max_tokens: Option<u32>,
    /// Calls per provider across every agent sharing the limiter; `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// How long a call waits for the rate limiter before leaving a model for the next.
    pub rate_wait: Duration,
    pub pricing: Pricing,
}

impl LlmConfig {
    /// OpenRouter, the default models, and defaults suited to interactive planning.
    pub fn new(api_key: impl Into<String>) -> LlmConfig {
        LlmConfig {
            base_url: OPENROUTER_URL.to_owned(),
            api_key: api_key.into(),
            models: DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect(),
            timeout: Duration::from_secs(120),
            backoff: Duration::from_millis(500),
            max_tokens: None,
            rate_limit: None,
            rate_wait: Duration::from_secs(30),
            pricing: Pricing::default(),
        }
    }

    /// The configuration from [`API_KEY_ENV`]; `None` when it is unset or blank, which means
    /// the offline provider should be used.
    pub fn from_env() -> Option<LlmConfig> {
        let key = std::env::var(API_KEY_ENV).ok()?;
        let key = key.trim();
        (!key.is_empty()).then(|| LlmConfig::new(key))
    }
}

impl std::fmt::Debug for LlmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .field("models", &self.models)
            .field("timeout", &self.timeout)
            .field("backoff", &self.backoff)
            .field("max_tokens", &self.max_tokens)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

/// The provider a model belongs to: `openai` for `openai/gpt-4o-mini`.
pub fn provider_of(model: &str) -> &str {
    model
        .split_once('/')
        .map_or(model, |(provider, _)| provider)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Message {
        Message {
            role: Role::System,
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Message {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// What the answer should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// A JSON object (`response_format: json_object`, for the models that honour it).
    Json,
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub content: String,
    /// The model that answered, as configured.
    pub model: String,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("no model is configured")]
    NoModels,
    #[error("{model} refused the request with HTTP {status}: {message}")]
    Refused {
        model: String,
        status: u16,
        message: String,
    },
    #[error("every model failed: {}", .attempts.join("; "))]
    Exhausted { attempts: Vec<String> },
}

impl LlmError {
    /// Whether the same call may succeed later: every model was busy, down or slow.
    pub fn is_transient(&self) -> bool {
        matches!(self, LlmError::Exhausted { .. })
    }
}

/// An attempt at one model that did not give an answer.
enum Failure {
    /// Worth trying the next model; `pause` is what the provider asked us to wait.
    Next {
        reason: String,
        pause: Option<Duration>,
    },
    Final(LlmError),
}

#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    config: LlmConfig,
    limiter: std::sync::Arc<dyn RateLimiter>,
}

impl LlmClient {
    /// `limiter` is consulted only when the configuration sets a rate limit; give every agent
    /// of a deployment the same one (Redis across processes).
    pub fn new(
        config: LlmConfig,
        limiter: std::sync::Arc<dyn RateLimiter>,
    ) -> Result<LlmClient, LlmError> {
        if config.models.is_empty() {
            return Err(LlmError::NoModels);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(LlmError::Client)?;
        Ok(LlmClient {
            http,
            config,
            limiter,
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// Asks the models in order until one answers.
    pub async fn chat(
        &self,
        caller: &Caller<'_>,
        messages: &[Message],
        format: Format,
    ) -> Result<Answer, LlmError> {
        let mut attempts = Vec::new();
        let mut pause = None;
        for (n, model) in self.config.models.iter().enumerate() {
            if let Some(pause) = pause.take() {
                tokio::time::sleep(pause).await;
            }
            let provider = provider_of(model);
            if !self.wait_for_budget(provider).await {
                attempts.push(format!(
                    "{model}: the rate limit of {provider} stayed exhausted for {:?}",
                    self.config.rate_wait
                ));
                continue;
            }
            let started = Instant::now();
            let outcome = self.attempt(model, messages, format).await;
            let mut record = UsageRecord {
                agent: caller.agent.to_owned(),
                model: model.clone(),
                provider: provider.to_owned(),
                task_id: caller.task_id.map(str::to_owned),
                prompt_tokens: None,
                completion_tokens: None,
                total_tokens: None,
                estimated_cost_usd: None,
                latency_ms: started.elapsed().as_millis().min(u64::MAX as u128) as u64,
                success: false,
                error: None,
            };
            let result = match outcome {
                Ok((answer, usage)) => {
                    record.success = true;
                    record.prompt_tokens = usage.prompt_tokens;
                    record.completion_tokens = usage.completion_tokens;
                    record.total_tokens = usage.total_tokens.or_else(|| {
                        Some(
                            usage
                                .prompt_tokens?
                                .saturating_add(usage.completion_tokens?),
                        )
                    });
                    record.estimated_cost_usd =
                        usage.cost.filter(|c| c.is_finite()).or_else(|| {
                            self.config.pricing.estimate(
                                model,
                                usage.prompt_tokens?,
                                usage.completion_tokens?,
                            )
                        });
                    Ok(answer)
                }
                Err(Failure::Next {
                    reason,
                    pause: asked,
                }) => {
                    record.error = Some(reason.clone());
                    attempts.push(format!("{model}: {reason}"));
                    let backoff = self.config.backoff.saturating_mul(1 << n.min(16) as u32);
                    pause = Some(asked.unwrap_or(backoff).min(MAX_PAUSE));
                    Err(None)
                }
                Err(Failure::Final(e)) => {
                    record.error = Some(e.to_string());
                    Err(Some(e))
                }
            };
            // Recording is bookkeeping: losing a record must not lose the answer.
            if let Err(e) = caller.usage.record(&record).await {
                tracing::warn!(model = %model, error = %crate::error_chain(&e), "model usage not recorded");
            }
            match result {
                Ok(answer) => return Ok(answer),
                Err(Some(e)) => return Err(e),
                Err(None) => {
                    tracing::warn!(model = %model, reason = %attempts.last().map_or("", String::as_str), "trying the next model");
                }
            }
        }
        Err(LlmError::Exhausted { attempts })
    }

    /// Takes one call from the provider's budget, waiting up to `rate_wait` for it. A limiter
    /// that cannot answer lets the call through: the provider's own 429 still protects it.
    async fn wait_for_budget(&self, provider: &str) -> bool {
        let Some(limit) = self.config.rate_limit else {
            return true;
        };
        let key = format!("llm:{provider}");
        let deadline = Instant::now() + self.config.rate_wait;
        // Polling at a fraction of the window finds the next window soon after it opens.
        let poll = (limit.per / 10).clamp(Duration::from_millis(10), Duration::from_millis(500));
        loop {
            match self.limiter.try_acquire(&key, limit).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "rate limiter unavailable; calling anyway");
                    return true;
                }
            }
            if Instant::now() + poll > deadline {
                return false;
            }
            tokio::time::sleep(poll).await;
        }
    }

    async fn attempt(
        &self,
        model: &str,
        messages: &[Message],
        format: Format,
    ) -> Result<(Answer, WireUsage), Failure> {
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let body = ChatRequest {
            model,
            messages,
            temperature: 0.0,
            max_tokens: self.config.max_tokens,
            response_format: (format == Format::Json).then_some(ResponseFormat {
                kind: "json_object",
            }),
            usage: UsageOption { include: true },
        };
        let sent = self
            .http
            .post(&url)
            .bearer_auth(&self.config.api_key)
            .header("X-Title", "agentops")
            .json(&body)
            .timeout(self.config.timeout)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Err(Failure::Next {
                    reason: format!("no answer within {:?}", self.config.timeout),
                    pause: None,
                });
            }
            Err(e) => {
                return Err(Failure::Next {
                    reason: format!("cannot reach {url}: {}", crate::error_chain(&e)),
                    pause: None,
                });
            }
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let message = error_message(&response.text().await.unwrap_or_default());
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                return Err(Failure::Next {
                    reason: format!("HTTP {}: {message}", status.as_u16()),
                    pause: retry_after,
                });
            }
            return Err(Failure::Final(LlmError::Refused {
                model: model.to_owned(),
                status: status.as_u16(),
                message,
            }));
        }
        let answer: ChatResponse = match response.json().await {
            Ok(answer) => answer,
            Err(e) if e.is_timeout() => {
                return Err(Failure::Next {
                    reason: format!("no answer within {:?}", self.config.timeout),
                    pause: None,
                });
            }
            Err(e) => {
                return Err(Failure::Next {
                    reason: format!(
                        "answered something that is not a chat completion: {}",
                        crate::error_chain(&e)
                    ),
                    pause: None,
                });
            }
        };
        let usage = answer.usage.unwrap_or_default();
        let content = answer
            .choices
            .into_iter()
            .next()
            .and_then(|choice| choice.message.content)
            .filter(|content| !content.trim().is_empty());
        let Some(content) = content else {
            return Err(Failure::Next {
                reason: "answered with an empty message".to_owned(),
                pause: None,
            });
        };
        Ok((
            Answer {
                content,
                model: model.to_owned(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            },
            usage,
        ))
    }
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [Message],
    /// Plans and files should not change between two runs of the same request.
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat>,
    /// OpenRouter's switch for the real cost in the answer's `usage`; others ignore it.
    usage: UsageOption,
}

#[derive(Serialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct UsageOption {
    include: bool,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
    #[serde(default)]
    total_tokens: Option<u32>,
    /// US dollars, from OpenRouter when asked for.
    #[serde(default)]
    cost: Option<f64>,
}

/// `Retry-After` in seconds (the HTTP-date form is rare from these APIs and is ignored).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// The message of an OpenAI-style `{"error": {"message": …}}` body, else the body's start.
fn error_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let error = v.get("error")?;
        error
            .get("message")
            .and_then(serde_json::Value::as_str)
            .or_else(|| error.as_str())
    });
    let text = message.unwrap_or(body).trim();
    let mut cut: String = text.chars().take(MESSAGE_LIMIT).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_are_the_prefix_of_the_model_name() {
        assert_eq!(provider_of("openai/gpt-4o-mini"), "openai");
        assert_eq!(
            provider_of("meta-llama/llama-3.3-70b-instruct"),
            "meta-llama"
        );
        assert_eq!(provider_of("local-model"), "local-model");
    }

    #[test]
    fn error_messages_come_from_the_error_object_or_the_body() {
        assert_eq!(
            error_message(r#"{"error": {"message": "rate limited", "code": 429}}"#),
            "rate limited"
        );
        assert_eq!(error_message(r#"{"error": "overloaded"}"#), "overloaded");
        assert_eq!(error_message("  upstream down \n"), "upstream down");
        let long = "x".repeat(1000);
        assert_eq!(error_message(&long).chars().count(), MESSAGE_LIMIT + 1);
    }

    #[test]
    fn the_key_is_not_printed() {
        let config = LlmConfig::new("sk-secret");
        assert!(!format!("{config:?}").contains("sk-secret"));
    }

    #[test]
    fn retry_after_reads_seconds() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
