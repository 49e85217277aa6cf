//! How sluice connects to a Redis node: URL, credentials, TLS roots and
//! timeouts ([`Connector`]), and one multiplexed connection per node that
//! reconnects at a bounded pace, with the node's batch queue
//! ([`NodeConnection`]): every command sluice sends a node goes through
//! [`NodeConnection::send`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::future::{BoxFuture, FutureExt as _, Shared};
use metrics::histogram;
use redis::aio::MultiplexedConnection;
use redis::{
    io::tcp::TcpSettings, AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo,
    IntoConnectionInfo, RedisConnectionInfo, RedisError, TlsCertificates,
};
use redis::{Pipeline, Value};
use tokio::time::Instant;

use super::batch::{BatchQueue, UnitReply};
use super::redis_error;
use super::scripts::Unit;
use crate::storage::StoreError;
use crate::task::OwnedTask;
use crate::telemetry::names;

/// Everything needed to open a connection to any node of one deployment.
#[derive(Clone)]
pub struct Connector {
    info: ConnectionInfo,
    /// The store timeout: how long a command may wait for its answer.
    timeout: Duration,
    /// PEM roots to trust instead of the bundled web PKI roots.
    ca_cert: Option<Vec<u8>>,
    config: AsyncConnectionConfig,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // ConnectionInfo's own Debug prints the password.
        f.debug_struct("Connector")
            .field("addr", &self.address())
            .field("tls", &self.is_tls())
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// `url` is `redis://[user:password@]host:port[/db]` or `rediss://...`;
    /// `password`, when given, replaces the URL's.
    pub fn new(
        url: &str,
        password: Option<&str>,
        ca_cert: Option<Vec<u8>>,
        store_timeout: Duration,
    ) -> Result<Connector, RedisError> {
        // The redis crate leaves TCP_NODELAY off: with several calls in
        // flight on the multiplexed connection, Nagle's algorithm would hold
        // a pipeline back until Redis' delayed ACK, 40 ms.
        let mut info = url
            .into_connection_info()?
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let config = AsyncConnectionConfig::new()
            // A call never waits longer than the store timeout for an answer.
            .set_response_timeout(Some(store_timeout))
            // Connecting happens in the background (the calls waiting on it
            // give up at their own deadline), so it may take longer than one
            // call: a TLS handshake on a busy host can exceed 50 ms, and
            // cutting it short would fail every attempt.
            .set_connection_timeout(Some(store_timeout.max(Duration::from_secs(1))));
        Ok(Connector {
            info,
            timeout: store_timeout,
            ca_cert,
            config,
        })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
    }

    /// `host:port` of the configured node.
    pub fn address(&self) -> String {
        match self.info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{host}:{port}")
            }
            ConnectionAddr::Unix(path) => path.display().to_string(),
            other => format!("{other:?}"),
        }
    }

    /// The same settings for another node (Cluster discovery).
    pub fn for_node(&self, host: &str, port: u16) -> Connector {
        let addr = match self.info.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        Connector {
            info: self.info.clone().set_addr(addr),
            timeout: self.timeout,
            ca_cert: self.ca_cert.clone(),
            config: self.config.clone(),
        }
    }

    /// The store timeout these settings were made with.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same address and transport for talking to a Redis Sentinel:
    /// database 0 (a sentinel has no other), and the credentials only if
    /// `with_credentials` (a sentinel without a password refuses an `AUTH`).
    pub fn for_sentinel(&self, with_credentials: bool) -> Connector {
        let current = self.info.redis_settings();
        let mut settings = RedisConnectionInfo::default().set_protocol(current.protocol());
        if with_credentials {
            if let Some(user) = current.username() {
                settings = settings.set_username(user);
            }
            if let Some(password) = current.password() {
                settings = settings.set_password(password);
            }
        }
        Connector {
            info: self.info.clone().set_redis_settings(settings),
            ..self.clone()
        }
    }

    pub(super) fn client(&self) -> Result<Client, RedisError> {
        match &self.ca_cert {
            Some(pem) if self.is_tls() => Client::build_with_tls(
                self.info.clone(),
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            _ => Client::open(self.info.clone()),
        }
    }
}

