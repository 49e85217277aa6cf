//! `POST /json` (and the other HTTP endpoints) through the real server: the
//! proto3 JSON form of a `RateLimitRequest` in, the JSON `RateLimitResponse`
//! out, 200 when OK and 429 when over the limit. The response shape is what
//! the Kong plugin in `examples/kong` reads.

use crate::support;

use std::sync::Arc;

use serde_json::{json, Value};
use sluice::clock::ManualClock;
use support::http::{self, HttpResponse};
use support::{rules_from_yaml, TestConfig, TestServer};

const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limit: {name: per_client, unit: minute, requests_per_unit: 3}
"#;

/// 20 s into a minute: minute windows reset in 40 s.
const START_US: u64 = 1_700_000_000_000_000;

async fn start() -> TestServer {
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.clock = Arc::new(ManualClock::new(START_US));
    TestServer::start(config).await
}

async fn post(server: &TestServer, body: &str) -> HttpResponse {
    http::post_json(server.http_addr, "/json", body)
        .await
        .expect("POST /json")
}

/// What Kong's plugin sends: camelCase, one descriptor.
fn kong_request(value: &str) -> String {
    json!({
        "domain": "api",
        "descriptors": [{"entries": [{"key": "client", "value": value}]}],
        "hitsAddend": 1,
    })
    .to_string()
}

fn is_proto_duration(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.strip_suffix('s')
            .is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok_and(|n| n >= 0.0))
    })
}

