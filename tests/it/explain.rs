//! `sluice.v1.Sluice/Explain` and `POST /explain` through the real server:
//! which rule matched and how, what was passed over, the counters' state,
//! the would-be answer, and that explaining counts nothing, on the
//! in-process store and on Redis.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use sluice::clock::ManualClock;
use sluice::limiter::{CounterOp, Outcome};
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::RateLimitRequest;
use sluice::proto::sluice::v1::candidate::Kind;
use sluice::proto::sluice::v1::descriptor_explanation::Reason;
use sluice::proto::sluice::v1::sluice_client::SluiceClient;
use sluice::proto::sluice::v1::{DescriptorExplanation, ExplainResponse};
use sluice::storage::redis::{RedisOptions, RedisStore, RedisTarget};
use sluice::storage::{CounterStore, StoreError, StoreHealth};
use support::http::post_json;
use support::redis::RedisServer;
use support::{request, rules_from_yaml, TestConfig, TestServer};

const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limit: {name: per_client, unit: minute, requests_per_unit: 3}
  - key: client
    value: vip*
    rate_limit: {name: vip, unit: minute, requests_per_unit: 100}
  - key: client
    value: internal
  - key: general
    rate_limit: {name: general, unit: minute, requests_per_unit: 1}
  - key: specific
    rate_limit:
      name: specific
      unit: minute
      requests_per_unit: 2
      replaces: [{name: general}]
  - key: shadowed
    shadow_mode: true
    rate_limit: {name: shadowed, unit: minute, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true}
"#;
/// 20 s into a minute: minute windows reset in 40 s.
const START_US: u64 = 1_700_000_000_000_000;

fn config() -> TestConfig {
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.clock = Arc::new(ManualClock::new(START_US));
    config
}

async fn explainer(server: &TestServer) -> SluiceClient<tonic::transport::Channel> {
    SluiceClient::connect(server.grpc_url())
        .await
        .expect("connecting to the test server")
}

async fn explain(
    client: &mut SluiceClient<tonic::transport::Channel>,
    request: RateLimitRequest,
) -> ExplainResponse {
    client
        .explain(request)
        .await
        .unwrap_or_else(|s| panic!("Explain failed: {s:?}"))
        .into_inner()
}

fn seconds(d: &Option<pbjson_types::Duration>) -> i64 {
    d.as_ref().map_or(-1, |d| d.seconds)
}

#[tokio::test]
async fn explain_says_which_rule_matched_how_and_what_was_passed_over() {
    let server = TestServer::start(config()).await;
    let mut client = explainer(&server).await;

    let answer = explain(&mut client, request("api", &[&[("client", "vip-1")]])).await;
    assert_eq!(answer.overall_code(), Code::Ok);
    assert!(!answer.global_shadow_mode);
    let [d] = &answer.descriptors[..] else {
        panic!("one descriptor: {answer:?}");
    };
    assert_eq!(d.reason(), Reason::Limited);
    assert_eq!(d.summary, "rule api.client_vip* applies: 100 per minute");
    assert_eq!(d.rules, "domain");
    assert_eq!(d.hits, 1);
    let rule = d.rule.as_ref().expect("the matched rule");
    assert_eq!(
        (rule.path.as_str(), rule.name.as_str()),
        ("api.client_vip*", "vip")
    );
    assert_eq!(rule.limit.as_ref().map(|l| l.requests_per_unit), Some(100));

    let [step] = &d.steps[..] else {
        panic!("one step: {d:?}");
    };
    assert_eq!(
        (step.key.as_str(), step.value.as_str()),
        ("client", "vip-1")
    );
    let matched = step.matched.as_ref().expect("matched");
    assert_eq!(matched.kind(), Kind::Wildcard);
    assert_eq!(matched.pattern, "vip*");
    assert_eq!(matched.rule, "api.client_vip*");
    let [passed] = &step.passed_over[..] else {
        panic!("one entry passed over: {step:?}");
    };
    assert_eq!(
        (passed.kind(), passed.rule.as_str()),
        (Kind::KeyOnly, "api.client")
    );

    let [counter] = &d.counters[..] else {
        panic!("one counter: {d:?}");
    };
    assert_eq!(counter.name, "vip");
    assert_eq!(counter.algorithm, "sliding_window");
    assert_eq!((counter.limit, seconds(&counter.window)), (100, 60));
    assert_eq!((counter.used, counter.remaining), (0, 100));
    assert_eq!(seconds(&counter.reset), 40);
    assert!(counter.admits);

    // What ShouldRateLimit would answer, as it answers it.
    let status = d.status.as_ref().expect("status");
    assert_eq!(status.code(), Code::Ok);
    assert_eq!(status.limit_remaining, 99);
    assert_eq!(seconds(&status.duration_until_reset), 40);
}

