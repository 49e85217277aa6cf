//! Requests made with API keys: a key's plan's rules, its tenant's monthly
//! quota counted once per request, and refused keys. Counters live in a map
//! driven by `limiter::check`, as the in-process store does (without the
//! store's veto, which only changes what a denied request consumes).

use std::collections::HashMap;

use super::*;
use crate::limiter::{check, CounterState, Descriptor};
use crate::rules::catalog::{rows_from_yaml, Catalog, KeyRow, PlanRow, RuleScope, TenantRow};
use crate::rules::yaml::parse_str;

const NOW: u64 = 1_700_000_000_000_000;

fn rules() -> RuleSet {
    let yaml = |text: &str| parse_str("t.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let default = yaml("domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 2, name: anon}\n");
    let pro = yaml("domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 100, name: pro}\n  - key: route\n");
    let mut rows = rows_from_yaml(&default, &RuleScope::Domain);
    rows.extend(rows_from_yaml(&pro, &RuleScope::Plan("pro".into())));
    Catalog {
        plans: vec![
            PlanRow {
                name: "free".into(),
                monthly_quota: Some(3),
                overage_cents_per_1000: None,
            },
            PlanRow {
                name: "pro".into(),
                monthly_quota: None,
                overage_cents_per_1000: None,
            },
        ],
        tenants: vec![
            TenantRow {
                id: "t-free".into(),
                name: "small".into(),
                plan: "free".into(),
                time_zone: "UTC".into(),
            },
            TenantRow {
                id: "t-pro".into(),
                name: "big".into(),
                plan: "pro".into(),
                time_zone: "UTC".into(),
            },
        ],
        keys: vec![
            KeyRow {
                hash: "free-key".into(),
                tenant_id: "t-free".into(),
                plan: None,
            },
            KeyRow {
                hash: "free-key-2".into(),
                tenant_id: "t-free".into(),
                plan: None,
            },
            KeyRow {
                hash: "pro-key".into(),
                tenant_id: "t-pro".into(),
                plan: None,
            },
        ],
        rules: rows,
    }
    .compile()
    .unwrap_or_else(|e| panic!("{e}"))
}

fn d<'a>(pairs: &[(&'a str, &'a str)]) -> Descriptor<'a> {
    Descriptor::new(pairs.iter().copied(), None, None)
}

/// A status, flattened: code, limit, limit name, tenant quota, refused.
type Status = (Code, Option<u32>, Option<String>, bool, bool);

struct Harness {
    rules: RuleSet,
    hasher: KeyHasher,
    counters: HashMap<CounterKey, CounterState>,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            rules: rules(),
            hasher: KeyHasher::from_secret(b"tenant tests"),
            counters: HashMap::new(),
        }
    }

    /// Decides a request whose descriptor `i` was sent with key hash `keys[i]`
    /// (`Some("")`: an unknown key, refused; `None`: no key).
    fn decide(
        &mut self,
        descriptors: Vec<Descriptor<'_>>,
        keys: &[Option<&str>],
    ) -> (Plan<'_>, Vec<Status>, Code) {
        let request = Request {
            domain: "api",
            descriptors,
            hits: 1,
        };
        request.validate().unwrap_or_else(|e| panic!("{e}"));
        let callers: Vec<Caller<'_>> = keys
            .iter()
            .map(|k| match k {
                None => Caller::Anonymous,
                Some("") => Caller::Refused,
                Some(hash) => Caller::Key(self.rules.api_key(hash).expect("known key")),
            })
            .collect();
        let plan = plan_for(
            &request,
            &self.rules,
            &callers,
            &self.hasher,
            PlanOptions::default(),
        );
        let outcomes: Vec<Outcome> = plan
            .ops
            .iter()
            .map(|op| {
                let checked = check(&op.spec, self.counters.get(&op.key).copied(), NOW, op.hits);
                if let Some(state) = checked.state {
                    self.counters.insert(op.key, state);
                }
                checked.outcome
            })
            .collect();
        let decision = decide(&plan, &outcomes, PlanOptions::default());
        let statuses = decision
            .statuses
            .iter()
            .map(|s| {
                (
                    s.code,
                    s.limit.as_ref().map(|l| l.requests_per_unit),
                    s.limit
                        .as_ref()
                        .and_then(|l| l.name.as_deref().map(str::to_owned)),
                    s.tenant_quota,
                    s.refused,
                )
            })
            .collect();
        let overall = decision.overall;
        (plan, statuses, overall)
    }
}