// === NodeConnection ===

/// One multiplexed connection to one node, shared by all concurrent calls,
/// that reconnects on demand: at once after a connection drops, then at most
/// once per `pace` while connecting fails. Calls that find no connection
/// join the attempt under way, or fail at once between attempts: a node
/// that is down costs one connection attempt per `pace`, never one per
/// call. (The redis crate's `ConnectionManager` starts a new attempt for
/// every call that fails, which is a reconnect storm at our call rates.)
pub struct NodeConnection {
    address: String,
    /// A Cluster node (script calls grouped by slot).
    sharded: bool,
    timeout: Duration,
    client: Client,
    config: AsyncConnectionConfig,
    pace: Pace,
    connected: ArcSwapOption<MultiplexedConnection>,
    state: Mutex<Attempts>,
    batches: BatchQueue,
}

/// A connection attempt that every waiting call shares.
type Attempt = Shared<BoxFuture<'static, Result<Arc<MultiplexedConnection>, String>>>;

#[derive(Default)]
struct Attempts {
    under_way: Option<Attempt>,
    /// The task that runs the last attempt, so that it finishes (and is
    /// recorded) even if every call waiting on it gives up; replaced by the
    /// next attempt's.
    task: Option<OwnedTask>,
    /// Why the last attempt failed; cleared by a success.
    last_error: Option<String>,
}

impl NodeConnection {
    /// Does not connect: the first call (or the start-up probe) does.
    /// `sharded`: a Cluster node. Needs a Tokio runtime (the batch task).
    pub fn new(
        connector: &Connector,
        pace: Duration,
        sharded: bool,
    ) -> Result<Arc<NodeConnection>, RedisError> {
        let client = connector.client()?;
        Ok(Arc::new_cyclic(|node| NodeConnection {
            address: connector.address(),
            sharded,
            timeout: connector.timeout,
            client,
            config: connector.config.clone(),
            pace: Pace::new(pace),
            connected: ArcSwapOption::empty(),
            state: Mutex::default(),
            batches: BatchQueue::start(node.clone()),
        }))
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn sharded(&self) -> bool {
        self.sharded
    }

    /// The store kind, as metrics label it.
    pub fn kind(&self) -> &'static str {
        if self.sharded {
            "redis-cluster"
        } else {
            "redis"
        }
    }

    /// Decides `units` in this node's next batch (see [`super::batch`]).
    pub async fn decide(&self, units: Vec<Unit>) -> Result<Vec<UnitReply>, StoreError> {
        self.batches.decide(units).await
    }

    /// Sends one pipeline of `count` commands, connecting first if needed.
    pub async fn send(
        self: &Arc<Self>,
        pipe: &Pipeline,
        count: usize,
    ) -> Result<Vec<Value>, StoreError> {
        let conn = self.get().await?;
        let started = Instant::now();
        let result = (*conn).clone().send_packed_commands(pipe, 0, count).await;
        histogram!(names::REDIS_DURATION, "store" => self.kind())
            .record(started.elapsed().as_secs_f64());
        result.map_err(|e| {
            self.failed(&conn, &e);
            redis_error(&e, self.timeout)
        })
    }

    /// Why the node cannot be reached, if connecting to it failed last.
    pub fn failing(&self) -> Option<String> {
        if self.connected.load().is_some() {
            return None;
        }
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .clone()
    }

    /// Lets the next [`NodeConnection::get`] attempt to connect even if
    /// the last attempt failed less than `pace` ago: the breaker's probe is
    /// the paced attempt, and must not be turned away by the pace.
    pub fn allow_attempt_now(&self) {
        self.pace.allow_now();
    }

