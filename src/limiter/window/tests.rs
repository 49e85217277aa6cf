//! Window math: worked examples per algorithm, then property tests against
//! simple oracles that keep their own books (a map of window counts for the
//! windows, a log of admitted hits for GCRA).

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

const SEC: u64 = 1_000_000;
const MIN: u64 = 60 * SEC;

fn spec(algorithm: Algorithm, limit: u64, period_us: u64, burst: u64) -> CounterSpec {
    CounterSpec {
        algorithm,
        limit,
        period_us,
        burst,
        calendar: None,
    }
}

/// One counter and the state a store would keep for it.
#[derive(Clone, Debug)]
struct Counter {
    spec: CounterSpec,
    state: Option<CounterState>,
}

impl Counter {
    fn new(spec: CounterSpec) -> Counter {
        Counter { spec, state: None }
    }

    /// Checks and stores the new state, as a store does.
    fn hit(&mut self, now: u64, hits: u64) -> Outcome {
        let checked = check(&self.spec, self.state, now, hits);
        if let Some(state) = checked.state {
            self.state = Some(state);
        }
        checked.outcome
    }

    /// Checks without storing anything: "what would happen at `now`".
    fn peek(&self, now: u64, hits: u64) -> Checked {
        check(&self.spec, self.state, now, hits)
    }
}

/// Asserts that `hits` denied at `now` with `reset_us` is admitted exactly
/// `reset_us` later and still denied 1µs before that.
fn assert_reset_is_exact(counter: &Counter, now: u64, hits: u64, reset_us: u64) {
    assert!(reset_us > 0, "a denial must say when to retry");
    assert!(
        counter.peek(now + reset_us, hits).outcome.admitted,
        "{hits} hit(s) denied at {now} should be admitted after reset_us = {reset_us}: {counter:?}"
    );
    assert!(
        !counter.peek(now + reset_us - 1, hits).outcome.admitted,
        "{hits} hit(s) denied at {now} should still be denied 1µs before reset_us = {reset_us}: {counter:?}"
    );
}

// === Fixed window ===

#[test]
fn fixed_window_admits_up_to_the_limit_then_denies() {
    let mut c = Counter::new(spec(Algorithm::FixedWindow, 3, MIN, 0));
    let now = 1_000 * MIN + 15 * SEC;
    for expected_remaining in [2, 1, 0] {
        let o = c.hit(now, 1);
        assert!(o.admitted);
        assert_eq!(o.remaining, expected_remaining);
        assert_eq!(o.reset_us, 45 * SEC, "time to the end of the window");
        assert_eq!(o.used, 3 - expected_remaining);
    }
    let denied = c.hit(now + SEC, 1);
    assert_eq!(
        denied,
        Outcome {
            admitted: false,
            remaining: 0,
            reset_us: 44 * SEC,
            used: 3,
        }
    );
    assert_eq!(
        c.state,
        Some(CounterState::Window {
            window: 1_000,
            count: 3,
            previous: 0,
        })
    );
}

#[test]
fn fixed_window_rolls_over_at_the_epoch_aligned_boundary() {
    let mut c = Counter::new(spec(Algorithm::FixedWindow, 2, MIN, 0));
    let start = 7 * MIN;
    assert!(c.hit(start + 59 * SEC, 2).admitted);
    let last = c.hit(start + MIN - 1, 1);
    assert!(!last.admitted);
    assert_eq!(last.reset_us, 1);
    let next = c.hit(start + MIN, 1);
    assert!(next.admitted, "a new window starts with a fresh count");
    assert_eq!(next.remaining, 1);
    assert_eq!(next.reset_us, MIN);
}

#[test]
fn fixed_window_denied_hits_do_not_consume_budget() {
    let mut c = Counter::new(spec(Algorithm::FixedWindow, 5, MIN, 0));
    assert!(c.hit(0, 3).admitted);
    let before = c.state;
    let checked = c.peek(SEC, 3);
    assert!(!checked.outcome.admitted);
    assert_eq!(checked.state, None, "a denial stores nothing");
    assert_eq!(checked.outcome.remaining, 2);
    assert!(!c.hit(SEC, 3).admitted);
    assert_eq!(c.state, before);
    let o = c.hit(2 * SEC, 2);
    assert!(o.admitted, "the two hits left are still there");
    assert_eq!(o.remaining, 0);
}

