//! envoyproxy/ratelimit parity through the real gRPC server: wildcards with
//! `*` anywhere counting on the in-process store, `share_threshold` on any
//! wildcard, free-form `metadata` returned as dynamic metadata, and
//! `quota_mode` decided as envoyproxy/ratelimit's service decides it.

use crate::support;

use pbjson_types::value::Kind;
use sluice::proto::common::rate_limit_descriptor::RateLimitOverride;
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use support::{request, rules_from_yaml, TestConfig, TestServer};

const RULES: &str = r#"
domain: parity
descriptors:
  - key: path
    value: /api/*/orders*
    rate_limit: {unit: minute, requests_per_unit: 2}
    metadata:
      route: orders
      owner: {team: payments, oncall: [alice, bob]}
      weight: 1.5
      public: false
  - key: path
    value: /static/*.css
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: path
    value: /api/v1/orders
    rate_limit: {unit: minute, requests_per_unit: 100}
    metadata: {route: exact}
  - key: path
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: tenant
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
    metadata: {route: tenant-quota, owner: {tier: gold}}
  - key: team
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;

type Client = sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient<
    tonic::transport::Channel,
>;

async fn start(dynamic_metadata: bool) -> (TestServer, Client) {
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.settings.dynamic_metadata = dynamic_metadata;
    let server = TestServer::start(config).await;
    let client = server.client().await;
    (server, client)
}

async fn call(client: &mut Client, req: RateLimitRequest) -> RateLimitResponse {
    client
        .should_rate_limit(req)
        .await
        .unwrap_or_else(|s| panic!("ShouldRateLimit failed: {s:?}"))
        .into_inner()
}

fn codes(r: &RateLimitResponse) -> Vec<Code> {
    r.statuses.iter().map(|s| s.code()).collect()
}

fn field<'a>(s: &'a pbjson_types::Struct, name: &str) -> &'a Kind {
    s.fields
        .get(name)
        .and_then(|v| v.kind.as_ref())
        .unwrap_or_else(|| panic!("no field {name} in {s:?}"))
}

fn as_struct(k: &Kind) -> &pbjson_types::Struct {
    match k {
        Kind::StructValue(s) => s,
        other => panic!("not a struct: {other:?}"),
    }
}

#[tokio::test]
async fn wildcards_match_anywhere_and_count_per_value_or_shared() {
    let (_server, mut client) = start(false).await;
    let path = |value: &str| request("parity", &[&[("path", value)]]);

    // `/api/*/orders*`: each value its own counter of 2.
    for value in ["/api/v2/orders/7", "/api/v3/orders"] {
        for _ in 0..2 {
            assert_eq!(codes(&call(&mut client, path(value)).await), [Code::Ok]);
        }
        let r = call(&mut client, path(value)).await;
        assert_eq!(r.overall_code(), Code::OverLimit, "{value}");
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .map(|l| l.requests_per_unit),
            Some(2)
        );
    }
    // The exact value wins over the wildcard; the key-only entry takes what
    // no pattern matches.
    let exact = call(&mut client, path("/api/v1/orders")).await;
    let other = call(&mut client, path("/api/v1/users")).await;
    for r in [exact, other] {
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .map(|l| l.requests_per_unit),
            Some(100)
        );
    }

    // `/static/*.css` with share_threshold: one counter for every match.
    assert_eq!(
        codes(&call(&mut client, path("/static/a.css")).await),
        [Code::Ok]
    );
    assert_eq!(
        codes(&call(&mut client, path("/static/b/c.css")).await),
        [Code::Ok]
    );
    let r = call(&mut client, path("/static/d.css")).await;
    assert_eq!(
        r.overall_code(),
        Code::OverLimit,
        "shared with the two before"
    );
    let r = call(&mut client, path("/static/d.js")).await;
    assert_eq!(r.overall_code(), Code::Ok, "no match: the key-only limit");
}

#[tokio::test]
async fn dynamic_metadata_is_built_and_merged_as_envoyproxy_ratelimit_does() {
    let (_server, mut client) = start(true).await;
    let mut req = request(
        "parity",
        &[
            &[("path", "/api/v2/orders")],
            &[("tenant", "acme")],
            &[("path", "/elsewhere")],
        ],
    );
    req.hits_addend = 1;
    req.descriptors[2].limit = Some(RateLimitOverride {
        requests_per_unit: 50,
        unit: sluice::proto::envoy::r#type::v3::RateLimitUnit::Hour as i32,
    });
    let r = call(&mut client, req.clone()).await;
    assert_eq!(r.overall_code(), Code::Ok);
    let dm = r.dynamic_metadata.as_ref().expect("dynamic metadata");
    assert_eq!(field(dm, "domain"), &Kind::StringValue("parity".into()));
    assert_eq!(field(dm, "hitsAddend"), &Kind::NumberValue(1.0));
    let Kind::ListValue(descriptors) = field(dm, "descriptors") else {
        panic!("descriptors is a list: {dm:?}");
    };
    assert_eq!(descriptors.values.len(), 3);
    let third = as_struct(descriptors.values[2].kind.as_ref().expect("kind"));
    assert_eq!(
        field(third, "entries"),
        &Kind::ListValue(pbjson_types::ListValue {
            values: vec![pbjson_types::Value {
                kind: Some(Kind::StringValue("path=/elsewhere".into()))
            }]
        })
    );
    assert_eq!(
        field(third, "limit"),
        &Kind::StringValue("requests_per_unit:50 unit:HOUR".into())
    );

    // Both matched rules admitted: their metadata merged, the first
    // descriptor's value winning, maps merged key by key.
    let merged = as_struct(field(dm, "metadata"));
    assert_eq!(field(merged, "route"), &Kind::StringValue("orders".into()));
    assert_eq!(field(merged, "weight"), &Kind::NumberValue(1.5));
    assert_eq!(field(merged, "public"), &Kind::BoolValue(false));
    let owner = as_struct(field(merged, "owner"));
    assert_eq!(field(owner, "team"), &Kind::StringValue("payments".into()));
    assert_eq!(field(owner, "tier"), &Kind::StringValue("gold".into()));
    assert!(matches!(field(owner, "oncall"), Kind::ListValue(l) if l.values.len() == 2));

    // Now the tenant quota is over (its only quota: the request is over);
    // its metadata is left out.
    let r = call(&mut client, req).await;
    assert_eq!(codes(&r), [Code::Ok, Code::OverLimit, Code::Ok]);
    assert_eq!(r.overall_code(), Code::OverLimit);
    let merged = as_struct(field(r.dynamic_metadata.as_ref().expect("dm"), "metadata"));
    assert!(!as_struct(field(merged, "owner"))
        .fields
        .contains_key("tier"));

    // Off (the default): no dynamic metadata at all.
    let (_server, mut client) = start(false).await;
    let r = call(
        &mut client,
        request("parity", &[&[("path", "/api/v2/orders")]]),
    )
    .await;
    assert_eq!(r.dynamic_metadata, None);
}

#[tokio::test]
async fn quota_descriptors_deny_only_together() {
    let (_server, mut client) = start(false).await;
    let both = || request("parity", &[&[("tenant", "t1")], &[("team", "x")]]);
    assert_eq!(call(&mut client, both()).await.overall_code(), Code::Ok);
    // Spend `team`'s quota alone (the request is over: its only quota is).
    let team = call(&mut client, request("parity", &[&[("team", "y")]])).await;
    assert_eq!(team.overall_code(), Code::Ok);
    let team = call(&mut client, request("parity", &[&[("team", "y")]])).await;
    assert_eq!(team.overall_code(), Code::OverLimit);
    // One quota over, the other not: OK, with the over one's status over.
    let r = call(
        &mut client,
        request("parity", &[&[("tenant", "t2")], &[("team", "y")]]),
    )
    .await;
    assert_eq!(r.overall_code(), Code::Ok);
    assert_eq!(codes(&r), [Code::Ok, Code::OverLimit]);
    // Both over: denied.
    let r = call(&mut client, both()).await;
    assert_eq!(codes(&r), [Code::OverLimit, Code::OverLimit]);
    assert_eq!(r.overall_code(), Code::OverLimit);
}
