//! Accepting connections within bounds, for the gRPC and HTTP ports alike:
//! a cap on open connections, and a deadline for each connection's
//! handshake (TLS, then the HTTP/2 client preface) before the server sees
//! it.
//!
//! At the cap the accept loop waits: new connections queue in the kernel's
//! backlog (and time out there, on the client's side) while those open are
//! served as before. A connection that has not finished its handshake by
//! the deadline is closed, so one that connects and sends nothing, or half a
//! preface, or a ClientHello it never finishes (slowloris), holds its slot
//! for the deadline at most. Handshakes run concurrently, each in its own
//! task, so a slow one never holds up the others; the tasks are owned by
//! the accept loop and end with it.
//!
//! What the connections do once established is bounded by the servers:
//! streams per connection, HTTP/2 keepalive, the HTTP request head timeout,
//! message sizes (`grpc`, `http`, `app`). One bound is kept here because
//! hyper has none for HTTP/2: an idle timeout on the gRPC port. The calls
//! on each connection are counted (the gRPC server begins a call on the
//! connection's [`ConnectionCalls`] for each stream), and a
//! connection with no call in flight for the timeout is closed by its own
//! reader, so a client that opens connections and leaves them idle holds
//! its places under the cap for that long at most. Keepalive PINGs answered
//! by a live client do not count as calls: they keep a connection from
//! being taken for dead, not from being idle.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::Stream;
use metrics::{counter, gauge, Gauge};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;

use crate::task::OwnedTask;
use crate::telemetry::names;

/// The bounds of one listening port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once, counting those still in their
    /// handshake.
    pub max_connections: usize,
    /// How long a connection may take from accept to a finished handshake.
    pub handshake_timeout: Duration,
    /// Close a connection with no call in flight for this long; `None`:
    /// never, or the port's server has a timeout of its own (HTTP's head
    /// timeout). Only for servers that count calls ([`Connection::calls`]): a
    /// connection whose calls go uncounted looks idle throughout.
    pub idle_timeout: Option<Duration>,
}

/// The connection bounds of both ports and of the servers on them; the
/// defaults are those of `sluice serve`'s flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// The gRPC port: its connections, and how long a client has to finish
    /// the TLS handshake and send the HTTP/2 preface.
    pub grpc: Limits,
    /// Most TLS handshakes under way at once (the CPU they take).
    pub max_tls_handshakes: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` of every connection: calls
    /// in flight on one connection.
    pub max_concurrent_streams: u32,
    /// Send an HTTP/2 PING after this long without a frame from the client;
    /// `None`: never.
    pub keepalive_interval: Option<Duration>,
    /// Close a connection whose PING is not answered within this long.
    pub keepalive_timeout: Duration,
    /// Ask a gRPC client (GOAWAY) to move to a new connection after this
    /// long; `None`: connections last as long as their client keeps them.
    pub max_connection_age: Option<Duration>,
    /// The HTTP port's connections; its handshake is the TCP accept alone.
    pub http: Limits,
    /// How long an HTTP/1 connection may wait for a request head: idle
    /// between requests, or part-way through one.
    pub http_idle_timeout: Duration,
    /// The largest header block a client may send, in bytes (HTTP/2
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`, and the HTTP/1 read buffer).
    pub max_header_bytes: u32,
}

impl Default for ConnectionSettings {
    fn default() -> ConnectionSettings {
        ConnectionSettings {
            grpc: Limits {
                max_connections: 10_000,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Some(Duration::from_secs(600)),
            },
            max_tls_handshakes: 256,
            max_concurrent_streams: 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: None,
            http: Limits {
                max_connections: 1024,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: None,
            },
            http_idle_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the HTTP/2 client preface from `io`, and returns it to be read
/// again by the server: a client that does not send it in time is closed
/// before the server keeps any state for it.
pub async fn read_preface<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Bytes> {
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    io.read_exact(&mut preface).await?;
    if &preface != HTTP2_PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not the HTTP/2 client preface",
        ));
    }
    Ok(Bytes::from_static(HTTP2_PREFACE))
}

