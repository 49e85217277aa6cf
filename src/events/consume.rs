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
use super::{alerts, cycles, Event, Group, Topic, UsageData, ViolationData, SCHEMA_VERSION};
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
    /// How long a webhook delivery is retried before it fails: set for the
    /// alerts consumer, the one that delivers webhooks.
    pub webhook_retry_for: Option<Duration>,
    /// Names this process in the events it makes.
    pub instance: String,
}

/// Runs a consumer until `shutdown`; reconnects to the broker and retries
/// PostgreSQL on its own.
pub async fn run(
    group: Group,
    settings: ConsumeSettings,
    pool: PgPool,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut consumer = Consumer {
        group,
        pool,
        partitions: HashSet::new(),
        settings,
    };
    tokio::pin!(shutdown);
    let mut failing = false;
    loop {
        tokio::select! {
            result = consumer.session() => {
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

struct Consumer {
    group: Group,
    pool: PgPool,
    /// Months whose violations partition is known to exist.
    partitions: HashSet<i32>,
    settings: ConsumeSettings,
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

    fn topic(&self) -> Topic {
        match self {
            Applied::Usage(e) => e.topic,
            Applied::Violation(e) => e.topic,
        }
    }
}

impl Consumer {
    /// One connection: consume until it fails.
    async fn session(&mut self) -> anyhow::Result<()> {
        let settings = self.settings.clone();
        let settings = &settings;
        let connection = amqp::connect(&settings.url).await?;
        let channel = connection.create_channel().await?;
        amqp::declare(&channel, &settings.prefix, &[self.group]).await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        let mut streams = Vec::new();
        for &topic in self.group.topics() {
            let consumer = channel
                .basic_consume(
                    &queue_name(&settings.prefix, topic, self.group.name()),
                    "",
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push(consumer);
        }
        let mut deliveries = futures::stream::select_all(streams);
        tracing::info!(consumer = self.group.name(), "consuming events");
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
        let name = self.group.name();
        let mut events = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match parse(&delivery.data).filter(|e| self.group.topics().contains(&e.topic())) {
                Some(event) => events.push(event),
                None => {
                    // Acknowledged with the batch: a message that cannot be
                    // read will not be readable on redelivery either.
                    counter!(names::EVENTS_CONSUMED, "consumer" => name, "result" => "invalid")
                        .increment(1);
                    tracing::warn!(
                        bytes = delivery.data.len(),
                        consumer = name,
                        "skipping a message that is not an event of this consumer's topics and of schema version {SCHEMA_VERSION}"
                    );
                }
            }
        }
        let mut failing = false;
        loop {
            match self.write(&events).await {
                Ok(fresh) => {
                    counter!(names::EVENTS_CONSUMED, "consumer" => name, "result" => "applied")
                        .increment(fresh as u64);
                    counter!(names::EVENTS_CONSUMED, "consumer" => name, "result" => "duplicate")
                        .increment((events.len() - fresh) as u64);
                    if failing {
                        tracing::info!(consumer = name, "events written again");
                    }
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(consumer = name, error = %e, "cannot write events; retrying");
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
             SELECT $1, id FROM UNNEST($2::uuid[]) AS u(id)
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(self.group.name())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut seen = HashSet::new();
        // A batch may hold an event twice (a redelivery beside the
        // original): apply it once.
        let fresh: Vec<&Applied> = events
            .iter()
            .filter(|e| fresh.contains(&e.id()) && seen.insert(e.id()))
            .collect();
        let mut months = HashSet::new();
        match self.group {
            Group::Usage => {
                let batch = usage_batch(&fresh);
                months = usage::write_batch(&mut tx, &batch, &self.partitions).await?;
            }
            Group::Alerts => {
                let crossed = cycles::add(&mut tx, "alerts", &usage_of(&fresh)).await?;
                alerts::record(
                    &mut tx,
                    &crossed,
                    self.settings.webhook_retry_for.unwrap_or_default(),
                    &self.settings.instance,
                )
                .await?;
            }
            Group::Billing => {
                cycles::add(&mut tx, "billing", &usage_of(&fresh)).await?;
            }
        }
        tx.commit().await?;
        self.partitions.extend(months);
        Ok(seen.len())
    }
}

/// The usage events' data.
fn usage_of<'a>(events: &[&'a Applied]) -> Vec<&'a UsageData> {
    events
        .iter()
        .filter_map(|e| match e {
            Applied::Usage(e) => Some(&e.data),
            Applied::Violation(_) => None,
        })
        .collect()
}

/// Usage and violation events as the rows `usage::write_batch` writes.
fn usage_batch(events: &[&Applied]) -> Batch {
    let mut batch = Batch::default();
    for event in events {
        match event {
            Applied::Usage(e) => {
                let d = &e.data;
                let sums = batch
                    .usage
                    .entry((
                        Arc::from(d.tenant_id.as_str()),
                        Arc::from(d.domain.as_str()),
                        d.minute.timestamp(),
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
    batch
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
