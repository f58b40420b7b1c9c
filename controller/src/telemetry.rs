//! Internal events of sync, write-back, reviews, the forge, the bus and presence.
//!
//! Each event is a typed value whose [`InternalEvent::emit`] logs it with fields and counts it
//! on `/metrics`; failures are counted by the `metric_label()` of their error, so a dashboard
//! can tell a refused push from an unreachable database without parsing log lines.
//!
//! The counters are process-wide ([`telemetry`]): the parts that emit them (the syncer, the
//! status writer, the forge client) are built by several commands, and threading a registry
//! through each would buy nothing a process does not already have one of.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::bus::BusError;
use crate::forge::ForgeError;
use crate::presence::PresenceError;
use crate::reconcile::sync::{SyncError, SyncReport};
use crate::source::SourceError;
use crate::store::StoreError;
use crate::writeback::{ReviewReport, WritebackError};

/// Something that happened inside the controller, logged and counted in one place.
pub trait InternalEvent {
    fn emit(self);
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    what: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

/// The counters behind `/metrics` for everything but dispatch (which has its own).
pub struct Telemetry {
    sync_duration: Histogram,
    syncs: Counter,
    sync_errors: Family<ReasonLabel, Counter>,
    sync_files_parsed: Counter,
    sync_object_writes: Counter,
    sync_invalid: Gauge,
    writeback_commits: Family<KindLabel, Counter>,
    writeback_errors: Family<ReasonLabel, Counter>,
    push_refusals: Family<RefusalLabel, Counter>,
    reviews: Family<OutcomeLabel, Counter>,
    review_errors: Counter,
    forge_requests: Family<StatusLabel, Counter>,
    leader: Gauge,
    leadership_lost: Counter,
    registrations_refused: Family<ReasonLabel, Counter>,
    bus_publish_errors: Family<ReasonLabel, Counter>,
    bus_reconnects: Counter,
    presence_errors: Family<ReasonLabel, Counter>,
    api_refusals: Family<ReasonLabel, Counter>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            // 1 ms to about 65 s.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            syncs: Counter::default(),
            sync_errors: Family::default(),
            sync_files_parsed: Counter::default(),
            sync_object_writes: Counter::default(),
            sync_invalid: Gauge::default(),
            writeback_commits: Family::default(),
            writeback_errors: Family::default(),
            push_refusals: Family::default(),
            reviews: Family::default(),
            review_errors: Counter::default(),
            forge_requests: Family::default(),
            leader: Gauge::default(),
            leadership_lost: Counter::default(),
            registrations_refused: Family::default(),
            bus_publish_errors: Family::default(),
            bus_reconnects: Counter::default(),
            presence_errors: Family::default(),
            api_refusals: Family::default(),
        }
    }
}

static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(Telemetry::default);

/// The process's counters.
pub fn telemetry() -> &'static Telemetry {
    &TELEMETRY
}

