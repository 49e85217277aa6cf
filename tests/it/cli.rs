//! The `sluice` binary: `rules validate`, `check` and `explain` against a
//! running server, `serve` refusing bad configuration, and `serve` starting,
//! answering and stopping on SIGTERM.

use crate::support;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use sluice::clock::ManualClock;
use sluice::proto::rls::rate_limit_response::Code;
use support::{free_port, http, repo, request, rules_from_yaml, SluiceProcess};
use support::{TestConfig, TestServer};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// `sluice ARGS` run to completion, with no `SLUICE_*` variables from the
/// environment the tests run in.
fn sluice(args: &[&str]) -> Output {
    command(args).output().expect("running sluice")
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(SLUICE);
    command.args(args).current_dir(repo());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SLUICE_") {
            command.env_remove(key);
        }
    }
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines(bytes: &[u8]) -> Vec<String> {
    text(bytes).lines().map(str::to_owned).collect()
}

// === rules validate ===

#[test]
fn validate_accepts_the_examples() {
    let out = sluice(&["rules", "validate", "examples/rules"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ok: 6 rules in 2 domains (business, weather)\n"
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));

    let out = sluice(&["rules", "validate", "examples/rules/weather.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ok: 2 rules in 1 domain (weather)\n");
}

#[test]
fn validate_reports_the_broken_example_as_file_path_message() {
    let out = sluice(&["rules", "validate", "examples/broken"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        lines(&out.stderr),
        ["weather.yaml: descriptors[2].descriptors[0]: invalid rate limit unit 'minit'"]
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn validate_reports_every_error_of_every_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "domain: weather
descriptors:
  - key: ok
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: typo
    rate_limit: {unit: minit, requests_per_unit: 5}
  - key: nested
    descriptors:
      - key: missing
        rate_limit: {unit: hour}
  - key: ok
    rate_limit: {unit: second, requests_per_unit: 1}
",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        "domain: other\ndescriptors:\n  - key: x\n    bogus: 1\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("c.yaml"), "domain: third\n").unwrap();
    std::fs::write(dir.path().join("d.yaml"), "domain: third\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not rules").unwrap();

    let out = sluice(&["rules", "validate", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let mut errors = lines(&out.stderr);
    errors.sort();
    assert_eq!(errors.len(), 5, "{errors:#?}");
    assert_eq!(
        errors[..3],
        [
            "a.yaml: descriptors[1]: invalid rate limit unit 'minit'",
            "a.yaml: descriptors[2].descriptors[0]: requests_per_unit is required \
             (without it every request would be blocked)",
            "a.yaml: descriptors[3]: duplicate descriptor composite key 'weather.ok'",
        ]
    );
    assert!(
        errors[3].starts_with("b.yml: descriptors[0]: unknown field `bogus`"),
        "{}",
        errors[3]
    );
    assert_eq!(errors[4], "d.yaml: duplicate domain 'third' in config file");
    assert!(out.stdout.is_empty());

    // A single file is named as given.
    let file = dir.path().join("b.yml");
    let out = sluice(&["rules", "validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let errors = lines(&out.stderr);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with(&format!(
            "{}: descriptors[0]: unknown field `bogus`",
            file.display()
        )),
        "{}",
        errors[0]
    );

    let out = sluice(&["rules", "validate", "/no/such/rules"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(lines(&out.stderr).len(), 1);
    assert!(
        text(&out.stderr).starts_with("/no/such/rules: cannot read:"),
        "{}",
        text(&out.stderr)
    );
}

// === check ===

const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limit: {name: per_client, unit: minute, requests_per_unit: 3}
  - key: tenant
    descriptors:
      - key: user
        rate_limit: {unit: second, requests_per_unit: 1}
"#;
/// 20 s into a minute: minute windows reset in 40 s.
const START_US: u64 = 1_700_000_000_000_000;

/// `sluice check` against `server`, asynchronously (the server answers on
/// this test's runtime).
async fn check(server: &TestServer, args: &[&str]) -> Output {
    let addr = server.grpc_addr.to_string();
    let mut command = tokio::process::Command::from(command(&["check", "--addr", &addr]));
    command.args(args);
    command.output().await.expect("running sluice check")
}

#[tokio::test]
async fn check_prints_the_decision_and_exits_1_when_over_the_limit() {
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.clock = Arc::new(ManualClock::new(START_US));
    let server = TestServer::start(config).await;

    let out = check(&server, &["--domain", "api", "-d", "client=cli-1"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "overall: OK\ndescriptor[0]: OK limit=3/minute name=per_client remaining=2 reset=40.000s\n"
    );

    // --hits 0 only checks.
    let out = check(
        &server,
        &["--domain", "api", "-d", "client=cli-1", "--hits", "0"],
    )
    .await;
    assert!(
        text(&out.stdout).contains("remaining=2"),
        "{}",
        text(&out.stdout)
    );

    let out = check(
        &server,
        &["--domain", "api", "-d", "client=cli-1", "--hits", "2"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("remaining=0"),
        "{}",
        text(&out.stdout)
    );

    let out = check(&server, &["--domain", "api", "-d", "client=cli-1"]).await;
    assert_eq!(out.status.code(), Some(1), "over the limit exits 1");
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("overall: OVER_LIMIT\ndescriptor[0]: OVER_LIMIT limit=3/minute"),
        "{stdout}"
    );

    // Repeated -d entries make one nested descriptor.
    let out = check(
        &server,
        &["--domain", "api", "-d", "tenant=t", "-d", "user=u"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("limit=1/second"),
        "{}",
        text(&out.stdout)
    );

    // A descriptor entry without a key is a usage error.
    let out = check(&server, &["--domain", "api", "-d", "=v"]).await;
    assert_eq!(out.status.code(), Some(2), "a bad -d is a usage error");
}

/// `sluice explain` against `server`.
async fn explain(server: &TestServer, args: &[&str]) -> Output {
    let addr = server.grpc_addr.to_string();
    let mut command = tokio::process::Command::from(command(&["explain", "--addr", &addr]));
    command.args(args);
    command.output().await.expect("running sluice explain")
}

#[tokio::test]
async fn explain_prints_why_and_counts_nothing() {
    const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limit: {name: per_client, unit: minute, requests_per_unit: 3}
  - key: client
    value: vip*
    rate_limit: {name: vip, unit: minute, requests_per_unit: 100}
  - key: tenant
    descriptors:
      - key: user
        rate_limit: {unit: second, requests_per_unit: 1}
"#;
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.clock = Arc::new(ManualClock::new(START_US));
    let server = TestServer::start(config).await;

    for _ in 0..2 {
        let out = explain(&server, &["--domain", "api", "-d", "client=vip-1"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            "overall: OK (would be; nothing was counted)\n\
             descriptor[0]: OK: rule api.client_vip* applies: 100 per minute\n\
             \x20 rules: domain\n\
             \x20 client=vip-1: wildcard vip* (rule api.client_vip*)\n\
             \x20   passed over: key only (rule api.client)\n\
             \x20 counter vip: sliding_window 100 per 60s: used 0, remaining 100, reset in 40s; room for 1 hit\n"
        );
    }

    // Nested: the rule at the first entry is for descriptors that end there.
    let out = explain(
        &server,
        &[
            "--domain", "api", "-d", "tenant=t", "-d", "user=u", "--hits", "2",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("overall: OVER_LIMIT (would be; nothing was counted)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  tenant=t: key only\n  user=u: key only (rule api.tenant.user)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("no room for 2 hits"), "{stdout}");

    let out = explain(&server, &["--domain", "api", "-d", "client=c", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["descriptors"][0]["reason"], "LIMITED");
    assert_eq!(answer["descriptors"][0]["counters"][0]["used"], "0");

    // Explaining counted nothing.
    let out = check(&server, &["--domain", "api", "-d", "client=vip-1"]).await;
    assert!(
        text(&out.stdout).contains("remaining=99"),
        "{}",
        text(&out.stdout)
    );

    let out = explain(&server, &["--domain", "", "-d", "client=c"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("domain: must not be empty"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_without_a_server_fails_on_one_line() {
    let port = free_port().to_string();
    let out = sluice(&[
        "check",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--domain",
        "d",
        "-d",
        "k=v",
        "--timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = lines(&out.stderr);
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert_eq!(
        stderr[0],
        format!("sluice: cannot reach http://127.0.0.1:{port}: Connection refused (os error 111)")
    );
}

// === serve ===

#[test]
fn serve_refuses_bad_configuration_with_one_line() {
    let cases: [(&[&str], &str); 3] = [
        (&["--store", "redis://127.0.0.1:6379"], "--key-secret"),
        (&["--store-timeout", "0s"], "--store-timeout"),
        (&["--rules-poll", "0s"], "--rules-poll"),
    ];
    for (flags, named) in cases {
        let mut args = vec![
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(flags);
        let out = sluice(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flags:?}: {}",
            text(&out.stderr)
        );
        let stderr = lines(&out.stderr);
        assert_eq!(stderr.len(), 1, "{flags:?}: {stderr:?}");
        assert!(
            stderr[0].starts_with("sluice: ") && stderr[0].contains(named),
            "{stderr:?}"
        );
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    }

    // Also from the environment.
    let out = command(&["serve"])
        .env("SLUICE_STORE", "redis://127.0.0.1:6379")
        .env("SLUICE_GRPC_ADDR", "127.0.0.1:0")
        .env("SLUICE_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--key-secret"));

    // Values clap can check are refused by clap, naming the flag.
    let out = sluice(&["serve", "--store", "memcached://x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("'--store <STORE>'"),
        "{}",
        text(&out.stderr)
    );

    // Invalid rules: every error, one per line, and no port bound.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minit, requests_per_unit: 1}\n").unwrap();
    let out = sluice(&[
        "serve",
        "--rules",
        dir.path().to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        lines(&out.stderr),
        [
            "sluice: invalid rules:",
            "bad.yaml: descriptors[0]: invalid rate limit unit 'minit'"
        ]
    );
}

async fn grpc_call(addr: SocketAddr) -> sluice::proto::rls::RateLimitResponse {
    sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(format!(
        "http://{addr}"
    ))
    .await
    .expect("connecting to sluice serve")
    .should_rate_limit(request("weather", &[&[("client_id", "cli-serve")]]))
    .await
    .expect("ShouldRateLimit")
    .into_inner()
}

#[tokio::test]
async fn serve_starts_with_the_examples_answers_and_stops_on_sigterm() {
    let mut sluice = SluiceProcess::start(command(&["serve", "--rules", "examples/rules"])).await;
    let (grpc, http_addr) = (sluice.grpc, sluice.http);

    let r = grpc_call(grpc).await;
    assert_eq!(r.overall_code(), Code::Ok);
    let limit = r.statuses[0]
        .current_limit
        .as_ref()
        .expect("the weather rules apply");
    assert_eq!(
        (limit.requests_per_unit, limit.name.as_str()),
        (60, "weather_per_client")
    );
    assert_eq!(r.statuses[0].limit_remaining, 59);

    let ready = http::get(http_addr, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["rules"]["source"], "file:examples/rules");

    // SIGTERM: drain, then exit 0 within the grace period (10 s by default).
    let pid = sluice.process.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("running kill");
    assert!(killed.success());
    let mut status = None;
    let exited = support::eventually(Duration::from_secs(10) + Duration::from_secs(10), || {
        status = sluice.process.child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(
        exited.is_some(),
        "sluice serve still running 20 s after SIGTERM:\n{}",
        sluice.log_text()
    );
    let status = status.expect("exited");
    assert!(
        status.success(),
        "sluice serve exited with {status}:\n{}",
        sluice.log_text()
    );
    let log = sluice.log_text();
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        !log.contains("cli-serve"),
        "the log shows a descriptor value:\n{log}"
    );
}
