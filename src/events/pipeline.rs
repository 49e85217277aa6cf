//! From decisions to the broker: the usage recorder's queue is read by an
//! aggregator, which folds decisions into per-minute sums and spools them
//! every flush interval, and a publisher, which sends the spool in order
//! and forgets only what the broker confirmed.
//!
//! Two tasks, so a slow broker never stalls the reading of the decision
//! queue: while the publisher waits for confirmations, the aggregator keeps
//! folding and spooling. Events are dropped only when the spool is full
//! (or the disk fails), counted and logged once per `DROP_LOG_EVERY`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot, Notify};

use super::spool::Spool;
use super::{
    Event, EventSink, Record, RequestLogData, RequestLogViolation, Topic, UsageData, ViolationData,
};
use crate::health::EventsStatus;
use crate::telemetry::names;
use crate::usage::{self, UsageEvent, UsageKey, UsageRecorder};

/// Records sent per publish (and awaited confirmations).
const PUBLISH_BATCH: usize = 500;
/// Distinct usage and violation keys held between two flushes.
const MAX_AGGREGATED: usize = 100_000;
/// Sampled request logs held between two flushes.
const MAX_REQUEST_LOGS: usize = 10_000;
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct PipelineSettings {
    /// Names this sluice in every event.
    pub instance: String,
    /// How often aggregated sums become events.
    pub flush_every: Duration,
    /// The share of metered decisions also sent as `request-logs`, 0 to 1.
    pub request_log_sample: f64,
    /// Decisions waiting to be aggregated (the usage recorder's queue).
    pub queue: usize,
}

/// What the two tasks share.
struct Shared {
    spool: Mutex<Spool>,
    appended: Notify,
    status: Arc<EventsStatus>,
}

impl Shared {
    fn spool(&self) -> MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report_spool(&self, spool: &Spool) {
        self.status
            .spool_bytes
            .store(spool.bytes(), Ordering::Relaxed);
        self.status
            .spool_events
            .store(spool.len(), Ordering::Relaxed);
        gauge!(names::EVENTS_SPOOL_BYTES).set(spool.bytes() as f64);
        gauge!(names::EVENTS_SPOOL_EVENTS).set(spool.len() as f64);
    }
}

/// The recorder the rate limiter holds, and the two tasks (aggregator and
/// publisher) for the caller to own. Closing the recorder spools what is
/// aggregated and lets the publisher try to send the spool before it
/// answers; what it could not send stays in the spool for the next start.
pub fn start(
    settings: PipelineSettings,
    spool: Spool,
    sink: Box<dyn EventSink>,
    status: Arc<EventsStatus>,
) -> (
    UsageRecorder,
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (recorder, events, close) = UsageRecorder::channel(settings.queue);
    let shared = Arc::new(Shared {
        spool: Mutex::new(spool),
        appended: Notify::new(),
        status,
    });
    shared.report_spool(&shared.spool());
    let (drain_tx, drain_rx) = mpsc::channel(1);
    let aggregator = Aggregator::new(settings, shared.clone()).run(events, close, drain_tx);
    let publisher = publish(shared, sink, drain_rx);
    (recorder, aggregator, publisher)
}

// === The aggregator ===

type ViolationKey = (Option<Arc<str>>, Arc<str>, Arc<str>, String, i64);

struct Aggregator {
    settings: PipelineSettings,
    shared: Arc<Shared>,
    /// -> (allowed, denied)
    usage: HashMap<UsageKey, (u64, u64)>,
    /// -> (first µs, hits)
    violations: HashMap<ViolationKey, (u64, u64)>,
    request_logs: Vec<RequestLogData>,
    /// xorshift state for sampling: no need for a cryptographic source.
    rng: u64,
    dropped_unlogged: u64,
    last_drop_log: Option<tokio::time::Instant>,
}

