//! The live source: [`PostgresSource`] loads the rules at start-up (from
//! the local snapshot when PostgreSQL cannot give valid ones) and keeps them
//! current. It LISTENs on the primary, and on each NOTIFY waits until the
//! replica has replayed the primary's WAL position before reading, so it
//! never installs rules older than the change it was told about. Every
//! successful load is also written to the snapshot.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use sqlx::postgres::{PgListener, PgPool};

use super::read::load_catalog;
use super::snapshot::{read_snapshot, write_snapshot};
use crate::health::Readiness;
use crate::limiter::RuleSet;
use crate::rules::catalog::Catalog;
use crate::rules::RulesHandle;
use crate::telemetry::names;

/// The NOTIFY channel the schema's triggers send on.
pub const CHANNEL: &str = "sluice_config";

/// A full reload this often even without a NOTIFY: a safety net for a
/// notification lost with a silently dead connection.
const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// How often to ask the replica whether it has replayed far enough.
const REPLAY_POLL: Duration = Duration::from_millis(10);
/// After this, a replica that has not caught up counts as a failure (the
/// session is restarted, with backoff), and is logged.
const REPLAY_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a replica that failed the last load gets to show, on the next,
/// that it is up and has replayed the change.
const REPLICA_RETRY_TIMEOUT: Duration = Duration::from_millis(200);
/// Bounds of the delay between LISTEN sessions (see [`Backoff`]).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the replica has not replayed the primary's WAL up to {lsn} after {waited:?}")]
    ReplicaBehind { lsn: String, waited: Duration },
    #[error("the connection to the primary for LISTEN was lost")]
    ListenerLost,
}

