//! Redis Sentinel: the master of one named group, found by asking the
//! sentinels (`SENTINEL get-master-addr-by-name`) and followed through
//! failovers (`+switch-master`).
//!
//! Why sluice asks the sentinels itself rather than use the redis crate's
//! `SentinelClient`: that client resolves the master when it opens a
//! connection, and sluice keeps one long-lived multiplexed connection per
//! node with its own batch queue, reconnect pace and breaker (see
//! `connect`), so it would go on reconnecting to the dead master's address.
//! Here the master is a [`Standalone`] like any other, replaced whole when
//! the sentinels name a new one: calls in flight on the old one finish or
//! fail within the store timeout, the next ones go to the new master.
//!
//! One task follows the sentinels: it subscribes to `+switch-master` on one
//! of them (the first that answers), asks it again every
//! [`RECHECK_EVERY`] (a subscription can die silently) and whenever a call
//! to the master fails (at most every [`MIN_ASK_INTERVAL`]), and moves on
//! to the next sentinel when this one stops answering.
//!
//! The URL's credentials (or `--redis-password`) are the master's. Sentinels
//! are asked with the same credentials, or without any when they have no
//! password configured (Redis refuses an `AUTH` it does not expect).

use std::convert::Infallible;
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::StreamExt as _;
use metrics::counter;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connect::Connector;
use super::scripts::Request;
use super::standalone::Standalone;
use super::Call;
use crate::limiter::Outcome;
use crate::storage::StoreError;
use crate::task::OwnedTask;
use crate::telemetry::names;

/// How often the followed sentinel is asked again, subscription or not.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// Failing calls ask for the master again; this bounds how often.
const MIN_ASK_INTERVAL: Duration = Duration::from_millis(100);
/// The least time a sentinel query or connection attempt may take: they
/// run in the background, so they may outlast a call's store timeout.
const SENTINEL_TIMEOUT: Duration = Duration::from_millis(500);
/// After every sentinel failed to answer, wait this long before the next
/// round.
const ROUND_PAUSE: Duration = Duration::from_millis(250);
/// How long a probe waits for the sentinels to name the first master.
const FIRST_MASTER_WAIT: Duration = Duration::from_secs(1);

pub struct Sentinel {
    name: String,
    sentinels: Vec<Connector>,
    /// The master's settings (credentials, TLS, database); its address is
    /// what the sentinels say.
    master: Connector,
    /// The least time between failed connection attempts to the master.
    pace: Duration,
    current: ArcSwapOption<Master>,
    /// A call failed: ask the sentinels now.
    suspect: Arc<Notify>,
    /// A master was installed (the start-up probe waits for the first).
    installed: Notify,
    /// Tells the store's supervisor to probe at once (the new master),
    /// rather than at the end of its cool-down.
    probe_now: Arc<Notify>,
    /// Why the last round of questions to the sentinels failed.
    last_error: Mutex<Option<String>>,
    follower: OnceLock<OwnedTask>,
}

struct Master {
    address: String,
    node: Standalone,
}

impl Sentinel {
    /// `sentinels`: their addresses (with the master's credentials);
    /// `master`: how to reach whichever master they name; `probe_now` is
    /// notified when the master changes. Starts the task that follows the
    /// sentinels; it ends when the store is dropped.
    pub fn start(
        name: String,
        sentinels: Vec<Connector>,
        master: Connector,
        pace: Duration,
        probe_now: Arc<Notify>,
    ) -> Arc<Sentinel> {
        let sentinel = Arc::new(Sentinel {
            name,
            sentinels,
            master,
            pace,
            current: ArcSwapOption::empty(),
            suspect: Arc::new(Notify::new()),
            installed: Notify::new(),
            probe_now,
            last_error: Mutex::new(None),
            follower: OnceLock::new(),
        });
        let task = OwnedTask::spawn(follow(
            Arc::downgrade(&sentinel),
            sentinel.sentinels.clone(),
            sentinel.name.clone(),
            sentinel.suspect.clone(),
        ));
        let _ = sentinel.follower.set(task);
        sentinel
    }

