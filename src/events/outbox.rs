//! The consumers' own events (`quota-alerts`, `billing`): written to
//! `event_outbox` in the transaction that makes them, then published here,
//! in order, through the same [`EventSink`] the decision path uses, and
//! marked published only once the broker confirms them. A crash between
//! the confirmation and the mark sends an event again: consumers dedupe by
//! id, as for every event.

use std::time::Duration;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Event, EventSink, Record, Topic};

/// Stages an event in the outbox, inside the caller's transaction, keyed
/// by `routing_key` (the tenant id); returns its JSON body.
pub async fn stage<T: Serialize>(
    tx: &mut PgConnection,
    event: &Event<T>,
    routing_key: &str,
) -> Result<serde_json::Value, sqlx::Error> {
    let record = Record::of(event, Some(routing_key));
    let body: serde_json::Value = serde_json::from_slice(&record.body).unwrap_or_default();
    sqlx::query("INSERT INTO event_outbox (id, topic, routing_key, body) VALUES ($1, $2, $3, $4)")
        .bind(event.id)
        .bind(event.topic.name())
        .bind(&record.key)
        .bind(&body)
        .execute(&mut *tx)
        .await?;
    Ok(body)
}

#[derive(sqlx::FromRow)]
struct Pending {
    id: Uuid,
    topic: String,
    routing_key: String,
    body: String,
}

/// Publishes the outbox until `shutdown`, every `poll` or sooner when busy.
pub async fn publish(
    pool: PgPool,
    mut sink: impl EventSink,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut failing = false;
    loop {
        let busy = match publish_some(&pool, &mut sink).await {
            Ok(n) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(to = %sink.describe(), "outbox events published again");
                }
                n > 0
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(to = %sink.describe(), error = %e, "cannot publish outbox events; retrying");
                }
                false
            }
        };
        if busy {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = &mut shutdown => return,
        }
    }
}

/// One batch: the oldest unpublished events, locked so that replicas do
/// not send the same ones at once.
async fn publish_some(pool: &PgPool, sink: &mut impl EventSink) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let pending: Vec<Pending> = sqlx::query_as(
        "SELECT id, topic, routing_key, body::text AS body FROM event_outbox
         WHERE published_at IS NULL ORDER BY created_at, id LIMIT 200
         FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let records: Vec<Record> = pending
        .iter()
        .filter_map(|p| {
            Some(Record {
                topic: Topic::from_name(&p.topic)?,
                id: p.id,
                key: p.routing_key.clone(),
                body: p.body.clone().into_bytes(),
            })
        })
        .collect();
    sink.publish(&records).await?;
    let ids: Vec<Uuid> = pending.iter().map(|p| p.id).collect();
    sqlx::query("UPDATE event_outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(pending.len())
}
