//! End to end: a real Envoy 1.40, configured with `examples/envoy/envoy.yaml`
//! (ports rendered free), in front of a real HTTP backend started here, asking
//! sluice (in-process, with the example rules) before each request.
//!
//! Needs `envoy` (`bash .ci/install-tools.sh`); fails without it.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use sluice::clock::ManualClock;
use sluice::rules::yaml;
use support::envoy::{header, Backend, Envoy};
use support::http::{self, HttpResponse};
use support::{repo, tool, TestConfig, TestServer};

/// 20 s into a minute: every minute window in this test resets in 40 s.
const START_US: u64 = 1_700_000_000_000_000;
const RESET: &str = "40";
/// The weather rules' limit per client and per address.
const LIMIT: usize = 60;

async fn start_sluice() -> TestServer {
    let rules = yaml::load_path(&repo().join("examples/rules"))
        .unwrap_or_else(|e| panic!("examples/rules do not load:\n{e}"));
    let mut config = TestConfig::new(rules);
    config.clock = Arc::new(ManualClock::new(START_US));
    TestServer::start(config).await
}

async fn start_envoy(sluice: SocketAddr, backend: SocketAddr) -> Envoy {
    Envoy::start(sluice, backend, |config| config).await
}

/// `x-ratelimit-limit: 60, 60;w=60;name="..."` (draft 03), on a request
/// that passed: reset when the window ends.
fn assert_limit_header(r: &HttpResponse, rule: &str) {
    assert_eq!(
        header(r, "x-ratelimit-limit"),
        format!("{LIMIT}, {LIMIT};w=60;name=\"{rule}\""),
    );
    assert_eq!(header(r, "x-ratelimit-reset"), RESET);
}

/// Sends the limit's worth of requests (all pass, with headers counting
/// down), then one more (429).
async fn exhaust(envoy: &Envoy, headers: &[(&str, &str)], rule: &str) -> HttpResponse {
    for i in 0..LIMIT {
        let r = envoy.get(headers).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}\n{}", envoy.log_text());
        assert_eq!(r.text(), "sunny\n");
        assert_eq!(r.header("x-backend"), Some("weather"));
        assert_limit_header(&r, rule);
        assert_eq!(
            header(&r, "x-ratelimit-remaining"),
            (LIMIT - 1 - i).to_string()
        );
    }
    let r = envoy.get(headers).await;
    assert_eq!(r.status, 429, "request {}: {r:?}", LIMIT + 1);
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(
        header(&r, "x-ratelimit-limit"),
        format!("{LIMIT}, {LIMIT};w=60;name=\"{rule}\""),
    );
    assert_eq!(header(&r, "x-ratelimit-remaining"), "0");
    // When the same request would pass: not before this window ends (the
    // sliding window's previous count then fades).
    let reset: u64 = header(&r, "x-ratelimit-reset")
        .parse()
        .expect("a number of seconds");
    assert!((40..=100).contains(&reset), "x-ratelimit-reset {reset}");
    r
}

#[tokio::test]
async fn by_client_id_then_429_and_traffic_passes_when_sluice_is_down() {
    let backend = Backend::start().await;
    let sluice = start_sluice().await;
    let envoy = start_envoy(sluice.grpc_addr, backend.addr).await;

    exhaust(&envoy, &[("x-client-id", "alice")], "weather_per_client").await;
    assert_eq!(
        backend.hits(),
        LIMIT,
        "a denied request reached the backend"
    );
    // Other clients, and the address alice calls from, are untouched.
    let r = envoy.get(&[("x-client-id", "bob")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "x-ratelimit-remaining"), (LIMIT - 1).to_string());
    let r = envoy.get(&[]).await;
    assert_eq!(r.status, 200);
    assert_limit_header(&r, "weather_per_ip");

    let metrics = http::get(sluice.http_addr, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(
            r#"sluice_rule_hits_total{domain="weather",rule="weather.client_id",code="OVER_LIMIT"}"#
        ),
        "sluice did not count Envoy's client_id descriptor:\n{metrics}"
    );

    // sluice stops: failure_mode_deny: false lets even alice through,
    // without limit headers (there is no answer to build them from).
    sluice.stop().await.expect("sluice stopped cleanly");
    for _ in 0..3 {
        let r = envoy.get(&[("x-client-id", "alice")]).await;
        assert_eq!(
            r.status,
            200,
            "with sluice down: {r:?}\n{}",
            envoy.log_text()
        );
        assert_eq!(r.text(), "sunny\n");
        assert_eq!(r.header("x-ratelimit-limit"), None);
    }
}

