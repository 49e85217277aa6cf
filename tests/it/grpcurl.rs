//! grpcurl (v1.8.6, which speaks reflection v1alpha) against the real server,
//! with no proto files: everything it knows comes from server reflection.
//!
//! Needs `grpcurl` (`bash .ci/install-tools.sh`); fails without it.

use crate::support;

use std::sync::Arc;

use serde_json::{json, Value};
use sluice::clock::ManualClock;
use support::{rules_from_yaml, tool, TestConfig, TestServer};

const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limit: {name: per_client, unit: minute, requests_per_unit: 3}
"#;
/// 20 s into a minute: minute windows reset in 40 s.
const START_US: u64 = 1_700_000_000_000_000;
const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

async fn start() -> TestServer {
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.clock = Arc::new(ManualClock::new(START_US));
    TestServer::start(config).await
}

struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `grpcurl -plaintext FLAGS ADDR ARGS` against the server
/// (asynchronously: the server answers on this test's runtime).
async fn grpcurl(server: &TestServer, flags: &[&str], args: &[&str]) -> Output {
    let out = tokio::process::Command::new(tool("grpcurl"))
        .args(["-plaintext", "-max-time", "20"])
        .args(flags)
        .arg(server.grpc_addr.to_string())
        .args(args)
        .output()
        .await
        .expect("running grpcurl");
    Output {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(out: &Output) -> &str {
    assert!(out.success, "grpcurl failed:\n{}{}", out.stdout, out.stderr);
    &out.stdout
}

#[tokio::test]
async fn lists_and_describes_the_service_through_reflection() {
    let server = start().await;
    let list = grpcurl(&server, &[], &["list"]).await;
    let services: Vec<&str> = ok(&list).lines().collect();
    for service in [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.contains(&service),
            "`list` lacks {service}: {services:?}"
        );
    }

    let methods = grpcurl(&server, &[], &["list", SERVICE]).await;
    assert_eq!(ok(&methods).trim(), format!("{SERVICE}.ShouldRateLimit"));

    let describe = grpcurl(&server, &[], &["describe", SERVICE]).await;
    let text = ok(&describe);
    assert!(
        text.contains(
            "rpc ShouldRateLimit ( .envoy.service.ratelimit.v3.RateLimitRequest ) returns ( .envoy.service.ratelimit.v3.RateLimitResponse );"
        ),
        "{text}"
    );

    // The messages resolve too, with every current field.
    let describe = grpcurl(
        &server,
        &[],
        &["describe", "envoy.service.ratelimit.v3.RateLimitRequest"],
    )
    .await;
    let text = ok(&describe);
    for field in [
        "string domain = 1",
        "descriptors = 2",
        "uint32 hits_addend = 3",
    ] {
        assert!(
            text.contains(field),
            "RateLimitRequest lacks `{field}`:\n{text}"
        );
    }
    let descriptor = "envoy.extensions.common.ratelimit.v3.RateLimitDescriptor";
    let describe = grpcurl(&server, &[], &["describe", descriptor]).await;
    let text = ok(&describe);
    for field in [
        "entries = 1",
        "limit = 2",
        ".google.protobuf.UInt64Value hits_addend = 3",
    ] {
        assert!(
            text.contains(field),
            "RateLimitDescriptor lacks `{field}`:\n{text}"
        );
    }
}

#[tokio::test]
async fn should_rate_limit_answers_from_json() {
    let server = start().await;
    let body = json!({
        "domain": "api",
        "descriptors": [{"entries": [{"key": "client", "value": "grpcurl-1"}]}],
    })
    .to_string();
    let method = format!("{SERVICE}/ShouldRateLimit");

    for remaining in [2, 1] {
        let out = grpcurl(&server, &["-d", &body], &[&method]).await;
        let answer: Value = serde_json::from_str(ok(&out)).expect("grpcurl prints JSON");
        assert_eq!(answer["overallCode"], "OK", "{answer}");
        let status = &answer["statuses"][0];
        assert_eq!(status["code"], "OK");
        assert_eq!(status["currentLimit"]["requestsPerUnit"], 3);
        assert_eq!(status["currentLimit"]["unit"], "MINUTE");
        assert_eq!(status["currentLimit"]["name"], "per_client");
        assert_eq!(status["limitRemaining"], remaining);
        assert_eq!(status["durationUntilReset"], "40s");
    }
    ok(&grpcurl(&server, &["-d", &body], &[&method]).await);
    let out = grpcurl(&server, &["-d", &body], &[&method]).await;
    let answer: Value = serde_json::from_str(ok(&out)).unwrap();
    assert_eq!(answer["overallCode"], "OVER_LIMIT", "{answer}");
    assert_eq!(answer["statuses"][0]["code"], "OVER_LIMIT");

    // Bad input is INVALID_ARGUMENT with the field named.
    let bad = json!({"domain": "", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]});
    let out = grpcurl(&server, &["-d", &bad.to_string()], &[&method]).await;
    assert!(!out.success, "an empty domain was answered: {}", out.stdout);
    assert!(
        out.stderr.contains("InvalidArgument") && out.stderr.contains("domain"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn health_check_through_grpcurl() {
    let server = start().await;
    let method = "grpc.health.v1.Health/Check";
    for service in ["", SERVICE] {
        let body = json!({ "service": service }).to_string();
        let out = grpcurl(&server, &["-d", &body], &[method]).await;
        let answer: Value = serde_json::from_str(ok(&out)).expect("grpcurl prints JSON");
        assert_eq!(answer["status"], "SERVING", "service '{service}': {answer}");
    }
    let out = grpcurl(&server, &[], &[method]).await;
    let answer: Value = serde_json::from_str(ok(&out)).unwrap();
    assert_eq!(answer["status"], "SERVING");

    let body = json!({ "service": "no.such.Service" }).to_string();
    let out = grpcurl(&server, &["-d", &body], &[method]).await;
    assert!(!out.success);
    assert!(out.stderr.contains("NotFound"), "{}", out.stderr);
}

#[tokio::test]
async fn a_request_over_the_size_bound_is_resource_exhausted() {
    use sluice::limiter::bounds::MAX_REQUEST_BYTES;
    use tokio::io::AsyncWriteExt as _;

    let server = start().await;
    let body = json!({
        "domain": "api",
        "descriptors": [{"entries": [{"key": "client", "value": "v".repeat(MAX_REQUEST_BYTES)}]}],
    })
    .to_string();
    // Through stdin (`-d @`): the body is larger than an argument may be.
    let mut child = tokio::process::Command::new(tool("grpcurl"))
        .args(["-plaintext", "-max-time", "20", "-d", "@"])
        .arg(server.grpc_addr.to_string())
        .arg(format!("{SERVICE}/ShouldRateLimit"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running grpcurl");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(body.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("ResourceExhausted") && stderr.contains(&MAX_REQUEST_BYTES.to_string()),
        "{stderr}"
    );
}

const EXPLAIN_SERVICE: &str = "sluice.v1.Sluice";

#[tokio::test]
async fn lists_describes_and_calls_explain_through_reflection() {
    let server = start().await;
    let list = grpcurl(&server, &[], &["list"]).await;
    let services: Vec<&str> = ok(&list).lines().collect();
    assert!(
        services.contains(&EXPLAIN_SERVICE),
        "`list` lacks {EXPLAIN_SERVICE}: {services:?}"
    );
    let methods = grpcurl(&server, &[], &["list", EXPLAIN_SERVICE]).await;
    assert_eq!(ok(&methods).trim(), format!("{EXPLAIN_SERVICE}.Explain"));
    let describe = grpcurl(&server, &[], &["describe", EXPLAIN_SERVICE]).await;
    let text = ok(&describe);
    assert!(
        text.contains(
            "rpc Explain ( .envoy.service.ratelimit.v3.RateLimitRequest ) returns ( .sluice.v1.ExplainResponse );"
        ),
        "{text}"
    );
    let describe = grpcurl(
        &server,
        &[],
        &["describe", "sluice.v1.DescriptorExplanation"],
    )
    .await;
    let text = ok(&describe);
    for field in [
        "string summary = 1",
        "repeated .sluice.v1.Step steps = 4",
        "repeated .sluice.v1.Counter counters = 10",
    ] {
        assert!(
            text.contains(field),
            "DescriptorExplanation lacks `{field}`:\n{text}"
        );
    }

    let body = json!({
        "domain": "api",
        "descriptors": [{"entries": [{"key": "client", "value": "grpcurl-x"}]}],
    })
    .to_string();
    let method = format!("{EXPLAIN_SERVICE}/Explain");
    for _ in 0..2 {
        let out = grpcurl(&server, &["-d", &body], &[&method]).await;
        let answer: Value = serde_json::from_str(ok(&out)).expect("grpcurl prints JSON");
        assert_eq!(answer["overallCode"], "OK", "{answer}");
        let d = &answer["descriptors"][0];
        assert_eq!(d["reason"], "LIMITED", "{answer}");
        assert_eq!(d["summary"], "rule api.client applies: 3 per minute");
        assert_eq!(d["steps"][0]["matched"]["kind"], "KEY_ONLY");
        // Nothing counted: grpcurl leaves zero values out.
        assert!(d["counters"][0].get("used").is_none(), "{answer}");
        assert_eq!(d["counters"][0]["remaining"], "3");
        assert_eq!(d["counters"][0]["reset"], "40s");
    }
}