    /// The connection, connecting first if needed.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<MultiplexedConnection>, StoreError> {
        if let Some(conn) = self.connected.load_full() {
            return Ok(conn);
        }
        let attempt = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(conn) = self.connected.load_full() {
                return Ok(conn);
            }
            match &state.under_way {
                Some(attempt) => attempt.clone(),
                None => {
                    if let Some(wait) = self.pace.wait() {
                        return Err(StoreError::Connection(format!(
                            "{}: {}; next attempt in {wait:?}",
                            self.address,
                            state.last_error.as_deref().unwrap_or("not connected"),
                        )));
                    }
                    let attempt = Self::connect(Arc::downgrade(self)).boxed().shared();
                    state.task = Some(OwnedTask::spawn(attempt.clone().map(drop)));
                    state.under_way = Some(attempt.clone());
                    attempt
                }
            }
        };
        attempt
            .await
            .map_err(|e| StoreError::Connection(format!("{}: {e}", self.address)))
    }

    async fn connect(node: Weak<NodeConnection>) -> Result<Arc<MultiplexedConnection>, String> {
        let Some(node) = node.upgrade() else {
            return Err("store dropped".into());
        };
        let result = node
            .client
            .get_multiplexed_async_connection_with_config(&node.config)
            .await
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let mut state = node.state.lock().unwrap_or_else(|p| p.into_inner());
        state.under_way = None;
        match &result {
            Ok(conn) => {
                node.connected.store(Some(conn.clone()));
                state.last_error = None;
            }
            Err(e) => {
                node.pace.failed();
                state.last_error = Some(e.clone());
            }
        }
        result
    }

    /// After a call on `conn` failed: a broken connection is dropped, so
    /// the next call reconnects (at once: the pace applies to failures to
    /// connect). Timeouts and server errors keep it.
    fn failed(&self, conn: &Arc<MultiplexedConnection>, error: &RedisError) {
        if error.is_unrecoverable_error() {
            let current = self.connected.load();
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                // Only if no one replaced it meanwhile.
                self.connected.compare_and_swap(&current, None);
            }
        }
    }
}

// === Pace ===

/// At most one connection attempt per `pace` while connecting fails: after
/// a failed attempt, the next may start `pace` later.
struct Pace {
    pace: Duration,
    /// µs after `epoch` before which no new attempt starts.
    next_attempt_us: AtomicU64,
    /// Tokio's clock, so tests can pause it.
    epoch: Instant,
}

impl Pace {
    fn new(pace: Duration) -> Pace {
        Pace {
            pace,
            next_attempt_us: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// How long until an attempt may start; `None`: now.
    fn wait(&self) -> Option<Duration> {
        let now = self.epoch.elapsed().as_micros() as u64;
        let next = self.next_attempt_us.load(Ordering::Relaxed);
        (now < next).then(|| Duration::from_micros(next - now))
    }

    /// An attempt failed just now.
    fn failed(&self) {
        let next = self.epoch.elapsed() + self.pace;
        self.next_attempt_us
            .store(next.as_micros() as u64, Ordering::Relaxed);
    }

    /// The next attempt may start at once.
    fn allow_now(&self) {
        self.next_attempt_us.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_attempt_per_pace_while_connecting_fails() {
        let ms = Duration::from_millis;
        let pace = Pace::new(ms(500));
        assert_eq!(pace.wait(), None, "the first attempt at once");
        advance(ms(100)).await;
        pace.failed();
        assert_eq!(pace.wait(), Some(ms(500)));
        advance(ms(499)).await;
        assert_eq!(pace.wait(), Some(ms(1)), "not a moment early");
        advance(ms(1)).await;
        assert_eq!(pace.wait(), None, "on time");

        pace.failed();
        advance(ms(10)).await;
        assert_eq!(pace.wait(), Some(ms(490)));
        pace.allow_now();
        assert_eq!(pace.wait(), None, "a probe is not turned away");
    }
}
