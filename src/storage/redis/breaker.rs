//! The circuit breaker: after `failures` consecutive failed calls spanning
//! at least one store timeout, stop calling Redis and answer at once (by the
//! failure mode) until a background probe gets an answer; the store runs the
//! probe every cool-down.
//!
//! Why the span: with many calls in flight, one latency spike times out a
//! whole batch of them at once, which is not "Redis is down" (the calls sent
//! after the spike succeed). Measured under load on a busy host, a plain
//! count opened the breaker on such a spike and turned 500 ms of traffic
//! into failure-mode answers. Requiring that no call succeeded for a whole
//! store timeout still opens within about that long when Redis is down.
//!
//! State changes are logged once, at warn; the calls that fail while it is
//! open are not logged at all (the service counts them in a metric).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use metrics::{counter, gauge};
use tokio::time::Instant;

use crate::storage::{StoreError, StoreHealth};
use crate::telemetry::names;

const STARTING: u8 = 0;
const CLOSED: u8 = 1;
const OPEN: u8 = 2;

#[derive(Debug)]
pub struct Breaker {
    store: &'static str,
    failures_to_open: u32,
    /// The least time a run of failures must span to open the breaker.
    min_span: Duration,
    cooldown: Duration,
    state: AtomicU8,
    consecutive: AtomicU32,
    /// When the current run of failures began, µs after `epoch`.
    run_started_us: AtomicU64,
    /// Tokio's clock, so tests can pause it.
    epoch: Instant,
    /// Why it opened, for `/readyz`.
    reason: Mutex<String>,
}

impl Breaker {
    pub fn new(
        store: &'static str,
        failures_to_open: u32,
        min_span: Duration,
        cooldown: Duration,
    ) -> Breaker {
        gauge!(names::BREAKER_OPEN, "store" => store).set(0.0);
        Breaker {
            store,
            failures_to_open: failures_to_open.max(1),
            min_span,
            cooldown,
            state: AtomicU8::new(STARTING),
            consecutive: AtomicU32::new(0),
            run_started_us: AtomicU64::new(0),
            epoch: Instant::now(),
            reason: Mutex::new(String::new()),
        }
    }

    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Whether a call may go to Redis now.
    pub fn allows(&self) -> bool {
        self.state.load(Ordering::Acquire) != OPEN
    }

    pub fn is_open(&self) -> bool {
        !self.allows()
    }

    /// A call got answers.
    pub fn record_success(&self) {
        // Only write when there is something to reset: the common path stays
        // a shared read of the cache line.
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.state.load(Ordering::Relaxed) == STARTING
            && self
                .state
                .compare_exchange(STARTING, CLOSED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(store = self.store, "counter store connected");
        }
    }

    /// A call failed. Returns true when this failure opened the breaker, so
    /// the caller starts the probe (exactly one probe runs per opening).
    pub fn record_failure(&self, error: &StoreError) -> bool {
        if !error.is_transient() {
            return false;
        }
        let now_us = self.epoch.elapsed().as_micros() as u64;
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            self.run_started_us.store(now_us, Ordering::Relaxed);
        }
        let span = Duration::from_micros(
            now_us.saturating_sub(self.run_started_us.load(Ordering::Relaxed)),
        );
        n >= self.failures_to_open
            && span >= self.min_span
            && self.open(&format!(
                "{n} consecutive failures in {span:?}, last: {error}"
            ))
    }

    /// Opens the breaker (also used when Redis cannot be reached at start).
    /// Returns true if it was not open already.
    pub fn open(&self, reason: &str) -> bool {
        if self.state.swap(OPEN, Ordering::AcqRel) == OPEN {
            return false;
        }
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_owned();
        tracing::warn!(
            store = self.store,
            reason,
            cooldown = ?self.cooldown,
            "counter store circuit opened: answering by the failure mode until it answers again"
        );
        gauge!(names::BREAKER_OPEN, "store" => self.store).set(1.0);
        counter!(names::BREAKER_TRANSITIONS, "store" => self.store, "to" => "open").increment(1);
        true
    }

    /// A probe got an answer.
    pub fn close(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        match self.state.swap(CLOSED, Ordering::AcqRel) {
            OPEN => {
                tracing::warn!(
                    store = self.store,
                    "counter store circuit closed: deciding again"
                );
                gauge!(names::BREAKER_OPEN, "store" => self.store).set(0.0);
                counter!(names::BREAKER_TRANSITIONS, "store" => self.store, "to" => "closed")
                    .increment(1);
            }
            STARTING => tracing::info!(store = self.store, "counter store connected"),
            _ => {}
        }
    }

    pub fn health(&self) -> StoreHealth {
        match self.state.load(Ordering::Acquire) {
            CLOSED => StoreHealth::Up,
            STARTING => StoreHealth::Down("connecting".into()),
            _ => StoreHealth::Down(format!(
                "circuit open ({})",
                self.reason.lock().unwrap_or_else(|p| p.into_inner())
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_spanning_the_timeout() {
        let ms = Duration::from_millis;
        let b = Breaker::new("test", 3, ms(50), ms(100));
        let e = StoreError::Connection("refused".into());
        assert!(!b.record_failure(&e));
        advance(ms(60)).await;
        assert!(!b.record_failure(&e));
        b.record_success();
        advance(ms(40)).await;
        assert!(!b.record_failure(&e));
        advance(ms(1)).await;
        assert!(!b.record_failure(&e));
        advance(ms(1)).await;
        assert!(!b.record_failure(&e), "three at once: a spike");
        assert!(b.allows());
        advance(ms(48) - Duration::from_micros(1)).await;
        assert!(!b.record_failure(&e), "a microsecond short of the timeout");
        advance(Duration::from_micros(1)).await;
        assert!(b.record_failure(&e), "still failing a timeout later");
        assert!(!b.allows());
        advance(ms(50)).await;
        assert!(!b.record_failure(&e), "only one opening per outage");
        assert!(matches!(b.health(), StoreHealth::Down(r) if r.contains("refused")));
        b.close();
        assert!(b.allows());
        assert_eq!(b.health(), StoreHealth::Up);
    }

    #[test]
    fn script_errors_do_not_count() {
        let b = Breaker::new("test", 1, Duration::ZERO, Duration::from_millis(100));
        assert!(!b.record_failure(&StoreError::Script("bug".into())));
        assert!(b.allows());
    }
}
