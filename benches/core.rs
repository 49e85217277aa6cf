//! Criterion benches of the decision core and the shell around it.
//!
//! `cargo bench --bench core` (all), or `cargo bench --bench core -- lookup`
//! for one group. See BENCHMARKS.md for results and the machine.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice::clock::{Clock, ManualClock, SystemClock};
use sluice::limiter::RuleSet;
use sluice::limiter::{
    self, check, Algorithm, CounterSpec, CounterState, Descriptor, Entry, KeyHasher, PlanOptions,
    Request,
};
use sluice::rules::yaml;
use sluice::service::{FailureMode, LimiterSettings, RateLimiter};
use sluice::storage::memory::MemoryStore;
use sluice::storage::CounterStore;

/// Rules with an exact value, a wildcard, a key-only entry and a nested
/// path, so matching takes each of envoyproxy/ratelimit's routes. Limits are
/// high enough that the end-to-end bench stays under them.
const RULES: &str = r#"
domain: bench
descriptors:
  - key: client_id
    rate_limit: { unit: second, requests_per_unit: 1000000000 }
  - key: route
    value: /orders
    rate_limit: { unit: second, requests_per_unit: 1000000000, algorithm: gcra, burst: 1000 }
  - key: route
    value: /search*
    rate_limit: { unit: minute, requests_per_unit: 1000000000, algorithm: fixed_window }
  - key: route
    rate_limit: { unit: minute, requests_per_unit: 1000000000 }
  - key: header_match
    value: anonymous
    descriptors:
      - key: remote_address
        rate_limit: { unit: minute, requests_per_unit: 1000000000 }
"#;

fn rule_set() -> RuleSet {
    let root = yaml::parse_str("bench.yaml", RULES).expect("bench rules parse");
    yaml::compile_all(&[("bench.yaml".to_owned(), root)]).expect("bench rules compile")
}

fn descriptor<'a>(entries: &[(&'a str, &'a str)]) -> Descriptor<'a> {
    Descriptor {
        entries: entries
            .iter()
            .map(|&(key, value)| Entry { key, value })
            .collect(),
        limit_override: None,
        hits: None,
    }
}

/// One descriptor per matching route; `n` of them (1..=5).
fn request(n: usize) -> Request<'static> {
    let all = [
        descriptor(&[("client_id", "client-4711")]),
        descriptor(&[("route", "/orders")]),
        descriptor(&[("route", "/search/v2")]),
        descriptor(&[("route", "/weather")]),
        descriptor(&[
            ("header_match", "anonymous"),
            ("remote_address", "203.0.113.7"),
        ]),
    ];
    Request {
        domain: "bench",
        descriptors: all.into_iter().take(n).collect(),
        hits: 1,
    }
}

fn bench_lookup(c: &mut Criterion) {
    let rules = rule_set();
    let mut g = c.benchmark_group("lookup");
    let cases: [(&str, &[Entry<'_>]); 5] = [
        (
            "exact",
            &[Entry {
                key: "route",
                value: "/orders",
            }],
        ),
        (
            "wildcard",
            &[Entry {
                key: "route",
                value: "/search/v2",
            }],
        ),
        (
            "key_only",
            &[Entry {
                key: "client_id",
                value: "client-4711",
            }],
        ),
        (
            "nested",
            &[
                Entry {
                    key: "header_match",
                    value: "anonymous",
                },
                Entry {
                    key: "remote_address",
                    value: "203.0.113.7",
                },
            ],
        ),
        (
            "no_match",
            &[Entry {
                key: "unknown",
                value: "x",
            }],
        ),
    ];
    for (name, entries) in cases {
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    rules
                        .lookup(black_box("bench"), black_box(entries))
                        .is_some(),
                )
            })
        });
    }
    g.finish();
}

