//! `ShouldRateLimit` on a short path: the call Envoy makes for every request
//! is answered by a layer in front of tonic's router, which reads the one
//! request message and writes the answer itself. Everything else (the other
//! services, and calls this layer leaves alone: compressed ones) goes
//! through tonic as before, and so do tonic's own layers around it (the
//! `grpc-timeout` deadline, the call count of [`crate::listen::CountCalls`]).
//!
//! The answer is the one tonic's generated service gives, from the same
//! [`RateLimitHandler`]: the same statuses and messages (a message that
//! does not decode is `INVALID_ARGUMENT`, as the generated services' codec makes it), the same bound on
//! the request message ([`MAX_REQUEST_BYTES`], `RESOURCE_EXHAUSTED` as
//! [`super::Bounded`] answers), one data frame and `grpc-status: 0` in the
//! trailers. What it saves per call is the router, tonic's streaming codec
//! and its boxed futures and bodies (BENCHMARKS.md has the numbers).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut as _, Bytes, BytesMut};
use futures::future::{BoxFuture, Either, FutureExt as _};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use prost::Message as _;
use tonic::body::Body;
use tonic::codegen::http::{self, header, HeaderMap, HeaderValue};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::bounded::{over_the_bound, Prefixes};
use super::RateLimitHandler;
use crate::limiter::bounds::MAX_REQUEST_BYTES;
use crate::proto::rls::{RateLimitRequest, RateLimitResponse};

/// The one method this layer answers.
pub const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// A layer for tonic's server that answers `ShouldRateLimit` itself.
#[derive(Clone)]
pub struct ShortPath {
    handler: Arc<RateLimitHandler>,
}

impl ShortPath {
    pub fn new(handler: Arc<RateLimitHandler>) -> ShortPath {
        ShortPath { handler }
    }
}

impl<S> tower_layer::Layer<S> for ShortPath {
    type Service = ShortPathService<S>;

    fn layer(&self, inner: S) -> ShortPathService<S> {
        ShortPathService {
            inner,
            handler: self.handler.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ShortPathService<S> {
    inner: S,
    handler: Arc<RateLimitHandler>,
}

impl<S> tower_service::Service<http::Request<Body>> for ShortPathService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Answer<S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !takes(&request) {
            return Either::Left(self.inner.call(request));
        }
        let answer: BoxFuture<'static, http::Response<Body>> =
            Box::pin(answer(self.handler.clone(), request));
        Either::Right(answer.map(Ok as fn(_) -> _))
    }
}

/// The short path's answer, as the inner service's result.
type Answer<E> = futures::future::Map<
    BoxFuture<'static, http::Response<Body>>,
    fn(http::Response<Body>) -> Result<http::Response<Body>, E>,
>;

/// Whether this layer answers `request`: `ShouldRateLimit` in protobuf,
/// uncompressed. A compressed call goes to tonic, which refuses it as it
/// refuses every compressed call (sluice accepts no compression).
fn takes(request: &http::Request<Body>) -> bool {
    // The path first: every other call is passed on after one comparison.
    if request.uri().path() != SHOULD_RATE_LIMIT {
        return false;
    }
    let headers = request.headers();
    let protobuf = headers.get(header::CONTENT_TYPE).is_some_and(|t| {
        t.as_bytes() == b"application/grpc" || t.as_bytes() == b"application/grpc+proto"
    });
    protobuf
        && headers
            .get("grpc-encoding")
            .is_none_or(|e| e.as_bytes() == b"identity")
}

async fn answer(
    handler: Arc<RateLimitHandler>,
    request: http::Request<Body>,
) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let message = match read_message(body).await {
        Ok(bytes) => bytes,
        Err(status) => return status.into_http(),
    };
    let message = match RateLimitRequest::decode(message) {
        Ok(message) => message,
        Err(e) => return crate::proto::does_not_decode(e).into_http(),
    };
    let metadata = MetadataMap::from_headers(parts.headers);
    match handler.answer(message, &metadata).await {
        Ok(response) => ok(&response),
        Err(status) => status.into_http(),
    }
}