impl Telemetry {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "agentops_sync_duration_seconds",
            "How long a sync took, from fetching to the store's commit",
            self.sync_duration.clone(),
        );
        r.register(
            "agentops_syncs",
            "Syncs that reached the store",
            self.syncs.clone(),
        );
        r.register(
            "agentops_sync_errors",
            "Syncs that failed, by reason",
            self.sync_errors.clone(),
        );
        r.register(
            "agentops_sync_files_parsed",
            "Spec files read and parsed by syncs",
            self.sync_files_parsed.clone(),
        );
        r.register(
            "agentops_sync_object_writes",
            "Rows created, updated, pruned or flagged by syncs",
            self.sync_object_writes.clone(),
        );
        r.register(
            "agentops_sync_invalid",
            "Problems (path:line:column) in the source at the last synced revision",
            self.sync_invalid.clone(),
        );
        r.register(
            "agentops_writeback_commits",
            "Commits the controller pushed, by kind (status, result, proposal)",
            self.writeback_commits.clone(),
        );
        r.register(
            "agentops_writeback_errors",
            "Status flushes that failed, by reason",
            self.writeback_errors.clone(),
        );
        r.register(
            "agentops_push_refusals",
            "Pushes that did not land (retried), by what was pushed and why",
            self.push_refusals.clone(),
        );
        r.register(
            "agentops_reviews",
            "Outputs in review that moved, by outcome",
            self.reviews.clone(),
        );
        r.register(
            "agentops_review_check_errors",
            "Review checks that failed",
            self.review_errors.clone(),
        );
        r.register(
            "agentops_forge_requests",
            "Requests to the forge's API, by HTTP status",
            self.forge_requests.clone(),
        );
        r.register(
            "agentops_leader",
            "1 while this controller leads (syncs, dispatches, writes back), 0 while it stands by",
            self.leader.clone(),
        );
        r.register(
            "agentops_leadership_lost",
            "Times this controller stopped leading because its leader lock failed",
            self.leadership_lost.clone(),
        );
        r.register(
            "agentops_registrations_refused",
            "Agent registrations refused, by reason",
            self.registrations_refused.clone(),
        );
        r.register(
            "agentops_bus_publish_errors",
            "Publishes to the bus (NATS) that failed, by reason",
            self.bus_publish_errors.clone(),
        );
        r.register(
            "agentops_bus_reconnects",
            "Times the bus client connected to NATS again after losing its connection",
            self.bus_reconnects.clone(),
        );
        r.register(
            "agentops_presence_errors",
            "Presence (Redis) calls that failed or timed out, by reason",
            self.presence_errors.clone(),
        );
        r.register(
            "agentops_api_refusals",
            "Agent requests refused (bad token, not the holder, over a limit, invalid \
             proposal), by reason",
            self.api_refusals.clone(),
        );
    }
}

impl SourceError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            SourceError::Git { .. } => "git",
            SourceError::Fetch { .. } => "fetch",
            SourceError::NoBranch { .. } => "no_branch",
            SourceError::NoPath { .. } => "no_path",
            SourceError::NoRevision { .. } => "no_revision",
            SourceError::Io { .. } => "io",
            SourceError::NotADirectory(_) => "not_a_directory",
            SourceError::Watch { .. } => "watch",
            SourceError::Worker(_) => "worker",
        }
    }
}

impl StoreError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Connect { .. } => "store_connect",
            StoreError::Migrate(_) => "store_migrate",
            StoreError::Query { .. } => "store_query",
            StoreError::Corrupt(_) => "store_corrupt",
            StoreError::UnsupportedUrl(_) => "store_url",
            StoreError::Batch(_) => "store_batch",
            StoreError::Objects(_) => "store_objects",
            StoreError::Statement(_) => "store_statement",
        }
    }
}

impl SyncError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            SyncError::Source(e) => e.metric_label(),
            SyncError::Store(e) => e.metric_label(),
        }
    }
}

impl ForgeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ForgeError::Unauthorized { .. } => "unauthorized",
            ForgeError::Forbidden { .. } => "forbidden",
            ForgeError::RateLimited { .. } => "rate_limited",
            ForgeError::Unprocessable { .. } => "unprocessable",
            ForgeError::Status { .. } => "status",
            ForgeError::Transport { .. } => "transport",
            ForgeError::Decode { .. } => "decode",
            ForgeError::NoRepository(_) => "no_repository",
            ForgeError::BadUrl(_) => "bad_url",
            ForgeError::Branch(_) => "branch",
        }
    }
}

impl BusError {
    pub fn metric_label(&self) -> &'static str {
        use async_nats::jetstream::context::PublishErrorKind;
        match self {
            BusError::Connect { .. } => "connect",
            BusError::Stream { .. } => "stream",
            BusError::Publish { source, .. } => match source.kind() {
                PublishErrorKind::StreamNotFound => "no_stream",
                PublishErrorKind::TimedOut => "timeout",
                PublishErrorKind::BrokenPipe => "broken_pipe",
                PublishErrorKind::MaxPayloadExceeded => "too_large",
                PublishErrorKind::MaxAckPending => "max_ack_pending",
                _ => "publish",
            },
            BusError::Encode(_) => "encode",
        }
    }
}

