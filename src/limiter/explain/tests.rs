//! Explaining requests: reasons and steps against rules from YAML through
//! the real loader, and the would-be answer against the in-process store's
//! real answer, which explaining must predict without consuming anything.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::clock::ManualClock;
use crate::limiter::{Code, Descriptor, LimitOverride, Unit};
use crate::rules::yaml::{compile_all, parse_str};
use crate::storage::memory::MemoryStore;

const SEC: u64 = 1_000_000;
/// 10 s into a minute.
const NOW: u64 = 28_333_333 * 60 * SEC + 10 * SEC;

const RULES: &str = "
domain: api
descriptors:
  - key: client
    rate_limit: {name: per_client, unit: minute, requests_per_unit: 3}
  - key: client
    value: abc
    rate_limit: {name: abc, unit: minute, requests_per_unit: 4}
  - key: client
    value: ab*
    rate_limit: {name: ab, unit: minute, requests_per_unit: 5}
  - key: client
    value: a*
    rate_limit: {name: a, unit: minute, requests_per_unit: 6}
  - key: client
    value: internal
  - key: route
    value: /v1
    rate_limit: {name: v1, unit: minute, requests_per_unit: 10}
    descriptors:
      - key: method
        rate_limit: {name: v1_method, unit: minute, requests_per_unit: 2}
  - key: nested
    descriptors:
      - key: inner
        rate_limit: {unit: second, requests_per_unit: 1}
  - key: internal
    rate_limit: {unlimited: true}
  - key: general
    rate_limit: {name: general, unit: minute, requests_per_unit: 1}
  - key: specific
    rate_limit:
      name: specific
      unit: minute
      requests_per_unit: 2
      replaces: [{name: general}]
  - key: shadowed
    shadow_mode: true
    rate_limit: {name: shadowed, unit: minute, requests_per_unit: 1}
";

fn rules(yaml: &str) -> RuleSet {
    let root = parse_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    compile_all(&[("test.yaml".to_owned(), root)]).unwrap_or_else(|e| panic!("{e}"))
}

fn d<'a>(pairs: &[(&'a str, &'a str)]) -> Descriptor<'a> {
    Descriptor::new(pairs.iter().copied(), None, None)
}

fn request<'a>(domain: &'a str, descriptors: Vec<Descriptor<'a>>) -> Request<'a> {
    let request = Request {
        domain,
        descriptors,
        hits: 1,
    };
    request.validate().unwrap_or_else(|e| panic!("{e}"));
    request
}

fn hasher() -> KeyHasher {
    KeyHasher::from_secret(b"explain tests")
}

fn explanation<'r>(rules: &'r RuleSet, request: &Request<'_>) -> Explanation<'r> {
    explain(request, rules, &[], &hasher(), PlanOptions::default())
}

/// Each descriptor's explanation, with no counter read (every counter
/// fresh).
fn explained<'r>(rules: &'r RuleSet, request: &Request<'_>) -> Vec<DescriptorExplanation<'r>> {
    explanation(rules, request).descriptors
}

fn hows<'r>(candidates: &[Candidate<'r>]) -> Vec<Matched<'r>> {
    candidates.iter().map(|c| c.how).collect()
}

fn rule_name<'r>(reason: &Reason<'r>) -> Option<&'r str> {
    match reason {
        Reason::Limited(rule) | Reason::Unlimited(rule) | Reason::Replaced { rule, .. } => {
            rule.name.as_deref()
        }
        _ => None,
    }
}

// === Matching ===

