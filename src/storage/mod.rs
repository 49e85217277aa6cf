//! Counter stores. One async trait, applied once per request with all of its
//! counter operations; the in-process store is the default, Redis is shared.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

pub use crate::health::StoreHealth;
pub use crate::limiter::CounterOp;
use crate::limiter::Outcome;

/// Checks and updates counters atomically, one outcome per operation, in
/// order. A denied operation leaves its counter unchanged.
#[async_trait]
pub trait CounterStore: Send + Sync + 'static {
    async fn apply(&self, ops: &[CounterOp]) -> Result<Vec<Outcome>, StoreError>;

    /// Applies one request's operations so that a denied request consumes
    /// nothing: when an operation marked in `vetoes` (one that denies the
    /// whole request; not a shadow-mode rule's) is denied, no counter
    /// changes, and every admitted operation reports what a check with 0
    /// hits would. Otherwise it is [`CounterStore::apply`].
    ///
    /// envoyproxy/ratelimit counts a request against every descriptor even
    /// when one denies it, so a client hammering a tight limit drains its
    /// wider ones; this is the method that prevents that.
    ///
    /// The default is [`apply_in_two_steps`]; a store that can check and
    /// update several counters atomically should override it, as the
    /// in-process store and a standalone Redis do.
    async fn apply_request(
        &self,
        ops: &[CounterOp],
        vetoes: &[bool],
    ) -> Result<Vec<Outcome>, StoreError> {
        apply_in_two_steps(self, ops, vetoes).await
    }

    /// Whether the store can answer now, for readiness probes.
    fn health(&self) -> StoreHealth {
        StoreHealth::Up
    }

    /// A short name for logs and `/readyz`: `memory`, `redis`, `redis-cluster`.
    fn kind(&self) -> &'static str;
}

/// [`CounterStore::apply_request`] for a store that can only apply: ask first
/// with 0 hits (a hit is admitted exactly when a 0-hit check is admitted with
/// `remaining >= hits`), then apply: two calls, and only for requests with
/// several operations. Concurrent requests may slip in between the two, so a
/// request denied by one counter may, rarely, have consumed from another; so
/// may a request that names one counter twice when only the second use of it
/// is over (the check sees each use alone).
pub async fn apply_in_two_steps<S: CounterStore + ?Sized>(
    store: &S,
    ops: &[CounterOp],
    vetoes: &[bool],
) -> Result<Vec<Outcome>, StoreError> {
    if ops.len() < 2 || !vetoes.contains(&true) || ops.iter().all(|op| op.hits == 0) {
        return store.apply(ops).await;
    }
    let probes: Vec<CounterOp> = ops.iter().map(|op| CounterOp { hits: 0, ..*op }).collect();
    let probed = store.apply(&probes).await?;
    let denied = |i: usize| !(probed[i].admitted && probed[i].remaining >= ops[i].hits);
    let blocked = |i: usize| vetoes.get(i).copied().unwrap_or(false) && denied(i);
    if !(0..ops.len()).any(blocked) {
        return store.apply(ops).await;
    }
    // Denied: the denied operations again with their hits, which they
    // cannot consume, for their own outcomes (how long to wait); the
    // others only checked.
    let retry: Vec<CounterOp> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| CounterOp {
            hits: if denied(i) { op.hits } else { 0 },
            ..*op
        })
        .collect();
    store.apply(&retry).await
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store connection failed: {0}")]
    Connection(String),
    #[error("cluster redirection failed: {0}")]
    Redirect(String),
    #[error("counter script failed: {0}")]
    Script(String),
    #[error("in-process store is full ({max_keys} keys); raise --memory-max-keys")]
    Full { max_keys: usize },
    #[error("store circuit breaker is open")]
    BreakerOpen,
    #[error("{max} calls already wait for this Redis node; it is slow or stalled")]
    QueueFull { max: usize },
}

impl StoreError {
    /// Transient errors may succeed on a later call; all of sluice's store
    /// errors are answered by the failure mode, but only transient ones count
    /// towards the circuit breaker.
    pub fn is_transient(&self) -> bool {
        !matches!(self, StoreError::Script(_))
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Connection(_) => "connection",
            StoreError::Redirect(_) => "cluster_redirect",
            StoreError::Script(_) => "script",
            StoreError::Full { .. } => "full",
            StoreError::BreakerOpen => "breaker_open",
            StoreError::QueueFull { .. } => "queue_full",
        }
    }
}