impl PresenceError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            PresenceError::Url { .. } => "url",
            PresenceError::Redis { .. } => "redis",
            PresenceError::Timeout { .. } => "timeout",
        }
    }
}

impl WritebackError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            WritebackError::Git { .. } => "git",
            WritebackError::Source(e) => e.metric_label(),
            WritebackError::Store(e) => e.metric_label(),
            WritebackError::Path(_) => "path",
            WritebackError::Push { .. } => "push",
            WritebackError::Forge(e) => e.metric_label(),
            WritebackError::Worker(_) => "worker",
        }
    }
}

/// A sync reached the store.
pub struct SyncCompleted<'a> {
    pub source: &'a str,
    pub report: &'a SyncReport,
    pub took: Duration,
}

impl InternalEvent for SyncCompleted<'_> {
    fn emit(self) {
        let t = telemetry();
        t.syncs.inc();
        t.sync_duration.observe(self.took.as_secs_f64());
        t.sync_files_parsed.inc_by(self.report.files_parsed as u64);
        t.sync_object_writes
            .inc_by(self.report.object_writes as u64);
        t.sync_invalid.set(self.report.diagnostics.len() as i64);
        tracing::debug!(
            source = self.source,
            revision = %self.report.revision,
            files_parsed = self.report.files_parsed,
            object_writes = self.report.object_writes,
            events = self.report.events,
            invalid = self.report.diagnostics.len(),
            took_ms = self.took.as_millis() as u64,
            "synced"
        );
    }
}

/// A sync failed; the store is as it was.
pub struct SyncFailed<'a> {
    pub source: &'a str,
    pub error: &'a SyncError,
}

impl InternalEvent for SyncFailed<'_> {
    fn emit(self) {
        let reason = self.error.metric_label();
        telemetry()
            .sync_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::error!(
            source = self.source,
            reason,
            error = %crate::error_chain(self.error),
            "sync failed"
        );
    }
}

/// What the controller commits and pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    Status,
    Result,
    Proposal,
}

impl CommitKind {
    fn label(self) -> &'static str {
        match self {
            CommitKind::Status => "status",
            CommitKind::Result => "result",
            CommitKind::Proposal => "proposal",
        }
    }
}

/// A commit of the controller's landed on the remote.
pub struct CommitPushed<'a> {
    pub kind: CommitKind,
    pub branch: &'a str,
    pub commit: git2::Oid,
}

impl InternalEvent for CommitPushed<'_> {
    fn emit(self) {
        let kind = self.kind.label();
        telemetry()
            .writeback_commits
            .get_or_create(&KindLabel { kind })
            .inc();
        tracing::info!(kind, branch = self.branch, commit = %self.commit, "pushed");
    }
}

/// One push did not land; it is retried on a fresh head.
pub struct PushRefused<'a> {
    pub kind: CommitKind,
    pub branch: &'a str,
    pub attempt: u32,
    /// `rejected` (the remote refused the ref), `failed` (it did not get through) or
    /// `local_edits` (a checked-out repository has edits in the files it would refresh).
    pub reason: &'static str,
    pub message: &'a str,
}

impl InternalEvent for PushRefused<'_> {
    fn emit(self) {
        let what = self.kind.label();
        telemetry()
            .push_refusals
            .get_or_create(&RefusalLabel {
                what,
                reason: self.reason,
            })
            .inc();
        tracing::warn!(
            what,
            branch = self.branch,
            attempt = self.attempt,
            reason = self.reason,
            "push did not land: {}",
            self.message
        );
    }
}

/// A status flush failed; the next one tries again.
pub struct StatusNotCommitted<'a> {
    pub error: &'a WritebackError,
}

impl InternalEvent for StatusNotCommitted<'_> {
    fn emit(self) {
        let reason = self.error.metric_label();
        telemetry()
            .writeback_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::warn!(reason, error = %crate::error_chain(self.error), "status not committed");
    }
}

