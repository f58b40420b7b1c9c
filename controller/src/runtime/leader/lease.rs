//! Leadership through a `coordination.k8s.io/v1` Lease, with the timings Kubernetes' own
//! controllers use: the holder renews the lease every `--leader-retry`; a standby reads it as
//! often and takes it once nobody holds it or its holder has not renewed it for
//! `--leader-lease-duration`. A leader that could not renew for `--leader-renew` stops
//! leading, which is before any standby may take the lease over: the difference of the two is
//! the margin for the controllers' clocks, which judge the lease by its `renewTime`. Every
//! write replaces the lease at the resourceVersion it was read at, so of two controllers that
//! write at once one gets a conflict and reads again. A leader that stops cleanly clears the
//! holder, and a standby takes the lease at its next read.
//!
//! [`plan`] and [`released`] decide from the lease as read; [`KubeLease`] talks to the API.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::LeaderError;
use crate::config::{KubeArgs, LeaderArgs};

/// Where a pod finds its own namespace.
pub const IN_CLUSTER_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// How long a clean stop may spend handing the lease back.
const RELEASE_WITHIN: Duration = Duration::from_secs(5);

/// The lease's timings, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease holds after its last renewal (`leaseDurationSeconds`).
    pub duration: Duration,
    /// How long a leader goes on leading without a successful renewal.
    pub renew: Duration,
    /// How often a standby reads the lease and the leader renews it.
    pub retry: Duration,
}

impl Timing {
    pub fn new(
        duration: Duration,
        renew: Duration,
        retry: Duration,
    ) -> Result<Timing, LeaderError> {
        let setting = |flag, value: Duration, reason| LeaderError::Setting {
            flag,
            value: humantime::format_duration(value).to_string(),
            reason,
        };
        if duration.subsec_nanos() != 0 || duration.is_zero() || duration.as_secs() > 86_400 {
            return Err(setting(
                "--leader-lease-duration",
                duration,
                "must be whole seconds, from 1s to 1day",
            ));
        }
        if renew >= duration {
            return Err(setting(
                "--leader-renew",
                renew,
                "must be shorter than --leader-lease-duration, or a leader that cannot renew \
                 would still lead when a standby takes the lease",
            ));
        }
        if retry.is_zero() || retry >= renew {
            return Err(setting(
                "--leader-retry",
                retry,
                "must be longer than zero and shorter than --leader-renew, or a leader gives up \
                 before it could retry a renewal",
            ));
        }
        Ok(Timing {
            duration,
            renew,
            retry,
        })
    }

    fn duration_seconds(&self) -> i32 {
        // At most a day, checked in `new`.
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// What to do about the lease as it was read.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// There is no lease yet: create this one, held by this controller.
    Create(Lease),
    /// Replace the lease with this one, at the resourceVersion it was read at.
    Write(Take, Lease),
    /// Another controller holds the lease, until `until` unless it renews it.
    StandBy { holder: String, until: Timestamp },
}

/// Why a [`Step::Write`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Nobody holds the lease.
    Acquire,
    /// This controller holds it.
    Renew,
    /// Its holder did not renew it in time.
    TakeOver { from: String },
}

/// Who holds the lease; an empty holder is none.
pub fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// Until when the lease holds unless renewed: its last renewal (or acquisition) and its
/// duration. `None` when it says neither, so it holds for nobody.
pub fn expiry(spec: &LeaseSpec) -> Option<Timestamp> {
    let since = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    Some(
        since
            .checked_add(SignedDuration::from_secs(seconds))
            .unwrap_or(Timestamp::MAX),
    )
}

/// How long a standby waits before it reads the lease again: `retry`, or less when the lease
/// runs out sooner, so that a dead leader's lease is taken the moment it expires and not up to
/// a `retry` later. A few milliseconds past the expiry, so that the next read finds it expired.
pub fn stand_by_for(until: Timestamp, now: Timestamp, retry: Duration) -> Duration {
    const PAST_EXPIRY: Duration = Duration::from_millis(20);
    let left = until
        .duration_since(now)
        .try_into()
        .unwrap_or(Duration::ZERO);
    (left + PAST_EXPIRY).min(retry)
}

