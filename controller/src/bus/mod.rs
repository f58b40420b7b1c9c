//! The bus: how the controller tells the rest of the world what happened and what is ready.
//!
//! Two kinds of message go out:
//!
//! - **Events**, every `events` row, on `agentops.events.<type>` (`agentops.events.task.completed`),
//!   each row as JSON: `{"id", "type", "source_agent", "target_agent", "payload",
//!   "created_at"}`. The relay in `dispatch` publishes them from the store's outbox once they
//!   are committed. A message carries a JSON array of consecutive events of one type and one
//!   outbox entry (up to [`EVENTS_PER_MESSAGE`]), not one event: one JetStream message per
//!   event was a fifth of a dispatch run's CPU (two per task). The message id is derived from
//!   the events' ids, so events published again are dropped as duplicates
//!   ([`BusMessage::events`]).
//! - **Announcements** of ready work on `agentops.dispatch.<pool>` (the pool is the task's
//!   assignee: a role such as `seed`, or an agent's name), `{"pool", "task", "run_lease"}`
//!   with message id `<task>:<run_lease>`. They are hints: agents still claim through the
//!   protocol, which decides who gets what, so a lost or repeated announcement costs latency
//!   and never a task.
//!
//! [`NatsBus`] puts both on NATS JetStream; [`InProcessBus`] keeps them inside the process on
//! a broadcast channel, with the same subjects, bodies and de-duplication.
//!
//! `agentops` is the default prefix of every name on NATS; `--bus-prefix` changes it
//! ([`BusNames`]), so that installations (and benchmarks) sharing a server keep apart.

mod nats;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use uuid::Uuid;

pub use agentops_agents::runtime::{BusNames, DEFAULT_BUS_PREFIX};
pub use nats::NatsBus;

use crate::store::queue::{ReadyTask, StoredEvent};

/// Within this window a message id seen before is dropped (JetStream's `duplicate_window`).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// At most this many events go in one message…
pub const EVENTS_PER_MESSAGE: usize = 256;
/// …and at most this many bytes of them, unless one event alone is larger: NATS refuses a
/// message over its `max_payload`, 1 MiB by default.
pub const EVENT_MESSAGE_BYTES: usize = 512 * 1024;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot use the NATS server at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot set up the JetStream stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("cannot publish on {subject}")]
    Publish {
        subject: String,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("cannot encode a bus message")]
    Encode(#[source] serde_json::Error),
}

/// Where events and announcements go. Implementations take a whole batch and answer once the
/// bus holds all of it, or with the first error; the caller retries or moves on.
pub trait Bus: Send + Sync + 'static {
    /// Publish the events on `agentops.events.<type>`, grouped as [`BusMessage::events`] does:
    /// the events of one outbox entry always make the same messages, whatever else the slice
    /// holds, so the bus drops what a failed or interrupted publish had already sent.
    fn publish_events<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Announce each ready task on `agentops.dispatch.<pool>`, message id `<task>:<run_lease>`.
    fn announce<'a>(&'a self, ready: &'a [ReadyTask]) -> BoxFuture<'a, Result<(), BusError>>;

    /// What this bus is, for logs: the NATS URL (without credentials), or `in-process`.
    fn describe(&self) -> String;
}

/// The body of an announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub pool: String,
    pub task: Uuid,
    pub run_lease: i64,
}

/// One message as it goes on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct BusMessage {
    pub subject: String,
    pub message_id: String,
    pub body: Bytes,
}

impl BusMessage {
    /// The events as messages, in order: each run of consecutive events of one type and one
    /// outbox entry becomes one message on `<prefix>.events.<type>` whose body is a JSON array
    /// of them, at most [`EVENTS_PER_MESSAGE`] events and [`EVENT_MESSAGE_BYTES`] long (a run
    /// that is longer goes in several). Keeping runs rather than gathering each type keeps the
    /// order of the outbox on `<prefix>.events.>`: a task's `task.claimed` comes before its
    /// `task.completed`.
    ///
    /// The message id is the first event's id, the count and a hash of every id in the
    /// message. An outbox entry (on Postgres, the events of one statement) always makes the
    /// same messages, whatever else a relay pass read with it, so a re-publish is dropped as
    /// a duplicate; a message with other events never shares an id.
    pub fn events(events: &[StoredEvent], names: &BusNames) -> Result<Vec<BusMessage>, BusError> {
        let mut messages = Vec::new();
        let mut run: Option<EventRun> = None;
        for event in events {
            let encoded = serde_json::to_vec(event).map_err(BusError::Encode)?;
            if let Some(current) = run.take() {
                if current.takes(event, encoded.len()) {
                    run = Some(current);
                } else {
                    messages.push(current.finish(names));
                }
            }
            run.get_or_insert_with(|| EventRun::new(event))
                .push(event, &encoded);
        }
        messages.extend(run.map(|run| run.finish(names)));
        Ok(messages)
    }

