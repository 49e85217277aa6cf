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
//! message sizes (`grpc`, `http`, `app`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
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
            },
            max_tls_handshakes: 256,
            max_concurrent_streams: 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: None,
            http: Limits {
                max_connections: 1024,
                handshake_timeout: Duration::from_secs(10),
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
    _slot: Slot,
}

impl<T> Connection<T> {
    pub fn get_ref(&self) -> &T {
        &self.io
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
        Pin::new(&mut this.io).poll_read(cx, buf)
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

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Connection<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> T::ConnectInfo {
        self.io.connect_info()
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
}