#[test]
fn fixed_window_expires_with_its_window() {
    let c = Counter::new(spec(Algorithm::FixedWindow, 5, MIN, 0));
    let checked = c.peek(3 * MIN + 10 * SEC, 1);
    assert_eq!(checked.expires_at_us, 4 * MIN);
}

// === Sliding window ===

#[test]
fn sliding_window_weights_the_previous_window_exactly() {
    let mut c = Counter::new(spec(Algorithm::SlidingWindow, 10, MIN, 0));
    let w = 100 * MIN;
    assert!(c.hit(w + 30 * SEC, 6).admitted);
    // 15s into the next window the previous 6 weigh 6 * 45/60 = 4.5, so 5
    // more fit (9.5 <= 10) and a sixth does not (10.5 > 10).
    let t = w + MIN + 15 * SEC;
    let o = c.hit(t, 5);
    assert!(o.admitted);
    assert_eq!(o.remaining, 0, "floor(10 - 9.5)");
    assert_eq!(o.used, 10, "ceil(9.5)");
    assert_eq!(o.reset_us, 45 * SEC);
    assert_eq!(
        c.state,
        Some(CounterState::Window {
            window: 101,
            count: 5,
            previous: 6,
        })
    );

    let denied = c.hit(t, 1);
    assert!(!denied.admitted);
    assert_eq!(denied.remaining, 0);
    // One more fits once 6 * (60 - e)/60 <= 4, i.e. at e = 20s: 5s from now.
    assert_eq!(denied.reset_us, 5 * SEC);
    assert_reset_is_exact(&c, t, 1, denied.reset_us);
    assert!(c.hit(w + MIN + 20 * SEC, 1).admitted);
}

#[test]
fn sliding_window_reset_waits_into_the_next_window_when_this_one_is_full() {
    let mut c = Counter::new(spec(Algorithm::SlidingWindow, 10, MIN, 0));
    let t = 5 * MIN + 30 * SEC;
    assert!(c.hit(t, 10).admitted);
    let denied = c.hit(t, 1);
    assert!(!denied.admitted);
    // The next window opens in 30s; there the 10 weigh 10 * (60 - e)/60 and
    // one more fits at e = 6s.
    assert_eq!(denied.reset_us, 36 * SEC);
    assert_reset_is_exact(&c, t, 1, denied.reset_us);

    // Asking for the whole limit means waiting for the weight to be gone.
    let all = c.hit(t, 10);
    assert!(!all.admitted);
    assert_eq!(all.reset_us, 30 * SEC + MIN);
    assert_reset_is_exact(&c, t, 10, all.reset_us);
}

#[test]
fn sliding_window_forgets_windows_older_than_the_previous_one() {
    let mut c = Counter::new(spec(Algorithm::SlidingWindow, 4, MIN, 0));
    assert!(c.hit(10 * MIN, 4).admitted);
    let o = c.hit(12 * MIN, 4);
    assert!(o.admitted, "two windows later nothing weighs any more");
    assert_eq!(
        c.state,
        Some(CounterState::Window {
            window: 12,
            count: 4,
            previous: 0,
        })
    );
    assert_eq!(c.peek(12 * MIN, 1).expires_at_us, 14 * MIN);
}

#[test]
fn sliding_window_more_hits_than_the_limit_are_never_admitted() {
    let c = Counter::new(spec(Algorithm::SlidingWindow, 3, MIN, 0));
    let o = c.peek(10 * SEC, 4).outcome;
    assert!(!o.admitted);
    assert_eq!(o.remaining, 3);
    assert_eq!(o.reset_us, 50 * SEC + MIN);
    assert!(!c.peek(10 * SEC + o.reset_us, 4).outcome.admitted);
}

