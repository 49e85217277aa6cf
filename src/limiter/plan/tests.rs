//! plan -> check -> decide, end to end: rules come from YAML through the real
//! loader, counters live in a small map driven by `limiter::check`, as the
//! in-process store does.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::limiter::{check, CounterState, Descriptor, Entry, LimitOverride};
use crate::rules::yaml::{compile_all, parse_str};

const SEC: u64 = 1_000_000;
const MIN: u64 = 60 * SEC;
/// 10s into a minute.
const NOW: u64 = 28_333_333 * MIN + 10 * SEC;

fn rules(yaml: &str) -> RuleSet {
    let root = parse_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    compile_all(&[("test.yaml".to_owned(), root)]).unwrap_or_else(|e| panic!("{e}"))
}

fn options(default_algorithm: Algorithm) -> PlanOptions {
    PlanOptions {
        default_algorithm,
        global_shadow: false,
        global_quota: false,
    }
}

fn d<'a>(pairs: &[(&'a str, &'a str)]) -> Descriptor<'a> {
    Descriptor::new(pairs.iter().copied(), None, None)
}

fn with_hits(mut descriptor: Descriptor<'_>, hits: u64) -> Descriptor<'_> {
    descriptor.hits = Some(hits);
    descriptor
}

fn with_override(
    mut descriptor: Descriptor<'_>,
    requests_per_unit: u32,
    unit: Unit,
) -> Descriptor<'_> {
    descriptor.limit_override = Some(LimitOverride {
        requests_per_unit,
        unit,
    });
    descriptor
}

fn request<'a>(domain: &'a str, descriptors: Vec<Descriptor<'a>>) -> Request<'a> {
    Request {
        domain,
        descriptors,
        hits: 1,
    }
}

/// Counters in a map, updated the way the memory store updates them.
struct Harness {
    rules: RuleSet,
    hasher: KeyHasher,
    options: PlanOptions,
    counters: HashMap<CounterKey, CounterState>,
}

impl Harness {
    fn new(yaml: &str, options: PlanOptions) -> Harness {
        Harness {
            rules: rules(yaml),
            hasher: KeyHasher::from_secret(b"plan tests"),
            options,
            counters: HashMap::new(),
        }
    }

    fn plan<'r>(&'r self, request: &Request<'_>) -> Plan<'r> {
        request.validate().unwrap_or_else(|e| panic!("{e}"));
        plan(request, &self.rules, &self.hasher, self.options)
    }

    /// The decision for `request` at `now`, and the plan it came from.
    fn run(&mut self, request: &Request<'_>, now: u64) -> (Plan<'_>, Decision<'_>) {
        let ops = self.plan(request).ops;
        let outcomes: Vec<Outcome> = ops
            .iter()
            .map(|op| {
                let state = self.counters.get(&op.key).copied();
                let checked = check(&op.spec, state, now, op.hits);
                if let Some(state) = checked.state {
                    self.counters.insert(op.key, state);
                }
                checked.outcome
            })
            .collect();
        let plan = self.plan(request);
        let decision = decide(&plan, &outcomes, self.options);
        (plan, decision)
    }

