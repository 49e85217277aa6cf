//! Usage metering: decisions of requests made with API keys, and every
//! denial, written to PostgreSQL in batches.
//!
//! A decision hands its event to a bounded queue with `try_send` and moves
//! on: when the queue is full the event is dropped and counted
//! (`sluice_usage_dropped_total`), so metering never slows or blocks a
//! decision. One writer task folds events into per-minute sums and per-batch
//! violation counts and writes them every `--usage-flush` and at shutdown.
//! A failed write keeps the sums for the next attempt (up to a bound).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike as _, Utc};
use metrics::counter;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::limiter::{Caller, Code, Decision, KeyHasher, Request, MONTHLY_QUOTA};
use crate::telemetry::names;

/// Distinct (tenant, domain, hour) and violation rows held while
/// PostgreSQL cannot be written; beyond it events are dropped and counted.
const MAX_PENDING: usize = 100_000;

/// What one decision adds to the usage records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageEvent {
    pub at_us: u64,
    /// The tenant of the first API key in the request, if any.
    pub tenant_id: Option<Arc<str>>,
    pub domain: Arc<str>,
    pub allowed: bool,
    pub violations: Vec<Violation>,
}

/// One descriptor denied.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Violation {
    pub tenant_id: Option<Arc<str>>,
    /// The rule's name, else its path; `monthly_quota`; `unknown_api_key`;
    /// `limit_override` for a caller's own limit.
    pub rule: Arc<str>,
    /// Keyed hash of the descriptor's entries: the counter that was full.
    pub client_id: String,
}

/// The sending side, held by the rate limiter. Cheap to clone.
#[derive(Clone)]
pub struct UsageRecorder {
    events: mpsc::Sender<UsageEvent>,
    close: mpsc::Sender<oneshot::Sender<()>>,
}

impl UsageRecorder {
    /// A recorder and its writer, which writes to `pool` (the primary) until
    /// [`UsageRecorder::close`]; the caller runs the writer as a task it owns.
    pub fn new(
        pool: PgPool,
        flush_every: Duration,
        queue: usize,
    ) -> (UsageRecorder, impl Future<Output = ()> + Send + 'static) {
        let (recorder, events, close) = UsageRecorder::channel(queue);
        let writer = run(Writer::new(pool), events, close, flush_every);
        (recorder, writer)
    }

    /// A recorder and the receiving ends, for a writer of one's own (tests).
    pub fn channel(
        queue: usize,
    ) -> (
        UsageRecorder,
        mpsc::Receiver<UsageEvent>,
        mpsc::Receiver<oneshot::Sender<()>>,
    ) {
        let (events_tx, events_rx) = mpsc::channel(queue.max(1));
        let (close_tx, close_rx) = mpsc::channel(1);
        let recorder = UsageRecorder {
            events: events_tx,
            close: close_tx,
        };
        (recorder, events_rx, close_rx)
    }

    /// Counts one decided request.
    pub fn record_decision(
        &self,
        request: &Request<'_>,
        callers: &[Caller<'_>],
        decision: &Decision<'_>,
        hasher: &KeyHasher,
        now_us: u64,
    ) {
        let violations: Vec<Violation> = decision
            .statuses
            .iter()
            .enumerate()
            .filter(|(_, s)| s.code == Code::OverLimit)
            .map(|(i, s)| {
                let rule: Arc<str> = if s.refused {
                    Arc::from("unknown_api_key")
                } else if s.tenant_quota {
                    Arc::from(MONTHLY_QUOTA)
                } else {
                    // The limit that denied: with several on a rule, its own name.
                    let limit_name = s.limit.as_ref().and_then(|l| l.name.clone());
                    match s.rule {
                        Some(r) => limit_name
                            .or_else(|| r.name.clone())
                            .unwrap_or_else(|| r.path.clone()),
                        None => Arc::from("limit_override"),
                    }
                };
                Violation {
                    tenant_id: tenant_of(callers.get(i)),
                    rule,
                    client_id: client_id(hasher, request, i),
                }
            })
            .collect();
        let tenant_id = callers.iter().find_map(|c| tenant_of(Some(c)));
        if tenant_id.is_none() && violations.is_empty() {
            return;
        }
        self.send(UsageEvent {
            at_us: now_us,
            tenant_id,
            domain: request.domain.into(),
            allowed: decision.overall == Code::Ok,
            violations,
        });
    }

    /// Counts a request let through without a decision (the store failed
    /// and the failure mode allows).
    pub fn record_allowed(&self, request: &Request<'_>, callers: &[Caller<'_>], now_us: u64) {
        if let Some(tenant_id) = callers.iter().find_map(|c| tenant_of(Some(c))) {
            self.send(UsageEvent {
                at_us: now_us,
                tenant_id: Some(tenant_id),
                domain: request.domain.into(),
                allowed: true,
                violations: Vec::new(),
            });
        }
    }

