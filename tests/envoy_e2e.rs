//! End to end: a real Envoy 1.40, configured with `examples/envoy/envoy.yaml`
//! (ports rendered free), in front of a real HTTP backend started here, asking
//! sluice (in-process, with the example rules) before each request.
//!
//! Needs `envoy` (`bash .ci/install-tools.sh`); fails without it.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice::clock::ManualClock;
use sluice::rules::yaml;
use support::http::{self, HttpResponse};
use support::{repo, tool, wait_until, ChildGuard, TestConfig, TestServer};

/// 20 s into a minute: every minute window in this test resets in 40 s.
const START_US: u64 = 1_700_000_000_000_000;
const RESET: &str = "40";
/// The weather rules' limit per client and per address.
const LIMIT: usize = 60;

/// A backend that counts the requests that reach it.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn start_backend() -> Backend {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            ([("x-backend", "weather")], "sunny\n")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Backend { addr, hits }
}

async fn start_sluice() -> TestServer {
    let rules = yaml::load_path(&repo().join("examples/rules"))
        .unwrap_or_else(|e| panic!("examples/rules do not load:\n{e}"));
    let mut config = TestConfig::new(rules);
    config.clock = Arc::new(ManualClock::new(START_US));
    TestServer::start(config).await
}

/// The example config with this test's ports: each of the example's port
/// numbers must appear exactly once, so the example cannot drift from what
/// is tested here.
fn render_config(listener: u16, admin: u16, sluice: u16, backend: u16) -> String {
    let path = repo().join("examples/envoy/envoy.yaml");
    let mut text = std::fs::read_to_string(&path).expect("reading examples/envoy/envoy.yaml");
    let mut replace = |from: &str, to: String| {
        assert_eq!(
            text.matches(from).count(),
            1,
            "examples/envoy/envoy.yaml should contain `{from}` exactly once"
        );
        text = text.replace(from, &to);
    };
    replace("port_value: 10000", format!("port_value: {listener}"));
    replace("port_value: 9901", format!("port_value: {admin}"));
    replace("port_value: 8081", format!("port_value: {sluice}"));
    replace("port_value: 8000", format!("port_value: {backend}"));
    // The example waits 0.25 s for sluice; a test machine busy compiling
    // may be slower than that, and a timeout would let traffic through.
    replace("timeout: 0.25s", "timeout: 5s".into());
    text
}

struct Envoy {
    listener: SocketAddr,
    log: PathBuf,
    // Dropped last: kills Envoy, then removes its files.
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy from this (the test's) thread, which lives as long as
    /// the test: Envoy is stopped when the thread that started it exits.
    async fn start(sluice: SocketAddr, backend: SocketAddr) -> Envoy {
        let envoy = tool("envoy");
        let dir = tempfile::tempdir().unwrap();
        let (listener, admin) = (support::free_port(), support::free_port());
        let config = dir.path().join("envoy.yaml");
        std::fs::write(
            &config,
            render_config(listener, admin, sluice.port(), backend.port()),
        )
        .unwrap();
        let log = dir.path().join("envoy.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let process = ChildGuard::spawn(
            "envoy",
            std::process::Command::new(envoy)
                .arg("-c")
                .arg(&config)
                .args(["--log-level", "warn", "--disable-hot-restart"])
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file),
        );
        let mut envoy = Envoy {
            listener: SocketAddr::from(([127, 0, 0, 1], listener)),
            log,
            process,
            _dir: dir,
        };
        let admin = SocketAddr::from(([127, 0, 0, 1], admin));
        let ready = wait_until(Duration::from_secs(30), || async {
            matches!(http::get(admin, "/ready").await, Ok(r) if r.status == 200)
        })
        .await;
        envoy.process.assert_running(&envoy.log_text());
        assert!(
            ready,
            "Envoy was not ready within 30 s:\n{}",
            envoy.log_text()
        );
        envoy
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, headers: &[(&str, &str)]) -> HttpResponse {
        http::request(self.listener, "GET", "/forecast", headers, None)
            .await
            .unwrap_or_else(|e| panic!("request through Envoy failed: {e}\n{}", self.log_text()))
    }
}

fn header<'a>(r: &'a HttpResponse, name: &str) -> &'a str {
    r.header(name)
        .unwrap_or_else(|| panic!("no {name} header: {r:?}"))
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
    let backend = start_backend().await;
    let sluice = start_sluice().await;
    let envoy = Envoy::start(sluice.grpc_addr, backend.addr).await;

    exhaust(&envoy, &[("x-client-id", "alice")], "weather_per_client").await;
    assert_eq!(
        backend.hits.load(Ordering::SeqCst),
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
    let backend = start_backend().await;
    let sluice = start_sluice().await;
    let envoy = Envoy::start(sluice.grpc_addr, backend.addr).await;

    exhaust(&envoy, &[], "weather_per_ip").await;
    assert_eq!(backend.hits.load(Ordering::SeqCst), LIMIT);
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
