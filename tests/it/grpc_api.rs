//! Envoy's rate-limit API through the real gRPC server, with a tonic client.
//!
//! Each test starts its own sluice on `127.0.0.1:0` with a [`ManualClock`],
//! so windows never roll over mid-test and reset times are exact.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice::clock::ManualClock;
use sluice::grpc::SERVICE_NAME;
use sluice::limiter::{CounterOp, Outcome};
use sluice::proto::common::rate_limit_descriptor::RateLimitOverride;
use sluice::proto::envoy::r#type::v3::RateLimitUnit;
use sluice::proto::rls::rate_limit_response::{rate_limit::Unit, Code, DescriptorStatus};
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use sluice::storage::memory::MemoryStore;
use sluice::storage::{CounterStore, StoreError};
use support::{request, rules_from_yaml, TestConfig, TestServer};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limit: {name: per_client, unit: minute, requests_per_unit: 3}
  - key: bucket
    rate_limit: {name: bucket, unit: hour, requests_per_unit: 10}
  - key: tight
    rate_limit: {name: tight, unit: minute, requests_per_unit: 1}
  - key: wide
    rate_limit: {name: wide, unit: minute, requests_per_unit: 5}
  - key: shadowed
    shadow_mode: true
    rate_limit: {name: shadowed, unit: minute, requests_per_unit: 1}
  - key: internal
    rate_limit: {unlimited: true}
  - key: general
    rate_limit: {name: general, unit: minute, requests_per_unit: 1}
  - key: specific
    rate_limit:
      name: specific
      unit: minute
      requests_per_unit: 2
      replaces:
        - name: general
"#;

/// 2023-11-14T22:13:20Z: 20 s into a minute, 800 s into an hour.
const START_US: u64 = 1_700_000_000_000_000;
const MINUTE_US: u64 = 60_000_000;

fn config() -> (TestConfig, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(START_US));
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.clock = clock.clone();
    (config, clock)
}

async fn start() -> (TestServer, Arc<ManualClock>) {
    let (config, clock) = config();
    (TestServer::start(config).await, clock)
}

type Client = sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient<
    tonic::transport::Channel,
>;

async fn call(client: &mut Client, req: RateLimitRequest) -> RateLimitResponse {
    client
        .should_rate_limit(req)
        .await
        .unwrap_or_else(|s| panic!("ShouldRateLimit failed: {s:?}"))
        .into_inner()
}

/// One descriptor `key=value`.
fn one(key: &str, value: &str) -> RateLimitRequest {
    request("api", &[&[(key, value)]])
}

