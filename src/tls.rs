//! TLS for the gRPC port, and mutual TLS when a client CA is given.
//!
//! Certificates are reloaded when their files change (Kubernetes rotates
//! mounted Secrets by swapping a symlink), so the acceptor reads the current
//! `ServerConfig` for every new connection. A rotation to files that do not
//! load is logged and refused; the certificates in force stay.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::listen::{self, Connection, Incoming, Limits};
use crate::reload;

/// The certificate files to serve with.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads the files and builds a server configuration advertising HTTP/2.
pub fn load_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_error(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&files.cert, e))?;
    if certs.is_empty() {
        return Err(file_error(&files.cert, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| file_error(ca, e))? {
                roots
                    .add(cert.map_err(|e| file_error(ca, e))?)
                    .map_err(|e| file_error(ca, e))?;
            }
            if roots.is_empty() {
                return Err(file_error(ca, "no CA certificate found"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration in force, and the files it came from.
pub struct TlsReloader {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
}

impl TlsReloader {
    /// Loads the files once; start-up fails if they do not load.
    pub fn new(files: TlsFiles) -> Result<Arc<TlsReloader>, TlsError> {
        let config = load_config(&files)?;
        Ok(Arc::new(TlsReloader {
            files,
            config: ArcSwap::new(config),
        }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    fn fingerprint(&self) -> Option<[u8; 32]> {
        let files = &self.files;
        reload::fingerprint(
            [
                Some(&files.cert),
                Some(&files.key),
                files.client_ca.as_ref(),
            ]
            .into_iter()
            .flatten(),
        )
    }

    /// Polls the files and swaps in new certificates when they change.
    pub async fn watch(self: Arc<Self>, poll: Duration) {
        let apply = || match load_config(&self.files) {
            Ok(config) => {
                self.config.store(config);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "new TLS certificates do not load; keeping the ones in force")
            }
        };
        reload::on_change(poll, || self.fingerprint(), apply).await;
    }
}

/// Accepts TCP connections within `limits` and completes TLS handshakes
/// concurrently, at most `max_handshakes` at once, so a slow or failing
/// handshake never holds up the others. Each connection has until the
/// handshake deadline to finish TLS and send the HTTP/2 preface; failed
/// handshakes (an untrusted client certificate, say) are logged and
/// dropped. The stream owns the accepting task: dropping it (the server
/// stopping) ends that task and the handshakes under way.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    limits: Limits,
    max_handshakes: usize,
) -> Incoming<Connection<TlsStream<TcpStream>>> {
    accept(listener, tls, "grpc", limits, max_handshakes, true)
}

/// The admin API's port: as [`incoming`] with the admin port's bounds, and
/// no HTTP/2 preface to wait for (its clients may speak HTTP/1.1).
pub fn incoming_admin(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
) -> Incoming<Connection<TlsStream<TcpStream>>> {
    let limits = Limits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        handshake_timeout: ADMIN_HANDSHAKE_TIMEOUT,
        // axum counts no calls for it; its own timeouts bound it.
        idle_timeout: None,
    };
    accept(listener, tls, "admin", limits, ADMIN_MAX_HANDSHAKES, false)
}

/// Most connections open at once on the admin API's port.
const ADMIN_MAX_CONNECTIONS: usize = 1024;
/// How long an admin API client may take to finish the TLS handshake.
const ADMIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin API TLS handshakes under way at once.
const ADMIN_MAX_HANDSHAKES: usize = 64;

fn accept(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    port: &'static str,
    limits: Limits,
    max_handshakes: usize,
    preface: bool,
) -> Incoming<Connection<TlsStream<TcpStream>>> {
    // A connection waits for a place within its own deadline; a flood of
    // handshakes that stall part-way (a ClientHello never finished) keeps
    // new TLS clients waiting while it lasts, never the connections open.
    let places = Arc::new(Semaphore::new(max_handshakes.max(1)));
    listen::incoming(listener, port, limits, move |tcp| {
        let acceptor = TlsAcceptor::from(tls.current());
        let places = places.clone();
        async move {
            // A client that sends nothing takes no place.
            tcp.readable().await?;
            let place = places.acquire_owned().await.map_err(io::Error::other)?;
            let mut stream = acceptor.accept(tcp).await?;
            drop(place);
            let unread = match preface {
                true => listen::read_preface(&mut stream).await?,
                false => bytes::Bytes::new(),
            };
            Ok::<_, io::Error>((stream, unread))
        }
    })
}
