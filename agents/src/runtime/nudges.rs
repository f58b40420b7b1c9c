//! Ready-work announcements over NATS, taken as a reason to claim at once.
//!
//! With `AgentConfig::nats` set, the agent reads its two pools, `agentops.dispatch.<type>` and
//! `agentops.dispatch.<name>`, from the controller's JetStream stream `AGENTOPS_DISPATCH`
//! through the durable consumers `agentops-<pool>`, which every agent of a pool shares (so
//! one announcement goes to one agent). `agentops` is the default prefix of these names
//! ([`BusNames`], `AgentConfig::bus`). Each message is acknowledged as soon as it arrives and
//! turned into a nudge: a wait between attempts to reach the controller (registering,
//! claiming) ends early. An announcement is only a hint: the claim still decides who gets
//! what, so a lost one costs latency and a repeated one an extra claim, never a task.
//!
//! NATS being unreachable changes nothing else: the agent long-polls as it does without it,
//! and follows the stream again once NATS is back.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::client::Error;
use super::reports::Backoff;
use crate::error_chain;
use crate::protocol::BusNames;

/// Fires when an announcement for one of our pools arrives; never, without NATS.
pub(crate) struct Nudges {
    notify: Option<Arc<Notify>>,
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(
        "the stream {stream} is not there (is the controller running with --nats, and the same bus prefix?)"
    )]
    Stream {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot open the consumer {name}")]
    Consumer {
        name: String,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot pull announcements")]
    Pull(#[source] jetstream::consumer::StreamError),
    #[error("lost the announcements")]
    Messages(#[source] pull::MessagesError),
}

impl Nudges {
    pub fn off() -> Nudges {
        Nudges { notify: None }
    }

    /// Starts following `pools` on the NATS server at `url` until `stop`; returns at once
    /// (the connection is made, and remade, in the background). Fails only on a bad URL.
    pub async fn follow(
        url: &str,
        names: &BusNames,
        agent: &str,
        pools: Vec<String>,
        stop: CancellationToken,
    ) -> Result<Nudges, Error> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("agentops-agent-{agent}"))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 * attempts.min(10) as u64)
            })
            .connect(url)
            .await
            .map_err(|source| Error::Nats {
                url: url.to_owned(),
                source,
            })?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client);
        let notify = Arc::new(Notify::new());
        let mut pools = pools;
        pools.sort();
        pools.dedup();
        for pool in pools {
            tokio::spawn(follow_pool(
                jetstream.clone(),
                names.clone(),
                pool,
                notify.clone(),
                stop.clone(),
            ));
        }
        Ok(Nudges {
            notify: Some(notify),
        })
    }

    /// Waits for the next nudge. A nudge that came while nobody waited is kept (one), so
    /// the next wait ends at once.
    pub async fn next(&self) {
        match &self.notify {
            Some(notify) => notify.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Sleeps for `pause`, or less if a nudge comes.
    pub async fn sleep(&self, pause: Duration) {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = self.next() => tracing::debug!("announcement: trying again at once"),
        }
    }

    #[cfg(test)]
    pub fn manual() -> (Nudges, Arc<Notify>) {
        let notify = Arc::new(Notify::new());
        (
            Nudges {
                notify: Some(notify.clone()),
            },
            notify,
        )
    }
}

/// Follows one pool until `stop`, starting over (with backoff) whenever NATS, the stream or
/// the consumer goes away.
async fn follow_pool(
    jetstream: jetstream::Context,
    names: BusNames,
    pool: String,
    notify: Arc<Notify>,
    stop: CancellationToken,
) {
    // The cap is short: a stream the controller has just created is found within a second.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut failing = false;
    loop {
        let followed = stop
            .run_until_cancelled(read_pool(&jetstream, &names, &pool, &notify, &mut failing))
            .await;
        match followed {
            None => return,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                if failing {
                    tracing::debug!(%pool, error = %error_chain(&e), "announcements still unavailable");
                } else {
                    tracing::warn!(%pool, error = %error_chain(&e), "announcements unavailable; claiming by long-poll alone");
                }
                failing = true;
            }
        }
        if stop
            .run_until_cancelled(tokio::time::sleep(backoff.next()))
            .await
            .is_none()
        {
            return;
        }
    }
}

async fn read_pool(
    jetstream: &jetstream::Context,
    names: &BusNames,
    pool: &str,
    notify: &Notify,
    failing: &mut bool,
) -> Result<(), FollowError> {
    let stream_name = names.dispatch_stream();
    let stream =
        jetstream
            .get_stream(&stream_name)
            .await
            .map_err(|source| FollowError::Stream {
                stream: stream_name,
                source,
            })?;
    let name = names.consumer(pool);
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: format!("{}.{pool}", names.dispatch_subjects()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|source| FollowError::Consumer {
            name: name.clone(),
            source,
        })?;
    // Short pulls with frequent heartbeats: a restarted server is noticed within seconds.
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(64)
        .expires(Duration::from_secs(5))
        .heartbeat(Duration::from_secs(1))
        .messages()
        .await
        .map_err(FollowError::Pull)?;
    if *failing {
        tracing::info!(%pool, "following announcements again");
        *failing = false;
    }
    while let Some(message) = messages.next().await {
        let message = message.map_err(FollowError::Messages)?;
        if let Err(e) = message.ack().await {
            // Redelivered after the ack wait, to us or another agent of the pool: one more
            // claim, which finds what there is.
            tracing::debug!(%pool, "cannot acknowledge an announcement: {e}");
        }
        notify.notify_one();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_nudge_ends_a_sleep_early_and_one_is_kept_for_later() {
        let (nudges, notify) = Nudges::manual();
        let started = tokio::time::Instant::now();
        let nudger = tokio::spawn({
            let notify = notify.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                notify.notify_one();
            }
        });
        nudges.sleep(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        nudger.await.unwrap();

        // Two nudges while nobody waits make one early wake-up, not two.
        notify.notify_one();
        notify.notify_one();
        let started = tokio::time::Instant::now();
        nudges.sleep(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        nudges.sleep(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn without_nats_a_sleep_is_a_sleep() {
        let nudges = Nudges::off();
        let started = tokio::time::Instant::now();
        nudges.sleep(Duration::from_secs(2)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}