/// The call's first message, without its prefix; the rest of the body is
/// read for the bound and dropped, as tonic's unary calls do.
async fn read_message(body: Body) -> Result<Bytes, Status> {
    let mut body = std::pin::pin!(body);
    let mut prefixes = Prefixes::default();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        prefixes
            .read(&data, MAX_REQUEST_BYTES)
            .map_err(|len| over_the_bound(len, MAX_REQUEST_BYTES))?;
        if first_message_len(&buf).is_none_or(|len| buf.len() < 5 + len) {
            buf.extend_from_slice(&data);
        }
    }
    let Some(len) = first_message_len(&buf) else {
        return Err(if buf.is_empty() {
            Status::internal("Missing request message.")
        } else {
            Status::internal("Unexpected EOF decoding stream.")
        });
    };
    if buf.len() < 5 + len {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    match buf[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        flag => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1)"
            )))
        }
    }
    Ok(buf.freeze().slice(5..5 + len))
}

/// The length in the first message's prefix, once all five bytes are in.
fn first_message_len(buf: &[u8]) -> Option<usize> {
    match buf {
        [_, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d]) as usize),
        _ => None,
    }
}

/// A successful answer: the message in one data frame, then the trailers.
fn ok(message: &RateLimitResponse) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(OkBody::new(framed(message))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// `message` as one gRPC message: the uncompressed flag, its length (u32,
/// big-endian), its bytes.
pub fn framed(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message.encode_raw(&mut buf);
    buf.freeze()
}

/// The trailers of a successful call.
pub fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers
}

/// A successful call's response body: one framed message, then
/// [`ok_trailers`].
pub struct OkBody {
    data: Option<Bytes>,
    done: bool,
}

impl OkBody {
    pub fn new(framed: Bytes) -> OkBody {
        OkBody {
            data: Some(framed),
            done: false,
        }
    }
}

