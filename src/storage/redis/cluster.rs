//! Redis Cluster: slots mapped to masters from `CLUSTER SLOTS`, one
//! multiplexed connection and one batch queue per master; a batch is one
//! pipeline with a script call per slot.
//!
//! Why not the redis crate's cluster client: it sends a pipeline to one slot
//! only, and when any reply in a pipeline asks for a redirect it resends the
//! *whole* pipeline, so the commands that had already run would count twice;
//! its slot refresh also retries in a tight loop while no node answers. Here
//! a retry only ever resends commands that did not run (`MOVED`, `ASK`,
//! `NOSCRIPT`), at most once, and the topology is refreshed in the
//! background, at most every [`MIN_REFRESH_INTERVAL`].
//!
//! A master that cannot be reached fails the calls for its slots at once
//! (they are answered by the failure mode) while the other masters keep
//! deciding; its connection is retried once per breaker cool-down (see
//! [`NodeConnection`]), and the failures ask for a topology refresh, which
//! finds the promoted replica. (Once Redis marks the master failed, every
//! node answers `CLUSTERDOWN` until the promotion if the cluster requires
//! full coverage, Redis' default; those calls fail too, as `Redirect`.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::join_all;
use metrics::counter;
use redis::{RedisError, Value};
use tokio::time::Instant;

use super::batch::{self, UnitReply};
use super::connect::{Connector, NodeConnection};
use super::scripts::{add_load, Reply, Unit};
use super::slot::{counter_slot, SLOTS};
use super::Call;
use crate::limiter::Outcome;
use crate::storage::StoreError;
use crate::task::OwnedTask;
use crate::telemetry::names;

/// Failing calls ask for a refresh; this bounds how often one happens.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

const NO_NODE: u16 = u16::MAX;

pub struct Cluster {
    seeds: Vec<Connector>,
    topology: ArcSwap<Topology>,
    /// Nodes by `host:port`, kept across refreshes.
    nodes: Mutex<HashMap<String, Arc<NodeConnection>>>,
    refreshing: AtomicBool,
    /// The last refresh asked for in the background; it holds the cluster
    /// weakly while it waits, and ends when the cluster is dropped.
    refresh_task: Mutex<Option<OwnedTask>>,
    /// Held by calls that find no topology yet (start-up), so one of them
    /// asks and the others wait for its answer.
    first_refresh: tokio::sync::Mutex<()>,
    last_refresh: Mutex<Option<Instant>>,
    refresh_timeout: Duration,
    /// The least time between failed connection attempts to one node.
    pace: Duration,
}

#[derive(Default)]
struct Topology {
    /// For every slot, its master's index in `masters`; empty until known.
    slots: Vec<u16>,
    masters: Vec<Arc<NodeConnection>>,
}

/// Why an operation goes to another node. (`NOSCRIPT` is retried by the
/// batch itself, on the same node.)
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// `MOVED`: the slot's master changed.
    Moved,
    /// `ASK`: the slot is migrating; `ASKING` first.
    Ask,
}

impl Cluster {
    pub fn new(seeds: Vec<Connector>, store_timeout: Duration, pace: Duration) -> Cluster {
        Cluster {
            seeds,
            topology: ArcSwap::from_pointee(Topology::default()),
            nodes: Mutex::default(),
            refreshing: AtomicBool::new(false),
            refresh_task: Mutex::default(),
            first_refresh: tokio::sync::Mutex::new(()),
            last_refresh: Mutex::new(None),
            refresh_timeout: store_timeout.max(Duration::from_millis(500)),
            pace,
        }
    }

