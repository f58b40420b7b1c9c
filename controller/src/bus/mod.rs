//! The bus: how the controller tells the rest of the world what happened and what is ready.
//!
//! Two kinds of message go out:
//!
//! - **Events**, one per `events` row, on `agentops.events.<type>` (`agentops.events.task.completed`),
//!   with the row as JSON: `{"id", "type", "source_agent", "target_agent", "payload",
//!   "created_at"}`. The relay in `dispatch` publishes them from the store's outbox once they
//!   are committed; the message id is the event's id, so a re-publish is dropped as a duplicate.
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
use tokio::sync::broadcast;
use uuid::Uuid;

pub use agentops_agents::runtime::{BusNames, DEFAULT_BUS_PREFIX};
pub use nats::NatsBus;

use crate::store::queue::{ReadyTask, StoredEvent};

/// Within this window a message id seen before is dropped (JetStream's `duplicate_window`).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

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
    /// Publish each event on `agentops.events.<type>`, message id = the event id.
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
    pub fn event(event: &StoredEvent, names: &BusNames) -> Result<BusMessage, BusError> {
        Ok(BusMessage {
            subject: format!(
                "{}.{}",
                names.events_subjects(),
                subject_tokens(&event.event_type)
            ),
            message_id: event.id.to_string(),
            body: serde_json::to_vec(event).map_err(BusError::Encode)?.into(),
        })
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
            let messages = events
                .iter()
                .map(|event| BusMessage::event(event, &self.names))
                .collect::<Result<Vec<_>, _>>()?;
            self.send(messages);
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

    #[test]
    fn subjects_and_message_ids() {
        let event = StoredEvent {
            id: Uuid::from_u128(1),
            event_type: "task.completed".to_owned(),
            source_agent: Some("w".to_owned()),
            target_agent: None,
            payload: serde_json::value::to_raw_value(&serde_json::json!({"id": "x"})).unwrap(),
            created_at: None,
        };
        let names = BusNames::default();
        let m = BusMessage::event(&event, &names).unwrap();
        assert_eq!(m.subject, "agentops.events.task.completed");
        assert_eq!(m.message_id, Uuid::from_u128(1).to_string());
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(body["type"], "task.completed");
        assert_eq!(body["payload"]["id"], "x");

        let m = BusMessage::announcement(&ready("seed", 3), &names).unwrap();
        assert_eq!(m.subject, "agentops.dispatch.seed");
        assert_eq!(m.message_id, format!("{}:3", Uuid::from_u128(7)));

        let other = BusNames::new("staging").unwrap();
        let m = BusMessage::event(&event, &other).unwrap();
        assert_eq!(m.subject, "staging.events.task.completed");
        let m = BusMessage::announcement(&ready("seed", 3), &other).unwrap();
        assert_eq!(m.subject, "staging.dispatch.seed");
        assert_eq!(subject_tokens("odd.na me.*"), "odd.na_me._");
        assert_eq!(subject_token(""), "_");
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