async fn within<T, E>(
    limit: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, SourceError>
where
    SourceError: From<E>,
{
    match tokio::time::timeout(limit, f).await {
        Ok(result) => result.map_err(SourceError::from),
        Err(_) => Err(SourceError::Timeout(limit)),
    }
}

// === The live source ===

/// Where the source reads and listens.
pub struct Connections {
    pub primary: PgPool,
    /// Reads go here when set; else to the primary.
    pub replica: Option<PgPool>,
    /// A pool of one for the LISTEN connection, so it never waits behind
    /// queries.
    pub listen: PgPool,
    /// For each query and each connection attempt.
    pub timeout: Duration,
}

/// Where to read from and what to publish into.
pub struct PostgresSource {
    db: Connections,
    rules: RulesHandle,
    readiness: Arc<Readiness>,
    snapshot: Option<PathBuf>,
    /// Of the catalog in force, to skip reloads that change nothing.
    fingerprint: Option<[u8; 32]>,
    /// Of the last catalog refused as invalid, to log it once.
    refused: Option<[u8; 32]>,
    up: bool,
    /// Why the last read from the replica failed, while reads go to the
    /// primary instead.
    replica_failing: Option<String>,
}

impl PostgresSource {
    pub fn new(
        db: Connections,
        rules: RulesHandle,
        readiness: Arc<Readiness>,
        snapshot: Option<PathBuf>,
    ) -> PostgresSource {
        PostgresSource {
            db,
            rules,
            readiness,
            snapshot,
            fingerprint: None,
            refused: None,
            up: true,
            replica_failing: None,
        }
    }

    fn source_name(&self) -> &'static str {
        match (&self.db.replica, &self.replica_failing) {
            (Some(_), None) => "postgres:replica",
            (Some(_), Some(_)) => "postgres:primary (replica failing)",
            (None, _) => "postgres:primary",
        }
    }

    /// The catalog as the primary has committed it: from the replica once
    /// it has replayed that far (waiting up to `max_wait`), else from the
    /// primary, so that a replica that is down or stuck never holds back a
    /// change; the replica is tried first again on the next load. Fails when
    /// the primary cannot say what it has committed.
    async fn load_current(&mut self, max_wait: Duration) -> Result<Catalog, SourceError> {
        let Some(replica) = self.db.replica.clone() else {
            return within(self.db.timeout, load_catalog(&self.db.primary)).await;
        };
        let lsn: String = within(
            self.db.timeout,
            sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&self.db.primary),
        )
        .await?;
        // A replica that failed last time gets a short try at showing it is
        // up and current, so that while it stays down or stuck a change waits
        // for it once, not every time; once it is, it is read as usual.
        let (poll_timeout, max_wait) = match self.replica_failing {
            Some(_) => (
                self.db.timeout.min(REPLICA_RETRY_TIMEOUT),
                max_wait.min(REPLICA_RETRY_TIMEOUT),
            ),
            None => (self.db.timeout, max_wait),
        };
        let from_replica = match wait_for_replay(&replica, &lsn, poll_timeout, max_wait).await {
            Ok(()) => within(self.db.timeout, load_catalog(&replica)).await,
            Err(e) => Err(e),
        };
        match from_replica {
            Ok(catalog) => {
                if self.replica_failing.take().is_some() {
                    tracing::info!("reading rules from the replica again");
                }
                return Ok(catalog);
            }
            Err(e) => {
                if self.replica_failing.replace(e.to_string()).is_none() {
                    tracing::warn!(error = %e, "cannot read rules from the replica; reading the primary");
                }
                counter!(names::POSTGRES_REPLICA_FALLBACKS).increment(1);
            }
        }
        within(self.db.timeout, load_catalog(&self.db.primary)).await
    }

    /// The first load. When PostgreSQL cannot give valid rules, starts from
    /// the snapshot; without one, starts with no limits, or fails when
    /// `require_rules`.
    pub async fn start_up(&mut self, require_rules: bool) -> anyhow::Result<()> {
        // Not older than what the primary has committed; when neither the
        // primary nor a current replica answers, the replica as it is (newer
        // than any snapshot), and the follow-up in `run` catches up.
        let loaded = match (
            self.load_current(self.db.timeout).await,
            self.db.replica.clone(),
        ) {
            (Err(e), Some(replica)) => {
                tracing::warn!(error = %e, "the primary cannot be read; reading the replica as it is");
                within(self.db.timeout, load_catalog(&replica)).await
            }
            (loaded, _) => loaded,
        };
        let reason = match loaded {
            Ok(catalog) => match catalog.compile() {
                Ok(set) => {
                    self.install(catalog, set, None).await;
                    return Ok(());
                }
                Err(errors) => format!("the rules in PostgreSQL are invalid:\n{errors}"),
            },
            Err(e) => format!("PostgreSQL unavailable: {e}"),
        };
        gauge!(names::POSTGRES_UP).set(0.0);
        self.up = false;
        if let Some(path) = &self.snapshot {
            let loaded = read_snapshot(path).and_then(|(catalog, written_at)| {
                let set = catalog
                    .compile()
                    .map_err(|e| format!("{}: invalid rules: {e}", path.display()))?;
                Ok((catalog, set, written_at))
            });
            match loaded {
                Ok((catalog, set, written_at)) => {
                    tracing::warn!(
                        reason = %reason,
                        snapshot = %path.display(),
                        written_at = %written_at,
                        "starting from the local snapshot of the rules; PostgreSQL will be retried"
                    );
                    self.fingerprint = Some(catalog.fingerprint());
                    publish(&self.rules, set);
                    self.readiness.update_rules(|s| {
                        s.loaded = true;
                        s.source = format!("snapshot:{}", path.display());
                        s.last_error = Some(format!(
                            "serving the snapshot written at {written_at}: {reason}"
                        ));
                    });
                    return Ok(());
                }
                Err(why) => tracing::warn!(snapshot = %why, "the snapshot cannot be used"),
            }
        }
        if require_rules {
            anyhow::bail!(
                "{reason}; no usable snapshot (--rules-snapshot); refusing to start (--require-rules)"
            );
        }
        tracing::warn!(reason = %reason, "starting with no rate limits until PostgreSQL answers");
        self.readiness.update_rules(|s| {
            s.loaded = true;
            s.source = "none".into();
            s.last_error = Some(format!("no rules yet, nothing is limited: {reason}"));
        });
        Ok(())
    }

    /// Follows changes until the process ends: LISTEN, reload on NOTIFY,
    /// reconnect with backoff when PostgreSQL goes away.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new();
        loop {
            let Err(e) = self.session(&mut backoff).await;
            self.mark_down(&e);
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// One LISTEN connection's life; returns why it ended.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<Infallible, SourceError> {
        let mut listener =
            within(self.db.timeout, PgListener::connect_with(&self.db.listen)).await?;
        listener.eager_reconnect(false);
        within(self.db.timeout, listener.listen(CHANNEL)).await?;
        // Catch up with whatever changed while nobody listened.
        self.reload(None).await?;
        backoff.reset();
        loop {
            match tokio::time::timeout(RESYNC_EVERY, listener.try_recv()).await {
                Ok(Ok(Some(_))) => {
                    let notified = Instant::now();
                    // Several changes committed together need one reload.
                    while listener.next_buffered().is_some() {}
                    self.reload(Some(notified)).await?;
                }
                Ok(Ok(None)) => return Err(SourceError::ListenerLost),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => self.reload(None).await?,
            }
        }
    }

    /// Loads what the primary has committed (see `load_current`) and puts
    /// it in force if it changed and is valid.
    async fn reload(&mut self, notified: Option<Instant>) -> Result<(), SourceError> {
        let catalog = self.load_current(REPLAY_WAIT_MAX).await?;
        self.mark_up();
        let fingerprint = catalog.fingerprint();
        if self.fingerprint == Some(fingerprint) {
            self.readiness.update_rules(|s| {
                s.source = self.source_name().into();
                s.last_error = None;
            });
            return Ok(());
        }
        match catalog.compile() {
            Ok(set) => {
                self.install(catalog, set, notified).await;
                counter!(names::RULE_RELOADS, "result" => "success").increment(1);
            }
            Err(errors) => {
                counter!(names::RULE_RELOADS, "result" => "failure").increment(1);
                if self.refused.replace(fingerprint) != Some(fingerprint) {
                    for e in &errors.0 {
                        tracing::warn!(error = %e, "invalid rules in PostgreSQL; keeping the rules in force");
                    }
                }
                self.readiness.update_rules(|s| {
                    s.last_error = Some(format!("invalid rules refused:\n{errors}"))
                });
            }
        }
        Ok(())
    }

    /// Publishes a valid catalog and keeps a snapshot of it.
    async fn install(&mut self, catalog: Catalog, set: RuleSet, notified: Option<Instant>) {
        let count = set.rules().len();
        let keys = set.api_key_count();
        publish(&self.rules, set);
        if let Some(t) = notified {
            histogram!(names::RULES_RELOAD_DURATION).record(t.elapsed().as_secs_f64());
        }
        self.fingerprint = Some(catalog.fingerprint());
        self.refused = None;
        let source = self.source_name();
        self.readiness.update_rules(|s| {
            s.loaded = true;
            s.source = source.into();
            s.last_error = None;
        });
        tracing::info!(
            rules = count,
            api_keys = keys,
            source,
            "rules loaded from PostgreSQL"
        );
        if let Some(path) = self.snapshot.clone() {
            let written =
                tokio::task::spawn_blocking(move || write_snapshot(&path, &catalog).map(|()| path))
                    .await;
            match written {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the rules snapshot"),
                Err(e) => tracing::warn!(error = %e, "cannot write the rules snapshot"),
            }
        }
    }

    fn mark_up(&mut self) {
        gauge!(names::POSTGRES_UP).set(1.0);
        gauge!(names::RULES_SYNCED).set(unix_seconds());
        if !std::mem::replace(&mut self.up, true) {
            tracing::info!("PostgreSQL reachable again");
        }
    }

    fn mark_down(&mut self, error: &SourceError) {
        gauge!(names::POSTGRES_UP).set(0.0);
        if std::mem::replace(&mut self.up, false) {
            tracing::warn!(error = %error, "PostgreSQL unavailable; the rules in force stay, retrying with backoff");
        }
        self.readiness.update_rules(|s| {
            s.last_error = Some(format!(
                "PostgreSQL unavailable, serving the rules loaded before: {error}"
            ));
        });
    }
}