/// One level with 1 000 wildcard patterns (`pattern` with `{i}` replaced by
/// 0000 ... 0999), 10 000 exact values beside them and a key-only entry: a
/// large gateway's route table. Each request value matches one pattern, an
/// exact value, or nothing (falling through to the key-only entry).
fn wildcard_rule_set(pattern: &str) -> RuleSet {
    use std::fmt::Write as _;
    let mut text = String::from("domain: wild\ndescriptors:\n");
    for i in 0..1_000 {
        let value = pattern.replace("{i}", &format!("{i:04}"));
        let _ = writeln!(
            text,
            "  - key: path\n    value: {value}\n    rate_limit: {{ unit: second, requests_per_unit: 10 }}"
        );
    }
    for i in 0..10_000 {
        let _ = writeln!(
            text,
            "  - key: path\n    value: /exact{i:05}\n    rate_limit: {{ unit: second, requests_per_unit: 10 }}"
        );
    }
    text.push_str("  - key: path\n    rate_limit: { unit: second, requests_per_unit: 10 }\n");
    let root = yaml::parse_str("wild.yaml", &text).expect("wildcard rules parse");
    yaml::compile_all(&[("wild.yaml".to_owned(), root)]).expect("wildcard rules compile")
}

fn bench_lookup_wildcards(c: &mut Criterion) {
    // `/svc{i}/*`: a trailing `*`, which matched before `*` could go anywhere.
    lookup_wildcards(
        c,
        "lookup_1000_wildcards",
        "/svc{i}/*",
        [
            ("first_pattern", "/svc0000/items/42"),
            ("last_pattern", "/svc0999/items/42"),
            ("exact_among_10000", "/exact04711"),
            ("no_pattern_key_only", "/other/items/42"),
        ],
    );
    // `/svc{i}/*/items*`: a `*` in the middle as well.
    lookup_wildcards(
        c,
        "lookup_1000_mid_wildcards",
        "/svc{i}/*/items*",
        [
            ("first_pattern", "/svc0000/v2/items/42"),
            ("last_pattern", "/svc0999/v2/items/42"),
            ("exact_among_10000", "/exact04711"),
            ("no_pattern_key_only", "/svc0999/v2/orders/42"),
        ],
    );
}

fn lookup_wildcards(c: &mut Criterion, group: &str, pattern: &str, cases: [(&str, &str); 4]) {
    let rules = wildcard_rule_set(pattern);
    let mut g = c.benchmark_group(group);
    for (name, value) in cases {
        let entries = [Entry { key: "path", value }];
        assert!(rules.lookup("wild", &entries).is_some(), "{name}");
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    rules
                        .lookup(black_box("wild"), black_box(&entries))
                        .is_some(),
                )
            })
        });
    }
    g.finish();
}

fn bench_counter_key(c: &mut Criterion) {
    let hasher = KeyHasher::from_secret(b"bench");
    let one = [Entry {
        key: "client_id",
        value: "client-4711",
    }];
    let two = [
        Entry {
            key: "header_match",
            value: "anonymous",
        },
        Entry {
            key: "remote_address",
            value: "203.0.113.7",
        },
    ];
    let mut g = c.benchmark_group("counter_key");
    for (name, entries) in [("1_entry", &one[..]), ("2_entries", &two[..])] {
        g.bench_function(name, |b| {
            b.iter(|| {
                hasher.counter_key(
                    black_box("bench"),
                    black_box(entries),
                    &[],
                    Algorithm::SlidingWindow,
                    60,
                )
            })
        });
    }
    g.finish();
}

fn bench_window(c: &mut Criterion) {
    let mut g = c.benchmark_group("window_check");
    let now = 1_800_000_000_000_000u64 + 12_345_678;
    for algorithm in Algorithm::ALL {
        let spec = CounterSpec {
            algorithm,
            limit: 1_000,
            period_us: 60_000_000,
            burst: 100,
            calendar: None,
        };
        // A counter part-way through its window (or bucket), as most are.
        let state = match algorithm {
            Algorithm::Gcra => CounterState::Gcra {
                tat_us: now + 600_000,
            },
            _ => CounterState::Window {
                window: now / 60_000_000,
                count: 300,
                previous: 800,
            },
        };
        g.bench_function(BenchmarkId::new("admit", algorithm.as_str()), |b| {
            b.iter(|| check(black_box(&spec), black_box(Some(state)), black_box(now), 1))
        });
    }
    g.finish();
}

