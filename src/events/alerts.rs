//! Quota alerts: a tenant crossing 80, 90 and 100 % of its monthly quota,
//! once per threshold per cycle, published as `quota-alerts` events and
//! delivered to the tenant's webhooks.
//!
//! The consumer records an alert, its event (in `event_outbox`) and one
//! delivery per webhook in the transaction that counts the usage, so an
//! alert exists exactly when its crossing was counted. `quota_alerts`' key
//! (tenant, cycle, threshold) keeps it to one whatever the replicas.
//! [`deliver`] then POSTs each delivery, signed, retrying with backoff.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac as _};
use metrics::counter;
use sha2::Sha256;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::cycles::{self, Moved};
use super::{outbox, Event, QuotaAlertData, Topic};
use crate::telemetry::names;

/// Records the alerts of the thresholds `moved` crossed, with their
/// outbox event and webhook deliveries (retried for `retry_for`).
pub async fn record(
    tx: &mut PgConnection,
    moved: &[Moved],
    retry_for: Duration,
    instance: &str,
) -> Result<(), sqlx::Error> {
    let retry_for_s = retry_for.as_secs_f64();
    for m in moved {
        let Some(quota) = m.quota else { continue };
        for threshold in cycles::crossed(m.before, m.after, quota) {
            let event = Event::new(
                Topic::QuotaAlerts,
                instance,
                Utc::now(),
                QuotaAlertData {
                    tenant_id: m.tenant_id.clone(),
                    cycle: cycles::name(m.cycle),
                    threshold,
                    used: m.after.max(0) as u64,
                    quota: quota.max(0) as u64,
                },
            );
            let inserted = sqlx::query(
                "INSERT INTO quota_alerts (id, tenant_id, cycle, threshold, used, quota)
                 VALUES ($1, $2::uuid, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(event.id)
            .bind(&m.tenant_id)
            .bind(m.cycle)
            .bind(i16::from(threshold))
            .bind(m.after)
            .bind(quota)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                continue;
            }
            let body = outbox::stage(&mut *tx, &event, &m.tenant_id).await?;
            sqlx::query(
                "INSERT INTO webhook_deliveries (webhook_id, event_id, body, give_up_at)
                 SELECT id, $2, $3, now() + make_interval(secs => $4)
                 FROM webhooks WHERE tenant_id = $1::uuid",
            )
            .bind(&m.tenant_id)
            .bind(event.id)
            .bind(&body)
            .bind(retry_for_s)
            .execute(&mut *tx)
            .await?;
            counter!(names::QUOTA_ALERTS, "threshold" => threshold.to_string()).increment(1);
            tracing::info!(tenant_id = %m.tenant_id, cycle = %event.data.cycle, threshold, "quota alert");
        }
    }
    Ok(())
}

// === Webhook deliveries ===

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256>` over
/// `"<t>.<body>"` with the webhook's secret. The receiver recomputes it and
/// refuses timestamps too far from its clock (replays); docs/events.md
/// says how, and tests/it/alerts.rs does it as a receiver would.
pub const SIGNATURE_HEADER: &str = "sluice-signature";
/// The event's id: receivers dedupe by it (a retried delivery repeats it).
pub const EVENT_ID_HEADER: &str = "sluice-event-id";

/// `t=...,v1=...` for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Settings of the delivery worker.
#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// The first retry's delay; each next one doubles, jittered, up to
    /// `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// One attempt's bound.
    pub timeout: Duration,
    /// How often due deliveries are looked for.
    pub poll: Duration,
}

#[derive(sqlx::FromRow)]
struct Due {
    id: Uuid,
    event_id: Uuid,
    body: String,
    attempts: i32,
    give_up_at: DateTime<Utc>,
    url: String,
    secret: String,
}

/// Delivers due webhook deliveries until `shutdown`. Replicas share the
/// work: each claims rows with `SKIP LOCKED` and a lease (the next attempt
/// time moved past the attempt), so a delivery is sent by one at a time.
pub async fn deliver(
    pool: PgPool,
    settings: DeliverySettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let client = match reqwest::Client::builder()
        .timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client");
            return;
        }
    };
    tokio::pin!(shutdown);
    let mut failing = false;
    loop {
        let worked = match deliver_due(&pool, &client, &settings).await {
            Ok(n) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("webhook deliveries resumed");
                }
                n > 0
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "cannot read webhook deliveries; retrying");
                }
                false
            }
        };
        if worked {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(settings.poll) => {}
            () = &mut shutdown => return,
        }
    }
}