#[test]
fn the_match_and_the_entries_passed_over_in_the_matchers_order() {
    let rules = rules(RULES);
    let cases: [(&str, Matched<'_>, &[Matched<'_>], &str); 4] = [
        (
            "abc",
            Matched::Exact,
            &[
                Matched::Wildcard("ab*"),
                Matched::Wildcard("a*"),
                Matched::KeyOnly,
            ],
            "abc",
        ),
        (
            "abd",
            Matched::Wildcard("ab*"),
            &[Matched::Wildcard("a*"), Matched::KeyOnly],
            "ab",
        ),
        ("axe", Matched::Wildcard("a*"), &[Matched::KeyOnly], "a"),
        ("zzz", Matched::KeyOnly, &[], "per_client"),
    ];
    for (value, how, passed_over, rule) in cases {
        let entries = [("client", value)];
        let req = request("api", vec![d(&entries)]);
        let [e] = &explained(&rules, &req)[..] else {
            panic!("one descriptor");
        };
        assert_eq!(e.steps.len(), 1, "{value}");
        let step = &e.steps[0];
        assert_eq!(step.matched.map(|c| c.how), Some(how), "{value}");
        assert_eq!(hows(&step.passed_over), passed_over, "{value}");
        assert_eq!(rule_name(&e.reason), Some(rule), "{value}");
        assert_eq!(e.scope, None);
        // The lookup `plan` makes agrees.
        let looked_up = rules.lookup("api", &req.descriptors[0].entries);
        assert_eq!(looked_up.and_then(|m| m.rule.name.as_deref()), Some(rule));
        // Each entry's own rule is there to see.
        let rule_of = |c: &Candidate<'_>| c.node.rule.as_ref().and_then(|r| r.name.clone());
        assert_eq!(
            step.matched.as_ref().and_then(rule_of).as_deref(),
            Some(rule)
        );
    }

    let req = request("api", vec![d(&[("other", "x")])]);
    let e = &explained(&rules, &req)[0];
    assert_eq!(e.reason, Reason::NoMatch { depth: 0 });
    assert_eq!(e.steps.len(), 1);
    assert!(e.steps[0].matched.is_none());
    assert!(e.steps[0].passed_over.is_empty());
}

#[test]
fn wildcards_anywhere_are_reported_as_written_in_file_order() {
    // More patterns than a level tries in turn, so the first wildcard is
    // found through the pattern set's trie.
    let mut yaml = String::from("domain: w\ndescriptors:\n");
    for i in 0..10 {
        yaml += &format!("  - key: path\n    value: /x{i}/*\n    rate_limit: {{name: x{i}, unit: minute, requests_per_unit: 1}}\n");
    }
    yaml += "  - key: path\n    value: /*/items/*\n    rate_limit: {name: items, unit: minute, requests_per_unit: 2}\n";
    yaml += "  - key: path\n    value: '*'\n    rate_limit: {name: all, unit: minute, requests_per_unit: 3}\n";
    yaml += "  - key: path\n    rate_limit: {name: any, unit: minute, requests_per_unit: 4}\n";
    let rules = rules(&yaml);
    let cases: [(&str, Matched<'_>, &[Matched<'_>], &str); 3] = [
        (
            "/x3/items/7",
            Matched::Wildcard("/x3/*"),
            &[
                Matched::Wildcard("/*/items/*"),
                Matched::Wildcard("*"),
                Matched::KeyOnly,
            ],
            "x3",
        ),
        (
            "/y/items/7",
            Matched::Wildcard("/*/items/*"),
            &[Matched::Wildcard("*"), Matched::KeyOnly],
            "items",
        ),
        (
            "/y/other",
            Matched::Wildcard("*"),
            &[Matched::KeyOnly],
            "all",
        ),
    ];
    for (value, how, passed_over, rule) in cases {
        let entries = [("path", value)];
        let req = request("w", vec![d(&entries)]);
        let [e] = &explained(&rules, &req)[..] else {
            panic!("one descriptor");
        };
        assert_eq!(e.steps[0].matched.map(|c| c.how), Some(how), "{value}");
        assert_eq!(hows(&e.steps[0].passed_over), passed_over, "{value}");
        assert_eq!(rule_name(&e.reason), Some(rule), "{value}");
        let looked_up = rules.lookup("w", &req.descriptors[0].entries);
        assert_eq!(looked_up.and_then(|m| m.rule.name.as_deref()), Some(rule));
    }
}

#[test]
fn every_limit_of_a_descriptor_is_a_counter() {
    let rules = rules(
        "
domain: m
descriptors:
  - key: user
    rate_limits:
      - {name: burst, unit: second, requests_per_unit: 2}
      - {name: daily, unit: day, requests_per_unit: 100}
      - {unit: minute, unit_multiplier: 5, requests_per_unit: 10}
",
    );
    let store = store();
    let req = request("m", vec![d(&[("user", "u")])]);
    let report = explain_with(&store, &rules, &req, PlanOptions::default(), NOW);
    let counters = &report.descriptors[0].counters;
    let names: Vec<_> = counters.iter().map(|c| c.name.map(|n| &**n)).collect();
    assert_eq!(names, [Some("burst"), Some("daily"), None]);
    let limits: Vec<_> = counters.iter().map(|c| c.spec.limit).collect();
    assert_eq!(limits, [2, 100, 10]);
    assert!(counters.iter().all(|c| c.admits && c.now.used == 0));
    assert_eq!(
        report.descriptors[0]
            .explanation
            .summary(&req.descriptors[0].entries),
        "rule m.user applies: 2 per second and 100 per day and 10 per 5 minutes"
    );
}