/// What `identity` does at `now` about `lease` (`None`: there is none), with leases of
/// `duration_seconds`.
pub fn plan(lease: Option<&Lease>, now: Timestamp, identity: &str, duration_seconds: i32) -> Step {
    let Some(lease) = lease else {
        return Step::Create(Lease {
            metadata: ObjectMeta::default(),
            spec: Some(taken(None, now, identity, duration_seconds, 0)),
        });
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let write = |take, spec| {
        Step::Write(
            take,
            Lease {
                metadata: lease.metadata.clone(),
                spec: Some(spec),
            },
        )
    };
    let transitions = spec.lease_transitions.unwrap_or(0);
    match holder(&spec) {
        None => {
            let next = taken(
                Some(&spec),
                now,
                identity,
                duration_seconds,
                transitions + 1,
            );
            write(Take::Acquire, next)
        }
        Some(current) if current == identity => {
            let renewed = LeaseSpec {
                renew_time: Some(MicroTime(now)),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: spec.acquire_time.clone().or(Some(MicroTime(now))),
                ..spec.clone()
            };
            write(Take::Renew, renewed)
        }
        Some(current) => match expiry(&spec) {
            Some(until) if now < until => Step::StandBy {
                holder: current.to_owned(),
                until,
            },
            _ => {
                let from = current.to_owned();
                let next = taken(
                    Some(&spec),
                    now,
                    identity,
                    duration_seconds,
                    transitions + 1,
                );
                write(Take::TakeOver { from }, next)
            }
        },
    }
}

/// The lease held by `identity` from `now`; what else `previous` says stays.
fn taken(
    previous: Option<&LeaseSpec>,
    now: Timestamp,
    identity: &str,
    duration_seconds: i32,
    transitions: i32,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(duration_seconds),
        lease_transitions: Some(transitions),
        ..previous.cloned().unwrap_or_default()
    }
}

/// The lease handed back by `identity`: no holder, so a standby takes it at once. `None` when
/// `identity` does not hold it.
pub fn released(lease: &Lease, identity: &str) -> Option<Lease> {
    let spec = lease.spec.as_ref()?;
    if holder(spec) != Some(identity) {
        return None;
    }
    Some(Lease {
        metadata: lease.metadata.clone(),
        spec: Some(LeaseSpec {
            holder_identity: None,
            acquire_time: None,
            renew_time: None,
            ..spec.clone()
        }),
    })
}

/// The namespace of the lease: `--leader-namespace`, else the pod's own namespace, else
/// `--namespace`, else `default`.
pub fn lease_namespace(
    explicit: Option<&str>,
    in_cluster: Option<&str>,
    watched: Option<&str>,
) -> String {
    [explicit, in_cluster, watched]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|n| !n.is_empty())
        .unwrap_or("default")
        .to_owned()
}

/// This process among the replicas: its host name (a pod's name) and pid.
pub fn default_identity(hostname: Option<&str>, pid: u32) -> String {
    let host = hostname
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .unwrap_or("agentops");
    format!("{host}-{pid}")
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
}