/// A pass over the outputs in review.
pub struct ReviewsChecked<'a> {
    pub report: &'a ReviewReport,
}

impl InternalEvent for ReviewsChecked<'_> {
    fn emit(self) {
        let r = self.report;
        let t = telemetry();
        for (outcome, n) in [
            ("proposed", r.proposed),
            ("merged", r.merged),
            ("retried", r.retried),
            ("failed", r.failed),
            ("error", r.errors),
        ] {
            if n > 0 {
                t.reviews
                    .get_or_create(&OutcomeLabel { outcome })
                    .inc_by(n as u64);
            }
        }
        if *r != ReviewReport::default() {
            tracing::info!(
                proposed = r.proposed,
                merged = r.merged,
                retried = r.retried,
                failed = r.failed,
                errors = r.errors,
                "reviews"
            );
        }
    }
}

/// A pass over the outputs in review could not run.
pub struct ReviewCheckFailed<'a> {
    pub error: &'a WritebackError,
}

impl InternalEvent for ReviewCheckFailed<'_> {
    fn emit(self) {
        telemetry().review_errors.inc();
        tracing::warn!(
            reason = self.error.metric_label(),
            error = %crate::error_chain(self.error),
            "review check failed"
        );
    }
}

/// The forge's API answered.
pub struct ForgeResponded<'a> {
    pub what: &'a str,
    pub status: u16,
}

impl InternalEvent for ForgeResponded<'_> {
    fn emit(self) {
        telemetry()
            .forge_requests
            .get_or_create(&StatusLabel {
                status: self.status.to_string(),
            })
            .inc();
        tracing::debug!(what = self.what, status = self.status, "forge answered");
    }
}

/// Another controller leads: this one serves health and metrics and waits.
pub struct StandingBy<'a> {
    pub lock: &'a str,
}

impl InternalEvent for StandingBy<'_> {
    fn emit(self) {
        telemetry().leader.set(0);
        tracing::info!(lock = self.lock, "standing by: another controller leads");
    }
}

/// This controller took the lead.
pub struct Leading<'a> {
    pub lock: &'a str,
}

impl InternalEvent for Leading<'_> {
    fn emit(self) {
        telemetry().leader.set(1);
        tracing::info!(lock = self.lock, "leading");
    }
}

/// The leader lock failed: this controller stops leading.
pub struct LeadershipLost<'a> {
    pub error: &'a crate::runtime::leader::LeaderError,
}

impl InternalEvent for LeadershipLost<'_> {
    fn emit(self) {
        telemetry().leader.set(0);
        telemetry().leadership_lost.inc();
        tracing::error!(
            reason = self.error.metric_label(),
            error = %crate::error_chain(self.error),
            "leadership lost: stopping"
        );
    }
}

/// A registration did not present what enrollment asks for.
pub struct RegistrationRefused<'a> {
    pub refused: crate::api::enroll::Refused,
    pub name: &'a str,
    pub peer: Option<std::net::SocketAddr>,
}

impl InternalEvent for RegistrationRefused<'_> {
    fn emit(self) {
        let reason = self.refused.metric_label();
        telemetry()
            .registrations_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::warn!(
            name = self.name,
            peer = ?self.peer,
            reason,
            "agent registration refused"
        );
    }
}

/// The NATS client's connection changed, or it reported something.
pub enum BusConnection<'a> {
    Connected {
        url: &'a str,
        again: bool,
    },
    Disconnected {
        url: &'a str,
    },
    Other {
        url: &'a str,
        event: &'a async_nats::Event,
    },
}

impl InternalEvent for BusConnection<'_> {
    fn emit(self) {
        match self {
            BusConnection::Connected { url, again } => {
                if again {
                    telemetry().bus_reconnects.inc();
                }
                tracing::info!(%url, again, "NATS connected");
            }
            BusConnection::Disconnected { url } => {
                tracing::warn!(%url, "NATS disconnected; reconnecting");
            }
            BusConnection::Other { url, event } => tracing::debug!(%url, %event, "NATS"),
        }
    }
}