/// Reads a connection's first bytes until they tell HTTP/1 from HTTP/2
/// (the whole HTTP/2 preface, or a byte that departs from it), and returns
/// them to be read again: the server's own protocol detection would wait
/// without a deadline for a client that sends nothing, or part of the
/// preface.
pub async fn read_protocol<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Bytes> {
    let mut read = Vec::with_capacity(HTTP2_PREFACE.len());
    let mut chunk = [0u8; HTTP2_PREFACE.len()];
    loop {
        let want = HTTP2_PREFACE.len() - read.len();
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        read.extend_from_slice(&chunk[..n]);
        if read.len() == HTTP2_PREFACE.len() || read[..] != HTTP2_PREFACE[..read.len()] {
            return Ok(Bytes::from(read));
        }
    }
}

/// An accepted connection, its handshake done: the bytes the handshake
/// read (to be read again), then the connection. It holds its slot under
/// the cap until it is dropped.
pub struct Connection<T> {
    io: T,
    unread: Bytes,
    peer: SocketAddr,
    calls: Arc<Activity>,
    idle: Option<IdleTimer>,
    /// Reads that returned bytes, for the server's keepalive.
    reads: Arc<AtomicU64>,
    _slot: Slot,
}

impl<T> Connection<T> {
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The connection's calls: a call begun on them holds off the idle
    /// timeout until it ends.
    pub fn calls(&self) -> ConnectionCalls {
        ConnectionCalls(self.calls.clone())
    }