#[tokio::test]
async fn explain_counts_nothing_and_reads_the_counters_calls_left() {
    let server = TestServer::start(config()).await;
    let mut client = explainer(&server).await;
    let mut rls = server.client().await;
    let req = request("api", &[&[("client", "c-1")]]);

    for _ in 0..5 {
        let answer = explain(&mut client, req.clone()).await;
        let counter = &answer.descriptors[0].counters[0];
        assert_eq!(
            (counter.used, counter.remaining),
            (0, 3),
            "explaining counted"
        );
    }
    for remaining in [2, 1, 0] {
        let r = rls
            .should_rate_limit(req.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.statuses[0].limit_remaining, remaining);
    }
    let answer = explain(&mut client, req.clone()).await;
    assert_eq!(answer.overall_code(), Code::OverLimit);
    let d = &answer.descriptors[0];
    assert_eq!(d.reason(), Reason::Limited);
    let counter = &d.counters[0];
    assert_eq!(
        (counter.used, counter.remaining, counter.admits),
        (3, 0, false)
    );
    assert_eq!(d.status.as_ref().map(|s| s.code()), Some(Code::OverLimit));

    // A check with 0 hits would be admitted.
    let mut check = req.clone();
    check.descriptors[0].hits_addend = Some(0u64.into());
    let answer = explain(&mut client, check).await;
    assert_eq!(answer.overall_code(), Code::Ok);
    assert_eq!(answer.descriptors[0].hits, 0);
    assert!(answer.descriptors[0].counters[0].admits);
}

fn by_reason(answer: &ExplainResponse) -> Vec<(Reason, &str)> {
    answer
        .descriptors
        .iter()
        .map(|d: &DescriptorExplanation| (d.reason(), d.summary.as_str()))
        .collect()
}

#[tokio::test]
async fn every_reason_a_descriptor_gets_its_answer_for() {
    let server = TestServer::start(config()).await;
    let mut client = explainer(&server).await;
    let mut req = request(
        "api",
        &[
            &[("general", "g")],
            &[("specific", "s")],
            &[("free", "f")],
            &[("client", "internal")],
            &[("path", "/")],
            &[("client", "x"), ("deeper", "y")],
            &[("shadowed", "s")],
            &[("client", "own")],
        ],
    );
    req.descriptors[7].limit = Some(
        sluice::proto::common::rate_limit_descriptor::RateLimitOverride {
            requests_per_unit: 1,
            unit: sluice::proto::envoy::r#type::v3::RateLimitUnit::Second as i32,
        },
    );
    let answer = explain(&mut client, req.clone()).await;
    assert_eq!(
        by_reason(&answer),
        [
            (
                Reason::Replaced,
                "rule api.general matches but is replaced by api.specific: nothing is counted for it"
            ),
            (Reason::Limited, "rule api.specific applies: 2 per minute"),
            (Reason::Unlimited, "rule api.free is unlimited: nothing is counted"),
            (
                Reason::NoLimit,
                "the descriptor ends at an entry without a rate limit: no limit"
            ),
            (Reason::NoMatch, "no rule matches path=/: no limit"),
            (
                Reason::NoMatch,
                "no rule matches deeper=y, entry 2 of 2: no limit"
            ),
            (
                Reason::Limited,
                "rule api.shadowed applies: 1 per minute (shadow mode: reported, never denied)"
            ),
            (
                Reason::Override,
                "the descriptor's own limit replaces the rules"
            ),
        ]
    );
    let replaced = &answer.descriptors[0];
    let by: Vec<&str> = replaced
        .replaced_by
        .iter()
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(by, ["api.specific"]);
    assert!(replaced.counters.is_empty());
    // The key-only entry that would limit `internal` is passed over.
    let whitelisted = &answer.descriptors[3].steps[0];
    assert_eq!(
        whitelisted.matched.as_ref().map(|c| c.kind()),
        Some(Kind::Exact)
    );
    assert_eq!(whitelisted.passed_over[0].rule, "api.client");
    // The walk stops at the entry nothing matches.
    let deeper = &answer.descriptors[5];
    assert_eq!(deeper.steps.len(), 2);
    assert!(deeper.steps[1].matched.is_none());
    // An own limit is counted, under no name.
    assert_eq!(answer.descriptors[7].counters[0].name, "");
    assert!(answer.descriptors[7].rules.is_empty());

    // The shadowed rule over its limit: OK, shadowed.
    let mut rls = server.client().await;
    let shadowed = request("api", &[&[("shadowed", "s")]]);
    rls.should_rate_limit(shadowed.clone()).await.unwrap();
    let answer = explain(&mut client, shadowed).await;
    assert_eq!(answer.overall_code(), Code::Ok);
    assert!(answer.descriptors[0].shadowed);

    let answer = explain(&mut client, request("elsewhere", &[&[("client", "a")]])).await;
    assert_eq!(
        by_reason(&answer),
        [(Reason::UnknownDomain, "the domain has no rules: no limit")]
    );

    let bad = request("", &[&[("client", "a")]]);
    let status = client
        .explain(bad)
        .await
        .expect_err("an empty domain was explained");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("domain"), "{}", status.message());
}

