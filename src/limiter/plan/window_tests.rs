//! Several limits on a descriptor, windows of several units, calendar
//! windows: plan -> the in-process store (which applies a request with its
//! vetoes) -> decide, from YAML through the real loader.

use std::sync::Arc;

use super::*;
use crate::clock::{Clock as _, ManualClock};
use crate::limiter::{CalendarUnit, Descriptor};
use crate::rules::yaml::{compile_all, parse_str};
use crate::storage::memory::MemoryStore;

const S: u64 = 1_000_000;
/// 2023-11-14T22:13:20Z: 20 s into a minute, 200 s into a 5-minute window,
/// 80 000 s into a UTC day.
const NOW: u64 = 1_700_000_000 * S;

const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limits:
      - {name: burst, unit: second, requests_per_unit: 2, algorithm: fixed_window}
      - {name: daily, unit: day, requests_per_unit: 5, algorithm: fixed_window}
  - key: five
    rate_limit: {name: per_5m, unit: minute, unit_multiplier: 5, requests_per_unit: 3}
  - key: tenant
    quota_mode: true
    rate_limit: {name: monthly, calendar: month, time_zone: Europe/Berlin, requests_per_unit: 2}
  - key: login
    rate_limit: {unlimited: true, replaces: [{name: burst}]}
"#;

struct Harness {
    rules: RuleSet,
    hasher: KeyHasher,
    clock: Arc<ManualClock>,
    store: MemoryStore,
}

impl Harness {
    fn new(yaml: &str) -> Harness {
        let root = parse_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
        let rules =
            compile_all(&[("test.yaml".to_owned(), root)]).unwrap_or_else(|e| panic!("{e}"));
        let clock = Arc::new(ManualClock::new(NOW));
        Harness {
            rules,
            hasher: KeyHasher::from_secret(b"window tests"),
            store: MemoryStore::new(1_000, clock.clone()),
            clock,
        }
    }

    /// One request of the descriptors, decided as `sluice serve` decides it.
    fn decide(&self, descriptors: &[&[(&str, &str)]]) -> Decision<'_> {
        let request = Request {
            domain: "api",
            descriptors: descriptors
                .iter()
                .map(|pairs| Descriptor::new(pairs.iter().copied(), None, None))
                .collect(),
            hits: 1,
        };
        request.validate().unwrap_or_else(|e| panic!("{e}"));
        let options = PlanOptions::default();
        let plan = plan(&request, &self.rules, &self.hasher, options);
        let outcomes = self
            .store
            .apply_request_at(&plan.ops, &plan.vetoes, self.clock.now_us())
            .unwrap_or_else(|e| panic!("{e}"));
        decide(&plan, &outcomes, options)
    }
}

/// (code, reported limit's name, remaining, reset in µs) of descriptor 0.
fn summary(decision: &Decision<'_>) -> (Code, Option<String>, u32, Option<u64>) {
    let s = &decision.statuses[0];
    let name = s
        .limit
        .as_ref()
        .and_then(|l| l.name.as_deref().map(str::to_owned));
    (s.code, name, s.remaining, s.reset_us)
}

fn named(name: &str) -> Option<String> {
    Some(name.to_owned())
}

