//! gRPC over TLS and mutual TLS, with real certificates generated per test,
//! and certificate rotation without a restart.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use sluice::proto::rls::rate_limit_response::Code;
use sluice::tls::{TlsFiles, TlsReloader};
use support::certs::{Issued, TestCa};
use support::{request, rules_from_yaml, wait_until, TestConfig, TestServer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const RULES: &str = "
domain: tls
descriptors:
  - key: client_id
    rate_limit: { unit: minute, requests_per_unit: 5 }
";

async fn start(files: TlsFiles) -> (TestServer, Arc<TlsReloader>) {
    let reloader = TlsReloader::new(files).expect("loading test certificates");
    tokio::spawn(reloader.clone().watch(Duration::from_millis(100)));
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.tls = Some(reloader.clone());
    (TestServer::start(config).await, reloader)
}

/// One call over a fresh TLS connection trusting `ca_pem`, presenting
/// `identity` when given. Errors from the handshake or the call both count.
async fn call(
    server: &TestServer,
    ca_pem: &str,
    identity: Option<&Issued>,
) -> Result<Code, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let channel: Channel = Endpoint::from_shared(format!("https://{}", server.grpc_addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client =
        sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::new(channel);
    let response = client
        .should_rate_limit(request("tls", &[&[("client_id", "c1")]]))
        .await
        .map_err(|e| format!("call: {e:?}"))?;
    Ok(response.into_inner().overall_code())
}

#[tokio::test]
async fn serves_grpc_over_tls_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("sluice test CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let (server, _) = start(TlsFiles {
        cert,
        key,
        client_ca: None,
    })
    .await;

    assert_eq!(call(&server, &ca.cert_pem(), None).await, Ok(Code::Ok));

    // A client that trusts another CA refuses the server.
    let other = TestCa::new("another CA");
    assert!(call(&server, &other.cert_pem(), None).await.is_err());

    // Plaintext gRPC to a TLS port fails.
    let plain = async {
        let mut c = sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(
            server.grpc_url(),
        )
        .await
        .map_err(|e| e.to_string())?;
        c.should_rate_limit(request("tls", &[&[("client_id", "c1")]]))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(tokio::time::timeout(Duration::from_secs(5), plain)
        .await
        .map_or(true, |r| r.is_err()));
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_signed_by_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let (cert, key) = server_ca.server().write(dir.path(), "server");
    let client_ca_path = client_ca.write_ca(dir.path());
    let (server, _) = start(TlsFiles {
        cert,
        key,
        client_ca: Some(client_ca_path),
    })
    .await;

    let good = client_ca.client("envoy");
    assert_eq!(
        call(&server, &server_ca.cert_pem(), Some(&good)).await,
        Ok(Code::Ok)
    );

    // Signed by a CA the server does not trust: refused.
    let rogue = TestCa::new("rogue CA").client("envoy");
    let refused = call(&server, &server_ca.cert_pem(), Some(&rogue)).await;
    assert!(refused.is_err(), "untrusted client admitted: {refused:?}");

    // No client certificate at all: refused.
    let anonymous = call(&server, &server_ca.cert_pem(), None).await;
    assert!(
        anonymous.is_err(),
        "client without a certificate admitted: {anonymous:?}"
    );
}

#[tokio::test]
async fn rotated_certificates_serve_new_connections_and_bad_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old CA");
    let (cert, key) = old_ca.server().write(dir.path(), "server");
    let (server, _) = start(TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    })
    .await;
    assert_eq!(call(&server, &old_ca.cert_pem(), None).await, Ok(Code::Ok));

    // A broken rotation (a truncated certificate) keeps the old certificate.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(call(&server, &old_ca.cert_pem(), None).await, Ok(Code::Ok));

    // A good rotation is picked up without a restart.
    let new_ca = TestCa::new("new CA");
    new_ca.server().write(dir.path(), "server");
    let (server, new_pem) = (&server, new_ca.cert_pem());
    let served = wait_until(Duration::from_secs(3), || {
        let pem = new_pem.clone();
        async move { call(server, &pem, None).await == Ok(Code::Ok) }
    })
    .await;
    assert!(
        served.is_some(),
        "rotated certificate not served within 3 s"
    );
    assert!(call(server, &old_ca.cert_pem(), None).await.is_err());
}
