//! sluice's gRPC server, on the `h2` crate directly.
//!
//! Every connection is served by one task. `ShouldRateLimit`, the call
//! Envoy makes for every request it forwards, is answered inside that task
//! ([`super::short`]): its future is polled beside the connection's own, so
//! a decision costs no task of its own, no tower service and no boxed body.
//! Every other call (health, reflection, `Explain`, the quota streams, and
//! a compressed `ShouldRateLimit`) goes to tonic's router in a task of its
//! own, as a tonic server would run it.
//!
//! What tonic's server did around the calls is done here:
//! - HTTP/2 bounds: `SETTINGS_MAX_CONCURRENT_STREAMS`, the header list
//!   size, 1 MiB flow-control windows (hyper's defaults), and h2's
//!   defences against streams reset in floods;
//! - keepalive: a PING after an interval with nothing read from the
//!   client, and the connection closed when it goes unanswered
//!   ([`Keepalive`]);
//! - the connection's age: past it a GOAWAY, then a grace period for the
//!   calls in flight;
//! - graceful shutdown: a GOAWAY on every connection when the server
//!   stops; the caller bounds the wait (`app`'s grace period);
//! - the `grpc-timeout` deadline of every call, answered
//!   `DEADLINE_EXCEEDED` when it passes first;
//! - each connection's calls counted for its idle timeout
//!   ([`crate::listen`] closes a connection idle too long).
//!
//! BENCHMARKS.md measures what this saves per call against tonic's server.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use h2::server::SendResponse;
use h2::{Ping, PingPong, RecvStream, SendStream};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tonic::codegen::http::{self, HeaderMap, HeaderName};
use tonic::service::Routes;
use tonic::Status;
use tower_service::Service as _;

use super::short;
use super::RateLimitHandler;
use crate::listen::{CallGuard, Connection, ConnectionSettings, Incoming};

/// The HTTP/2 flow-control windows a client may fill before it waits for
/// an update: hyper's defaults, which tonic's server used.
const WINDOW: u32 = 1024 * 1024;
/// The most response bytes buffered per connection, waiting for the
/// client's window (hyper's default).
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// What the server answers with: `ShouldRateLimit` on the short path, and
/// tonic's router for everything else.
pub struct GrpcServer {
    rate_limit: Arc<RateLimitHandler>,
    routes: Routes,
    /// The port's bounds: streams, header size, keepalive, connection age.
    settings: ConnectionSettings,
    /// How long the calls in flight on a connection past its age may take
    /// before the connection is closed under them.
    age_grace: Duration,
}

impl GrpcServer {
    pub fn new(
        rate_limit: Arc<RateLimitHandler>,
        routes: Routes,
        settings: ConnectionSettings,
        age_grace: Duration,
    ) -> GrpcServer {
        GrpcServer {
            rate_limit,
            routes: routes.prepare(),
            settings,
            age_grace,
        }
    }