fn secs(d: &Option<pbjson_types::Duration>) -> f64 {
    let d = d.as_ref().expect("duration_until_reset is set");
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

fn remaining_of(status: &DescriptorStatus) -> u32 {
    assert!(
        status.current_limit.is_some(),
        "status carries no limit: {status:?}"
    );
    status.limit_remaining
}

#[tokio::test]
async fn passes_until_the_limit_then_over_limit_with_limit_details() {
    let (server, clock) = start().await;
    let mut client = server.client().await;
    let until_window_end = (MINUTE_US - START_US % MINUTE_US) as f64 / 1e6;

    for expected_remaining in [2, 1, 0] {
        let r = call(&mut client, one("client", "alice-7f3e")).await;
        assert_eq!(r.overall_code(), Code::Ok, "{r:?}");
        assert_eq!(r.statuses.len(), 1);
        let s = &r.statuses[0];
        assert_eq!(s.code(), Code::Ok);
        let limit = s.current_limit.as_ref().expect("current_limit");
        assert_eq!(limit.requests_per_unit, 3);
        assert_eq!(limit.unit(), Unit::Minute);
        assert_eq!(limit.name, "per_client");
        assert_eq!(s.limit_remaining, expected_remaining);
        assert_eq!(secs(&s.duration_until_reset), until_window_end);
    }

    let r = call(&mut client, one("client", "alice-7f3e")).await;
    assert_eq!(r.overall_code(), Code::OverLimit, "{r:?}");
    let s = &r.statuses[0];
    assert_eq!(s.code(), Code::OverLimit);
    assert_eq!(
        s.current_limit.as_ref().map(|l| l.requests_per_unit),
        Some(3)
    );
    assert_eq!(s.limit_remaining, 0);
    let wait = secs(&s.duration_until_reset);
    assert!(
        wait > 0.0,
        "an over-limit status says how long to wait: {s:?}"
    );

    // Another client has its own counter.
    let r = call(&mut client, one("client", "bob-51c2")).await;
    assert_eq!(r.overall_code(), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 2);

    // duration_until_reset is when the same hit is admitted: not a second
    // before, and from then on.
    let wait_us = (wait * 1e6).round() as u64;
    clock.set(START_US + wait_us - 1_000_000);
    let r = call(&mut client, one("client", "alice-7f3e")).await;
    assert_eq!(
        r.overall_code(),
        Code::OverLimit,
        "admitted 1 s before the reset it announced"
    );
    clock.set(START_US + wait_us);
    let r = call(&mut client, one("client", "alice-7f3e")).await;
    assert_eq!(
        r.overall_code(),
        Code::Ok,
        "still denied at the reset it announced"
    );
}

#[tokio::test]
async fn hits_addend_zero_means_one_descriptor_value_wins_and_zero_only_checks() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    let bucket = |request_hits: u32, descriptor_hits: Option<u64>| {
        let mut r = one("bucket", "b-1");
        r.hits_addend = request_hits;
        r.descriptors[0].hits_addend = descriptor_hits.map(Into::into);
        r
    };

    // Request-level 0 means 1.
    let r = call(&mut client, bucket(0, None)).await;
    assert_eq!(remaining_of(&r.statuses[0]), 9);
    // Request-level 3 counts 3.
    let r = call(&mut client, bucket(3, None)).await;
    assert_eq!(remaining_of(&r.statuses[0]), 6);
    // The descriptor's own hits_addend wins over the request's.
    let r = call(&mut client, bucket(3, Some(2))).await;
    assert_eq!(remaining_of(&r.statuses[0]), 4);
    // Descriptor 0 checks without consuming, however often.
    for _ in 0..5 {
        let r = call(&mut client, bucket(7, Some(0))).await;
        assert_eq!(r.overall_code(), Code::Ok);
        assert_eq!(remaining_of(&r.statuses[0]), 4);
    }
    // More hits than remain: denied, and nothing consumed.
    let r = call(&mut client, bucket(5, None)).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
    let r = call(&mut client, bucket(1, Some(0))).await;
    assert_eq!(remaining_of(&r.statuses[0]), 4);
    // Exactly what remains is admitted.
    let r = call(&mut client, bucket(0, Some(4))).await;
    assert_eq!(r.overall_code(), Code::Ok);
    assert_eq!(remaining_of(&r.statuses[0]), 0);
}

#[tokio::test]
async fn a_limit_override_replaces_the_configured_limit() {
    let (server, clock) = start().await;
    let mut client = server.client().await;
    let with_override = |key: &str| {
        let mut r = one(key, "o-1");
        r.descriptors[0].limit = Some(RateLimitOverride {
            requests_per_unit: 1,
            unit: RateLimitUnit::Second as i32,
        });
        r
    };

    // `client` is configured at 3 a minute; the override says 1 a second.
    let r = call(&mut client, with_override("client")).await;
    assert_eq!(r.overall_code(), Code::Ok);
    let limit = r.statuses[0].current_limit.as_ref().expect("current_limit");
    assert_eq!((limit.requests_per_unit, limit.unit()), (1, Unit::Second));
    let r = call(&mut client, with_override("client")).await;
    assert_eq!(
        r.overall_code(),
        Code::OverLimit,
        "the override's 1/s was not applied"
    );
    clock.advance(2_000_000);
    let r = call(&mut client, with_override("client")).await;
    assert_eq!(
        r.overall_code(),
        Code::Ok,
        "the override's window did not pass"
    );

    // An override applies to a descriptor no rule matches, too.
    let r = call(&mut client, with_override("unconfigured")).await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit),
        Some(1)
    );
    let r = call(&mut client, with_override("unconfigured")).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
}

