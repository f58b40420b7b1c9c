//! The dispatcher's loops that talk to the bus and to presence.
//!
//! Requests never wait on NATS or Redis: they leave a note here (a [`Notify`], an agent's
//! name in a set) and return. Three loops pick the notes up:
//!
//! - the **relay** publishes committed events from the store's outbox (`event_outbox`, which
//!   a trigger fills as `events` rows are written) and then clears them. A publish that fails
//!   is counted and tried again with backoff; the entries wait in the table meanwhile, so a
//!   NATS outage delays events but loses none. An outbox entry always makes the same messages
//!   (`BusMessage::events`), so JetStream drops those of a batch that went out before it
//!   failed.
//! - the **announcer** publishes up to [`ANNOUNCE_PER_POOL`] ready tasks per pool whenever work
//!   may be ready, and every [`ANNOUNCE_EVERY`] (a retry's backoff ends without anyone
//!   noticing). A failed announcement is counted and forgotten: it is only a hint.
//! - the **presence** loop writes agent presence and live progress, and marks agents whose
//!   presence expired `offline` (and those that came back `idle` or `busy`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::Dispatcher;
use super::metrics::{ANNOUNCEMENTS, EVENTS};
use crate::bus::{Bus, DUPLICATE_WINDOW, InProcessBus};
use crate::presence::{MemoryPresence, Presence};
use crate::store::queue::{Liveness, Mark, Outbox, Queue, ReadyTask};

/// Events read and published at a time, about: a statement's events are published together,
/// so a claim of 1,600 tasks makes a batch of 1,600.
const RELAY_BATCH: u32 = 500;
/// The relay also looks this often unprompted: events written by another process (a
/// `reconcile --once`, another controller) have nobody to prompt it.
const RELAY_EVERY: Duration = Duration::from_secs(1);
/// A relay pass that takes longer than this is abandoned and started over, and the log says
/// so. Every wait on NATS is bounded, but a pass is many waits: through a NATS restart a pass
/// once awaited 500 acknowledgements one 2 s timeout after another, silently (the bus now
/// awaits them together). This bounds any such sum.
const RELAY_PASS_LIMIT: Duration = Duration::from_secs(10);
/// At least this long between two relay passes that emptied the outbox: under load, events
/// then go out in a few large batches instead of a pass (two statements) per claim and
/// completion.
const RELAY_GAP: Duration = Duration::from_millis(20);
/// Ready tasks announced per pool and pass.
pub const ANNOUNCE_PER_POOL: u32 = 32;
/// The announcer also looks this often unprompted.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// At least this long between two announcer passes: many completions in a burst make one pass.
const ANNOUNCE_GAP: Duration = Duration::from_millis(50);
/// At most this many progress messages wait for a flush; more are dropped (they are in the
/// store anyway).
const MAX_PENDING_PROGRESS: usize = 10_000;

/// Where events and announcements go, and where presence is kept.
#[derive(Clone)]
pub struct Backends {
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
}

impl Default for Backends {
    /// The embedded ones: an in-process bus and in-memory presence.
    fn default() -> Self {
        Backends {
            bus: Arc::new(InProcessBus::default()),
            presence: Arc::new(MemoryPresence::default()),
        }
    }
}

/// The notes requests leave for the loops.
pub(super) struct Backplane {
    pub backends: Backends,
    /// Events were committed: the relay should look.
    events: Notify,
    /// Work may be ready: the announcer should look.
    ready: Notify,
    /// Someone registered: write presence now rather than at the next flush.
    flush: Notify,
    pending: Mutex<PendingPresence>,
    /// Announcements published lately, not to be sent again within the duplicate window.
    announced: Mutex<HashMap<ReadyTask, Instant>>,
}

#[derive(Default)]
struct PendingPresence {
    seen: HashSet<String>,
    progress: HashMap<Uuid, String>,
}

impl Backplane {
    pub fn new(backends: Backends) -> Backplane {
        Backplane {
            backends,
            events: Notify::new(),
            ready: Notify::new(),
            flush: Notify::new(),
            pending: Mutex::new(PendingPresence::default()),
            announced: Mutex::new(HashMap::new()),
        }
    }

    /// Events were committed.
    pub fn events(&self) {
        self.events.notify_one();
    }

