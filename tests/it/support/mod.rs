//! Shared test harness: find the real tools, start sluice in-process on
//! `127.0.0.1:0` through the same `app::serve` that `main` uses, and pick
//! free ports for the external servers the tests start.
//!
//! A test that needs a tool it cannot find fails, saying how to install it;
//! it never passes because something was absent.

pub mod certs;
pub mod envoy;
pub mod http;
pub mod postgres;
pub mod proxy;
pub mod redis;
pub mod sockets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice::app::{self, Deps};
use sluice::clock::{Clock, SystemClock};
use sluice::health::Readiness;
use sluice::limiter::RuleSet;
use sluice::limiter::{Algorithm, KeyHasher, PlanOptions};
use sluice::rules::yaml;
use sluice::rules::RulesHandle;
use sluice::service::{FailureMode, LimiterSettings, RateLimiter};
use sluice::storage::{memory::MemoryStore, CounterStore};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool from `.tools/bin` (installed by `.ci/install-tools.sh`) or PATH.
pub fn tool(name: &str) -> PathBuf {
    let local = repo().join(".tools/bin").join(name);
    if local.exists() {
        return local;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "`{name}` is required by this test and was not found in .tools/bin or PATH; \
         install it with `bash .ci/install-tools.sh`"
    );
}

/// The `sluice` binary: cargo's, or `$SLUICE_BIN` (as `.ci/check-deploy.sh`
/// takes it) for one built elsewhere.
pub fn sluice_bin() -> PathBuf {
    std::env::var_os("SLUICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")))
}

/// A port for an external server (Redis, PostgreSQL, Envoy) that must be
/// told its port before it starts. Ports come from below the kernel's
/// ephemeral range, where port-0 binds and outgoing connections (of every
/// test in this process) never land, and none is handed out twice in this
/// process; so only another program choosing the same port could take it.
/// Where the code allows, bind port 0 and read the address instead.
pub fn free_port() -> u16 {
    reserve_ports(1, &[0])
}

/// `count` consecutive free ports, and their +10000 cluster-bus ports.
pub fn free_port_range(count: u16) -> u16 {
    reserve_ports(count, &[0, 10_000])
}

fn reserve_ports(count: u16, offsets: &[u16]) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let span = offsets.iter().max().copied().unwrap_or(0) + count;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000, ephemeral_low - span);
    assert!(
        high > low,
        "no room below the ephemeral ports ({ephemeral_low})"
    );
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    'search: for _ in 0..500 {
        let base = low + rand_u16() % (high - low);
        for p in base..base + count {
            for port in offsets.iter().map(|o| p + o) {
                if handed_out.contains(&port)
                    || std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
                {
                    continue 'search;
                }
            }
        }
        handed_out.extend((base..base + count).flat_map(|p| offsets.iter().map(move |o| p + o)));
        return base;
    }
    panic!("no free range of {count} ports below {ephemeral_low}");
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per instance; good enough for ports.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish() as u16
}

/// Held by the tests that load the machine on purpose (the chaos soak,
/// the wire-level fuzz, connection floods) and by the tests whose
/// assertions depend on timing (Envoy's quota reports and assignments,
/// Redis Sentinel's failover), so
/// that neither kind runs beside the other on a two-core machine.
pub static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Compiles rules from YAML text (one document per domain).
pub fn rules_from_yaml(docs: &[&str]) -> RuleSet {
    let parsed: Vec<_> = docs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let name = format!("test{i}.yaml");
            let root = yaml::parse_str(&name, text).unwrap_or_else(|e| panic!("{e}"));
            (name, root)
        })
        .collect();
    yaml::compile_all(&parsed).unwrap_or_else(|e| panic!("{e}"))
}

/// Settings for a test limiter; tweak fields before `start`.
pub struct TestConfig {
    pub rules: RuleSet,
    pub store: Option<Arc<dyn CounterStore>>,
    pub clock: Arc<dyn Clock>,
    pub hasher: KeyHasher,
    pub settings: LimiterSettings,
    pub shutdown_grace: Duration,
    pub tls: Option<Arc<sluice::tls::TlsReloader>>,
    pub quota: sluice::rlqs::QuotaSettings,
    pub connections: sluice::listen::ConnectionSettings,
}

impl TestConfig {
    pub fn new(rules: RuleSet) -> TestConfig {
        TestConfig {
            rules,
            store: None,
            clock: Arc::new(SystemClock),
            hasher: KeyHasher::from_secret(b"test secret"),
            settings: LimiterSettings {
                plan: PlanOptions {
                    default_algorithm: Algorithm::SlidingWindow,
                    global_shadow: false,
                    global_quota: false,
                },
                failure_mode: FailureMode::Allow,
                store_timeout: Duration::from_millis(50),
                rate_limit_headers: false,
                dynamic_metadata: false,
            },
            shutdown_grace: Duration::from_secs(5),
            tls: None,
            quota: Default::default(),
            connections: Default::default(),
        }
    }
}