#[test]
fn every_limit_is_counted_and_the_most_constrained_one_is_reported() {
    let h = Harness::new(RULES);
    let plan = plan(
        &Request {
            domain: "api",
            descriptors: vec![Descriptor::new([("client", "a")], None, None)],
            hits: 1,
        },
        &h.rules,
        &h.hasher,
        PlanOptions::default(),
    );
    assert_eq!(plan.ops.len(), 2, "one operation per limit");
    assert_eq!(plan.vetoes, [true, true]);
    assert_eq!(
        (plan.ops[0].spec.period_us, plan.ops[1].spec.period_us),
        (S, 86_400 * S)
    );

    let client: &[&[(&str, &str)]] = &[&[("client", "a")]];
    let second_end = S;
    // The burst has fewer left than the day: it is reported.
    assert_eq!(
        summary(&h.decide(client)),
        (Code::Ok, named("burst"), 1, Some(second_end))
    );
    assert_eq!(
        summary(&h.decide(client)),
        (Code::Ok, named("burst"), 0, Some(second_end))
    );
    // Over the burst: denied by it, and the day keeps its 3.
    assert_eq!(
        summary(&h.decide(client)),
        (Code::OverLimit, named("burst"), 0, Some(second_end))
    );
    h.clock.advance(S);
    assert_eq!(
        summary(&h.decide(client)),
        (Code::Ok, named("burst"), 1, Some(S))
    );
    assert_eq!(
        summary(&h.decide(client)),
        (Code::Ok, named("burst"), 0, Some(S))
    );
    h.clock.advance(S);
    // One left of the burst, none of the day: the day is reported.
    let day_end = 86_400 * S - (NOW + 2 * S) % (86_400 * S);
    assert_eq!(
        summary(&h.decide(client)),
        (Code::Ok, named("daily"), 0, Some(day_end))
    );
    // The day denies, though the burst would admit: the wait is the day's.
    let denied = h.decide(client);
    assert_eq!(
        summary(&denied),
        (Code::OverLimit, named("daily"), 0, Some(day_end))
    );
    assert_eq!(denied.overall, Code::OverLimit);
    let limit = denied.statuses[0].limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.window),
        (5, Window::of(Unit::Day))
    );
}

#[test]
fn a_request_denied_by_one_limit_consumes_nothing_in_the_others() {
    let h = Harness::new(RULES);
    let client: &[&[(&str, &str)]] = &[&[("client", "b")]];
    h.decide(client);
    h.decide(client);
    for _ in 0..10 {
        assert_eq!(h.decide(client).overall, Code::OverLimit);
    }
    // The day's remaining count goes on from 3: the denied requests took none.
    h.clock.advance(S);
    assert_eq!(summary(&h.decide(client)).2, 1, "burst 1 left, day 2");
    assert_eq!(summary(&h.decide(client)).2, 0, "burst 0 left, day 1");
    h.clock.advance(S);
    assert_eq!(summary(&h.decide(client)).1, named("daily"), "day 0 left");
    assert_eq!(
        h.decide(client).overall,
        Code::OverLimit,
        "the day's five are spent"
    );
}

#[test]
fn replaces_drops_only_the_limit_it_names() {
    let h = Harness::new(RULES);
    let both: &[&[(&str, &str)]] = &[&[("client", "c")], &[("login", "x")]];
    let day_end = Some(86_400 * S - NOW % (86_400 * S));
    // The burst is replaced: five in one second pass, counted by the day.
    for remaining in (0..5).rev() {
        assert_eq!(
            summary(&h.decide(both)),
            (Code::Ok, named("daily"), remaining, day_end)
        );
    }
    assert_eq!(summary(&h.decide(both)).0, Code::OverLimit, "the day's 5");
}

#[test]
fn a_five_minute_window_resets_at_its_epoch_aligned_end() {
    let h = Harness::new(RULES);
    let five: &[&[(&str, &str)]] = &[&[("five", "a")]];
    let until_end = 300 * S - NOW % (300 * S);
    assert_eq!(until_end, 100 * S);
    for remaining in [2, 1, 0] {
        let d = h.decide(five);
        assert_eq!(
            summary(&d),
            (Code::Ok, named("per_5m"), remaining, Some(until_end))
        );
        let limit = d.statuses[0].limit.as_ref().unwrap();
        assert_eq!(
            limit.window,
            Window::Units {
                unit: Unit::Minute,
                multiplier: 5
            }
        );
        assert_eq!(limit.window.reported_unit(), None);
    }
    // Sliding window (the default): the full window's count weighs in at
    // first, so the wait runs past the end, until it weighs 2 of 3.
    let denied = h.decide(five);
    assert_eq!(denied.statuses[0].code, Code::OverLimit);
    assert_eq!(denied.statuses[0].reset_us, Some(until_end + 100 * S));
    h.clock.advance(until_end + 100 * S);
    assert_eq!(h.decide(five).statuses[0].code, Code::Ok);
}