#[tokio::test]
async fn an_unknown_domain_or_unmatched_descriptor_is_ok_without_a_limit() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    for _ in 0..10 {
        let r = call(
            &mut client,
            request("no-such-domain-x1", &[&[("client", "c")]]),
        )
        .await;
        assert_eq!(r.overall_code(), Code::Ok);
        assert_eq!(r.statuses.len(), 1);
        assert_eq!(r.statuses[0].code(), Code::Ok);
        assert!(r.statuses[0].current_limit.is_none(), "{r:?}");

        let r = call(&mut client, one("no-rule-for-this-key", "v")).await;
        assert_eq!(r.overall_code(), Code::Ok);
        assert!(r.statuses[0].current_limit.is_none(), "{r:?}");
    }
}

#[tokio::test]
async fn invalid_requests_are_invalid_argument_naming_the_field() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    let long = |n: usize| "x".repeat(n);

    let mut cases: Vec<(RateLimitRequest, &str)> = vec![
        (request("", &[&[("client", "c")]]), "domain"),
        (request(&long(256), &[&[("client", "c")]]), "domain"),
        (request("api", &[]), "descriptors"),
        (request("api", &[&[]]), "descriptors[0].entries"),
        (
            request("api", &[&[("", "v")]]),
            "descriptors[0].entries[0].key",
        ),
        (
            request("api", &[&[("client", "c")], &[(&long(256), "v")]]),
            "descriptors[1].entries[0].key",
        ),
        (
            request("api", &[&[("client", "c")], &[("k", &long(1025))]]),
            "descriptors[1].entries[0].value",
        ),
    ];
    let many: Vec<&[(&str, &str)]> = vec![&[("client", "c")]; 65];
    cases.push((request("api", &many), "descriptors"));
    let entries = vec![("k", "v"); 17];
    cases.push((request("api", &[&entries]), "descriptors[0].entries"));
    let mut bad_unit = one("client", "c");
    bad_unit.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 5,
        unit: RateLimitUnit::Unknown as i32,
    });
    cases.push((bad_unit, "descriptors[0].limit.unit"));
    let mut too_many_hits = one("client", "c");
    too_many_hits.descriptors[0].hits_addend = Some((u64::from(u32::MAX) + 1).into());
    cases.push((too_many_hits, "descriptors[0].hits_addend"));

    for (req, field) in cases {
        let status = client
            .should_rate_limit(req)
            .await
            .expect_err("an invalid request was answered");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(field),
            "message '{}' does not name `{field}`",
            status.message()
        );
    }
    // The bounds are named in the message.
    let status = client
        .should_rate_limit(request("api", &many))
        .await
        .unwrap_err();
    assert!(status.message().contains("64"), "{}", status.message());
    let status = client
        .should_rate_limit(request("api", &[&entries]))
        .await
        .unwrap_err();
    assert!(status.message().contains("16"), "{}", status.message());
}

#[tokio::test]
async fn shadow_mode_counts_but_never_denies() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    for i in 0..5 {
        let r = call(&mut client, one("shadowed", "s-1")).await;
        assert_eq!(r.overall_code(), Code::Ok, "call {i}: {r:?}");
        assert_eq!(r.statuses[0].code(), Code::Ok);
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .map(|l| l.requests_per_unit),
            Some(1)
        );
    }
    // A shadowed rule over its limit does not deny the request, nor stop
    // the request's other counters from counting.
    for expected_remaining in [2, 1, 0] {
        let r = call(
            &mut client,
            request("api", &[&[("shadowed", "s-1")], &[("client", "s-2")]]),
        )
        .await;
        assert_eq!(r.overall_code(), Code::Ok);
        assert_eq!(remaining_of(&r.statuses[1]), expected_remaining);
    }
    let metrics = support::http::get(server.http_addr, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(r#"sluice_shadow_mode_total{domain="api",rule="api.shadowed"}"#),
        "no shadow-mode metric:\n{metrics}"
    );
}

#[tokio::test]
async fn global_shadow_mode_never_denies() {
    let (mut config, _clock) = config();
    config.settings.plan.global_shadow = true;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    for _ in 0..3 {
        let r = call(&mut client, one("tight", "g-1")).await;
        assert_eq!(r.overall_code(), Code::Ok, "{r:?}");
    }
}

