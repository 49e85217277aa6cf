//! Envoy's Rate Limit Quota Service (RLQS): Envoy's
//! `rate_limit_quota` filter groups requests into buckets, decides each
//! request locally from an assignment sluice pushes, and reports per bucket
//! how many requests it allowed and denied. sluice maps buckets onto its
//! rules and counters, so the limit stays global: every Envoy reporting a
//! bucket, through any sluice instance, shares one budget.
//!
//! - A bucket is a descriptor: the report's domain is the rules' domain,
//!   and the bucket id's key/value pairs, in byte order of their keys, are
//!   the descriptor's entries (`{name: weather, client_id: alice}` is
//!   `[(client_id, alice), (name, weather)]`). Its counter is the one a
//!   per-request call with that descriptor uses, keyed by the same keyed
//!   hash: no raw value reaches the store.
//! - A bucket no rule limits (an unknown domain, no match, an `unlimited`
//!   rule) gets ALLOW_ALL for [`ALLOW_ALL_TTL`]. A shadow-mode rule counts
//!   what is reported and allows all.
//! - A limited bucket gets, at every report, a share of the window's
//!   budget (`share`): a token bucket holding that many requests, with a
//!   short time to live; DENY_ALL when nothing is left for it, renewed
//!   when the window turns.
//! - A bucket whose Envoy reports no requests for the idle timeout is
//!   abandoned: Envoy forgets it until a request falls into it again.
//!
//! How Envoy 1.40 takes assignments shapes what is pushed (each checked
//! against Envoy 1.40 in `tests/it/rlqs.rs`):
//! - it drops `requests_per_time_unit` assignments ("not yet supported"),
//!   so shares are token buckets;
//! - a token bucket that differs from the bucket's current one starts empty
//!   unless the current one is full (it carries over the fraction of tokens
//!   left, rounded down), while one that follows a blanket rule starts
//!   full. So each share is sent as DENY_ALL then the token bucket, in one
//!   response: Envoy applies both before any request sees them, and the
//!   token bucket starts full with exactly the share;
//! - it reads whole seconds of `fill_interval` and `assignment_time_to_live`
//!   only. A share's bucket refills one token a day: the share is what the
//!   Envoy may admit until the next answer, not a rate;
//! - it reports every bucket every 5 s ([`ENVOY_REPORT_INTERVAL`]),
//!   whatever `reporting_interval` says, idle buckets included.

mod session;
pub mod share;

pub use session::Session;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::limiter::{bounds, CounterKey, CounterOp, CounterSpec, Entry, KeyHasher, Outcome};
use crate::service::RateLimiter;
use crate::storage::StoreError;

/// How often Envoy 1.40 reports: every 5 s, for every bucket, whatever the
/// bucket's `reporting_interval` (Envoy hard-codes it for now).
pub const ENVOY_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// How long an ALLOW_ALL for a bucket no rule limits lasts: long, so Envoy
/// keeps deciding alone. It is renewed when half of it has passed.
pub const ALLOW_ALL_TTL: Duration = Duration::from_secs(3600);

/// Settings of the quota service (`sluice serve --rlqs-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaSettings {
    /// A bucket reported with no requests for this long is abandoned.
    pub idle_timeout: Duration,
    /// How long a share or a DENY_ALL lasts without being renewed: whole
    /// seconds (Envoy reads no fractions), at least one.
    pub assignment_ttl: Duration,
    /// How often Envoys report each bucket.
    pub report_interval: Duration,
}

impl Default for QuotaSettings {
    fn default() -> QuotaSettings {
        QuotaSettings {
            idle_timeout: Duration::from_secs(60),
            // Three reports' time: one lost answer does not expire a share.
            assignment_ttl: Duration::from_secs(15),
            report_interval: ENVOY_REPORT_INTERVAL,
        }
    }
}

/// The quota service: what every stream shares (the limiter's rules, store,
/// key hasher and clock, and the settings). Each stream has a [`Session`].
pub struct QuotaService {
    limiter: Arc<RateLimiter>,
    settings: QuotaSettings,
}

impl QuotaService {
    pub fn new(limiter: Arc<RateLimiter>, settings: QuotaSettings) -> Arc<QuotaService> {
        Arc::new(QuotaService { limiter, settings })
    }

    pub fn settings(&self) -> &QuotaSettings {
        &self.settings
    }

    /// The state of a new stream.
    pub fn session(self: &Arc<Self>) -> Session {
        Session::new(self.clone())
    }

    fn now_us(&self) -> u64 {
        self.limiter.clock().now_us()
    }

    /// One store call, never longer than the store timeout.
    async fn apply(&self, ops: &[CounterOp]) -> Result<Vec<Outcome>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let timeout = self.limiter.settings().store_timeout;
        match tokio::time::timeout(timeout, self.limiter.store().apply(ops)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }
}

// === Buckets, reports and actions: the domain of the protocol ===

/// A bucket's identity: its key/value pairs, in byte order of the keys.
/// The values are client identifiers: `Debug` shows the keys only.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BucketId(Vec<(String, String)>);

