//! Readiness, shared by `/readyz` and gRPC health: whether this instance
//! should receive traffic, and why not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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
        }
    }
}
