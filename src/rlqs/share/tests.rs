use super::*;

const SECOND: u64 = 1_000_000;
const INTERVAL: u64 = 5 * SECOND;
const MINUTE: u64 = 60 * SECOND;

fn input(remaining: u64, outstanding: u64, mine: u64, total: u64) -> ShareInput {
    ShareInput {
        remaining,
        outstanding,
        mine,
        total,
        cap: None,
        floor: None,
    }
}

#[test]
fn nothing_unpromised_is_deny_all() {
    assert_eq!(share(input(0, 0, 10, 10)), 0);
    assert_eq!(share(input(50, 50, 10, 10)), 0);
    assert_eq!(share(input(50, 80, 10, 10)), 0);
}

#[test]
fn alone_on_a_bucket_an_envoy_may_use_all_that_is_left() {
    for remaining in [1, 7, 1_000] {
        assert_eq!(share(input(remaining, 0, 3, 3)), remaining);
    }
}

#[test]
fn shares_split_the_budget_by_demand_rounded_up_within_what_is_unpromised() {
    assert_eq!(share(input(100, 0, 30, 40)), 75);
    assert_eq!(share(input(100, 0, 10, 40)), 25);
    assert_eq!(share(input(100, 0, 1, 3)), 34);
    // The busier Envoy holds 75: the other gets its 25, no more.
    assert_eq!(share(input(100, 75, 10, 40)), 25);
    // Its part is more than what is unpromised: what is unpromised.
    assert_eq!(share(input(100, 90, 10, 40)), 10);
    // No recent demand: one request's worth, so the next one passes.
    assert_eq!(share(input(100, 0, 0, 1_000_000)), 1);
    // A lagging total never makes a share more than what is left.
    assert_eq!(share(input(100, 0, 50, 20)), 100);
}

#[test]
fn the_cap_follows_demand_or_the_rules_rate() {
    let per_minute = |limit| Rate {
        limit,
        period_us: MINUTE,
    };
    // 60 a minute is 10 over two 5 s intervals.
    assert_eq!(cap(per_minute(60), INTERVAL, 0), 10);
    // 105 requests over the 30 s demand window are 35 over 10 s.
    assert_eq!(cap(per_minute(60), INTERVAL, 105), 35);
    let daily = Rate {
        limit: 1,
        period_us: 86_400 * SECOND,
    };
    assert_eq!(cap(daily, INTERVAL, 0), 1);
    let capped = ShareInput {
        cap: Some(35),
        ..input(100, 0, 30, 30)
    };
    assert_eq!(share(capped), 35);
}

#[test]
fn only_later_reports_of_a_shared_bucket_are_capped() {
    let spec = demand_spec(INTERVAL);
    let rate = Rate {
        limit: 600,
        period_us: MINUTE,
    };
    let counts = |remaining, demand| Counts {
        remaining,
        total_demand: demand,
        promised: 0,
        settled: 0,
    };
    let mut ledger = Ledger::default();
    let t0 = 1_700_000_000 * SECOND;
    let mine = ledger.report(&spec, t0, 1);
    assert_eq!(ledger.share(rate, INTERVAL, counts(600, mine), mine), 600);
    let mine = ledger.report(&spec, t0 + INTERVAL, 40);
    // Alone on the bucket: still all that is left.
    assert_eq!(ledger.share(rate, INTERVAL, counts(559, mine), mine), 559);
    // With others: 41 requests in the window; the rule's rate over 10 s is 100.
    assert_eq!(
        ledger.share(rate, INTERVAL, counts(559, 2 * mine), mine),
        100
    );
}

#[test]
fn promises_never_outgrow_what_remains() {
    let counts = Counts {
        remaining: 40,
        total_demand: 10,
        promised: 100,
        settled: 70,
    };
    // 30 outstanding: the promised counter may reach 110, 10 more.
    assert_eq!(counts.promise_limit(), 110);
    let mut promised = Counter::new(promise_spec(WINDOW));
    let t0 = 1_700_000_000 * SECOND;
    assert_eq!(promised.apply_within(t0, 25, 30), 25);
    // Another instance read the same counts and asks for 25 too: 5 fit.
    assert_eq!(promised.apply_within(t0, 25, 30), 5);
    assert_eq!(promised.apply_within(t0, 25, 30), 0);
}