impl BucketId {
    /// From the pairs of a `BucketId` map, in any order.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Result<BucketId, BucketError> {
        let mut pairs: Vec<_> = pairs.into_iter().collect();
        if pairs.is_empty() {
            return Err(BucketError::Empty);
        }
        if pairs.len() > bounds::MAX_ENTRIES {
            return Err(BucketError::TooManyPairs {
                max: bounds::MAX_ENTRIES,
            });
        }
        for (key, value) in &pairs {
            if key.is_empty() {
                return Err(BucketError::EmptyKey);
            }
            if key.len() > bounds::MAX_KEY_LEN {
                return Err(BucketError::KeyTooLong {
                    max: bounds::MAX_KEY_LEN,
                });
            }
            if value.len() > bounds::MAX_VALUE_LEN {
                return Err(BucketError::ValueTooLong {
                    max: bounds::MAX_VALUE_LEN,
                });
            }
        }
        pairs.sort_unstable();
        Ok(BucketId(pairs))
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// The descriptor entries the bucket stands for.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        self.0
            .iter()
            .map(|(key, value)| Entry { key, value })
            .collect()
    }
}

impl fmt::Debug for BucketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(key, _)| key))
            .finish()
    }
}

/// Why a bucket id was refused. The message names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BucketError {
    #[error("bucket_id.bucket: at least one key is required")]
    Empty,
    #[error("bucket_id.bucket: more than {max} keys")]
    TooManyPairs { max: usize },
    #[error("bucket_id.bucket: a key must not be empty")]
    EmptyKey,
    #[error("bucket_id.bucket: a key is longer than {max} bytes")]
    KeyTooLong { max: usize },
    #[error("bucket_id.bucket: a value is longer than {max} bytes")]
    ValueTooLong { max: usize },
}

/// One bucket's usage since the Envoy's last report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub bucket: BucketId,
    pub allowed: u64,
    pub denied: u64,
}

/// One usage report. `domain` is empty on a stream's later reports, which
/// keep the first one's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub domain: String,
    pub usages: Vec<Usage>,
}

/// Why a report ended its stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("domain: must not be empty in a stream's first report")]
    NoDomain,
    #[error("domain: longer than {max} bytes")]
    DomainTooLong { max: usize },
    #[error("domain: a stream keeps its first report's domain; open a new stream for another")]
    DomainChanged,
}

/// How Envoy is to decide a bucket's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assignment {
    AllowAll,
    DenyAll,
    /// Admit this many requests, until the next assignment.
    Share(u32),
}

impl Assignment {
    /// A bounded label for metrics.
    pub fn kind(self) -> &'static str {
        match self {
            Assignment::AllowAll => "allow_all",
            Assignment::DenyAll => "deny_all",
            Assignment::Share(_) => "token_bucket",
        }
    }
}

/// What sluice tells an Envoy about one bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Assign {
        bucket: BucketId,
        assignment: Assignment,
        ttl: Duration,
    },
    Abandon {
        bucket: BucketId,
    },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Assign { assignment, .. } => assignment.kind(),
            Action::Abandon { .. } => "abandon",
        }
    }
}

// === The counters of a limited bucket ===

/// The store counters of one limited bucket: the rule's, and the demand,
/// promised and settled counters derived from its key (`share`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BucketCounters {
    usage: CounterOp,
    demand: CounterOp,
    promised: CounterOp,
    settled: CounterOp,
    /// The promised and settled counters' window.
    promise_window_us: u64,
}

impl BucketCounters {
    fn new(hasher: &KeyHasher, rule: CounterOp, report_interval: Duration) -> BucketCounters {
        let interval_us = u64::try_from(report_interval.as_micros()).unwrap_or(u64::MAX);
        let demand = share::demand_spec(interval_us);
        let promise_window_us = share::promise_window(rule.spec.period_us, interval_us);
        let promise = share::promise_spec(promise_window_us);
        let op = |role: &str, spec: CounterSpec| CounterOp {
            key: derived_key(hasher, &rule.key, role, &spec),
            spec,
            hits: 0,
        };
        BucketCounters {
            usage: CounterOp { hits: 0, ..rule },
            demand: op("rlqs-demand", demand),
            promised: op("rlqs-promised", promise),
            settled: op("rlqs-settled", promise),
            promise_window_us,
        }
    }
}

/// A counter that belongs to the rule counter `rule`, in its own part of
/// the key space: the empty domain, which no request has (as the tenant
/// quotas'), then the role and the rule counter's name (itself a keyed hash).
fn derived_key(
    hasher: &KeyHasher,
    rule: &CounterKey,
    role: &str,
    spec: &CounterSpec,
) -> CounterKey {
    let name = rule.redis_key("");
    let entries = [Entry {
        key: role,
        value: &name,
    }];
    hasher.counter_key(
        "",
        &entries,
        &[],
        spec.algorithm,
        spec.period_us / 1_000_000,
    )
}

#[cfg(test)]
mod tests;