    /// `sentinel1:port,sentinel2:port/name`, for logs.
    pub fn describe(&self) -> String {
        let addresses: Vec<String> = self.sentinels.iter().map(Connector::address).collect();
        format!("{}/{}", addresses.join(","), self.name)
    }

    /// A call to the master failed: ask the sentinels whether it changed.
    pub fn suspect(&self) {
        self.suspect.notify_one();
    }

    /// Why the master cannot be reached, if it cannot.
    pub fn failing(&self) -> Option<String> {
        match &*self.current.load() {
            Some(master) => master
                .node
                .failing()
                .map(|why| format!("master {}: {why}", master.address)),
            None => Some(self.no_master()),
        }
    }

    fn no_master(&self) -> String {
        let why = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        match &*why {
            Some(why) => format!("no sentinel names a master '{}': {why}", self.name),
            None => format!("no sentinel has named the master '{}' yet", self.name),
        }
    }

    fn master(&self) -> Result<Arc<Master>, StoreError> {
        self.current.load_full().ok_or_else(|| {
            self.suspect();
            StoreError::Connection(self.no_master())
        })
    }

    pub async fn run(&self, call: &Call<'_>) -> Result<Vec<Outcome>, StoreError> {
        self.master()?.node.run(call).await
    }

    pub async fn run_request(
        &self,
        call: &Call<'_>,
        request: Request<'_>,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.master()?.node.run_request(call, request).await
    }

    /// Probes the master, waiting a moment for the sentinels to name one
    /// first.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + FIRST_MASTER_WAIT;
        let master = loop {
            let mut installed = pin!(self.installed.notified());
            installed.as_mut().enable();
            if let Some(master) = self.current.load_full() {
                break master;
            }
            self.suspect();
            if tokio::time::timeout_at(deadline, installed).await.is_err() {
                return Err(StoreError::Connection(self.no_master()));
            }
        };
        let result = master.node.probe().await;
        if result.is_err() {
            self.suspect();
        }
        result
    }

    /// Makes `address` the master, unless it already is.
    fn install(&self, address: &str) -> Result<(), String> {
        if self.current.load().as_ref().map(|m| m.address.as_str()) == Some(address) {
            return Ok(());
        }
        let (host, port) = split_address(address)?;
        let node = Standalone::new(&self.master.for_node(host, port), self.pace)
            .map_err(|e| format!("master {address}: {e}"))?;
        let previous = self.current.swap(Some(Arc::new(Master {
            address: address.to_owned(),
            node,
        })));
        match previous {
            Some(previous) => {
                counter!(names::REDIS_MASTER_CHANGES, "store" => "redis-sentinel").increment(1);
                tracing::warn!(
                    name = %self.name,
                    from = %previous.address,
                    to = %address,
                    "Redis Sentinel: the master changed; following it"
                );
                self.probe_now.notify_one();
            }
            None => {
                tracing::info!(name = %self.name, master = %address, "Redis Sentinel: master found")
            }
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.installed.notify_waiters();
        Ok(())
    }
}

fn split_address(address: &str) -> Result<(&str, u16), String> {
    address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("bad master address '{address}'"))
}

// === following the sentinels ===

/// Follows the sentinels, one at a time, until the store is dropped.
async fn follow(
    store: Weak<Sentinel>,
    sentinels: Vec<Connector>,
    name: String,
    suspect: Arc<Notify>,
) {
    let mut sessions: Vec<SentinelSession> = sentinels
        .into_iter()
        .map(|connector| SentinelSession {
            connector,
            without_auth: false,
            answered: false,
        })
        .collect();
    let mut first = 0;
    // Warn once per outage of every sentinel, not every round.
    let mut warned = false;
    let count = sessions.len();
    loop {
        let mut errors = Vec::new();
        for i in 0..count {
            let at = (first + i) % count;
            let session = &mut sessions[at];
            session.answered = false;
            let Err(e) = session.follow(&store, &name, &suspect).await;
            if session.answered {
                // It answered before it failed: start with the next one.
                warned = false;
                first = (at + 1) % count;
            }
            match e {
                Ended::StoreDropped => return,
                Ended::Failed(why) => {
                    tracing::debug!(sentinel = %session.connector.address(), error = %why, "Redis Sentinel: asking the next sentinel");
                    errors.push(format!("{}: {why}", session.connector.address()));
                }
            }
        }
        if let Some(store) = store.upgrade() {
            *store.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(errors.join("; "));
        }
        if !std::mem::replace(&mut warned, true) {
            tracing::warn!(name = %name, errors = ?errors, "Redis Sentinel: no sentinel answered; retrying");
        }
        tokio::time::sleep(ROUND_PAUSE).await;
        if store.strong_count() == 0 {
            return;
        }
    }
}

