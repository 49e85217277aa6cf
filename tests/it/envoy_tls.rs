//! A real Envoy calling sluice over TLS and mutual TLS, with certificates
//! generated per test: the example gateway config with a TLS transport
//! socket on its `sluice` cluster.
//!
//! Needs `envoy` (`bash .ci/install-tools.sh`); fails without it.

use crate::support;

use std::path::Path;

use sluice::tls::{TlsFiles, TlsReloader};
use support::certs::TestCa;
use support::envoy::{header, Backend, Envoy, EnvoyConfig};
use support::{path_str, rules_from_yaml, TestConfig, TestServer};

/// The example gateway's domain and descriptor, with a small limit.
const RULES: &str = "
domain: weather
descriptors:
  - key: client_id
    rate_limit: { unit: hour, requests_per_unit: 3 }
";
const LIMIT: usize = 3;

async fn start_sluice(files: TlsFiles) -> TestServer {
    let reloader = TlsReloader::new(files).expect("loading test certificates");
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.tls = Some(reloader);
    TestServer::start(config).await
}

/// Envoy refusing traffic when it cannot get an answer from sluice, so a
/// failed handshake shows as a 500 instead of silently passing.
fn deny_on_failure(config: EnvoyConfig) -> EnvoyConfig {
    config.replace("failure_mode_deny: false", "failure_mode_deny: true")
}

fn s(p: &Path) -> String {
    path_str(p)
}

/// `LIMIT` requests pass with limit headers from sluice, the next is 429.
async fn assert_limited(envoy: &Envoy, backend: &Backend, client: &str) {
    for i in 0..LIMIT {
        let r = envoy.get(&[("x-client-id", client)]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}\n{}", envoy.log_text());
        assert_eq!(
            header(&r, "x-ratelimit-remaining"),
            (LIMIT - 1 - i).to_string()
        );
    }
    let r = envoy.get(&[("x-client-id", client)]).await;
    assert_eq!(r.status, 429, "{r:?}\n{}", envoy.log_text());
    assert_eq!(backend.hits(), LIMIT);
    assert!(
        envoy.stat("cluster.sluice.ssl.handshake").await > 0,
        "Envoy reports no TLS handshake with sluice"
    );
}

/// Every request is refused by Envoy (500: no answer from sluice), none
/// reaches the backend, and Envoy counted the connections that failed.
async fn assert_refused(envoy: &Envoy, backend: &Backend) {
    for _ in 0..3 {
        let r = envoy.get(&[("x-client-id", "mallory")]).await;
        assert_eq!(
            r.status,
            500,
            "a call over a refused TLS connection was answered: {r:?}\n{}",
            envoy.log_text()
        );
        assert_eq!(r.header("x-ratelimit-limit"), None);
    }
    assert_eq!(backend.hits(), 0);
    let failures = envoy.stat("cluster.sluice.ssl.connection_error").await
        + envoy
            .stat("cluster.sluice.upstream_cx_destroy_remote")
            .await
        + envoy
            .stat("cluster.sluice.upstream_rq_pending_failure_eject")
            .await;
    assert!(
        failures > 0,
        "Envoy counted no refused connection to sluice"
    );
}

#[tokio::test]
async fn envoy_calls_sluice_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("sluice server CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let ca_path = ca.write_ca(dir.path());
    let sluice = start_sluice(TlsFiles {
        cert,
        key,
        client_ca: None,
    })
    .await;

    let backend = Backend::start().await;
    let envoy = Envoy::start(sluice.grpc_addr, backend.addr, |c| {
        deny_on_failure(c).sluice_tls(&s(&ca_path), None)
    })
    .await;
    assert_limited(&envoy, &backend, "alice").await;

    // An Envoy that trusts another CA does not accept sluice's certificate.
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = TestCa::new("another CA").write_ca(other_dir.path());
    let backend = Backend::start().await;
    let envoy = Envoy::start(sluice.grpc_addr, backend.addr, |c| {
        deny_on_failure(c).sluice_tls(&s(&other_ca), None)
    })
    .await;
    assert_refused(&envoy, &backend).await;
    assert_eq!(envoy.stat("cluster.sluice.ssl.handshake").await, 0);
}

#[tokio::test]
async fn envoy_calls_sluice_over_mutual_tls_and_unsigned_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("sluice server CA");
    let client_ca = TestCa::new("gateway client CA");
    let (cert, key) = server_ca.server().write(dir.path(), "server");
    let server_ca_path = server_ca.write_ca(dir.path());
    let client_ca_path = dir.path().join("client-ca.pem");
    std::fs::write(&client_ca_path, client_ca.cert_pem()).unwrap();
    let sluice = start_sluice(TlsFiles {
        cert,
        key,
        client_ca: Some(client_ca_path),
    })
    .await;

    // Envoy presenting a certificate signed by the client CA.
    let (gw_cert, gw_key) = client_ca.client("envoy").write(dir.path(), "gateway");
    let backend = Backend::start().await;
    let envoy = Envoy::start(sluice.grpc_addr, backend.addr, |c| {
        deny_on_failure(c).sluice_tls(&s(&server_ca_path), Some((&s(&gw_cert), &s(&gw_key))))
    })
    .await;
    assert_limited(&envoy, &backend, "alice").await;

    // A certificate from a CA sluice does not trust: refused. (With TLS 1.3
    // Envoy's side of the handshake completes before sluice checks the
    // certificate, so only the calls fail.)
    let (rogue_cert, rogue_key) = TestCa::new("rogue CA")
        .client("envoy")
        .write(dir.path(), "rogue");
    let backend = Backend::start().await;
    let rogue = Envoy::start(sluice.grpc_addr, backend.addr, |c| {
        deny_on_failure(c).sluice_tls(&s(&server_ca_path), Some((&s(&rogue_cert), &s(&rogue_key))))
    })
    .await;
    assert_refused(&rogue, &backend).await;

    // No client certificate at all: refused.
    let backend = Backend::start().await;
    let anonymous = Envoy::start(sluice.grpc_addr, backend.addr, |c| {
        deny_on_failure(c).sluice_tls(&s(&server_ca_path), None)
    })
    .await;
    assert_refused(&anonymous, &backend).await;

    // The trusted gateway is unaffected.
    let r = envoy.get(&[("x-client-id", "bob")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "x-ratelimit-remaining"), (LIMIT - 1).to_string());
}
