//! Leadership: of several controllers on one database, one leads (syncs, dispatches, writes
//! back) and the others stand by.
//!
//! With `--kube` the controllers elect their leader through a Kubernetes Lease ([`lease`]).
//! Otherwise, on Postgres, the leader holds a session advisory lock on a connection of its
//! own. The database releases it the moment that session ends, also when the process is
//! killed (the kernel closes the socket), so a standby that retries every `--leader-retry`
//! takes over within that interval. A leader whose lock connection breaks can no longer tell
//! whether it still leads, so it stops leading at once. On SQLite the database is a file on
//! one machine and the controller leads alone.

pub mod lease;

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::config::{KubeArgs, LeaderArgs};

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("cannot connect to the database to take the leader lock")]
    Connect(#[source] sqlx::Error),
    #[error("the connection that holds the leader lock failed: leadership is lost")]
    Lost(#[source] sqlx::Error),
    #[error("{flag} {value}: {reason}")]
    Setting {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cannot read or write the leader lease {lease}")]
    KubeApi {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the leader lease {lease} could not be renewed for {}: leadership is lost",
        humantime::format_duration(*within)
    )]
    NotRenewed { lease: String, within: Duration },
    #[error("the leader lease {lease} is held by {holder} now: leadership is lost")]
    Replaced { lease: String, holder: String },
}

impl LeaderError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            LeaderError::Connect(_) => "connect",
            LeaderError::Lost(_) => "lost",
            LeaderError::Setting { .. } => "setting",
            LeaderError::KubeApi { .. } => "kube_api",
            LeaderError::NotRenewed { .. } => "not_renewed",
            LeaderError::Replaced { .. } => "replaced",
        }
    }
}

/// How this controller comes to lead.
pub enum Leadership {
    /// No other controller can share the store.
    Sole,
    AdvisoryLock(AdvisoryLock),
    /// Boxed: the lease's client and last written Lease are large.
    KubeLease(Box<lease::KubeLease>),
}

pub struct AdvisoryLock {
    url: String,
    key: i64,
    retry: Duration,
    connection: Option<PgConnection>,
}

/// The advisory lock key of a leadership name: the first eight bytes of its SHA-256.
pub fn lock_key(name: &str) -> i64 {
    let digest = Sha256::digest(name.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("eight bytes"))
}

impl Leadership {
    /// A Lease with a Kubernetes client (`--kube`), else what the store needs.
    pub fn configure(
        url: &str,
        leader: &LeaderArgs,
        kube: &KubeArgs,
        client: Option<kube::Client>,
    ) -> Result<Leadership, LeaderError> {
        match client {
            Some(client) => Ok(Leadership::KubeLease(Box::new(lease::KubeLease::new(
                client, leader, kube,
            )?))),
            None => Ok(Leadership::for_store(url, leader)),
        }
    }

    pub fn for_store(url: &str, args: &LeaderArgs) -> Leadership {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Leadership::AdvisoryLock(AdvisoryLock {
                url: url.to_owned(),
                key: lock_key(&args.leader_lock),
                retry: args.leader_retry,
                connection: None,
            })
        } else {
            Leadership::Sole
        }
    }

    /// Wait until this controller leads. `Ok(false)` when `shutdown` came first.
    /// `standing_by` is called once, when another controller is found to lead.
    pub async fn acquire(
        &mut self,
        shutdown: &CancellationToken,
        standing_by: impl FnOnce(),
    ) -> Result<bool, LeaderError> {
        match self {
            Leadership::Sole => Ok(true),
            Leadership::AdvisoryLock(lock) => lock.acquire(shutdown, standing_by).await,
            Leadership::KubeLease(lease) => lease.acquire(shutdown, standing_by).await,
        }
    }

    /// Keep watching the lock (renewing the lease) from a task of its own, once this
    /// controller leads: a check interrupted halfway by the controller's loop would leave the
    /// connection unusable.
    pub fn watch(self) -> Lead {
        let (lost, receiver) = tokio::sync::oneshot::channel();
        let mut release = None;
        let watcher = match self {
            Leadership::Sole => None,
            Leadership::KubeLease(lease) => {
                let token = CancellationToken::new();
                release = Some(token.clone());
                Some(tokio::spawn(lease.keep(lost, token)))
            }
            Leadership::AdvisoryLock(AdvisoryLock {
                connection: Some(mut connection),
                retry,
                ..
            }) => Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(retry).await;
                    if let Err(e) = connection.ping().await {
                        let _ = lost.send(LeaderError::Lost(e));
                        return;
                    }
                }
            })),
            Leadership::AdvisoryLock(AdvisoryLock {
                connection: None, ..
            }) => {
                let _ = lost.send(LeaderError::Lost(sqlx::Error::PoolClosed));
                None
            }
        };
        Lead {
            receiver: Some(receiver),
            watcher,
            release,
        }
    }
}