// === GCRA ===

#[test]
fn gcra_interval_rounds_up() {
    assert_eq!(gcra_interval_us(10, SEC), 100_000);
    assert_eq!(gcra_interval_us(3, SEC), 333_334);
    assert_eq!(
        gcra_interval_us(0, SEC),
        SEC,
        "a zero limit does not divide by zero"
    );
}

#[test]
fn gcra_allows_a_burst_then_one_hit_per_interval() {
    // 10 per second (one per 100ms) with a bucket of 5.
    let mut c = Counter::new(spec(Algorithm::Gcra, 10, SEC, 5));
    let t = 50 * SEC;
    for (i, expected_remaining) in [4, 3, 2, 1, 0].into_iter().enumerate() {
        let o = c.hit(t, 1);
        assert!(o.admitted, "burst hit {i}");
        assert_eq!(o.remaining, expected_remaining);
        assert_eq!(o.used, 5 - expected_remaining);
        assert_eq!(
            o.reset_us,
            (i as u64 + 1) * 100_000,
            "until the bucket is full"
        );
    }
    assert_eq!(
        c.state,
        Some(CounterState::Gcra {
            tat_us: t + 500_000
        })
    );
    let denied = c.hit(t, 1);
    assert_eq!(
        denied,
        Outcome {
            admitted: false,
            remaining: 0,
            reset_us: 100_000,
            used: 5,
        }
    );
    assert_reset_is_exact(&c, t, 1, denied.reset_us);
    assert!(c.hit(t + 100_000, 1).admitted);
    assert!(!c.hit(t + 100_000, 1).admitted, "one per interval, no more");

    // Idle until the bucket is full again: the whole burst is back.
    let full = c.hit(t + 600_000, 5);
    assert!(full.admitted);
    assert_eq!(full.remaining, 0);
}

#[test]
fn gcra_burst_of_zero_means_one() {
    let mut c = Counter::new(spec(Algorithm::Gcra, 2, SEC, 0));
    assert!(c.hit(0, 1).admitted);
    let o = c.hit(0, 1);
    assert!(!o.admitted);
    assert_eq!(o.reset_us, 500_000);
}

#[test]
fn gcra_more_hits_than_the_burst_are_never_admitted() {
    let mut c = Counter::new(spec(Algorithm::Gcra, 10, SEC, 3));
    let o = c.hit(SEC, 4);
    assert!(!o.admitted);
    assert_eq!(o.remaining, 3);
    assert_eq!(o.reset_us, 100_000, "the bucket is full: one interval");
    assert_eq!(c.state, None);
    assert!(c.hit(SEC, 2).admitted);
    let o = c.hit(SEC, 4);
    assert_eq!(o.reset_us, 200_000, "when the bucket is full again");
}

#[test]
fn gcra_denied_hits_do_not_move_the_arrival_time() {
    let mut c = Counter::new(spec(Algorithm::Gcra, 1, SEC, 1));
    assert!(c.hit(0, 1).admitted);
    for t in [0, 1, SEC / 2, SEC - 1] {
        let checked = c.peek(t, 1);
        assert!(!checked.outcome.admitted, "at {t}");
        assert_eq!(checked.state, None);
        assert_eq!(checked.outcome.reset_us, SEC - t);
    }
    assert!(c.hit(SEC, 1).admitted);
}

// === Every algorithm ===

#[test]
fn limit_zero_admits_only_checks() {
    for algorithm in Algorithm::ALL {
        let c = Counter::new(spec(algorithm, 0, MIN, 0));
        let t = 3 * MIN + SEC;
        let hit = c.peek(t, 1);
        assert!(!hit.outcome.admitted, "{algorithm}");
        assert_eq!(hit.outcome.remaining, 0, "{algorithm}");
        assert!(hit.outcome.reset_us > 0, "{algorithm}");
        assert_eq!(hit.state, None, "{algorithm}");
        let probe = c.peek(t, 0);
        assert!(
            probe.outcome.admitted,
            "{algorithm}: 0 hits fit in any limit"
        );
        assert_eq!(probe.outcome.remaining, 0, "{algorithm}");
        assert_eq!(probe.state, None, "{algorithm}");
    }
}