    /// Queues one event, or drops and counts it when the queue is full.
    pub fn send(&self, event: UsageEvent) {
        if self.events.try_send(event).is_err() {
            counter!(names::USAGE_DROPPED, "reason" => "queue_full").increment(1);
        }
    }

    /// Writes everything queued and stops the writer, waiting at most
    /// `timeout`; `false` if it did not finish in time.
    pub async fn close(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        if self.close.try_send(done_tx).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, done_rx).await, Ok(Ok(())))
    }
}

fn tenant_of(caller: Option<&Caller<'_>>) -> Option<Arc<str>> {
    match caller {
        Some(Caller::Key(key)) => Some(key.tenant_id.clone()),
        _ => None,
    }
}

fn client_id(hasher: &KeyHasher, request: &Request<'_>, index: usize) -> String {
    let mut joined = String::new();
    if let Some(d) = request.descriptors.get(index) {
        for e in &d.entries {
            joined.push_str(e.key);
            joined.push('\u{1f}');
            joined.push_str(e.value);
            joined.push('\u{1e}');
        }
    }
    hasher.client_id(&joined)
}

// === The writer ===

/// Usage sums' key: tenant id, domain, minute start (Unix seconds).
pub type UsageKey = (Arc<str>, Arc<str>, i64);
/// A `violations` row's key: tenant id, domain, rule, client.
pub type ViolationKey = (Option<Arc<str>>, Arc<str>, Arc<str>, String);

/// Events folded into rows, waiting to be written.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// -> (allowed, denied).
    pub usage: HashMap<UsageKey, (i64, i64)>,
    /// -> (first seen in µs, hits).
    pub violations: HashMap<ViolationKey, (u64, i64)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.usage.is_empty() && self.violations.is_empty()
    }

    fn len(&self) -> usize {
        self.usage.len() + self.violations.len()
    }

    /// Folds one event in; `false` (and nothing added) when full.
    pub fn add(&mut self, event: UsageEvent) -> bool {
        if self.len() + 1 + event.violations.len() > MAX_PENDING {
            return false;
        }
        fold(
            &mut self.usage,
            &mut self.violations,
            event,
            60,
            |v, domain, _minute| (v.tenant_id, domain, v.rule, v.client_id),
        );
        true
    }
}

/// Folds one event into per-bucket usage sums, `(allowed, denied)` per
/// tenant, domain and bucket start (Unix seconds, buckets of `bucket_s`),
/// and into violation counts, `(first seen in µs, hits)` under `key`. The
/// one fold behind the PostgreSQL writer and the event stream.
pub fn fold<K, N>(
    usage: &mut HashMap<UsageKey, (N, N)>,
    violations: &mut HashMap<K, (u64, N)>,
    event: UsageEvent,
    bucket_s: u64,
    key: impl Fn(Violation, Arc<str>, i64) -> K,
) where
    K: std::hash::Hash + Eq,
    N: Default + std::ops::AddAssign + From<u8>,
{
    let bucket = (event.at_us / 1_000_000 / bucket_s * bucket_s) as i64;
    if let Some(tenant) = event.tenant_id {
        let sums = usage
            .entry((tenant, event.domain.clone(), bucket))
            .or_default();
        if event.allowed {
            sums.0 += N::from(1);
        } else {
            sums.1 += N::from(1);
        }
    }
    for v in event.violations {
        let entry = violations
            .entry(key(v, event.domain.clone(), bucket))
            .or_insert((event.at_us, N::default()));
        entry.0 = entry.0.min(event.at_us);
        entry.1 += N::from(1);
    }
}

struct Writer {
    pool: PgPool,
    /// Months (year * 12 + month - 1) whose violations partition exists.
    partitions: HashSet<i32>,
    failing: bool,
}

impl Writer {
    fn new(pool: PgPool) -> Writer {
        Writer {
            pool,
            partitions: HashSet::new(),
            failing: false,
        }
    }