#[test]
fn a_calendar_month_quota_resets_at_local_midnight_on_the_first() {
    let h = Harness::new(RULES);
    // 2027-01-31T22:30:00Z is 23:30 in Berlin: January's last half hour.
    let berlin_new_year_month = 1_801_434_600 * S;
    h.clock.set(berlin_new_year_month);
    let tenant: &[&[(&str, &str)]] = &[&[("tenant", "acme")]];
    let half_hour = 1_800 * S;
    let d = h.decide(tenant);
    assert_eq!(
        summary(&d),
        (Code::Ok, named("monthly"), 1, Some(half_hour))
    );
    assert_eq!(d.statuses[0].quota, Some((1, half_hour)));
    let limit = d.statuses[0].limit.as_ref().unwrap();
    assert_eq!(limit.window.reported_unit(), Some(Unit::Month));
    h.decide(tenant);
    assert_eq!(h.decide(tenant).statuses[0].code, Code::OverLimit);
    // 23:00 UTC is midnight on 1 February in Berlin: a new month.
    h.clock.set(berlin_new_year_month + half_hour);
    let d = h.decide(tenant);
    assert_eq!(d.statuses[0].code, Code::Ok);
    // February 2027 has 28 days.
    assert_eq!(d.statuses[0].reset_us, Some(28 * 86_400 * S));
    let op = &plan(
        &Request {
            domain: "api",
            descriptors: vec![Descriptor::new([("tenant", "acme")], None, None)],
            hits: 1,
        },
        &h.rules,
        &h.hasher,
        PlanOptions::default(),
    )
    .ops[0];
    assert_eq!(op.spec.algorithm, Algorithm::FixedWindow);
    assert_eq!(
        op.spec.calendar.map(|c| (c.unit, c.time_zone.name())),
        Some((CalendarUnit::Month, "Europe/Berlin"))
    );
}

// === quota_mode with several limits ===

const QUOTAS: &str = r#"
domain: api
descriptors:
  - key: q1
    quota_mode: true
    rate_limits:
      - {name: burst, unit: second, requests_per_unit: 2}
      - {name: daily, unit: day, requests_per_unit: 4}
  - key: q2
    quota_mode: true
    rate_limit: {name: q2, unit: minute, requests_per_unit: 10}
"#;

#[test]
fn a_quota_among_several_vetoes_with_none_of_its_limits() {
    let h = Harness::new(QUOTAS);
    let vetoes = |descriptors: Vec<Descriptor<'static>>| {
        let request = Request {
            domain: "api",
            descriptors,
            hits: 1,
        };
        plan(&request, &h.rules, &h.hasher, PlanOptions::default()).vetoes
    };
    let q1 = || Descriptor::new([("q1", "a")], None, None);
    let q2 = || Descriptor::new([("q2", "b")], None, None);
    assert_eq!(vetoes(vec![q1()]), [true, true], "the request's only quota");
    assert_eq!(vetoes(vec![q1(), q2()]), [false, false, false]);
}

#[test]
fn a_quota_with_several_limits_is_over_when_one_of_them_is() {
    let h = Harness::new(QUOTAS);
    let both: &[&[(&str, &str)]] = &[&[("q1", "a")], &[("q2", "b")]];
    h.decide(both);
    h.decide(both);
    // q1's burst is over, q2 is not: q1's status says so, the request passes,
    // and (no veto among several quotas) q1's day counts the hit.
    let third = h.decide(both);
    assert_eq!(third.overall, Code::Ok);
    assert_eq!(
        (summary(&third).0, summary(&third).1),
        (Code::OverLimit, named("burst"))
    );
    assert_eq!(third.statuses[1].code, Code::Ok);
    h.clock.advance(S);
    // Alone, q1 vetoes: its day (3 used of 4) now bounds it.
    let q1: &[&[(&str, &str)]] = &[&[("q1", "a")]];
    assert_eq!(summary(&h.decide(q1)).0, Code::Ok);
    let over = h.decide(q1);
    assert_eq!(
        (summary(&over).0, summary(&over).1),
        (Code::OverLimit, named("daily"))
    );
    assert_eq!(over.overall, Code::OverLimit, "its only quota is over");
}