/// A sluice running in this test process.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub deps: Deps,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: TestConfig) -> TestServer {
        Self::serve(TestServer::deps(config)).await
    }

    /// What [`TestServer::start`] serves.
    pub fn deps(config: TestConfig) -> Deps {
        let store = config.store.unwrap_or_else(|| {
            Arc::new(MemoryStore::new(100_000, config.clock.clone())) as Arc<dyn CounterStore>
        });
        let rules: RulesHandle = Arc::new(ArcSwap::from_pointee(config.rules));
        let readiness = Arc::new(Readiness::default());
        readiness.update_rules(|s| {
            s.loaded = true;
            s.source = "test".into();
        });
        let limiter = RateLimiter::new(
            rules.clone(),
            store,
            config.hasher,
            config.settings,
            config.clock,
        );
        Deps {
            limiter: Arc::new(limiter),
            readiness,
            metrics: sluice::telemetry::prometheus(),
            shutdown_grace: config.shutdown_grace,
            tls: config.tls,
            quota: config.quota,
            connections: config.connections,
            tasks: sluice::task::TaskSet::default(),
        }
    }

    /// `sluice serve ARGS...`, parsed, validated and built by `app::build`
    /// as `main` does, then served in this process (pass `--grpc-addr` and
    /// `--http-addr` or not: `serve` binds its own free ports).
    pub async fn from_cli(args: &[&str]) -> TestServer {
        use clap::Parser as _;
        let argv = ["sluice", "serve"].iter().chain(args);
        let cli = sluice::config::Cli::try_parse_from(argv).expect("serve flags parse");
        let sluice::config::Command::Serve(args) = cli.command else {
            panic!("not the serve command");
        };
        args.validate().expect("valid serve flags");
        let deps = app::build(&args).await.expect("app::build");
        Self::serve(deps).await
    }

    /// Serves already-built deps (for tests that use `app::build`).
    pub async fn serve(deps: Deps) -> TestServer {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestServer::serve_on(grpc, deps).await
    }

    /// Serves `deps` with gRPC on `grpc` (a restarted server on its
    /// predecessor's port).
    pub async fn serve_on(grpc: TcpListener, deps: Deps) -> TestServer {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app::serve(grpc, http, deps.clone(), async {
            let _ = stopped.await;
        }));
        TestServer {
            grpc_addr,
            http_addr,
            deps,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// A connected tonic client.
    pub async fn client(
        &self,
    ) -> sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient<
        tonic::transport::Channel,
    > {
        sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(
            self.grpc_url(),
        )
        .await
        .expect("connecting to the test server")
    }

    /// Begins shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.wait().await
    }

    /// Completes the `shutdown` future `serve` was given, without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for `serve` to return (after [`TestServer::begin_shutdown`]).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        match self.task.take() {
            Some(task) => task.await.expect("serve task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Builds a request with one descriptor per slice of `(key, value)` pairs.
pub fn request(
    domain: &str,
    descriptors: &[&[(&str, &str)]],
) -> sluice::proto::rls::RateLimitRequest {
    use sluice::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
    sluice::proto::rls::RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: descriptors
            .iter()
            .map(|entries| RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: (*k).to_owned(),
                        value: (*v).to_owned(),
                    })
                    .collect(),
                limit: None,
                hits_addend: None,
            })
            .collect(),
        hits_addend: 0,
    }
}

/// Polls the async `f` every 20 ms until it returns true: how long that
/// took, or `None` once `timeout` has passed. The one polling loop of the
/// tests; a test that promises a deadline asserts on the time it returns.
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    loop {
        if f().await {
            return Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] for the synchronous set-up code that starts the external
/// servers (outside any runtime): blocks the thread between polls.
pub fn block_until(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> bool,
) -> Option<Duration> {
    let started = std::time::Instant::now();
    loop {
        if f() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// [`wait_until`] for a condition that needs no `.await`.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    wait_until(timeout, || std::future::ready(f())).await
}

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves nothing running.
pub struct ChildGuard {
    pub child: std::process::Child,
    pub name: &'static str,
}

impl ChildGuard {
    pub fn spawn(name: &'static str, command: &mut std::process::Command) -> ChildGuard {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        ChildGuard { child, name }
    }

    /// Panics if the process has exited, quoting `log` (e.g. its stderr file).
    pub fn assert_running(&mut self, log: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early with {status}:\n{log}", self.name);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real `sluice` binary serving in a child process (killed on drop),
/// its output in a log file.
pub struct SluiceProcess {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub process: ChildGuard,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl SluiceProcess {
    /// Runs `command` (`sluice serve ...` without addresses) on ports the
    /// kernel picks (port 0: the gRPC one as a flag, the HTTP one from
    /// `SLUICE_HTTP_ADDR`, as Helm sets it), reads the bound addresses from
    /// its start-up log line, and waits until it answers `/healthz`.
    pub async fn start(mut command: std::process::Command) -> SluiceProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sluice.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let process = ChildGuard::spawn(
            "sluice serve",
            command
                .args(["--grpc-addr", "127.0.0.1:0"])
                .env("SLUICE_HTTP_ADDR", "127.0.0.1:0")
                .stdin(std::process::Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file),
        );
        let mut sluice = SluiceProcess {
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            process,
            log,
            _dir: dir,
        };
        let mut bound = None;
        let logged = eventually(Duration::from_secs(30), || {
            bound = logged_addresses(&sluice.log_text());
            bound.is_some()
        })
        .await;
        if let Some((grpc, http)) = bound.filter(|_| logged.is_some()) {
            (sluice.grpc, sluice.http) = (grpc, http);
        }
        let http_addr = sluice.http;
        let up = logged.is_some()
            && wait_until(Duration::from_secs(30), || async {
                matches!(http::get(http_addr, "/healthz").await, Ok(r) if r.status == 200)
            })
            .await
            .is_some();
        let log_text = sluice.log_text();
        sluice.process.assert_running(&log_text);
        assert!(
            up,
            "sluice serve did not answer /healthz within 30 s:\n{log_text}"
        );
        sluice
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The `grpc=` and `http=` addresses of sluice's "sluice serving" log line.
fn logged_addresses(log: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = log.lines().find(|l| l.contains("sluice serving"))?;
    let field = |name: &str| -> Option<SocketAddr> {
        let start = line.find(&format!("{name}="))? + name.len() + 1;
        line[start..].split_whitespace().next()?.parse().ok()
    };
    Some((field("grpc")?, field("http")?))
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
