//! Window math for the three algorithms, on integer microseconds, and for
//! calendar windows, which count as fixed windows between the boundaries
//! `limit.rs` finds in the tz database.
//!
//! The in-process store calls [`check`] under a lock; the Redis scripts in
//! `storage/scripts/` compute the same thing in Lua. Both must agree, which
//! the storage contract suite checks.
//!
//! Every function here decides *and* updates in one step, and a denied hit
//! never changes the state: a blocked request does not consume budget.

use super::{Algorithm, Calendar};

/// What a counter enforces: `limit` hits per `period_us` (GCRA: at a steady
/// rate of `limit` per period, with a bucket of `burst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterSpec {
    pub algorithm: Algorithm,
    pub limit: u64,
    pub period_us: u64,
    pub burst: u64,
    /// A calendar window instead of `period_us` (which then holds its
    /// nominal length): counted as a fixed window, whatever `algorithm` says.
    pub calendar: Option<Calendar>,
}

/// The state a store keeps per counter key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterState {
    /// Sliding and fixed windows: the current window index and its count;
    /// the sliding window also remembers the previous window's count.
    Window {
        window: u64,
        count: u64,
        previous: u64,
    },
    /// GCRA: the theoretical arrival time.
    Gcra { tat_us: u64 },
}

/// The result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub admitted: bool,
    /// Hits still available after this one (floored).
    pub remaining: u64,
    /// When admitted: time until the limit is fully reset (the window ends,
    /// or the bucket is full again). When denied: time until the same hits
    /// would be admitted, i.e. how long the caller should wait.
    pub reset_us: u64,
    /// How much of the limit is in use after this hit (rounded up); drives
    /// the near-limit metric.
    pub used: u64,
}

/// The outcome plus what to store: `state` is `Some` only when it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    pub outcome: Outcome,
    pub state: Option<CounterState>,
    /// When the stored state stops mattering and may be dropped.
    pub expires_at_us: u64,
}

/// Checks `hits` against a counter at `now_us`. `hits == 0` only reads.
pub fn check(spec: &CounterSpec, state: Option<CounterState>, now_us: u64, hits: u64) -> Checked {
    if let Some(calendar) = spec.calendar {
        let (start, end) = calendar.window_at(now_us);
        // The window's start names it: calendar windows have no index.
        return fixed_in(spec.limit, start, end, state, now_us, hits);
    }
    let period = spec.period_us.max(1);
    match spec.algorithm {
        Algorithm::SlidingWindow => sliding(spec.limit, period, state, now_us, hits),
        Algorithm::FixedWindow => fixed(spec.limit, period, state, now_us, hits),
        Algorithm::Gcra => gcra(spec.limit, period, spec.burst, state, now_us, hits),
    }
}

/// The window `now_us` falls in, as [`CounterState::Window`] names it (an
/// index, or a calendar window's start); `None` for GCRA, which has none.
/// A store that keeps only part of a window's name recovers the rest from
/// this (see `storage::memory`).
pub fn window_name(spec: &CounterSpec, now_us: u64) -> Option<u64> {
    match (spec.calendar, spec.algorithm) {
        (Some(calendar), _) => Some(calendar.window_at(now_us).0),
        (None, Algorithm::Gcra) => None,
        (None, Algorithm::SlidingWindow | Algorithm::FixedWindow) => {
            Some(now_us / spec.period_us.max(1))
        }
    }
}

/// Time per hit for GCRA, rounded up so the rate is never exceeded.
pub fn gcra_interval_us(limit: u64, period_us: u64) -> u64 {
    period_us.div_ceil(limit.max(1))
}

