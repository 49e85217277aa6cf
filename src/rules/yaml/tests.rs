//! The envoyproxy/ratelimit YAML format: what is accepted, what is refused
//! (with the exact message and path), how a loaded tree matches, and loading
//! a directory the way a Kubernetes ConfigMap mounts it.

use std::fs;

use proptest::prelude::*;

use super::*;
use crate::limiter::Entry;
use crate::limiter::{MetaValue, ValueMatch};

/// Parses and compiles one file, or panics with its errors.
fn load(text: &str) -> RuleSet {
    let root = parse_str("test.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    compile_all(&[("test.yaml".to_owned(), root)]).unwrap_or_else(|e| panic!("{e}"))
}

/// Every error of one file (parse or compile), as displayed.
fn errors(file: &str, text: &str) -> Vec<String> {
    let result = parse_str(file, text).and_then(|root| compile_all(&[(file.to_owned(), root)]));
    match result {
        Ok(_) => panic!("{file} should have been refused:\n{text}"),
        Err(RuleErrors(errors)) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// The one error of a file, as displayed.
fn error(text: &str) -> String {
    let mut all = errors("test.yaml", text);
    assert_eq!(all.len(), 1, "expected one error, got {all:#?}");
    all.remove(0)
}

fn entries<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Entry<'a>> {
    pairs
        .iter()
        .map(|&(key, value)| Entry { key, value })
        .collect()
}

/// The path of the rule a descriptor matches, if any.
fn matched(rules: &RuleSet, domain: &str, pairs: &[(&str, &str)]) -> Option<String> {
    rules
        .lookup(domain, &entries(pairs))
        .map(|m| m.rule.path.to_string())
}

fn rule<'a>(rules: &'a [Arc<Rule>], path: &str) -> &'a Rule {
    rules
        .iter()
        .find(|r| &*r.path == path)
        .unwrap_or_else(|| panic!("no rule {path} in {rules:#?}"))
}

fn limited(requests_per_unit: u32, unit: Unit) -> RuleLimit {
    limit(requests_per_unit, Window::of(unit), None, None, None)
}

fn limit(
    requests_per_unit: u32,
    window: Window,
    algorithm: Option<Algorithm>,
    burst: Option<u32>,
    name: Option<&str>,
) -> RuleLimit {
    RuleLimit::Limited(vec![Limit {
        requests_per_unit,
        window,
        algorithm,
        burst,
        name: name.map(Arc::from),
    }])
}

// === Accepted ===