#[tokio::test]
async fn unlimited_rules_never_deny_and_report_no_limit() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    for _ in 0..50 {
        let mut req = one("internal", "reporting");
        req.hits_addend = 1_000;
        let r = call(&mut client, req).await;
        assert_eq!(r.overall_code(), Code::Ok);
        assert!(r.statuses[0].current_limit.is_none(), "{r:?}");
    }
}

#[tokio::test]
async fn a_rule_named_in_replaces_is_not_applied() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    let both = || request("api", &[&[("general", "r-1")], &[("specific", "r-1")]]);

    // `general` allows 1 a minute, `specific` 2 and replaces it.
    for _ in 0..2 {
        let r = call(&mut client, both()).await;
        assert_eq!(r.overall_code(), Code::Ok, "{r:?}");
        assert!(
            r.statuses[0].current_limit.is_none(),
            "general was applied: {r:?}"
        );
        assert_eq!(
            r.statuses[1]
                .current_limit
                .as_ref()
                .map(|l| l.name.as_str()),
            Some("specific")
        );
    }
    let r = call(&mut client, both()).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
    assert_eq!(r.statuses[1].code(), Code::OverLimit);

    // Nothing was counted against `general` while it was replaced.
    let r = call(&mut client, one("general", "r-1")).await;
    assert_eq!(r.overall_code(), Code::Ok);
    assert_eq!(remaining_of(&r.statuses[0]), 0);
}

#[tokio::test]
async fn ratelimit_headers_only_when_enabled_from_the_most_constrained_descriptor() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    let r = call(&mut client, one("client", "h-1")).await;
    assert!(r.response_headers_to_add.is_empty(), "{r:?}");

    let (mut config, _clock) = config();
    config.settings.rate_limit_headers = true;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let header = |r: &RateLimitResponse, name: &str| {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
            .unwrap_or_else(|| panic!("no {name} header in {r:?}"))
    };
    let reset = ((MINUTE_US - START_US % MINUTE_US) / 1_000_000).to_string();

    let r = call(&mut client, one("client", "h-1")).await;
    assert_eq!(header(&r, "RateLimit-Limit"), "3");
    assert_eq!(header(&r, "RateLimit-Remaining"), "2");
    assert_eq!(header(&r, "RateLimit-Reset"), reset);

    // `tight` (1 a minute, now 0 left) bounds the caller more than `client`.
    let r = call(
        &mut client,
        request("api", &[&[("client", "h-2")], &[("tight", "h-2")]]),
    )
    .await;
    assert_eq!(header(&r, "RateLimit-Limit"), "1");
    assert_eq!(header(&r, "RateLimit-Remaining"), "0");
}

/// envoyproxy/ratelimit counts a request against every descriptor even when
/// one of them denies it, so a client hammering a tight limit drains its
/// wider ones. In sluice a denied request consumes nothing.
#[tokio::test]
async fn a_denied_request_consumes_no_budget_from_its_other_descriptors() {
    let (server, _clock) = start().await;
    assert_denied_requests_consume_nothing(&server).await;
}

/// A store with only `apply`, as a store that cannot update several
/// counters atomically would be: it gets `apply_request`'s default.
struct ApplyOnlyStore(MemoryStore);

#[async_trait]
impl CounterStore for ApplyOnlyStore {
    async fn apply(&self, ops: &[CounterOp]) -> Result<Vec<Outcome>, StoreError> {
        self.0.apply(ops).await
    }

    fn kind(&self) -> &'static str {
        "apply-only"
    }
}

#[tokio::test]
async fn a_denied_request_consumes_nothing_with_the_default_apply_request() {
    let (mut config, clock) = config();
    config.store = Some(Arc::new(ApplyOnlyStore(MemoryStore::new(1_000, clock))));
    let server = TestServer::start(config).await;
    assert_denied_requests_consume_nothing(&server).await;

    // A shadow-mode rule over its limit does not stop the others counting.
    let mut client = server.client().await;
    let both = || request("api", &[&[("shadowed", "d-2")], &[("wide", "d-2")]]);
    for remaining in [4, 3, 2] {
        let r = call(&mut client, both()).await;
        assert_eq!(r.overall_code(), Code::Ok);
        assert_eq!(remaining_of(&r.statuses[1]), remaining);
    }
}

