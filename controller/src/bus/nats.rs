//! [`Bus`] on NATS JetStream.
//!
//! Two streams, created on first use if missing (and again if a server lost them):
//! `AGENTOPS_EVENTS` keeps `agentops.events.>` for a week for replay, and `AGENTOPS_DISPATCH`
//! holds `agentops.dispatch.>` as a work queue: a message is gone once an agent of the pool
//! acknowledged it. Agents read their pools through durable consumers named
//! `agentops-<pool>` that filter on `agentops.dispatch.<pool>` (`agents/PROTOCOL.md`). Both
//! streams drop a message id seen within two minutes. `agentops` is the default prefix of
//! all these names ([`BusNames`]).
//!
//! The client connects in the background and reconnects forever, so a controller starts with
//! NATS down and carries on when it comes back. Every wait is bounded: a publish that gets no
//! acknowledgement within [`ACK_TIMEOUT`] fails, and its caller counts it and tries later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::{BoxFuture, Bus, BusError, BusMessage, BusNames, DUPLICATE_WINDOW};
use crate::store::queue::{ReadyTask, StoredEvent};
use crate::telemetry::{BusConnection, BusPublishFailed, InternalEvent};

/// How long a publish waits for JetStream to confirm it.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct NatsBus {
    url: String,
    names: BusNames,
    jetstream: jetstream::Context,
    /// Whether both streams are known to exist.
    streams_ready: AtomicBool,
}