const EVERYTHING: &str = r#"
domain: weather
descriptors:
  - key: remote_address
    detailed_metric: true
    value_to_metric: true
    rate_limit:
      unit: Minute
      requests_per_unit: 60
      name: per_ip
  - key: path
    value: /forecast
    shadow_mode: true
    metadata:
      team: forecasts
      tier: 2
      beta: true
    rate_limit:
      unit: SECOND
      requests_per_unit: 5
      name: forecast
      replaces:
        - name: per_ip
    descriptors:
      - key: method
        value: POST
        rate_limit: {unit: hour, requests_per_unit: 100}
  - key: path
    value: /static/*
    share_threshold: true
    rate_limit: {unit: day, requests_per_unit: 1000, algorithm: fixed_window}
  - key: tenant
    quota_mode: true
    rate_limit: {unit: month, requests_per_unit: 100000}
  - key: status
    value: 200
    rate_limit: {unit: week, requests_per_unit: 7, algorithm: gcra, burst: 3}
  - key: version
    value: '1.50'
    rate_limit: {unit: year, requests_per_unit: 1, algorithm: sliding_window}
  - key: remote_address
    value: 10.0.0.1
    rate_limit:
      unlimited: true
  - key: remote_address
    value: 10.0.0.2
"#;

#[test]
fn every_field_is_accepted() {
    let rules = load(EVERYTHING);
    let all = rules.rules();
    let paths: Vec<&str> = all.iter().map(|r| &*r.path).collect();
    assert_eq!(
        paths,
        [
            "weather.path_/forecast",
            "weather.path_/forecast.method_POST",
            "weather.path_/static/*",
            "weather.remote_address",
            "weather.remote_address_10.0.0.1",
            "weather.status_200",
            "weather.tenant",
            "weather.version_1.50",
        ]
    );

    let per_ip = rule(&all, "weather.remote_address");
    assert_eq!(
        per_ip.limit,
        limit(60, Window::of(Unit::Minute), None, None, Some("per_ip")),
        "unit is case-insensitive"
    );
    assert_eq!(per_ip.name.as_deref(), Some("per_ip"));
    assert!(!per_ip.shadow_mode && !per_ip.quota_mode);

    let forecast = rule(&all, "weather.path_/forecast");
    assert_eq!(
        forecast.limit,
        limit(5, Window::of(Unit::Second), None, None, Some("forecast"))
    );
    assert_eq!(forecast.name.as_deref(), Some("forecast"));
    assert_eq!(forecast.replaces, [Arc::from("per_ip")]);
    assert!(forecast.shadow_mode);
    assert_eq!(
        forecast.metadata,
        Metadata(
            [
                ("beta".to_owned(), MetaValue::Bool(true)),
                ("team".to_owned(), MetaValue::String("forecasts".into())),
                ("tier".to_owned(), MetaValue::Number(2.0)),
            ]
            .into()
        )
    );

    let nested = rule(&all, "weather.path_/forecast.method_POST");
    assert_eq!(nested.limit, limited(100, Unit::Hour));
    assert_eq!(nested.name, None);

    let statics = rule(&all, "weather.path_/static/*");
    assert_eq!(
        statics.limit,
        limit(
            1000,
            Window::of(Unit::Day),
            Some(Algorithm::FixedWindow),
            None,
            None
        )
    );
    let m = rules
        .lookup("weather", &entries(&[("path", "/static/app.js")]))
        .expect("wildcard match");
    assert_eq!(
        m.shared[0],
        Some("/static/*"),
        "share_threshold keys by the pattern"
    );
    let m = rules
        .lookup("weather", &entries(&[("path", "/forecast")]))
        .expect("exact match");
    assert_eq!(m.shared[0], None);

    let quota = rule(&all, "weather.tenant");
    assert!(quota.quota_mode);
    assert_eq!(quota.limit, limited(100_000, Unit::Month));

    let status = rule(&all, "weather.status_200");
    assert_eq!(
        status.limit,
        limit(
            7,
            Window::of(Unit::Week),
            Some(Algorithm::Gcra),
            Some(3),
            None
        )
    );

    let version = rule(&all, "weather.version_1.50");
    assert_eq!(
        version.limit,
        limit(
            1,
            Window::of(Unit::Year),
            Some(Algorithm::SlidingWindow),
            None,
            None
        )
    );

    assert_eq!(
        rule(&all, "weather.remote_address_10.0.0.1").limit,
        RuleLimit::Unlimited
    );
    assert_eq!(rules.domains().collect::<Vec<_>>(), ["weather"]);
}

#[test]
fn plain_scalars_are_read_as_written() {
    let rules = load(EVERYTHING);
    assert_eq!(
        matched(&rules, "weather", &[("status", "200")]).as_deref(),
        Some("weather.status_200"),
        "`value: 200` is the string \"200\""
    );
    assert_eq!(
        matched(&rules, "weather", &[("version", "1.50")]).as_deref(),
        Some("weather.version_1.50"),
        "`value: '1.50'` keeps its trailing zero"
    );
    assert_eq!(matched(&rules, "weather", &[("version", "1.5")]), None);

    let rules = load(
        "
domain: 2024
descriptors:
  - key: 42
    value: 0x1F
    rate_limit: {unit: second, requests_per_unit: 1, name: 7}
  - key: flag
    value: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: id
    value: 007
    rate_limit: {unit: second, requests_per_unit: 1}
",
    );
    assert_eq!(
        matched(&rules, "2024", &[("42", "0x1F")]).as_deref(),
        Some("2024.42_0x1F")
    );
    assert_eq!(matched(&rules, "2024", &[("42", "31")]), None);
    assert_eq!(
        matched(&rules, "2024", &[("flag", "true")]).as_deref(),
        Some("2024.flag_true")
    );
    assert_eq!(
        matched(&rules, "2024", &[("id", "007")]).as_deref(),
        Some("2024.id_007")
    );
    assert_eq!(rules.rules()[0].name.as_deref(), Some("7"));
}

#[test]
fn empty_values_and_lists_are_absent() {
    let rules = load(
        "
domain: d
descriptors:
  - key: k
    value: ''
    descriptors:
    rate_limit: {unit: second, requests_per_unit: 1, replaces: ~}
    metadata:
",
    );
    assert_eq!(
        matched(&rules, "d", &[("k", "anything")]).as_deref(),
        Some("d.k")
    );
    let empty = load("domain: empty\ndescriptors:\n");
    assert!(empty.has_domain("empty"));
    assert!(empty.rules().is_empty());
}

// === Refused ===

#[test]
fn an_empty_or_missing_domain_is_refused() {
    assert_eq!(
        error("descriptors: []\n"),
        "test.yaml: config file cannot have empty domain"
    );
    assert_eq!(
        error("domain: ''\n"),
        "test.yaml: config file cannot have empty domain"
    );
    assert_eq!(
        error("  \n"),
        "test.yaml: config file cannot have empty domain"
    );
    assert_eq!(
        error("# nothing\n---\n"),
        "test.yaml: config file cannot have empty domain"
    );
}

#[test]
fn a_domain_may_appear_in_one_file_only() {
    let a = parse_str("a.yaml", "domain: d\n").expect("parses");
    let b = parse_str("b.yaml", "domain: d\n").expect("parses");
    let c = parse_str("c.yaml", "domain: e\n").expect("parses");
    let err = compile_all(&[
        ("a.yaml".into(), a),
        ("b.yaml".into(), b),
        ("c.yaml".into(), c),
    ])
    .expect_err("duplicate domain");
    assert_eq!(
        err.to_string(),
        "b.yaml: duplicate domain 'd' in config file"
    );
}

#[test]
fn an_empty_key_is_refused() {
    assert_eq!(
        error("domain: d\ndescriptors:\n  - value: v\n"),
        "test.yaml: descriptors[0]: descriptor has empty key"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    descriptors:\n      - key: ''\n"),
        "test.yaml: descriptors[0].descriptors[0]: descriptor has empty key"
    );
}

#[test]
fn a_duplicate_key_value_is_refused_with_its_composite_key() {
    assert_eq!(
        error(
            "
domain: d
descriptors:
  - key: k
    value: v
  - key: other
  - key: k
    value: v
"
        ),
        "test.yaml: descriptors[2]: duplicate descriptor composite key 'd.k_v'"
    );
    assert_eq!(
        error(
            "
domain: d
descriptors:
  - key: k
    descriptors:
      - key: a
        value: p*
      - key: a
        value: p*
"
        ),
        "test.yaml: descriptors[0].descriptors[1]: duplicate descriptor composite key 'd.k.a_p*'"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n  - key: k\n    value: ''\n"),
        "test.yaml: descriptors[1]: duplicate descriptor composite key 'd.k'",
        "an empty value is no value"
    );
}

#[test]
fn a_bad_unit_is_refused_with_its_path() {
    let text = "
domain: weather
descriptors:
  - key: a
  - key: b
  - key: c
    descriptors:
      - key: d
        rate_limit:
          unit: minit
          requests_per_unit: 10
";
    assert_eq!(
        errors("weather.yaml", text),
        ["weather.yaml: descriptors[2].descriptors[0]: invalid rate limit unit 'minit'"]
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: invalid rate limit unit ''"
    );
}

#[test]
fn unknown_fields_are_refused_with_serdes_path_and_message() {
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 1, unti: 2}\n"),
        "test.yaml: descriptors[0].rate_limit: unknown field `unti`, expected one of `unit`, \
         `requests_per_unit`, `unlimited`, `name`, `replaces`, `algorithm`, `burst`, \
         `unit_multiplier`, `calendar`, `time_zone` at line 4 column 54"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    bogus: 1\n"),
        "test.yaml: descriptors[0]: unknown field `bogus`, expected one of `key`, `value`, \
         `rate_limit`, `rate_limits`, `descriptors`, `shadow_mode`, `quota_mode`, `detailed_metric`, \
         `value_to_metric`, `share_threshold`, `metadata` at line 4 column 5"
    );
    assert_eq!(
        error("domain: d\nbogus: 1\n"),
        "test.yaml: unknown field `bogus`, expected `domain` or `descriptors` at line 2 column 1"
    );
}

#[test]
fn bad_types_are_refused_with_their_path() {
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: -1}\n"),
        "test.yaml: descriptors[0].rate_limit.requests_per_unit: invalid type: integer `-1`, \
         expected u64 at line 4 column 51"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    shadow_mode: maybe\n"),
        "test.yaml: descriptors[0].shadow_mode: invalid type: string \"maybe\", expected a boolean \
         at line 4 column 18"
    );
    let value = error("domain: d\ndescriptors:\n  - key: k\n    value: [1]\n");
    assert!(
        value.starts_with(
            "test.yaml: descriptors[0].value: invalid type: sequence, expected a string"
        ),
        "{value}"
    );
    assert_eq!(
        error("- a\n"),
        "test.yaml: a rules file is a mapping with `domain` and `descriptors`; this one is a sequence"
    );
}

#[test]
fn bad_yaml_is_refused() {
    assert_eq!(
        error("domain: d\ndescriptors: [\n"),
        "test.yaml: did not find expected node content at line 3 column 1, while parsing a flow node"
    );
}

#[test]
fn duplicate_mapping_keys_are_refused() {
    assert_eq!(
        error("domain: d\ndomain: e\n"),
        "test.yaml: duplicate field `domain`"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    key: j\n"),
        "test.yaml: descriptors[0]: duplicate field `key` at line 3 column 5"
    );
    assert_eq!(
        error(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, unit: second}\n"
        ),
        "test.yaml: descriptors[0].rate_limit: duplicate field `unit` at line 4 column 17"
    );
    let metadata = error("domain: d\ndescriptors:\n  - key: k\n    metadata: {team: a, team: b}\n");
    assert!(
        metadata
            .starts_with("test.yaml: descriptors[0].metadata: duplicate entry with key \"team\""),
        "{metadata}"
    );
}

#[test]
fn unlimited_refuses_a_unit_algorithm_or_burst() {
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: second}\n"),
        "test.yaml: descriptors[0]: should not specify rate limit unit when unlimited"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, algorithm: gcra}\n"),
        "test.yaml: descriptors[0]: should not specify algorithm or burst when unlimited"
    );
}

#[test]
fn replaces_must_name_another_rule() {
    assert_eq!(
        error(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, \
             name: me, replaces: [{name: me}]}\n"
        ),
        "test.yaml: descriptors[0]: replaces should not contain name of same descriptor"
    );
    assert_eq!(
        error(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, \
             replaces: [{name: ''}]}\n"
        ),
        "test.yaml: descriptors[0]: should not have an empty replaces entry"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{}]}\n"),
        "test.yaml: descriptors[0]: should not have an empty replaces entry"
    );
}

#[test]
fn requests_per_unit_must_be_between_1_and_u32_max() {
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second}\n"),
        "test.yaml: descriptors[0]: requests_per_unit is required (without it every request would be blocked)"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 0}\n"),
        "test.yaml: descriptors[0]: requests_per_unit must be at least 1 (0 would block every request)"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 4294967296}\n"),
        "test.yaml: descriptors[0]: requests_per_unit 4294967296 is larger than 4294967295"
    );
    load("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 4294967295}\n");
}

#[test]
fn algorithm_and_burst_are_checked() {
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, algorithm: leaky_bucket}\n"),
        "test.yaml: descriptors[0]: unknown algorithm 'leaky_bucket' (expected sliding_window, fixed_window or gcra)"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, burst: 5}\n"),
        "test.yaml: descriptors[0]: burst applies only to algorithm gcra"
    );
    assert_eq!(
        error(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, \
             algorithm: fixed_window, burst: 5}\n"
        ),
        "test.yaml: descriptors[0]: burst applies only to algorithm gcra"
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, algorithm: gcra, burst: 0}\n"),
        "test.yaml: descriptors[0]: burst must be between 1 and 4294967295"
    );
}

#[test]
fn share_threshold_needs_a_wildcard() {
    let expected =
        "test.yaml: descriptors[0]: share_threshold needs a wildcard value (one containing '*')";
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    value: v\n    share_threshold: true\n"),
        expected
    );
    assert_eq!(
        error("domain: d\ndescriptors:\n  - key: k\n    share_threshold: true\n"),
        expected
    );
}

#[test]
fn every_error_of_a_file_is_reported() {
    let text = "
descriptors:
  - key: a
    rate_limit: {unit: minit, requests_per_unit: 0}
  - key: b
    rate_limit: {unit: second, requests_per_unit: 1, algorithm: nope, burst: 2}
    descriptors:
      - key: ''
      - key: c
        value: x
        share_threshold: true
        rate_limit: {unlimited: true, unit: hour}
  - key: a
";
    assert_eq!(
        errors("many.yaml", text),
        [
            "many.yaml: config file cannot have empty domain",
            "many.yaml: descriptors[0]: invalid rate limit unit 'minit'",
            "many.yaml: descriptors[0]: requests_per_unit must be at least 1 (0 would block every request)",
            "many.yaml: descriptors[1]: unknown algorithm 'nope' (expected sliding_window, fixed_window or gcra)",
            "many.yaml: descriptors[1]: burst applies only to algorithm gcra",
            "many.yaml: descriptors[1].descriptors[0]: descriptor has empty key",
            "many.yaml: descriptors[1].descriptors[1]: share_threshold needs a wildcard value (one containing '*')",
            "many.yaml: descriptors[1].descriptors[1]: should not specify rate limit unit when unlimited",
            "many.yaml: descriptors[2]: duplicate descriptor composite key '.a'",
        ]
    );
}

// === Matching ===

const MATCHING: &str = "
domain: d
descriptors:
  - key: path
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: path
    value: /api/*
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: path
    value: /api/v1/*
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: path
    value: /api/v1/health
    rate_limit: {unit: second, requests_per_unit: 4}
  - key: path
    value: /internal
  - key: client
    value: acme
    rate_limit: {unit: second, requests_per_unit: 5}
    descriptors:
      - key: path
        rate_limit: {unit: second, requests_per_unit: 6}
";

#[test]
fn exact_beats_wildcard_beats_key_only() {
    let rules = load(MATCHING);
    let path = |value: &str| matched(&rules, "d", &[("path", value)]);
    assert_eq!(
        path("/api/v1/health").as_deref(),
        Some("d.path_/api/v1/health")
    );
    assert_eq!(
        path("/api/v1/users").as_deref(),
        Some("d.path_/api/*"),
        "the first wildcard in file order wins, not the longest"
    );
    assert_eq!(path("/api/").as_deref(), Some("d.path_/api/*"));
    assert_eq!(path("/home").as_deref(), Some("d.path"));
    assert_eq!(path("").as_deref(), Some("d.path"));
    assert_eq!(
        path("/internal"),
        None,
        "a value without a limit is whitelisted"
    );
    assert_eq!(matched(&rules, "other", &[("path", "/home")]), None);
    assert_eq!(matched(&rules, "d", &[("nope", "/home")]), None);
}

#[test]
fn a_limit_applies_only_at_the_depth_of_the_descriptor() {
    let rules = load(MATCHING);
    assert_eq!(
        matched(&rules, "d", &[("client", "acme")]).as_deref(),
        Some("d.client_acme")
    );
    assert_eq!(
        matched(&rules, "d", &[("client", "acme"), ("path", "/x")]).as_deref(),
        Some("d.client_acme.path")
    );
    assert_eq!(
        matched(
            &rules,
            "d",
            &[("client", "acme"), ("path", "/x"), ("more", "y")]
        ),
        None,
        "deeper than the configuration"
    );
    assert_eq!(
        matched(&rules, "d", &[("client", "acme"), ("user", "u")]),
        None
    );
    assert_eq!(matched(&rules, "d", &[("client", "other")]), None);
    assert_eq!(
        matched(&rules, "d", &[("path", "/home"), ("client", "acme")]),
        None,
        "the order of entries matters"
    );
}

// === Loading a directory ===

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
}

#[test]
fn load_path_reads_yaml_and_yml_and_skips_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    write(root, "a.yaml", "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n");
    write(root, "b.yml", "domain: b\n");
    write(root, ".hidden.yaml", "domain: hidden\n");
    write(root, "notes.txt", "not: rules\n");
    write(root, "broken.yaml.bak", "{{{{");
    // Kubernetes mounts a ConfigMap as `..data -> ..2026_01_01_00_00_00.1`
    // plus a symlink per file; the dot directories must not be read twice.
    let versioned = root.join("..2026_01_01_00_00_00.1");
    fs::create_dir(&versioned).expect("mkdir");
    write(&versioned, "c.yaml", "domain: c\n");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", root.join("..data"))
            .expect("symlink");
        std::os::unix::fs::symlink("..data/c.yaml", root.join("c.yaml")).expect("symlink");
    }
    fs::create_dir(root.join("sub.yaml")).expect("mkdir");

    let rules = load_path(root).unwrap_or_else(|e| panic!("{e}"));
    let mut domains: Vec<&str> = rules.domains().collect();
    domains.sort_unstable();
    let expected: &[&str] = if cfg!(unix) {
        &["a", "b", "c"]
    } else {
        &["a", "b"]
    };
    assert_eq!(domains, expected);
    assert_eq!(matched(&rules, "a", &[("k", "v")]).as_deref(), Some("a.k"));

    let files: Vec<_> = rule_files(root)
        .expect("listing")
        .into_iter()
        .map(|p| p.strip_prefix(root).expect("inside").display().to_string())
        .collect();
    let expected: &[&str] = if cfg!(unix) {
        &["a.yaml", "b.yml", "c.yaml"]
    } else {
        &["a.yaml", "b.yml"]
    };
    assert_eq!(files, expected);
}

#[test]
fn load_path_names_files_relative_to_the_directory_and_reports_all_of_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    write(root, "a.yaml", "domain: same\n");
    write(root, "b.yaml", "domain: same\n");
    write(
        root,
        "weather.yaml",
        "domain: weather\ndescriptors:\n  - key: k\n    rate_limit: {unit: minit, requests_per_unit: 1}\n",
    );
    write(root, "z.yml", "domain: z\ndescriptors: [\n");
    let err = load_path(root).expect_err("bad rules");
    let shown: Vec<String> = err.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "z.yml: did not find expected node content at line 3 column 1, while parsing a flow node",
            "b.yaml: duplicate domain 'same' in config file",
            "weather.yaml: descriptors[0]: invalid rate limit unit 'minit'",
        ]
    );
    assert_eq!(err.0[2].file, "weather.yaml");
    assert_eq!(err.0[2].path, "descriptors[0]");
    assert_eq!(err.to_string(), shown.join("\n"));
}

#[test]
fn load_path_on_one_file_keeps_the_given_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rules.yaml");
    fs::write(&file, "domain: d\ndescriptors:\n  - key: ''\n").expect("write");
    let err = load_path(&file).expect_err("bad rules");
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].file, file.display().to_string());
    assert_eq!(err.0[0].message, "descriptor has empty key");

    fs::write(&file, "domain: d\n").expect("write");
    assert!(load_path(&file).expect("loads").has_domain("d"));
}

#[test]
fn load_path_reports_a_missing_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing");
    let err = load_path(&missing).expect_err("missing");
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].file, missing.display().to_string());
    assert!(
        err.0[0].message.starts_with("cannot read: "),
        "{}",
        err.0[0].message
    );
}

// === Property tests ===

const KEYS: [&str; 2] = ["a", "b"];
/// Exact values (some only look like numbers), wildcards, and key-only.
const CONFIG_VALUES: [Option<&str>; 13] = [
    None,
    Some(""),
    Some("x"),
    Some("xy"),
    Some("200"),
    Some("1.50"),
    Some("x*"),
    Some("xy*"),
    Some("2*"),
    Some("*"),
    Some("x*z"),
    Some("*y"),
    Some("2*0*"),
];
const REQUEST_VALUES: [&str; 11] = [
    "x", "xy", "xyz", "xz", "y", "200", "2000", "20x0", "1.50", "1.5", "",
];

fn descriptors(depth: u32) -> BoxedStrategy<Vec<YamlDescriptor>> {
    let node = (
        prop::sample::select(KEYS.to_vec()),
        prop::sample::select(CONFIG_VALUES.to_vec()),
        prop::bool::weighted(0.8),
    );
    let children = if depth == 0 {
        Just(Vec::new()).boxed()
    } else {
        descriptors(depth - 1)
    };
    prop::collection::vec((node, children), 0..6)
        .prop_map(|nodes| {
            // Keep the first of equal (key, value) pairs: a duplicate is an
            // error, tested above.
            let mut seen: Vec<(&str, ValueMatch)> = Vec::new();
            let mut level = Vec::new();
            for ((key, value, limited), descriptors) in nodes {
                let matcher = ValueMatch::parse(value);
                if seen.iter().any(|(k, m)| *k == key && *m == matcher) {
                    continue;
                }
                seen.push((key, matcher));
                level.push(YamlDescriptor {
                    key: Some(key.to_owned()),
                    value: value.map(str::to_owned),
                    rate_limit: limited.then(|| YamlRateLimit {
                        unit: Some("second".into()),
                        requests_per_unit: Some(1),
                        ..YamlRateLimit::default()
                    }),
                    descriptors,
                    ..YamlDescriptor::default()
                });
            }
            level
        })
        .boxed()
}

/// A configured value; empty means none.
fn configured(d: &YamlDescriptor) -> Option<&str> {
    d.value.as_deref().filter(|v| !v.is_empty())
}

/// `*` as any run of bytes, tried at every split.
fn glob(pattern: &[u8], value: &[u8]) -> bool {
    match pattern.split_first() {
        None => value.is_empty(),
        Some((b'*', rest)) => (0..=value.len()).any(|at| glob(rest, &value[at..])),
        Some((c, rest)) => value.first() == Some(c) && glob(rest, &value[1..]),
    }
}

/// envoyproxy/ratelimit's lookup as a linear scan of the file: at each
/// depth the entry with the exact value, else the first wildcard (in file
/// order) that matches the value, else the key-only entry; a limit applies
/// only at the depth of the last entry.
fn oracle(domain: &str, mut level: &[YamlDescriptor], request: &[(&str, &str)]) -> Option<String> {
    let mut path = domain.to_owned();
    let mut found = None;
    for (i, &(key, value)) in request.iter().enumerate() {
        let same_key = || level.iter().filter(move |d| d.key.as_deref() == Some(key));
        let node = same_key()
            .find(|d| configured(d).is_some_and(|v| !v.contains('*') && v == value))
            .or_else(|| {
                same_key().find(|d| {
                    configured(d)
                        .is_some_and(|v| v.contains('*') && glob(v.as_bytes(), value.as_bytes()))
                })
            })
            .or_else(|| same_key().find(|d| configured(d).is_none()))?;
        match configured(node) {
            Some(v) => path.push_str(&format!(".{key}_{v}")),
            None => path.push_str(&format!(".{key}")),
        }
        if i + 1 == request.len() {
            found = node.rate_limit.is_some().then(|| path.clone());
        }
        level = &node.descriptors;
    }
    found
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Compiled lookup maps match the linear scan, and the tree survives a
    /// trip through YAML text (numbers-as-strings included).
    #[test]
    fn lookup_matches_a_linear_scan_of_the_file(
        tree in descriptors(2),
        requests in prop::collection::vec(
            prop::collection::vec(
                (prop::sample::select(KEYS.to_vec()), prop::sample::select(REQUEST_VALUES.to_vec())),
                1..=3,
            ),
            1..40,
        ),
    ) {
        let root = YamlRoot {
            domain: Some("d".into()),
            descriptors: tree,
        };
        let text = serde_yaml_ng::to_string(&root).expect("serializes");
        let reparsed = parse_str("p.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        prop_assert_eq!(&reparsed, &root, "{}", text);
        let rules = compile_all(&[("p.yaml".into(), reparsed)]).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for request in &requests {
            prop_assert_eq!(
                matched(&rules, "d", request),
                oracle("d", &root.descriptors, request),
                "{:?} against\n{}", request, text
            );
        }
    }
}

// === envoyproxy/ratelimit's YAML reading ===

#[test]
fn plain_numbers_go_refuses_are_refused_outside_metadata() {
    assert_eq!(
        errors(
            "f.yaml",
            "domain: d\ndescriptors:\n  - key: k\n    value: 1.50\n  - key: j\n    value: 18446744073709551615\n    metadata: {ratio: 1.5}\n",
        ),
        [
            "f.yaml: descriptors[0].value: the number 1.5 (a fraction, an exponent, or beyond 64 bits) \
             is refused here, as envoyproxy/ratelimit refuses it; quote it to mean the text",
            "f.yaml: descriptors[1].value: the number 18446744073709551615 (a fraction, an exponent, \
             or beyond 64 bits) is refused here, as envoyproxy/ratelimit refuses it; quote it to mean the text",
        ]
    );
    let rules = load("domain: d\ndescriptors:\n  - key: k\n    value: '1e3'\n    rate_limit: {unit: second, requests_per_unit: 1}\n");
    assert_eq!(
        matched(&rules, "d", &[("k", "1e3")]).as_deref(),
        Some("d.k_1e3")
    );
}

#[test]
fn booleans_read_as_go_yaml_reads_them() {
    let rules = load(
        "domain: d\ndescriptors:\n  - key: k\n    shadow_mode: yes\n    quota_mode: On\n    detailed_metric: n\n    rate_limit: {unit: second, requests_per_unit: 1}\n  - key: u\n    rate_limit: {unlimited: Y}\n",
    );
    let all = rules.rules();
    let k = all.iter().find(|r| &*r.path == "d.k").expect("d.k");
    assert!(k.shadow_mode && k.quota_mode);
    let u = all.iter().find(|r| &*r.path == "d.u").expect("d.u");
    assert_eq!(u.limit, RuleLimit::Unlimited);
}

#[test]
fn entries_equal_as_key_underscore_value_are_duplicates() {
    assert_eq!(
        errors(
            "f.yaml",
            "domain: d\ndescriptors:\n  - key: a\n    value: b_c\n  - key: a_b\n    value: c\n  - key: x_y\n  - key: x\n    value: y\n",
        ),
        [
            "f.yaml: descriptors[1]: duplicate descriptor composite key 'd.a_b_c'",
            "f.yaml: descriptors[3]: duplicate descriptor composite key 'd.x_y'",
        ]
    );
}

#[test]
fn metadata_takes_any_yaml() {
    let rules = load(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n    metadata:\n      name: svc\n      tags: [a, 2, true]\n      owner: {team: payments, oncall: [x, y]}\n      ratio: 0.5\n      none: ~\n",
    );
    let m = &rules.rules()[0].metadata;
    assert_eq!(m.0["ratio"], MetaValue::Number(0.5));
    assert_eq!(m.0["none"], MetaValue::Null);
    assert!(matches!(&m.0["tags"], MetaValue::List(l) if l.len() == 3));
    assert!(matches!(&m.0["owner"], MetaValue::Map(o) if o.0.contains_key("oncall")));
}

/// Found by the `rules_yaml` fuzz target: a document that is a string or a
/// list was refused naming an internal type (`expected struct YamlRoot`).
#[test]
fn a_document_that_is_not_a_mapping_says_what_a_rules_file_is() {
    for (text, found) in [
        ("descriptors:team []\n", "this one is a string"),
        ("- domain: x\n", "this one is a sequence"),
    ] {
        let errors = parse_str("f.yaml", text).unwrap_err();
        let message = &errors.0[0].message;
        assert!(
            message.starts_with("a rules file is a mapping with `domain` and `descriptors`"),
            "{message}"
        );
        assert!(message.contains(found), "{message}");
        assert!(!message.contains("YamlRoot"), "{message}");
    }
}

/// Found by the `rules_yaml` fuzz target: a control character was placed
/// by its offset alone (`at position 113`).
#[test]
fn a_control_character_is_placed_by_line_and_column() {
    let errors = parse_str("f.yaml", "domain: d\ndescriptors:\n  - key: a\u{12}b\n").unwrap_err();
    let message = &errors.0[0].message;
    assert!(
        message.contains("control characters are not allowed"),
        "{message}"
    );
    assert!(message.ends_with("at line 3 column 11"), "{message}");
    // At the very start the reader gives no position at all.
    let errors = parse_str("f.yaml", "\u{4}descriptors: []\n").unwrap_err();
    let message = &errors.0[0].message;
    assert!(message.ends_with("at line 1 column 1"), "{message}");
}

/// Found by the `rules_yaml` fuzz target: the reader's "cannot start any
/// token" error said nothing of where.
#[test]
fn a_character_that_cannot_start_a_token_is_placed() {
    let errors = parse_str("f.yaml", "domain: d\n@ k : []\n").unwrap_err();
    let message = &errors.0[0].message;
    assert!(message.contains("cannot start any token"), "{message}");
    assert!(message.contains("at line 2 column 1"), "{message}");
}

/// Found by the `rules_yaml` fuzz target: an unknown anchor, a key that is
/// a list, and several documents in one file said nothing of where.
#[test]
fn anchors_list_keys_and_several_documents_are_placed() {
    let message = |text: &str| parse_str("f.yaml", text).unwrap_err().0[0].message.clone();
    let anchor = message("domain: d\ndescriptors: *j\n");
    assert!(anchor.contains("unknown anchor at line 2"), "{anchor}");
    let list_key = message("[a]: 1\n");
    assert!(list_key.contains("at line 1 column"), "{list_key}");
    let several = message("domain: a\n---\ndomain: b\n");
    assert!(
        several.starts_with("a rules file holds one YAML document"),
        "{several}"
    );
}
