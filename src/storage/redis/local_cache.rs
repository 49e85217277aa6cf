//! The local over-limit cache: once Redis says a counter denies `hits`, the
//! same or more hits on it are denied here, without Redis, until the moment
//! Redis said they could be admitted again.
//!
//! Why that never changes a decision: every algorithm's reset for a denial
//! is the earliest time the same hits fit *if nothing else is admitted
//! meanwhile*; other admissions (here or on other instances) only move that
//! time later, and more hits need at least as long. The entry's deadline is
//! taken from the moment the call was *sent*, which is no later than Redis
//! read its clock, so it expires early by up to one round trip, never late.
//! Fewer hits than were denied, check-only calls (`hits == 0`), and the
//! same key under another limit (a caller's override, a reloaded rule)
//! always go to Redis.
//!
//! The answer carries Redis' `remaining` and `used` from that denial and the
//! time left until its reset: for a single hit (what Envoy sends) exactly
//! what Redis would answer, unless the same counter was meanwhile admitted
//! under another limit, after which Redis would name a later reset.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::limiter::{CounterKey, CounterOp, CounterSpec, Outcome};

const SHARDS: usize = 16;

pub struct OverLimitCache {
    shards: Box<[Mutex<HashMap<CounterKey, Denial>>]>,
    max_per_shard: usize,
}

#[derive(Clone, Copy, Debug)]
struct Denial {
    /// A key can be checked against another limit (a caller's override, a
    /// reloaded rule): the denial holds for the limit that made it only.
    spec: CounterSpec,
    /// Local monotonic time (µs) when the denied hits fit again.
    until_us: u64,
    hits: u64,
    remaining: u64,
    used: u64,
}

impl OverLimitCache {
    /// A cache of at most `max_entries` counters; `None` when 0 (disabled).
    pub fn new(max_entries: usize) -> Option<OverLimitCache> {
        (max_entries > 0).then(|| OverLimitCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_per_shard: max_entries.div_ceil(SHARDS),
        })
    }

    fn shard(&self, key: &CounterKey) -> &Mutex<HashMap<CounterKey, Denial>> {
        &self.shards[usize::from(key.hash[1]) % SHARDS]
    }

    /// The local answer for `op` at `now_us`, if a denial still covers it.
    pub fn check(&self, op: &CounterOp, now_us: u64) -> Option<Outcome> {
        if op.hits == 0 {
            return None;
        }
        let mut shard = self
            .shard(&op.key)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let denial = *shard.get(&op.key)?;
        if denial.until_us <= now_us {
            shard.remove(&op.key);
            return None;
        }
        (op.hits >= denial.hits && op.spec == denial.spec).then_some(Outcome {
            admitted: false,
            remaining: denial.remaining,
            reset_us: denial.until_us - now_us,
            used: denial.used,
        })
    }

    /// Remembers Redis' answer for `op` if it was a denial; `sent_us` is the
    /// local time the call was sent.
    pub fn record(&self, op: &CounterOp, outcome: &Outcome, sent_us: u64) {
        if outcome.admitted || op.hits == 0 || outcome.reset_us == 0 {
            return;
        }
        let denial = Denial {
            spec: op.spec,
            until_us: sent_us.saturating_add(outcome.reset_us),
            hits: op.hits,
            remaining: outcome.remaining,
            used: outcome.used,
        };
        let mut shard = self
            .shard(&op.key)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.max_per_shard && !shard.contains_key(&op.key) {
            shard.retain(|_, d| d.until_us > sent_us);
            if shard.len() >= self.max_per_shard {
                // Full of live denials: this one goes to Redis next time.
                return;
            }
        }
        shard.insert(op.key, denial);
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Algorithm, CounterSpec, Entry, KeyHasher};

    fn op(value: &str, hits: u64) -> CounterOp {
        let h = KeyHasher::from_secret(b"t");
        CounterOp {
            key: h.counter_key(
                "d",
                &[Entry { key: "k", value }],
                &[],
                Algorithm::FixedWindow,
                1,
            ),
            spec: CounterSpec {
                algorithm: Algorithm::FixedWindow,
                limit: 1,
                period_us: 1_000_000,
                burst: 1,
                calendar: None,
            },
            hits,
        }
    }

    fn denied(reset_us: u64) -> Outcome {
        Outcome {
            admitted: false,
            remaining: 0,
            reset_us,
            used: 1,
        }
    }

    #[test]
    fn denies_until_exactly_the_reset_and_not_fewer_hits() {
        let c = OverLimitCache::new(100).unwrap();
        c.record(&op("a", 2), &denied(500), 1_000);
        assert_eq!(c.check(&op("a", 2), 1_000).unwrap().reset_us, 500);
        assert_eq!(c.check(&op("a", 3), 1_499).unwrap().reset_us, 1);
        assert!(
            c.check(&op("a", 1), 1_100).is_none(),
            "fewer hits may fit sooner"
        );
        assert!(
            c.check(&op("a", 0), 1_100).is_none(),
            "check-only goes to Redis"
        );
        let mut other_limit = op("a", 2);
        other_limit.spec.limit = 5;
        assert!(
            c.check(&other_limit, 1_100).is_none(),
            "another limit on the same key"
        );
        assert!(
            c.check(&op("a", 2), 1_500).is_none(),
            "not one moment longer"
        );
        assert_eq!(c.len(), 0, "expired entries are dropped when seen");
    }

    #[test]
    fn admissions_are_not_cached_and_the_size_is_bounded() {
        let c = OverLimitCache::new(SHARDS).unwrap();
        let mut ok = denied(10);
        ok.admitted = true;
        c.record(&op("a", 1), &ok, 0);
        assert_eq!(c.len(), 0);
        for i in 0..10 * SHARDS {
            c.record(&op(&i.to_string(), 1), &denied(1_000), 0);
        }
        assert!(c.len() <= SHARDS, "{} entries", c.len());
        // Once they expire, room is made again.
        c.record(&op("late", 1), &denied(1_000), 5_000);
        assert!(c.check(&op("late", 1), 5_001).is_some());
        assert!(OverLimitCache::new(0).is_none());
    }
}
