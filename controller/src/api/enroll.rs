//! Enrollment: who may register as an agent. A registration presents a secret as its bearer
//! token: the installation's shared secret (`--agent-secret`), the secret its name has in the
//! secrets file (`--agent-secrets`, which also limits the types the name may register as), or
//! the controller's own secret for its embedded agents. With `--kube`, an agent in the
//! cluster may present its ServiceAccount token instead: the API server checks it (a
//! `TokenReview`, [`TokenReviewer`]) and the account must be one `--agent-service-accounts`
//! lists. With none of these set, only programs on the controller's machine may register (the
//! peer is a loopback address).
//!
//! Secrets are kept and compared as SHA-256 digests, so the file holds no secret and a
//! comparison's timing says nothing about the secret's bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

type Digest32 = [u8; 32];

fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("cannot read the agent secrets file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("--agent-service-accounts {message}")]
    ServiceAccounts { message: String },
}

/// The agent secrets file: `agents: [{name, secretSha256, types}]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    agents: Vec<SecretEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecretEntry {
    name: String,
    /// Hex SHA-256 of the secret: `printf %s SECRET | sha256sum`.
    secret_sha256: String,
    /// The agent types the name may register as.
    types: Vec<String>,
}

#[derive(Debug, Clone)]
struct NamedSecret {
    digest: Digest32,
    types: Vec<String>,
}

/// Why a registration was refused; each answers with its own status and counts by its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No secret is configured and the peer is not on this machine.
    NotLoopback,
    /// A secret is needed and none was presented.
    NoSecret,
    /// The secret matches nothing this name may use.
    WrongSecret,
    /// The name's secret does not allow this type.
    TypeNotAllowed,
    /// A live agent holds the name (409).
    NameHeld,
    /// As many agents as `--max-agents` allows hold tokens (429).
    TooManyAgents,
    /// The API server vouches for the ServiceAccount token, but the account is not one
    /// `--agent-service-accounts` lists (403).
    AccountNotAllowed,
    /// The API server could not be asked about the token (503): the same request may
    /// succeed later.
    ReviewFailed,
}

