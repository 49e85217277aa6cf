//! A real Envoy 1.40 for tests, configured from `examples/envoy/envoy.yaml`
//! (or `envoy-rlqs.yaml`, the quota filter's) with this test's ports, in
//! front of a real HTTP backend started here.
//!
//! Needs `envoy` (`bash .ci/install-tools.sh`); fails without it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::http::{self, HttpResponse};
use super::{repo, tool, wait_until, ChildGuard};

/// A backend that counts the requests that reach it.
pub struct Backend {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Backend {
    pub async fn start() -> Backend {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                ([("x-backend", "weather")], "sunny\n")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Backend { addr, hits }
    }

    /// Requests that reached the backend so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The example config as text, with edits that must each apply exactly
/// once, so the example cannot drift from what the tests exercise.
pub struct EnvoyConfig {
    file: &'static str,
    text: String,
}

impl EnvoyConfig {
    /// The per-request `ratelimit` filter's example.
    pub fn example() -> EnvoyConfig {
        EnvoyConfig::read("examples/envoy/envoy.yaml")
    }

    /// The `rate_limit_quota` filter's example.
    pub fn quota_example() -> EnvoyConfig {
        EnvoyConfig::read("examples/envoy/envoy-rlqs.yaml")
    }

    fn read(file: &'static str) -> EnvoyConfig {
        let text = std::fs::read_to_string(repo().join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"));
        EnvoyConfig { file, text }
    }

    /// Replaces `from`, which must appear exactly once.
    pub fn replace(mut self, from: &str, to: &str) -> EnvoyConfig {
        assert_eq!(
            self.text.matches(from).count(),
            1,
            "{} should contain `{from}` exactly once",
            self.file
        );
        self.text = self.text.replace(from, to);
        self
    }

    /// Calls sluice over TLS: trusts `ca`, and presents `client` (cert, key)
    /// when given, for mutual TLS. The SNI and the name checked are
    /// `localhost`, as in the test server certificate.
    pub fn sluice_tls(self, ca: &str, client: Option<(&str, &str)>) -> EnvoyConfig {
        let identity = client
            .map(|(cert, key)| {
                format!(
                    "
            tls_certificates:
              - certificate_chain: {{ filename: {cert} }}
                private_key: {{ filename: {key} }}"
                )
            })
            .unwrap_or_default();
        let socket = format!(
            "      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]{identity}
            validation_context:
              trusted_ca: {{ filename: {ca} }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: localhost }}
      load_assignment:
        cluster_name: sluice
"
        );
        self.replace(
            "      load_assignment:\n        cluster_name: sluice\n",
            &socket,
        )
    }
}

pub struct Envoy {
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    // Dropped last: kills Envoy, then removes its files.
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with the example config, sending rate-limit calls to
    /// `sluice` and traffic to `backend`; `edit` changes the config further.
    ///
    /// Starts Envoy from this (the test's) thread, which lives as long as the
    /// test: Envoy is stopped when the thread that started it exits.
    pub async fn start(
        sluice: SocketAddr,
        backend: SocketAddr,
        edit: impl FnOnce(EnvoyConfig) -> EnvoyConfig,
    ) -> Envoy {
        // The example waits 0.25 s for sluice; a test machine busy
        // compiling may be slower than that, and a timeout would let
        // traffic through.
        let config = EnvoyConfig::example().replace("timeout: 0.25s", "timeout: 5s");
        Envoy::launch(config, sluice, backend, edit).await
    }

    /// Starts Envoy with the quota filter's example config, its quota
    /// stream going to `sluice`.
    pub async fn start_quota(
        sluice: SocketAddr,
        backend: SocketAddr,
        edit: impl FnOnce(EnvoyConfig) -> EnvoyConfig,
    ) -> Envoy {
        Envoy::launch(EnvoyConfig::quota_example(), sluice, backend, edit).await
    }

    async fn launch(
        config: EnvoyConfig,
        sluice: SocketAddr,
        backend: SocketAddr,
        edit: impl FnOnce(EnvoyConfig) -> EnvoyConfig,
    ) -> Envoy {
        let envoy = tool("envoy");
        let dir = tempfile::tempdir().unwrap();
        let (listener, admin) = (super::free_port(), super::free_port());
        let config = config
            .replace("port_value: 10000", &format!("port_value: {listener}"))
            .replace("port_value: 9901", &format!("port_value: {admin}"))
            .replace(
                "port_value: 8081",
                &format!("port_value: {}", sluice.port()),
            )
            .replace(
                "port_value: 8000",
                &format!("port_value: {}", backend.port()),
            );
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, edit(config).text).unwrap();
        let log = dir.path().join("envoy.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let process = ChildGuard::spawn(
            "envoy",
            std::process::Command::new(envoy)
                .arg("-c")
                .arg(&config_path)
                .args(["--log-level", "warn", "--disable-hot-restart"])
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file),
        );
        let mut envoy = Envoy {
            listener: SocketAddr::from(([127, 0, 0, 1], listener)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            log,
            process,
            _dir: dir,
        };
        let admin = envoy.admin;
        let ready = wait_until(Duration::from_secs(30), || async {
            matches!(http::get(admin, "/ready").await, Ok(r) if r.status == 200)
        })
        .await
        .is_some();
        envoy.process.assert_running(&envoy.log_text());
        assert!(
            ready,
            "Envoy was not ready within 30 s:\n{}",
            envoy.log_text()
        );
        envoy
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /forecast` through the gateway.
    pub async fn get(&self, headers: &[(&str, &str)]) -> HttpResponse {
        http::request(self.listener, "GET", "/forecast", headers, None)
            .await
            .unwrap_or_else(|e| panic!("request through Envoy failed: {e}\n{}", self.log_text()))
    }

    /// One counter or gauge from Envoy's admin `/stats`, 0 when absent.
    pub async fn stat(&self, name: &str) -> u64 {
        let stats = http::get(self.admin, "/stats")
            .await
            .expect("Envoy admin /stats")
            .text();
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .map_or(0, |v| v.trim().parse().unwrap_or(0))
    }
}

/// A response header that must be present.
pub fn header<'a>(r: &'a HttpResponse, name: &str) -> &'a str {
    r.header(name)
        .unwrap_or_else(|| panic!("no {name} header: {r:?}"))
}
