//! envoyproxy/ratelimit's config fixtures and validation errors, one test
//! per row of docs/compatibility.md. The YAML files under
//! `tests/fixtures/compat/` are sluice's own minimal equivalents of
//! upstream's fixtures, not copies; rows without a fixture upstream are
//! written inline.

use std::path::PathBuf;

use sluice::limiter::{Entry, MetaValue, RuleLimit, RuleSet};
use sluice::rules::yaml;

fn fixture(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/compat", name]
        .iter()
        .collect();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parses and compiles named documents together, as files of one directory.
fn compile(docs: &[(&str, String)]) -> Result<RuleSet, Vec<String>> {
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in docs {
        match yaml::parse_str(name, text) {
            Ok(root) => parsed.push(((*name).to_owned(), root)),
            Err(e) => errors.extend(e.0.iter().map(ToString::to_string)),
        }
    }
    match yaml::compile_all(&parsed) {
        Ok(rules) if errors.is_empty() => Ok(rules),
        Ok(_) => Err(errors),
        Err(e) => {
            errors.extend(e.0.iter().map(ToString::to_string));
            Err(errors)
        }
    }
}

fn accept_files(names: &[&str]) -> RuleSet {
    let docs: Vec<_> = names.iter().map(|n| (*n, fixture(n))).collect();
    compile(&docs).unwrap_or_else(|e| panic!("{names:?} refused: {e:?}"))
}

fn refuse_files(names: &[&str]) -> String {
    let docs: Vec<_> = names.iter().map(|n| (*n, fixture(n))).collect();
    match compile(&docs) {
        Ok(_) => panic!("{names:?} accepted"),
        Err(e) => e.join("\n"),
    }
}

fn accept(text: &str) -> RuleSet {
    compile(&[("inline.yaml", text.to_owned())]).unwrap_or_else(|e| panic!("refused: {e:?}"))
}

fn refuse(text: &str) -> String {
    match compile(&[("inline.yaml", text.to_owned())]) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.join("\n"),
    }
}

fn entries<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Entry<'a>> {
    pairs
        .iter()
        .map(|&(key, value)| Entry { key, value })
        .collect()
}

/// `requests_per_unit` of the rule that matches, `Some(0)` for `unlimited`.
fn limit(rules: &RuleSet, pairs: &[(&str, &str)]) -> Option<u32> {
    let m = rules.lookup("shop", &entries(pairs))?;
    Some(match &m.rule.limit {
        // These fixtures give one `rate_limit` per descriptor.
        RuleLimit::Limited(limits) => limits.first()?.requests_per_unit,
        RuleLimit::Unlimited => 0,
    })
}

/// The shared pattern of each entry, in order, for the matched rule.
fn shared(rules: &RuleSet, pairs: &[(&str, &str)]) -> Vec<Option<String>> {
    let m = rules
        .lookup("shop", &entries(pairs))
        .unwrap_or_else(|| panic!("no rule for {pairs:?}"));
    m.shared[..pairs.len()]
        .iter()
        .map(|s| s.map(str::to_owned))
        .collect()
}

fn assert_contains(errors: &str, needle: &str) {
    assert!(errors.contains(needle), "{needle:?} not in:\n{errors}");
}

// === Fixtures upstream accepts ===

#[test]
fn accepts_nested_defaults() {
    let rules = accept_files(&["nested_defaults.yaml"]);
    assert_eq!(limit(&rules, &[("tenant", "acme"), ("user", "x")]), Some(4));
    assert_eq!(
        limit(&rules, &[("tenant", "acme"), ("user", "admin")]),
        Some(8)
    );
    assert_eq!(
        limit(&rules, &[("tenant", "acme")]),
        None,
        "no limit at depth 1"
    );
    assert_eq!(limit(&rules, &[("route", "/list")]), Some(30));
    assert_eq!(limit(&rules, &[("route", "/cart")]), Some(60));
    assert_eq!(limit(&rules, &[("route", "/health")]), None, "whitelisted");
    assert_eq!(limit(&rules, &[("region", "x")]), Some(2));
    let partner = rules.lookup("shop", &entries(&[("partner", "p")]));
    assert_eq!(
        partner.and_then(|m| m.rule.name.as_deref().map(str::to_owned)),
        Some("partner_daily".to_owned())
    );
    assert_eq!(limit(&rules, &[("sku", "gift-card")]), Some(9));
    assert_eq!(
        limit(&rules, &[("sku", "gift-card"), ("buyer", "reseller")]),
        Some(90)
    );
    assert_eq!(
        limit(
            &rules,
            &[("sku", "gift-card"), ("buyer", "reseller"), ("x", "y")]
        ),
        None,
        "a descriptor deeper than the rules"
    );
    assert_eq!(limit(&rules, &[("internal", "x")]), Some(0), "unlimited");
    assert_eq!(limit(&rules, &[("report", "x")]), Some(7));
}