#[tokio::test]
async fn without_a_client_id_the_remote_address_is_limited() {
    let backend = Backend::start().await;
    let sluice = start_sluice().await;
    let envoy = start_envoy(sluice.grpc_addr, backend.addr).await;

    exhaust(&envoy, &[], "weather_per_ip").await;
    assert_eq!(backend.hits(), LIMIT);
    // Still over for the address; a client id is its own budget.
    let r = envoy.get(&[]).await;
    assert_eq!(r.status, 429);
    let r = envoy.get(&[("x-client-id", "carol")]).await;
    assert_eq!(r.status, 200);
    assert_limit_header(&r, "weather_per_client");

    let metrics = http::get(sluice.http_addr, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics
            .contains(r#"rule="weather.header_match_anonymous.remote_address",code="OVER_LIMIT""#),
        "sluice did not count Envoy's remote_address descriptor:\n{metrics}"
    );
    assert!(
        !metrics.contains("127.0.0.1\""),
        "/metrics shows a client address"
    );
}

#[test]
fn the_example_config_validates() {
    let envoy = tool("envoy");
    let example: &Path = &repo().join("examples/envoy/envoy.yaml");
    let out = std::process::Command::new(envoy)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(example)
        .output()
        .expect("running envoy --mode validate");
    assert!(
        out.status.success(),
        "envoy --mode validate rejected the example:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// === sluice's window extensions, as Envoy's headers show them ===

/// Envoy sends ("client_id", <x-client-id>): one rule per test client.
const WINDOW_RULES: &str = r#"
domain: weather
descriptors:
  - key: client_id
    value: every-five-minutes
    rate_limit: {name: per_5m, unit: minute, unit_multiplier: 5, requests_per_unit: 3, algorithm: fixed_window}
  - key: client_id
    value: burst-and-daily
    rate_limits:
      - {name: burst, unit: second, requests_per_unit: 2, algorithm: fixed_window}
      - {name: daily, unit: day, requests_per_unit: 5, algorithm: fixed_window}
"#;

async fn start_window_sluice() -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(START_US));
    let mut config = TestConfig::new(support::rules_from_yaml(&[WINDOW_RULES]));
    config.clock = clock.clone();
    (TestServer::start(config).await, clock)
}

/// (status, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset).
fn limit_headers(r: &HttpResponse) -> (u16, String, String, String) {
    (
        r.status,
        header(r, "x-ratelimit-limit").to_owned(),
        header(r, "x-ratelimit-remaining").to_owned(),
        header(r, "x-ratelimit-reset").to_owned(),
    )
}

fn expect(status: u16, limit: &str, remaining: u32, reset: u64) -> (u16, String, String, String) {
    (
        status,
        limit.to_owned(),
        remaining.to_string(),
        reset.to_string(),
    )
}

/// A 5-minute window: `x-ratelimit-reset` counts to its end (100 s from 200 s
/// into it), not a minute's (40 s). No `RateLimit.Unit` is 5 minutes long,
/// so sluice reports none and Envoy lists no `w=` rather than a wrong one.
#[tokio::test]
async fn a_five_minute_window_in_envoys_headers() {
    let backend = Backend::start().await;
    let (sluice, _clock) = start_window_sluice().await;
    let envoy = start_envoy(sluice.grpc_addr, backend.addr).await;
    let client = [("x-client-id", "every-five-minutes")];
    for remaining in [2, 1, 0] {
        let r = envoy.get(&client).await;
        assert_eq!(
            limit_headers(&r),
            expect(200, "3", remaining, 100),
            "{r:?}\n{}",
            envoy.log_text()
        );
    }
    let r = envoy.get(&client).await;
    assert_eq!(limit_headers(&r), expect(429, "3", 0, 100));
    assert_eq!(backend.hits(), 3);
}

/// A burst and a daily limit on one descriptor: the headers follow the
/// most constrained, the burst while it has fewer left, then the day.
#[tokio::test]
async fn the_most_constrained_of_several_limits_in_envoys_headers() {
    let backend = Backend::start().await;
    let (sluice, clock) = start_window_sluice().await;
    let envoy = start_envoy(sluice.grpc_addr, backend.addr).await;
    let client = [("x-client-id", "burst-and-daily")];
    let burst = "2, 2;w=1;name=\"burst\"";
    let daily = "5, 5;w=86400;name=\"daily\"";
    // START_US is on a whole second, 80 000 s into a UTC day.
    assert_eq!(
        limit_headers(&envoy.get(&client).await),
        expect(200, burst, 1, 1)
    );
    assert_eq!(
        limit_headers(&envoy.get(&client).await),
        expect(200, burst, 0, 1)
    );
    assert_eq!(
        limit_headers(&envoy.get(&client).await),
        expect(429, burst, 0, 1)
    );
    clock.advance(1_000_000);
    assert_eq!(
        limit_headers(&envoy.get(&client).await),
        expect(200, burst, 1, 1)
    );
    assert_eq!(
        limit_headers(&envoy.get(&client).await),
        expect(200, burst, 0, 1)
    );
    clock.advance(1_000_000);
    let day_left = 86_400 - 80_000 - 2;
    assert_eq!(
        limit_headers(&envoy.get(&client).await),
        expect(200, daily, 0, day_left)
    );
    assert_eq!(
        limit_headers(&envoy.get(&client).await),
        expect(429, daily, 0, day_left)
    );
    assert_eq!(backend.hits(), 5, "the daily limit admitted five");
}
