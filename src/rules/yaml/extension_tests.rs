//! sluice's window extensions in the YAML: several limits on a descriptor
//! (`rate_limits`), windows of several units (`unit_multiplier`), calendar
//! windows (`calendar`, `time_zone`): what is accepted and what it means,
//! and what is refused, with the exact message and path.

use super::*;
use crate::limiter::Entry;

fn load(text: &str) -> RuleSet {
    let root = parse_str("test.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    compile_all(&[("test.yaml".to_owned(), root)]).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(text: &str) -> Vec<String> {
    let result =
        parse_str("test.yaml", text).and_then(|root| compile_all(&[("test.yaml".into(), root)]));
    match result {
        Ok(_) => panic!("should have been refused:\n{text}"),
        Err(RuleErrors(errors)) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// The one error of a file with one descriptor `k` whose `rate_limit` (or
/// more) is `body`, indented under it.
fn error(body: &str) -> String {
    let text = format!("domain: d\ndescriptors:\n  - key: k\n{body}");
    let mut all = errors(&text);
    assert_eq!(all.len(), 1, "expected one error, got {all:#?}");
    all.remove(0)
}

/// The limits of the rule descriptor `k=v` matches.
fn limits_of(rules: &RuleSet, value: &str) -> Vec<Limit> {
    let entries = [Entry { key: "k", value }];
    let m = rules.lookup("d", &entries).expect("a rule matches");
    match &m.rule.limit {
        RuleLimit::Limited(limits) => limits.clone(),
        RuleLimit::Unlimited => panic!("unlimited"),
    }
}

const EXTENSIONS: &str = r#"
domain: d
descriptors:
  - key: k
    value: burst_and_daily
    rate_limits:
      - {name: burst, unit: second, requests_per_unit: 10, algorithm: gcra, burst: 20}
      - {name: daily, unit: day, requests_per_unit: 10000}
  - key: k
    value: five_minutes
    rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 100, name: per_5m}
  - key: k
    value: billing
    quota_mode: true
    rate_limit: {calendar: month, time_zone: Europe/Berlin, requests_per_unit: 100000}
  - key: k
    value: daily_utc
    rate_limit: {calendar: DAY, requests_per_unit: 5, algorithm: fixed_window}
  - key: k
    value: mixed
    rate_limits:
      - {unit: hour, requests_per_unit: 100, replaces: [{name: other}]}
      - {calendar: week, time_zone: America/New_York, requests_per_unit: 1000}
      - {unit: minute, unit_multiplier: 1, requests_per_unit: 10}
"#;

fn units(unit: Unit, multiplier: u32) -> Window {
    Window::Units { unit, multiplier }
}

fn calendar(unit: CalendarUnit, zone: &str) -> Window {
    Window::Calendar(Calendar {
        unit,
        time_zone: zone.parse().unwrap(),
    })
}

#[test]
fn the_extensions_are_accepted_and_mean_what_they_say() {
    let rules = load(EXTENSIONS);
    assert_eq!(
        limits_of(&rules, "burst_and_daily"),
        [
            Limit {
                requests_per_unit: 10,
                window: units(Unit::Second, 1),
                algorithm: Some(Algorithm::Gcra),
                burst: Some(20),
                name: Some("burst".into()),
            },
            Limit {
                requests_per_unit: 10_000,
                window: units(Unit::Day, 1),
                algorithm: None,
                burst: None,
                name: Some("daily".into()),
            },
        ]
    );
    let five = limits_of(&rules, "five_minutes");
    assert_eq!(five.len(), 1);
    assert_eq!(five[0].window, units(Unit::Minute, 5));
    assert_eq!(five[0].window.seconds(), 300);
    assert_eq!(five[0].name.as_deref(), Some("per_5m"));

    assert_eq!(
        limits_of(&rules, "billing")[0].window,
        calendar(CalendarUnit::Month, "Europe/Berlin")
    );
    let daily = &limits_of(&rules, "daily_utc")[0];
    assert_eq!(
        daily.window,
        calendar(CalendarUnit::Day, "UTC"),
        "the calendar unit is case-insensitive; the zone defaults to UTC"
    );
    assert_eq!(daily.algorithm, Some(Algorithm::FixedWindow));

    let mixed = limits_of(&rules, "mixed");
    let windows: Vec<Window> = mixed.iter().map(|l| l.window).collect();
    assert_eq!(
        windows,
        [
            units(Unit::Hour, 1),
            calendar(CalendarUnit::Week, "America/New_York"),
            units(Unit::Minute, 1),
        ]
    );
    let entries = [Entry {
        key: "k",
        value: "mixed",
    }];
    let m = rules.lookup("d", &entries).unwrap();
    assert_eq!(
        m.rule.replaces,
        [Arc::from("other")],
        "an entry's replaces is the rule's"
    );
    assert_eq!(m.rule.name, None, "names are the limits'");
}

#[test]
fn one_unit_without_a_multiplier_is_the_envoyproxy_ratelimit_window() {
    let rules = load(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 3}\n",
    );
    assert_eq!(limits_of(&rules, "x")[0].window, Window::of(Unit::Hour));
}

#[test]
fn rate_limit_and_rate_limits_together_are_refused() {
    assert_eq!(
        error(
            "    rate_limit: {unit: second, requests_per_unit: 1}\n    rate_limits:\n      - {unit: day, requests_per_unit: 9}\n"
        ),
        "test.yaml: descriptors[0]: rate_limit and rate_limits are both set: use rate_limit for \
         one limit, rate_limits for several"
    );
}

#[test]
fn rate_limits_need_limited_entries_over_distinct_windows() {
    assert_eq!(
        error("    rate_limits: []\n"),
        "test.yaml: descriptors[0]: rate_limits is empty: give at least one limit (or no \
         rate_limits at all)"
    );
    assert_eq!(
        error("    rate_limits:\n      - {unlimited: true}\n"),
        "test.yaml: descriptors[0].rate_limits[0]: a limit in rate_limits cannot be unlimited \
         (use rate_limit: {unlimited: true})"
    );
    assert_eq!(
        error(
            "    rate_limits:\n      - {unit: minute, requests_per_unit: 1}\n      - {unit: second, unit_multiplier: 60, requests_per_unit: 2, algorithm: gcra}\n"
        ),
        "test.yaml: descriptors[0].rate_limits[1]: the same window as rate_limits[0] (60 \
         seconds): a descriptor has one counter per window, so give each limit its own window"
    );
    assert_eq!(
        error(
            "    rate_limits:\n      - {calendar: day, requests_per_unit: 1}\n      - {calendar: day, time_zone: UTC, requests_per_unit: 2}\n"
        ),
        "test.yaml: descriptors[0].rate_limits[1]: the same window as rate_limits[0] (calendar \
         day in UTC): a descriptor has one counter per window, so give each limit its own window"
    );
    // A calendar day and 24 hours are different windows.
    load("domain: d\ndescriptors:\n  - key: k\n    rate_limits:\n      - {calendar: day, requests_per_unit: 1}\n      - {unit: hour, unit_multiplier: 24, requests_per_unit: 2}\n");
    assert_eq!(
        error(
            "    rate_limits:\n      - {name: a, unit: second, requests_per_unit: 1}\n      - {name: a, unit: day, requests_per_unit: 2}\n"
        ),
        "test.yaml: descriptors[0].rate_limits[1]: duplicate name 'a' in rate_limits"
    );
    assert_eq!(
        error(
            "    rate_limits:\n      - {name: a, unit: second, requests_per_unit: 1}\n      - {unit: day, requests_per_unit: 2, replaces: [{name: a}]}\n"
        ),
        "test.yaml: descriptors[0]: replaces should not contain name of same descriptor"
    );
}

#[test]
fn each_entry_of_rate_limits_is_checked_as_a_rate_limit_is() {
    let all = errors(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limits:\n      - {unit: minit, requests_per_unit: 1}\n      - {unit: day}\n      - {unit: day, requests_per_unit: 1, burst: 3}\n",
    );
    assert_eq!(
        all,
        [
            "test.yaml: descriptors[0].rate_limits[0]: invalid rate limit unit 'minit'",
            "test.yaml: descriptors[0].rate_limits[1]: requests_per_unit is required (without it \
             every request would be blocked)",
            "test.yaml: descriptors[0].rate_limits[2]: burst applies only to algorithm gcra",
            "test.yaml: descriptors[0].rate_limits[2]: the same window as rate_limits[1] (day): a \
             descriptor has one counter per window, so give each limit its own window",
        ]
    );
}

#[test]
fn a_unit_multiplier_is_at_least_one_and_at_most_a_year() {
    assert_eq!(
        error("    rate_limit: {unit: minute, unit_multiplier: 0, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: unit_multiplier must be at least 1"
    );
    assert_eq!(
        error("    rate_limit: {unit: day, unit_multiplier: 366, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: unit_multiplier 366 makes a window longer than a year \
         (31536000 seconds)"
    );
    assert_eq!(
        error(
            "    rate_limit: {unit: second, unit_multiplier: 99999999999, requests_per_unit: 1}\n"
        ),
        "test.yaml: descriptors[0]: unit_multiplier 99999999999 makes a window longer than a \
         year (31536000 seconds)"
    );
    load("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, unit_multiplier: 365, requests_per_unit: 1}\n");
    assert_eq!(
        error("    rate_limit: {unlimited: true, unit_multiplier: 2}\n"),
        "test.yaml: descriptors[0]: should not specify unit_multiplier, calendar or time_zone \
         when unlimited"
    );
}

#[test]
fn calendar_windows_are_checked() {
    assert_eq!(
        error("    rate_limit: {calendar: fortnight, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: invalid calendar 'fortnight' (expected day, week or month)"
    );
    assert_eq!(
        error(
            "    rate_limit: {calendar: month, time_zone: Europe/Berlinn, requests_per_unit: 1}\n"
        ),
        "test.yaml: descriptors[0]: unknown time_zone 'Europe/Berlinn' (a tz database name such \
         as Europe/Berlin, or UTC)"
    );
    assert_eq!(
        error("    rate_limit: {calendar: month, unit: month, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: calendar and unit are both set: a calendar window replaces \
         the unit"
    );
    assert_eq!(
        error("    rate_limit: {calendar: day, unit_multiplier: 2, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: unit_multiplier does not apply to calendar windows"
    );
    assert_eq!(
        error("    rate_limit: {unit: day, time_zone: Europe/Berlin, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: time_zone applies only to calendar windows (calendar: day, \
         week or month)"
    );
    assert_eq!(
        error("    rate_limit: {calendar: week, algorithm: gcra, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0]: calendar windows count as fixed windows: algorithm must be \
         fixed_window or left out"
    );
    assert_eq!(
        error(
            "    rate_limit: {calendar: week, algorithm: sliding_window, requests_per_unit: 1}\n"
        ),
        "test.yaml: descriptors[0]: calendar windows count as fixed windows: algorithm must be \
         fixed_window or left out"
    );
    assert_eq!(
        error("    rate_limits:\n      - {calendar: week, time_zone: Mars/Olympus, requests_per_unit: 1}\n"),
        "test.yaml: descriptors[0].rate_limits[0]: unknown time_zone 'Mars/Olympus' (a tz \
         database name such as Europe/Berlin, or UTC)"
    );
}

#[test]
fn unknown_fields_in_rate_limits_are_refused_with_their_path() {
    let all = errors("domain: d\ndescriptors:\n  - key: k\n    rate_limits:\n      - {unit: day, requests_per_unit: 1, window: 5m}\n");
    assert_eq!(all.len(), 1);
    assert!(
        all[0].starts_with("test.yaml: descriptors[0].rate_limits[0]: unknown field `window`"),
        "{all:?}"
    );
}
