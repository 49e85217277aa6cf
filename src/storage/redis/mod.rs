//! Counters in Redis or a Redis Cluster, shared by every sluice instance.
//!
//! A call goes: local over-limit cache (answers known denials without
//! Redis) -> circuit breaker (answers at once while Redis is failing) -> the
//! node's batch queue, under the store timeout. Each node's queue sends what
//! is waiting as one `EVALSHA` (one per slot on a Cluster) as soon as fewer
//! than two batches are unanswered; each unit in it, one counter or, on a
//! standalone Redis, all of one request's counters (so that a denied request
//! consumes nothing), is decided atomically.
//!
//! | module        | job |
//! |---------------|-----|
//! | `scripts`     | the Lua script (`storage/scripts/*.lua`), its units and replies |
//! | `batch`       | a node's batch queue: concurrent calls coalesced into one script call |
//! | `connect`     | URL, credentials, TLS roots, timeouts for any node |
//! | `standalone`  | one server, one multiplexed connection |
//! | `cluster`     | slots -> masters, one pipeline per master, redirects |
//! | `sentinel`    | the master a Redis Sentinel names, followed through failovers |
//! | `slot`        | CRC16 key slots |
//! | `breaker`     | the circuit breaker |
//! | `local_cache` | the over-limit cache |

mod batch;
mod breaker;
mod cluster;
mod connect;
mod local_cache;
pub mod scripts;
mod sentinel;
mod slot;
mod standalone;

use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use metrics::counter;
use redis::{RedisError, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use self::breaker::Breaker;
use self::cluster::Cluster;
use self::connect::Connector;
use self::local_cache::OverLimitCache;
use self::scripts::{Request, Time};
use self::sentinel::Sentinel;
use self::standalone::Standalone;
use super::{CounterOp, CounterStore, StoreError, StoreHealth};
use crate::clock::{Clock, SystemClock};
use crate::limiter::Outcome;
use crate::task::OwnedTask;
use crate::telemetry::names;

pub use self::slot::key_slot;

/// Where the counters live.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://` or `rediss://` URL of one server.
    Standalone(String),
    /// Seed node URLs of a Cluster; the rest is discovered.
    Cluster(Vec<String>),
    /// The master named `master` by the sentinels at these URLs (whose
    /// credentials, TLS and database are the master's).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTarget::Standalone(url) => {
                write!(f, "Standalone({})", crate::secret::redact_url(url))
            }
            RedisTarget::Cluster(urls) => {
                let urls: Vec<_> = urls.iter().map(|u| crate::secret::redact_url(u)).collect();
                write!(f, "Cluster({urls:?})")
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let urls: Vec<_> = sentinels
                    .iter()
                    .map(|u| crate::secret::redact_url(u))
                    .collect();
                write!(f, "Sentinel({urls:?}, {master})")
            }
        }
    }
}

/// How the store behaves; `RedisOptions::new(timeout)` gives the defaults.
#[derive(Clone)]
pub struct RedisOptions {
    /// No call waits longer for Redis.
    pub store_timeout: Duration,
    /// Consecutive failed calls, spanning at least the store timeout, that
    /// open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before each probe.
    pub breaker_cooldown: Duration,
    /// Most counters the over-limit cache remembers; 0 disables it.
    pub local_cache_size: usize,
    /// Replaces the password in the URL(s).
    pub password: Option<String>,
    /// PEM certificates to trust for `rediss://` instead of the web PKI roots.
    pub ca_cert: Option<Vec<u8>>,
    /// This instance's wall clock. Counters run on Redis' `TIME`; this clock
    /// only places calendar windows' boundaries around now (the script then
    /// picks the window by Redis' time; see `scripts::Time`).
    pub local_clock: Arc<dyn Clock>,
}

impl RedisOptions {
    pub fn new(store_timeout: Duration) -> RedisOptions {
        RedisOptions {
            store_timeout,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_millis(500),
            local_cache_size: 100_000,
            password: None,
            ca_cert: None,
            local_clock: Arc::new(SystemClock),
        }
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("store_timeout", &self.store_timeout)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("local_cache_size", &self.local_cache_size)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert.is_some())
            .finish()
    }
}

