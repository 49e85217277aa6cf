//! Bad input at the edges, against the real server: bytes that are not the
//! message, messages and bodies over the size bound.
//!
//! The raw gRPC calls go through tonic's generic client with a codec that
//! sends and receives bytes as they are, so the server sees exactly the
//! frame the test built.

use crate::support;

use std::time::Duration;

use bytes::{Buf as _, BufMut as _};
use prost::Message as _;
use sluice::limiter::bounds::{self, MAX_REQUEST_BYTES};
use sluice::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::RateLimitRequest;
use support::http::{post_json, HttpResponse};
use support::{request, rules_from_yaml, TestConfig, TestServer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::Status;

const RULES: &str = r#"
domain: api
descriptors:
  - key: client
    rate_limit: {unit: minute, requests_per_unit: 3}
"#;
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

async fn start() -> TestServer {
    TestServer::start(TestConfig::new(rules_from_yaml(&[RULES]))).await
}

/// Bytes in, bytes out: the message is whatever the test wrote.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

#[derive(Debug)]
struct Raw;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

type RawClient = tonic::client::Grpc<tonic::transport::Channel>;

async fn raw_client(server: &TestServer) -> RawClient {
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .expect("connecting to the test server");
    tonic::client::Grpc::new(channel)
}

/// Sends `message` as the one message of a call to `path`.
async fn raw_call(
    client: &mut RawClient,
    path: &'static str,
    message: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    client.ready().await.expect("channel ready");
    client
        .unary(
            tonic::Request::new(message),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
        .map(tonic::Response::into_inner)
}

fn decoded(bytes: &[u8]) -> sluice::proto::rls::RateLimitResponse {
    sluice::proto::rls::RateLimitResponse::decode(bytes).expect("a RateLimitResponse")
}

#[tokio::test]
async fn a_message_that_does_not_decode_is_invalid_argument() {
    let server = start().await;
    let mut client = raw_client(&server).await;

    // The raw client itself works: a real message is answered.
    let ok = request("api", &[&[("client", "raw-1")]]).encode_to_vec();
    let answer = raw_call(&mut client, SHOULD_RATE_LIMIT, ok)
        .await
        .expect("answered");
    assert_eq!(decoded(&answer).overall_code(), Code::Ok);

    for garbage in [
        vec![0xff, 0xff, 0xff],
        // Field 1 (domain) as a string 100 bytes long, with 2 bytes.
        vec![0x0a, 100, b'a', b'b'],
        // Field 0 does not exist.
        vec![0, 0, 0],
    ] {
        let status = raw_call(&mut client, SHOULD_RATE_LIMIT, garbage.clone())
            .await
            .expect_err("garbage was answered");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{garbage:?}: {status:?}"
        );
        assert!(
            status.message().contains("does not decode"),
            "{garbage:?}: {}",
            status.message()
        );
    }
}

#[tokio::test]
async fn a_message_over_the_bound_is_resource_exhausted_naming_the_bound() {
    let server = start().await;
    let mut client = raw_client(&server).await;

    let status = raw_call(
        &mut client,
        SHOULD_RATE_LIMIT,
        vec![0; MAX_REQUEST_BYTES + 1],
    )
    .await
    .expect_err("a message over the bound was answered");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(&MAX_REQUEST_BYTES.to_string())
            && status
                .message()
                .contains(&(MAX_REQUEST_BYTES + 1).to_string()),
        "{}",
        status.message()
    );

    // A message exactly at the bound is read and decoded (zeros do not
    // decode: field 0 does not exist).
    let status = raw_call(&mut client, SHOULD_RATE_LIMIT, vec![0; MAX_REQUEST_BYTES])
        .await
        .expect_err("zeros were answered");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // The connection still serves calls.
    let ok = request("api", &[&[("client", "raw-2")]]).encode_to_vec();
    let answer = raw_call(&mut client, SHOULD_RATE_LIMIT, ok)
        .await
        .expect("answered");
    assert_eq!(decoded(&answer).overall_code(), Code::Ok);
}