async fn assert_denied_requests_consume_nothing(server: &TestServer) {
    let mut client = server.client().await;
    let both = || request("api", &[&[("tight", "d-1")], &[("wide", "d-1")]]);

    let r = call(&mut client, both()).await;
    assert_eq!(r.overall_code(), Code::Ok);
    assert_eq!(remaining_of(&r.statuses[1]), 4);

    for _ in 0..10 {
        let r = call(&mut client, both()).await;
        assert_eq!(r.overall_code(), Code::OverLimit);
        assert_eq!(r.statuses[0].code(), Code::OverLimit);
        assert_eq!(r.statuses[1].code(), Code::Ok);
        assert_eq!(
            remaining_of(&r.statuses[1]),
            4,
            "a denied request consumed budget of its other descriptor"
        );
    }

    // The wide limit still has its 4.
    let mut check = one("wide", "d-1");
    check.descriptors[0].hits_addend = Some(0u64.into());
    let r = call(&mut client, check).await;
    assert_eq!(remaining_of(&r.statuses[0]), 4);
    for _ in 0..4 {
        assert_eq!(
            call(&mut client, one("wide", "d-1")).await.overall_code(),
            Code::Ok
        );
    }
    assert_eq!(
        call(&mut client, one("wide", "d-1")).await.overall_code(),
        Code::OverLimit
    );
}

/// A store that holds every call until released, to keep a call in flight.
struct GatedStore {
    inner: MemoryStore,
    entered: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl CounterStore for GatedStore {
    async fn apply(&self, ops: &[CounterOp]) -> Result<Vec<Outcome>, StoreError> {
        self.entered.notify_one();
        let _permit = self.release.acquire().await;
        self.inner.apply(ops).await
    }

    fn kind(&self) -> &'static str {
        "gated"
    }
}

fn gated(clock: Arc<ManualClock>) -> Arc<GatedStore> {
    Arc::new(GatedStore {
        inner: MemoryStore::new(1_000, clock),
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    })
}

async fn next_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let message = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no health update within 5 s")
        .expect("health watch failed")
        .expect("health watch ended");
    message.status()
}

#[tokio::test]
async fn health_goes_not_serving_on_shutdown_and_in_flight_calls_finish() {
    let (mut config, clock) = config();
    let store = gated(clock);
    config.store = Some(store.clone());
    // Long enough that the held call is in flight, not answered by the
    // failure mode.
    config.settings.store_timeout = Duration::from_secs(60);
    config.shutdown_grace = Duration::from_secs(30);
    let mut server = TestServer::start(config).await;

    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut watches = Vec::new();
    for service in ["", SERVICE_NAME] {
        let check = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            check.status(),
            ServingStatus::Serving,
            "service '{service}'"
        );
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
        watches.push(watch);
    }

    let mut client = Client::new(channel.clone());
    let in_flight =
        tokio::spawn(async move { client.should_rate_limit(one("client", "f-1")).await });
    tokio::time::timeout(Duration::from_secs(5), store.entered.notified())
        .await
        .expect("the call never reached the store");

    server.begin_shutdown();
    for watch in &mut watches {
        assert_eq!(next_status(watch).await, ServingStatus::NotServing);
    }

    // The held call completes with a real answer once the store answers.
    store.release.add_permits(1);
    let answer = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight call did not finish")
        .unwrap()
        .expect("the in-flight call failed during shutdown")
        .into_inner();
    assert_eq!(answer.overall_code(), Code::Ok);
    assert_eq!(answer.statuses[0].limit_remaining, 2);

    drop(watches);
    drop(health);
    drop(channel);
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("serve did not return after its connections closed")
        .expect("serve failed");
}

