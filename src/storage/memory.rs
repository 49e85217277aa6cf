//! The in-process counter store: the default, so `sluice serve` needs
//! nothing else. Sharded maps behind short-lived locks, idle keys expired by
//! a sweeper, and a hard bound on the number of keys.
//!
//! An entry is 32 bytes with no heap allocation of its own: the counter key
//! folded into 12 bytes, and the state packed into 20 (see [`Slot`]), both
//! 4-byte aligned. The map hashes nothing: the key already is a keyed
//! BLAKE3 hash.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{CounterOp, CounterStore, StoreError};
use crate::clock::Clock;
use crate::limiter::{
    check, window_name, Algorithm, CounterKey, CounterSpec, CounterState, Outcome,
};

const SHARDS: usize = 64;

/// Counters in this process's memory.
///
/// A std `Mutex` per shard, not an async one: the critical section is a map
/// lookup and a few integer operations and never awaits, so a blocking lock
/// is both correct and cheaper (as mini-redis argues for its `Db`).
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    max_keys_per_shard: usize,
    max_keys: usize,
    len: AtomicUsize,
    clock: Arc<dyn Clock>,
}

struct Shard {
    map: HashMap<Folded, Slot, BuildHasherDefault<FoldedHasher>>,
    /// No counter expires before this (µs): kept at or below the earliest
    /// expiry of the map, so a full shard whose counters are all live is
    /// not scanned again on every new key, only once one may have expired.
    next_expiry_us: u64,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            map: HashMap::default(),
            next_expiry_us: u64::MAX,
        }
    }
}

/// A [`CounterKey`] in 12 bytes: 96 bits of its keyed hash XOR its
/// algorithm and period. Distinct keys of one descriptor (another period or
/// algorithm) stay distinct, since the XOR is injective for one hash; keys
/// of different descriptors collide only if two keyed hashes agree on those
/// bits but for that pattern: among a million live counters, a 2^-57 chance
/// in all, which no client can aim at without the secret.
/// (4-byte aligned: with the u64's own alignment the entry would pad to 40.)
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
struct Folded {
    /// 64 bits of the hash XOR the period; the map's hash.
    low: u64,
    /// 32 more bits XOR the algorithm; its top bits pick the shard.
    high: u32,
}

impl From<&CounterKey> for Folded {
    fn from(key: &CounterKey) -> Folded {
        let algorithm = match key.algorithm {
            Algorithm::SlidingWindow => 1,
            Algorithm::FixedWindow => 2,
            Algorithm::Gcra => 3,
        };
        let [l0, l1, l2, l3, l4, l5, l6, l7, h0, h1, h2, h3, ..] = key.hash;
        Folded {
            low: u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]) ^ key.period_s,
            high: u32::from_le_bytes([h0, h1, h2, h3]) ^ algorithm,
        }
    }
}

impl Folded {
    /// The shard: top bits, which neither the fold nor the map's bucket
    /// index (the low bits of `low`) uses.
    fn shard(self) -> usize {
        (self.high >> (32 - 6)) as usize % SHARDS
    }
}

impl std::hash::Hash for Folded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let low = self.low;
        state.write_u64(low);
    }
}

/// The map's hasher: the folded key's low half, already uniform.
#[derive(Default)]
struct FoldedHasher(u64);

