//! What `/metrics` shows about dispatch, in the Prometheus text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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

/// A batch the dispatcher wrote: `claim` or `complete`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

pub const CLAIM: &str = "claim";
pub const COMPLETE: &str = "complete";

fn op(op: &str) -> OpLabel {
    OpLabel { op: op.to_owned() }
}

/// How many batches of one kind, how many tasks they carried, and how long they took.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct BatchTotals {
    pub batches: u64,
    pub tasks: u64,
    pub seconds: f64,
}

/// Counters are cheap atomics, updated on the request path.
pub struct Metrics {
    claims: Counter,
    completions: Counter,
    failures: Counter,
    lease_expiries: Counter,
    queue_depth: Family<PoolLabel, Gauge>,
    /// Every pool that has had a depth, so an emptied one is shown as 0.
    depth_pools: std::sync::Mutex<std::collections::HashSet<String>>,
    bus_published: Family<KindLabel, Counter>,
    bus_failures: Family<KindLabel, Counter>,
    presence_failures: Counter,
    /// From ready (created, released, retried, backoff over, dependencies done) to claimed.
    pickup_latency: Histogram,
    store_batches: Family<OpLabel, Counter>,
    store_batch_tasks: Family<OpLabel, Counter>,
    store_batch_seconds: Family<OpLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            claims: Counter::default(),
            completions: Counter::default(),
            failures: Counter::default(),
            lease_expiries: Counter::default(),
            queue_depth: Family::default(),
            depth_pools: Default::default(),
            bus_published: Family::default(),
            bus_failures: Family::default(),
            presence_failures: Counter::default(),
            // 0.5 ms to about 65 s.
            pickup_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            store_batches: Family::default(),
            store_batch_tasks: Family::default(),
            store_batch_seconds: Family::default(),
        }
    }
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

    pub fn picked_up(&self, waited: std::time::Duration) {
        self.pickup_latency.observe(waited.as_secs_f64());
    }

    /// A batch of `op` ([`CLAIM`] or [`COMPLETE`]) carrying `tasks` was written in `took`.
    pub fn store_batch(&self, what: &str, tasks: usize, took: std::time::Duration) {
        let label = op(what);
        self.store_batches.get_or_create(&label).inc();
        self.store_batch_tasks
            .get_or_create(&label)
            .inc_by(tasks as u64);
        self.store_batch_seconds
            .get_or_create(&label)
            .inc_by(took.as_secs_f64());
    }

    pub fn store_batch_totals(&self, what: &str) -> BatchTotals {
        let label = op(what);
        BatchTotals {
            batches: self.store_batches.get_or_create(&label).get(),
            tasks: self.store_batch_tasks.get_or_create(&label).get(),
            seconds: self.store_batch_seconds.get_or_create(&label).get(),
        }
    }

    pub fn failed(&self) {
        self.failures.inc();
    }

    pub fn lease_expired(&self, n: usize) {
        self.lease_expiries.inc_by(n as u64);
    }

    /// Replace the per-pool depths; a pool that emptied goes to zero rather than vanishing.
    pub fn set_depth(&self, depths: &[(String, i64)]) {
        let mut pools = self.depth_pools.lock().expect("depth pools lock");
        for pool in pools.iter() {
            if !depths.iter().any(|(p, _)| p == pool) {
                self.queue_depth
                    .get_or_create(&PoolLabel { pool: pool.clone() })
                    .set(0);
            }
        }
        for (pool, depth) in depths {
            pools.insert(pool.clone());
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
            "agentops_pickup_latency_seconds",
            "Time from a task being ready to its being claimed",
            self.pickup_latency.clone(),
        );
        registry.register(
            "agentops_store_batches",
            "Claim and completion batches written to the store, by op",
            self.store_batches.clone(),
        );
        registry.register(
            "agentops_store_batch_tasks",
            "Tasks carried by claim and completion batches, by op",
            self.store_batch_tasks.clone(),
        );
        registry.register(
            "agentops_store_batch_seconds",
            "Time spent writing claim and completion batches, by op",
            self.store_batch_seconds.clone(),
        );
        registry.register(
            "agentops_presence_failures",
            "Presence (Redis) calls that failed or timed out and were done without",
            self.presence_failures.clone(),
        );
    }
}