    fn decide(&mut self, request: &Request<'_>, now: u64) -> Decision<'_> {
        self.run(request, now).1
    }
}

const PER_CLIENT: &str = "
domain: api
descriptors:
  - key: client
    rate_limit:
      unit: minute
      requests_per_unit: 5
      algorithm: fixed_window
      name: per_client
  - key: client
    value: internal
";

// === Matching ===

#[test]
fn an_unknown_domain_is_ok_without_limits() {
    let mut h = Harness::new(PER_CLIENT, PlanOptions::default());
    let req = request(
        "elsewhere",
        vec![
            d(&[("client", "a")]),
            with_override(d(&[("client", "b")]), 1, Unit::Second),
        ],
    );
    let (plan, decision) = h.run(&req, NOW);
    assert!(!plan.domain_known);
    assert!(plan.ops.is_empty(), "an override needs a known domain too");
    assert!(plan.items.iter().all(|i| matches!(i, PlanItem::NoLimit)));
    assert_eq!(decision.overall, Code::Ok);
    assert_eq!(decision.statuses.len(), 2);
    for s in &decision.statuses {
        assert_eq!(s.code, Code::Ok);
        assert_eq!(s.limit, None);
        assert_eq!(s.rule, None);
        assert_eq!(s.reset_us, None);
    }
    assert_eq!(decision.most_constrained(), None);
}

#[test]
fn unmatched_and_whitelisted_descriptors_have_no_limit() {
    let mut h = Harness::new(PER_CLIENT, PlanOptions::default());
    let req = request(
        "api",
        vec![
            d(&[("client", "internal")]),
            d(&[("path", "/")]),
            d(&[("client", "a"), ("deeper", "x")]),
        ],
    );
    let (plan, decision) = h.run(&req, NOW);
    assert!(plan.domain_known);
    assert!(plan.ops.is_empty());
    assert!(plan.items.iter().all(|i| matches!(i, PlanItem::NoLimit)));
    assert_eq!(decision.overall, Code::Ok);
    assert!(decision.statuses.iter().all(|s| s.limit.is_none()));
}

// === Hits ===

#[test]
fn request_hits_apply_to_descriptors_without_their_own() {
    let mut h = Harness::new(PER_CLIENT, PlanOptions::default());
    let mut req = request("api", vec![d(&[("client", "a")])]);
    req.hits = 3;
    assert_eq!(h.plan(&req).ops[0].hits, 3);
    let first = h.decide(&req, NOW);
    assert_eq!(first.overall, Code::Ok);
    assert_eq!(first.statuses[0].remaining, 2);
    let second = h.decide(&req, NOW);
    assert_eq!(second.overall, Code::OverLimit, "3 more do not fit in 2");
    assert_eq!(second.statuses[0].remaining, 2, "a denial consumes nothing");
    assert_eq!(second.statuses[0].reset_us, Some(50 * SEC));
}

#[test]
fn descriptor_hits_win_over_request_hits() {
    let mut h = Harness::new(PER_CLIENT, PlanOptions::default());
    let mut req = request(
        "api",
        vec![with_hits(d(&[("client", "a")]), 2), d(&[("client", "b")])],
    );
    req.hits = 4;
    let plan = h.plan(&req);
    assert_eq!(plan.ops[0].hits, 2);
    assert_eq!(plan.ops[1].hits, 4);
    let decision = h.decide(&req, NOW);
    assert_eq!(decision.statuses[0].remaining, 3);
    assert_eq!(decision.statuses[1].remaining, 1);
}

#[test]
fn zero_descriptor_hits_check_without_consuming() {
    let mut h = Harness::new(PER_CLIENT, PlanOptions::default());
    let probe = request("api", vec![with_hits(d(&[("client", "a")]), 0)]);
    assert_eq!(h.plan(&probe).ops[0].hits, 0);
    for _ in 0..10 {
        let decision = h.decide(&probe, NOW);
        assert_eq!(decision.overall, Code::Ok);
        assert_eq!(decision.statuses[0].remaining, 5);
    }
    assert!(h.counters.is_empty(), "checks store nothing");

    let mut spend = request("api", vec![d(&[("client", "a")])]);
    spend.hits = 5;
    assert_eq!(h.decide(&spend, NOW).overall, Code::Ok);
    // At the limit is not over it (envoyproxy/ratelimit compares
    // "after increase > limit"), so a check still says OK, with 0 left.
    let at_limit = h.decide(&probe, NOW);
    assert_eq!(at_limit.overall, Code::Ok);
    assert_eq!(at_limit.statuses[0].remaining, 0);
    spend.hits = 1;
    assert_eq!(h.decide(&spend, NOW).overall, Code::OverLimit);
}

// === Limit overrides ===

#[test]
fn a_limit_override_replaces_the_configured_limit_with_the_default_algorithm() {
    let mut h = Harness::new(PER_CLIENT, options(Algorithm::Gcra));
    let req = request(
        "api",
        vec![
            with_override(d(&[("client", "a")]), 2, Unit::Second),
            with_override(d(&[("no_rule", "x")]), 7, Unit::Hour),
        ],
    );
    let plan = h.plan(&req);
    assert!(matches!(
        plan.items[0],
        PlanItem::Limited { rule: None, ref limits } if *limits == (0..1)
    ));
    assert_eq!(
        plan.limits[0],
        PlannedLimit {
            requests_per_unit: 2,
            window: Window::of(Unit::Second),
            name: None,
            op: 0
        }
    );
    assert_eq!(
        plan.ops[0].spec,
        CounterSpec {
            algorithm: Algorithm::Gcra,
            limit: 2,
            period_us: SEC,
            burst: 2,
            calendar: None,
        },
        "not the rule's fixed_window 5/minute"
    );
    assert!(
        matches!(plan.items[1], PlanItem::Limited { rule: None, ref limits } if *limits == (1..2)),
        "an override limits a descriptor no rule matches"
    );
    assert_eq!(
        (plan.limits[1].requests_per_unit, plan.limits[1].window),
        (7, Window::of(Unit::Hour))
    );

    let first = h.decide(&req, NOW);
    assert_eq!(first.overall, Code::Ok);
    assert_eq!(
        first.statuses[0].limit,
        Some(CurrentLimit {
            requests_per_unit: 2,
            window: Window::of(Unit::Second),
            name: None,
        })
    );
    assert_eq!(first.statuses[0].rule, None);
    assert_eq!(first.statuses[0].remaining, 1);
    assert_eq!(h.decide(&req, NOW).overall, Code::Ok);
    assert_eq!(h.decide(&req, NOW).overall, Code::OverLimit);
}

// === Rule options ===

#[test]
fn a_rule_named_in_another_matched_rules_replaces_is_not_counted() {
    let mut h = Harness::new(
        "
domain: api
descriptors:
  - key: client
    rate_limit: {unit: minute, requests_per_unit: 100, name: per_client}
  - key: path
    value: /login
    rate_limit:
      unit: minute
      requests_per_unit: 1
      name: login
      replaces:
        - name: per_client
",
        PlanOptions::default(),
    );
    let both = request("api", vec![d(&[("client", "a")]), d(&[("path", "/login")])]);
    let (plan, decision) = h.run(&both, NOW);
    match &plan.items[0] {
        PlanItem::Replaced { rule } => assert_eq!(&*rule.path, "api.client"),
        other => panic!("expected Replaced, got {other:?}"),
    }
    assert!(
        matches!(plan.items[1], PlanItem::Limited { ref limits, .. } if plan.limits[limits.start].op == 0)
    );
    assert_eq!(plan.ops.len(), 1, "only the replacing rule counts");
    assert_eq!(decision.statuses[0].code, Code::Ok);
    assert_eq!(decision.statuses[0].limit, None);
    assert_eq!(
        decision.statuses[0].rule.map(|r| &*r.path),
        Some("api.client")
    );
    assert_eq!(
        decision.statuses[1]
            .limit
            .as_ref()
            .and_then(|l| l.name.as_deref()),
        Some("login")
    );
    assert_eq!(h.decide(&both, NOW).overall, Code::OverLimit);

    // Without the replacing rule in the request, the named rule counts.
    let alone = request("api", vec![d(&[("client", "a")])]);
    let plan = h.plan(&alone);
    assert!(matches!(
        plan.items[0],
        PlanItem::Limited { rule: Some(_), .. }
    ));
    let decision = h.decide(&alone, NOW);
    assert_eq!(decision.statuses[0].remaining, 99);
    assert_eq!(
        decision.statuses[0]
            .limit
            .as_ref()
            .and_then(|l| l.name.as_deref()),
        Some("per_client")
    );
}

#[test]
fn shadow_mode_reports_over_limit_as_ok() {
    let mut h = Harness::new(
        "
domain: api
descriptors:
  - key: client
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
",
        PlanOptions::default(),
    );
    let req = request("api", vec![d(&[("client", "a")])]);
    let first = h.decide(&req, NOW);
    assert_eq!(first.statuses[0].code, Code::Ok);
    assert!(
        !first.statuses[0].shadowed,
        "within the limit: nothing to shadow"
    );
    for _ in 0..3 {
        let over = h.decide(&req, NOW);
        assert_eq!(over.overall, Code::Ok);
        assert_eq!(over.statuses[0].code, Code::Ok);
        assert!(over.statuses[0].shadowed);
        assert_eq!(over.statuses[0].remaining, 0);
        assert!(
            over.statuses[0].limit.is_some(),
            "the limit is still reported"
        );
        assert!(!over.global_shadowed);
    }
}

#[test]
fn global_shadow_mode_reports_over_limit_as_ok_overall() {
    for global_shadow in [false, true] {
        let mut h = Harness::new(
            PER_CLIENT,
            PlanOptions {
                default_algorithm: Algorithm::SlidingWindow,
                global_shadow,
                global_quota: false,
            },
        );
        let mut req = request("api", vec![d(&[("client", "a")])]);
        req.hits = 5;
        let ok = h.decide(&req, NOW);
        assert_eq!(ok.overall, Code::Ok);
        assert!(!ok.global_shadowed, "nothing over the limit to shadow");
        let over = h.decide(&req, NOW);
        assert_eq!(
            over.statuses[0].code,
            Code::OverLimit,
            "the status still tells the truth"
        );
        assert_eq!(over.global_shadowed, global_shadow);
        let expected = if global_shadow {
            Code::Ok
        } else {
            Code::OverLimit
        };
        assert_eq!(over.overall, expected);
    }
}

#[test]
fn quota_mode_forces_a_fixed_window_and_reports_the_quota() {
    let mut h = Harness::new(
        "
domain: api
descriptors:
  - key: tenant
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 5, algorithm: sliding_window}
  - key: client
    rate_limit: {unit: minute, requests_per_unit: 5}
",
        options(Algorithm::Gcra),
    );
    let req = request("api", vec![d(&[("tenant", "t")]), d(&[("client", "c")])]);
    let (plan, decision) = h.run(&req, NOW);
    assert_eq!(plan.ops[0].spec.algorithm, Algorithm::FixedWindow);
    assert_eq!(
        plan.ops[1].spec.algorithm,
        Algorithm::Gcra,
        "the default for the other"
    );
    assert_eq!(decision.statuses[0].quota, Some((4, 50 * SEC)));
    assert_eq!(decision.statuses[0].reset_us, Some(50 * SEC));
    assert_eq!(decision.statuses[1].quota, None);
}