impl Hasher for FoldedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `Folded::hash` (one u64) comes here, through `write_u64`.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A counter's state in 20 bytes. Window counts are kept in 32 bits:
/// limits are `requests_per_unit`, a u32, and a count never passes its limit
/// (a larger one would saturate, never wrap).
///
/// Two things are left out, both recovered exactly:
/// - GCRA's theoretical arrival time is its expiry: once it has passed, the
///   bucket is full again and the state says nothing `check` needs, so it
///   is dropped then, and `expires_at_us` holds it.
/// - Of a window's name (an index, or a calendar window's start), only the
///   low 32 bits are kept. A state is read only while it is live, and a
///   live state's window is the current one or, for a sliding window, the
///   one before it ([`check`] sets its expiry so); the current window's
///   name, from the clock and the spec, supplies the high bits. `check`
///   asks only whether the stored window is the current one or the one
///   before, and the answer is the same for the recovered name as for the
///   whole one, wherever the clock is set, unless the two lie a multiple of
///   2^32 windows apart (136 years of one-second windows).
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Slot {
    /// When the state may be dropped (µs since the epoch); GCRA's TAT.
    expires_at_us: u64,
    /// The window name's low 32 bits.
    window: u32,
    count: u32,
    previous: u32,
}

impl Slot {
    fn new(state: CounterState, expires_at_us: u64) -> Slot {
        let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        match state {
            CounterState::Window {
                window,
                count,
                previous,
            } => Slot {
                expires_at_us,
                window: window as u32, // the low bits, on purpose
                count: narrow(count),
                previous: narrow(previous),
            },
            CounterState::Gcra { tat_us } => Slot {
                expires_at_us: tat_us,
                window: 0,
                count: 0,
                previous: 0,
            },
        }
    }

    /// The state as `check` wants it, for `spec` at `now_us`. `None` for a
    /// window that cannot be the current one or any before it (a clock set
    /// back past it): `check` counts that as no state, as it would count
    /// the window it was.
    fn state(&self, spec: &CounterSpec, now_us: u64) -> Option<CounterState> {
        let Some(current) = window_name(spec, now_us) else {
            return Some(CounterState::Gcra {
                tat_us: self.expires_at_us,
            });
        };
        // How many windows back the stored one is, modulo 2^32.
        let behind = (current as u32).wrapping_sub(self.window);
        let window = current.checked_sub(u64::from(behind))?;
        Some(CounterState::Window {
            window,
            count: u64::from(self.count),
            previous: u64::from(self.previous),
        })
    }
}