#[test]
fn zero_hits_report_without_changing_state() {
    for algorithm in Algorithm::ALL {
        let mut c = Counter::new(spec(algorithm, 5, MIN, 5));
        let t = 42 * MIN + 7 * SEC;
        let first = c.hit(t, 2);
        assert!(first.admitted, "{algorithm}");
        let before = c.state;
        for dt in [0, 1, SEC] {
            let probe = c.peek(t + dt, 0);
            assert!(probe.outcome.admitted, "{algorithm}");
            assert_eq!(
                probe.state, None,
                "{algorithm}: a check-only call stores nothing"
            );
            assert!(probe.outcome.remaining >= first.remaining, "{algorithm}");
        }
        assert_eq!(c.hit(t, 0).remaining, 3, "{algorithm}");
        assert_eq!(c.state, before, "{algorithm}");
        // A fresh counter stays fresh under checks.
        let fresh = Counter::new(c.spec);
        let probe = fresh.peek(t, 0);
        assert_eq!(probe.outcome.remaining, 5, "{algorithm}");
        assert_eq!(probe.state, None, "{algorithm}");
    }
}

// === Property tests ===

/// Counter specs small enough that a sequence of calls crosses many windows
/// and exhausts the limit often, plus a few real-world periods.
fn spec_strategy(algorithm: Algorithm, min_limit: u64) -> impl Strategy<Value = CounterSpec> {
    (
        min_limit..=8u64,
        prop_oneof![4 => 1..=1_000u64, 1 => Just(SEC), 1 => Just(MIN)],
        0..=8u64,
    )
        .prop_map(move |(limit, period_us, burst)| spec(algorithm, limit, period_us, burst))
}

/// A start time and a sequence of (time step in thousandths of a period, hits).
type Calls = (u64, Vec<(u64, u64)>);

fn calls_strategy() -> impl Strategy<Value = Calls> {
    (
        0..1_000_000_000_000u64,
        prop::collection::vec(
            (
                prop_oneof![3 => Just(0u64), 5 => 0..=300u64, 2 => 0..=3_000u64],
                0..=10u64,
            ),
            1..80,
        ),
    )
}

/// The absolute times of the calls; steps scale with the period, plus a
/// jitter of a few µs so boundaries are hit from both sides.
fn timeline(spec: &CounterSpec, (start, steps): &Calls) -> Vec<(u64, u64)> {
    let mut t = *start;
    steps
        .iter()
        .map(|&(step, hits)| {
            t += step * spec.period_us / 1_000 + step % 3;
            (t, hits)
        })
        .collect()
}

/// Properties every algorithm must have at every call.
fn assert_common(c: &Counter, now: u64, hits: u64, checked: &Checked) {
    let spec = c.spec;
    let o = checked.outcome;
    let period = spec.period_us;
    let (capacity, max_reset) = match spec.algorithm {
        Algorithm::FixedWindow => (spec.limit, period),
        Algorithm::SlidingWindow => (spec.limit, 2 * period),
        Algorithm::Gcra if spec.limit == 0 => (0, period),
        Algorithm::Gcra => {
            let burst = spec.burst.max(1);
            (burst, burst * gcra_interval_us(spec.limit, period))
        }
    };
    assert!(
        o.remaining <= capacity,
        "remaining {} > {capacity}",
        o.remaining
    );
    assert!(
        o.reset_us <= max_reset,
        "reset {} > {max_reset}",
        o.reset_us
    );
    if spec.algorithm != Algorithm::Gcra {
        assert!(o.reset_us > 0, "reset_us is never 0 for a window");
    }
    if hits == 0 || !o.admitted {
        assert_eq!(
            checked.state, None,
            "stored state for hits={hits} admitted={}",
            o.admitted
        );
    } else {
        assert!(checked.state.is_some(), "admitted hits must be stored");
    }

    // `remaining` is exactly how many more hits fit right now.
    let mut after = c.clone();
    if let Some(state) = checked.state {
        after.state = Some(state);
    }
    let fits = |n: u64| after.peek(now, n).outcome.admitted;
    assert!(fits(o.remaining), "remaining {} does not fit", o.remaining);
    assert!(
        !fits(o.remaining + 1),
        "remaining {} is too low",
        o.remaining
    );

    if !o.admitted {
        if hits <= capacity {
            assert_reset_is_exact(c, now, hits, o.reset_us);
        } else {
            assert!(o.reset_us > 0);
            assert!(!c.peek(now + o.reset_us, hits).outcome.admitted);
        }
    }
}