enum Ended {
    StoreDropped,
    Failed(String),
}

impl From<RedisError> for Ended {
    fn from(e: RedisError) -> Ended {
        Ended::Failed(e.to_string())
    }
}

struct SentinelSession {
    connector: Connector,
    /// This sentinel has no password: connect without the master's.
    without_auth: bool,
    /// It named a master in this session.
    answered: bool,
}

impl SentinelSession {
    /// Asks this sentinel, subscribes to its `+switch-master`, and follows
    /// it until it stops answering (or the store is dropped).
    async fn follow(
        &mut self,
        store: &Weak<Sentinel>,
        name: &str,
        suspect: &Notify,
    ) -> Result<Infallible, Ended> {
        let timeout = self.connector.timeout().max(SENTINEL_TIMEOUT);
        let client = self.client()?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut conn = match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Err(e) if !self.without_auth && no_password_configured(&e) => {
                self.without_auth = true;
                self.client()?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?
            }
            other => other?,
        };
        let mut last_ask = Instant::now();
        install(store, &ask(&mut conn, name).await?)?;
        self.answered = true;

        let client = self.client()?;
        let mut pubsub = within(timeout, client.get_async_pubsub()).await?;
        within(timeout, pubsub.subscribe("+switch-master")).await?;
        // A switch between the first question and the subscription is
        // only seen by asking again.
        install(store, &ask(&mut conn, name).await?)?;
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err(Ended::Failed("the subscription ended".into()));
                    };
                    // "<name> <old-ip> <old-port> <new-ip> <new-port>"
                    let payload: String = message.get_payload()?;
                    let parts: Vec<&str> = payload.split_whitespace().collect();
                    if let [switched, _, _, host, port] = parts[..] {
                        if switched == name {
                            install(store, &format!("{host}:{port}"))?;
                        }
                    }
                    continue;
                }
                () = suspect.notified() => {
                    tokio::time::sleep_until(last_ask + MIN_ASK_INTERVAL).await;
                }
                () = tokio::time::sleep(RECHECK_EVERY) => {}
            }
            last_ask = Instant::now();
            install(store, &ask(&mut conn, name).await?)?;
        }
    }

    fn client(&self) -> Result<redis::Client, Ended> {
        self.connector
            .for_sentinel(!self.without_auth)
            .client()
            .map_err(Ended::from)
    }
}

/// `SENTINEL get-master-addr-by-name`: `host:port`.
async fn ask(conn: &mut MultiplexedConnection, name: &str) -> Result<String, Ended> {
    let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query_async(conn)
        .await?;
    match reply {
        Some((host, port)) => Ok(format!("{host}:{port}")),
        None => Err(Ended::Failed(format!(
            "the sentinel monitors no master named '{name}'"
        ))),
    }
}

fn install(store: &Weak<Sentinel>, address: &str) -> Result<(), Ended> {
    let Some(store) = store.upgrade() else {
        return Err(Ended::StoreDropped);
    };
    store.install(address).map_err(Ended::Failed)
}

async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, Ended> {
    match tokio::time::timeout(limit, f).await {
        Ok(result) => result.map_err(Ended::from),
        Err(_) => Err(Ended::Failed(format!("no answer within {limit:?}"))),
    }
}

/// Redis' answer to an `AUTH` when the server has no password (or
/// another one: then the attempt without one fails with `NOAUTH`).
fn no_password_configured(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.to_string().contains("without any password configured")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addresses_split() {
        assert_eq!(split_address("10.0.0.7:6380"), Ok(("10.0.0.7", 6380)));
        assert_eq!(split_address("::1:6379"), Ok(("::1", 6379)));
        assert!(split_address("redis").is_err());
        assert!(split_address("redis:port").is_err());
    }
}