impl NatsBus {
    /// Checks the URL and starts connecting; returns at once.
    pub async fn connect(url: &str, names: BusNames) -> Result<NatsBus, BusError> {
        let shown = crate::redact(url);
        let logged = shown.clone();
        // Whether the connection was lost since it was last made: the next one is a reconnect.
        let lost = Arc::new(AtomicBool::new(false));
        let client = async_nats::ConnectOptions::new()
            .name("agentops-controller")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let (url, lost) = (logged.clone(), lost.clone());
                async move {
                    let url = url.as_str();
                    match event {
                        async_nats::Event::Connected => {
                            let again = lost.swap(false, Ordering::Relaxed);
                            BusConnection::Connected { url, again }.emit();
                        }
                        async_nats::Event::Disconnected => {
                            lost.store(true, Ordering::Relaxed);
                            BusConnection::Disconnected { url }.emit();
                        }
                        other => BusConnection::Other { url, event: &other }.emit(),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|source| BusError::Connect {
                url: shown.clone(),
                source,
            })?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .build(client);
        Ok(NatsBus {
            url: shown,
            names,
            jetstream,
            streams_ready: AtomicBool::new(false),
        })
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Create the two streams if they are missing. Publishing does this itself; agents that
    /// start before the controller's first publish find the streams sooner if it is done at
    /// start.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        if self.streams_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        for config in [events_stream(&self.names), dispatch_stream(&self.names)] {
            let stream = config.name.clone();
            self.jetstream
                .get_or_create_stream(config)
                .await
                .map_err(|source| BusError::Stream { stream, source })?;
        }
        self.streams_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Deletes both streams and what they hold: for a benchmark's own prefix, once it is done.
    pub async fn delete_streams(
        &self,
    ) -> Result<(), async_nats::jetstream::context::DeleteStreamError> {
        for stream in [self.names.events_stream(), self.names.dispatch_stream()] {
            self.jetstream.delete_stream(&stream).await?;
        }
        self.streams_ready.store(false, Ordering::Release);
        Ok(())
    }

    /// Publishes every message, all in flight at once, then waits for every acknowledgement.
    ///
    /// A publish to a server that is gone fails within about two timeouts: sending stops at the
    /// first message the client would not take (while the connection is down its buffer fills,
    /// and every further send would wait out a timeout of its own), and the acknowledgements
    /// are awaited together. Awaited one after another, as before, a relay batch of 500 took
    /// up to 500 timeouts to fail.
    async fn publish_all(&self, messages: Vec<BusMessage>) -> Result<(), BusError> {
        let count = messages.len();
        let published = self.try_publish_all(messages).await;
        if let Err(error) = &published {
            let (bus, messages) = (self.url.as_str(), count);
            BusPublishFailed {
                bus,
                messages,
                error,
            }
            .emit();
        }
        published
    }

    async fn try_publish_all(&self, messages: Vec<BusMessage>) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        self.ensure_streams().await?;
        let mut acks = Vec::with_capacity(messages.len());
        let mut first_error = None;
        for message in messages {
            let publish = jetstream::message::PublishMessage::build()
                .payload(message.body)
                .message_id(&message.message_id);
            match self
                .jetstream
                .send_publish(message.subject.clone(), publish)
                .await
            {
                Ok(ack) => acks.push((message.subject, ack)),
                Err(source) => {
                    first_error = Some(BusError::Publish {
                        subject: message.subject,
                        source,
                    });
                    break;
                }
            }
        }
        // Together: each acknowledgement's timeout starts when it is first awaited, so waiting
        // for them one after another would add up their timeouts.
        let answers = futures::future::join_all(
            acks.into_iter()
                .map(|(subject, ack)| async move { (subject, ack.await) }),
        )
        .await;
        for (subject, answer) in answers {
            if let Err(source) = answer {
                first_error.get_or_insert(BusError::Publish { subject, source });
            }
        }
        if first_error.is_some() {
            // Check the streams again before the next try: a stream that is gone (deleted, a
            // server that lost its store) shows as "no stream" only while nobody else
            // listens on the subject; with a plain subscriber there, as a time-out.
            self.streams_ready.store(false, Ordering::Release);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Reconnect at once, then after 100 ms, doubling up to 2 s: a restarted server is found
/// quickly.
fn reconnect_delay(attempts: usize) -> Duration {
    match attempts {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 2).min(5)).min(Duration::from_secs(2)),
    }
}

fn events_stream(names: &BusNames) -> stream::Config {
    stream::Config {
        name: names.events_stream(),
        description: Some(
            "agentops events: every row of the events table, in JSON arrays".to_owned(),
        ),
        subjects: vec![format!("{}.>", names.events_subjects())],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_bytes: 1 << 30,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: 1,
        ..Default::default()
    }
}

fn dispatch_stream(names: &BusNames) -> stream::Config {
    stream::Config {
        name: names.dispatch_stream(),
        description: Some("agentops ready-work announcements, per pool".to_owned()),
        subjects: vec![format!("{}.>", names.dispatch_subjects())],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // An announcement nobody took in ten minutes is stale: the work was claimed by
        // long-polling, or it is announced again.
        max_age: Duration::from_secs(600),
        max_messages: 100_000,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: 1,
        ..Default::default()
    }
}

impl Bus for NatsBus {
    fn publish_events<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.publish_all(BusMessage::events(events, &self.names)?)
                .await
        })
    }

    fn announce<'a>(&'a self, ready: &'a [ReadyTask]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let messages = ready
                .iter()
                .map(|ready| BusMessage::announcement(ready, &self.names))
                .collect::<Result<Vec<_>, _>>()?;
            self.publish_all(messages).await
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_quickly_then_backs_off_to_two_seconds() {
        let delays: Vec<u128> = (0..10).map(|n| reconnect_delay(n).as_millis()).collect();
        assert_eq!(delays, [0, 0, 100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn the_dispatch_stream_is_a_work_queue_that_drops_duplicates() {
        let names = BusNames::default();
        let config = dispatch_stream(&names);
        assert_eq!(config.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(config.duplicate_window, DUPLICATE_WINDOW);
        assert!(config.max_age > config.duplicate_window);
        assert_eq!(config.subjects, ["agentops.dispatch.>"]);
        assert_eq!(config.name, "AGENTOPS_DISPATCH");
        let events = events_stream(&names);
        assert_eq!(events.subjects, ["agentops.events.>"]);
        assert_eq!(events.name, "AGENTOPS_EVENTS");

        let bench = BusNames::new("bench_7").unwrap();
        assert_eq!(events_stream(&bench).subjects, ["bench_7.events.>"]);
        assert_eq!(dispatch_stream(&bench).name, "BENCH_7_DISPATCH");
    }
}