/// The operations of one store call that go to Redis.
pub struct Call<'a> {
    pub ops: &'a [&'a CounterOp],
    pub time: Time,
}

enum Backend {
    Standalone(Standalone),
    Cluster(Arc<Cluster>),
    Sentinel(Arc<Sentinel>),
}

impl Backend {
    async fn run(&self, call: &Call<'_>) -> Result<Vec<Outcome>, StoreError> {
        match self {
            Backend::Standalone(s) => s.run(call).await,
            Backend::Cluster(c) => c.run(call).await,
            Backend::Sentinel(s) => s.run(call).await,
        }
    }

    /// All of one request's operations as one unit (one server only).
    async fn run_request(
        &self,
        call: &Call<'_>,
        request: Request<'_>,
    ) -> Result<Vec<Outcome>, StoreError> {
        match self {
            Backend::Standalone(s) => s.run_request(call, request).await,
            Backend::Sentinel(s) => s.run_request(call, request).await,
            Backend::Cluster(c) => c.run(call).await,
        }
    }

    /// One server decides every counter (so one script may check and
    /// update several atomically).
    fn single_server(&self) -> bool {
        matches!(self, Backend::Standalone(_) | Backend::Sentinel(_))
    }

    async fn probe(&self) -> Result<(), StoreError> {
        match self {
            Backend::Standalone(s) => s.probe().await,
            Backend::Cluster(c) => c.probe().await,
            Backend::Sentinel(s) => s.probe().await,
        }
    }
}

