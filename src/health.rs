//! Readiness, shared by `/readyz` and gRPC health: whether this instance
//! should receive traffic, and why not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;

/// A counter store's state, as it reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreHealth {
    Up,
    /// Failing; answers come from the failure mode. The reason is for humans.
    Down(String),
}

#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
    /// Describes where the rules in force came from, and any problem.
    rules: Mutex<RulesState>,
    /// The event stream's state, when one is configured.
    events: OnceLock<Arc<EventsStatus>>,
}

/// The event publisher's state, written by its tasks, read by `/readyz`.
#[derive(Debug, Default)]
pub struct EventsStatus {
    broker: Mutex<String>,
    pub spool_bytes: AtomicU64,
    pub spool_events: AtomicU64,
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    pub retried: AtomicU64,
    pub dropped: AtomicU64,
}

/// What `/readyz` shows of the event stream. A broker that is down does
/// not make sluice unready: events wait in the spool.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventsReport {
    /// `connecting`, `up`, or `down: why`.
    pub broker: String,
    pub spool_bytes: u64,
    pub spool_events: u64,
    pub published: u64,
    pub confirmed: u64,
    pub retried: u64,
    pub dropped: u64,
}

impl EventsStatus {
    pub fn set_broker(&self, state: &str) {
        let mut broker = self.broker.lock().unwrap_or_else(|p| p.into_inner());
        if *broker != state {
            state.clone_into(&mut broker);
        }
    }

    pub fn report(&self) -> EventsReport {
        let broker = self.broker.lock().unwrap_or_else(|p| p.into_inner());
        EventsReport {
            broker: if broker.is_empty() {
                "connecting".to_owned()
            } else {
                broker.clone()
            },
            spool_bytes: self.spool_bytes.load(Ordering::Relaxed),
            spool_events: self.spool_events.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            confirmed: self.confirmed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RulesState {
    pub loaded: bool,
    /// e.g. `file:examples/rules`, `postgres`, `snapshot:/var/lib/sluice/rules.json`.
    pub source: String,
    /// The last reload's failure, while the previous rules stay in force.
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ready: bool,
    pub draining: bool,
    pub rules: RulesState,
    pub store: String,
    pub store_state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsReport>,
}

impl Readiness {
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn update_rules(&self, f: impl FnOnce(&mut RulesState)) {
        let mut state = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state);
    }

    /// Shows the event stream's state in the report from now on.
    pub fn set_events(&self, status: Arc<EventsStatus>) {
        let _ = self.events.set(status);
    }

    pub fn rules(&self) -> RulesState {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ready when not draining and rules are loaded. A failing store does
    /// not make the instance unready: it still answers, by the failure mode,
    /// and taking every instance out of rotation would help no one; the
    /// report says so for operators.
    pub fn report(&self, store_kind: &str, store_health: StoreHealth) -> Report {
        let rules = self.rules();
        let draining = self.is_draining();
        let store_state = match store_health {
            StoreHealth::Up => "up".to_owned(),
            StoreHealth::Down(why) => format!("down: {why}"),
        };
        Report {
            ready: !draining && rules.loaded,
            draining,
            rules,
            store: store_kind.to_owned(),
            store_state,
            events: self.events.get().map(|e| e.report()),
        }
    }
}