#[test]
fn accepts_metadata() {
    let rules = accept_files(&["metadata.yaml"]);
    let user = rules
        .lookup("shop", &entries(&[("tenant", "acme"), ("user", "u")]))
        .expect("user rule");
    assert_eq!(
        user.rule.metadata.0["owner"],
        MetaValue::String("storefront".into())
    );
    let route = rules
        .lookup("shop", &entries(&[("route", "/x")]))
        .expect("route rule");
    let MetaValue::Map(billing) = &route.rule.metadata.0["billing"] else {
        panic!("billing is a map: {:?}", route.rule.metadata);
    };
    assert_eq!(billing.0["plan"], MetaValue::String("metered".into()));
    assert_eq!(billing.0["seats"], MetaValue::Number(3.0));
}

#[test]
fn accepts_shadow_mode() {
    let rules = accept_files(&["shadow_mode.yaml"]);
    let shadow = |pairs: &[(&str, &str)]| {
        rules
            .lookup("shop", &entries(pairs))
            .map(|m| m.rule.shadow_mode)
    };
    assert_eq!(shadow(&[("tenant", "acme"), ("user", "x")]), Some(false));
    assert_eq!(shadow(&[("tenant", "acme"), ("user", "admin")]), Some(true));
    assert_eq!(shadow(&[("route", "/list")]), Some(true));
    assert_eq!(shadow(&[("route", "/cart")]), Some(false));
}

#[test]
fn accepts_wildcards() {
    let rules = accept_files(&["wildcard.yaml"]);
    assert_eq!(limit(&rules, &[("img", "thumb")]), Some(20));
    assert_eq!(limit(&rules, &[("img", "thumbnail-7")]), Some(20));
    assert_eq!(limit(&rules, &[("img", "thum")]), None);
    assert_eq!(limit(&rules, &[("plain", "thumb")]), Some(21));
    assert_eq!(limit(&rules, &[("plain", "thumbs")]), None, "exact only");
    assert_eq!(limit(&rules, &[("any", "whatever")]), Some(22));
    assert_eq!(limit(&rules, &[("mid", "vx")]), Some(23));
    assert_eq!(limit(&rules, &[("mid", "v-1-x")]), Some(23));
    assert_eq!(
        limit(&rules, &[("mid", "v-1-xy")]),
        None,
        "anchored at the end"
    );
    assert_eq!(limit(&rules, &[("multi", "abc")]), Some(24));
    assert_eq!(limit(&rules, &[("multi", "a-b-c")]), Some(24));
    assert_eq!(limit(&rules, &[("multi", "a-c-b")]), None, "parts in order");
    assert_eq!(
        limit(&rules, &[("store", "eu"), ("img", "full-hd")]),
        Some(25)
    );
    assert_eq!(limit(&rules, &[("store", "eu"), ("img", "thumb")]), None);
    // Not shared: each value is its own counter.
    assert_eq!(shared(&rules, &[("mid", "v-1-x")]), [None]);
}

#[test]
fn accepts_share_threshold() {
    let rules = accept_files(&["share_threshold.yaml"]);
    let s = |p: &str| Some(p.to_owned());
    assert_eq!(shared(&rules, &[("asset", "css/a.css")]), [s("css/*")]);
    assert_eq!(
        shared(&rules, &[("zone", "eu"), ("asset", "js/app.js")]),
        [None, s("js/*")]
    );
    assert_eq!(
        shared(&rules, &[("asset", "top/x"), ("asset", "sub/y")]),
        [s("top/*"), s("sub/*")]
    );
    assert_eq!(
        shared(&rules, &[("api", "v1/users"), ("verb", "GET")]),
        [s("v1/*"), None]
    );
    assert_eq!(
        shared(&rules, &[("svc", "pay/refund"), ("op", "create")]),
        [s("pay/*"), None]
    );
    assert_eq!(
        shared(&rules, &[("dir", "a/1"), ("file", "f/2"), ("kind", "png")]),
        [s("a/*"), None, None],
        "share_threshold: false keeps per-value counters at its depth"
    );
    assert_eq!(
        limit(&rules, &[("report", "daily")]),
        Some(16),
        "exact wins"
    );
    assert_eq!(shared(&rules, &[("report", "daily")]), [None]);
    assert_eq!(shared(&rules, &[("report", "dairy")]), [s("dai*")]);
    assert_eq!(shared(&rules, &[("mid", "/v2/list")]), [s("/v*/list")]);
    assert_eq!(shared(&rules, &[("multi", "region")]), [s("r*g*n")]);
}