impl Aggregator {
    fn new(settings: PipelineSettings, shared: Arc<Shared>) -> Aggregator {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Aggregator {
            settings,
            shared,
            usage: HashMap::new(),
            violations: HashMap::new(),
            request_logs: Vec::new(),
            rng: u64::from_le_bytes(seed) | 1,
            dropped_unlogged: 0,
            last_drop_log: None,
        }
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<UsageEvent>,
        mut close: mpsc::Receiver<oneshot::Sender<()>>,
        drain: mpsc::Sender<oneshot::Sender<()>>,
    ) {
        let mut ticker = tokio::time::interval(self.settings.flush_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.add(event),
                    None => {
                        self.flush();
                        return;
                    }
                },
                _ = ticker.tick() => self.flush(),
                Some(done) = close.recv() => {
                    while let Ok(event) = events.try_recv() {
                        self.add(event);
                    }
                    self.flush();
                    let (tx, rx) = oneshot::channel();
                    if drain.send(tx).await.is_ok() {
                        let _ = rx.await;
                    }
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn add(&mut self, event: UsageEvent) {
        let sample = self.settings.request_log_sample;
        if sample > 0.0 && self.random() < sample {
            if self.request_logs.len() < MAX_REQUEST_LOGS {
                self.request_logs.push(RequestLogData {
                    at: time_of(event.at_us),
                    tenant_id: event.tenant_id.as_deref().map(str::to_owned),
                    domain: event.domain.to_string(),
                    allowed: event.allowed,
                    violations: event
                        .violations
                        .iter()
                        .map(|v| RequestLogViolation {
                            rule: v.rule.to_string(),
                            client_id: v.client_id.clone(),
                        })
                        .collect(),
                });
            } else {
                self.dropped(1);
            }
        }
        if self.usage.len() + self.violations.len() + 1 + event.violations.len() > MAX_AGGREGATED {
            self.dropped(1);
            return;
        }
        usage::fold(
            &mut self.usage,
            &mut self.violations,
            event,
            60,
            |v, domain, minute| (v.tenant_id, domain, v.rule, v.client_id, minute),
        );
    }

    /// The sums so far become events, appended to the spool.
    fn flush(&mut self) {
        if self.usage.is_empty() && self.violations.is_empty() && self.request_logs.is_empty() {
            return;
        }
        let now = Utc::now();
        let instance = self.settings.instance.as_str();
        let mut records = Vec::with_capacity(self.usage.len() + self.violations.len());
        for ((tenant, domain, minute), (allowed, denied)) in self.usage.drain() {
            let data = UsageData {
                tenant_id: tenant.to_string(),
                domain: domain.to_string(),
                minute: time_of(minute as u64 * 1_000_000),
                allowed,
                denied,
            };
            let event = Event::new(Topic::Usage, instance, now, data);
            records.push(Record::of(&event, Some(&tenant)));
        }
        for ((tenant, domain, rule, client, minute), (first_us, hits)) in self.violations.drain() {
            let data = ViolationData {
                tenant_id: tenant.as_deref().map(str::to_owned),
                domain: domain.to_string(),
                rule: rule.to_string(),
                client_id: client,
                minute: time_of(minute as u64 * 1_000_000),
                first_at: time_of(first_us),
                hits,
            };
            let event = Event::new(Topic::RateLimitViolations, instance, now, data);
            records.push(Record::of(&event, tenant.as_deref()));
        }
        for data in self.request_logs.drain(..) {
            let key = data.tenant_id.clone();
            let event = Event::new(Topic::RequestLogs, instance, now, data);
            records.push(Record::of(&event, key.as_deref()));
        }
        let appended = {
            let mut spool = self.shared.spool();
            let appended = match spool.append(&records) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the event spool");
                    0
                }
            };
            self.shared.report_spool(&spool);
            appended
        };
        if appended > 0 {
            self.shared.appended.notify_one();
        }
        self.dropped((records.len() - appended) as u64);
    }

    /// Counts dropped events; logs at most once per `DROP_LOG_EVERY`.
    fn dropped(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.shared.status.dropped.fetch_add(n, Ordering::Relaxed);
        counter!(names::EVENTS_DROPPED).increment(n);
        self.dropped_unlogged += n;
        let now = tokio::time::Instant::now();
        if self
            .last_drop_log
            .is_none_or(|last| now.duration_since(last) >= DROP_LOG_EVERY)
        {
            tracing::warn!(
                dropped = self.dropped_unlogged,
                "event spool full: events dropped (see sluice_events_dropped_total)"
            );
            self.dropped_unlogged = 0;
            self.last_drop_log = Some(now);
        }
    }
}

fn time_of(us: u64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(us as i64).unwrap_or_default()
}

// === The publisher ===

