//! Redis Cluster: slots mapped to masters from `CLUSTER SLOTS`, one
//! multiplexed connection per master, and one pipeline per master for a
//! call's operations.
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
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::future::join_all;
use metrics::{counter, histogram};
use redis::aio::MultiplexedConnection;
use redis::{Pipeline, RedisError, Value};

use super::connect::{Connector, NodeConnection};
use super::scripts::{parse_reply, Reply, Scripts};
use super::slot::{counter_slot, SLOTS};
use super::{redis_error, Call};
use crate::limiter::Outcome;
use crate::storage::StoreError;
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
    /// Held by calls that find no topology yet (start-up), so one of them
    /// asks and the others wait for its answer.
    first_refresh: tokio::sync::Mutex<()>,
    last_refresh: Mutex<Option<Instant>>,
    refresh_timeout: Duration,
    timeout: Duration,
    /// The least time between failed connection attempts to one node.
    pace: Duration,
}

#[derive(Default)]
struct Topology {
    /// For every slot, its master's index in `masters`; empty until known.
    slots: Vec<u16>,
    masters: Vec<Arc<NodeConnection>>,
}

/// What a retry must resend to the node at an address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// `NOSCRIPT`: load the scripts first.
    Reload,
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
            first_refresh: tokio::sync::Mutex::new(()),
            last_refresh: Mutex::new(None),
            refresh_timeout: store_timeout.max(Duration::from_millis(500)),
            timeout: store_timeout,
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
        let node = NodeConnection::new(&seed.for_node(host, port), self.pace)
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        nodes.insert(address.to_owned(), node.clone());
        Ok(node)
    }

    /// One pipeline on one node's connection.
    async fn send(
        &self,
        node: &NodeConnection,
        conn: &Arc<MultiplexedConnection>,
        pipe: &Pipeline,
        count: usize,
    ) -> Result<Vec<Value>, StoreError> {
        let started = Instant::now();
        let result = (**conn).clone().send_packed_commands(pipe, 0, count).await;
        histogram!(names::REDIS_DURATION, "store" => "redis-cluster")
            .record(started.elapsed().as_secs_f64());
        result.map_err(|e| {
            node.failed(conn, &e);
            redis_error(&e, self.timeout)
        })
    }

    /// Connects (if needed) and sends.
    async fn get_and_send(
        &self,
        node: &Arc<NodeConnection>,
        pipe: &Pipeline,
        count: usize,
    ) -> Result<Vec<Value>, StoreError> {
        let conn = node.get().await?;
        self.send(node, &conn, pipe, count).await
    }

    /// Asks for a topology refresh in the background (at most one at a time,
    /// and not more often than [`MIN_REFRESH_INTERVAL`]).
    pub fn request_refresh(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let since = this
                .last_refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|t| t.elapsed());
            if let Some(since) = since {
                tokio::time::sleep(MIN_REFRESH_INTERVAL.saturating_sub(since)).await;
            }
            if let Err(e) = this.refresh().await {
                tracing::debug!(error = %e, "cluster topology refresh failed");
            }
            this.refreshing.store(false, Ordering::Release);
        });
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
            let slots = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
            let ask = async {
                let conn = node.get().await?;
                let reply = (*conn).clone().send_packed_command(&slots).await;
                reply.map_err(|e| {
                    node.failed(&conn, &e);
                    redis_error(&e, self.refresh_timeout)
                })
            };
            let value = match tokio::time::timeout(self.refresh_timeout, ask).await {
                Ok(Ok(value)) => value,
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

    /// Runs `call`: one pipeline per master involved, sent concurrently.
    pub async fn run(
        self: &Arc<Self>,
        scripts: &Scripts,
        call: &Call<'_>,
    ) -> Result<Vec<Outcome>, StoreError> {
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

        let mut key = String::with_capacity(64);
        let pipes: Vec<Pipeline> = groups
            .iter()
            .map(|(_, ops)| {
                let mut pipe = redis::pipe();
                for &i in ops {
                    scripts.add_call(&mut pipe, call.ops[i], call.now_us, &mut key);
                }
                pipe
            })
            .collect();
        // Every connection first: a call that fails on an unreachable
        // master fails before anything runs anywhere, so it consumes no
        // budget on the other masters.
        let conns = join_all(
            groups
                .iter()
                .map(|(node, _)| topology.masters[usize::from(*node)].get()),
        )
        .await;
        let conns = conns
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|_| self.request_refresh())?;
        let replies = join_all(groups.iter().zip(&pipes).zip(&conns).map(
            |(((node, ops), pipe), conn)| {
                self.send(&topology.masters[usize::from(*node)], conn, pipe, ops.len())
            },
        ))
        .await;

        let mut outcomes = vec![None; call.ops.len()];
        let mut resend: Vec<(String, usize, Resend)> = Vec::new();
        for ((node, ops), reply) in groups.iter().zip(replies) {
            let values = reply.inspect_err(|_| self.request_refresh())?;
            let address = topology.masters[usize::from(*node)].address();
            for (&i, value) in ops.iter().zip(&values) {
                match parse_reply(value) {
                    Reply::Outcome(o) => outcomes[i] = Some(o),
                    Reply::NoScript => resend.push((address.to_owned(), i, Resend::Reload)),
                    Reply::Moved { address } => {
                        self.request_refresh();
                        resend.push((address, i, Resend::Moved));
                    }
                    Reply::Ask { address } => resend.push((address, i, Resend::Ask)),
                    Reply::ClusterDown(e) => {
                        self.request_refresh();
                        return Err(StoreError::Redirect(e));
                    }
                    Reply::Failed(e) => return Err(StoreError::Script(e)),
                }
            }
        }
        if !resend.is_empty() {
            self.resend(scripts, call, &resend, &mut outcomes).await?;
        }
        super::complete(outcomes)
    }

    /// The one retry: commands that did not run, to the node that should
    /// run them, one pipeline per node.
    async fn resend(
        &self,
        scripts: &Scripts,
        call: &Call<'_>,
        resend: &[(String, usize, Resend)],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), StoreError> {
        let mut by_address: Vec<(&str, Vec<(usize, Resend)>)> = Vec::new();
        for (address, i, why) in resend {
            let reason = match why {
                Resend::Reload => "noscript",
                Resend::Moved => "moved",
                Resend::Ask => "ask",
            };
            counter!(names::REDIS_RETRIES, "reason" => reason).increment(1);
            match by_address.iter_mut().find(|(a, _)| a == address) {
                Some((_, ops)) => ops.push((*i, *why)),
                None => by_address.push((address, vec![(*i, *why)])),
            }
        }
        let mut key = String::with_capacity(64);
        let mut sends = Vec::with_capacity(by_address.len());
        for (address, ops) in &by_address {
            let node = self.node(address)?;
            let mut pipe = redis::pipe();
            // Which reply answers which operation.
            let mut positions = Vec::with_capacity(ops.len());
            let mut count = 0;
            // A failover's new master may not have the scripts either.
            if ops.iter().any(|(_, why)| *why != Resend::Ask) {
                scripts.add_loads(&mut pipe);
                count += scripts.all().len();
            }
            for &(i, why) in ops {
                if why == Resend::Ask {
                    pipe.cmd("ASKING");
                    count += 1;
                }
                scripts.add_call(&mut pipe, call.ops[i], call.now_us, &mut key);
                positions.push((i, count));
                count += 1;
            }
            sends.push((node, pipe, count, positions));
        }
        let replies = join_all(
            sends
                .iter()
                .map(|(node, pipe, count, _)| self.get_and_send(node, pipe, *count)),
        )
        .await;
        for ((_, _, _, positions), reply) in sends.iter().zip(replies) {
            let values = reply?;
            for &(i, at) in positions {
                match values.get(at).map(parse_reply) {
                    Some(Reply::Outcome(o)) => outcomes[i] = Some(o),
                    Some(Reply::Failed(e)) => return Err(StoreError::Script(e)),
                    other => {
                        return Err(StoreError::Redirect(format!("after one retry: {other:?}")))
                    }
                }
            }
        }
        Ok(())
    }

    /// Refreshes the topology, then `PING`s every master and loads the
    /// scripts there: the cluster answers only if every slot's master does.
    pub async fn probe(&self, scripts: &Scripts) -> Result<(), StoreError> {
        self.refresh_from(true).await?;
        let topology = self.topology.load_full();
        if let Some(slot) = topology.slots.iter().position(|&n| n == NO_NODE) {
            return Err(StoreError::Redirect(format!(
                "no master serves slot {slot}"
            )));
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        scripts.add_loads(&mut pipe);
        let count = 1 + scripts.all().len();
        let replies = join_all(topology.masters.iter().map(|m| {
            m.allow_attempt_now();
            self.get_and_send(m, &pipe, count)
        }))
        .await;
        for (master, reply) in topology.masters.iter().zip(replies) {
            super::check_probe_replies(master.address(), &reply?)?;
        }
        Ok(())
    }
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
                    },
                    hits: 1,
                }
            })
            .collect();
        let refs: Vec<&CounterOp> = ops.iter().collect();
        let call = Call {
            ops: &refs,
            now_us: None,
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