#[tokio::test]
async fn shutdown_gives_up_on_calls_that_outlast_the_grace_period() {
    let (mut config, clock) = config();
    let store = gated(clock);
    config.store = Some(store.clone());
    config.settings.store_timeout = Duration::from_secs(600);
    config.shutdown_grace = Duration::from_millis(300);
    let mut server = TestServer::start(config).await;
    let mut client = server.client().await;
    let in_flight =
        tokio::spawn(async move { client.should_rate_limit(one("client", "g-1")).await });
    tokio::time::timeout(Duration::from_secs(5), store.entered.notified())
        .await
        .expect("the call never reached the store");

    server.begin_shutdown();
    // Promised: 300 ms. Margin for a busy machine: 10 s.
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("serve outlived its grace period")
        .expect("serve failed");
    // `serve` has returned, so `main` would now exit and take the held
    // connection with it; in this process it lingers until the runtime ends.
    assert!(!in_flight.is_finished(), "the held call was answered");
    in_flight.abort();
}

#[tokio::test]
async fn metrics_count_decisions_by_domain_and_code_never_by_value() {
    let (server, _clock) = start().await;
    let mut client = server.client().await;
    let secret = "value-that-must-not-leak-93b1";
    for _ in 0..4 {
        call(&mut client, one("client", secret)).await;
    }
    call(
        &mut client,
        request("domain-that-must-not-leak-27c4", &[&[("client", secret)]]),
    )
    .await;
    let _ = client
        .should_rate_limit(request("", &[&[("client", secret)]]))
        .await;

    let response = support::http::get(server.http_addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let metrics = response.text();
    for needle in [
        r#"sluice_decisions_total{domain="api",code="OK"}"#,
        r#"sluice_decisions_total{domain="api",code="OVER_LIMIT"}"#,
        r#"sluice_decisions_total{domain="_unknown",code="OK"}"#,
        r#"sluice_rule_hits_total{domain="api",rule="api.client",code="OVER_LIMIT"}"#,
        "sluice_request_duration_seconds_bucket",
        "sluice_invalid_requests_total",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    for leak in [
        secret,
        "domain-that-must-not-leak-27c4",
        "alice-7f3e",
        "bob-51c2",
    ] {
        assert!(
            !metrics.contains(leak),
            "/metrics shows the request value {leak}"
        );
    }
}

// === sluice's window extensions ===

const WINDOW_RULES: &str = r#"
domain: windows
descriptors:
  - key: client
    rate_limits:
      - {name: burst, unit: second, requests_per_unit: 2, algorithm: fixed_window}
      - {name: daily, unit: day, requests_per_unit: 5, algorithm: fixed_window}
  - key: five
    rate_limit: {name: per_5m, unit: minute, unit_multiplier: 5, requests_per_unit: 2}
  - key: sixty
    rate_limit: {name: per_60s, unit: second, unit_multiplier: 60, requests_per_unit: 2}
  - key: tenant
    quota_mode: true
    rate_limit: {name: monthly, calendar: month, time_zone: Europe/Berlin, requests_per_unit: 2}
"#;

async fn start_windows() -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(START_US));
    let mut config = TestConfig::new(rules_from_yaml(&[WINDOW_RULES]));
    config.clock = clock.clone();
    (TestServer::start(config).await, clock)
}

/// code, current_limit (name, requests_per_unit, unit), limit_remaining and
/// duration_until_reset (seconds) of the only status.
fn status_of(r: &RateLimitResponse) -> (Code, String, u32, Unit, u32, f64) {
    assert_eq!(r.statuses.len(), 1, "{r:?}");
    let s = &r.statuses[0];
    let limit = s.current_limit.as_ref().expect("current_limit");
    (
        s.code(),
        limit.name.clone(),
        limit.requests_per_unit,
        limit.unit(),
        s.limit_remaining,
        secs(&s.duration_until_reset),
    )
}