#[test]
fn the_walk_stops_where_the_descriptor_or_the_rules_end() {
    let rules = rules(RULES);
    let req = request(
        "api",
        vec![
            d(&[("route", "/v1")]),
            d(&[("route", "/v1"), ("method", "GET")]),
            d(&[("route", "/v1"), ("method", "GET"), ("extra", "1")]),
            d(&[("route", "/v2")]),
            d(&[("nested", "x")]),
            d(&[("client", "internal")]),
        ],
    );
    let e = explained(&rules, &req);

    assert_eq!(rule_name(&e[0].reason), Some("v1"));
    assert_eq!(e[0].steps.len(), 1);
    assert!(e[0].steps[0]
        .matched
        .is_some_and(|c| !c.node.children.is_empty()));

    // The shorter descriptor's rule is on the path, but does not apply.
    assert_eq!(rule_name(&e[1].reason), Some("v1_method"));
    let first = e[1].steps[0].matched.expect("route matched");
    assert_eq!(
        first.node.rule.as_ref().and_then(|r| r.name.as_deref()),
        Some("v1")
    );
    assert_eq!(e[1].steps[1].matched.map(|c| c.how), Some(Matched::KeyOnly));

    assert_eq!(e[2].reason, Reason::NoMatch { depth: 2 });
    assert_eq!(e[2].steps.len(), 3);
    assert!(e[2].steps[2].matched.is_none());

    assert_eq!(e[3].reason, Reason::NoMatch { depth: 0 });
    assert_eq!(e[4].reason, Reason::NoLimit { nested: true });
    // A value listed without a limit lets it through; the key-only entry,
    // which would limit it, is passed over.
    assert_eq!(e[5].reason, Reason::NoLimit { nested: false });
    assert_eq!(e[5].steps[0].matched.map(|c| c.how), Some(Matched::Exact));
    assert_eq!(hows(&e[5].steps[0].passed_over), [Matched::KeyOnly]);

    let summaries: Vec<String> = e
        .iter()
        .zip(&req.descriptors)
        .map(|(e, d)| e.summary(&d.entries))
        .collect();
    assert_eq!(summaries[0], "rule api.route_/v1 applies: 10 per minute");
    assert_eq!(
        summaries[2],
        "no rule matches extra=1, entry 3 of 3: no limit"
    );
    assert_eq!(
        summaries[4],
        "the descriptor ends at an entry without a rate limit: no limit (its limits are on longer descriptors)"
    );
}

#[test]
fn unlimited_replaced_own_limit_and_unknown_domain() {
    let rules = rules(RULES);
    let mut own = d(&[("client", "z")]);
    own.limit_override = Some(LimitOverride {
        requests_per_unit: 1,
        unit: Unit::Second,
    });
    let req = request(
        "api",
        vec![
            d(&[("internal", "x")]),
            d(&[("general", "g")]),
            d(&[("specific", "s")]),
            own,
        ],
    );
    let e = explained(&rules, &req);
    assert!(matches!(e[0].reason, Reason::Unlimited(r) if &*r.path == "api.internal"));
    match &e[1].reason {
        Reason::Replaced { rule, by } => {
            assert_eq!(rule.name.as_deref(), Some("general"));
            let by: Vec<_> = by.iter().map(|r| &*r.path).collect();
            assert_eq!(by, ["api.specific"]);
        }
        other => panic!("expected Replaced, got {other:?}"),
    }
    assert_eq!(
        e[1].summary(&req.descriptors[1].entries),
        "rule api.general matches but is replaced by api.specific: nothing is counted for it"
    );
    assert_eq!(rule_name(&e[2].reason), Some("specific"));
    // A descriptor with its own limit is not looked up, as `plan` does not.
    assert_eq!(e[3].reason, Reason::Override);
    assert!(e[3].steps.is_empty());

    let req = request("elsewhere", vec![d(&[("client", "a")])]);
    let e = explained(&rules, &req);
    assert_eq!(e[0].reason, Reason::UnknownDomain);
    assert!(e[0].steps.is_empty());
}

// === Counters and the answer ===

fn store() -> MemoryStore {
    MemoryStore::new(10_000, Arc::new(ManualClock::new(NOW)))
}

/// Explains `request` against `store`: reads, then concludes.
fn explain_with<'r>(
    store: &MemoryStore,
    rules: &'r RuleSet,
    request: &Request<'_>,
    options: PlanOptions,
    now: u64,
) -> Report<'r> {
    let explanation = explain(request, rules, &[], &hasher(), options);
    assert!(explanation.reads().iter().all(|op| op.hits == 0));
    let vetoes = vec![false; explanation.reads().len()];
    let reads = store
        .apply_request_at(explanation.reads(), &vetoes, now)
        .expect("reads");
    explanation.conclude(&reads, options)
}