async fn publish(
    shared: Arc<Shared>,
    mut sink: Box<dyn EventSink>,
    mut drain: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let status = shared.status.clone();
    let mut draining: Option<oneshot::Sender<()>> = None;
    let mut backoff = BACKOFF_MIN;
    let mut failed = false;
    loop {
        let batch = match shared.spool().peek(PUBLISH_BATCH) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the event spool");
                Vec::new()
            }
        };
        if batch.is_empty() {
            if let Some(done) = draining.take() {
                let _ = done.send(());
            }
            tokio::select! {
                () = shared.appended.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                Some(done) = drain.recv() => draining = Some(done),
            }
            continue;
        }
        let count = batch.len() as u64;
        let bytes: u64 = batch.iter().map(|(_, n)| n).sum();
        let records: Vec<Record> = batch
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| !r.body.is_empty())
            .collect();
        let n = records.len() as u64;
        status.published.fetch_add(n, Ordering::Relaxed);
        counter!(names::EVENTS_PUBLISHED).increment(n);
        if failed {
            status.retried.fetch_add(n, Ordering::Relaxed);
            counter!(names::EVENTS_RETRIED).increment(n);
        }
        match sink.publish(&records).await {
            Ok(()) => {
                {
                    let mut spool = shared.spool();
                    if let Err(e) = spool.commit(count, bytes) {
                        tracing::error!(error = %e, "cannot advance the event spool's cursor");
                    }
                    shared.report_spool(&spool);
                }
                status.confirmed.fetch_add(n, Ordering::Relaxed);
                counter!(names::EVENTS_CONFIRMED).increment(n);
                if failed {
                    tracing::info!(broker = %sink.describe(), "event broker back; sending the spool");
                }
                status.set_broker("up");
                gauge!(names::EVENTS_BROKER_UP).set(1.0);
                failed = false;
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                if !failed {
                    tracing::warn!(broker = %sink.describe(), error = %e, "cannot publish events; spooling them and retrying");
                }
                status.set_broker(&format!("down: {e}"));
                gauge!(names::EVENTS_BROKER_UP).set(0.0);
                failed = true;
                // At shutdown, stop trying: the spool keeps the events for
                // the next start.
                if let Some(done) = draining.take() {
                    let _ = done.send(());
                }
                tokio::select! {
                    () = tokio::time::sleep(jittered(backoff)) => {}
                    Some(done) = drain.recv() => {
                        let _ = done.send(());
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Between half and all of `d`, so instances do not retry in step.
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let frac = 0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0;
    d.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::SinkError;
    use crate::usage::Violation;

    /// A sink that fails while `down` is set and records what it confirms.
    #[derive(Clone, Default)]
    struct FakeSink {
        down: Arc<std::sync::atomic::AtomicBool>,
        confirmed: Arc<Mutex<Vec<Record>>>,
    }

    #[async_trait::async_trait]
    impl EventSink for FakeSink {
        async fn publish(&mut self, records: &[Record]) -> Result<(), SinkError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(SinkError::Connect("down".into()));
            }
            self.confirmed.lock().unwrap().extend_from_slice(records);
            Ok(())
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn decision(tenant: &str, at_us: u64, allowed: bool) -> UsageEvent {
        UsageEvent {
            at_us,
            tenant_id: Some(tenant.into()),
            domain: "api".into(),
            allowed,
            violations: if allowed {
                vec![]
            } else {
                vec![Violation {
                    tenant_id: Some(tenant.into()),
                    rule: "per_key".into(),
                    client_id: "0123456789abcdef".into(),
                }]
            },
        }
    }

    fn settings() -> PipelineSettings {
        PipelineSettings {
            instance: "test".into(),
            flush_every: Duration::from_millis(50),
            request_log_sample: 0.0,
            queue: 1000,
        }
    }

    fn sums(records: &[Record]) -> (u64, u64, u64, usize) {
        let (mut allowed, mut denied, mut hits, mut usage_events) = (0, 0, 0, 0);
        for r in records {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            match r.topic {
                Topic::Usage => {
                    usage_events += 1;
                    allowed += v["data"]["allowed"].as_u64().unwrap();
                    denied += v["data"]["denied"].as_u64().unwrap();
                }
                Topic::RateLimitViolations => hits += v["data"]["hits"].as_u64().unwrap(),
                _ => {}
            }
        }
        (allowed, denied, hits, usage_events)
    }

    #[tokio::test]
    async fn decisions_are_aggregated_spooled_while_down_and_sent_when_back() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FakeSink::default();
        sink.down.store(true, Ordering::SeqCst);
        let status = Arc::new(EventsStatus::default());
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let (recorder, aggregator, publisher) =
            start(settings(), spool, Box::new(sink.clone()), status.clone());
        let aggregator = tokio::spawn(aggregator);
        let publisher = tokio::spawn(publisher);
        let minute = 29_000_000 * 60_000_000;
        for i in 0..100 {
            recorder.send(decision("t", minute + i, i % 4 != 0));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(sink.confirmed.lock().unwrap().is_empty());
        assert!(status.spool_events.load(Ordering::Relaxed) >= 2);
        assert!(status.retried.load(Ordering::Relaxed) > 0);
        sink.down.store(false, Ordering::SeqCst);
        assert!(recorder.close(Duration::from_secs(10)).await);
        let got = sink.confirmed.lock().unwrap().clone();
        assert_eq!(
            sums(&got),
            (75, 25, 25, 1),
            "one usage event for the minute"
        );
        assert_eq!(status.spool_events.load(Ordering::Relaxed), 0);
        assert_eq!(status.dropped.load(Ordering::Relaxed), 0);
        aggregator.await.unwrap();
        publisher.abort();
    }

    #[tokio::test]
    async fn a_full_spool_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FakeSink::default();
        sink.down.store(true, Ordering::SeqCst);
        let status = Arc::new(EventsStatus::default());
        let spool = Spool::open(dir.path(), 600).unwrap();
        let (recorder, aggregator, publisher) =
            start(settings(), spool, Box::new(sink), status.clone());
        let _a = tokio::spawn(aggregator);
        let p = tokio::spawn(publisher);
        for i in 0..20u64 {
            // A new minute each: an event each.
            recorder.send(decision("t", i * 60_000_000, true));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(status.dropped.load(Ordering::Relaxed) > 0);
        assert!(status.spool_bytes.load(Ordering::Relaxed) <= 600);
        p.abort();
    }
}
