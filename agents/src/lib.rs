//! agentops agents: the [`runtime`] any Rust agent is built on, and the agents built on it.
//!
//! The building blocks of the Chief of Staff and the Seed: the [`llm`] client, a
//! [`provider::Provider`] that plans projects, writes a `prompt` task's files and drafts tools
//! and specialists (with a model, or [`provider::OfflineProvider`] without one), the [`plan`]
//! and [`drafts`] that turn its answers into spec files `agentops validate` accepts, and the
//! [`prompt`] action's executor.

pub mod command;
pub mod drafts;
pub mod llm;
pub mod mcp;
pub mod plan;
pub mod prompt;
pub mod protocol;
pub mod provider;
pub mod redis_client;
pub mod runtime;
pub mod shutdown;

/// An error and its causes on one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A URL fit for a message or a log line: the secret of its userinfo replaced by `***`
/// (`user:***@host` for a password; `***@host` for a bare token, as NATS takes one).
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let shown = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{shown}{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_secrets() {
        for (url, shown) in [
            (
                "postgres://postgres:pw@127.0.0.1:5432/db",
                "postgres://postgres:***@127.0.0.1:5432/db",
            ),
            (
                "redis://user:pw@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
            ("nats://s3cr3t@host:4222", "nats://***@host:4222"),
            ("redis://host:6379", "redis://host:6379"),
            ("sqlite:///tmp/a@b.db", "sqlite:///tmp/a@b.db"),
            ("sqlite:agentops.db", "sqlite:agentops.db"),
            ("postgres://u:p@w@host/db", "postgres://u:***@host/db"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn an_error_chain_is_one_line() {
        let io = std::io::Error::other("disk full");
        #[derive(Debug, thiserror::Error)]
        #[error("cannot write")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(error_chain(&Outer(io)), "cannot write: disk full");
    }
}