    /// Serves the connections of `incoming` until `shutdown` completes,
    /// then sends each a GOAWAY and returns once their calls are done. The
    /// caller bounds that wait: dropping the future closes the connections
    /// still open.
    pub async fn serve<T>(
        self: Arc<Self>,
        mut incoming: Incoming<Connection<T>>,
        shutdown: impl Future<Output = ()>,
    ) where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = pin!(shutdown);
        loop {
            tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(io)) => {
                        connections.spawn(self.clone().connection(io, stop_rx.clone()));
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "a gRPC connection failed before it was served"),
                    None => break,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                () = &mut shutdown => break,
            }
        }
        // No more connections; a GOAWAY to those open.
        drop(incoming);
        let _ = stop_tx.send(true);
        while connections.join_next().await.is_some() {}
    }

    fn h2_builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_streams(self.settings.max_concurrent_streams)
            .max_header_list_size(self.settings.max_header_bytes);
        builder
    }

    /// One connection, from the HTTP/2 handshake until it closes.
    async fn connection<T>(
        self: Arc<Self>,
        io: Connection<T>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = io.peer();
        let calls = io.calls();
        let reads = io.reads();
        let mut h2 = match self.h2_builder().handshake::<_, Bytes>(io).await {
            Ok(h2) => h2,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
        };
        let mut keepalive = match (self.settings.keepalive_interval, h2.ping_pong()) {
            (Some(interval), Some(ping_pong)) => Some(Keepalive::new(
                ping_pong,
                reads,
                interval,
                self.settings.keepalive_timeout,
            )),
            _ => None,
        };
        // Past its age, a GOAWAY; past the grace after it, closed.
        let mut age = self
            .settings
            .max_connection_age
            .map(|age| Box::pin(tokio::time::sleep(age)));
        let mut aged = false;
        let mut stopping = pin!(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        });
        let mut stopped = false;

        // The short path's calls, polled in this task.
        let mut decisions = FuturesUnordered::new();
        // Calls for tonic's router, each in a task of its own, ended with
        // the connection.
        let mut routed = JoinSet::new();
        let start = |request: http::Request<RecvStream>, respond| {
            let call = calls.begin();
            if short::takes(&request) {
                Call::Decision(short::answer(&self.rate_limit, request, respond, call))
            } else {
                Call::Routed(route(self.routes.clone(), request, respond, call))
            }
        };
        loop {
            tokio::select! {
                closed = poll_fn(|cx| poll_calls(&mut h2, &mut decisions, &mut routed, &start, cx)) => {
                    if let Err(e) = closed {
                        tracing::debug!(%peer, error = %e, "gRPC connection failed");
                    }
                    break;
                }
                () = &mut stopping, if !stopped => {
                    stopped = true;
                    h2.graceful_shutdown();
                }
                () = poll_fn(|cx| poll_sleep(&mut age, cx)), if age.is_some() => {
                    if aged {
                        tracing::debug!(%peer, "connection past its age and grace: closing");
                        break;
                    }
                    aged = true;
                    h2.graceful_shutdown();
                    age = Some(Box::pin(tokio::time::sleep(self.age_grace)));
                }
                () = poll_fn(|cx| poll_keepalive(&mut keepalive, cx)), if keepalive.is_some() => {
                    tracing::debug!(%peer, "keepalive PING unanswered: closing the connection");
                    break;
                }
            }
        }
    }
}

/// A call begun: a decision, polled in its connection's task, or a call
/// for tonic's router, spawned.
enum Call<D, R> {
    Decision(D),
    Routed(R),
}

/// Drives a connection's calls: accepts every stream that has arrived,
/// starts its call, and polls the decisions under way, round after round
/// until nothing moves. The connection is polled again after every round
/// that answered a call, so the answers of one wake-up go out together, in
/// one write, not in one write each. Ready when the connection has closed
/// (`Ok`) or failed.
fn poll_calls<T, D, R>(
    h2: &mut h2::server::Connection<T, Bytes>,
    decisions: &mut FuturesUnordered<D>,
    routed: &mut JoinSet<()>,
    start: &impl Fn(http::Request<RecvStream>, SendResponse<Bytes>) -> Call<D, R>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), h2::Error>>