    /// Writes and empties the batch; on failure keeps it for the next try.
    async fn flush(&mut self, batch: &mut Batch) {
        if batch.is_empty() {
            return;
        }
        match self.write(batch).await {
            Ok(()) => {
                *batch = Batch::default();
                counter!(names::USAGE_FLUSHES, "result" => "success").increment(1);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("usage records written again");
                }
            }
            Err(e) => {
                counter!(names::USAGE_FLUSHES, "result" => "failure").increment(1);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(error = %e, "cannot write usage records; keeping them in memory and retrying");
                }
            }
        }
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let months = write_batch(&mut tx, batch, &self.partitions).await?;
        tx.commit().await?;
        self.partitions.extend(months);
        Ok(())
    }
}

/// Adds a batch's sums to `usage_hourly` and `usage_monthly`, and its rows
/// to `violations`, inside the caller's transaction (the writer here, the `usage` event
/// consumer in `events`). `partitions` are the months known to exist;
/// returns those created, to remember once the transaction commits.
pub async fn write_batch(
    tx: &mut sqlx::PgConnection,
    batch: &Batch,
    partitions: &HashSet<i32>,
) -> Result<HashSet<i32>, sqlx::Error> {
    let mut months = HashSet::new();
    if !batch.usage.is_empty() {
        let mut tenants = Vec::with_capacity(batch.usage.len());
        let mut domains = Vec::with_capacity(batch.usage.len());
        let mut minutes = Vec::with_capacity(batch.usage.len());
        let mut allowed = Vec::with_capacity(batch.usage.len());
        let mut denied = Vec::with_capacity(batch.usage.len());
        for ((tenant, domain, minute), (a, d)) in &batch.usage {
            tenants.push(tenant.to_string());
            domains.push(domain.to_string());
            minutes.push(DateTime::<Utc>::from_timestamp(*minute, 0).unwrap_or_default());
            allowed.push(*a);
            denied.push(*d);
        }
        // Minutes sum into hours (UTC) and into billing cycles: calendar
        // months in each tenant's zone, exact in every zone since zone
        // offsets are whole minutes. A tenant deleted meanwhile loses its
        // last rows rather than failing the batch for everyone.
        sqlx::query(
            "WITH u AS (
                 SELECT t.id AS tenant_id, t.time_zone, u.domain, u.minute, u.allowed, u.denied
                 FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::int8[], $5::int8[])
                      AS u(tenant_id, domain, minute, allowed, denied)
                 JOIN tenants t ON t.id = u.tenant_id::uuid
             ), hourly AS (
                 INSERT INTO usage_hourly (tenant_id, domain, hour, allowed, denied)
                 SELECT tenant_id, domain, date_trunc('hour', minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                        sum(allowed)::int8, sum(denied)::int8
                 FROM u GROUP BY 1, 2, 3
                 ON CONFLICT (tenant_id, domain, hour) DO UPDATE
                 SET allowed = usage_hourly.allowed + EXCLUDED.allowed,
                     denied = usage_hourly.denied + EXCLUDED.denied
             )
             INSERT INTO usage_monthly (tenant_id, domain, cycle, allowed, denied)
             SELECT tenant_id, domain, date_trunc('month', minute AT TIME ZONE time_zone)::date,
                    sum(allowed)::int8, sum(denied)::int8
             FROM u GROUP BY 1, 2, 3
             ON CONFLICT (tenant_id, cycle, domain) DO UPDATE
             SET allowed = usage_monthly.allowed + EXCLUDED.allowed,
                 denied = usage_monthly.denied + EXCLUDED.denied",
        )
        .bind(tenants)
        .bind(domains)
        .bind(minutes)
        .bind(allowed)
        .bind(denied)
        .execute(&mut *tx)
        .await?;
    }
    if !batch.violations.is_empty() {
        let mut ats = Vec::with_capacity(batch.violations.len());
        let mut tenants = Vec::with_capacity(batch.violations.len());
        let mut domains = Vec::with_capacity(batch.violations.len());
        let mut rules = Vec::with_capacity(batch.violations.len());
        let mut clients = Vec::with_capacity(batch.violations.len());
        let mut hits = Vec::with_capacity(batch.violations.len());
        for ((tenant, domain, rule, client), (at_us, n)) in &batch.violations {
            let at = DateTime::<Utc>::from_timestamp_micros(*at_us as i64).unwrap_or_default();
            let month = at.year() * 12 + at.month0() as i32;
            if !partitions.contains(&month) && months.insert(month) {
                sqlx::query("SELECT sluice_violations_partition($1)")
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
            }
            ats.push(at);
            tenants.push(tenant.as_deref().map(str::to_owned));
            domains.push(domain.to_string());
            rules.push(rule.to_string());
            clients.push(client.clone());
            hits.push(*n);
        }
        sqlx::query(
            "INSERT INTO violations (at, tenant_id, domain, rule, client_id, hits)
             SELECT v.at, v.tenant_id::uuid, v.domain, v.rule, v.client_id, v.hits
             FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[])
                  AS v(at, tenant_id, domain, rule, client_id, hits)",
        )
        .bind(ats)
        .bind(tenants)
        .bind(domains)
        .bind(rules)
        .bind(clients)
        .bind(hits)
        .execute(&mut *tx)
        .await?;
    }
    Ok(months)
}

