use super::*;
use crate::limiter::Entry;

fn parse(text: &str) -> YamlRoot {
    yaml::parse_str("test.yaml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn example(name: &str) -> YamlRoot {
    let path = format!("{}/examples/rules/{name}", env!("CARGO_MANIFEST_DIR"));
    parse(&std::fs::read_to_string(path).unwrap())
}

fn back(root: &YamlRoot, scope: &RuleScope) -> YamlRoot {
    let rows = rows_from_yaml(root, scope);
    let refs: Vec<_> = rows.iter().collect();
    yaml_from_rows(root.domain.as_deref().unwrap(), "t", &refs).unwrap()
}

#[test]
fn example_files_survive_rows_and_back() {
    for name in ["business.yaml", "weather.yaml"] {
        let root = example(name);
        assert_eq!(back(&root, &RuleScope::Domain), root, "{name}");
    }
}

#[test]
fn every_field_survives_rows_and_back() {
    let root = parse(
        r#"
domain: d
descriptors:
  - key: a
    value: "x*"
    share_threshold: true
    shadow_mode: true
    detailed_metric: true
    value_to_metric: true
    metadata: {team: payments, tier: 2}
    rate_limit: {unit: second, requests_per_unit: 5, algorithm: gcra, burst: 9, name: n1, replaces: [{name: n2}]}
    descriptors:
      - key: b
        quota_mode: true
        rate_limit: {unit: day, requests_per_unit: 100}
      - key: b
        value: free
  - key: c
    rate_limit: {unlimited: true, name: n2}
"#,
    );
    assert_eq!(back(&root, &RuleScope::Plan("free".into())), root);
    let rows = rows_from_yaml(&root, &RuleScope::Domain);
    let positions: Vec<_> = rows.iter().map(|r| r.position).collect();
    assert_eq!(positions, [0, 1, 2, 3]);
    assert_eq!(
        rows[2].path,
        [("a".into(), "x*".into()), ("b".into(), "free".into())]
    );
}

#[test]
fn units_are_stored_in_lower_case() {
    let root = parse("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: MINUTE, requests_per_unit: 1}\n");
    assert_eq!(
        rows_from_yaml(&root, &RuleScope::Domain)[0].unit.as_deref(),
        Some("minute")
    );
}

#[test]
fn a_row_without_its_parent_is_refused() {
    let root = parse("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: second, requests_per_unit: 1}\n");
    let rows = rows_from_yaml(&root, &RuleScope::Domain);
    let err = yaml_from_rows("d", "postgres:d", &[&rows[1]]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "postgres:d: position 1 (a, b): rule row has no parent row (every prefix of a path needs its own row)"
    );
}

fn catalog() -> Catalog {
    let default = parse("domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 10}\n");
    let pro = parse("domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 1000}\n");
    let only_scoped = parse("domain: beta\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: second, requests_per_unit: 1}\n");
    let mut rules = rows_from_yaml(&default, &RuleScope::Domain);
    rules.extend(rows_from_yaml(&pro, &RuleScope::Plan("pro".into())));
    rules.extend(rows_from_yaml(
        &only_scoped,
        &RuleScope::Tenant("acme".into()),
    ));
    Catalog {
        plans: vec![
            PlanRow {
                name: "free".into(),
                monthly_quota: Some(100),
                overage_cents_per_1000: None,
            },
            PlanRow {
                name: "pro".into(),
                monthly_quota: None,
                overage_cents_per_1000: None,
            },
        ],
        tenants: vec![TenantRow {
            id: "t1".into(),
            name: "acme".into(),
            plan: "free".into(),
            time_zone: "UTC".into(),
        }],
        keys: vec![
            KeyRow {
                hash: "h1".into(),
                tenant_id: "t1".into(),
                plan: None,
            },
            KeyRow {
                hash: "h2".into(),
                tenant_id: "t1".into(),
                plan: Some("pro".into()),
            },
        ],
        rules,
    }
}

#[test]
fn a_catalog_compiles_scopes_and_keys() {
    let set = catalog().compile().unwrap();
    let e = [Entry {
        key: "api_key",
        value: "raw",
    }];
    let limit = |hash: &str, domain: &str| {
        let key = set.api_key(hash).unwrap();
        set.lookup_for_key(domain, key, &e)
            .map(|m| (m.rule.path.to_string(), m.rule.limit.clone()))
    };
    let h1 = set.api_key("h1").unwrap();
    assert_eq!(
        (&*h1.tenant, &*h1.plan, h1.monthly_quota),
        ("acme", "free", Some(100))
    );
    // The key's own plan sets its limits; the quota stays the tenant's plan's.
    let h2 = set.api_key("h2").unwrap();
    assert_eq!((&*h2.plan, h2.monthly_quota), ("pro", Some(100)));
    assert_eq!(limit("h1", "api").unwrap().0, "api.api_key");
    assert_eq!(limit("h2", "api").unwrap().0, "api[plan=pro].api_key");
    // A domain with only a tenant's rules is known, with no rules of its own.
    assert!(set.has_domain("beta"));
    assert!(set.lookup("beta", &e).is_none());
    assert_eq!(limit("h1", "beta").unwrap().0, "beta[tenant=acme].api_key");
}

#[test]
fn invalid_rows_and_dangling_keys_refuse_the_whole_catalog() {
    let mut c = catalog();
    c.rules[0].requests_per_unit = Some(0);
    c.keys.push(KeyRow {
        hash: "h3".into(),
        tenant_id: "nobody".into(),
        plan: None,
    });
    let err = c.compile().unwrap_err().to_string();
    assert!(
        err.contains("postgres:api: descriptors[0]: requests_per_unit must be at least 1"),
        "{err}"
    );
    assert!(
        err.contains("postgres:api_keys: key h3…: its tenant is missing"),
        "{err}"
    );
}

#[test]
fn fingerprints_follow_content() {
    let a = catalog();
    let mut b = catalog();
    assert_eq!(a.fingerprint(), b.fingerprint());
    b.keys.pop();
    assert_ne!(a.fingerprint(), b.fingerprint());
}

#[test]
fn window_extensions_are_refused_for_rule_rows_with_their_path() {
    let root = yaml::parse_str(
        "ext.yaml",
        "domain: d\ndescriptors:\n  - key: a\n    rate_limits:\n      - {unit: second, requests_per_unit: 1}\n  - key: b\n    rate_limit: {unit: hour, requests_per_unit: 1}\n    descriptors:\n      - key: c\n        rate_limit: {calendar: month, time_zone: Europe/Berlin, requests_per_unit: 1}\n      - key: e\n        rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 1}\n",
    )
    .unwrap();
    let errors: Vec<String> = check_storable("ext.yaml", &root)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    let tail = "cannot be stored in PostgreSQL rules yet; serve this rule from a YAML file";
    assert_eq!(
        errors,
        [
            format!("ext.yaml: descriptors[0]: rate_limits {tail}"),
            format!("ext.yaml: descriptors[1].descriptors[0]: calendar, time_zone {tail}"),
            format!("ext.yaml: descriptors[1].descriptors[1]: unit_multiplier {tail}"),
        ]
    );
    let plain = yaml::parse_str(
        "p.yaml",
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: hour, requests_per_unit: 1}\n",
    )
    .unwrap();
    assert!(check_storable("p.yaml", &plain).is_ok());
}
