//! Who an MCP session joins as: the pure decisions, apart from the calls they lead to.
//!
//! A session registers as one agent. Its name is the one configured (`--name`, or `name=` in
//! the `/mcp` URL's query) or made from the MCP client's own name and a suffix (this machine's
//! host name for stdio, a random one over HTTP, where many clients share one server). Over
//! HTTP the query may also set the type and capabilities, and the enrollment secret is the
//! request's bearer token.

use crate::protocol::AgentType;

/// The longest agent name: a DNS label.
const NAME_MAX: usize = 63;

/// What the server was started with; the defaults of every session.
#[derive(Debug, Clone)]
pub struct McpConfig {
    /// The controller's base URL, e.g. `http://127.0.0.1:7700`.
    pub api: String,
    pub name: Option<String>,
    pub agent_type: AgentType,
    pub capabilities: Vec<String>,
    /// The enrollment secret of a stdio server (`--agent-secret`). Over HTTP each session
    /// presents its own as its bearer token instead.
    pub secret: Option<String>,
}

impl McpConfig {
    pub fn new(api: impl Into<String>) -> McpConfig {
        McpConfig {
            api: api.into(),
            name: None,
            agent_type: AgentType::Seed,
            capabilities: Vec::new(),
            secret: None,
        }
    }
}

/// What one HTTP request says about the session it opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HttpRequest {
    /// The URL's query, without the `?`.
    pub query: Option<String>,
    /// The `Authorization: Bearer …` token.
    pub bearer: Option<String>,
}

/// The registration a session makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Joining {
    pub name: String,
    pub agent_type: AgentType,
    pub capabilities: Vec<String>,
    pub secret: Option<String>,
}

/// Decides the registration from the server's configuration, the client's name, the HTTP
/// request when there is one, and the suffix of a made-up name. A bad query value is an
/// error naming the parameter and the value.
pub(crate) fn joining(
    config: &McpConfig,
    client_name: &str,
    http: Option<&HttpRequest>,
    suffix: &str,
) -> Result<Joining, String> {
    let mut joining = Joining {
        name: String::new(),
        agent_type: config.agent_type,
        capabilities: config.capabilities.clone(),
        secret: config.secret.clone(),
    };
    let mut name = config.name.clone();
    if let Some(http) = http {
        joining.secret = http.bearer.clone();
        let query = http.query.as_deref().unwrap_or("");
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| format!("the /mcp query `{query}` cannot be read: {e}"))?;
        for (key, value) in pairs {
            match key.as_str() {
                "name" => name = Some(value),
                "type" => {
                    joining.agent_type = value
                        .parse()
                        .map_err(|e| format!("the /mcp query parameter type={value:?}: {e}"))?;
                }
                "capabilities" => {
                    joining.capabilities = value
                        .split(',')
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                other => {
                    return Err(format!(
                        "the /mcp query parameter `{other}` is not known: use name, type or \
                         capabilities"
                    ));
                }
            }
        }
    }
    joining.name = match name.filter(|n| !n.is_empty()) {
        Some(name) => name,
        None => default_name(client_name, suffix),
    };
    Ok(joining)
}

/// `<client>-<suffix>` as a DNS label: lower case, runs of anything else than letters and
/// digits as one `-`, the client's part shortened so that the suffix fits.
pub(crate) fn default_name(client_name: &str, suffix: &str) -> String {
    let suffix = label(suffix);
    let mut client = label(client_name);
    if client.is_empty() {
        client = "mcp".to_owned();
    }
    if suffix.is_empty() {
        client.truncate(NAME_MAX);
        return client.trim_end_matches('-').to_owned();
    }
    let room = NAME_MAX.saturating_sub(suffix.len() + 1).max(1);
    client.truncate(room);
    let client = client.trim_end_matches('-');
    let mut name = format!("{client}-{suffix}");
    name.truncate(NAME_MAX);
    name.trim_end_matches('-').to_owned()
}

fn label(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_owned()
}

/// The bearer token of an `Authorization` header's value.
pub(crate) fn bearer(header: Option<&str>) -> Option<String> {
    header
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> McpConfig {
        McpConfig {
            secret: Some("from-the-flag".into()),
            ..McpConfig::new("http://127.0.0.1:7700")
        }
    }

    #[test]
    fn names_are_made_from_the_client_and_a_suffix() {
        assert_eq!(default_name("claude-code", "laptop"), "claude-code-laptop");
        assert_eq!(
            default_name("Cursor IDE", "Dev.Box_01"),
            "cursor-ide-dev-box-01"
        );
        assert_eq!(default_name("  ***  ", "a1b2c3"), "mcp-a1b2c3");
        assert_eq!(default_name("rmcp", ""), "rmcp");
        let long = default_name(&"x".repeat(100), "host");
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("x-host"), "{long}");
        for name in [long, default_name("ä-ö", "-")] {
            agentops_specs::names::check_dns_label(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn stdio_takes_the_flags() {
        let joining = joining(&config(), "claude-code", None, "laptop").unwrap();
        assert_eq!(
            joining,
            Joining {
                name: "claude-code-laptop".into(),
                agent_type: AgentType::Seed,
                capabilities: vec![],
                secret: Some("from-the-flag".into()),
            }
        );
        let named = McpConfig {
            name: Some("reviewer".into()),
            ..config()
        };
        assert_eq!(joining_name(&named, None), "reviewer");
    }

    fn joining_name(config: &McpConfig, http: Option<&HttpRequest>) -> String {
        joining(config, "claude-code", http, "x1").unwrap().name
    }

    #[test]
    fn http_takes_the_query_and_the_bearer() {
        let http = HttpRequest {
            query: Some("name=writer-1&type=specialist&capabilities=writing,%20research".into()),
            bearer: Some("s3cret".into()),
        };
        let joining = joining(&config(), "cursor", Some(&http), "x1").unwrap();
        assert_eq!(
            joining,
            Joining {
                name: "writer-1".into(),
                agent_type: AgentType::Specialist,
                capabilities: vec!["writing".into(), "research".into()],
                secret: Some("s3cret".into()),
            }
        );
        // No bearer: no secret, even when the server has one of its own.
        let bare = HttpRequest::default();
        let joining = super::joining(&config(), "cursor", Some(&bare), "x1").unwrap();
        assert_eq!((joining.name.as_str(), joining.secret), ("cursor-x1", None));
    }

    #[test]
    fn bad_query_values_are_named() {
        for (query, expected) in [("type=boss", "type=\"boss\""), ("colour=red", "`colour`")] {
            let http = HttpRequest {
                query: Some(query.into()),
                bearer: None,
            };
            let error = joining(&config(), "c", Some(&http), "x").unwrap_err();
            assert!(error.contains(expected), "{query}: {error}");
        }
    }

    #[test]
    fn bearer_tokens_are_read() {
        assert_eq!(bearer(Some("Bearer abc ")), Some("abc".into()));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