fn run(spec: CounterSpec, calls: &Calls, mut oracle: impl FnMut(&Counter, u64, u64, &Checked)) {
    let mut c = Counter::new(spec);
    for (now, hits) in timeline(&spec, calls) {
        let checked = c.peek(now, hits);
        assert_common(&c, now, hits, &checked);
        oracle(&c, now, hits, &checked);
        if let Some(state) = checked.state {
            c.state = Some(state);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (a) Admitted iff this window's admitted hits plus these fit the limit,
    /// so no epoch-aligned window ever admits more than the limit.
    #[test]
    fn fixed_window_matches_a_count_per_window(
        spec in spec_strategy(Algorithm::FixedWindow, 0),
        calls in calls_strategy(),
    ) {
        let mut admitted: HashMap<u64, u64> = HashMap::new();
        run(spec, &calls, |_, now, hits, checked| {
            let window = now / spec.period_us;
            let count = admitted.entry(window).or_default();
            let expected = *count + hits <= spec.limit;
            assert_eq!(checked.outcome.admitted, expected, "at {now} with {hits} on top of {count}");
            if expected {
                *count += hits;
            }
            assert!(*count <= spec.limit);
            assert_eq!(checked.outcome.remaining, spec.limit - *count);
            assert_eq!(checked.outcome.reset_us, spec.period_us - now % spec.period_us);
        });
    }

    /// (b) Over any span [t0, t1] GCRA admits at most
    /// burst + (t1 - t0) / interval hits, and an idle counter offers its
    /// whole burst again once the last admitted hit's reset_us has passed.
    #[test]
    fn gcra_never_exceeds_burst_plus_rate(
        spec in spec_strategy(Algorithm::Gcra, 1),
        calls in calls_strategy(),
    ) {
        let interval = gcra_interval_us(spec.limit, spec.period_us);
        let burst = spec.burst.max(1);
        let mut log: Vec<(u64, u64)> = Vec::new();
        let mut full_at = None;
        let mut last = Counter::new(spec);
        run(spec, &calls, |c, now, hits, checked| {
            if checked.outcome.admitted && hits > 0 {
                log.push((now, hits));
                // Time until the bucket is full again; the latest admitted
                // call has the latest arrival time.
                full_at = Some(now + checked.outcome.reset_us);
            }
            last = c.clone();
            if let Some(state) = checked.state {
                last.state = Some(state);
            }
        });
        for (i, &(t0, _)) in log.iter().enumerate() {
            let mut total = 0;
            for &(t1, hits) in &log[i..] {
                total += hits;
                prop_assert!(
                    total * interval <= (t1 - t0) + burst * interval,
                    "{} hits in [{}, {}] with burst {}, interval {}", total, t0, t1, burst, interval
                );
            }
        }
        if let Some(full_at) = full_at {
            prop_assert!(last.peek(full_at, burst).outcome.admitted, "full burst at {}", full_at);
            prop_assert!(
                !last.peek(full_at - 1, burst).outcome.admitted,
                "full burst already at {} - 1", full_at
            );
        }
    }

    /// (c) The decision is estimate = previous * (P - elapsed) / P + current
    /// (+ hits) <= limit, computed from a map of per-window counts in exact
    /// rational arithmetic.
    #[test]
    fn sliding_window_matches_the_weighted_estimate(
        spec in spec_strategy(Algorithm::SlidingWindow, 0),
        calls in calls_strategy(),
    ) {
        let mut admitted: HashMap<u64, u64> = HashMap::new();
        let p = u128::from(spec.period_us);
        let limit = u128::from(spec.limit);
        run(spec, &calls, |_, now, hits, checked| {
            let window = now / spec.period_us;
            let elapsed = u128::from(now % spec.period_us);
            let previous = window
                .checked_sub(1)
                .and_then(|w| admitted.get(&w))
                .copied()
                .map_or(0, u128::from);
            let current = u128::from(admitted.get(&window).copied().unwrap_or(0));
            // previous * (P - e) / P + current + hits <= limit, times P.
            let fits = |extra: u128| previous * (p - elapsed) + (current + extra) * p <= limit * p;
            let expected = fits(u128::from(hits));
            assert_eq!(
                checked.outcome.admitted, expected,
                "at {now}: previous {previous}, current {current}, hits {hits}"
            );
            let now_current = if expected { current + u128::from(hits) } else { current };
            if expected {
                *admitted.entry(window).or_default() += hits;
            }
            // remaining: the most hits that would still fit, by trying.
            let remaining = (0..=limit)
                .rev()
                .find(|&r| previous * (p - elapsed) + (now_current + r) * p <= limit * p)
                .unwrap_or(0);
            assert_eq!(u128::from(checked.outcome.remaining), remaining);
        });
    }

    /// (d) remaining, reset_us and state rules (see `assert_common`) for
    /// every algorithm, including GCRA with a zero limit.
    #[test]
    fn every_algorithm_reports_exact_remaining_and_reset(
        spec in prop_oneof![
            spec_strategy(Algorithm::FixedWindow, 0),
            spec_strategy(Algorithm::SlidingWindow, 0),
            spec_strategy(Algorithm::Gcra, 0),
        ],
        calls in calls_strategy(),
    ) {
        run(spec, &calls, |_, _, _, _| {});
    }
}

// === Calendar windows ===

fn calendar_spec(unit: crate::limiter::CalendarUnit, zone: &str, limit: u64) -> CounterSpec {
    let calendar = crate::limiter::Calendar {
        unit,
        time_zone: zone.parse().unwrap(),
    };
    CounterSpec {
        algorithm: Algorithm::FixedWindow,
        limit,
        period_us: 86_400 * SEC,
        burst: limit,
        calendar: Some(calendar),
    }
}

#[test]
fn a_calendar_window_counts_as_a_fixed_window_to_its_local_end() {
    use crate::limiter::CalendarUnit;
    // 2027-03-27T23:30:00Z: half an hour into 28 March in Berlin, the day
    // its clocks go forward (23 hours long).
    let now = 1_806_190_200 * SEC;
    let hour = 3_600 * SEC;
    let mut c = Counter::new(calendar_spec(CalendarUnit::Day, "Europe/Berlin", 2));
    let until_end = 23 * hour - hour / 2;
    assert_eq!(
        c.hit(now, 1),
        Outcome {
            admitted: true,
            remaining: 1,
            reset_us: until_end,
            used: 1
        }
    );
    assert!(c.hit(now + hour, 1).admitted);
    let denied = c.hit(now + 2 * hour, 1);
    assert!(!denied.admitted);
    assert_eq!(denied.reset_us, until_end - 2 * hour);
    assert_reset_is_exact(&c, now + 2 * hour, 1, denied.reset_us);
    let checked = c.peek(now, 1);
    assert_eq!(checked.expires_at_us, now + until_end);
    // The next day is 24 hours again.
    assert_eq!(c.hit(now + until_end, 1).reset_us, 24 * hour);
    // Another algorithm named on the spec changes nothing: calendars are fixed.
    let mut gcra = Counter::new(CounterSpec {
        algorithm: Algorithm::Gcra,
        ..calendar_spec(CalendarUnit::Day, "Europe/Berlin", 2)
    });
    assert_eq!(gcra.hit(now, 1).reset_us, until_end);
}