#[test]
fn promise_windows_divide_the_rules_period() {
    assert_eq!(promise_window(MINUTE, INTERVAL), 15 * SECOND);
    assert_eq!(promise_window(SECOND, INTERVAL), SECOND);
    assert_eq!(promise_window(86_400 * SECOND, INTERVAL), 15 * SECOND);
    assert_eq!(promise_window(7 * SECOND, INTERVAL), 7 * SECOND);
    // 40 s is three windows of 13.3 s.
    assert_eq!(promise_window(40 * SECOND, INTERVAL), 13_333_333);
}

#[test]
fn a_share_is_settled_in_the_window_that_promised_it() {
    let t0 = 1_700_000_000 * SECOND - 1_700_000_000 * SECOND % MINUTE;
    let mut ledger = Ledger::default();
    assert_eq!(ledger.settle(t0, MINUTE), 0, "nothing held yet");
    ledger.promised(30, t0 + 10 * SECOND, MINUTE);
    assert_eq!(ledger.settle(t0 + 15 * SECOND, MINUTE), 30);
    assert_eq!(ledger.settle(t0 + 20 * SECOND, MINUTE), 0, "settled once");
    ledger.promised(30, t0 + 58 * SECOND, MINUTE);
    assert_eq!(
        ledger.settle(t0 + 61 * SECOND, MINUTE),
        0,
        "the next window never promised it"
    );
    ledger.promised(0, t0, MINUTE);
    assert_eq!(ledger.settle(t0, MINUTE), 0, "DENY_ALL holds nothing");
    // A held share is carried at the turn; DENY_ALL is renewed after.
    ledger.promised(30, t0 + 10 * SECOND, MINUTE);
    assert_eq!(
        ledger.turn_at(t0 + 10 * SECOND, MINUTE),
        t0 + MINUTE + TURN_MARGIN_US
    );
    ledger.promised(0, t0 + 10 * SECOND, MINUTE);
    assert_eq!(
        ledger.turn_at(t0 + 10 * SECOND, MINUTE),
        t0 + MINUTE + 2 * TURN_MARGIN_US
    );
}

#[test]
fn demand_is_estimated_as_the_shared_counter_estimates_it() {
    let spec = demand_spec(INTERVAL);
    let mut demand = Demand::default();
    let t0 = 1_700_000_000 * SECOND - 1_700_000_000 * SECOND % spec.period_us;
    assert_eq!(demand.record(&spec, t0, 40), 40);
    assert_eq!(demand.record(&spec, t0 + INTERVAL, 20), 60);
    // Half-way through the next window, the last one counts half.
    assert_eq!(demand.estimate(&spec, t0 + spec.period_us * 3 / 2), 30);
    assert_eq!(demand.estimate(&spec, t0 + spec.period_us * 3), 0);
}

// === A simulation of Envoys reporting one bucket ===
//
// Envoy 1.40 as observed: the first request of a bucket passes (no
// assignment yet) and is reported at once; then every bucket is reported
// every 5 s; an answer arrives one round trip after its report and
// replaces whatever is left of the last share; DENY_ALL denies everything.
// The "server" is the same ledger and share as the service, in front of
// the counters the store keeps, computed by the core's window math.

const RTT: u64 = 20_000;
const STEP: u64 = 1_000;
/// The promise window of a per-minute rule.
const WINDOW: u64 = 15 * SECOND;

/// Where the first Envoy's reports fall in a promise window (5 s
/// reports, 15 s windows): with them, on its turn, just before it and
/// mid-way.
const PHASES: [u64; 4] = [0, 400_000, 2_600_000, 4_950_000];

#[derive(Clone, Copy, Debug)]
enum Assignment {
    None,
    Tokens(u64),
    Deny,
}

struct SimEnvoy {
    gap_us: u64,
    next_request: u64,
    next_report: Option<u64>,
    answer: Option<(u64, u64)>,
    assignment: Assignment,
    allowed: u64,
    denied: u64,
    ledger: Ledger,
    turn: Option<u64>,
    admitted: Vec<u64>,
    refused: Vec<u64>,
}

/// One counter of the store.
struct Counter {
    spec: CounterSpec,
    state: Option<CounterState>,
}

impl Counter {
    fn new(spec: CounterSpec) -> Counter {
        Counter { spec, state: None }
    }