/// What the call itself answers, counting.
fn call<'r>(
    store: &MemoryStore,
    rules: &'r RuleSet,
    request: &Request<'_>,
    options: PlanOptions,
    now: u64,
) -> Decision<'r> {
    let plan = plan_for(request, rules, &[], &hasher(), options);
    let outcomes = store
        .apply_request_at(&plan.ops, &plan.vetoes, now)
        .expect("apply");
    decide(&plan, &outcomes, options)
}

/// The call's answer as explaining predicts it: all of it but a denied
/// counter's reset, which explaining gives as the read reports it (the
/// window's end; GCRA: when the bucket is full), where the store says when
/// the hits would fit.
fn predicted<'r>(decision: &Decision<'r>) -> Decision<'r> {
    let mut decision = decision.clone();
    for s in &mut decision.statuses {
        if s.code == Code::OverLimit || s.shadowed {
            s.reset_us = None;
            s.quota = None;
        }
    }
    decision
}

#[test]
fn counters_are_read_not_counted_and_the_answer_is_the_calls() {
    let rules = rules(RULES);
    let store = store();
    let options = PlanOptions::default();
    let req = request("api", vec![d(&[("client", "zzz")])]);
    for used in 0..5u64 {
        let before = explain_with(&store, &rules, &req, options, NOW);
        let again = explain_with(&store, &rules, &req, options, NOW);
        assert_eq!(before.decision, again.decision, "explaining counted");

        let [counter] = &before.descriptors[0].counters[..] else {
            panic!("one counter");
        };
        assert_eq!(
            counter.rule.and_then(|r| r.name.as_deref()),
            Some("per_client")
        );
        assert!(!counter.tenant_quota);
        assert_eq!(counter.spec.limit, 3);
        assert_eq!(counter.now.used, used.min(3));
        assert_eq!(counter.now.remaining, 3 - used.min(3));
        assert_eq!(counter.now.reset_us, 50 * SEC);
        assert_eq!(counter.admits, used < 3);

        let decision = call(&store, &rules, &req, options, NOW);
        assert_eq!(
            predicted(&before.decision),
            predicted(&decision),
            "after {used} hits"
        );
    }
}

#[test]
fn shadow_modes_and_a_denied_request_consuming_nothing_are_predicted() {
    let rules = rules(RULES);
    let store = store();
    let global = PlanOptions {
        global_shadow: true,
        ..PlanOptions::default()
    };
    let req = request(
        "api",
        vec![
            d(&[("shadowed", "s")]),
            d(&[("general", "g")]),
            d(&[("client", "q")]),
        ],
    );
    for options in [PlanOptions::default(), global] {
        for _ in 0..3 {
            let report = explain_with(&store, &rules, &req, options, NOW);
            let decision = call(&store, &rules, &req, options, NOW);
            assert_eq!(
                predicted(&report.decision),
                predicted(&decision),
                "{options:?}"
            );
        }
    }
    let report = explain_with(&store, &rules, &req, PlanOptions::default(), NOW);
    assert!(report.decision.statuses[0].shadowed);
    assert_eq!(report.decision.statuses[0].code, Code::Ok);
    assert_eq!(report.decision.statuses[1].code, Code::OverLimit);
}

const ALGORITHMS: &str = "
domain: p
descriptors:
  - key: s
    rate_limit: {unit: minute, requests_per_unit: 5, algorithm: sliding_window}
  - key: f
    rate_limit: {unit: minute, requests_per_unit: 4, algorithm: fixed_window}
  - key: g
    rate_limit: {unit: minute, requests_per_unit: 6, algorithm: gcra, burst: 3}
  - key: h
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: fixed_window}
  - key: q
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: m
    rate_limits:
      - {unit: second, unit_multiplier: 10, requests_per_unit: 3, algorithm: gcra}
      - {unit: minute, requests_per_unit: 5, algorithm: fixed_window}
      - {unit: minute, unit_multiplier: 5, requests_per_unit: 8, algorithm: gcra, burst: 4}
";

/// A request: descriptors of (key, value, hits), then seconds to wait.
type Round = (Vec<(usize, usize, u64)>, u64);