async fn run(
    mut writer: Writer,
    mut events: mpsc::Receiver<UsageEvent>,
    mut close: mpsc::Receiver<oneshot::Sender<()>>,
    flush_every: Duration,
) {
    let mut batch = Batch::default();
    let mut ticker = tokio::time::interval(flush_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let add = |batch: &mut Batch, event: UsageEvent| {
        if !batch.add(event) {
            counter!(names::USAGE_DROPPED, "reason" => "backlog_full").increment(1);
        }
    };
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => add(&mut batch, event),
                None => {
                    writer.flush(&mut batch).await;
                    return;
                }
            },
            _ = ticker.tick() => writer.flush(&mut batch).await,
            Some(done) = close.recv() => {
                while let Ok(event) = events.try_recv() {
                    add(&mut batch, event);
                }
                writer.flush(&mut batch).await;
                if !batch.is_empty() {
                    tracing::warn!(rows = batch.len(), "usage records not written at shutdown");
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        tenant: Option<&str>,
        at_us: u64,
        allowed: bool,
        violations: &[(&str, &str)],
    ) -> UsageEvent {
        UsageEvent {
            at_us,
            tenant_id: tenant.map(Arc::from),
            domain: "api".into(),
            allowed,
            violations: violations
                .iter()
                .map(|&(rule, client)| Violation {
                    tenant_id: tenant.map(Arc::from),
                    rule: rule.into(),
                    client_id: client.into(),
                })
                .collect(),
        }
    }

    const HOUR_US: u64 = 3_600 * 1_000_000;
    const MINUTE_US: u64 = 60 * 1_000_000;

    #[test]
    fn events_fold_into_minute_sums_and_violation_counts() {
        let mut b = Batch::default();
        let t0 = 490_000 * HOUR_US;
        assert!(b.add(event(Some("t"), t0 + 5, true, &[])));
        assert!(b.add(event(Some("t"), t0 + MINUTE_US - 1, false, &[("r", "c")])));
        assert!(b.add(event(Some("t"), t0 + MINUTE_US, true, &[])));
        assert!(b.add(event(Some("t"), t0 + 7, false, &[("r", "c")])));
        assert!(b.add(event(None, t0 + 9, false, &[("r", "c")])));
        let minute = (t0 / 1_000_000) as i64;
        assert_eq!(b.usage[&("t".into(), "api".into(), minute)], (1, 2));
        assert_eq!(b.usage[&("t".into(), "api".into(), minute + 60)], (1, 0));
        assert_eq!(b.usage.len(), 2);
        let key = (
            Some(Arc::from("t")),
            Arc::from("api"),
            Arc::from("r"),
            "c".to_owned(),
        );
        assert_eq!(b.violations[&key], (t0 + 7, 2));
        assert_eq!(b.violations.len(), 2);
    }

    #[test]
    fn a_full_backlog_refuses_events() {
        let mut b = Batch::default();
        for i in 0..MAX_PENDING as u64 {
            assert!(b.add(event(Some("t"), i * HOUR_US, true, &[])));
        }
        assert!(!b.add(event(Some("t"), u64::MAX / 2, true, &[])));
    }

    #[tokio::test]
    async fn a_full_queue_drops_without_waiting() {
        let (recorder, mut rx, _close) = UsageRecorder::channel(2);
        for _ in 0..5 {
            recorder.send(event(Some("t"), 1, true, &[]));
        }
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 2);
    }
}