#[test]
fn unlimited_rules_report_max_remaining_and_count_nothing() {
    let mut h = Harness::new(
        "
domain: api
descriptors:
  - key: client
    value: internal
    rate_limit: {unlimited: true}
  - key: client
    rate_limit: {unit: second, requests_per_unit: 1}
",
        PlanOptions::default(),
    );
    let req = request("api", vec![d(&[("client", "internal")])]);
    for _ in 0..3 {
        let (plan, decision) = h.run(&req, NOW);
        assert!(matches!(plan.items[0], PlanItem::Unlimited { .. }));
        assert!(plan.ops.is_empty());
        let s = &decision.statuses[0];
        assert_eq!(s.code, Code::Ok);
        assert_eq!(s.remaining, u32::MAX);
        assert_eq!(s.limit, None);
        assert_eq!(s.rule.map(|r| &*r.path), Some("api.client_internal"));
    }
}

#[test]
fn rule_algorithm_and_burst_reach_the_counter() {
    let h = Harness::new(
        "
domain: api
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 10, algorithm: gcra, burst: 3}
  - key: b
    rate_limit: {unit: hour, requests_per_unit: 10, algorithm: fixed_window}
  - key: c
    rate_limit: {unit: day, requests_per_unit: 10}
",
        options(Algorithm::SlidingWindow),
    );
    let req = request(
        "api",
        vec![d(&[("a", "1")]), d(&[("b", "1")]), d(&[("c", "1")])],
    );
    let specs: Vec<_> = h.plan(&req).ops.iter().map(|op| op.spec).collect();
    assert_eq!(
        specs,
        [
            CounterSpec {
                algorithm: Algorithm::Gcra,
                limit: 10,
                period_us: SEC,
                burst: 3,
                calendar: None,
            },
            CounterSpec {
                algorithm: Algorithm::FixedWindow,
                limit: 10,
                period_us: 3_600 * SEC,
                burst: 10,
                calendar: None,
            },
            CounterSpec {
                algorithm: Algorithm::SlidingWindow,
                limit: 10,
                period_us: 86_400 * SEC,
                burst: 10,
                calendar: None,
            },
        ]
    );
}