/// Whether `name` can name a Lease: a DNS subdomain (lowercase letters, digits, `-` and `.`,
/// starting and ending with a letter or digit, at most 253 characters).
pub fn valid_lease_name(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    name.len() <= 253
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// What one read-and-write of a standby came to.
enum Attempt {
    Led,
    /// Another controller wrote the lease in between: read it again.
    Conflict,
    StandBy {
        holder: String,
        until: Timestamp,
    },
}

/// What one renewal came to.
enum Renewal {
    Renewed,
    /// Changed by someone else at every try: not renewed this time.
    Conflicted,
    /// The lease has another holder, or none.
    Lost(String),
}

/// The leader lease of one controller.
pub struct KubeLease {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    timing: Timing,
    /// The lease as this controller last wrote it, and when that write was sent.
    held: Option<(Lease, Instant)>,
}

impl KubeLease {
    pub fn new(
        client: kube::Client,
        leader: &LeaderArgs,
        kube: &KubeArgs,
    ) -> Result<KubeLease, LeaderError> {
        let timing = Timing::new(
            leader.leader_lease_duration,
            leader.leader_renew,
            leader.leader_retry,
        )?;
        if !valid_lease_name(&leader.leader_lock) {
            return Err(LeaderError::Setting {
                flag: "--leader-lock",
                value: leader.leader_lock.clone(),
                reason: "a Lease name is lowercase letters, digits, '-' and '.', starting and \
                         ending with a letter or digit",
            });
        }
        let in_cluster = std::fs::read_to_string(IN_CLUSTER_NAMESPACE).ok();
        let namespace = lease_namespace(
            leader.leader_namespace.as_deref(),
            in_cluster.as_deref(),
            kube.namespace.as_deref(),
        );
        let identity = match leader.leader_identity.as_deref().map(str::trim) {
            Some(identity) if !identity.is_empty() => identity.to_owned(),
            _ => default_identity(hostname().as_deref(), std::process::id()),
        };
        Ok(KubeLease {
            api: Api::namespaced(client, &namespace),
            name: leader.leader_lock.clone(),
            namespace,
            identity,
            timing,
            held: None,
        })
    }

    /// `namespace/name`, for messages.
    pub fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn api_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::KubeApi {
            lease: self.lease(),
            source,
        }
    }

    /// Wait until this controller holds the lease. `Ok(false)` when `shutdown` came first.
    /// An API that cannot be reached before anything was read is an error; afterwards it is
    /// retried like a held lease.
    pub async fn acquire(
        &mut self,
        shutdown: &CancellationToken,
        standing_by: impl FnOnce(),
    ) -> Result<bool, LeaderError> {
        let mut standing_by = Some(standing_by);
        loop {
            let mut wait = self.timing.retry;
            match self.attempt().await {
                Ok(Attempt::Led) => return Ok(true),
                Ok(Attempt::Conflict) => continue,
                Ok(Attempt::StandBy { holder, until }) => {
                    wait = stand_by_for(until, Timestamp::now(), self.timing.retry);
                    if let Some(first) = standing_by.take() {
                        tracing::info!(
                            lease = %self.lease(),
                            %holder,
                            %until,
                            identity = %self.identity,
                            "the leader lease is held"
                        );
                        first();
                    }
                }
                Err(e) if standing_by.is_none() => {
                    tracing::warn!(
                        lease = %self.lease(),
                        error = %crate::error_chain(&e),
                        "cannot read or write the leader lease; retrying"
                    );
                }
                Err(e) => return Err(self.api_error(e)),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Read the lease and take it if [`plan`] says so.
    async fn attempt(&mut self) -> Result<Attempt, kube::Error> {
        let read = self.api.get_opt(&self.name).await?;
        let sent = Instant::now();
        let step = plan(
            read.as_ref(),
            Timestamp::now(),
            &self.identity,
            self.timing.duration_seconds(),
        );
        let (written, take) = match step {
            Step::StandBy { holder, until } => return Ok(Attempt::StandBy { holder, until }),
            Step::Create(mut lease) => {
                lease.metadata.name = Some(self.name.clone());
                (self.api.create(&PostParams::default(), &lease).await, None)
            }
            Step::Write(take, lease) => (
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await,
                Some(take),
            ),
        };
        match written {
            Ok(lease) => {
                tracing::info!(
                    lease = %self.lease(),
                    identity = %self.identity,
                    how = match &take {
                        None => "created",
                        Some(Take::Acquire) => "acquired",
                        Some(Take::Renew) => "renewed its own",
                        Some(Take::TakeOver { .. }) => "took over an expired",
                    },
                    from = match &take {
                        Some(Take::TakeOver { from }) => from.as_str(),
                        _ => "",
                    },
                    "holding the leader lease"
                );
                self.held = Some((lease, sent));
                Ok(Attempt::Led)
            }
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                Ok(Attempt::Conflict)
            }
            Err(e) => Err(e),
        }
    }

    /// Renew the lease from a task of its own until leadership is lost (reported on `lost`)
    /// or `release` asks to hand it back.
    pub async fn keep(
        mut self,
        lost: tokio::sync::oneshot::Sender<LeaderError>,
        release: CancellationToken,
    ) {
        let Some((mut lease, mut renewed)) = self.held.take() else {
            let _ = lost.send(LeaderError::Replaced {
                lease: self.lease(),
                holder: "nobody: it was never taken".into(),
            });
            return;
        };
        let mut next = renewed + self.timing.retry;
        loop {
            let deadline = renewed + self.timing.renew;
            tokio::select! {
                () = release.cancelled() => {
                    self.release(lease).await;
                    return;
                }
                () = tokio::time::sleep_until(next.min(deadline)) => {}
            }
            let sent = Instant::now();
            let outcome = if sent >= deadline {
                None
            } else {
                tokio::time::timeout_at(deadline, self.renew(&mut lease))
                    .await
                    .ok()
            };
            match outcome {
                Some(Ok(Renewal::Renewed)) => {
                    renewed = sent;
                    next = sent + self.timing.retry;
                }
                Some(Ok(Renewal::Lost(holder))) => {
                    let _ = lost.send(LeaderError::Replaced {
                        lease: self.lease(),
                        holder,
                    });
                    return;
                }
                Some(Ok(Renewal::Conflicted)) => {
                    tracing::warn!(lease = %self.lease(), "the leader lease changed while renewing it; retrying");
                    next = Instant::now() + self.timing.retry;
                }
                Some(Err(e)) => {
                    tracing::warn!(
                        lease = %self.lease(),
                        error = %crate::error_chain(&e),
                        "cannot renew the leader lease; retrying"
                    );
                    next = Instant::now() + self.timing.retry;
                }
                None => {
                    let _ = lost.send(LeaderError::NotRenewed {
                        lease: self.lease(),
                        within: self.timing.renew,
                    });
                    return;
                }
            }
        }
    }

    /// One renewal of `lease`, which this controller wrote last. On a conflict the lease is
    /// read again: still held by this controller (someone changed something else), it is
    /// renewed at the new version; held by another, or by nobody, leadership is lost.
    async fn renew(&self, lease: &mut Lease) -> Result<Renewal, kube::Error> {
        let mut current = lease.clone();
        for _ in 0..2 {
            let step = plan(
                Some(&current),
                Timestamp::now(),
                &self.identity,
                self.timing.duration_seconds(),
            );
            let next = match step {
                Step::Write(Take::Renew, next) => next,
                Step::StandBy { holder, .. } | Step::Write(Take::TakeOver { from: holder }, _) => {
                    return Ok(Renewal::Lost(holder));
                }
                Step::Create(_) | Step::Write(Take::Acquire, _) => {
                    return Ok(Renewal::Lost("nobody".into()));
                }
            };
            match self
                .api
                .replace(&self.name, &PostParams::default(), &next)
                .await
            {
                Ok(written) => {
                    *lease = written;
                    return Ok(Renewal::Renewed);
                }
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    match self.api.get_opt(&self.name).await? {
                        Some(read) => current = read,
                        None => return Ok(Renewal::Lost("nobody: the lease was deleted".into())),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        *lease = current;
        Ok(Renewal::Conflicted)
    }

    /// Hand the lease back: no holder, at the version last written or read.
    async fn release(&self, lease: Lease) {
        let handing_back = async {
            let mut current = lease;
            for _ in 0..2 {
                let Some(next) = released(&current, &self.identity) else {
                    return Ok(false);
                };
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &next)
                    .await
                {
                    Ok(_) => return Ok(true),
                    Err(kube::Error::Api(status)) if status.is_conflict() => {
                        match self.api.get_opt(&self.name).await? {
                            Some(read) => current = read,
                            None => return Ok(false),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(false)
        };
        match tokio::time::timeout(RELEASE_WITHIN, handing_back).await {
            Ok(Ok(true)) => tracing::info!(lease = %self.lease(), "released the leader lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(
                lease = %self.lease(),
                error = %crate::error_chain(&e),
                "cannot release the leader lease: a standby takes it once it expires"
            ),
            Err(_) => tracing::warn!(
                lease = %self.lease(),
                "releasing the leader lease timed out: a standby takes it once it expires"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "controller-a";

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    /// A lease at resourceVersion 7, held by `holder` since `acquired` and renewed at `renewed`.
    fn lease(holder: Option<&str>, acquired: i64, renewed: Option<i64>, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("agentops-controller".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                acquire_time: Some(MicroTime(at(acquired))),
                renew_time: renewed.map(|s| MicroTime(at(s))),
                lease_duration_seconds: Some(15),
                lease_transitions: Some(transitions),
                preferred_holder: Some("someone".into()),
                ..LeaseSpec::default()
            }),
        }
    }

    fn written(step: Step) -> (Take, Lease) {
        match step {
            Step::Write(take, lease) => (take, lease),
            other => panic!("not a write: {other:?}"),
        }
    }

    #[test]
    fn no_lease_is_created_held_by_this_controller() {
        let Step::Create(created) = plan(None, at(0), ME, 15) else {
            panic!("not a create");
        };
        let spec = created.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(0))));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(created.metadata.resource_version, None);
    }

    #[test]
    fn a_free_lease_is_acquired_at_the_version_read() {
        for free in [None, Some("")] {
            let (take, next) = written(plan(Some(&lease(free, 0, None, 3)), at(100), ME, 15));
            assert_eq!(take, Take::Acquire);
            assert_eq!(next.metadata.resource_version.as_deref(), Some("7"));
            let spec = next.spec.unwrap();
            assert_eq!(spec.holder_identity.as_deref(), Some(ME));
            assert_eq!(spec.acquire_time, Some(MicroTime(at(100))));
            assert_eq!(spec.renew_time, Some(MicroTime(at(100))));
            assert_eq!(spec.lease_transitions, Some(4));
            assert_eq!(spec.preferred_holder.as_deref(), Some("someone"));
        }
        let empty = Lease {
            spec: None,
            ..lease(None, 0, None, 0)
        };
        let (take, next) = written(plan(Some(&empty), at(1), ME, 15));
        assert_eq!(take, Take::Acquire);
        assert_eq!(next.spec.unwrap().lease_transitions, Some(1));
    }

    #[test]
    fn its_own_lease_is_renewed_keeping_acquisition_and_transitions() {
        let (take, next) = written(plan(
            Some(&lease(Some(ME), 10, Some(20), 2)),
            at(22),
            ME,
            15,
        ));
        assert_eq!(take, Take::Renew);
        assert_eq!(next.metadata.resource_version.as_deref(), Some("7"));
        let spec = next.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(10))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(22))));
        assert_eq!(spec.lease_transitions, Some(2));
    }

    #[test]
    fn another_holders_current_lease_is_waited_for() {
        let held = lease(Some("controller-b"), 0, Some(100), 1);
        for now in [100, 107, 114] {
            assert_eq!(
                plan(Some(&held), at(now), ME, 15),
                Step::StandBy {
                    holder: "controller-b".into(),
                    until: at(115),
                },
                "at {now}"
            );
        }
    }

    #[test]
    fn a_lease_not_renewed_for_its_duration_is_taken_over() {
        let held = lease(Some("controller-b"), 0, Some(100), 1);
        for now in [115, 400] {
            let (take, next) = written(plan(Some(&held), at(now), ME, 15));
            assert_eq!(
                take,
                Take::TakeOver {
                    from: "controller-b".into()
                }
            );
            let spec = next.spec.unwrap();
            assert_eq!(spec.holder_identity.as_deref(), Some(ME));
            assert_eq!(spec.acquire_time, Some(MicroTime(at(now))));
            assert_eq!(spec.lease_transitions, Some(2));
        }
        // Acquired but never renewed: it runs from its acquisition.
        let acquired_only = lease(Some("controller-b"), 100, None, 0);
        assert!(matches!(
            plan(Some(&acquired_only), at(110), ME, 15),
            Step::StandBy { .. }
        ));
        assert!(matches!(
            plan(Some(&acquired_only), at(116), ME, 15),
            Step::Write(Take::TakeOver { .. }, _)
        ));
        // A holder without any time, or without a duration, holds nothing.
        let timeless = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some("controller-b".into()),
                ..LeaseSpec::default()
            }),
            ..lease(None, 0, None, 0)
        };
        assert!(matches!(
            plan(Some(&timeless), at(0), ME, 15),
            Step::Write(Take::TakeOver { .. }, _)
        ));
        let mut no_duration = lease(Some("controller-b"), 0, Some(100), 0);
        no_duration.spec.as_mut().unwrap().lease_duration_seconds = None;
        assert!(matches!(
            plan(Some(&no_duration), at(100), ME, 15),
            Step::Write(Take::TakeOver { .. }, _)
        ));
    }

    #[test]
    fn a_leader_gives_up_before_any_standby_may_take_over() {
        let timing = Timing::new(
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .unwrap();
        // Renewed at 100: the leader leads until 110 at the latest, a standby waits until 115.
        let held = lease(Some("controller-b"), 0, Some(100), 0);
        let gives_up = 100 + timing.renew.as_secs() as i64;
        for now in 100..=gives_up {
            assert!(
                matches!(
                    plan(Some(&held), at(now), ME, timing.duration_seconds()),
                    Step::StandBy { .. }
                ),
                "at {now}"
            );
        }
    }

    #[test]
    fn a_standby_reads_again_when_the_lease_runs_out_if_that_is_sooner() {
        let retry = Duration::from_secs(2);
        assert_eq!(
            stand_by_for(at(115), at(100), retry),
            retry,
            "held for long"
        );
        assert_eq!(
            stand_by_for(at(115), at(114), retry),
            Duration::from_millis(1020),
            "just past the expiry"
        );
        assert_eq!(
            stand_by_for(at(115), at(120), retry),
            Duration::from_millis(20),
            "already expired"
        );
    }

    #[test]
    fn a_far_future_renewal_does_not_overflow() {
        let mut held = lease(Some("controller-b"), 0, None, 0);
        held.spec.as_mut().unwrap().renew_time = Some(MicroTime(Timestamp::MAX));
        assert_eq!(
            plan(Some(&held), at(0), ME, 15),
            Step::StandBy {
                holder: "controller-b".into(),
                until: Timestamp::MAX,
            }
        );
    }

    #[test]
    fn only_the_holder_releases_and_it_clears_the_holder() {
        let held = lease(Some(ME), 10, Some(20), 2);
        let free = released(&held, ME).expect("released");
        assert_eq!(free.metadata.resource_version.as_deref(), Some("7"));
        let spec = free.spec.unwrap();
        assert_eq!(spec.holder_identity, None);
        assert_eq!(spec.acquire_time, None);
        assert_eq!(spec.renew_time, None);
        assert_eq!(spec.lease_transitions, Some(2));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(released(&held, "controller-b"), None);
        assert_eq!(released(&lease(None, 0, None, 0), ME), None);
        // Released, the next reader acquires it at once.
        let mut after = lease(None, 0, None, 2);
        after.spec = Some(spec);
        assert!(matches!(
            plan(Some(&after), at(21), "controller-b", 15),
            Step::Write(Take::Acquire, _)
        ));
    }

    #[test]
    fn the_lease_namespace_is_the_flag_then_the_pod_then_the_watched_one() {
        assert_eq!(
            lease_namespace(Some("ops"), Some("pod\n"), Some("w")),
            "ops"
        );
        assert_eq!(lease_namespace(None, Some("pod\n"), Some("w")), "pod");
        assert_eq!(lease_namespace(None, None, Some("w")), "w");
        assert_eq!(lease_namespace(Some(" "), Some(""), None), "default");
        assert_eq!(lease_namespace(None, None, None), "default");
    }

    #[test]
    fn the_default_identity_is_the_host_and_the_pid() {
        assert_eq!(
            default_identity(Some("agentops-7d9f\n"), 1),
            "agentops-7d9f-1"
        );
        assert_eq!(default_identity(None, 42), "agentops-42");
        assert_eq!(default_identity(Some(""), 42), "agentops-42");
    }

    #[test]
    fn lease_names_are_dns_subdomains() {
        for good in ["agentops-controller", "team.b", "a", "x1"] {
            assert!(valid_lease_name(good), "{good}");
        }
        for bad in ["", "Team", "team_b", "-a", "a-", "a b", &"a".repeat(254)] {
            assert!(!valid_lease_name(bad), "{bad}");
        }
    }

    #[test]
    fn timings_that_could_let_two_lead_are_refused_naming_the_flag() {
        let s = Duration::from_secs;
        assert!(Timing::new(s(15), s(10), s(2)).is_ok());
        let refused = |d, r, t| Timing::new(d, r, t).unwrap_err().to_string();
        let e = refused(s(15), s(15), s(2));
        assert!(e.starts_with("--leader-renew 15s: must be shorter"), "{e}");
        let e = refused(s(15), s(10), s(10));
        assert!(e.starts_with("--leader-retry 10s: must be"), "{e}");
        let e = refused(s(15), s(10), s(0));
        assert!(e.starts_with("--leader-retry 0s: must be"), "{e}");
        let e = refused(
            Duration::from_millis(1500),
            s(1),
            Duration::from_millis(500),
        );
        assert!(
            e.starts_with("--leader-lease-duration 1s 500ms: must be whole seconds"),
            "{e}"
        );
        let e = refused(s(0), s(0), s(0));
        assert!(e.starts_with("--leader-lease-duration 0s"), "{e}");
    }
}
