//! `ShouldRateLimit` on a short path: the call Envoy makes for every request
//! is answered inside its connection's task ([`super::server`]), which reads
//! the one request message and writes the answer on the HTTP/2 stream
//! itself. Every other call (the other services, and calls this path leaves
//! alone: compressed ones) goes to tonic's router.
//!
//! The answer is the one tonic's generated service gives, from the same
//! [`RateLimitHandler`]: the same statuses and messages (a message that
//! does not decode is `INVALID_ARGUMENT`, as the generated services' codec makes it), the same bound on
//! the request message ([`MAX_REQUEST_BYTES`], `RESOURCE_EXHAUSTED` as
//! [`super::Bounded`] answers), one data frame and `grpc-status: 0` in the
//! trailers. What it saves per call is the router, tonic's streaming codec,
//! a task, and the boxed futures and bodies between them (BENCHMARKS.md has
//! the numbers).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut as _, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use prost::Message as _;
use tonic::codegen::http::{self, header, HeaderMap, HeaderName, HeaderValue};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::bounded::{over_the_bound, Prefixes};
use super::server::{deadline, deadline_passed, within, RequestBody};
use super::RateLimitHandler;
use crate::limiter::bounds::MAX_REQUEST_BYTES;
use crate::listen::CallGuard;
use crate::proto::rls::{RateLimitRequest, RateLimitResponse};

/// The one method this path answers.
pub const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

// Names known at compile time: looked up without parsing them per call.
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether the short path answers `request`: `ShouldRateLimit` in protobuf,
/// uncompressed. A compressed call goes to tonic, which refuses it as it
/// refuses every compressed call (sluice accepts no compression).
pub fn takes<B>(request: &http::Request<B>) -> bool {
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
            .get(&GRPC_ENCODING)
            .is_none_or(|e| e.as_bytes() == b"identity")
}

/// Answers one `ShouldRateLimit` call on its stream, within the call's
/// `grpc-timeout`. The call counts on its connection until it is answered.
pub async fn answer(
    handler: &RateLimitHandler,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    _call: CallGuard,
) {
    let (parts, body) = request.into_parts();
    let deadline = deadline(&parts.headers);
    let decided = within(deadline, decide(handler, parts.headers, body)).await;
    let (head, message) = match decided {
        Some(Ok(message)) => (ok_head(), framed(&message)),
        Some(Err(status)) => (status.into_http::<()>(), Bytes::new()),
        None => (deadline_passed().into_http::<()>(), Bytes::new()),
    };
    // A status alone is a trailers-only response: the head ends the stream.
    let Ok(mut stream) = respond.send_response(head, message.is_empty()) else {
        return;
    };
    if !message.is_empty() && stream.send_data(message, false).is_ok() {
        let _ = stream.send_trailers(ok_trailers());
    }
}

async fn decide(
    handler: &RateLimitHandler,
    headers: HeaderMap,
    body: RecvStream,
) -> Result<RateLimitResponse, Status> {
    let message = read_message(RequestBody::new(body)).await?;
    let message = RateLimitRequest::decode(message).map_err(crate::proto::does_not_decode)?;
    let metadata = MetadataMap::from_headers(headers);
    handler.answer(message, &metadata).await
}

/// The head of a successful answer.
fn ok_head() -> http::Response<()> {
    let mut head = http::Response::new(());
    head.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    head
}

/// The call's first message, without its prefix; the rest of the body is
/// read for the bound and dropped, as tonic's unary calls do.
async fn read_message<B>(body: B) -> Result<Bytes, Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut prefixes = Prefixes::default();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        let Ok(data) = frame.into_data() else {
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
    trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
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
        read_message(body).await
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

    #[test]
    fn only_uncompressed_should_rate_limit_calls_are_taken() {
        let request = |path: &str, content_type: &str, encoding: Option<&str>| {
            let mut r = http::Request::builder()
                .uri(format!("http://sluice{path}"))
                .header(header::CONTENT_TYPE, content_type);
            if let Some(e) = encoding {
                r = r.header("grpc-encoding", e);
            }
            r.body(()).unwrap()
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