#[test]
fn counters_are_per_value_unless_shared_by_a_wildcard() {
    let h = Harness::new(
        "
domain: api
descriptors:
  - key: path
    value: /static/*
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 10}
",
        PlanOptions::default(),
    );
    let key = |path: &str| {
        let req = request("api", vec![d(&[("path", path)])]);
        h.plan(&req).ops[0].key
    };
    assert_eq!(
        key("/static/a.css"),
        key("/static/b.js"),
        "shared by the pattern"
    );
    assert_ne!(key("/api/a"), key("/api/b"), "one counter per value");
    assert_eq!(key("/api/a"), key("/api/a"));
}

// === The overall answer ===

const TWO_RULES: &str = "
domain: api
descriptors:
  - key: client
    rate_limit: {unit: minute, requests_per_unit: 10, algorithm: fixed_window}
  - key: path
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: fixed_window}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, algorithm: fixed_window}
";

#[test]
fn any_over_limit_descriptor_makes_the_request_over_limit() {
    let mut h = Harness::new(TWO_RULES, PlanOptions::default());
    let req = request("api", vec![d(&[("client", "c")]), d(&[("path", "/")])]);
    assert_eq!(h.decide(&req, NOW).overall, Code::Ok);
    assert_eq!(h.decide(&req, NOW).overall, Code::Ok);
    let third = h.decide(&req, NOW);
    assert_eq!(third.overall, Code::OverLimit);
    assert_eq!(third.statuses[0].code, Code::Ok);
    assert_eq!(third.statuses[0].remaining, 7);
    assert_eq!(third.statuses[1].code, Code::OverLimit);

    // A shadowed descriptor over its limit does not make the request over.
    let shadowed = request("api", vec![d(&[("client", "x")]), d(&[("shadow", "s")])]);
    assert_eq!(h.decide(&shadowed, NOW).overall, Code::Ok);
    let second = h.decide(&shadowed, NOW);
    assert!(second.statuses[1].shadowed);
    assert_eq!(second.overall, Code::Ok);
}

#[test]
fn most_constrained_prefers_over_limit_then_least_remaining() {
    let mut h = Harness::new(TWO_RULES, PlanOptions::default());
    let unlimited = d(&[("unknown", "u")]);
    let req = request(
        "api",
        vec![
            unlimited.clone(),
            d(&[("client", "c")]),
            d(&[("path", "/")]),
        ],
    );
    let first = h.decide(&req, NOW);
    let most = first.most_constrained().map(|s| s.remaining);
    assert_eq!(
        most,
        Some(1),
        "path has 1 left, client 9; no-limit statuses do not count"
    );
    h.decide(&req, NOW);
    let over = h.decide(&req, NOW);
    let most = over.most_constrained().expect("limited statuses");
    assert_eq!(most.code, Code::OverLimit);
    assert_eq!(most.limit.as_ref().map(|l| l.requests_per_unit), Some(2));

    // Over limit beats fewer remaining: client over with 0 left versus a
    // fresh path (1 left) would tie on remaining; make client the only over.
    let mut h = Harness::new(TWO_RULES, PlanOptions::default());
    let mut spend = request("api", vec![d(&[("client", "z")])]);
    spend.hits = 10;
    h.decide(&spend, NOW);
    let req = request("api", vec![d(&[("path", "/p")]), d(&[("client", "z")])]);
    let decision = h.decide(&req, NOW);
    assert_eq!(decision.statuses[0].remaining, 1);
    assert_eq!(decision.statuses[1].remaining, 0);
    let most = decision.most_constrained().expect("limited statuses");
    assert_eq!(most.code, Code::OverLimit);
    assert_eq!(most.limit.as_ref().map(|l| l.requests_per_unit), Some(10));
}

#[test]
fn near_limit_is_set_from_eighty_percent_used() {
    let mut h = Harness::new(TWO_RULES, PlanOptions::default());
    let mut req = request("api", vec![d(&[("client", "c")])]);
    req.hits = 7;
    assert!(!h.decide(&req, NOW).statuses[0].near_limit, "70% used");
    req.hits = 1;
    assert!(h.decide(&req, NOW).statuses[0].near_limit, "80% used");
    req.hits = 2;
    assert!(h.decide(&req, NOW).statuses[0].near_limit, "100% used");
    let over = h.decide(&req, NOW);
    assert_eq!(over.statuses[0].code, Code::OverLimit);
    assert!(!over.statuses[0].near_limit, "over is not near");
}

#[test]
fn gcra_near_limit_is_measured_against_the_burst() {
    // 10 a second with a bucket of 3: two hits use 67% of the bucket, three
    // use all of it, though 3 of 10 is far from 80% of the rate.
    let yaml = "
domain: api
descriptors:
  - key: client
    rate_limit: { unit: second, requests_per_unit: 10, algorithm: gcra, burst: 3 }
";
    let mut h = Harness::new(yaml, PlanOptions::default());
    let mut req = request("api", vec![d(&[("client", "c")])]);
    req.hits = 2;
    assert!(!h.decide(&req, NOW).statuses[0].near_limit, "2 of 3");
    req.hits = 1;
    let full = h.decide(&req, NOW);
    assert_eq!(full.statuses[0].code, Code::Ok);
    assert!(full.statuses[0].near_limit, "3 of 3");
}

// === Counter keys ===

/// Entry lists over a tiny alphabet, so that equal lists and lists that
/// differ only in where one string ends and the next begins
/// (("ab", "") against ("a", "b")) come up often.
fn small_entries() -> impl Strategy<Value = (String, Vec<(String, String)>)> {
    (
        "[ab]{1,2}",
        prop::collection::vec(("[ab]{1,2}", "[ab]{0,2}"), 1..=3),
    )
}

fn as_entries(pairs: &[(String, String)]) -> Vec<Entry<'_>> {
    pairs
        .iter()
        .map(|(key, value)| Entry { key, value })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Two descriptors share a counter exactly when domain and entries are
    /// equal.
    #[test]
    fn counter_keys_are_equal_iff_descriptors_are(
        (domain_a, a) in small_entries(),
        (domain_b, b) in small_entries(),
        algorithm in prop::sample::select(Algorithm::ALL.to_vec()),
    ) {
        let h = KeyHasher::from_secret(b"key properties");
        let ka = h.counter_key(&domain_a, &as_entries(&a), &[], algorithm, 60);
        let kb = h.counter_key(&domain_b, &as_entries(&b), &[], algorithm, 60);
        prop_assert_eq!(ka == kb, (&domain_a, &a) == (&domain_b, &b));
        prop_assert_eq!(ka.hash == kb.hash, ka == kb);
    }

    /// The Redis key is the prefix, a hash tag of 32 hex digits, the
    /// algorithm and the period: no descriptor value ever reaches Redis.
    #[test]
    fn redis_keys_carry_only_a_hash(
        domain in "[ -~]{1,12}",
        pairs in prop::collection::vec(("[ -~]{1,12}", "[ -~]{0,8}[A-Z][ -~]{0,8}"), 1..=4),
        algorithm in prop::sample::select(Algorithm::ALL.to_vec()),
        unit in prop::sample::select(Unit::ALL.to_vec()),
    ) {
        let h = KeyHasher::from_secret(b"key properties");
        let key = h
            .counter_key(&domain, &as_entries(&pairs), &[], algorithm, unit.seconds())
            .redis_key("sluice:");
        let rest = key.strip_prefix("sluice:{").expect("prefix and hash tag");
        let (hash, rest) = rest.split_at(32);
        prop_assert!(hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{}", key);
        let tag = match algorithm {
            Algorithm::SlidingWindow => "sw",
            Algorithm::FixedWindow => "fw",
            Algorithm::Gcra => "gcra",
        };
        prop_assert_eq!(rest, format!("}}:{tag}:{}", unit.seconds()));
        for (_, value) in &pairs {
            prop_assert!(!key.contains(value.as_str()), "{} in {}", value, key);
        }
    }

    /// A `share_threshold` pattern replaces the value: every value it covers
    /// lands on one counter, and other entries still tell counters apart.
    #[test]
    fn shared_patterns_collapse_values(
        first in "[ -~]{0,12}",
        second in "[ -~]{0,12}",
        other in "[ab]{1,2}",
    ) {
        let h = KeyHasher::from_secret(b"key properties");
        let shared = [Some("api/*"), None];
        let key = |value: &str, other: &str| {
            let pairs = [("path".to_owned(), value.to_owned()), ("user".to_owned(), other.to_owned())];
            h.counter_key("d", &as_entries(&pairs), &shared, Algorithm::Gcra, 1)
        };
        prop_assert_eq!(key(&first, &other), key(&second, &other));
        prop_assert_ne!(key(&first, &other), key(&first, &format!("{other}x")));
    }
}

// === quota_mode, as envoyproxy/ratelimit decides it ===

const QUOTAS: &str = "
domain: api
descriptors:
  - key: q1
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
    metadata: {name: q1, owner: {team: a}}
  - key: q2
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
    metadata: {name: q2, owner: {team: b, tier: 2}, only_q2: true}
  - key: regular
    rate_limit: {unit: minute, requests_per_unit: 1}
    metadata: {name: regular}
";

#[test]
fn quotas_deny_a_request_only_when_all_of_them_are_over() {
    let mut h = Harness::new(QUOTAS, options(Algorithm::FixedWindow));
    let q1 = request("api", vec![d(&[("q1", "x")])]);
    assert_eq!(h.decide(&q1, NOW).overall, Code::Ok);
    let alone = h.decide(&q1, NOW);
    assert_eq!(alone.overall, Code::OverLimit, "its only quota is over");

    // q1 over, q2 not: the request passes, q1's status still says over.
    let both = request("api", vec![d(&[("q1", "x")]), d(&[("q2", "y")])]);
    let d1 = h.decide(&both, NOW);
    assert_eq!(d1.overall, Code::Ok);
    assert_eq!(
        [d1.statuses[0].code, d1.statuses[1].code],
        [Code::OverLimit, Code::Ok]
    );
    let d2 = h.decide(&both, NOW);
    assert_eq!(d2.overall, Code::OverLimit, "now both quotas are over");

    // A regular limit over denies whatever the quotas say.
    let mixed = request("api", vec![d(&[("q2", "z")]), d(&[("regular", "r")])]);
    assert_eq!(h.decide(&mixed, NOW).overall, Code::Ok);
    let mixed = request("api", vec![d(&[("q2", "w")]), d(&[("regular", "r")])]);
    let d3 = h.decide(&mixed, NOW);
    assert_eq!(d3.overall, Code::OverLimit);
    assert_eq!(d3.statuses[0].code, Code::Ok);
}

#[test]
fn global_quota_mode_makes_every_descriptor_a_quota() {
    let global = PlanOptions {
        global_quota: true,
        ..options(Algorithm::FixedWindow)
    };
    let mut h = Harness::new(QUOTAS, global);
    let req = request(
        "api",
        vec![d(&[("regular", "r")]), d(&[("unmatched", "u")])],
    );
    h.decide(&req, NOW);
    let decision = h.decide(&req, NOW);
    assert_eq!(decision.statuses[0].code, Code::OverLimit);
    assert_eq!(
        decision.overall,
        Code::Ok,
        "the unmatched descriptor is a quota that passes"
    );
    let alone = request("api", vec![d(&[("regular", "r")])]);
    assert_eq!(h.decide(&alone, NOW).overall, Code::OverLimit);
}

#[test]
fn a_quota_vetoes_the_request_only_when_it_is_the_only_one() {
    let h = Harness::new(QUOTAS, options(Algorithm::FixedWindow));
    let one = request("api", vec![d(&[("q1", "x")]), d(&[("regular", "r")])]);
    assert_eq!(h.plan(&one).vetoes, [true, true]);
    let two = request(
        "api",
        vec![d(&[("q1", "x")]), d(&[("q2", "y")]), d(&[("regular", "r")])],
    );
    assert_eq!(h.plan(&two).vetoes, [false, false, true]);
}

#[test]
fn metadata_of_admitting_rules_merges_first_value_first() {
    let mut h = Harness::new(QUOTAS, options(Algorithm::FixedWindow));
    let req = request("api", vec![d(&[("q1", "x")]), d(&[("q2", "y")])]);
    let first = h.decide(&req, NOW).passed_metadata();
    let expected: Metadata =
        serde_yaml_ng::from_str("{name: q1, owner: {team: a, tier: 2}, only_q2: true}")
            .expect("yaml");
    assert_eq!(first, expected);
    // Both over now; with a fresh q1 value only q1's metadata remains.
    let req = request("api", vec![d(&[("q1", "fresh")]), d(&[("q2", "y")])]);
    let second = h.decide(&req, NOW).passed_metadata();
    let expected: Metadata = serde_yaml_ng::from_str("{name: q1, owner: {team: a}}").expect("yaml");
    assert_eq!(second, expected);
}