#[tokio::test]
async fn ok_is_200_and_over_limit_is_429_in_the_shape_kong_reads() {
    let server = start().await;
    for remaining in [2, 1, 0] {
        let r = post(&server, &kong_request("k-1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{r:?}"
        );
        let body = r.json();
        assert_eq!(body["overallCode"], "OK");
        let status = &body["statuses"][0];
        assert_eq!(status["code"], "OK");
        assert_eq!(status["currentLimit"]["requestsPerUnit"], 3);
        assert_eq!(status["currentLimit"]["unit"], "MINUTE");
        assert_eq!(status["currentLimit"]["name"], "per_client");
        assert_eq!(status["limitRemaining"], remaining);
        assert_eq!(status["durationUntilReset"], "40s");
    }

    let r = post(&server, &kong_request("k-1")).await;
    assert_eq!(r.status, 429, "{}", r.text());
    let body = r.json();
    assert_eq!(body["overallCode"], "OVER_LIMIT");
    let status = &body["statuses"][0];
    assert_eq!(status["code"], "OVER_LIMIT");
    assert_eq!(status["currentLimit"]["requestsPerUnit"], 3);
    assert!(
        status["limitRemaining"].as_u64().unwrap_or(0) == 0,
        "limitRemaining is 0 or left out: {body}"
    );
    assert!(
        is_proto_duration(&status["durationUntilReset"]),
        "durationUntilReset is a proto3 JSON duration (\"Ns\"): {body}"
    );
    // No proto field names in the answer: Kong reads the camelCase ones.
    let text = r.text();
    for snake in [
        "overall_code",
        "current_limit",
        "limit_remaining",
        "duration_until_reset",
    ] {
        assert!(!text.contains(snake), "{snake} in {text}");
    }
}

#[tokio::test]
async fn proto_field_names_and_string_numbers_are_accepted_too() {
    let server = start().await;
    // snake_case; the descriptor's hits_addend (a string, as proto3 JSON
    // writes 64-bit numbers) wins over the request's; a limit override.
    let body = json!({
        "domain": "api",
        "hits_addend": 2,
        "descriptors": [{
            "entries": [{"key": "client", "value": "s-1"}],
            "hits_addend": "1",
            "limit": {"requests_per_unit": 5, "unit": "MINUTE"},
        }],
    });
    let r = post(&server, &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let status = &r.json()["statuses"][0];
    assert_eq!(status["currentLimit"]["requestsPerUnit"], 5);
    assert_eq!(status["limitRemaining"], 4);

    // camelCase with the unit as its enum number (1 = SECOND) and the
    // request's hitsAddend applying.
    let body = json!({
        "domain": "api",
        "hitsAddend": "2",
        "descriptors": [{
            "entries": [{"key": "client", "value": "s-2"}],
            "limit": {"requestsPerUnit": 10, "unit": 1},
        }],
    });
    let r = post(&server, &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let status = &r.json()["statuses"][0];
    assert_eq!(status["currentLimit"]["unit"], "SECOND");
    assert_eq!(status["limitRemaining"], 8);

    // hitsAddend 0 on the descriptor checks without consuming.
    let check = json!({
        "domain": "api",
        "descriptors": [{"entries": [{"key": "client", "value": "s-3"}], "hitsAddend": 0}],
    });
    for _ in 0..5 {
        let r = post(&server, &check.to_string()).await;
        assert_eq!(r.json()["statuses"][0]["limitRemaining"], 3);
    }
}

#[tokio::test]
async fn an_unknown_domain_is_200_without_a_limit() {
    let server = start().await;
    let body = json!({
        "domain": "elsewhere",
        "descriptors": [{"entries": [{"key": "client", "value": "u-1"}]}],
    });
    for _ in 0..5 {
        let r = post(&server, &body.to_string()).await;
        assert_eq!(r.status, 200);
        let body = r.json();
        assert_eq!(body["overallCode"], "OK");
        assert_eq!(body["statuses"][0]["code"], "OK");
        assert!(body["statuses"][0].get("currentLimit").is_none(), "{body}");
    }
}

#[tokio::test]
async fn bad_requests_are_400_naming_the_field() {
    let server = start().await;
    let entry = json!([{"key": "client", "value": "b-1"}]);
    let cases: Vec<(String, &str)> = vec![
        (json!({"descriptors": [{"entries": entry}]}).to_string(), "domain"),
        (json!({"domain": "api", "descriptors": []}).to_string(), "descriptors"),
        (json!({"domain": "api"}).to_string(), "descriptors"),
        (
            json!({"domain": "api", "descriptors": [{"entries": []}]}).to_string(),
            "descriptors[0].entries",
        ),
        (
            json!({"domain": "api", "descriptors": [{"entries": [{"key": "", "value": "v"}]}]})
                .to_string(),
            "descriptors[0].entries[0].key",
        ),
        (
            json!({"domain": "api", "descriptors": [{"entriez": entry}]}).to_string(),
            "descriptors[0]",
        ),
        (
            json!({"domain": "api", "descriptors": [{"entries": entry, "limit": {"requestsPerUnit": 5, "unit": "FORTNIGHT"}}]})
                .to_string(),
            "descriptors[0].limit.unit",
        ),
        (
            json!({"domain": "api", "hitsAddend": -1, "descriptors": [{"entries": entry}]}).to_string(),
            "hitsAddend",
        ),
        (
            json!({"domain": "api", "descriptors": [{"entries": entry, "hits_addend": "many"}]})
                .to_string(),
            "descriptors[0].hits_addend",
        ),
    ];
    for (body, field) in cases {
        let r = post(&server, &body).await;
        assert_eq!(r.status, 400, "{body} -> {}", r.text());
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.starts_with(field),
            "the error for {body} does not name `{field}`: {error}"
        );
    }
    // The unknown field is named as well as where it was.
    let r = post(
        &server,
        r#"{"domain":"api","descriptors":[{"entriez":[]}]}"#,
    )
    .await;
    assert!(r.text().contains("entriez"), "{}", r.text());

    // Not JSON at all.
    let r = post(&server, "domain=api").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test]
async fn health_readiness_and_metrics_endpoints_answer() {
    let server = start().await;
    let r = http::get(server.http_addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 200);

    let r = http::get(server.http_addr, "/readyz").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    assert_eq!(report["ready"], true);
    assert_eq!(report["draining"], false);
    assert_eq!(report["rules"]["loaded"], true);
    assert_eq!(report["store"], "memory");

    post(&server, &kong_request("m-1")).await;
    let r = http::get(server.http_addr, "/metrics").await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .contains(r#"sluice_request_duration_seconds_bucket{api="json""#),
        "{}",
        r.text()
    );

    let r = http::get(server.http_addr, "/no-such-page").await.unwrap();
    assert_eq!(r.status, 404);
}