    pub fn seeds(&self) -> impl Iterator<Item = String> + '_ {
        self.seeds.iter().map(Connector::address)
    }

    /// Masters that cannot be reached, and why, for health reports.
    pub fn failing_masters(&self) -> Vec<String> {
        self.topology
            .load()
            .masters
            .iter()
            .filter_map(|n| n.failing().map(|why| format!("{} ({why})", n.address())))
            .collect()
    }

    fn node(&self, address: &str) -> Result<Arc<NodeConnection>, StoreError> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = nodes.get(address) {
            return Ok(node.clone());
        }
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| StoreError::Redirect(format!("bad node address '{address}'")))?;
        let seed = self
            .seeds
            .first()
            .ok_or_else(|| StoreError::Connection("no seed nodes".into()))?;
        let node = NodeConnection::new(&seed.for_node(host, port), self.pace, true)
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        nodes.insert(address.to_owned(), node.clone());
        Ok(node)
    }

    /// Asks for a topology refresh in the background (at most one at a time,
    /// and not more often than [`MIN_REFRESH_INTERVAL`]).
    pub fn request_refresh(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let cluster = Arc::downgrade(self);
        let since = self
            .last_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed());
        // Replaced under the lock, so no later task is ever replaced by this
        // one; the one it replaces is done (`refreshing` was false).
        let mut task = self.refresh_task.lock().unwrap_or_else(|p| p.into_inner());
        *task = Some(OwnedTask::spawn(async move {
            if let Some(since) = since {
                tokio::time::sleep(MIN_REFRESH_INTERVAL.saturating_sub(since)).await;
            }
            let Some(this) = cluster.upgrade() else {
                return;
            };
            if let Err(e) = this.refresh().await {
                tracing::debug!(error = %e, "cluster topology refresh failed");
            }
            this.refreshing.store(false, Ordering::Release);
        }));
    }

    /// Reads `CLUSTER SLOTS` from the first node that answers: the known
    /// masters, then the seeds.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        self.refresh_from(false).await
    }

    /// `probing`: ask nodes even if connecting to them failed a moment ago.
    async fn refresh_from(&self, probing: bool) -> Result<(), StoreError> {
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let mut candidates: Vec<String> = self
            .topology
            .load()
            .masters
            .iter()
            .map(|m| m.address().to_owned())
            .collect();
        for seed in self.seeds() {
            if !candidates.contains(&seed) {
                candidates.push(seed);
            }
        }
        let mut last_error = StoreError::Connection("no nodes to ask".into());
        for address in candidates {
            let node = self.node(&address)?;
            if probing {
                node.allow_attempt_now();
            }
            let mut slots = redis::pipe();
            slots.cmd("CLUSTER").arg("SLOTS");
            let ask = node.send(&slots, 1);
            let value = match tokio::time::timeout(self.refresh_timeout, ask).await {
                Ok(Ok(mut values)) if values.len() == 1 => values.remove(0),
                Ok(Ok(_)) => {
                    last_error = StoreError::Redirect(format!("{address}: no CLUSTER SLOTS reply"));
                    continue;
                }
                Ok(Err(e)) => {
                    last_error = e;
                    continue;
                }
                Err(_) => {
                    last_error = StoreError::Timeout(self.refresh_timeout);
                    continue;
                }
            };
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(h, _)| h);
            match parse_slots(&value, host) {
                Ok(ranges) => {
                    self.install(&ranges)?;
                    return Ok(());
                }
                Err(e) => {
                    last_error = StoreError::Redirect(format!("CLUSTER SLOTS from {address}: {e}"))
                }
            }
        }
        Err(last_error)
    }

    fn install(&self, ranges: &[(u16, u16, String)]) -> Result<(), StoreError> {
        let mut topology = Topology {
            slots: vec![NO_NODE; SLOTS],
            masters: Vec::new(),
        };
        for (start, end, address) in ranges {
            let index = match topology.masters.iter().position(|m| m.address() == address) {
                Some(i) => i,
                None => {
                    topology.masters.push(self.node(address)?);
                    topology.masters.len() - 1
                }
            };
            for slot in *start..=(*end).min(SLOTS as u16 - 1) {
                topology.slots[usize::from(slot)] = index as u16;
            }
        }
        let old = self.topology.swap(Arc::new(topology));
        let new = self.topology.load();
        let names = |t: &Topology| {
            let mut v: Vec<_> = t.masters.iter().map(|m| m.address().to_owned()).collect();
            v.sort();
            v
        };
        if names(&old) != names(&new) {
            tracing::info!(masters = ?names(&new), "cluster topology changed");
        }
        Ok(())
    }

    /// Runs `call`: each operation a unit in its master's next batch, the
    /// masters concurrently.
    pub async fn run(self: &Arc<Self>, call: &Call<'_>) -> Result<Vec<Outcome>, StoreError> {
        let mut topology = self.topology.load_full();
        if topology.slots.is_empty() {
            // Nothing known yet (start-up): ask now rather than fail the call.
            let _first = self.first_refresh.lock().await;
            topology = self.topology.load_full();
            if topology.slots.is_empty() {
                self.refresh().await?;
                topology = self.topology.load_full();
            }
        }
        let groups = match group_by_node(call, &topology.slots) {
            Ok(groups) => groups,
            Err(slot) => {
                self.request_refresh();
                return Err(StoreError::Redirect(format!(
                    "no master serves slot {slot}"
                )));
            }
        };
        // Every connection first: a call that fails on an unreachable
        // master fails before anything runs anywhere, so it consumes no
        // budget on the other masters.
        let conns = join_all(
            groups
                .iter()
                .map(|(node, _)| topology.masters[usize::from(*node)].get()),
        )
        .await;
        if let Some(Err(e)) = conns.into_iter().find(Result::is_err) {
            self.request_refresh();
            return Err(e);
        }
        let replies = join_all(groups.iter().map(|(node, ops)| {
            let units = ops
                .iter()
                .map(|&i| Unit::single(call.ops[i], call.time))
                .collect();
            topology.masters[usize::from(*node)].decide(units)
        }))
        .await;

        let mut outcomes = vec![None; call.ops.len()];
        let mut resend: Vec<(String, usize, Resend)> = Vec::new();
        for ((_, ops), reply) in groups.iter().zip(replies) {
            let replies = reply.inspect_err(|_| self.request_refresh())?;
            for (&i, reply) in ops.iter().zip(replies) {
                match self.read(reply)? {
                    Read::Outcome(o) => outcomes[i] = Some(o),
                    Read::Resend(to, why) => resend.push((to, i, why)),
                }
            }
        }
        if !resend.is_empty() {
            self.resend(call, &resend, &mut outcomes).await?;
        }
        super::complete(outcomes)
    }

    /// One operation's reply: its outcome, where to send it again, or the
    /// error that fails the call.
    fn read(self: &Arc<Self>, reply: UnitReply) -> Result<Read, StoreError> {
        match reply {
            Ok(outcomes) => match <[Outcome; 1]>::try_from(outcomes) {
                Ok([o]) => Ok(Read::Outcome(o)),
                Err(v) => Err(StoreError::Script(format!(
                    "{} outcomes for one operation",
                    v.len()
                ))),
            },
            Err(Reply::Moved { address }) => {
                self.request_refresh();
                Ok(Read::Resend(address, Resend::Moved))
            }
            Err(Reply::Ask { address }) => Ok(Read::Resend(address, Resend::Ask)),
            Err(Reply::ClusterDown(e)) => {
                self.request_refresh();
                Err(StoreError::Redirect(e))
            }
            Err(e @ (Reply::NoScript | Reply::Failed(_))) => {
                Err(StoreError::Script(format!("{e:?}")))
            }
        }
    }

    /// The one retry: operations that did not run, to the node that should
    /// run them: in its batch after `MOVED`, at once after `ASKING` for `ASK`.
    async fn resend(
        self: &Arc<Self>,
        call: &Call<'_>,
        resend: &[(String, usize, Resend)],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), StoreError> {
        let mut by_target: Vec<(&str, Resend, Vec<usize>)> = Vec::new();
        for (address, i, why) in resend {
            let reason = match why {
                Resend::Moved => "moved",
                Resend::Ask => "ask",
            };
            counter!(names::REDIS_RETRIES, "reason" => reason).increment(1);
            match by_target
                .iter_mut()
                .find(|(a, w, _)| a == address && w == why)
            {
                Some((_, _, ops)) => ops.push(*i),
                None => by_target.push((address, *why, vec![*i])),
            }
        }
        let sends = by_target.iter().map(|(address, why, ops)| async move {
            let node = self.node(address)?;
            let units: Vec<Unit> = ops
                .iter()
                .map(|&i| Unit::single(call.ops[i], call.time))
                .collect();
            match why {
                Resend::Moved => node.decide(units).await,
                Resend::Ask => batch::execute(&node, &units.iter().collect::<Vec<_>>(), true).await,
            }
        });
        let replies = join_all(sends).await;
        for ((_, _, ops), reply) in by_target.iter().zip(replies) {
            for (&i, reply) in ops.iter().zip(reply?) {
                match self.read(reply)? {
                    Read::Outcome(o) => outcomes[i] = Some(o),
                    Read::Resend(..) => {
                        return Err(StoreError::Redirect(format!(
                            "redirected again after one retry (operation {i})"
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Refreshes the topology, then `PING`s every master and loads the
    /// script there: the cluster answers only if every slot's master does.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.refresh_from(true).await?;
        let topology = self.topology.load_full();
        if let Some(slot) = topology.slots.iter().position(|&n| n == NO_NODE) {
            return Err(StoreError::Redirect(format!(
                "no master serves slot {slot}"
            )));
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        add_load(&mut pipe);
        let replies = join_all(topology.masters.iter().map(|m| {
            m.allow_attempt_now();
            m.send(&pipe, 2)
        }))
        .await;
        for (master, reply) in topology.masters.iter().zip(replies) {
            super::check_probe_replies(master.address(), &reply?)?;
        }
        Ok(())
    }
}

/// What one operation's reply asks for.
enum Read {
    Outcome(Outcome),
    Resend(String, Resend),
}

/// Groups a call's operations by master: `(master index, operation indexes)`
/// in first-seen order; `Err(slot)` for a slot no master serves.
fn group_by_node(call: &Call<'_>, slots: &[u16]) -> Result<Vec<(u16, Vec<usize>)>, u16> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, op) in call.ops.iter().enumerate() {
        let slot = counter_slot(&op.key);
        let node = slots[usize::from(slot)];
        if node == NO_NODE {
            return Err(slot);
        }
        match groups.iter_mut().find(|(n, _)| *n == node) {
            Some((_, ops)) => ops.push(i),
            None => groups.push((node, vec![i])),
        }
    }
    Ok(groups)
}

/// `CLUSTER SLOTS` -> `(first slot, last slot, master host:port)`. An empty
/// host means "the node you asked".
fn parse_slots(value: &Value, asked_host: &str) -> Result<Vec<(u16, u16, String)>, RedisError> {
    let bad = |what: &str| {
        RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected CLUSTER SLOTS reply",
            what.to_owned(),
        ))
    };
    let Value::Array(ranges) = value else {
        return Err(bad("not an array"));
    };
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err(bad("range is not an array"));
        };
        let (Some(start), Some(end), Some(Value::Array(master))) = (
            fields.first().and_then(int),
            fields.get(1).and_then(int),
            fields.get(2),
        ) else {
            return Err(bad("range without start, end and master"));
        };
        let (Some(host), Some(port)) = (master.first().and_then(text), master.get(1).and_then(int))
        else {
            return Err(bad("master without host and port"));
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.to_owned()
        } else {
            host
        };
        out.push((start, end, format!("{host}:{port}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Algorithm, CounterOp, CounterSpec, Entry, KeyHasher};
    use crate::storage::redis::scripts::Time;

    #[test]
    fn parses_cluster_slots() {
        let reply = redis::parse_redis_value(
            b"*2\r\n*3\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n\
              *4\r\n:5461\r\n:16383\r\n*3\r\n$0\r\n\r\n:7001\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7004\r\n$2\r\nid\r\n",
        )
        .unwrap();
        assert_eq!(
            parse_slots(&reply, "10.0.0.1").unwrap(),
            vec![
                (0, 5460, "127.0.0.1:7000".to_owned()),
                (5461, 16383, "10.0.0.1:7001".to_owned())
            ]
        );
        assert!(parse_slots(&Value::Nil, "h").is_err());
    }

    #[test]
    fn groups_one_pipeline_per_master() {
        let h = KeyHasher::from_secret(b"g");
        let ops: Vec<CounterOp> = (0..40)
            .map(|i| {
                let v = i.to_string();
                CounterOp {
                    key: h.counter_key(
                        "d",
                        &[Entry {
                            key: "k",
                            value: &v,
                        }],
                        &[],
                        Algorithm::Gcra,
                        1,
                    ),
                    spec: CounterSpec {
                        algorithm: Algorithm::Gcra,
                        limit: 1,
                        period_us: 1,
                        burst: 1,
                        calendar: None,
                    },
                    hits: 1,
                }
            })
            .collect();
        let refs: Vec<&CounterOp> = ops.iter().collect();
        let call = Call {
            ops: &refs,
            time: Time {
                now_us: None,
                local_us: 0,
            },
        };
        // Three masters owning thirds of the slots.
        let slots: Vec<u16> = (0..SLOTS).map(|s| (s * 3 / SLOTS) as u16).collect();
        let groups = group_by_node(&call, &slots).unwrap();
        assert_eq!(groups.len(), 3);
        assert_eq!(groups.iter().map(|(_, ops)| ops.len()).sum::<usize>(), 40);
        for (node, members) in &groups {
            for &i in members {
                assert_eq!(slots[usize::from(counter_slot(&ops[i].key))], *node);
            }
        }
        let mut holes = slots.clone();
        holes[usize::from(counter_slot(&ops[7].key))] = NO_NODE;
        assert!(group_by_node(&call, &holes).is_err());
    }
}