#[tokio::test]
async fn post_explain_answers_the_same_in_proto3_json() {
    let server = TestServer::start(config()).await;
    let body = json!({
        "domain": "api",
        "descriptors": [{"entries": [{"key": "client", "value": "vip-1"}]}],
    })
    .to_string();
    let response = post_json(server.http_addr, "/explain", &body)
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let answer = response.json();
    assert_eq!(answer["overallCode"], "OK");
    let d = &answer["descriptors"][0];
    assert_eq!(d["reason"], "LIMITED");
    assert_eq!(d["rules"], "domain");
    assert_eq!(d["steps"][0]["matched"]["kind"], "WILDCARD");
    assert_eq!(d["steps"][0]["matched"]["pattern"], "vip*");
    assert_eq!(d["steps"][0]["passedOver"][0]["kind"], "KEY_ONLY");
    assert_eq!(d["counters"][0]["reset"], "40s");
    assert_eq!(d["counters"][0]["remaining"], "100", "uint64 as a string");
    assert_eq!(d["status"]["limitRemaining"], 99);

    // The same as gRPC's answer.
    let mut client = explainer(&server).await;
    let grpc = explain(&mut client, request("api", &[&[("client", "vip-1")]])).await;
    assert_eq!(answer, serde_json::to_value(&grpc).unwrap());

    // Over the limit is still 200: an explanation, not a decision.
    let limited = json!({
        "domain": "api",
        "descriptors": [{"entries": [{"key": "general", "value": "g"}], "hitsAddend": "2"}],
    })
    .to_string();
    let response = post_json(server.http_addr, "/explain", &limited)
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["overallCode"], "OVER_LIMIT");

    let bad = json!({"domain": "api", "descriptors": [{"entriez": []}]}).to_string();
    let response = post_json(server.http_addr, "/explain", &bad).await.unwrap();
    assert_eq!(response.status, 400, "{}", response.text());
    let error: Value = response.json();
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("entriez")),
        "{error}"
    );
}

/// A store that is down.
struct DownStore;

#[async_trait]
impl CounterStore for DownStore {
    async fn apply(&self, _ops: &[CounterOp]) -> Result<Vec<Outcome>, StoreError> {
        Err(StoreError::Connection("down for the test".into()))
    }

    fn kind(&self) -> &'static str {
        "down"
    }
}

#[tokio::test]
async fn a_store_failure_is_unavailable_whatever_the_failure_mode() {
    let mut config = config();
    config.store = Some(Arc::new(DownStore));
    let server = TestServer::start(config).await;
    let req = request("api", &[&[("client", "c")]]);

    // The call is answered by the failure mode (allow) ...
    let mut rls = server.client().await;
    let r = rls
        .should_rate_limit(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code(), Code::Ok);
    // ... which explains nothing.
    let status = explainer(&server)
        .await
        .explain(req)
        .await
        .expect_err("explained without a store");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let response = post_json(
        server.http_addr,
        "/explain",
        r#"{"domain":"api","descriptors":[{"entries":[{"key":"client","value":"c"}]}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(response.status, 503, "{}", response.text());

    // A request that needs no counter needs no store.
    let answer = explain(
        &mut explainer(&server).await,
        request("api", &[&[("free", "f")]]),
    )
    .await;
    assert_eq!(answer.descriptors[0].reason(), Reason::Unlimited);
}

#[tokio::test]
async fn explain_reads_redis_counters_without_counting() {
    let redis = RedisServer::start();
    let store = RedisStore::new(
        &RedisTarget::Standalone(redis.url()),
        RedisOptions::new(Duration::from_secs(2)),
    )
    .unwrap();
    let up = support::eventually(Duration::from_secs(10), || {
        store.health() == StoreHealth::Up
    })
    .await
    .is_some();
    assert!(up, "Redis store never came up: {:?}", store.health());
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.store = Some(Arc::new(store));
    let server = TestServer::start(config).await;
    let mut client = explainer(&server).await;
    let mut rls = server.client().await;
    let req = request("api", &[&[("client", "redis-1")], &[("general", "g")]]);

    for _ in 0..3 {
        let answer = explain(&mut client, req.clone()).await;
        let used: Vec<u64> = answer
            .descriptors
            .iter()
            .map(|d| d.counters[0].used)
            .collect();
        assert_eq!(used, [0, 0], "explaining counted");
    }
    let r = rls
        .should_rate_limit(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code(), Code::Ok);
    let answer = explain(&mut client, req.clone()).await;
    let counters: Vec<(u64, u64, bool)> = answer
        .descriptors
        .iter()
        .map(|d| {
            (
                d.counters[0].used,
                d.counters[0].remaining,
                d.counters[0].admits,
            )
        })
        .collect();
    assert_eq!(counters, [(1, 2, true), (1, 0, false)]);
    assert_eq!(answer.overall_code(), Code::OverLimit);
    // The call agrees, and (denied) takes nothing from `client`.
    let r = rls
        .should_rate_limit(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code(), Code::OverLimit);
    let answer = explain(&mut client, req).await;
    assert_eq!(answer.descriptors[0].counters[0].used, 1);
}