    /// Adds what fits of `hits` under `limit`, as the service promises.
    fn apply_within(&mut self, now: u64, hits: u64, limit: u64) -> u64 {
        let spec = CounterSpec { limit, ..self.spec };
        let mut checked = check(&spec, self.state, now, hits);
        let mut added = hits;
        if !checked.outcome.admitted {
            added = checked.outcome.remaining;
            checked = check(&spec, self.state, now, added);
        }
        if let Some(state) = checked.state {
            self.state = Some(state);
        }
        if checked.outcome.admitted {
            added
        } else {
            0
        }
    }

    fn apply(&mut self, now: u64, hits: u64) -> crate::limiter::Outcome {
        let checked = check(&self.spec, self.state, now, hits);
        if let Some(state) = checked.state {
            self.state = Some(state);
        }
        checked.outcome
    }
}

struct Server {
    usage: Counter,
    demand: Counter,
    promised: Counter,
    settled: Counter,
}

impl Server {
    fn new(limit: u64) -> Server {
        let rule = CounterSpec {
            algorithm: Algorithm::FixedWindow,
            limit,
            period_us: MINUTE,
            burst: limit,
            calendar: None,
        };
        Server {
            usage: Counter::new(rule),
            demand: Counter::new(demand_spec(INTERVAL)),
            promised: Counter::new(promise_spec(WINDOW)),
            settled: Counter::new(promise_spec(WINDOW)),
        }
    }

    /// A report (`Some((allowed, requests))`) or a window's turn (`None`),
    /// as the service handles them: count, settle, read; share; promise.
    fn evaluate(&mut self, ledger: &mut Ledger, now: u64, report: Option<(u64, u64)>) -> u64 {
        let (allowed, requests) = report.unwrap_or((0, 0));
        let mut usage = self.usage.apply(now, allowed);
        if !usage.admitted && usage.remaining > 0 {
            let fill = usage.remaining;
            usage = self.usage.apply(now, fill);
        }
        let total_demand = self.demand.apply(now, requests).used;
        let settle = ledger.settle(now, WINDOW);
        let settled = self.settled.apply(now, settle).used;
        let promised = self.promised.apply(now, 0).used;
        let demand_spec = self.demand.spec;
        let mine = match report {
            Some(_) => ledger.report(&demand_spec, now, requests),
            None => ledger.demand(&demand_spec, now),
        };
        let rate = Rate {
            limit: self.usage.spec.limit,
            period_us: MINUTE,
        };
        let counts = Counts {
            remaining: usage.remaining,
            total_demand,
            promised,
            settled,
        };
        let wanted = ledger.share(rate, INTERVAL, counts, mine);
        let limit = counts.promise_limit();
        let share = self.promised.apply_within(now, wanted, limit);
        ledger.promised(share, now, WINDOW);
        share
    }

    /// A promise window's turn, as the service handles it: a held share
    /// is carried into the new window (no answer: the Envoy keeps its
    /// tokens), DENY_ALL is renewed (the answer).
    fn turn(&mut self, ledger: &mut Ledger, now: u64) -> Option<u64> {
        match ledger.carry(now, WINDOW) {
            Some(share) => {
                if share > 0 {
                    self.promised.apply(now, share);
                    ledger.promised(share, now, WINDOW);
                }
                None
            }
            None => Some(self.evaluate(ledger, now, None)),
        }
    }
}