/// One round: claims up to 16 due deliveries and attempts them at once.
async fn deliver_due(
    pool: &PgPool,
    client: &reqwest::Client,
    settings: &DeliverySettings,
) -> Result<usize, sqlx::Error> {
    // The lease: an attempt that never reports (the process died) is
    // retried when it ends.
    let lease_s = (settings.timeout + Duration::from_secs(5)).as_secs_f64();
    let due: Vec<Due> = sqlx::query_as(
        "UPDATE webhook_deliveries d
         SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $1)
         FROM webhooks w
         WHERE w.id = d.webhook_id AND d.id IN (
             SELECT id FROM webhook_deliveries
             WHERE state = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT 16 FOR UPDATE SKIP LOCKED)
         RETURNING d.id, d.event_id, d.body::text AS body, d.attempts, d.give_up_at, w.url, w.secret",
    )
    .bind(lease_s)
    .fetch_all(pool)
    .await?;
    let n = due.len();
    let attempts = due.into_iter().map(|d| async move {
        let result = attempt(client, &d).await;
        (d, result)
    });
    for (d, result) in futures::future::join_all(attempts).await {
        let (status, error) = match &result {
            Ok(status) => (Some(i32::from(*status)), None),
            Err(e) => (None, Some(e.clone())),
        };
        let delivered = matches!(status, Some(200..=299));
        let delay = backoff(settings, d.attempts);
        let gives_up = !delivered && Utc::now() + delay >= d.give_up_at;
        let state = match (delivered, gives_up) {
            (true, _) => "delivered",
            (false, true) => "failed",
            (false, false) => "pending",
        };
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(d.id)
        .bind(d.attempts)
        .bind(status)
        .bind(&error)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhook_deliveries
             SET state = $2, next_attempt_at = now() + make_interval(secs => $3)
             WHERE id = $1",
        )
        .bind(d.id)
        .bind(state)
        .bind(delay.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        counter!(names::WEBHOOK_ATTEMPTS, "result" => state).increment(1);
        if !delivered {
            tracing::warn!(
                delivery = %d.id, event = %d.event_id, attempt = d.attempts, status, error,
                state, "webhook delivery failed"
            );
        }
    }
    Ok(n)
}

/// POSTs one delivery: the status code, or why there was none.
async fn attempt(client: &reqwest::Client, d: &Due) -> Result<u16, String> {
    let timestamp = Utc::now().timestamp();
    let response = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_ID_HEADER, d.event_id.to_string())
        .header(
            SIGNATURE_HEADER,
            sign(&d.secret, timestamp, d.body.as_bytes()),
        )
        .body(d.body.clone())
        .send()
        .await
        .map_err(|e| {
            // reqwest's message names the URL; keep only the kind.
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "cannot connect"
            } else {
                "request failed"
            };
            kind.to_owned()
        })?;
    Ok(response.status().as_u16())
}

/// The delay after attempt `n` (1-based): `backoff * 2^(n-1)` capped at
/// `max_backoff`, with jitter in its upper half.
fn backoff(settings: &DeliverySettings, n: i32) -> Duration {
    let exp = settings
        .backoff
        .saturating_mul(1u32 << n.clamp(1, 20).saturating_sub(1))
        .min(settings.max_backoff);
    let mut byte = [0u8; 1];
    let jitter = match getrandom::fill(&mut byte) {
        Ok(()) => f64::from(byte[0]) / 255.0,
        Err(_) => 0.5,
    };
    exp.mul_f64(0.5 + 0.5 * jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_hmac_sha256_of_time_dot_body_and_changes_with_each() {
        let secret = "whsec_0123456789abcdef0123456789abcdef";
        let body = br#"{"id":"x"}"#;
        // Computed apart: python3 -c 'import hmac, hashlib;
        // print(hmac.new(SECRET, b"1800000000." + BODY, hashlib.sha256).hexdigest())'
        assert_eq!(
            sign(secret, 1_800_000_000, body),
            "t=1800000000,v1=3ec5b654bd9696bc248c47aafb8bdd71d7c3e4fc8f3dbc4d2caf693acc0b5bbe"
        );
        let base = sign(secret, 1_800_000_000, body);
        assert_ne!(
            sign("whsec_another_secret_of_enough_length", 1_800_000_000, body),
            base
        );
        assert_ne!(sign(secret, 1_800_000_000, br#"{"id":"y"}"#), base);
        // The timestamp is signed: another time, another signature.
        let later = sign(secret, 1_800_000_200, body);
        assert_ne!(
            later.split_once(",v1=").map(|(_, v)| v),
            base.split_once(",v1=").map(|(_, v)| v)
        );
    }

    #[test]
    fn backoff_doubles_within_its_cap() {
        let s = DeliverySettings {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            poll: Duration::from_secs(1),
        };
        for (n, full) in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)] {
            let d = backoff(&s, n);
            let full = Duration::from_secs(full);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {n}: {d:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
    }
}