    pub fn announcement(ready: &ReadyTask, names: &BusNames) -> Result<BusMessage, BusError> {
        let body = Announcement {
            pool: ready.pool.clone(),
            task: ready.task,
            run_lease: ready.run_lease,
        };
        Ok(BusMessage {
            subject: format!(
                "{}.{}",
                names.dispatch_subjects(),
                subject_token(&ready.pool)
            ),
            message_id: format!("{}:{}", ready.task, ready.run_lease),
            body: serde_json::to_vec(&body).map_err(BusError::Encode)?.into(),
        })
    }
}

/// Consecutive events of one type and one outbox entry, as one message's body is built up.
struct EventRun {
    event_type: String,
    outbox_entry: i64,
    first: Uuid,
    count: usize,
    body: Vec<u8>,
    ids: Sha256,
}

impl EventRun {
    fn new(first: &StoredEvent) -> EventRun {
        EventRun {
            event_type: first.event_type.clone(),
            outbox_entry: first.outbox_entry,
            first: first.id,
            count: 0,
            body: vec![b'['],
            ids: Sha256::new(),
        }
    }

    /// Whether `event`, `encoded_len` bytes of JSON, may join this message.
    fn takes(&self, event: &StoredEvent, encoded_len: usize) -> bool {
        event.event_type == self.event_type
            && event.outbox_entry == self.outbox_entry
            && self.count < EVENTS_PER_MESSAGE
            && self.body.len() + encoded_len + 2 <= EVENT_MESSAGE_BYTES
    }

    fn push(&mut self, event: &StoredEvent, encoded: &[u8]) {
        if self.count > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(encoded);
        self.ids.update(event.id.as_bytes());
        self.count += 1;
    }

    fn finish(mut self, names: &BusNames) -> BusMessage {
        self.body.push(b']');
        let digest = self.ids.finalize();
        let hash = u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 has 8 bytes"));
        BusMessage {
            subject: format!(
                "{}.{}",
                names.events_subjects(),
                subject_tokens(&self.event_type)
            ),
            message_id: format!("{}+{}:{hash:016x}", self.first, self.count),
            body: self.body.into(),
        }
    }
}

/// A dotted name (`task.completed`) as subject tokens: each token kept if it is one, else
/// with the characters NATS gives meaning to replaced by `_`.
fn subject_tokens(name: &str) -> String {
    name.split('.')
        .map(subject_token)
        .collect::<Vec<_>>()
        .join(".")
}

/// One subject token: no `.`, `*`, `>` or whitespace, and not empty.
pub fn subject_token(name: &str) -> String {
    let token: String = name
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() => '_',
            c => c,
        })
        .collect();
    if token.is_empty() {
        "_".to_owned()
    } else {
        token
    }
}

/// Message ids seen within [`DUPLICATE_WINDOW`], oldest first.
#[derive(Default)]
struct Seen {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Seen {
    /// Whether `id` is new; remembers it either way.
    fn first(&mut self, id: &str, now: Instant) -> bool {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < DUPLICATE_WINDOW {
                break;
            }
            let (at, old) = self.order.pop_front().expect("front exists");
            if self.at.get(&old) == Some(&at) {
                self.at.remove(&old);
            }
        }
        if self.at.contains_key(id) {
            return false;
        }
        self.at.insert(id.to_owned(), now);
        self.order.push_back((now, id.to_owned()));
        true
    }
}

/// The bus without NATS: a broadcast channel inside the process, for in-process subscribers
/// (tests, and embedded agents and dashboards). A subscriber that falls more than the
/// channel's capacity behind loses the oldest messages, as a slow NATS subscriber would.
pub struct InProcessBus {
    sender: broadcast::Sender<BusMessage>,
    seen: Mutex<Seen>,
    /// Always the default ones: nothing outside the process shares this bus.
    names: BusNames,
}