    /// The count of reads that returned bytes: it moves while the client
    /// sends anything at all (a keepalive's sign of life).
    pub fn reads(&self) -> Arc<AtomicU64> {
        self.reads.clone()
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

/// A place under a port's cap, and the open-connections gauge it counts in.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Slot {
        open.increment(1.0);
        Slot {
            _permit: permit,
            open,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Connection<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unread.has_remaining() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        // Idle: the end of the stream, as if the client had closed it. The
        // server then closes its side; no call is in flight to lose.
        if let Some(idle) = this.idle.as_mut() {
            if idle.poll_expired(&this.calls, cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
        }
        let filled = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > filled {
            this.reads.fetch_add(1, Ordering::Relaxed);
            if let Some(idle) = this.idle.as_mut() {
                idle.read = true;
            }
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Connection<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// === Idle connections ===

/// The calls of one connection, in one word so that a call's end is one
/// atomic add: the low 32 bits count the calls in flight, the high 32 the
/// calls ended (wrapping; the timer only asks whether it changed). No
/// clock is read per call: the timer, when it fires, sees whether anything
/// happened since it last looked.
#[derive(Debug, Default)]
struct Activity(AtomicU64);

/// One call begun: one more in flight.
const BEGUN: u64 = 1;
/// One call ended: one fewer in flight (never below zero, since it began),
/// one more ended: `+2^32 - 1`.
const ENDED: u64 = (1 << 32) - 1;

impl Activity {
    /// The calls in flight, and the count of those ended.
    fn load(&self) -> (u32, u32) {
        let word = self.0.load(Ordering::Acquire);
        (word as u32, (word >> 32) as u32)
    }
}

/// A connection's calls (see [`Connection::calls`]).
#[derive(Clone, Debug)]
pub struct ConnectionCalls(Arc<Activity>);

impl ConnectionCalls {
    /// One call begun; it ends when the guard is dropped.
    pub fn begin(&self) -> CallGuard {
        self.0 .0.fetch_add(BEGUN, Ordering::AcqRel);
        CallGuard(self.0.clone())
    }
}

/// One call in flight: it ends when the guard is dropped, once the call's
/// answer is written (or its stream reset), so a streaming call counts
/// while it lasts.
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_add(ENDED, Ordering::AcqRel);
    }
}

/// How long a request read off the wire may take to reach the server's
/// service: a connection is not closed this soon after its last bytes, so
/// a call that just arrived is counted before the idle check can miss it.
const READ_GRACE: Duration = Duration::from_secs(1);

/// The idle timer of one connection, polled by its reader. Reads and calls
/// only leave marks (a flag, the count of ended calls); the timer compares
/// them when it fires, so a busy connection costs it nothing per call and
/// one timer reset per timeout.
struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Since when no call has been in flight, as far as the timer has seen
    /// (a call's end is taken as the check that first saw it).
    quiet_since: Instant,
    /// The count of ended calls at the last check.
    ended: u32,
    /// Bytes read since the last check.
    read: bool,
    port: &'static str,
    expired: bool,
}

impl IdleTimer {
    fn new(timeout: Duration, port: &'static str) -> IdleTimer {
        IdleTimer {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            quiet_since: Instant::now(),
            ended: 0,
            read: false,
            port,
            expired: false,
        }
    }

    /// Ready once the connection has been idle for the timeout: no call in
    /// flight, none ended and no bytes read lately. Every check sets the
    /// next at least [`READ_GRACE`] later, so no read flag at a check means
    /// no bytes for that long.
    fn poll_expired(&mut self, calls: &Activity, cx: &mut Context<'_>) -> Poll<()> {
        while !self.expired {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let (in_flight, ended) = calls.load();
            if in_flight > 0 || ended != self.ended {
                self.ended = ended;
                self.quiet_since = now;
            }
            let read = std::mem::take(&mut self.read);
            let quiet_until = self.quiet_since + self.timeout;
            if !read && quiet_until <= now {
                self.expired = true;
                counter!(names::CONNECTIONS_IDLE_CLOSED, "port" => self.port).increment(1);
                tracing::debug!(port = self.port, "closing an idle connection");
            } else {
                self.sleep.as_mut().reset(quiet_until.max(now + READ_GRACE));
            }
        }
        Poll::Ready(())
    }
}

/// Accepts connections on `listener` (the port named `port` in metrics)
/// within `limits`, runs `handshake` on each (it returns the connection and
/// the bytes it read that the server must read again), and yields those
/// whose handshake finished in time. Dropping the stream (the server
/// stopping) closes the listener and ends the handshakes under way.
pub fn incoming<T, H, F>(
    listener: TcpListener,
    port: &'static str,
    limits: Limits,
    handshake: H,
) -> Incoming<Connection<T>>
where
    T: Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = io::Result<(T, Bytes)>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = gauge!(names::CONNECTIONS_OPEN, "port" => port);
    open.set(0.0);
    let at_cap = counter!(names::CONNECTIONS_AT_CAP, "port" => port);
    at_cap.increment(0);
    for reason in ["timeout", "error"] {
        counter!(names::HANDSHAKES_FAILED, "port" => port, "reason" => reason).increment(0);
    }
    if limits.idle_timeout.is_some() {
        counter!(names::CONNECTIONS_IDLE_CLOSED, "port" => port).increment(0);
    }
    let accepting = OwnedTask::spawn(async move {
        let mut handshakes = JoinSet::new();
        loop {
            while handshakes.try_join_next().is_some() {}
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    at_cap.increment(1);
                    tracing::debug!(port, "at the connection cap: waiting for one to close");
                    match slots.clone().acquire_owned().await {
                        Ok(permit) => permit,
                        Err(_) => return,
                    }
                }
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(port, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Nagle's algorithm would hold a small response back until the
            // client's delayed ACK (40 ms on Linux) whenever two or more
            // calls share the connection.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "setting TCP_NODELAY failed");
            }
            let slot = Slot::new(permit, open.clone());
            let shaking = handshake(tcp);
            let tx = tx.clone();
            handshakes.spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, shaking).await {
                    Ok(Ok((io, unread))) => {
                        let _ = tx
                            .send(Ok(Connection {
                                io,
                                unread,
                                peer,
                                calls: Arc::default(),
                                idle: limits
                                    .idle_timeout
                                    .map(|timeout| IdleTimer::new(timeout, port)),
                                reads: Arc::default(),
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        counter!(names::HANDSHAKES_FAILED, "port" => port, "reason" => "error")
                            .increment(1);
                        tracing::debug!(port, %peer, error = %e, "handshake failed");
                    }
                    Err(_) => {
                        counter!(names::HANDSHAKES_FAILED, "port" => port, "reason" => "timeout")
                            .increment(1);
                        tracing::debug!(port, %peer, "handshake timed out");
                    }
                }
            });
        }
    });
    Incoming {
        connections: ReceiverStream::new(rx),
        _accepting: accepting,
    }
}