#[tokio::test]
async fn several_limits_report_the_most_constrained() {
    let (server, clock) = start_windows().await;
    let mut client = server.client().await;
    let hit = || request("windows", &[&[("client", "c-1")]]);
    // START_US is on a whole second, 80 000 s into a UTC day.
    let day_left = 6_400.0;
    let burst =
        |code, remaining, reset| (code, "burst".to_owned(), 2, Unit::Second, remaining, reset);
    let daily = |code, remaining, reset| (code, "daily".to_owned(), 5, Unit::Day, remaining, reset);
    assert_eq!(
        status_of(&call(&mut client, hit()).await),
        burst(Code::Ok, 1, 1.0)
    );
    assert_eq!(
        status_of(&call(&mut client, hit()).await),
        burst(Code::Ok, 0, 1.0)
    );
    let r = call(&mut client, hit()).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
    assert_eq!(status_of(&r), burst(Code::OverLimit, 0, 1.0));
    clock.advance(1_000_000);
    assert_eq!(
        status_of(&call(&mut client, hit()).await),
        burst(Code::Ok, 1, 1.0)
    );
    assert_eq!(
        status_of(&call(&mut client, hit()).await),
        burst(Code::Ok, 0, 1.0)
    );
    clock.advance(1_000_000);
    // One left of the burst, none of the day: the day is reported.
    assert_eq!(
        status_of(&call(&mut client, hit()).await),
        daily(Code::Ok, 0, day_left - 2.0)
    );
    let r = call(&mut client, hit()).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
    assert_eq!(status_of(&r), daily(Code::OverLimit, 0, day_left - 2.0));
}

#[tokio::test]
async fn a_five_minute_window_reports_no_unit_and_its_own_reset() {
    let (server, _clock) = start_windows().await;
    let mut client = server.client().await;
    // START_US is 200 s into a 5-minute window. No RateLimit.Unit is 5
    // minutes long: UNKNOWN, so Envoy states no window rather than a wrong one.
    let hit = || request("windows", &[&[("five", "f-1")]]);
    let five = |code, remaining, reset| {
        (
            code,
            "per_5m".to_owned(),
            2,
            Unit::Unknown,
            remaining,
            reset,
        )
    };
    assert_eq!(
        status_of(&call(&mut client, hit()).await),
        five(Code::Ok, 1, 100.0)
    );
    assert_eq!(
        status_of(&call(&mut client, hit()).await),
        five(Code::Ok, 0, 100.0)
    );
    let r = call(&mut client, hit()).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
    let (code, _, _, unit, remaining, reset) = status_of(&r);
    assert_eq!((code, unit, remaining), (Code::OverLimit, Unit::Unknown, 0));
    // Sliding window: until this window's 2 weigh 1 in the next, 150 s in.
    assert_eq!(reset, 250.0);

    // 60 seconds is a minute: reported as one.
    let r = call(&mut client, request("windows", &[&[("sixty", "s-1")]])).await;
    assert_eq!(
        status_of(&r),
        (Code::Ok, "per_60s".to_owned(), 2, Unit::Minute, 1, 40.0)
    );
}

#[tokio::test]
async fn a_calendar_month_reports_its_unit_and_the_time_to_local_midnight_on_the_first() {
    let (server, clock) = start_windows().await;
    let mut client = server.client().await;
    let hit = || request("windows", &[&[("tenant", "acme")]]);
    // 2023-11-14T22:13:20Z; December starts in Berlin at 2023-11-30T23:00Z.
    let month_left = 1_385_200.0;
    let r = call(&mut client, hit()).await;
    assert_eq!(
        status_of(&r),
        (
            Code::Ok,
            "monthly".to_owned(),
            2,
            Unit::Month,
            1,
            month_left
        )
    );
    let quota = r.statuses[0].quota.as_ref().expect("quota_mode: quota");
    assert_eq!(quota.requests, 1);
    let valid_until = match &quota.expiration_specifier {
        Some(sluice::proto::rls::rate_limit_response::quota::ExpirationSpecifier::ValidUntil(
            t,
        )) => t.seconds,
        other => panic!("{other:?}"),
    };
    assert_eq!(valid_until, 1_701_385_200, "2023-11-30T23:00:00Z");
    call(&mut client, hit()).await;
    assert_eq!(
        call(&mut client, hit()).await.overall_code(),
        Code::OverLimit
    );
    // Midnight on 1 December in Berlin: a new month of 31 days.
    clock.set(1_701_385_200_000_000);
    let r = call(&mut client, hit()).await;
    assert_eq!(
        status_of(&r),
        (
            Code::Ok,
            "monthly".to_owned(),
            2,
            Unit::Month,
            1,
            31.0 * 86_400.0
        )
    );
}