/// Counters in Redis (standalone or Cluster). Cheap to share: clone the `Arc`.
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    kind: &'static str,
    target: String,
    backend: Backend,
    breaker: Breaker,
    cache: Option<OverLimitCache>,
    timeout: Duration,
    /// Local monotonic time (Tokio's clock) for the over-limit cache.
    epoch: Instant,
    /// Counts in this clock's time instead of Redis' (see
    /// [`RedisStore::with_clock`]).
    clock: Option<Arc<dyn Clock>>,
    /// Places calendar windows (see [`RedisOptions::local_clock`]).
    local_clock: Arc<dyn Clock>,
    /// Wakes the supervisor when the breaker opens.
    opened: Arc<Notify>,
    /// Cuts the supervisor's cool-down short: a Sentinel named a new master.
    probe_now: Arc<Notify>,
    /// Set once, just after the store is built: the task holds the store
    /// weakly, and ends when the store is dropped.
    supervisor: OnceLock<OwnedTask>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("kind", &self.inner.kind)
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the store without waiting for Redis: sluice starts and serves
    /// (by the failure mode) even while Redis is down. A background task
    /// connects, loads the scripts, and later probes while the breaker is
    /// open. Fails only on an invalid URL. Needs a Tokio runtime.
    pub fn new(target: &RedisTarget, options: RedisOptions) -> Result<RedisStore, RedisError> {
        RedisStore::build(target, options, None)
    }

    /// A store that counts in `clock`'s time instead of Redis' `TIME`: the
    /// scripts are given its time, and the over-limit cache ages by it too
    /// (its denials must expire when the counters' windows move on). For
    /// the storage contract suite, which replays exact sequences at chosen
    /// times on a real Redis; a paused Tokio clock cannot stand in there,
    /// since it would jump ahead whenever the test waits on a socket. Never
    /// in `sluice serve`: instances agree because they share Redis' clock.
    pub fn with_clock(
        target: &RedisTarget,
        options: RedisOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<RedisStore, RedisError> {
        RedisStore::build(target, options, Some(clock))
    }

    fn build(
        target: &RedisTarget,
        options: RedisOptions,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<RedisStore, RedisError> {
        let timeout = options.store_timeout;
        let connector = |url: &str| {
            Connector::new(
                url,
                options.password.as_deref(),
                options.ca_cert.clone(),
                timeout,
            )
        };
        let probe_now = Arc::new(Notify::new());
        let (kind, backend, target) = match target {
            RedisTarget::Standalone(url) => {
                let standalone = Standalone::new(&connector(url)?, options.breaker_cooldown)?;
                let address = standalone.address().to_owned();
                ("redis", Backend::Standalone(standalone), address)
            }
            RedisTarget::Cluster(urls) => {
                let seeds = urls
                    .iter()
                    .map(|u| connector(u))
                    .collect::<Result<Vec<_>, _>>()?;
                let cluster = Cluster::new(seeds, timeout, options.breaker_cooldown);
                let address = cluster.seeds().collect::<Vec<_>>().join(",");
                (
                    "redis-cluster",
                    Backend::Cluster(Arc::new(cluster)),
                    address,
                )
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let sentinels = sentinels
                    .iter()
                    .map(|u| connector(u))
                    .collect::<Result<Vec<_>, _>>()?;
                // The master's settings are the URLs'; its address is
                // whatever the sentinels say.
                let Some(settings) = sentinels.first().cloned() else {
                    return Err(RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "redis+sentinel:// needs at least one sentinel",
                    )));
                };
                let sentinel = Sentinel::start(
                    master.clone(),
                    sentinels,
                    settings,
                    options.breaker_cooldown,
                    probe_now.clone(),
                );
                let address = sentinel.describe();
                ("redis-sentinel", Backend::Sentinel(sentinel), address)
            }
        };
        let inner = Arc::new(Inner {
            kind,
            target,
            backend,
            breaker: Breaker::new(
                kind,
                options.breaker_failures,
                timeout,
                options.breaker_cooldown,
            ),
            cache: OverLimitCache::new(options.local_cache_size),
            timeout,
            epoch: Instant::now(),
            local_clock: clock.clone().unwrap_or(options.local_clock),
            clock,
            opened: Arc::new(Notify::new()),
            probe_now,
            supervisor: OnceLock::new(),
        });
        let task = OwnedTask::spawn(supervise(
            Arc::downgrade(&inner),
            inner.opened.clone(),
            inner.probe_now.clone(),
        ));
        let _ = inner.supervisor.set(task);
        Ok(RedisStore { inner })
    }

    /// Whether the circuit breaker is open (calls answered by the failure mode).
    pub fn breaker_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Entries in the over-limit cache.
    pub fn local_cache_len(&self) -> usize {
        self.inner.cache.as_ref().map_or(0, OverLimitCache::len)
    }
}

impl Inner {
    fn local_now_us(&self) -> u64 {
        match &self.clock {
            Some(clock) => clock.now_us(),
            None => self.epoch.elapsed().as_micros() as u64,
        }
    }

    /// Counts a failed call; opens the breaker on the last straw.
    fn failed(&self, error: &StoreError) {
        if let Backend::Sentinel(s) = &self.backend {
            // The master may have moved: ask the sentinels.
            s.suspect();
        }
        if self.breaker.record_failure(error) {
            self.opened.notify_one();
        }
    }