/// Envoys at `rates` requests per second (starting `start` apart, the
/// first `phase` after a promise window's turn) share `limit` a minute for
/// `minutes`; per window and Envoy, what was admitted and refused.
fn simulate(rates: &[u64], phase: u64, start: u64, limit: u64, minutes: u64) -> Vec<SimEnvoy> {
    let t0 = 1_700_000_040 * SECOND + phase; // a minute's start, and the phase
    let mut server = Server::new(limit);
    let windows = usize::try_from(minutes + 2).unwrap();
    let mut envoys: Vec<SimEnvoy> = rates
        .iter()
        .enumerate()
        .map(|(i, &rate)| SimEnvoy {
            gap_us: SECOND / rate,
            next_request: t0 + start * i as u64,
            next_report: None,
            answer: None,
            assignment: Assignment::None,
            allowed: 0,
            denied: 0,
            ledger: Ledger::default(),
            turn: None,
            admitted: vec![0; windows],
            refused: vec![0; windows],
        })
        .collect();
    let end = t0 + minutes * MINUTE;
    let first_window = t0 / MINUTE;
    let mut now = t0;
    while now < end {
        for envoy in &mut envoys {
            if let Some((at, tokens)) = envoy.answer {
                if at <= now {
                    envoy.assignment = if tokens == 0 {
                        Assignment::Deny
                    } else {
                        Assignment::Tokens(tokens)
                    };
                    envoy.answer = None;
                }
            }
            let window = usize::try_from(now / MINUTE - first_window).unwrap();
            while envoy.next_request <= now {
                envoy.next_request += envoy.gap_us;
                let pass = match envoy.assignment {
                    Assignment::None => true,
                    Assignment::Deny | Assignment::Tokens(0) => false,
                    Assignment::Tokens(n) => {
                        envoy.assignment = Assignment::Tokens(n - 1);
                        true
                    }
                };
                if pass {
                    envoy.allowed += 1;
                    envoy.admitted[window] += 1;
                } else {
                    envoy.denied += 1;
                    envoy.refused[window] += 1;
                }
                if envoy.next_report.is_none() {
                    // The bucket's first request: reported at once.
                    envoy.next_report = Some(now);
                }
            }
            if envoy.next_report.is_some_and(|at| at <= now) {
                envoy.next_report = Some(now + INTERVAL);
                let usage = (envoy.allowed, envoy.allowed + envoy.denied);
                (envoy.allowed, envoy.denied) = (0, 0);
                let share = server.evaluate(&mut envoy.ledger, now, Some(usage));
                envoy.answer = Some((now + RTT, share));
                envoy.turn = Some(envoy.ledger.turn_at(now, WINDOW));
            } else if envoy.turn.is_some_and(|at| at <= now) {
                // What the Envoy admitted since its last report stays
                // unreported: the turn must not forget it.
                if let Some(share) = server.turn(&mut envoy.ledger, now) {
                    envoy.answer = Some((now + RTT, share));
                }
                envoy.turn = Some(envoy.ledger.turn_at(now, WINDOW));
            }
        }
        now += STEP;
    }
    envoys
}

/// The stated bound: per window, the limit plus what each Envoy admits in
/// a round trip after each of its reports, and a new bucket's first
/// request. A promise window's turn adds nothing: a held share is carried,
/// and DENY_ALL admits nothing until its renewal arrives.
fn bound(rates: &[u64], limit: u64) -> u64 {
    let exposed_us = RTT * (MINUTE / INTERVAL);
    limit
        + rates
            .iter()
            .map(|r| (r * exposed_us).div_ceil(SECOND) + 1)
            .sum::<u64>()
}

fn admitted_in(envoys: &[SimEnvoy], window: usize) -> u64 {
    envoys.iter().map(|e| e.admitted[window]).sum()
}

#[test]
fn one_envoy_alone_never_exceeds_the_limit() {
    for (rate, limit) in [(10, 20), (50, 600), (3, 100), (25, 60)] {
        for phase in PHASES {
            let envoys = simulate(&[rate], phase, 0, limit, 4);
            for window in 0..5 {
                let admitted = admitted_in(&envoys, window);
                assert!(
                    admitted <= limit,
                    "rate {rate}, phase {phase}, window {window}: {admitted} > {limit}"
                );
            }
            // A full window with demand beyond the limit uses all of it.
            if rate * 60 > limit {
                assert_eq!(admitted_in(&envoys, 2), limit, "rate {rate}, phase {phase}");
            }
        }
    }
}

#[test]
fn a_client_within_the_rules_rate_is_never_refused() {
    // 1 request a second against 100 a minute, and 2 a second against 600.
    for (rate, limit) in [(1, 100), (2, 600)] {
        for phase in PHASES {
            let envoys = simulate(&[rate], phase, 0, limit, 3);
            assert_eq!(envoys[0].refused.iter().sum::<u64>(), 0, "phase {phase}");
        }
    }
}

#[test]
fn envoys_sharing_a_limit_stay_within_the_bound() {
    for (rates, limit) in [
        (vec![12, 4], 120),
        (vec![12, 4], 600),
        (vec![5, 5, 5], 90),
        (vec![40, 1], 300),
        (vec![100, 100], 50),
    ] {
        for phase in PHASES {
            let envoys = simulate(&rates, phase, 1_300_000, limit, 5);
            let bound = bound(&rates, limit);
            for window in 0..6 {
                let admitted = admitted_in(&envoys, window);
                assert!(
                    admitted <= bound,
                    "{rates:?} limit {limit}, phase {phase}, window {window}: {admitted} > {bound}"
                );
            }
            // Full windows, where demand exceeds the limit: nothing is left
            // unused.
            for window in 1..5 {
                let admitted = admitted_in(&envoys, window);
                assert!(
                    admitted >= limit,
                    "{rates:?} limit {limit}, phase {phase}, window {window}: {admitted} < {limit}"
                );
            }
        }
    }
}