// === Fixtures upstream refuses ===

#[test]
fn refuses_one_domain_in_two_files() {
    let errors = refuse_files(&["split_domain_a.yaml", "split_domain_b.yaml"]);
    assert_contains(
        &errors,
        "split_domain_b.yaml: duplicate domain 'shop' in config file",
    );
    let errors = refuse_files(&["split_domain_a.yaml", "split_domain_a.yaml"]);
    assert_contains(&errors, "duplicate domain 'shop'");
}

#[test]
fn refuses_a_bad_unit() {
    assert_contains(
        &refuse_files(&["bad_unit.yaml"]),
        "bad_unit.yaml: descriptors[0]: invalid rate limit unit 'fortnight'",
    );
}

#[test]
fn refuses_bad_yaml() {
    assert_contains(&refuse_files(&["bad_yaml.yaml"]), "bad_yaml.yaml: ");
}

#[test]
fn refuses_a_duplicate_entry() {
    assert_contains(
        &refuse_files(&["duplicate_entry.yaml"]),
        "duplicate descriptor composite key 'shop.route_/cart'",
    );
}

#[test]
fn refuses_a_missing_domain() {
    assert_contains(
        &refuse_files(&["no_domain.yaml"]),
        "no_domain.yaml: config file cannot have empty domain",
    );
}

#[test]
fn refuses_an_entry_without_a_key() {
    assert_contains(
        &refuse_files(&["no_key.yaml"]),
        "no_key.yaml: descriptors[0]: descriptor has empty key",
    );
}

#[test]
fn refuses_a_misspelled_rate_limit() {
    assert_contains(
        &refuse_files(&["misspelled_rate_limit.yaml"]),
        "descriptors[0]: unknown field `ratelimit`",
    );
}

#[test]
fn refuses_a_misspelled_requests_per_unit() {
    assert_contains(
        &refuse_files(&["misspelled_requests_per_unit.yaml"]),
        "descriptors[0].rate_limit: unknown field `requestsperunit`",
    );
}

#[test]
fn refuses_descriptors_that_are_not_maps() {
    assert_contains(
        &refuse_files(&["descriptors_not_maps.yaml"]),
        "descriptors[0]: invalid type: string \"route\"",
    );
}

#[test]
fn refuses_a_number_as_a_key() {
    assert_contains(
        &refuse_files(&["number_key.yaml"]),
        "number_key.yaml: unknown field `1.5`",
    );
}

#[test]
fn refuses_a_blank_replaces() {
    assert_contains(
        &refuse_files(&["replaces_blank.yaml"]),
        "descriptors[0]: should not have an empty replaces entry",
    );
}

#[test]
fn refuses_replacing_itself() {
    assert_contains(
        &refuse_files(&["replaces_itself.yaml"]),
        "descriptors[0]: replaces should not contain name of same descriptor",
    );
}

#[test]
fn refuses_unlimited_with_a_unit() {
    assert_contains(
        &refuse_files(&["unlimited_and_unit.yaml"]),
        "descriptors[0]: should not specify rate limit unit when unlimited",
    );
}

// === Upstream's other checks, without a fixture there ===

#[test]
fn refuses_share_threshold_without_a_wildcard() {
    assert_contains(
        &refuse(
            "domain: shop\ndescriptors:\n  - key: k\n    value: v\n    share_threshold: true\n",
        ),
        "share_threshold needs a wildcard value",
    );
}