/// The connections handed over, and the task that accepts them.
pub struct Incoming<T> {
    connections: ReceiverStream<io::Result<T>>,
    _accepting: OwnedTask,
}

impl<T> Stream for Incoming<T> {
    type Item = io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.connections).poll_next(cx)
    }
}

impl<T> Incoming<T> {
    /// The next connection; `None` once the accept loop has ended.
    pub async fn next_connection(&mut self) -> Option<T> {
        loop {
            match futures::StreamExt::next(self).await? {
                Ok(connection) => return Some(connection),
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    async fn plain(mut tcp: TcpStream) -> io::Result<(TcpStream, Bytes)> {
        let preface = read_preface(&mut tcp).await?;
        Ok((tcp, preface))
    }

    #[tokio::test]
    async fn a_connection_is_handed_over_with_its_preface_to_read_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: None,
        };
        let mut incoming = incoming(listener, "test", limits, plain);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(HTTP2_PREFACE).await.unwrap();
        client.write_all(b"more").await.unwrap();
        let mut conn = incoming.next_connection().await.unwrap();
        let mut read = vec![0u8; HTTP2_PREFACE.len() + 4];
        conn.read_exact(&mut read).await.unwrap();
        assert_eq!(&read[..24], HTTP2_PREFACE);
        assert_eq!(&read[24..], b"more");
    }

    #[tokio::test]
    async fn the_protocol_is_known_from_the_first_byte_that_departs_from_the_preface() {
        let read = |bytes: &'static [u8]| async move {
            let mut io = bytes;
            read_protocol(&mut io).await
        };
        assert_eq!(
            read(b"GET / HTTP/1.1\r\n").await.unwrap(),
            &b"GET / HTTP/1.1\r\n"[..]
        );
        assert_eq!(read(HTTP2_PREFACE).await.unwrap(), &HTTP2_PREFACE[..]);
        assert!(read(b"PRI * HT").await.is_err(), "half a preface then EOF");
    }

    #[tokio::test]
    async fn silent_and_wrong_clients_are_closed_and_free_their_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 1,
            handshake_timeout: Duration::from_millis(200),
            idle_timeout: None,
        };
        let mut incoming = incoming(listener, "test", limits, plain);
        // Holds the only slot until its deadline, sending half a preface.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        silent.write_all(&HTTP2_PREFACE[..10]).await.unwrap();
        let mut wrong = TcpStream::connect(addr).await.unwrap();
        wrong.write_all(&[b'x'; 24]).await.unwrap();
        let mut good = TcpStream::connect(addr).await.unwrap();
        good.write_all(HTTP2_PREFACE).await.unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), incoming.next_connection())
            .await
            .expect("the good client is served once the others are closed");
        assert!(handed.is_some());
        // The server closed the silent one: it reads EOF (or a reset).
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte))
            .await
            .expect("closed by its deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    /// The idle timeout on the server's side of a connection: its reader
    /// reads the end once no call has been in flight for the timeout, and
    /// not while a call is (tokio's clock, paused: no waiting for real).
    #[tokio::test(start_paused = true)]
    async fn a_connection_reads_its_end_once_idle_and_never_during_a_call() {
        const IDLE: Duration = Duration::from_secs(10);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Some(IDLE),
        };
        let mut incoming = incoming(listener, "test", limits, plain);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(HTTP2_PREFACE).await.unwrap();
        let mut conn = incoming.next_connection().await.unwrap();
        let opened = Instant::now();
        let mut preface = [0u8; 24];
        conn.read_exact(&mut preface).await.unwrap();

        // A call in flight: no end, however long it lasts.
        let call = conn.calls().begin();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(IDLE * 3, conn.read(&mut buf)).await;
        assert!(read.is_err(), "read {read:?} during a call");
        // It ends: the end comes a whole timeout later, not sooner.
        drop(call);
        let ended = Instant::now();
        let read = conn.read(&mut buf).await;
        assert!(matches!(read, Ok(0)), "{read:?}");
        let quiet = ended.elapsed();
        assert!(quiet >= IDLE, "{quiet:?}");
        assert!(opened.elapsed() >= IDLE * 4);
        // And stays the end.
        assert!(matches!(conn.read(&mut buf).await, Ok(0)));
    }
}