fn rounds() -> impl Strategy<Value = Vec<Round>> {
    let descriptor = (0usize..6, 0usize..2, 0u64..4);
    prop::collection::vec((prop::collection::vec(descriptor, 1..5), 0u64..25), 1..25)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the counters hold, explaining predicts the call's answer
    /// (but a denied counter's reset, see `predicted`). And it consumes
    /// nothing: a store that is also explained to answers every call as one
    /// that is not.
    #[test]
    fn explaining_predicts_the_answer_and_consumes_nothing(rounds in rounds()) {
        let rules = rules(ALGORITHMS);
        let (explained, plain) = (store(), store());
        let options = PlanOptions::default();
        let mut now = NOW;
        for (descriptors, wait) in rounds {
            let values: Vec<(String, String)> = descriptors
                .iter()
                .map(|&(k, v, _)| (["s", "f", "g", "h", "q", "m"][k].to_owned(), format!("v{v}")))
                .collect();
            let req = Request {
                domain: "p",
                descriptors: descriptors
                    .iter()
                    .zip(&values)
                    .map(|(&(_, _, hits), (k, v))| {
                        Descriptor::new([(k.as_str(), v.as_str())], None, Some(hits))
                    })
                    .collect(),
                hits: 1,
            };
            let report = explain_with(&explained, &rules, &req, options, now);
            let decision = call(&explained, &rules, &req, options, now);
            prop_assert_eq!(&decision, &call(&plain, &rules, &req, options, now));
            prop_assert_eq!(predicted(&report.decision), predicted(&decision));
            now += wait * SEC;
        }
    }
}

// === API keys ===

#[test]
fn a_keys_plan_rules_its_tenants_quota_and_a_refused_key() {
    use crate::rules::catalog::{rows_from_yaml, Catalog, KeyRow, PlanRow, RuleScope, TenantRow};

    let yaml = |text: &str| parse_str("t.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let default = yaml("domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 2, name: anon}\n");
    let pro = yaml("domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 100, name: pro}\n");
    let mut rows = rows_from_yaml(&default, &RuleScope::Domain);
    rows.extend(rows_from_yaml(&pro, &RuleScope::Plan("pro".into())));
    let plan = |name: &str, monthly_quota| PlanRow {
        name: name.into(),
        monthly_quota,
        overage_cents_per_1000: None,
    };
    let tenant = |id: &str, name: &str, plan: &str| TenantRow {
        id: id.into(),
        name: name.into(),
        plan: plan.into(),
        time_zone: "UTC".into(),
    };
    let key = |hash: &str, tenant_id: &str| KeyRow {
        hash: hash.into(),
        tenant_id: tenant_id.into(),
        plan: None,
    };
    let rules = Catalog {
        plans: vec![plan("free", Some(3)), plan("pro", None)],
        tenants: vec![
            tenant("t-free", "small", "free"),
            tenant("t-pro", "big", "pro"),
        ],
        keys: vec![key("free-key", "t-free"), key("pro-key", "t-pro")],
        rules: rows,
    }
    .compile()
    .unwrap_or_else(|e| panic!("{e}"));

    let req = request(
        "api",
        vec![
            d(&[("api_key", "free-key")]),
            d(&[("api_key", "pro-key")]),
            d(&[("api_key", "unknown")]),
        ],
    );
    let callers = [
        Caller::Key(rules.api_key("free-key").expect("free key")),
        Caller::Key(rules.api_key("pro-key").expect("pro key")),
        Caller::Refused,
    ];
    let explanation = explain(&req, &rules, &callers, &hasher(), PlanOptions::default());
    let store = store();
    let vetoes = vec![false; explanation.reads().len()];
    let reads = store
        .apply_request_at(explanation.reads(), &vetoes, NOW)
        .expect("reads");
    let report = explanation.conclude(&reads, PlanOptions::default());
    let [free, pro, refused] = &report.descriptors[..] else {
        panic!("three descriptors");
    };

    // The free plan has no rules of its own: the domain's.
    assert_eq!(free.explanation.scope, None);
    assert_eq!(rule_name(&free.explanation.reason), Some("anon"));
    let quotas: Vec<(bool, u64)> = free
        .counters
        .iter()
        .map(|c| (c.tenant_quota, c.spec.limit))
        .collect();
    assert_eq!(quotas, [(false, 2), (true, 3)]);

    assert_eq!(pro.explanation.scope, Some(Scope::Plan("pro")));
    assert_eq!(rule_name(&pro.explanation.reason), Some("pro"));
    assert_eq!(pro.counters.len(), 1, "the pro plan has no quota");

    assert_eq!(refused.explanation.reason, Reason::RefusedKey);
    assert!(refused.explanation.steps.is_empty());
    assert!(refused.counters.is_empty());
    // A refused key denies the request.
    assert_eq!(report.decision.overall, Code::OverLimit);
}