#[test]
fn refuses_plain_floats_outside_metadata() {
    let errors = refuse("domain: shop\ndescriptors:\n  - key: version\n    value: 1.50\n");
    assert_contains(&errors, "descriptors[0].value: the number 1.5");
    let errors =
        refuse("domain: shop\ndescriptors:\n  - key: k\n    value: 18446744073709551615\n");
    assert_contains(&errors, "the number 18446744073709551615");
    let rules = accept(
        "domain: shop\ndescriptors:\n  - key: version\n    value: '1.50'\n    \
         rate_limit: {unit: second, requests_per_unit: 1}\n    metadata: {ratio: 0.25}\n",
    );
    assert_eq!(limit(&rules, &[("version", "1.50")]), Some(1));
}

#[test]
fn refuses_entries_equal_as_key_underscore_value() {
    assert_contains(
        &refuse(
            "domain: shop\ndescriptors:\n  - key: a\n    value: b_c\n  - key: a_b\n    value: c\n",
        ),
        "descriptors[1]: duplicate descriptor composite key 'shop.a_b_c'",
    );
}

#[test]
fn accepts_yaml_1_1_booleans() {
    let rules = accept(
        "domain: shop\ndescriptors:\n  - key: k\n    shadow_mode: yes\n    quota_mode: On\n    \
         rate_limit: {unit: second, requests_per_unit: 1}\n",
    );
    let m = rules.lookup("shop", &entries(&[("k", "v")])).expect("k");
    assert!(m.rule.shadow_mode && m.rule.quota_mode);
}

#[test]
fn accepts_units_in_any_case_but_not_unknown() {
    let rules = accept(
        "domain: shop\ndescriptors:\n  - key: a\n    rate_limit: {unit: Minute, requests_per_unit: 1}\n  \
         - key: b\n    rate_limit: {unit: HOUR, requests_per_unit: 2}\n",
    );
    assert_eq!(limit(&rules, &[("b", "x")]), Some(2));
    assert_contains(
        &refuse("domain: shop\ndescriptors:\n  - key: a\n    rate_limit: {unit: unknown, requests_per_unit: 1}\n"),
        "invalid rate limit unit 'unknown'",
    );
}

#[test]
fn accepts_unlimited_with_a_count_but_no_unit() {
    let rules = accept(
        "domain: shop\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, requests_per_unit: 5}\n",
    );
    assert_eq!(limit(&rules, &[("k", "v")]), Some(0));
}

#[test]
fn accepts_a_domain_without_descriptors() {
    assert!(accept("domain: shop\n").has_domain("shop"));
    assert!(accept("domain: shop\ndescriptors:\n").has_domain("shop"));
}

#[test]
fn refuses_an_empty_file() {
    assert_contains(&refuse("\n"), "config file cannot have empty domain");
}

// === Where sluice is stricter, on purpose ===

#[test]
fn stricter_refuses_a_known_field_in_the_wrong_place() {
    assert_contains(
        &refuse("domain: shop\ndescriptors:\n  - key: k\n    unit: second\n"),
        "descriptors[0]: unknown field `unit`",
    );
}

#[test]
fn stricter_refuses_a_missing_or_zero_requests_per_unit() {
    assert_contains(
        &refuse("domain: shop\ndescriptors:\n  - key: k\n    rate_limit: {unit: second}\n"),
        "requests_per_unit is required",
    );
    assert_contains(
        &refuse("domain: shop\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 0}\n"),
        "requests_per_unit must be at least 1",
    );
}

#[test]
fn stricter_refuses_a_repeated_mapping_key() {
    assert_contains(
        &refuse("domain: shop\ndescriptors:\n  - key: k\n    key: j\n"),
        "duplicate field `key`",
    );
}

#[test]
fn stricter_refuses_share_threshold_with_a_star_only_in_the_key() {
    assert_contains(
        &refuse("domain: shop\ndescriptors:\n  - key: 'k*'\n    share_threshold: true\n"),
        "share_threshold needs a wildcard value",
    );
}

// === Where sluice matches differently, on purpose ===

#[test]
fn keys_match_apart_from_values() {
    // Upstream joins key and value with `_` before matching, so its
    // `a` + `b_*` also matches the request entry `a_b` = `x`.
    let rules = accept(
        "domain: shop\ndescriptors:\n  - key: a\n    value: b_*\n    \
         rate_limit: {unit: second, requests_per_unit: 1}\n",
    );
    assert_eq!(limit(&rules, &[("a", "b_x")]), Some(1));
    assert_eq!(limit(&rules, &[("a_b", "x")]), None);
}