impl AdvisoryLock {
    async fn acquire(
        &mut self,
        shutdown: &CancellationToken,
        standing_by: impl FnOnce(),
    ) -> Result<bool, LeaderError> {
        let lock = self;
        let mut standing_by = Some(standing_by);
        loop {
            if lock.connection.is_none() {
                // A database that is briefly away is retried like a held lock.
                match PgConnection::connect(&lock.url).await {
                    Ok(connection) => lock.connection = Some(connection),
                    Err(e) if standing_by.is_none() => {
                        tracing::warn!(error = %e, "cannot reach the database for the leader lock");
                    }
                    Err(e) => return Err(LeaderError::Connect(e)),
                }
            }
            if let Some(connection) = lock.connection.as_mut() {
                let taken: Result<bool, _> = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(lock.key)
                    .fetch_one(&mut *connection)
                    .await;
                match taken {
                    Ok(true) => return Ok(true),
                    Ok(false) => {
                        if let Some(first) = standing_by.take() {
                            first();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the leader lock's connection failed; reconnecting");
                        lock.connection = None;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                () = tokio::time::sleep(lock.retry) => {}
            }
        }
    }
}

/// Leading, for as long as this lives: dropping it ends the lock's session, which lets a
/// standby take over; a lease is handed back by [`Lead::release`].
pub struct Lead {
    receiver: Option<tokio::sync::oneshot::Receiver<LeaderError>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// Asks the lease's watcher to hand the lease back and end.
    release: Option<CancellationToken>,
}

impl Lead {
    /// Stop leading on a clean stop, so that a standby takes over at its next try instead of
    /// when the lease expires.
    pub async fn release(mut self) {
        if let (Some(release), Some(watcher)) = (self.release.take(), self.watcher.take()) {
            release.cancel();
            if let Err(e) = watcher.await {
                tracing::error!("the leader lease's task failed: {e}");
            }
        }
    }

    /// Resolves when leadership is lost; never, for a sole controller. Safe to cancel and
    /// call again.
    pub async fn lost(&mut self) -> LeaderError {
        let Some(receiver) = self.receiver.as_mut() else {
            return std::future::pending().await;
        };
        match receiver.await {
            Ok(error) => {
                self.receiver = None;
                error
            }
            Err(_) => {
                // A sole controller's sender is dropped at once: it never loses the lead.
                self.receiver = None;
                std::future::pending().await
            }
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_has_its_own_stable_key() {
        assert_eq!(
            lock_key("agentops-controller"),
            lock_key("agentops-controller")
        );
        assert_ne!(lock_key("agentops-controller"), lock_key("team-b"));
    }

    #[test]
    fn only_postgres_needs_a_lock() {
        let args = LeaderArgs {
            leader_lock: "x".into(),
            leader_retry: Duration::from_secs(2),
            leader_lease_duration: Duration::from_secs(15),
            leader_renew: Duration::from_secs(10),
            leader_namespace: None,
            leader_identity: None,
        };
        assert!(matches!(
            Leadership::for_store("sqlite:///tmp/a.db", &args),
            Leadership::Sole
        ));
        assert!(matches!(
            Leadership::for_store("postgres://u@h/db", &args),
            Leadership::AdvisoryLock(_)
        ));
    }
}