#[test]
fn shares_follow_demand() {
    let rates = [12, 4];
    let envoys = simulate(&rates, 0, 2_100_000, 120, 5);
    for window in 1..5 {
        let (a, b) = (envoys[0].admitted[window], envoys[1].admitted[window]);
        let busy = a as f64 / (a + b) as f64;
        assert!(
            (0.6..=0.9).contains(&busy),
            "window {window}: the busier Envoy got {a} of {}",
            a + b
        );
    }
}

#[test]
fn a_budget_near_the_counters_range_never_fills_the_promised_counter() {
    // One Envoy alone on a bucket of a billion an hour, reporting every
    // second: each report settles its last share and is promised a new
    // one, all in one promise window.
    let rate = Rate {
        limit: 1_000_000_000,
        period_us: 3_600_000_000,
    };
    let ledger = Ledger::default();
    let (mut promised, mut settled, mut last) = (0u64, 0u64, 0u64);
    for report in 0..50 {
        settled += last;
        let counts = Counts {
            remaining: rate.limit - report * 30_000,
            total_demand: 30_000,
            promised,
            settled,
        };
        let share = ledger.share(rate, 1_000_000, counts, 30_000);
        assert!(
            share >= 30_000,
            "report {report}: a share of {share} at 30 000 a second"
        );
        assert!(
            promised + share <= counts.promise_limit(),
            "report {report}: promising {share} on {promised} passes the limit {}",
            counts.promise_limit()
        );
        promised += share;
        last = share;
    }
    assert!(promised <= COUNTER_LIMIT);
    assert_eq!(headroom(COUNTER_LIMIT), 1);
}

#[test]
fn plenty_means_the_budget_covers_everyones_demand_for_a_whole_period() {
    let hourly = Rate {
        limit: 1_000_000_000,
        period_us: 3_600 * SECOND,
    };
    // 330 000 requests in the 30 s demand window: 39.6 M in an hour.
    assert!(plenty(hourly, INTERVAL, 1_000_000_000, 330_000));
    assert!(plenty(hourly, INTERVAL, 39_600_000, 330_000));
    assert!(!plenty(hourly, INTERVAL, 39_599_999, 330_000));
    // 60 a minute against 8 a second: scarce.
    let per_minute = Rate {
        limit: 60,
        period_us: MINUTE,
    };
    assert!(!plenty(per_minute, INTERVAL, 60, 240));
    assert!(plenty(per_minute, INTERVAL, 60, 0));
    // A floor: at least that much of what is unpromised, whatever the part
    // (3 here).
    let floored = |floor| ShareInput {
        floor: Some(floor),
        ..input(100, 30, 1, 40)
    };
    assert_eq!(share(floored(50)), 50);
    assert_eq!(share(floored(90)), 70);
    assert_eq!(share(floored(2)), 3);
}

#[test]
fn an_envoy_restarted_on_a_plentiful_bucket_is_not_starved_by_its_predecessors_demand() {
    // A billion an hour; the Envoy that went away reported 330 000
    // requests in the demand window. Its successor's first report comes
    // with its first request: its demand is 1.
    let rate = Rate {
        limit: 1_000_000_000,
        period_us: 3_600 * SECOND,
    };
    let spec = demand_spec(INTERVAL);
    let mut ledger = Ledger::default();
    let t0 = 1_700_000_000 * SECOND;
    let mine = ledger.report(&spec, t0, 1);
    let counts = Counts {
        remaining: rate.limit - 330_001,
        total_demand: 330_000 + mine,
        promised: 0,
        settled: 0,
    };
    let share = ledger.share(rate, INTERVAL, counts, mine);
    // Split by demand it would be 3 030: a tenth of a second at 30 000 a
    // second, then refusals until the next report. Plenty: the cap, the
    // rule's rate over two reporting intervals.
    assert_eq!(share, cap(rate, INTERVAL, mine));
    assert!(share >= 30_000 * 10, "{share}");
}