impl Default for InProcessBus {
    fn default() -> Self {
        InProcessBus::new(4096)
    }
}

impl InProcessBus {
    pub fn new(capacity: usize) -> InProcessBus {
        let (sender, _) = broadcast::channel(capacity.max(1));
        InProcessBus {
            sender,
            seen: Mutex::new(Seen::default()),
            names: BusNames::default(),
        }
    }

    /// Every message published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BusMessage> {
        self.sender.subscribe()
    }

    fn send(&self, messages: Vec<BusMessage>) {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("seen lock");
        for message in messages {
            if seen.first(&message.message_id, now) {
                // An error only says nobody listens, which is no failure of the bus.
                let _ = self.sender.send(message);
            }
        }
    }
}

impl Bus for InProcessBus {
    fn publish_events<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.send(BusMessage::events(events, &self.names)?);
            Ok(())
        })
    }

    fn announce<'a>(&'a self, ready: &'a [ReadyTask]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let messages = ready
                .iter()
                .map(|ready| BusMessage::announcement(ready, &self.names))
                .collect::<Result<Vec<_>, _>>()?;
            self.send(messages);
            Ok(())
        })
    }

    fn describe(&self) -> String {
        "in-process".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(pool: &str, run_lease: i64) -> ReadyTask {
        ReadyTask {
            pool: pool.to_owned(),
            task: Uuid::from_u128(7),
            run_lease,
        }
    }

    fn event(n: u128, event_type: &str) -> StoredEvent {
        StoredEvent {
            id: Uuid::from_u128(n),
            event_type: event_type.to_owned(),
            source_agent: Some("w".to_owned()),
            target_agent: None,
            payload: serde_json::value::to_raw_value(&serde_json::json!({"n": n as u64})).unwrap(),
            created_at: None,
            outbox_entry: 1,
        }
    }

    /// (subject, the `n` of each event in the body) of every message.
    fn grouping(messages: &[BusMessage]) -> Vec<(String, Vec<u64>)> {
        messages
            .iter()
            .map(|m| {
                let body: Vec<serde_json::Value> = serde_json::from_slice(&m.body).unwrap();
                let ns = body.iter().map(|e| e["payload"]["n"].as_u64().unwrap());
                (m.subject.clone(), ns.collect())
            })
            .collect()
    }

    #[test]
    fn subjects_and_message_ids() {
        let names = BusNames::default();
        let messages = BusMessage::events(&[event(1, "task.completed")], &names).unwrap();
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        assert_eq!(m.subject, "agentops.events.task.completed");
        assert!(
            m.message_id
                .starts_with(&format!("{}+1:", Uuid::from_u128(1)))
        );
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(body[0]["id"], Uuid::from_u128(1).to_string());
        assert_eq!(body[0]["type"], "task.completed");
        assert_eq!(body[0]["payload"]["n"], 1);

        let m = BusMessage::announcement(&ready("seed", 3), &names).unwrap();
        assert_eq!(m.subject, "agentops.dispatch.seed");
        assert_eq!(m.message_id, format!("{}:3", Uuid::from_u128(7)));

        let other = BusNames::new("staging").unwrap();
        let m = &BusMessage::events(&[event(1, "task.completed")], &other).unwrap()[0];
        assert_eq!(m.subject, "staging.events.task.completed");
        let m = BusMessage::announcement(&ready("seed", 3), &other).unwrap();
        assert_eq!(m.subject, "staging.dispatch.seed");
        assert_eq!(subject_tokens("odd.na me.*"), "odd.na_me._");
        assert_eq!(subject_token(""), "_");
    }

    #[test]
    fn events_go_in_runs_of_one_type_in_order() {
        let events = [
            event(1, "task.claimed"),
            event(2, "task.claimed"),
            event(3, "task.completed"),
            event(4, "task.claimed"),
            event(5, "task.completed"),
            event(6, "task.completed"),
        ];
        let messages = BusMessage::events(&events, &BusNames::default()).unwrap();
        let claimed = "agentops.events.task.claimed".to_owned();
        let completed = "agentops.events.task.completed".to_owned();
        assert_eq!(
            grouping(&messages),
            [
                (claimed.clone(), vec![1, 2]),
                (completed.clone(), vec![3]),
                (claimed, vec![4]),
                (completed, vec![5, 6]),
            ]
        );
        assert!(
            BusMessage::events(&[], &BusNames::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn events_of_two_outbox_entries_never_share_a_message() {
        let mut events = vec![event(1, "task.claimed"), event(2, "task.claimed")];
        events.push(StoredEvent {
            outbox_entry: 2,
            ..event(3, "task.claimed")
        });
        let messages = BusMessage::events(&events, &BusNames::default()).unwrap();
        let groups: Vec<Vec<u64>> = grouping(&messages).into_iter().map(|(_, n)| n).collect();
        assert_eq!(groups, [vec![1, 2], vec![3]]);
        // The first entry read alone, as a pass that stopped before the second would: the
        // same message, with the same id.
        let alone = BusMessage::events(&events[..2], &BusNames::default()).unwrap();
        assert_eq!(alone[0].message_id, messages[0].message_id);
    }

    #[test]
    fn a_long_run_is_split_by_count_and_by_size() {
        let names = BusNames::default();
        let many: Vec<StoredEvent> = (0..EVENTS_PER_MESSAGE as u128 * 2 + 1)
            .map(|n| event(n, "task.claimed"))
            .collect();
        let sizes: Vec<usize> = grouping(&BusMessage::events(&many, &names).unwrap())
            .into_iter()
            .map(|(_, ns)| ns.len())
            .collect();
        assert_eq!(sizes, [EVENTS_PER_MESSAGE, EVENTS_PER_MESSAGE, 1]);

        // Three events of 200 KiB: two fit under the limit, the third starts a message; one
        // event larger than the limit still goes out, alone.
        let big = |n: u128, len: usize| StoredEvent {
            payload: serde_json::value::to_raw_value(&"x".repeat(len)).unwrap(),
            ..event(n, "task.created")
        };
        let events = [
            big(1, 200 << 10),
            big(2, 200 << 10),
            big(3, 200 << 10),
            big(4, EVENT_MESSAGE_BYTES + 1),
        ];
        let messages = BusMessage::events(&events, &names).unwrap();
        let counts: Vec<usize> = messages
            .iter()
            .map(|m| {
                serde_json::from_slice::<Vec<serde_json::Value>>(&m.body)
                    .unwrap()
                    .len()
            })
            .collect();
        assert_eq!(counts, [2, 1, 1]);
        assert!(
            messages[..2]
                .iter()
                .all(|m| m.body.len() <= EVENT_MESSAGE_BYTES)
        );
    }

    #[test]
    fn a_message_id_names_exactly_its_events() {
        let names = BusNames::default();
        let ids = |events: &[StoredEvent]| -> Vec<String> {
            BusMessage::events(events, &names)
                .unwrap()
                .into_iter()
                .map(|m| m.message_id)
                .collect()
        };
        let a = [event(1, "task.claimed"), event(2, "task.claimed")];
        assert_eq!(ids(&a), ids(&a), "the same events, the same id");
        // Same first event and count, another second event: a retry after a regrouping must
        // not be dropped as the earlier message.
        let b = [event(1, "task.claimed"), event(3, "task.claimed")];
        assert_ne!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&a[..1]));
    }

    #[tokio::test]
    async fn the_in_process_bus_drops_a_repeated_message_id() {
        let bus = InProcessBus::default();
        let mut rx = bus.subscribe();
        bus.announce(&[ready("seed", 1), ready("seed", 1)])
            .await
            .unwrap();
        bus.announce(&[ready("seed", 1), ready("seed", 2)])
            .await
            .unwrap();
        let ids: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| m.message_id)
            .collect();
        let task = Uuid::from_u128(7);
        assert_eq!(ids, [format!("{task}:1"), format!("{task}:2")]);
    }

    #[test]
    fn a_message_id_is_new_again_after_the_window() {
        let mut seen = Seen::default();
        let start = Instant::now();
        assert!(seen.first("a", start));
        assert!(!seen.first("a", start + Duration::from_secs(1)));
        assert!(seen.first("a", start + DUPLICATE_WINDOW + Duration::from_secs(1)));
        assert_eq!(seen.order.len(), 1);
    }
}
