//! What `/metrics` shows about dispatch, in the Prometheus text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

/// What went on the bus: `events` or `announcements`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

pub const EVENTS: &str = "events";
pub const ANNOUNCEMENTS: &str = "announcements";

fn kind(kind: &str) -> KindLabel {
    KindLabel {
        kind: kind.to_owned(),
    }
}

/// Counters are cheap atomics, updated on the request path.
#[derive(Default)]
pub struct Metrics {
    claims: Counter,
    completions: Counter,
    failures: Counter,
    lease_expiries: Counter,
    queue_depth: Family<PoolLabel, Gauge>,
    bus_published: Family<KindLabel, Counter>,
    bus_failures: Family<KindLabel, Counter>,
    presence_failures: Counter,
}

impl Metrics {
    pub fn claimed(&self, n: usize) {
        self.claims.inc_by(n as u64);
    }

    pub fn completed(&self, n: usize) {
        self.completions.inc_by(n as u64);
    }

    /// Completions so far, for in-process observers such as the benchmark.
    pub fn completions_total(&self) -> u64 {
        self.completions.get()
    }

    pub fn failed(&self) {
        self.failures.inc();
    }

    pub fn lease_expired(&self, n: usize) {
        self.lease_expiries.inc_by(n as u64);
    }

    /// Replace the per-pool depths; a pool that emptied goes to zero rather than vanishing.
    pub fn set_depth(&self, depths: &[(String, i64)]) {
        self.queue_depth.clear();
        for (pool, depth) in depths {
            self.queue_depth
                .get_or_create(&PoolLabel { pool: pool.clone() })
                .set(*depth);
        }
    }

    /// `n` messages of `what` ([`EVENTS`] or [`ANNOUNCEMENTS`]) are on the bus.
    pub fn bus_published(&self, what: &str, n: usize) {
        self.bus_published
            .get_or_create(&kind(what))
            .inc_by(n as u64);
    }

    /// A publish of `what` failed (the batch is retried or dropped by the caller).
    pub fn bus_failed(&self, what: &str) {
        self.bus_failures.get_or_create(&kind(what)).inc();
    }

    /// A presence call failed or timed out, and was done without.
    pub fn presence_failed(&self) {
        self.presence_failures.inc();
    }

    pub fn bus_published_total(&self, what: &str) -> u64 {
        self.bus_published.get_or_create(&kind(what)).get()
    }

    pub fn bus_failures_total(&self) -> u64 {
        [EVENTS, ANNOUNCEMENTS]
            .iter()
            .map(|what| self.bus_failures.get_or_create(&kind(what)).get())
            .sum()
    }

    pub fn presence_failures_total(&self) -> u64 {
        self.presence_failures.get()
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "agentops_tasks_claimed",
            "Tasks leased to agents",
            self.claims.clone(),
        );
        registry.register(
            "agentops_tasks_completed",
            "Tasks completed by agents",
            self.completions.clone(),
        );
        registry.register(
            "agentops_tasks_failed",
            "Failures reported by agents",
            self.failures.clone(),
        );
        registry.register(
            "agentops_lease_expiries",
            "Leases that ran out before a report",
            self.lease_expiries.clone(),
        );
        registry.register(
            "agentops_queue_depth",
            "Ready tasks waiting for an agent, per pool",
            self.queue_depth.clone(),
        );
        registry.register(
            "agentops_bus_published",
            "Messages the bus accepted, by kind (events, announcements)",
            self.bus_published.clone(),
        );
        registry.register(
            "agentops_bus_publish_failures",
            "Publishes to the bus (NATS) that failed; events are retried, announcements dropped",
            self.bus_failures.clone(),
        );
        registry.register(
            "agentops_presence_failures",
            "Presence (Redis) calls that failed or timed out and were done without",
            self.presence_failures.clone(),
        );
    }
}
