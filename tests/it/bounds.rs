//! Bounds on connections: a client that opens thousands of connections, and
//! slowloris clients (connect and send nothing, half an HTTP/2 preface, a
//! TLS ClientHello never finished, half an HTTP/1 request head): sluice
//! keeps answering well-formed calls on the connections it serves, closes
//! the stalled ones by their deadline, and serves new clients once they are
//! gone.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use sluice::listen::{ConnectionSettings, Limits, HTTP2_PREFACE};
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::tls::{TlsFiles, TlsReloader};
use support::certs::TestCa;
use support::{request, rules_from_yaml, wait_until, TestConfig, TestServer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const RULES: &str = "
domain: bounds
descriptors:
  - key: client_id
    rate_limit: { unit: second, requests_per_unit: 1000000 }
";

/// How long any one well-formed call may take while the port is flooded.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

fn config(connections: ConnectionSettings) -> TestConfig {
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.connections = connections;
    config
}

fn tight() -> ConnectionSettings {
    ConnectionSettings {
        grpc: Limits {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: None,
        },
        max_tls_handshakes: 8,
        http: Limits {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: None,
        },
        http_idle_timeout: Duration::from_secs(1),
        ..ConnectionSettings::default()
    }
}

/// `calls` well-formed calls on `client`, each within [`CALL_DEADLINE`].
async fn keep_calling(client: &mut RateLimitServiceClient<Channel>, calls: usize) {
    for i in 0..calls {
        let call = client.should_rate_limit(request("bounds", &[&[("client_id", "steady")]]));
        let answer = tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .unwrap_or_else(|_| panic!("call {i} not answered within {CALL_DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("call {i} failed: {e}"));
        assert_eq!(answer.into_inner().overall_code(), Code::Ok);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens `count` connections to `addr` at once and sends each `first`;
/// those the kernel's backlog takes in within 3 s.
async fn flood(addr: SocketAddr, count: usize, first: &'static [u8]) -> Vec<TcpStream> {
    let connects = (0..count).map(|_| async move {
        let mut tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        if !first.is_empty() {
            tcp.write_all(first).await.ok()?;
        }
        Some(tcp)
    });
    futures::future::join_all(connects)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Whether the server closed `tcp` (EOF or reset) within `within`; reads
/// and discards whatever it sent first.
async fn closed_by_server(tcp: &mut TcpStream, within: Duration) -> bool {
    let read_to_end = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}

/// Whether the server sent `tcp` anything (its HTTP/2 SETTINGS) within
/// `within`: only a connection it accepted and handed to the server does.
async fn heard_from_server(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut byte)).await,
        Ok(Ok(1))
    )
}

#[tokio::test]
async fn slowloris_clients_are_closed_by_their_deadline_while_others_are_served() {
    let _machine = crate::support::MACHINE.lock().await;
    let server = TestServer::start(config(tight())).await;
    let mut steady = server.client().await;
    keep_calling(&mut steady, 1).await;

    let mut silent = flood(server.grpc_addr, 40, b"").await;
    let mut halves = flood(server.grpc_addr, 20, &HTTP2_PREFACE[..12]).await;
    assert_eq!((silent.len(), halves.len()), (40, 20));

    // The established connection is answered throughout.
    keep_calling(&mut steady, 50).await;

    // Each stalled connection is closed by its deadline (1 s), so its slot
    // under the cap is free again.
    for tcp in silent.iter_mut().chain(halves.iter_mut()) {
        assert!(
            closed_by_server(tcp, Duration::from_secs(5)).await,
            "a stalled connection still open 5 s after its 1 s deadline"
        );
    }
    // New clients are served.
    let mut fresh = server.client().await;
    keep_calling(&mut fresh, 5).await;
}

#[tokio::test]
async fn thousands_of_connections_wait_at_the_cap_and_the_served_keep_being_answered() {
    let _machine = crate::support::MACHINE.lock().await;
    let server = TestServer::start(config(tight())).await;
    let mut steady = server.client().await;
    keep_calling(&mut steady, 1).await;

    // Well-formed HTTP/2 clients that send their preface and an empty
    // SETTINGS frame, then sit idle: each one accepted holds a slot.
    const PREFACE_AND_SETTINGS: &[u8] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    // 2000 at once; those past the cap that the kernel's backlog takes in
    // count as connected for the client, the rest are still connecting.
    let mut idle = flood(server.grpc_addr, 2000, PREFACE_AND_SETTINGS).await;
    assert!(
        idle.len() > 64,
        "only {} connections were taken in: the cap was never met",
        idle.len()
    );

    keep_calling(&mut steady, 50).await;

    // Only those under the cap (64, one of them `steady`'s) were served.
    let heard = idle
        .iter_mut()
        .map(|tcp| heard_from_server(tcp, Duration::from_millis(500)));
    let served = futures::future::join_all(heard)
        .await
        .into_iter()
        .filter(|heard| *heard)
        .count();
    assert!(served > 0, "no flooding connection was served at all");
    assert!(
        served <= 63,
        "{served} flooding connections served past a cap of 64"
    );

    // Once they go, a new client is served.
    drop(idle);
    let mut fresh = tokio::time::timeout(Duration::from_secs(10), server.client())
        .await
        .expect("a new client connects within 10 s of the flood ending");
    keep_calling(&mut fresh, 5).await;
}

#[tokio::test]
async fn unfinished_tls_handshakes_time_out_and_tls_clients_keep_being_served() {
    let _machine = crate::support::MACHINE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("bounds CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let reloader = TlsReloader::new(TlsFiles {
        cert,
        key,
        client_ca: None,
    })
    .unwrap();
    let mut config = config(tight());
    config.tls = Some(reloader);
    let server = TestServer::start(config).await;

    let connect = || {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.cert_pem()))
            .domain_name("localhost");
        let endpoint = Endpoint::from_shared(format!("https://{}", server.grpc_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(3));
        async move { endpoint.connect().await.map(RateLimitServiceClient::new) }
    };
    let mut steady = connect().await.expect("TLS client connects");
    keep_calling(&mut steady, 1).await;

    // A TLS handshake record announcing 512 bytes, of which 9 come: more
    // stalled handshakes than there are places (8), and silent clients.
    const HALF_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc";
    let mut stalled = flood(server.grpc_addr, 100, HALF_CLIENT_HELLO).await;
    let mut silent = flood(server.grpc_addr, 20, b"").await;
    assert_eq!((stalled.len(), silent.len()), (100, 20));

    keep_calling(&mut steady, 50).await;

    for tcp in stalled.iter_mut().chain(silent.iter_mut()) {
        assert!(
            closed_by_server(tcp, Duration::from_secs(5)).await,
            "an unfinished TLS handshake still open 5 s after its 1 s deadline"
        );
    }
    let connect = &connect;
    let fresh = wait_until(Duration::from_secs(10), move || async move {
        match connect().await {
            Ok(mut client) => client
                .should_rate_limit(request("bounds", &[&[("client_id", "fresh")]]))
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(fresh.is_some(), "no new TLS client served after the flood");
}

#[tokio::test]
async fn half_sent_http_requests_are_closed_and_json_keeps_answering() {
    let _machine = crate::support::MACHINE.lock().await;
    let server = TestServer::start(config(tight())).await;
    const HALF_HEAD: &[u8] = b"POST /json HTTP/1.1\r\nHost: sluice\r\nContent-Type: appl";
    let mut stalled = flood(server.http_addr, 300, HALF_HEAD).await;
    let mut silent = flood(server.http_addr, 100, b"").await;
    assert_eq!((stalled.len(), silent.len()), (300, 100));

    let body =
        r#"{"domain":"bounds","descriptors":[{"entries":[{"key":"client_id","value":"json"}]}]}"#;
    for i in 0..20 {
        let answer = tokio::time::timeout(
            CALL_DEADLINE,
            support::http::post_json(server.http_addr, "/json", body),
        )
        .await
        .unwrap_or_else(|_| panic!("/json call {i} not answered within {CALL_DEADLINE:?}"))
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }

    // The request head timeout (1 s) closes both kinds.
    for tcp in stalled.iter_mut().chain(silent.iter_mut()) {
        assert!(
            closed_by_server(tcp, Duration::from_secs(5)).await,
            "a half-sent HTTP request still open 5 s after its 1 s deadline"
        );
    }
}

/// The gRPC port's idle timeout: a connection with no call in flight is
/// closed once it passes (and counted), one carrying a streaming call is
/// kept however quiet the stream, and calls go on on the others.
#[tokio::test]
async fn idle_connections_are_closed_and_a_quiet_stream_keeps_its_own() {
    const IDLE: Duration = Duration::from_secs(2);
    let mut settings = tight();
    settings.grpc.idle_timeout = Some(IDLE);
    let server = TestServer::start(config(settings)).await;

    // A client that finishes the handshake and then does nothing.
    let mut idle = TcpStream::connect(server.grpc_addr).await.unwrap();
    idle.write_all(HTTP2_PREFACE).await.unwrap();
    // SETTINGS, empty, as every HTTP/2 client sends after the preface.
    idle.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let opened = std::time::Instant::now();
    // A quiet stream: health Watch sends the status once, then nothing.
    let channel = Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    assert!(watch.message().await.expect("first status").is_some());

    assert!(
        closed_by_server(&mut idle, IDLE * 4).await,
        "an idle connection still open {:?} after its {IDLE:?} idle timeout",
        IDLE * 4
    );
    let after = opened.elapsed();
    assert!(
        after >= IDLE - Duration::from_millis(100),
        "closed after {after:?}, before its idle timeout"
    );
    // The stream's connection has been quiet for longer than the timeout,
    // and is still open: its next message is not an error or the end.
    tokio::time::sleep(IDLE).await;
    let next = tokio::time::timeout(Duration::from_millis(300), watch.message()).await;
    assert!(next.is_err(), "the quiet stream ended: {next:?}");
    // Calls on the stream's connection are served.
    let mut client = RateLimitServiceClient::new(channel);
    keep_calling(&mut client, 3).await;
    let metrics = support::http::get(server.http_addr, "/metrics")
        .await
        .unwrap()
        .text();
    let closed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_connections_idle_closed_total{port=\"grpc\"} "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(
        closed.is_some_and(|n| n >= 1),
        "idle closes not counted: {closed:?}"
    );
}