/// A tenant's monthly quota is a calendar window in its time zone: what
/// finding the window costs on each metered decision (the in-process store
/// needs the window; the Redis store sends the bounds of three).
fn bench_calendar(c: &mut Criterion) {
    use sluice::limiter::{Calendar, CalendarUnit};
    let mut g = c.benchmark_group("calendar_month");
    let now = 1_800_000_000_000_000u64 + 12_345_678;
    for zone in ["UTC", "Asia/Kolkata", "America/New_York"] {
        let calendar = Calendar {
            unit: CalendarUnit::Month,
            time_zone: zone.parse().unwrap(),
        };
        g.bench_function(BenchmarkId::new("window_at", zone), |b| {
            b.iter(|| black_box(calendar).window_at(black_box(now)))
        });
        g.bench_function(BenchmarkId::new("bounds_around", zone), |b| {
            b.iter(|| black_box(calendar).bounds_around(black_box(now)))
        });
    }
    g.finish();
}

fn bench_plan_decide(c: &mut Criterion) {
    let rules = rule_set();
    let hasher = KeyHasher::from_secret(b"bench");
    let options = PlanOptions::default();
    let mut g = c.benchmark_group("plan_decide");
    for n in [1, 5] {
        let req = request(n);
        g.bench_function(BenchmarkId::new("descriptors", n), |b| {
            b.iter(|| {
                let plan = limiter::plan(black_box(&req), &rules, &hasher, options);
                // What a store answers for counters well under their limits.
                let outcomes: Vec<_> = plan
                    .ops
                    .iter()
                    .map(|op| check(&op.spec, None, 1_800_000_000_000_000, op.hits).outcome)
                    .collect();
                black_box(limiter::decide(&plan, &outcomes, options).overall)
            })
        });
    }
    g.finish();
}

fn bench_should_rate_limit(c: &mut Criterion) {
    // The Prometheus recorder `sluice serve` installs, so metrics cost what
    // they cost in production (with no recorder, they are no-ops).
    let metrics = sluice::telemetry::prometheus();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // And its upkeep, as `sluice serve` runs it: memory stays bounded.
    let _upkeep = runtime.spawn(sluice::telemetry::upkeep(metrics));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store: Arc<dyn CounterStore> = Arc::new(MemoryStore::new(1_000_000, clock.clone()));
    let limiter = RateLimiter::new(
        Arc::new(ArcSwap::from_pointee(rule_set())),
        store,
        KeyHasher::from_secret(b"bench"),
        LimiterSettings {
            plan: PlanOptions::default(),
            failure_mode: FailureMode::Allow,
            store_timeout: Duration::from_millis(50),
            rate_limit_headers: false,
            dynamic_metadata: false,
        },
        clock,
    );
    let mut g = c.benchmark_group("should_rate_limit");
    for n in [1, 5] {
        let req = request(n);
        g.bench_function(BenchmarkId::new("memory_store", n), |b| {
            b.to_async(&runtime).iter(|| async {
                let verdict = limiter.should_rate_limit(black_box(&req)).await;
                black_box(verdict.map(|v| v.overall).ok())
            })
        });
    }
    g.finish();

    // The store alone: one counter op, as the limiter hands it over.
    let manual = Arc::new(ManualClock::new(1_800_000_000_000_000));
    let store = MemoryStore::new(1_000_000, manual);
    let rules = rule_set();
    let plan = limiter::plan(
        &request(1),
        &rules,
        &KeyHasher::from_secret(b"bench"),
        PlanOptions::default(),
    );
    c.bench_function("memory_store/apply_one", |b| {
        b.iter(|| store.apply_one(black_box(&plan.ops[0]), 1_800_000_000_000_000))
    });
}

criterion_group!(
    benches,
    bench_lookup,
    bench_lookup_wildcards,
    bench_counter_key,
    bench_window,
    bench_calendar,
    bench_plan_decide,
    bench_should_rate_limit
);
criterion_main!(benches);
