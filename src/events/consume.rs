//! Consumers: events from the broker into PostgreSQL, each applied once.
//!
//! A consumer takes a batch of deliveries (up to the prefetch, or what
//! arrived within `batch_wait` of the first), applies it in one transaction
//! that also records every event id in `applied_events`, and acknowledges
//! the deliveries only after the commit. A delivery seen again (the broker
//! redelivers what was not acknowledged when a consumer died, and a
//! publisher may send twice) finds its id recorded and changes nothing, so
//! totals stay exact whichever replica or attempt applies it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use metrics::counter;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use uuid::Uuid;

use super::amqp::{self, queue_name};
use super::{Event, Topic, UsageData, ViolationData, SCHEMA_VERSION};
use crate::telemetry::names;
use crate::usage::{self, Batch};

#[derive(Clone, Debug)]
pub struct ConsumeSettings {
    pub url: String,
    pub prefix: String,
    /// Deliveries held unacknowledged at once, and the largest batch.
    pub prefetch: u16,
    /// How long a batch waits for more deliveries after its first.
    pub batch_wait: Duration,
}

/// The `usage` consumer: `usage` events into `usage_hourly`,
/// `rate-limit-violations` into `violations`. Runs until `shutdown`;
/// reconnects to the broker and retries PostgreSQL on its own.
pub async fn usage(
    settings: ConsumeSettings,
    pool: PgPool,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut consumer = UsageConsumer {
        pool,
        partitions: HashSet::new(),
    };
    tokio::pin!(shutdown);
    let mut failing = false;
    loop {
        tokio::select! {
            result = consumer.session(&settings) => {
                if let Err(e) = result {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "event consumer lost the broker; reconnecting");
                    }
                }
            }
            () = &mut shutdown => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = &mut shutdown => return,
        }
    }
}

struct UsageConsumer {
    pool: PgPool,
    /// Months whose violations partition is known to exist.
    partitions: HashSet<i32>,
}

/// One parsed delivery.
enum Applied {
    Usage(Event<UsageData>),
    Violation(Event<ViolationData>),
}

impl Applied {
    fn id(&self) -> Uuid {
        match self {
            Applied::Usage(e) => e.id,
            Applied::Violation(e) => e.id,
        }
    }
}

impl UsageConsumer {
    /// One connection: consume until it fails.
    async fn session(&mut self, settings: &ConsumeSettings) -> anyhow::Result<()> {
        let connection = amqp::connect(&settings.url).await?;
        let channel = connection.create_channel().await?;
        amqp::declare(&channel, &settings.prefix).await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        let mut streams = Vec::new();
        for topic in [Topic::Usage, Topic::RateLimitViolations] {
            let consumer = channel
                .basic_consume(
                    &queue_name(&settings.prefix, topic, "usage"),
                    "",
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push(consumer);
        }
        let mut deliveries = futures::stream::select_all(streams);
        tracing::info!("consuming usage and violation events");
        loop {
            let Some(first) = deliveries.next().await else {
                anyhow::bail!("the broker closed the consumer");
            };
            let mut batch = vec![first?];
            let deadline = tokio::time::Instant::now() + settings.batch_wait;
            while batch.len() < usize::from(settings.prefetch) {
                match tokio::time::timeout_at(deadline, deliveries.next()).await {
                    Ok(Some(delivery)) => batch.push(delivery?),
                    Ok(None) | Err(_) => break,
                }
            }
            self.apply(&batch).await;
            // Each acknowledged on its own: a multiple ack could cover a
            // delivery of the other queue not yet read from its stream.
            for delivery in &batch {
                delivery.ack(BasicAckOptions::default()).await?;
            }
        }
    }

    /// Applies a batch, retrying PostgreSQL until it commits.
    async fn apply(&mut self, deliveries: &[Delivery]) {
        let mut events = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match parse(&delivery.data) {
                Some(event) => events.push(event),
                None => {
                    // Acknowledged with the batch: a message that cannot be
                    // read will not be readable on redelivery either.
                    counter!(names::EVENTS_CONSUMED, "consumer" => "usage", "result" => "invalid")
                        .increment(1);
                    tracing::warn!(
                        bytes = delivery.data.len(),
                        "skipping a message that is not a usage or violation event of schema version {SCHEMA_VERSION}"
                    );
                }
            }
        }
        let mut failing = false;
        loop {
            match self.write(&events).await {
                Ok(fresh) => {
                    counter!(names::EVENTS_CONSUMED, "consumer" => "usage", "result" => "applied")
                        .increment(fresh as u64);
                    counter!(names::EVENTS_CONSUMED, "consumer" => "usage", "result" => "duplicate")
                        .increment((events.len() - fresh) as u64);
                    if failing {
                        tracing::info!("usage events written again");
                    }
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "cannot write usage events; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// One transaction: the ids not applied before, and their rows.
    /// Returns how many events were new.
    async fn write(&mut self, events: &[Applied]) -> Result<usize, sqlx::Error> {
        if events.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = events.iter().map(Applied::id).collect();
        let mut tx = self.pool.begin().await?;
        let fresh: HashSet<Uuid> = sqlx::query_scalar(
            "INSERT INTO applied_events (consumer, id)
             SELECT 'usage', id FROM UNNEST($1::uuid[]) AS u(id)
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut batch = Batch::default();
        let mut seen = HashSet::new();
        for event in events {
            // A batch may hold an event twice (a redelivery beside the
            // original): apply it once.
            if !fresh.contains(&event.id()) || !seen.insert(event.id()) {
                continue;
            }
            match event {
                Applied::Usage(e) => {
                    let d = &e.data;
                    let hour = d.minute.timestamp() / 3_600 * 3_600;
                    let sums = batch
                        .usage
                        .entry((
                            Arc::from(d.tenant_id.as_str()),
                            Arc::from(d.domain.as_str()),
                            hour,
                        ))
                        .or_default();
                    sums.0 += d.allowed as i64;
                    sums.1 += d.denied as i64;
                }
                Applied::Violation(e) => {
                    let d = &e.data;
                    let at = d.first_at.timestamp_micros().max(0) as u64;
                    let entry = batch
                        .violations
                        .entry((
                            d.tenant_id.as_deref().map(Arc::from),
                            Arc::from(d.domain.as_str()),
                            Arc::from(d.rule.as_str()),
                            d.client_id.clone(),
                        ))
                        .or_insert((at, 0));
                    entry.0 = entry.0.min(at);
                    entry.1 += d.hits as i64;
                }
            }
        }
        let months = usage::write_batch(&mut tx, &batch, &self.partitions).await?;
        tx.commit().await?;
        self.partitions.extend(months);
        Ok(seen.len())
    }
}

fn parse(body: &[u8]) -> Option<Applied> {
    fn typed<T: DeserializeOwned>(body: &[u8]) -> Option<Event<T>> {
        let event: Event<T> = serde_json::from_slice(body).ok()?;
        (event.schema_version == SCHEMA_VERSION).then_some(event)
    }
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        topic: Topic,
    }
    match serde_json::from_slice::<Kind>(body).ok()?.topic {
        Topic::Usage => typed(body).map(Applied::Usage),
        Topic::RateLimitViolations => typed(body).map(Applied::Violation),
        _ => None,
    }
}