/// A batch of messages did not all reach the bus. Its caller (the relay, the announcer) says
/// so once per outage and tries later; this counts every failure.
pub struct BusPublishFailed<'a> {
    pub bus: &'a str,
    pub messages: usize,
    pub error: &'a BusError,
}

impl InternalEvent for BusPublishFailed<'_> {
    fn emit(self) {
        let reason = self.error.metric_label();
        telemetry()
            .bus_publish_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::debug!(
            bus = self.bus,
            messages = self.messages,
            reason,
            error = %crate::error_chain(self.error),
            "bus publish failed"
        );
    }
}

/// A presence call failed or timed out. Its caller carries on without the answer and says so
/// once per outage; this counts every failure.
pub struct PresenceFailed<'a> {
    pub presence: &'a str,
    pub error: &'a PresenceError,
}

impl InternalEvent for PresenceFailed<'_> {
    fn emit(self) {
        let reason = self.error.metric_label();
        telemetry()
            .presence_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::debug!(
            presence = self.presence,
            reason,
            error = %crate::error_chain(self.error),
            "presence call failed"
        );
    }
}

/// An agent request was refused: its token, its lease, a limit or its content.
pub struct ApiRefused<'a> {
    /// `unauthorized`, `not_held`, `body_size`, `rate`, `proposal_invalid`, …
    pub reason: &'static str,
    pub agent: Option<&'a str>,
    pub detail: &'a str,
}

impl InternalEvent for ApiRefused<'_> {
    fn emit(self) {
        let reason = self.reason;
        telemetry()
            .api_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::info!(
            agent = self.agent,
            reason,
            detail = self.detail,
            "agent request refused"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::presence::{Presence, RedisPresence};
    use crate::store::queue::ReadyTask;

    /// The value of one series on `/metrics`, 0 when it is not there yet.
    fn series(name: &str) -> f64 {
        let mut registry = Registry::default();
        telemetry().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn bus_and_presence_errors_are_labelled_by_kind() {
        let encode = serde_json::from_str::<u8>("x").unwrap_err();
        assert_eq!(BusError::Encode(encode).metric_label(), "encode");
        let timeout = PresenceError::Timeout {
            doing: "reading presence",
            timeout: Duration::from_millis(1),
        };
        assert_eq!(timeout.metric_label(), "timeout");
    }

    /// Nothing listens on port 1: each call fails, and is counted under its error's label.
    #[tokio::test]
    async fn a_failed_presence_call_is_counted_by_its_reason() {
        let presence = RedisPresence::connect(
            "redis://127.0.0.1:1",
            "agentops",
            Duration::from_millis(500),
        )
        .unwrap();
        let counted = |reason: &str| {
            series(&format!(
                "agentops_presence_errors_total{{reason=\"{reason}\"}}"
            ))
        };
        let before = [counted("redis"), counted("timeout")];
        let error = presence.alive(&["a".to_owned()]).await.unwrap_err();
        let reason = error.metric_label();
        let was = if reason == "redis" {
            before[0]
        } else {
            before[1]
        };
        assert!(counted(reason) > was, "{reason} not counted: {error}");
    }

    #[tokio::test]
    async fn a_failed_publish_is_counted_by_its_reason() {
        let bus = crate::bus::NatsBus::connect("nats://127.0.0.1:1", Default::default())
            .await
            .unwrap();
        let counted = || series("agentops_bus_publish_errors_total{reason=\"stream\"}");
        let before = counted();
        let ready = ReadyTask {
            pool: "p".to_owned(),
            task: uuid::Uuid::nil(),
            run_lease: 0,
        };
        let error = bus.announce(&[ready]).await.unwrap_err();
        assert_eq!(error.metric_label(), "stream", "{error}");
        assert_eq!(counted(), before + 1.0);
    }
}