/// The largest request the bounds admit: every descriptor, entry, key and
/// value at its bound.
fn largest_valid_request() -> RateLimitRequest {
    let entry = |i: usize| Entry {
        key: format!("{i:0>width$}", width = bounds::MAX_KEY_LEN),
        value: "v".repeat(bounds::MAX_VALUE_LEN),
    };
    RateLimitRequest {
        domain: "d".repeat(bounds::MAX_DOMAIN_LEN),
        descriptors: (0..bounds::MAX_DESCRIPTORS)
            .map(|_| RateLimitDescriptor {
                entries: (0..bounds::MAX_ENTRIES).map(entry).collect(),
                limit: None,
                hits_addend: Some(bounds::MAX_HITS.into()),
            })
            .collect(),
        hits_addend: u32::MAX,
    }
}

#[tokio::test]
async fn the_largest_valid_request_fits_the_bound_in_protobuf_and_json() {
    let largest = largest_valid_request();
    let proto = largest.encoded_len();
    let json = serde_json::to_vec(&largest).unwrap().len();
    assert!(proto * 3 <= MAX_REQUEST_BYTES, "{proto} bytes of protobuf");
    assert!(json < MAX_REQUEST_BYTES, "{json} bytes of JSON");

    let server = start().await;
    let mut client = server.client().await;
    let answer = client
        .should_rate_limit(largest.clone())
        .await
        .expect("the largest valid request is answered")
        .into_inner();
    assert_eq!(answer.statuses.len(), bounds::MAX_DESCRIPTORS);

    let body = serde_json::to_string(&largest).unwrap();
    let response = post_json(server.http_addr, "/json", &body).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
}

fn assert_too_large(response: &HttpResponse) {
    assert_eq!(response.status, 413, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    let error = response.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains(&MAX_REQUEST_BYTES.to_string()),
        "the bound is not named: {error}"
    );
}

/// Sends a request head, then `body` as chunks without ever ending it, and
/// reads the answer: the server must answer without the end of the body.
async fn post_unfinished(
    server: &TestServer,
    path: &str,
    head: &str,
    body: Vec<u8>,
) -> HttpResponse {
    let stream = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: sluice\r\nconnection: close\r\ncontent-type: application/json\r\n{head}\r\n"
    );
    // Writes fail once the server has answered and closed; that is fine.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&body).await;
        // Keep the connection open: the body never ends.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut raw)).await;
    writer.abort();
    assert!(
        read.is_ok(),
        "no answer within 10 s: the server waited for the rest of the body"
    );
    support::http::parse(&raw).expect("an HTTP response")
}

#[tokio::test]
async fn json_and_explain_bodies_over_the_bound_are_413_with_a_json_error() {
    let server = start().await;
    for path in ["/json", "/explain"] {
        // Declared too long: answered from the head, before any body.
        let head = format!("content-length: {}\r\n", MAX_REQUEST_BYTES + 1);
        assert_too_large(&post_unfinished(&server, path, &head, Vec::new()).await);

        // Chunked, with no length: answered once the bound is passed,
        // though the body goes on.
        let mut body = Vec::new();
        let chunk = vec![b' '; 64 * 1024];
        while body.len() <= MAX_REQUEST_BYTES + chunk.len() {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(&chunk);
            body.extend_from_slice(b"\r\n");
        }
        let head = "transfer-encoding: chunked\r\n";
        assert_too_large(&post_unfinished(&server, path, head, body).await);

        // At the bound, the body is read and judged as JSON.
        let mut body = vec![b' '; MAX_REQUEST_BYTES - 2];
        body.extend_from_slice(b"{}");
        let response = post_json(server.http_addr, path, std::str::from_utf8(&body).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status, 400, "{}", response.text());
        assert!(response.json()["error"].is_string());
    }
}