impl MemoryStore {
    /// A store holding at most `max_keys` counters.
    pub fn new(max_keys: usize, clock: Arc<dyn Clock>) -> MemoryStore {
        let max_keys = max_keys.max(SHARDS);
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_keys_per_shard: max_keys.div_ceil(SHARDS),
            max_keys,
            len: AtomicUsize::new(0),
            clock,
        }
    }

    /// Number of live counters (approximate between sweeps).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard_index(&self, key: &CounterKey) -> usize {
        Folded::from(key).shard()
    }

    fn shard(&self, key: &CounterKey) -> &Mutex<Shard> {
        &self.shards[self.shard_index(key)]
    }

    /// Applies one operation under its shard's lock.
    pub fn apply_one(&self, op: &CounterOp, now_us: u64) -> Result<Outcome, StoreError> {
        let mut shard = self
            .shard(&op.key)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = Folded::from(&op.key);
        let state = shard.live_state(key, &op.spec, now_us);
        let checked = check(&op.spec, state, now_us, op.hits);
        if let Some(new_state) = checked.state {
            let slot = Slot::new(new_state, checked.expires_at_us);
            shard.next_expiry_us = shard.next_expiry_us.min(slot.expires_at_us);
            if let Some(existing) = shard.map.get_mut(&key) {
                *existing = slot;
            } else {
                if shard.map.len() >= self.max_keys_per_shard {
                    let removed = shard.evict_expired(now_us);
                    self.len.fetch_sub(removed, Ordering::Relaxed);
                    if shard.map.len() >= self.max_keys_per_shard {
                        return Err(StoreError::Full {
                            max_keys: self.max_keys,
                        });
                    }
                }
                shard.map.insert(key, slot);
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(checked.outcome)
    }

    /// Applies a whole request atomically under the locks of every shard it
    /// touches: when an operation marked in `vetoes` is denied, nothing
    /// changes (see [`CounterStore::apply_request`]).
    pub fn apply_request_at(
        &self,
        ops: &[CounterOp],
        vetoes: &[bool],
        now_us: u64,
    ) -> Result<Vec<Outcome>, StoreError> {
        if ops.len() < 2 {
            // One operation: a denied one changes nothing anyway.
            return ops.iter().map(|op| self.apply_one(op, now_us)).collect();
        }
        let mut shard_ids: Vec<usize> = ops.iter().map(|op| self.shard_index(&op.key)).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        // Locked in index order, so requests never wait on each other in a
        // cycle; `apply_one` holds one lock at a time.
        let mut guards: Vec<MutexGuard<'_, Shard>> = shard_ids
            .iter()
            .map(|&i| self.shards[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let guard_of = |key: &CounterKey| {
            let index = self.shard_index(key);
            shard_ids.binary_search(&index).unwrap_or_else(|at| at)
        };

        // What the request would do, in order; an operation on a key an
        // earlier one changed sees that change.
        let mut pending: Vec<(CounterKey, CounterState, u64)> = Vec::new();
        let mut checked = Vec::with_capacity(ops.len());
        for op in ops {
            let state = pending
                .iter()
                .rev()
                .find(|(key, ..)| *key == op.key)
                .map(|&(_, state, _)| state)
                .or_else(|| {
                    guards[guard_of(&op.key)].live_state(Folded::from(&op.key), &op.spec, now_us)
                });
            let c = check(&op.spec, state, now_us, op.hits);
            if let Some(state) = c.state {
                pending.push((op.key, state, c.expires_at_us));
            }
            checked.push(c);
        }

        let vetoed = checked
            .iter()
            .zip(vetoes)
            .any(|(c, veto)| *veto && !c.outcome.admitted);
        if vetoed {
            return Ok(ops
                .iter()
                .zip(&checked)
                .map(|(op, c)| {
                    if c.outcome.admitted {
                        let state = guards[guard_of(&op.key)].live_state(
                            Folded::from(&op.key),
                            &op.spec,
                            now_us,
                        );
                        check(&op.spec, state, now_us, 0).outcome
                    } else {
                        c.outcome
                    }
                })
                .collect());
        }

        // Make room for the new keys before changing anything, so a full
        // store fails the request whole.
        let mut new_keys = vec![0usize; shard_ids.len()];
        for (i, (key, ..)) in pending.iter().enumerate() {
            let g = guard_of(key);
            let seen_before = pending[..i].iter().any(|(k, ..)| k == key);
            if !seen_before && !guards[g].map.contains_key(&Folded::from(key)) {
                new_keys[g] += 1;
            }
        }
        for (g, &adding) in new_keys.iter().enumerate() {
            if adding > 0 && guards[g].map.len() + adding > self.max_keys_per_shard {
                let removed = guards[g].evict_expired(now_us);
                self.len.fetch_sub(removed, Ordering::Relaxed);
                if guards[g].map.len() + adding > self.max_keys_per_shard {
                    return Err(StoreError::Full {
                        max_keys: self.max_keys,
                    });
                }
            }
        }
        for (key, state, expires_at_us) in pending {
            let slot = Slot::new(state, expires_at_us);
            let shard = &mut guards[guard_of(&key)];
            shard.next_expiry_us = shard.next_expiry_us.min(slot.expires_at_us);
            if shard.map.insert(Folded::from(&key), slot).is_none() {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(checked.into_iter().map(|c| c.outcome).collect())
    }

    /// When the counter's stored state may be dropped (µs since the epoch),
    /// if it has any; the storage contract tests compare it across stores.
    pub fn expires_at_us(&self, key: &CounterKey) -> Option<u64> {
        let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        shard
            .map
            .get(&Folded::from(key))
            .map(|slot| slot.expires_at_us)
    }

    /// Drops every expired counter; returns how many were dropped.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_us();
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            removed += shard.evict_expired(now);
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

impl Shard {
    fn live_state(&self, key: Folded, spec: &CounterSpec, now_us: u64) -> Option<CounterState> {
        self.map
            .get(&key)
            .filter(|slot| slot.expires_at_us > now_us)
            .and_then(|slot| slot.state(spec, now_us))
    }

    fn evict_expired(&mut self, now_us: u64) -> usize {
        if now_us < self.next_expiry_us {
            return 0;
        }
        let before = self.map.len();
        let mut next = u64::MAX;
        self.map.retain(|_, slot| {
            let live = slot.expires_at_us > now_us;
            if live {
                next = next.min(slot.expires_at_us);
            }
            live
        });
        self.next_expiry_us = next;
        before - self.map.len()
    }
}

#[async_trait]
impl CounterStore for MemoryStore {
    async fn apply(&self, ops: &[CounterOp]) -> Result<Vec<Outcome>, StoreError> {
        let now = self.clock.now_us();
        ops.iter().map(|op| self.apply_one(op, now)).collect()
    }

    async fn apply_request(
        &self,
        ops: &[CounterOp],
        vetoes: &[bool],
    ) -> Result<Vec<Outcome>, StoreError> {
        self.apply_request_at(ops, vetoes, self.clock.now_us())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::limiter::{Algorithm, CounterSpec, KeyHasher};

    fn op(hasher: &KeyHasher, value: &str, limit: u64, hits: u64) -> CounterOp {
        let entries = [crate::limiter::Entry { key: "k", value }];
        CounterOp {
            key: hasher.counter_key("d", &entries, &[], Algorithm::FixedWindow, 60),
            spec: CounterSpec {
                algorithm: Algorithm::FixedWindow,
                limit,
                period_us: 60_000_000,
                burst: limit,
                calendar: None,
            },
            hits,
        }
    }

    #[test]
    fn expired_keys_are_swept_and_the_bound_holds() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(SHARDS, clock.clone());
        let h = KeyHasher::from_secret(b"t");
        let mut full = 0;
        for i in 0..SHARDS * 4 {
            if store
                .apply_one(&op(&h, &i.to_string(), 5, 1), clock.now_us())
                .is_err()
            {
                full += 1;
            }
        }
        assert!(store.len() <= SHARDS, "len {} over bound", store.len());
        assert!(full > 0, "the bound was never hit");
        let live = store.len();
        assert_eq!(live, SHARDS * 4 - full);
        assert_eq!(store.sweep(), 0, "nothing has expired yet");

        clock.advance(120_000_000);
        assert_eq!(store.sweep(), live);
        assert!(store.is_empty());
        assert!(store
            .apply_one(&op(&h, "fresh", 5, 1), clock.now_us())
            .is_ok());
    }

    #[test]
    fn a_vetoed_request_changes_no_counter() {
        let store = MemoryStore::new(1_000, Arc::new(ManualClock::new(0)));
        let h = KeyHasher::from_secret(b"t");
        let (tight, wide) = (op(&h, "tight", 1, 1), op(&h, "wide", 5, 1));
        let both = [tight, wide];
        let outcomes = store.apply_request_at(&both, &[true, true], 0).unwrap();
        assert!(outcomes.iter().all(|o| o.admitted));
        assert_eq!(outcomes[1].remaining, 4);
        for _ in 0..3 {
            let outcomes = store.apply_request_at(&both, &[true, true], 0).unwrap();
            assert!(!outcomes[0].admitted);
            assert!(outcomes[1].admitted);
            assert_eq!(
                outcomes[1].remaining, 4,
                "the denied request consumed `wide`"
            );
        }
        // Without a veto (a shadow-mode rule denies), the others count.
        let outcomes = store.apply_request_at(&both, &[false, true], 0).unwrap();
        assert!(!outcomes[0].admitted);
        assert_eq!(outcomes[1].remaining, 3);
    }

    #[test]
    fn a_request_sees_its_own_earlier_operations_on_a_key() {
        let store = MemoryStore::new(1_000, Arc::new(ManualClock::new(0)));
        let h = KeyHasher::from_secret(b"t");
        let twice = [op(&h, "k", 3, 2), op(&h, "k", 3, 2)];
        let outcomes = store.apply_request_at(&twice, &[true, true], 0).unwrap();
        assert!(outcomes[0].admitted && !outcomes[1].admitted);
        // Vetoed: the first operation's 2 hits were not kept either.
        let check = store.apply_one(&op(&h, "k", 3, 0), 0).unwrap();
        assert_eq!(check.remaining, 3);
        let both = [op(&h, "k", 3, 1), op(&h, "k", 3, 2)];
        let outcomes = store.apply_request_at(&both, &[true, true], 0).unwrap();
        assert_eq!(outcomes[1].remaining, 0);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_full_store_fails_a_request_whole() {
        let store = MemoryStore::new(SHARDS, Arc::new(ManualClock::new(0)));
        let h = KeyHasher::from_secret(b"t");
        // Fill every shard, then find two fresh keys in different shards:
        // one full shard must stop both.
        let mut i = 0;
        while store.len() < SHARDS {
            let _ = store.apply_one(&op(&h, &format!("fill{i}"), 5, 1), 0);
            i += 1;
        }
        let ops = [op(&h, "fresh-a", 5, 1), op(&h, "fresh-b", 5, 1)];
        assert!(matches!(
            store.apply_request_at(&ops, &[true, true], 0),
            Err(StoreError::Full { .. })
        ));
        assert_eq!(store.len(), SHARDS);
    }

    #[test]
    fn a_full_shard_of_live_counters_is_scanned_once_until_one_can_expire() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(SHARDS, clock.clone());
        let h = KeyHasher::from_secret(b"t");
        let mut i = 0;
        while store.len() < SHARDS {
            let _ = store.apply_one(&op(&h, &format!("fill{i}"), 5, 1), clock.now_us());
            i += 1;
        }
        // Every shard is full of counters that expire a window (60 s) on.
        let full = |shard: &Mutex<Shard>| {
            let shard = shard.lock().unwrap();
            (shard.map.len(), shard.next_expiry_us)
        };
        for shard in store.shards.iter() {
            let (len, next) = full(shard);
            assert_eq!(len, 1);
            assert!(
                next > clock.now_us(),
                "a full shard remembers its earliest expiry"
            );
        }
        let refused = store.apply_one(&op(&h, "one more", 5, 1), clock.now_us());
        assert!(matches!(refused, Err(StoreError::Full { .. })));
        // Once they can have expired, a new key makes room.
        clock.advance(61_000_000);
        assert!(store
            .apply_one(&op(&h, "one more", 5, 1), clock.now_us())
            .is_ok());
    }

    #[test]
    fn an_entry_is_thirty_two_bytes() {
        assert_eq!(std::mem::size_of::<(Folded, Slot)>(), 32);
    }

    /// What a store keeping whole states would answer: `check` on the full
    /// state, dropped at its expiry.
    #[derive(Default)]
    struct Oracle(Option<(CounterState, u64)>);

    impl Oracle {
        fn apply(&mut self, spec: &CounterSpec, now_us: u64, hits: u64) -> Outcome {
            let live = self.0.filter(|&(_, expires)| expires > now_us);
            let checked = check(spec, live.map(|(state, _)| state), now_us, hits);
            if let Some(state) = checked.state {
                self.0 = Some((state, checked.expires_at_us));
            }
            checked.outcome
        }
    }

    proptest::proptest! {
        /// The slot keeps a window's low 32 bits and GCRA's TAT as its
        /// expiry, and answers as whole states do: periods of a few µs
        /// around window 2^32, with the clock stepping forward and back.
        #[test]
        fn the_compact_slot_answers_as_whole_states_do(
            algorithm in proptest::sample::select(Algorithm::ALL.to_vec()),
            period_us in 1u64..5,
            limit in 1u64..4,
            steps in proptest::collection::vec((-12i64..12, 0u64..3), 1..60),
        ) {
            let spec = CounterSpec { algorithm, limit, period_us, burst: limit, calendar: None };
            let store = MemoryStore::new(1_000, Arc::new(ManualClock::new(0)));
            let h = KeyHasher::from_secret(b"t");
            let entries = [crate::limiter::Entry { key: "k", value: "v" }];
            let key = h.counter_key("d", &entries, &[], algorithm, 1);
            let mut oracle = Oracle::default();
            // Just below window 2^32, so the low bits wrap within the run.
            let mut now = (1u64 << 32) * period_us - 20;
            for (step, hits) in steps {
                now = now.saturating_add_signed(step);
                let op = CounterOp { key, spec, hits };
                let got = store.apply_one(&op, now).unwrap();
                proptest::prop_assert_eq!(got, oracle.apply(&spec, now, hits), "at {}", now);
            }
        }
    }

    #[test]
    fn a_window_name_is_recovered_across_a_wrap_of_its_low_bits() {
        let spec = CounterSpec {
            algorithm: Algorithm::SlidingWindow,
            limit: 10,
            period_us: 1,
            burst: 10,
            calendar: None,
        };
        let slot = Slot::new(
            CounterState::Window {
                window: u64::from(u32::MAX),
                count: 3,
                previous: 2,
            },
            u64::from(u32::MAX) + 2,
        );
        let at = |now| slot.state(&spec, now);
        let whole = |window| {
            Some(CounterState::Window {
                window,
                count: 3,
                previous: 2,
            })
        };
        assert_eq!(at(u64::from(u32::MAX)), whole(u64::from(u32::MAX)));
        assert_eq!(at(1 << 32), whole(u64::from(u32::MAX)), "one window on");
        // A clock set back before it: no window at or before now has these
        // low bits, so it reads as no state, as a future window would.
        assert_eq!(at(5), None);
    }

    #[test]
    fn one_descriptor_under_other_periods_and_algorithms_keeps_apart() {
        let store = MemoryStore::new(1_000, Arc::new(ManualClock::new(0)));
        let h = KeyHasher::from_secret(b"t");
        let entries = [crate::limiter::Entry {
            key: "k",
            value: "v",
        }];
        let mut folded = std::collections::HashSet::new();
        for algorithm in Algorithm::ALL {
            for period_s in [1, 60, 3_600] {
                let key = h.counter_key("d", &entries, &[], algorithm, period_s);
                assert!(folded.insert(Folded::from(&key)));
                let op = CounterOp {
                    key,
                    spec: CounterSpec {
                        algorithm,
                        limit: 1,
                        period_us: period_s * 1_000_000,
                        burst: 1,
                        calendar: None,
                    },
                    hits: 1,
                };
                assert!(
                    store.apply_one(&op, 0).unwrap().admitted,
                    "{algorithm:?} {period_s}"
                );
                assert!(
                    !store.apply_one(&op, 0).unwrap().admitted,
                    "{algorithm:?} {period_s}"
                );
            }
        }
        assert_eq!(store.len(), 9);
    }

    #[test]
    fn expired_state_is_ignored_before_the_sweep() {
        let clock = Arc::new(ManualClock::new(0));
        let store = MemoryStore::new(1_000, clock.clone());
        let h = KeyHasher::from_secret(b"t");
        assert!(store.apply_one(&op(&h, "a", 1, 1), 0).unwrap().admitted);
        assert!(!store.apply_one(&op(&h, "a", 1, 1), 1).unwrap().admitted);
        // The next window starts a new count even though no sweep ran.
        assert!(
            store
                .apply_one(&op(&h, "a", 1, 1), 60_000_000)
                .unwrap()
                .admitted
        );
    }
}