    /// Work may be ready.
    pub fn ready(&self) {
        self.ready.notify_one();
    }

    /// The agent is alive (it registered, claimed or heartbeated).
    pub fn seen(&self, agent: &str) {
        let mut pending = self.pending.lock().expect("presence lock");
        if !pending.seen.contains(agent) {
            pending.seen.insert(agent.to_owned());
        }
    }

    /// The agent registered: alive, and worth writing down at once.
    pub fn registered(&self, agent: &str) {
        self.seen(agent);
        self.flush.notify_one();
    }

    /// A task's latest progress message.
    pub fn progress(&self, task: Uuid, message: &str) {
        let mut pending = self.pending.lock().expect("presence lock");
        if pending.progress.len() < MAX_PENDING_PROGRESS || pending.progress.contains_key(&task) {
            pending.progress.insert(task, message.to_owned());
        }
    }
}

/// The background loops of one dispatcher; dropping this stops them.
pub struct Background(Vec<JoinHandle<()>>);

impl Background {
    pub(super) fn of(loops: Vec<JoinHandle<()>>) -> Background {
        Background(loops)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Logs a failing dependency once when it starts failing and once when it recovers, not on
/// every attempt in between.
struct Health {
    what: &'static str,
    failing: bool,
}

impl Health {
    fn new(what: &'static str) -> Health {
        Health {
            what,
            failing: false,
        }
    }

    fn failed(&mut self, error: &(dyn std::error::Error + 'static)) {
        let error = crate::error_chain(error);
        if self.failing {
            tracing::debug!("{} still failing: {error}", self.what);
        } else {
            tracing::warn!("{} failed (carrying on without it): {error}", self.what);
        }
        self.failing = true;
    }

    fn ok(&mut self) {
        if self.failing {
            tracing::info!("{} works again", self.what);
        }
        self.failing = false;
    }
}

impl<Q: Queue + Outbox + Liveness> Dispatcher<Q> {
    /// Start the relay, the announcer and the presence loop. They run until the returned
    /// value is dropped.
    pub fn spawn_background(self: &Arc<Self>) -> Background {
        tracing::info!(
            bus = %self.backplane.backends.bus.describe(),
            presence = %self.backplane.backends.presence.describe(),
            "dispatch backends"
        );
        Background(vec![
            tokio::spawn(self.clone().run_relay()),
            tokio::spawn(self.clone().run_announcer()),
            tokio::spawn(self.clone().run_presence()),
        ])
    }

    /// Publish what is still unpublished, for at most `within`: before the process exits, so
    /// that the last completions reach the bus now rather than when a controller next runs.
    pub async fn flush_events(&self, within: Duration) {
        let mut health = Health::new("publishing events");
        let mut store_health = Health::new("reading events to publish");
        let mut after = 0;
        let flush = async {
            while let Pass::More = self
                .relay_pass(&mut after, &mut health, &mut store_health)
                .await
            {}
        };
        if tokio::time::timeout(within, flush).await.is_err() {
            tracing::warn!("events left unpublished at exit; they are published by the next run");
        }
    }

    async fn run_relay(self: Arc<Self>) {
        let mut health = Health::new("publishing events");
        let mut store_health = Health::new("reading events to publish");
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Passes read on from the last entry they published: from the start, the queue's head
        // is a run of deleted entries until vacuum clears them, and stepping over them made
        // each pass slower the busier the relay was. Every RELAY_EVERY a pass starts from the
        // beginning again, for entries of transactions that committed out of order.
        let mut after = 0;
        let mut from_start = Instant::now();
        loop {
            if from_start.elapsed() >= RELAY_EVERY {
                after = 0;
                from_start = Instant::now();
            }
            let pass = tokio::time::timeout(
                RELAY_PASS_LIMIT,
                self.relay_pass(&mut after, &mut health, &mut store_health),
            )
            .await
            .unwrap_or_else(|_| {
                health.failed(&PassHung(RELAY_PASS_LIMIT));
                Pass::Failed
            });
            match pass {
                Pass::More => continue,
                Pass::Done => backoff.reset(),
                Pass::Failed => {
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            }
            // A note left during the pass is a stored permit: it ends this wait at once.
            tokio::select! {
                () = self.backplane.events.notified() => {}
                () = tokio::time::sleep(RELAY_EVERY) => {}
            }
            tokio::time::sleep(RELAY_GAP).await;
        }
    }

    /// Publish one batch of unpublished events from the outbox entries after `after`, and move
    /// `after` past them.
    async fn relay_pass(
        &self,
        after: &mut i64,
        health: &mut Health,
        store_health: &mut Health,
    ) -> Pass {
        let batch = match self.queue.unpublished_events(*after, RELAY_BATCH).await {
            Ok(batch) => {
                store_health.ok();
                batch
            }
            Err(e) => {
                store_health.failed(&e);
                return Pass::Failed;
            }
        };
        if batch.entries.is_empty() {
            return Pass::Done;
        }
        if !batch.events.is_empty() {
            if let Err(e) = self
                .backplane
                .backends
                .bus
                .publish_events(&batch.events)
                .await
            {
                self.metrics.bus_failed(EVENTS);
                health.failed(&e);
                return Pass::Failed;
            }
            health.ok();
            self.metrics.bus_published(EVENTS, batch.events.len());
        }
        if let Err(e) = self.queue.mark_published(&batch.entries).await {
            // Published again on the next pass, and dropped by the bus as a duplicate.
            store_health.failed(&e);
            return Pass::Failed;
        }
        // Full when it reached the limit in entries (one per event on SQLite) or in events (one
        // entry per statement on Postgres).
        let full = batch.entries.len().max(batch.events.len()) >= RELAY_BATCH as usize;
        *after = batch.entries.iter().copied().max().unwrap_or(*after);
        if full { Pass::More } else { Pass::Done }
    }

    async fn run_announcer(self: Arc<Self>) {
        let mut health = Health::new("announcing ready work");
        let mut store_health = Health::new("listing ready work");
        loop {
            tokio::select! {
                () = self.backplane.ready.notified() => {}
                () = tokio::time::sleep(ANNOUNCE_EVERY) => {}
            }
            self.announce_pass(&mut health, &mut store_health).await;
            tokio::time::sleep(ANNOUNCE_GAP).await;
        }
    }

    async fn announce_pass(&self, health: &mut Health, store_health: &mut Health) {
        let ready = match self.queue.ready_tasks(ANNOUNCE_PER_POOL).await {
            Ok(ready) => {
                store_health.ok();
                ready
            }
            Err(e) => return store_health.failed(&e),
        };
        let now = Instant::now();
        let fresh: Vec<ReadyTask> = {
            let mut announced = self.backplane.announced.lock().expect("announced lock");
            announced.retain(|_, at| now.duration_since(*at) < DUPLICATE_WINDOW);
            ready
                .into_iter()
                .filter(|r| !announced.contains_key(r))
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        match self.backplane.backends.bus.announce(&fresh).await {
            Ok(()) => {
                health.ok();
                self.metrics.bus_published(ANNOUNCEMENTS, fresh.len());
                let mut announced = self.backplane.announced.lock().expect("announced lock");
                announced.extend(fresh.into_iter().map(|r| (r, now)));
            }
            Err(e) => {
                self.metrics.bus_failed(ANNOUNCEMENTS);
                health.failed(&e);
            }
        }
    }

    async fn run_presence(self: Arc<Self>) {
        let heartbeat = self.config.heartbeat;
        let mut flush = tokio::time::interval(
            (heartbeat / 4).clamp(Duration::from_millis(50), Duration::from_secs(2)),
        );
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(
            heartbeat.clamp(Duration::from_millis(200), Duration::from_secs(10)),
        );
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health = Health::new("presence");
        loop {
            tokio::select! {
                () = self.backplane.flush.notified() => self.flush_presence(&mut health).await,
                _ = flush.tick() => self.flush_presence(&mut health).await,
                _ = check.tick() => {
                    self.flush_presence(&mut health).await;
                    self.liveness_pass(&mut health).await;
                }
            }
        }
    }

    /// How long a task's live progress is kept: ten leases.
    fn progress_ttl(&self) -> Duration {
        self.config.policy.lease * 10
    }

    /// Write the presence noted since the last flush. What fails is dropped: the agent's next
    /// heartbeat notes it again.
    async fn flush_presence(&self, health: &mut Health) {
        let pending = std::mem::take(&mut *self.backplane.pending.lock().expect("presence lock"));
        let presence = &self.backplane.backends.presence;
        if !pending.seen.is_empty() {
            let seen: Vec<String> = pending.seen.into_iter().collect();
            match presence.seen(&seen, self.presence_ttl()).await {
                Ok(()) => health.ok(),
                Err(e) => {
                    self.metrics.presence_failed();
                    health.failed(&e);
                }
            }
        }
        if !pending.progress.is_empty() {
            let progress: Vec<(Uuid, String)> = pending.progress.into_iter().collect();
            match presence.set_progress(&progress, self.progress_ttl()).await {
                Ok(()) => health.ok(),
                Err(e) => {
                    self.metrics.presence_failed();
                    health.failed(&e);
                }
            }
        }
    }

    /// Bring the agents table's `status` in line with presence.
    ///
    /// An agent goes `offline` when its presence expired *and* the store has not seen it for
    /// as long either; so an empty presence (a restarted controller's memory, a flushed
    /// Redis) marks nobody offline by mistake, and without presence (Redis down) the store
    /// alone decides. An `offline` agent the store saw lately and presence holds again is
    /// `idle` or `busy` once more; one pruned from the source stays `offline`.
    async fn liveness_pass(&self, health: &mut Health) {
        let ttl = self.presence_ttl();
        let agents = match self.queue.agent_liveness().await {
            Ok(agents) => agents,
            Err(e) => {
                return tracing::warn!("reading agent liveness: {}", crate::error_chain(&e));
            }
        };
        let stale = |seen: Option<Duration>| seen.is_some_and(|s| s > ttl);
        let fresh = |seen: Option<Duration>| seen.is_some_and(|s| s <= ttl);
        let (going, coming): (Vec<_>, Vec<_>) = agents
            .into_iter()
            .filter(|a| match a.status.as_str() {
                "offline" => !a.pruned && fresh(a.last_seen),
                _ => stale(a.last_seen),
            })
            .partition(|a| a.status != "offline");
        if going.is_empty() && coming.is_empty() {
            return;
        }
        let names: Vec<String> = going
            .iter()
            .chain(coming.iter())
            .map(|a| a.name.clone())
            .collect();
        let alive = match self.backplane.backends.presence.alive(&names).await {
            Ok(alive) => {
                health.ok();
                alive
            }
            Err(e) => {
                self.metrics.presence_failed();
                health.failed(&e);
                // Without presence, the store's view decides.
                names
                    .iter()
                    .map(|n| coming.iter().any(|a| &a.name == n))
                    .collect()
            }
        };
        let alive: HashSet<&str> = names
            .iter()
            .zip(alive)
            .filter(|(_, alive)| *alive)
            .map(|(n, _)| n.as_str())
            .collect();
        let offline: Vec<String> = going
            .iter()
            .filter(|a| !alive.contains(a.name.as_str()))
            .map(|a| a.name.clone())
            .collect();
        let online: Vec<String> = coming
            .iter()
            .filter(|a| alive.contains(a.name.as_str()))
            .map(|a| a.name.clone())
            .collect();
        let mut changed = false;
        match self.queue.mark(Mark::Offline, &offline, ttl).await {
            Ok(names) if !names.is_empty() => {
                tracing::info!(agents = ?names, "agents offline: no sign of life for {ttl:?}");
                // Their tokens ended with their registration.
                self.forget_sessions(&names);
                changed = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("marking agents offline: {}", crate::error_chain(&e)),
        }
        match self.queue.mark(Mark::Online, &online, ttl).await {
            Ok(names) if !names.is_empty() => {
                tracing::info!(agents = ?names, "agents back online");
                changed = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("marking agents online: {}", crate::error_chain(&e)),
        }
        if changed {
            self.backplane.events();
        }
    }
}

enum Pass {
    /// A full batch: there may be more at once.
    More,
    Done,
    Failed,
}

#[derive(Debug, thiserror::Error)]
#[error("a pass took longer than {0:?}; it was abandoned and starts over")]
struct PassHung(Duration);

/// Exponential backoff for a loop whose dependency is failing.
struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}