where
    T: AsyncRead + AsyncWrite + Unpin,
    D: Future<Output = ()>,
    R: Future<Output = ()> + Send + 'static,
{
    loop {
        loop {
            match h2.poll_accept(cx) {
                Poll::Ready(Some(Ok((request, respond)))) => match start(request, respond) {
                    Call::Decision(decision) => decisions.push(decision),
                    Call::Routed(call) => {
                        routed.spawn(call);
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                // Closed, by the client or after a GOAWAY once the last
                // call ended.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        let mut answered = false;
        while let Poll::Ready(Some(())) = decisions.poll_next_unpin(cx) {
            answered = true;
        }
        while let Poll::Ready(Some(_)) = routed.poll_join_next(cx) {}
        if !answered {
            return Poll::Pending;
        }
    }
}

fn poll_sleep(sleep: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    match sleep {
        Some(sleep) => sleep.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

fn poll_keepalive(keepalive: &mut Option<Keepalive>, cx: &mut Context<'_>) -> Poll<()> {
    match keepalive {
        Some(keepalive) => keepalive.poll_dead(cx),
        None => Poll::Pending,
    }
}

// === Keepalive ===

/// A connection's keepalive: a PING once the client has sent nothing for
/// the interval, and the connection taken for dead when the PING goes
/// unanswered for the timeout. Reads only count up (in the connection's
/// reader); the timer looks at the count when it fires, so a busy
/// connection costs it one timer reset per interval.
struct Keepalive {
    ping_pong: PingPong,
    reads: Arc<AtomicU64>,
    seen: u64,
    interval: Duration,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    awaiting_pong: bool,
}

impl Keepalive {
    fn new(
        ping_pong: PingPong,
        reads: Arc<AtomicU64>,
        interval: Duration,
        timeout: Duration,
    ) -> Keepalive {
        Keepalive {
            ping_pong,
            seen: reads.load(Ordering::Relaxed),
            reads,
            interval,
            timeout,
            sleep: Box::pin(tokio::time::sleep(interval)),
            awaiting_pong: false,
        }
    }

    /// Ready when the client is taken for dead.
    fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.awaiting_pong {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.seen = self.reads.load(Ordering::Relaxed);
                        self.sleep.as_mut().reset(Instant::now() + self.interval);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
                ready!(self.sleep.as_mut().poll(cx));
                return Poll::Ready(());
            }
            ready!(self.sleep.as_mut().poll(cx));
            let reads = self.reads.load(Ordering::Relaxed);
            if reads != self.seen {
                self.seen = reads;
                self.sleep.as_mut().reset(Instant::now() + self.interval);
                continue;
            }
            if self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            self.awaiting_pong = true;
            self.sleep.as_mut().reset(Instant::now() + self.timeout);
        }
    }
}

// === Calls for tonic's router ===

/// One call through tonic's router: its response, then its body, written
/// to the stream. The call counts on its connection until it ends.
async fn route(
    mut routes: Routes,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    _call: CallGuard,
) {
    let deadline = deadline(request.headers());
    let request = request.map(|body| tonic::body::Body::new(RequestBody::new(body)));
    // The router is always ready.
    let _ = poll_fn(|cx| {
        tower_service::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut routes, cx)
    })
    .await;
    let response = within(deadline, routes.call(request)).await;
    let response = match response {
        Some(Ok(response)) => response,
        Some(Err(infallible)) => match infallible {},
        None => deadline_passed().into_http(),
    };
    let (head, body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(mut stream) = respond.send_response(http::Response::from_parts(head, ()), end) else {
        return;
    };
    if !end {
        pipe(body, &mut stream).await;
    }
}

/// Writes a response body to its stream within the client's flow-control
/// window, and stops when the client resets the stream.
async fn pipe(body: tonic::body::Body, stream: &mut SendStream<Bytes>) {
    let mut body = pin!(body);
    loop {
        let frame = tokio::select! {
            _ = poll_fn(|cx| stream.poll_reset(cx)) => return,
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(status)) => {
                tracing::debug!(%status, "a response body failed: resetting the stream");
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        };
        // Reserved only once the data is here: a reservation held while
        // waiting for the body would take window from the other streams.
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            let capacity = poll_fn(|cx| {
                if stream.poll_reset(cx).is_ready() {
                    return Poll::Ready(None);
                }
                stream.poll_capacity(cx)
            })
            .await;
            match capacity {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let chunk = data.split_to(n.min(data.len()));
                    if stream.send_data(chunk, false).is_err() {
                        return;
                    }
                }
                Some(Err(_)) | None => return,
            }
        }
    }
}

// === Request bodies ===

/// A request's body as an `http_body::Body`, giving its window back to the
/// client as each chunk is taken.
pub struct RequestBody {
    stream: RecvStream,
    data_done: bool,
}

impl RequestBody {
    pub fn new(stream: RecvStream) -> RequestBody {
        RequestBody {
            stream,
            data_done: false,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

// === Deadlines ===

/// The call's `grpc-timeout`, if it sent one that parses (gRPC over HTTP/2:
/// at most 8 digits, then `H`, `M`, `S`, `m`, `u` or `n`). One that does
/// not parse is ignored, as tonic's server ignores it.
pub fn deadline(headers: &HeaderMap) -> Option<Duration> {
    // A name known at compile time: looked up without parsing it per call.
    const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `future`'s output, or `None` once `deadline` passes first. No timer is
/// set for a call without a deadline.
pub async fn within<F: Future>(deadline: Option<Duration>, future: F) -> Option<F::Output> {
    match deadline {
        Some(deadline) => tokio::time::timeout(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

/// The answer to a call whose deadline passed before its answer.
pub fn deadline_passed() -> Status {
    Status::deadline_exceeded("the call's grpc-timeout passed before its answer")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use futures::future::BoxFuture;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::listen::{self, Limits, HTTP2_PREFACE};
    use crate::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
    use crate::proto::rls::rate_limit_service_client::RateLimitServiceClient;
    use crate::proto::rls::RateLimitRequest;

    fn with_timeout(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", http::HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_bad_ones_are_ignored() {
        let cases = [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("20m", Some(Duration::from_millis(20))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("5n", Some(Duration::from_nanos(5))),
            ("123456789m", None),
            ("m", None),
            ("10", None),
            ("10x", None),
            ("-1S", None),
            ("1.5S", None),
            ("", None),
        ];
        for (value, expected) in cases {
            assert_eq!(deadline(&with_timeout(value)), expected, "{value:?}");
        }
        assert_eq!(deadline(&HeaderMap::new()), None);
    }

    /// A service behind the router that answers OK after [`Slow::TAKES`].
    #[derive(Clone)]
    struct Slow;

    impl Slow {
        const TAKES: Duration = Duration::from_millis(400);
        const PATH: &'static str = "/test.Slow/Call";
    }

    impl tonic::server::NamedService for Slow {
        const NAME: &'static str = "test.Slow";
    }

    impl tower_service::Service<http::Request<tonic::body::Body>> for Slow {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async {
                tokio::time::sleep(Slow::TAKES).await;
                Ok(Status::ok("").into_http())
            })
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

    /// The grace past a connection's age, in the tests.
    const GRACE: Duration = Duration::from_millis(300);

    struct Running {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        served: tokio::task::JoinHandle<()>,
    }

    async fn start(settings: ConnectionSettings) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: None,
        };
        let incoming = listen::incoming(listener, "test", limits, |mut tcp| async move {
            let preface = listen::read_preface(&mut tcp).await?;
            Ok::<_, std::io::Error>((tcp, preface))
        });
        let (_, health) = tonic_health::server::health_reporter();
        let routes = Routes::new(health).add_service(Slow);
        let handler = Arc::new(RateLimitHandler::new(limiter()));
        let server = Arc::new(GrpcServer::new(handler, routes, settings, GRACE));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(server.serve(incoming, async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            stop: Some(stop),
            served,
        }
    }

    /// An HTTP/2 client of `h2` itself, for calls tonic's client would
    /// time out on its own side.
    async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// Calls `path` with an empty message; the response's head.
    async fn call(
        client: &mut h2::client::SendRequest<Bytes>,
        path: &str,
        timeout: Option<&'static str>,
    ) -> http::response::Parts {
        let mut request = http::Request::post(format!("http://sluice{path}"))
            .header("content-type", "application/grpc");
        if let Some(timeout) = timeout {
            request = request.header("grpc-timeout", timeout);
        }
        let (response, mut send) = client
            .send_request(request.body(()).unwrap(), false)
            .unwrap();
        send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        response.await.unwrap().into_parts().0
    }

    /// The next frame's type and flags off a raw connection; `None` once
    /// the server has closed it.
    async fn next_frame(tcp: &mut TcpStream) -> Option<(u8, u8)> {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4]))
    }

    const SETTINGS: u8 = 4;
    const PING: u8 = 6;
    const GOAWAY: u8 = 7;
    /// A client's first frames: the preface and empty SETTINGS.
    async fn raw_client(addr: SocketAddr) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(HTTP2_PREFACE).await.unwrap();
        tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        tcp
    }

    /// Reads frames until one of `kind` (not an ACK) arrives, within `within`.
    async fn frame_of(tcp: &mut TcpStream, kind: u8, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            while let Some((t, flags)) = next_frame(tcp).await {
                if t == kind && flags & 1 == 0 {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }

    async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
        tokio::time::timeout(within, async { while next_frame(tcp).await.is_some() {} })
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn decisions_are_answered_and_other_calls_routed() {
        let server = start(ConnectionSettings::default()).await;
        let mut client = RateLimitServiceClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
        let request = RateLimitRequest {
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
        // Decided against the rule: OK, then OVER_LIMIT (1 a minute).
        for expected in [1, 2] {
            let answer = client.should_rate_limit(request.clone()).await.unwrap();
            assert_eq!(answer.into_inner().overall_code, expected);
        }
        // A message that does not decode: INVALID_ARGUMENT, on the short path.
        let mut raw = h2_client(server.addr).await;
        let mut bad = http::Request::post(format!("http://sluice{}", short::SHOULD_RATE_LIMIT))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        bad.headers_mut()
            .insert("te", http::HeaderValue::from_static("trailers"));
        let (response, mut send) = raw.send_request(bad, false).unwrap();
        send.send_data(Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]), true)
            .unwrap();
        let head = response.await.unwrap().into_parts().0;
        assert_eq!(head.headers["grpc-status"], "3", "{head:?}");
        // Health, through tonic's router.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        assert_eq!(serving.into_inner().status, 1);
        // A method no service has.
        let head = call(&mut raw, "/test.Nothing/Here", None).await;
        assert_eq!(head.headers["grpc-status"], "12", "{head:?}");
    }

    #[tokio::test]
    async fn a_call_past_its_grpc_timeout_is_answered_deadline_exceeded() {
        let server = start(ConnectionSettings::default()).await;
        let mut client = h2_client(server.addr).await;
        let head = call(&mut client, Slow::PATH, Some("50m")).await;
        assert_eq!(head.headers["grpc-status"], "4", "{head:?}");
        // Within its deadline: answered by the service.
        let head = call(&mut client, Slow::PATH, Some("30S")).await;
        assert_eq!(head.headers["grpc-status"], "0", "{head:?}");
    }

    #[tokio::test]
    async fn shutdown_sends_a_goaway_and_waits_for_the_calls_in_flight() {
        let mut server = start(ConnectionSettings::default()).await;
        let mut client = h2_client(server.addr).await;
        let in_flight = tokio::spawn(async move { call(&mut client, Slow::PATH, None).await });
        // The call is under way when the server is told to stop.
        tokio::time::sleep(Slow::TAKES / 4).await;
        let mut raw = raw_client(server.addr).await;
        // Its connection is served once the server's SETTINGS arrive.
        assert!(frame_of(&mut raw, SETTINGS, Duration::from_secs(5)).await);
        server.stop.take().unwrap().send(()).unwrap();
        assert!(
            frame_of(&mut raw, GOAWAY, Duration::from_secs(5)).await,
            "no GOAWAY at shutdown"
        );
        // A client that does not answer the GOAWAY's PING keeps its
        // connection open until it goes, or until the caller's grace.
        drop(raw);
        let head = in_flight.await.unwrap();
        assert_eq!(head.headers["grpc-status"], "0", "{head:?}");
        tokio::time::timeout(Duration::from_secs(10), server.served)
            .await
            .expect("the server returns once its calls are done")
            .unwrap();
    }

    #[tokio::test]
    async fn an_unanswered_keepalive_ping_closes_the_connection_and_an_answered_one_does_not() {
        const INTERVAL: Duration = Duration::from_millis(200);
        let server = start(ConnectionSettings {
            keepalive_interval: Some(INTERVAL),
            keepalive_timeout: Duration::from_millis(300),
            ..ConnectionSettings::default()
        })
        .await;
        // A client that answers nothing: a PING, then the end.
        let mut silent = raw_client(server.addr).await;
        assert!(
            frame_of(&mut silent, PING, Duration::from_secs(5)).await,
            "no keepalive PING after {INTERVAL:?} of silence"
        );
        assert!(
            closed_within(&mut silent, Duration::from_secs(5)).await,
            "still open with its PING unanswered"
        );
        // A client that answers PINGs (h2's does) keeps its connection
        // across many intervals.
        let mut client = h2_client(server.addr).await;
        tokio::time::sleep(INTERVAL * 8).await;
        let head = call(&mut client, Slow::PATH, None).await;
        assert_eq!(head.headers["grpc-status"], "0", "{head:?}");
    }

    #[tokio::test]
    async fn a_connection_past_its_age_gets_a_goaway_then_closes_after_the_grace() {
        let server = start(ConnectionSettings {
            max_connection_age: Some(Duration::from_millis(300)),
            ..ConnectionSettings::default()
        })
        .await;
        let mut raw = raw_client(server.addr).await;
        assert!(
            frame_of(&mut raw, GOAWAY, Duration::from_secs(5)).await,
            "no GOAWAY past the connection's age"
        );
        assert!(
            closed_within(&mut raw, Duration::from_secs(5)).await,
            "still open past its age and grace"
        );
    }
}