fn sliding(limit: u64, period: u64, state: Option<CounterState>, now: u64, hits: u64) -> Checked {
    let window = now / period;
    let elapsed = now % period;
    let (current, previous) = match state {
        Some(CounterState::Window {
            window: w,
            count,
            previous,
        }) if w == window => (count, previous),
        Some(CounterState::Window {
            window: w, count, ..
        }) if w + 1 == window => (0, count),
        _ => (0, 0),
    };
    // Everything is scaled by the period so the comparison is exact:
    // estimate = previous * (period - elapsed) / period + current.
    let p = u128::from(period);
    let l = u128::from(limit);
    let weighted = u128::from(previous) * (p - u128::from(elapsed));
    let admitted = weighted + u128::from(current + hits) * p <= l * p;
    let count = if admitted { current + hits } else { current };
    let used_scaled = weighted + u128::from(count) * p;
    let remaining = (l * p).saturating_sub(used_scaled) / p;
    let used = used_scaled.div_ceil(p);

    let until_window_end = period - elapsed;
    let reset_us = if admitted {
        until_window_end
    } else if current + hits <= limit {
        // Only the previous window's weight is in the way; it fades within
        // this window. Earliest e' with previous * (P - e') <= room * P.
        let room = u128::from(limit - current - hits);
        let wait_until = p - (room * p / u128::from(previous.max(1))).min(p);
        (wait_until as u64).saturating_sub(elapsed).max(1)
    } else if hits <= limit && count > 0 {
        // Wait for the next window, where this window's count fades in turn.
        let room = u128::from(limit - hits);
        let into_next = p - (room * p / u128::from(count)).min(p);
        until_window_end + into_next as u64
    } else {
        // More hits than the limit can ever admit at once.
        until_window_end + period
    };

    let state = (admitted && hits > 0).then_some(CounterState::Window {
        window,
        count,
        previous,
    });
    Checked {
        outcome: Outcome {
            admitted,
            remaining: remaining as u64,
            reset_us,
            used: used as u64,
        },
        state,
        expires_at_us: (window + 2) * period,
    }
}

fn fixed(limit: u64, period: u64, state: Option<CounterState>, now: u64, hits: u64) -> Checked {
    let window = now / period;
    fixed_in(limit, window, (window + 1) * period, state, now, hits)
}

/// The fixed window `window` (an index, or a calendar window's start),
/// which ends at `end` (µs since the epoch, after `now`).
fn fixed_in(
    limit: u64,
    window: u64,
    end: u64,
    state: Option<CounterState>,
    now: u64,
    hits: u64,
) -> Checked {
    let current = match state {
        Some(CounterState::Window {
            window: w, count, ..
        }) if w == window => count,
        _ => 0,
    };
    let admitted = current + hits <= limit;
    let count = if admitted { current + hits } else { current };
    let state = (admitted && hits > 0).then_some(CounterState::Window {
        window,
        count,
        previous: 0,
    });
    Checked {
        outcome: Outcome {
            admitted,
            remaining: limit.saturating_sub(count),
            reset_us: end - now,
            used: count,
        },
        state,
        expires_at_us: end,
    }
}

fn gcra(
    limit: u64,
    period: u64,
    burst: u64,
    state: Option<CounterState>,
    now: u64,
    hits: u64,
) -> Checked {
    if limit == 0 {
        // A zero rate admits nothing, ever.
        return Checked {
            outcome: Outcome {
                admitted: hits == 0,
                remaining: 0,
                reset_us: period,
                used: 0,
            },
            state: None,
            expires_at_us: now,
        };
    }
    let interval = gcra_interval_us(limit, period);
    let burst = burst.max(1);
    let capacity = burst * interval;
    let tat = match state {
        Some(CounterState::Gcra { tat_us }) => tat_us.max(now),
        _ => now,
    };
    let new_tat = tat + hits * interval;
    let allow_at = new_tat.saturating_sub(capacity);
    if allow_at <= now {
        let remaining = (capacity - (new_tat - now)) / interval;
        Checked {
            outcome: Outcome {
                admitted: true,
                remaining,
                reset_us: new_tat - now,
                used: burst - remaining,
            },
            state: (hits > 0).then_some(CounterState::Gcra { tat_us: new_tat }),
            expires_at_us: new_tat,
        }
    } else {
        let remaining = capacity.saturating_sub(tat - now) / interval;
        let reset_us = if hits <= burst {
            allow_at - now
        } else {
            // Can never fit in the bucket; report when it is full again.
            (tat - now).max(interval)
        };
        Checked {
            outcome: Outcome {
                admitted: false,
                remaining,
                reset_us,
                used: burst - remaining,
            },
            state: None,
            expires_at_us: tat,
        }
    }
}

#[cfg(test)]
mod tests;