impl http_body::Body for OkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(ok_trailers()))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.done
    }

    fn size_hint(&self) -> SizeHint {
        match &self.data {
            Some(data) => SizeHint::with_exact(data.len() as u64),
            None => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut m = vec![flag];
        m.extend_from_slice(&(message.len() as u32).to_be_bytes());
        m.extend_from_slice(message);
        m
    }

    async fn read_chunks(chunks: Vec<Vec<u8>>) -> Result<Bytes, Status> {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        read_message(Body::new(body)).await
    }

    #[tokio::test]
    async fn the_first_message_is_read_in_any_split() {
        let mut stream = prefixed(0, b"hello");
        stream.extend(prefixed(0, b"ignored"));
        for size in 1..stream.len() {
            let chunks = stream.chunks(size).map(<[u8]>::to_vec).collect();
            assert_eq!(read_chunks(chunks).await.unwrap(), &b"hello"[..], "{size}");
        }
    }

    #[tokio::test]
    async fn bad_bodies_get_tonics_statuses() {
        let status = |r: Result<Bytes, Status>| {
            let s = r.unwrap_err();
            (s.code(), s.message().to_owned())
        };
        let (code, message) = status(read_chunks(vec![]).await);
        assert_eq!(
            (code, message.as_str()),
            (tonic::Code::Internal, "Missing request message.")
        );
        let (code, message) = status(read_chunks(vec![vec![0, 0, 0, 0, 9, 1]]).await);
        assert_eq!(
            (code, message.as_str()),
            (tonic::Code::Internal, "Unexpected EOF decoding stream.")
        );
        let (code, message) = status(read_chunks(vec![prefixed(1, b"x")]).await);
        assert_eq!(code, tonic::Code::Internal);
        assert!(message.contains("compressed-flag"), "{message}");
        let (code, message) = status(read_chunks(vec![prefixed(7, b"x")]).await);
        assert_eq!(code, tonic::Code::Internal);
        assert!(message.contains("invalid compression flag: 7"), "{message}");
        // Over the bound: refused from the prefix, the rest never sent.
        let len = (MAX_REQUEST_BYTES as u32 + 1).to_be_bytes();
        let (code, message) =
            status(read_chunks(vec![vec![0, len[0], len[1], len[2], len[3]]]).await);
        assert_eq!(code, tonic::Code::ResourceExhausted);
        assert!(
            message.contains(&MAX_REQUEST_BYTES.to_string()),
            "{message}"
        );
    }

    #[tokio::test]
    async fn an_answer_is_one_message_then_grpc_status_0() {
        let response = ok(&RateLimitResponse {
            overall_code: 1,
            ..RateLimitResponse::default()
        });
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        let bytes = collected.to_bytes();
        assert_eq!(first_message_len(&bytes), Some(bytes.len() - 5));
        let decoded = RateLimitResponse::decode(&bytes[5..]).unwrap();
        assert_eq!(decoded.overall_code, 1);
    }

    /// The service behind the layer: it answers UNIMPLEMENTED, so a call
    /// that reaches it is told so.
    #[derive(Clone)]
    struct Unimplemented;

    impl tower_service::Service<http::Request<Body>> for Unimplemented {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::ready(Ok(Status::unimplemented("not here").into_http()))
        }
    }

    fn limiter() -> Arc<crate::service::RateLimiter> {
        use crate::limiter::KeyHasher;
        use crate::service::{FailureMode, LimiterSettings};
        let yaml = "domain: api\ndescriptors:\n  - key: client\n    rate_limit: { unit: minute, requests_per_unit: 1 }\n";
        let root = crate::rules::yaml::parse_str("api.yaml", yaml).unwrap();
        let rules = crate::rules::yaml::compile_all(&[("api.yaml".into(), root)]).unwrap();
        let clock = Arc::new(crate::clock::ManualClock::new(1_700_000_000_000_000));
        let store = Arc::new(crate::storage::memory::MemoryStore::new(100, clock.clone()));
        Arc::new(crate::service::RateLimiter::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(rules)),
            store,
            KeyHasher::from_secret(b"test"),
            LimiterSettings::for_tests(FailureMode::Allow),
            clock,
        ))
    }

    #[tokio::test]
    async fn should_rate_limit_is_answered_by_the_layer_and_the_rest_passed_on() {
        use crate::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
        use tower_layer::Layer as _;
        use tower_service::Service as _;
        let handler = Arc::new(RateLimitHandler::new(limiter()));
        let mut service = ShortPath::new(handler).layer(Unimplemented);
        let message = RateLimitRequest {
            domain: "api".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "client".into(),
                    value: "a".into(),
                }],
                ..RateLimitDescriptor::default()
            }],
            ..RateLimitRequest::default()
        };
        let call = |path: &str| {
            http::Request::builder()
                .uri(format!("http://sluice{path}"))
                .header(header::CONTENT_TYPE, "application/grpc")
                .body(Body::new(http_body_util::Full::new(framed(&message))))
                .unwrap()
        };
        // Decided here, against the rule: OK, then OVER_LIMIT (1 a minute).
        for expected in [1, 2] {
            let response = service.call(call(SHOULD_RATE_LIMIT)).await.unwrap();
            assert!(response.headers().get("grpc-status").is_none());
            let collected = response.into_body().collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
            let bytes = collected.to_bytes();
            let answer = RateLimitResponse::decode(&bytes[5..]).unwrap();
            assert_eq!(answer.overall_code, expected);
        }
        // Any other method reaches the service behind.
        let response = service
            .call(call("/sluice.v1.Sluice/Explain"))
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "12");
    }

    #[test]
    fn only_uncompressed_should_rate_limit_calls_are_taken() {
        let request = |path: &str, content_type: &str, encoding: Option<&str>| {
            let mut r = http::Request::builder()
                .uri(format!("http://sluice{path}"))
                .header(header::CONTENT_TYPE, content_type);
            if let Some(e) = encoding {
                r = r.header("grpc-encoding", e);
            }
            r.body(Body::default()).unwrap()
        };
        assert!(takes(&request(SHOULD_RATE_LIMIT, "application/grpc", None)));
        assert!(takes(&request(
            SHOULD_RATE_LIMIT,
            "application/grpc+proto",
            Some("identity")
        )));
        assert!(!takes(&request(
            SHOULD_RATE_LIMIT,
            "application/grpc",
            Some("gzip")
        )));
        assert!(!takes(&request(
            SHOULD_RATE_LIMIT,
            "application/grpc-web",
            None
        )));
        assert!(!takes(&request(
            "/sluice.v1.Sluice/Explain",
            "application/grpc",
            None
        )));
    }
}
