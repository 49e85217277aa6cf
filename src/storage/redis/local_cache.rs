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
//!
//! Full, it makes room in O(1): the entry written longest ago goes (the
//! first to expire, as a rule), counted in `sluice_local_cache_evictions_total`;
//! that counter's next call goes to Redis. No scan of the cache under its
//! lock, however many clients are denied at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use metrics::counter;

use crate::limiter::{CounterKey, CounterOp, CounterSpec, Outcome};
use crate::telemetry::names;

const SHARDS: usize = 16;

pub struct OverLimitCache {
    shards: Box<[Mutex<Shard>]>,
    max_per_shard: usize,
}

#[derive(Default)]
struct Shard {
    /// Each denial with the stamp it was written with.
    map: HashMap<CounterKey, (Denial, u64)>,
    /// Keys in the order their denials were written, with those stamps. A
    /// pair whose entry was since rewritten or dropped is stale, and skipped
    /// when met; stale pairs are swept out once they outnumber the map.
    order: VecDeque<(CounterKey, u64)>,
    next_stamp: u64,
}

impl Shard {
    fn get(&self, key: &CounterKey) -> Option<Denial> {
        self.map.get(key).map(|(denial, _)| *denial)
    }

    /// Writes `denial`, first evicting the oldest entry if `key` is new and
    /// the shard holds `max` already; whether one was evicted.
    fn insert(&mut self, key: CounterKey, denial: Denial, max: usize) -> bool {
        let evicted = !self.map.contains_key(&key) && self.map.len() >= max && self.evict_oldest();
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.map.insert(key, (denial, stamp));
        self.order.push_back((key, stamp));
        // At most once per `max` writes: O(1) amortized.
        if self.order.len() > 2 * max.max(1) {
            let map = &self.map;
            self.order
                .retain(|(key, stamp)| map.get(key).is_some_and(|(_, s)| s == stamp));
        }
        evicted
    }

    fn evict_oldest(&mut self) -> bool {
        while let Some((key, stamp)) = self.order.pop_front() {
            if self.map.get(&key).is_some_and(|(_, s)| *s == stamp) {
                self.map.remove(&key);
                return true;
            }
        }
        false
    }
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

    fn shard(&self, key: &CounterKey) -> &Mutex<Shard> {
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
        let denial = shard.get(&op.key)?;
        if denial.until_us <= now_us {
            shard.map.remove(&op.key);
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
        if shard.insert(op.key, denial, self.max_per_shard) {
            counter!(names::LOCAL_CACHE_EVICTIONS).increment(1);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
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
        // The newest denial is kept, the oldest made room for it.
        c.record(&op("late", 1), &denied(1_000), 5_000);
        assert!(c.check(&op("late", 1), 5_001).is_some());
        assert!(OverLimitCache::new(0).is_none());
    }

    #[test]
    fn a_full_shard_evicts_the_oldest_entry_and_stays_bounded() {
        let mut shard = Shard::default();
        let d = |until_us| Denial {
            spec: op("x", 1).spec,
            until_us,
            hits: 1,
            remaining: 0,
            used: 1,
        };
        let key = |i: usize| op(&i.to_string(), 1).key;
        assert!(!shard.insert(key(0), d(10), 3));
        assert!(!shard.insert(key(1), d(11), 3));
        assert!(!shard.insert(key(2), d(12), 3));
        // Rewriting key 0 makes it the newest: key 1 is now the oldest.
        assert!(!shard.insert(key(0), d(20), 3));
        assert!(shard.insert(key(3), d(13), 3));
        assert!(shard.get(&key(1)).is_none(), "the oldest went");
        assert_eq!(shard.get(&key(0)).map(|d| d.until_us), Some(20));
        assert_eq!(shard.map.len(), 3);
        // However many writes, the order queue stays within twice the bound.
        for i in 0..10_000 {
            shard.insert(key(i % 7), d(i as u64), 3);
            assert!(shard.order.len() <= 6, "{} queued", shard.order.len());
            assert!(shard.map.len() <= 3);
        }
    }
}
