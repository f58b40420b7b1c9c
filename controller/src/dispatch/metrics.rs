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

/// Counters are cheap atomics, updated on the request path.
#[derive(Default)]
pub struct Metrics {
    claims: Counter,
    completions: Counter,
    failures: Counter,
    lease_expiries: Counter,
    queue_depth: Family<PoolLabel, Gauge>,
}

impl Metrics {
    pub fn claimed(&self, n: usize) {
        self.claims.inc_by(n as u64);
    }

    pub fn completed(&self, n: usize) {
        self.completions.inc_by(n as u64);
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
    }
}