impl Refused {
    pub fn metric_label(self) -> &'static str {
        match self {
            Refused::NotLoopback => "not_loopback",
            Refused::NoSecret => "no_secret",
            Refused::WrongSecret => "wrong_secret",
            Refused::TypeNotAllowed => "type_not_allowed",
            Refused::NameHeld => "name_held",
            Refused::TooManyAgents => "too_many_agents",
            Refused::AccountNotAllowed => "account_not_allowed",
            Refused::ReviewFailed => "token_review_failed",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refused::NotLoopback => {
                "registration is open to this machine only: the controller has no --agent-secret \
                 or --agent-secrets"
            }
            Refused::NoSecret => "registration needs the enrollment secret as a bearer token",
            Refused::WrongSecret => "the enrollment secret is not valid for this agent name",
            Refused::TypeNotAllowed => "this agent name may not register as this type",
            Refused::NameHeld => {
                "a live agent holds this name: it is free once that agent releases it or its \
                 presence expires"
            }
            Refused::TooManyAgents => {
                "the controller has as many agents as --max-agents allows; try again once one \
                 goes offline"
            }
            Refused::AccountNotAllowed => {
                "this ServiceAccount may not register agents: it is not in the controller's \
                 --agent-service-accounts"
            }
            Refused::ReviewFailed => {
                "the Kubernetes API server could not check the ServiceAccount token; try again"
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Enrollment {
    shared: Option<Digest32>,
    named: HashMap<String, NamedSecret>,
    /// The controller's embedded agents' secret, made at start.
    internal: Option<Digest32>,
    /// The ServiceAccounts whose tokens enroll, as the API server names their users:
    /// `system:serviceaccount:<namespace>:<name>`.
    service_accounts: Vec<String>,
}

/// What the API server said of a token (a `TokenReview`'s status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub authenticated: bool,
    pub username: Option<String>,
}

/// The user name the API server gives a ServiceAccount `namespace:name` (the form
/// `--agent-service-accounts` takes), or why it is not one.
pub fn service_account_user(account: &str) -> Result<String, String> {
    let Some((namespace, name)) = account.split_once(':') else {
        return Err(format!(
            "`{account}`: expected NAMESPACE:NAME, e.g. team:agentops-agents"
        ));
    };
    for (what, part) in [("namespace", namespace), ("name", name)] {
        agentops_specs::names::check_dns_label(part)
            .map_err(|why| format!("`{account}`: the {what} `{part}`: {why}"))?;
    }
    Ok(format!("system:serviceaccount:{namespace}:{name}"))
}

impl Enrollment {
    /// From `--agent-secret` and `--agent-secrets`.
    pub fn configure(
        shared: Option<&str>,
        secrets_file: Option<&Path>,
    ) -> Result<Enrollment, EnrollmentError> {
        let mut enrollment = Enrollment {
            shared: shared.filter(|s| !s.is_empty()).map(digest),
            ..Enrollment::default()
        };
        if let Some(path) = secrets_file {
            let text = std::fs::read_to_string(path).map_err(|source| EnrollmentError::Read {
                path: path.to_owned(),
                source,
            })?;
            enrollment.named = parse_secrets(&text).map_err(|message| EnrollmentError::Parse {
                path: path.to_owned(),
                message,
            })?;
        }
        Ok(enrollment)
    }

    /// Accept the tokens of these ServiceAccounts (`namespace:name`), as a `TokenReview`
    /// finds them.
    pub fn allow_service_accounts(&mut self, accounts: &[String]) -> Result<(), String> {
        self.service_accounts = accounts
            .iter()
            .map(|a| service_account_user(a))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Whether any credential is configured; without one only loopback peers may register.
    pub fn requires_secret(&self) -> bool {
        self.shared.is_some() || !self.named.is_empty() || self.reviews_tokens()
    }

    /// Whether a token that is no secret may be a ServiceAccount's, for the API server to
    /// check.
    pub fn reviews_tokens(&self) -> bool {
        !self.service_accounts.is_empty()
    }

    /// The verdict on a token the API server reviewed.
    pub fn admit_reviewed(&self, reviewed: &Reviewed) -> Result<(), Refused> {
        match &reviewed.username {
            Some(user) if reviewed.authenticated => {
                if self.service_accounts.iter().any(|a| a == user) {
                    Ok(())
                } else {
                    Err(Refused::AccountNotAllowed)
                }
            }
            _ => Err(Refused::WrongSecret),
        }
    }

    /// Accept `secret` too, for the controller's own agents.
    pub fn allow_internal(&mut self, secret: &str) {
        self.internal = Some(digest(secret));
    }

    /// Whether `secret` is the embedded agents' own: their names are the controller's, so
    /// they take them back after a restart whoever seemed to hold them.
    pub fn is_internal(&self, secret: Option<&str>) -> bool {
        self.internal.is_some() && secret.map(digest) == self.internal
    }

    pub fn check(
        &self,
        peer: Option<SocketAddr>,
        secret: Option<&str>,
        name: &str,
        agent_type: &str,
    ) -> Result<(), Refused> {
        let presented = secret.map(digest);
        if presented.is_some() && presented == self.internal {
            return Ok(());
        }
        if !self.requires_secret() {
            // An unknown peer is not known to be local.
            return match peer {
                Some(peer) if peer.ip().is_loopback() => Ok(()),
                _ => Err(Refused::NotLoopback),
            };
        }
        let Some(presented) = presented else {
            return Err(Refused::NoSecret);
        };
        if let Some(named) = self.named.get(name)
            && named.digest == presented
        {
            return if named.types.iter().any(|t| t == agent_type) {
                Ok(())
            } else {
                Err(Refused::TypeNotAllowed)
            };
        }
        if self.shared == Some(presented) {
            return Ok(());
        }
        Err(Refused::WrongSecret)
    }
}

fn parse_secrets(text: &str) -> Result<HashMap<String, NamedSecret>, String> {
    let file: SecretsFile = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    let mut named = HashMap::new();
    for (n, entry) in file.agents.into_iter().enumerate() {
        let at = format!("agents[{n}]");
        agentops_specs::names::check_dns_label(&entry.name)
            .map_err(|why| format!("{at}.name `{}`: {why}", entry.name))?;
        let bytes = hex::decode(&entry.secret_sha256)
            .ok()
            .filter(|b| b.len() == 32);
        let Some(bytes) = bytes else {
            return Err(format!(
                "{at}.secretSha256 `{}`: expected 64 hex digits (printf %s SECRET | sha256sum)",
                entry.secret_sha256
            ));
        };
        if entry.types.is_empty() {
            return Err(format!(
                "{at}.types: list the types `{}` may register as",
                entry.name
            ));
        }
        for t in &entry.types {
            if t.parse::<agentops_specs::AgentType>().is_err() {
                return Err(format!(
                    "{at}.types `{t}`: expected one of cos, seed, specialist, meta"
                ));
            }
        }
        let digest: Digest32 = bytes.try_into().expect("32 bytes");
        if named
            .insert(
                entry.name.clone(),
                NamedSecret {
                    digest,
                    types: entry.types,
                },
            )
            .is_some()
        {
            return Err(format!("{at}.name `{}`: listed twice", entry.name));
        }
    }
    Ok(named)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> Option<SocketAddr> {
        Some("127.0.0.1:5000".parse().unwrap())
    }

    fn remote() -> Option<SocketAddr> {
        Some("192.0.2.7:5000".parse().unwrap())
    }

    #[test]
    fn without_a_secret_only_this_machine_registers() {
        let open = Enrollment::default();
        assert_eq!(open.check(loopback(), None, "a", "seed"), Ok(()));
        assert_eq!(
            open.check(remote(), None, "a", "seed"),
            Err(Refused::NotLoopback)
        );
        assert_eq!(
            open.check(None, None, "a", "seed"),
            Err(Refused::NotLoopback)
        );
        let v6: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(open.check(Some(v6), None, "a", "seed"), Ok(()));
    }

    #[test]
    fn a_shared_secret_is_needed_from_everywhere() {
        let shared = Enrollment::configure(Some("s3cret"), None).unwrap();
        assert_eq!(
            shared.check(loopback(), None, "a", "seed"),
            Err(Refused::NoSecret)
        );
        assert_eq!(
            shared.check(remote(), Some("guess"), "a", "seed"),
            Err(Refused::WrongSecret)
        );
        assert_eq!(shared.check(remote(), Some("s3cret"), "a", "cos"), Ok(()));
    }

    #[test]
    fn a_named_secret_admits_its_name_and_types_only() {
        let file = format!(
            "agents:\n  - name: laptop\n    secretSha256: {}\n    types: [seed]\n",
            hex::encode(digest("mine"))
        );
        let enrollment = Enrollment {
            named: parse_secrets(&file).unwrap(),
            ..Enrollment::default()
        };
        assert_eq!(
            enrollment.check(remote(), Some("mine"), "laptop", "seed"),
            Ok(())
        );
        assert_eq!(
            enrollment.check(remote(), Some("mine"), "laptop", "cos"),
            Err(Refused::TypeNotAllowed)
        );
        assert_eq!(
            enrollment.check(remote(), Some("mine"), "other", "seed"),
            Err(Refused::WrongSecret),
            "the secret belongs to one name"
        );
    }

    #[test]
    fn the_embedded_agents_secret_works_whatever_else_is_set() {
        let mut enrollment = Enrollment::configure(Some("s3cret"), None).unwrap();
        enrollment.allow_internal("inside");
        assert_eq!(
            enrollment.check(loopback(), Some("inside"), "seed", "seed"),
            Ok(())
        );
        let mut open = Enrollment::default();
        open.allow_internal("inside");
        assert_eq!(open.check(remote(), Some("inside"), "seed", "seed"), Ok(()));
    }

    #[test]
    fn a_reviewed_token_enrolls_only_a_listed_account() {
        let mut enrollment = Enrollment::default();
        assert!(!enrollment.requires_secret());
        enrollment
            .allow_service_accounts(&["team:agents".to_owned()])
            .unwrap();
        assert!(enrollment.requires_secret() && enrollment.reviews_tokens());
        let reviewed = |authenticated, user: &str| Reviewed {
            authenticated,
            username: Some(user.to_owned()),
        };
        assert_eq!(
            enrollment.admit_reviewed(&reviewed(true, "system:serviceaccount:team:agents")),
            Ok(())
        );
        assert_eq!(
            enrollment.admit_reviewed(&reviewed(true, "system:serviceaccount:team:other")),
            Err(Refused::AccountNotAllowed)
        );
        assert_eq!(
            enrollment.admit_reviewed(&reviewed(false, "system:serviceaccount:team:agents")),
            Err(Refused::WrongSecret),
            "an unauthenticated review says nothing of the user"
        );
        // Loopback no longer registers without a credential.
        assert_eq!(
            enrollment.check(loopback(), None, "a", "seed"),
            Err(Refused::NoSecret)
        );
    }

    #[test]
    fn service_accounts_are_namespace_and_name() {
        assert_eq!(
            service_account_user("team:agents").unwrap(),
            "system:serviceaccount:team:agents"
        );
        for (bad, says) in [
            ("agents", "expected NAMESPACE:NAME"),
            ("Team:agents", "the namespace `Team`"),
            ("team:", "the name ``"),
        ] {
            let error = service_account_user(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_bad_secrets_file_names_the_entry_and_field() {
        let cases = [
            (
                "agents:\n  - name: Bad_Name\n    secretSha256: 00\n    types: [seed]\n",
                "agents[0].name `Bad_Name`",
            ),
            (
                "agents:\n  - name: ok\n    secretSha256: xyz\n    types: [seed]\n",
                "agents[0].secretSha256 `xyz`",
            ),
            (
                &format!(
                    "agents:\n  - name: ok\n    secretSha256: {}\n    types: [wizard]\n",
                    "ab".repeat(32)
                ),
                "agents[0].types `wizard`",
            ),
            (
                "agents:\n  - name: ok\n    secret: plain\n    types: [seed]\n",
                "unknown field",
            ),
            ("agents: [\n", "line"),
        ];
        for (text, expected) in cases {
            let error = parse_secrets(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}

/// Asks the Kubernetes API server whom a bearer token belongs to (`POST
/// /apis/authentication.k8s.io/v1/tokenreviews`, which the controller's ClusterRole allows).
#[derive(Clone)]
pub struct TokenReviewer {
    api: kube::Api<k8s_openapi::api::authentication::v1::TokenReview>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenReviewer")
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> TokenReviewer {
        TokenReviewer {
            api: kube::Api::all(client),
        }
    }

    pub async fn review(&self, token: &str) -> Result<Reviewed, kube::Error> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&kube::api::PostParams::default(), &review)
            .await?;
        let status = answer.status.unwrap_or_default();
        Ok(Reviewed {
            authenticated: status.authenticated == Some(true),
            username: status.user.and_then(|u| u.username),
        })
    }
}