#[test]
fn a_key_gets_its_plans_rules_and_no_key_the_domains() {
    let mut h = Harness::new();
    let (_, s, _) = h.decide(vec![d(&[("api_key", "raw-pro")])], &[Some("pro-key")]);
    assert_eq!(s[0].1, Some(100));
    let (_, s, _) = h.decide(vec![d(&[("api_key", "anyone")])], &[None]);
    assert_eq!(s[0].1, Some(2));
    // The pro plan's tree has `route` without a limit: no limit for pro keys,
    // and no fallback to the domain's tree.
    let (_, s, _) = h.decide(vec![d(&[("route", "/x")])], &[Some("pro-key")]);
    assert_eq!(s[0].1, None);
}

#[test]
fn the_monthly_quota_is_counted_once_per_request_and_per_tenant() {
    let mut h = Harness::new();
    let two = || {
        vec![
            d(&[("api_key", "raw")]),
            d(&[("api_key", "raw"), ("route", "/")]),
        ]
    };
    let (plan, s, overall) = h.decide(two(), &[Some("free-key"), Some("free-key")]);
    assert_eq!(
        plan.quotas.len(),
        1,
        "one quota op for two descriptors of one tenant"
    );
    assert_eq!(plan.quotas[0].descriptor, 0);
    assert_eq!(overall, Code::Ok);
    // The rule (2 a minute) has 1 left, the quota (3) 2: the rule bounds more.
    assert_eq!((s[0].1, s[0].3), (Some(2), false));
    // Another key of the same tenant shares the quota.
    let (_, s, _) = h.decide(vec![d(&[("route", "/")])], &[Some("free-key-2")]);
    assert_eq!(
        (s[0].0, s[0].1, s[0].3),
        (Code::Ok, Some(3), true),
        "no rule: the quota is the limit"
    );
    let (_, s, _) = h.decide(vec![d(&[("route", "/b")])], &[Some("free-key-2")]);
    assert_eq!((s[0].0, s[0].3), (Code::Ok, true));
    let (_, s, overall) = h.decide(vec![d(&[("route", "/c")])], &[Some("free-key")]);
    assert_eq!(overall, Code::OverLimit);
    assert_eq!(
        s[0],
        (
            Code::OverLimit,
            Some(3),
            Some(MONTHLY_QUOTA.to_owned()),
            true,
            false
        )
    );
    // A tenant without a quota counts none.
    let (plan, _, _) = h.decide(vec![d(&[("api_key", "raw")])], &[Some("pro-key")]);
    assert!(plan.quotas.is_empty());
}

#[test]
fn a_refused_key_is_over_limit_and_counts_nothing() {
    let mut h = Harness::new();
    let (plan, s, overall) = h.decide(
        vec![d(&[("api_key", "nope")]), d(&[("api_key", "x")])],
        &[Some(""), None],
    );
    assert_eq!(overall, Code::OverLimit);
    assert!(matches!(plan.items[0], PlanItem::Refused));
    assert_eq!(
        plan.ops.len(),
        1,
        "only the anonymous descriptor is counted"
    );
    assert_eq!((s[0].0, s[0].1, s[0].4), (Code::OverLimit, None, true));
    assert_eq!(s[1].0, Code::Ok);
}

#[test]
fn without_callers_plan_for_is_plan() {
    let h = Harness::new();
    let request = Request {
        domain: "api",
        descriptors: vec![d(&[("api_key", "k")])],
        hits: 1,
    };
    let a = plan(&request, &h.rules, &h.hasher, PlanOptions::default());
    let b = plan_for(&request, &h.rules, &[], &h.hasher, PlanOptions::default());
    assert_eq!(a.ops, b.ops);
    assert!(b.quotas.is_empty());
}
