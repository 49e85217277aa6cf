//! The TCP sockets this test process holds open, with their `TCP_NODELAY`
//! setting, read from `/proc/self/fd`: sluice runs in-process in these
//! tests, so its accepted and outgoing sockets are among them.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};

/// One open TCP socket.
#[derive(Debug)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub nodelay: bool,
}

/// Every connected TCP socket of this process.
pub fn connected_tcp_sockets() -> Vec<TcpSocket> {
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("reading /proc/self/fd") {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .map(|target| target.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor was open a moment ago and is only borrowed
        // for three getsockopt/getsockname calls; if it has been closed (or
        // reused) since, the calls fail or describe the new socket, which is
        // also one of ours.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let (Ok(local), Ok(peer), Ok(nodelay)) =
            (sock.local_addr(), sock.peer_addr(), sock.tcp_nodelay())
        else {
            continue; // not TCP, or not connected (a listener)
        };
        if let (Some(local), Some(peer)) = (local.as_socket(), peer.as_socket()) {
            sockets.push(TcpSocket {
                local,
                peer,
                nodelay,
            });
        }
    }
    sockets
}

/// Asserts that `found`, the sockets of `what`, is not empty and that each
/// has TCP_NODELAY; `all` is shown when none is found.
pub fn assert_nodelay(what: &str, found: &[&TcpSocket], all: &[TcpSocket]) {
    assert!(!found.is_empty(), "no {what} socket among {all:#?}");
    for socket in found {
        assert!(
            socket.nodelay,
            "{what} socket without TCP_NODELAY: {socket:?}"
        );
    }
}