    /// Sends `ops` to Redis (through the breaker, within the store timeout)
    /// and remembers the denials in the over-limit cache. `request`: as one
    /// request, atomically (standalone only); `None`: each on its own.
    async fn call_redis(
        &self,
        ops: &[&CounterOp],
        request: Option<Request<'_>>,
    ) -> Result<Vec<Outcome>, StoreError> {
        if !self.breaker.allows() {
            return Err(StoreError::BreakerOpen);
        }
        let sent_us = self.local_now_us();
        let now_us = self.clock.as_ref().map(|c| c.now_us());
        let call = Call {
            ops,
            time: Time {
                now_us,
                local_us: now_us.unwrap_or_else(|| self.local_clock.now_us()),
            },
        };
        let mut in_flight = InFlight {
            inner: self,
            finished: false,
        };
        let run = async {
            match request {
                Some(request) => self.backend.run_request(&call, request).await,
                None => self.backend.run(&call).await,
            }
        };
        let result = match tokio::time::timeout(self.timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        in_flight.finished = true;
        let answers = match result {
            Ok(answers) => answers,
            Err(e) => {
                self.failed(&e);
                return Err(e);
            }
        };
        if answers.len() != ops.len() {
            return Err(StoreError::Script(
                "Redis answered fewer commands than were sent".into(),
            ));
        }
        self.breaker.record_success();
        if let Some(cache) = &self.cache {
            for (i, (op, outcome)) in ops.iter().zip(&answers).enumerate() {
                // In one request, a counter's second operation is decided
                // after the first one's hits, which a denied request then
                // does not keep: its denial may not hold for long.
                let repeated = request.is_some() && ops[..i].iter().any(|o| o.key == op.key);
                if !repeated {
                    cache.record(op, outcome, sent_us);
                }
            }
        }
        Ok(answers)
    }

    async fn probe(&self, timeout: Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(timeout, self.backend.probe()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }
}

/// Connects at start-up, then probes every cool-down while the breaker is
/// open; closes it on the first answer. Ends when the store is dropped.
async fn supervise(store: Weak<Inner>, opened: Arc<Notify>, probe_now: Arc<Notify>) {
    let Some(inner) = store.upgrade() else { return };
    // Probes run in the background, so they may wait longer than a call;
    // but not so long that a recovered Redis waits on a stale probe.
    let probe_timeout = inner.timeout.max(Duration::from_millis(250));
    let startup_timeout = inner.timeout.max(Duration::from_secs(2));
    let cooldown = inner.breaker.cooldown();
    match inner.probe(startup_timeout).await {
        Ok(()) => inner.breaker.close(),
        Err(e) => {
            inner.breaker.open(&format!("unreachable at start-up: {e}"));
        }
    }
    drop(inner);
    loop {
        let open = match store.upgrade() {
            Some(inner) => inner.breaker.is_open(),
            None => return,
        };
        if !open {
            // A permit is stored if the breaker opened since we looked.
            opened.notified().await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(cooldown) => {}
            () = probe_now.notified() => {}
        }
        let Some(inner) = store.upgrade() else { return };
        match inner.probe(probe_timeout).await {
            Ok(()) => inner.breaker.close(),
            Err(e) => {
                counter!(names::REDIS_PROBE_FAILURES, "store" => inner.kind).increment(1);
                tracing::debug!(store = inner.kind, error = %e, "counter store probe failed");
            }
        }
    }
}

/// Counts a call as failed if it is dropped before it finishes: the
/// service's timeout drops it when Redis hangs, and a hang must open the
/// breaker just as an error does.
struct InFlight<'a> {
    inner: &'a Inner,
    finished: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.failed(&StoreError::Timeout(self.inner.timeout));
        }
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn apply(&self, ops: &[CounterOp]) -> Result<Vec<Outcome>, StoreError> {
        let inner = &*self.inner;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; ops.len()];
        let mut remote: Vec<&CounterOp> = Vec::with_capacity(ops.len());
        let mut remote_index: Vec<usize> = Vec::with_capacity(ops.len());
        match &inner.cache {
            Some(cache) => {
                let now = inner.local_now_us();
                for (i, op) in ops.iter().enumerate() {
                    match cache.check(op, now) {
                        Some(outcome) => outcomes[i] = Some(outcome),
                        None => {
                            remote.push(op);
                            remote_index.push(i);
                        }
                    }
                }
                let local = ops.len() - remote.len();
                if local > 0 {
                    counter!(names::LOCAL_CACHE_ANSWERS, "store" => inner.kind)
                        .increment(local as u64);
                }
            }
            None => {
                remote.extend(ops.iter());
                remote_index.extend(0..ops.len());
            }
        }
        if remote.is_empty() {
            return complete(outcomes);
        }
        let answers = inner.call_redis(&remote, None).await?;
        for (&i, outcome) in remote_index.iter().zip(answers) {
            outcomes[i] = Some(outcome);
        }
        complete(outcomes)
    }

    /// On a standalone Redis, one unit of the script (in a batch) checks and
    /// updates all the counters atomically. A Cluster spreads the counters
    /// over slots no one script may span, so it takes the two steps.
    async fn apply_request(
        &self,
        ops: &[CounterOp],
        vetoes: &[bool],
    ) -> Result<Vec<Outcome>, StoreError> {
        let inner = &*self.inner;
        let atomic = inner.backend.single_server()
            && ops.len() >= 2
            && vetoes.contains(&true)
            && ops.iter().any(|op| op.hits > 0);
        if !atomic {
            return super::apply_in_two_steps(self, ops, vetoes).await;
        }
        // A veto the over-limit cache already knows is denied denies the
        // request: Redis only checks the others.
        let mut known: Vec<Option<Outcome>> = vec![None; ops.len()];
        if let Some(cache) = &inner.cache {
            let now = inner.local_now_us();
            for ((known, op), &veto) in known.iter_mut().zip(ops).zip(vetoes) {
                *known = cache.check(op, now).filter(|_| veto);
            }
        }
        let local = known.iter().filter(|k| k.is_some()).count();
        if local == 0 {
            let remote: Vec<&CounterOp> = ops.iter().collect();
            return inner
                .call_redis(
                    &remote,
                    Some(Request {
                        vetoes,
                        denied: false,
                    }),
                )
                .await;
        }
        counter!(names::LOCAL_CACHE_ANSWERS, "store" => inner.kind).increment(local as u64);
        let remote: Vec<&CounterOp> = ops
            .iter()
            .zip(&known)
            .filter(|(_, known)| known.is_none())
            .map(|(op, _)| op)
            .collect();
        let mut checked = if remote.is_empty() {
            Vec::new()
        } else {
            let request = Request {
                vetoes: &[],
                denied: true,
            };
            inner.call_redis(&remote, Some(request)).await?
        }
        .into_iter();
        complete(
            known
                .into_iter()
                .map(|known| known.or_else(|| checked.next()))
                .collect(),
        )
    }

    /// Down while the breaker is open or still connecting, and also while
    /// any node cannot be reached (then only its calls fail, and the
    /// breaker stays closed while others succeed).
    fn health(&self) -> StoreHealth {
        let health = self.inner.breaker.health();
        if health != StoreHealth::Up {
            return health;
        }
        match &self.inner.backend {
            Backend::Standalone(s) => match s.failing() {
                Some(why) => StoreHealth::Down(format!("not connected: {why}")),
                None => health,
            },
            Backend::Sentinel(s) => match s.failing() {
                Some(why) => StoreHealth::Down(format!("not connected: {why}")),
                None => health,
            },
            Backend::Cluster(c) => {
                let failing = c.failing_masters();
                if failing.is_empty() {
                    health
                } else {
                    StoreHealth::Down(format!("masters not answering: {}", failing.join(", ")))
                }
            }
        }
    }

    fn kind(&self) -> &'static str {
        self.inner.kind
    }
}

// === helpers shared by the backends ===

/// Every operation answered, or a script error naming the gap.
fn complete(outcomes: Vec<Option<Outcome>>) -> Result<Vec<Outcome>, StoreError> {
    outcomes
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| StoreError::Script("Redis answered fewer commands than were sent".into()))
}

/// Maps a client error to the store's error kinds; `timeout` is the
/// connection's response timeout.
fn redis_error(e: &RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout(timeout)
    } else if e.is_cluster_error() {
        StoreError::Redirect(e.to_string())
    } else {
        // Refused, dropped, TLS and AUTH failures: all "cannot talk to Redis
        // now", all worth probing for.
        StoreError::Connection(e.to_string())
    }
}

/// A probe's `PING` and `SCRIPT LOAD` replies must all be answers.
fn check_probe_replies(address: &str, values: &[Value]) -> Result<(), StoreError> {
    for value in values {
        if let Value::ServerError(e) = value {
            return Err(StoreError::Connection(format!("{address}: {e}")));
        }
    }
    Ok(())
}
