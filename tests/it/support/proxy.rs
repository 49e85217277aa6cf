//! A TCP proxy the test owns, to cut the network between sluice and a
//! server and heal it again. A cut is a blackhole, the nastiest kind of
//! partition: nothing is refused or reset, bytes just stop in both
//! directions on the connections that exist, and a new connection is
//! accepted but carries nothing. Healing lets everything held through, as
//! TCP's retransmissions would after a short partition.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct TcpProxy {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// A proxy on a free port of 127.0.0.1 to `target`, open.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy address");
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        let accept = tokio::spawn(async move {
            // Connections end with the accept task: dropping the proxy
            // closes them all.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(forward(client, target, gate.subscribe()));
            }
        });
        TcpProxy { addr, open, accept }
    }

    /// Blackholes every connection, existing and new, until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, target: SocketAddr, mut open: watch::Receiver<bool>) {
    if open.wait_for(|o| *o).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pump(client_read, server_write, open.clone()) => {}
        _ = pump(server_read, client_write, open) => {}
    }
}

/// Copies one direction, holding each read until the network is open.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if open.wait_for(|o| *o).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