/// The delays between LISTEN sessions, with decorrelated jitter: each is
/// drawn from [`BACKOFF_MIN`, 3 x the one before], at most `BACKOFF_MAX`. It
/// grows like an exponential backoff, but the instances that lost
/// PostgreSQL together do not all come back to it in step.
struct Backoff {
    last: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { last: BACKOFF_MIN }
    }

    /// After a session that got going: the next failure retries soon.
    fn reset(&mut self) {
        self.last = BACKOFF_MIN;
    }

    /// Without the OS random source, the top of the range: no jitter, but
    /// still a backoff.
    fn next(&mut self) -> Duration {
        self.last = decorrelated(self.last, getrandom::u32().unwrap_or(u32::MAX));
        self.last
    }
}

/// The delay after `last`: `random` places it in [`BACKOFF_MIN`,
/// min(3 x `last`, `BACKOFF_MAX`)], 0 at the bottom, `u32::MAX` at the top.
fn decorrelated(last: Duration, random: u32) -> Duration {
    let high = (last * 3).clamp(BACKOFF_MIN, BACKOFF_MAX);
    BACKOFF_MIN + (high - BACKOFF_MIN) * random / u32::MAX
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn publish(rules: &RulesHandle, set: RuleSet) {
    gauge!(names::RULES_LOADED).set(set.rules().len() as f64);
    gauge!(names::API_KEYS_LOADED).set(set.api_key_count() as f64);
    rules.store(Arc::new(set));
}

/// Polls the replica until it has replayed the primary's WAL up to `lsn`
/// (immediately true when it is not in recovery, e.g. after a promotion),
/// for at most `max_wait`.
async fn wait_for_replay(
    replica: &PgPool,
    lsn: &str,
    timeout: Duration,
    max_wait: Duration,
) -> Result<(), SourceError> {
    let started = Instant::now();
    let mut warned = false;
    loop {
        let caught_up: bool = within(
            timeout,
            sqlx::query_scalar(
                "SELECT NOT pg_is_in_recovery()
                     OR coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)",
            )
            .bind(lsn)
            .fetch_one(replica),
        )
        .await?;
        if caught_up {
            if warned {
                tracing::info!(waited = ?started.elapsed(), "the replica caught up");
            }
            return Ok(());
        }
        let waited = started.elapsed();
        if waited > max_wait {
            return Err(SourceError::ReplicaBehind {
                lsn: lsn.to_owned(),
                waited,
            });
        }
        if !warned && waited > Duration::from_secs(2) {
            warned = true;
            tracing::warn!(lsn, "waiting for the replica to replay a rules change");
        }
        tokio::time::sleep(REPLAY_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_ends_of_the_random_range_are_the_ends_of_the_delay_range() {
        assert_eq!(decorrelated(BACKOFF_MIN, 0), BACKOFF_MIN);
        assert_eq!(decorrelated(BACKOFF_MIN, u32::MAX), BACKOFF_MIN * 3);
        assert_eq!(
            decorrelated(Duration::from_secs(1), u32::MAX),
            Duration::from_secs(3)
        );
        assert_eq!(decorrelated(Duration::from_secs(2), u32::MAX), BACKOFF_MAX);
        assert_eq!(decorrelated(BACKOFF_MAX, 0), BACKOFF_MIN);
    }

    #[test]
    fn delays_stay_in_bounds_vary_and_start_low_again_after_a_reset() {
        let mut backoff = Backoff::new();
        let mut last = BACKOFF_MIN;
        let mut seen = BTreeSet::new();
        for _ in 0..1000 {
            let delay = backoff.next();
            assert!(
                BACKOFF_MIN <= delay && delay <= (last * 3).min(BACKOFF_MAX),
                "{delay:?} after {last:?}"
            );
            seen.insert(delay);
            last = delay;
        }
        assert!(seen.len() > 100, "not jittered: {seen:?}");
        backoff.reset();
        assert!(backoff.next() <= BACKOFF_MIN * 3);
    }

    proptest! {
        #[test]
        fn any_delay_is_within_its_bounds(
            last_ms in BACKOFF_MIN.as_millis() as u64..=BACKOFF_MAX.as_millis() as u64,
            random in any::<u32>(),
        ) {
            let last = Duration::from_millis(last_ms);
            let delay = decorrelated(last, random);
            prop_assert!(BACKOFF_MIN <= delay);
            prop_assert!(delay <= (last * 3).min(BACKOFF_MAX));
        }
    }
}
