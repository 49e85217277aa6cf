//! Coalescing: the script calls waiting for one node go out together, as
//! one `EVALSHA` that decides them one after another (each unit still
//! atomic, each with its own answer). Redis then parses, finds and enters
//! the script once per batch instead of once per decision, which is most of
//! what a decision costs it.
//!
//! No timer: a node's queue is drained by one task that sends whatever is
//! waiting as soon as fewer than [`MAX_BATCHES_IN_FLIGHT`] batches are
//! unanswered. At low load a batch is one call, sent at once; under load,
//! the calls that arrive during a round trip form the next batch.

use std::sync::{Arc, Weak};

use futures::stream::{FuturesUnordered, StreamExt as _};
use metrics::{counter, histogram};
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::connect::NodeConnection;
use super::scripts::{add_load, add_script_call, parse_outcomes, Reply, Unit};
use super::slot::counter_slot;
use crate::limiter::Outcome;
use crate::storage::StoreError;
use crate::task::OwnedTask;
use crate::telemetry::names;

/// A unit's answer: its outcomes, or why its script call did not run.
pub type UnitReply = Result<Vec<Outcome>, Reply>;

/// Most operations one batch takes. A script blocks its node while it runs
/// (a few µs per operation), so a batch keeps other clients waiting well
/// under a millisecond.
const MAX_BATCH_OPERATIONS: usize = 128;

/// Batches sent to one node and not yet answered. Redis runs them in the
/// order sent; a second one in flight keeps the connection busy while the
/// first one's answers are handed out.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// Most calls waiting for one node's next batch. Each waits at most the
/// store timeout, but its place in the queue stays until the batch is
/// sent: while a node stalls, calls past this many are answered at once by
/// the failure mode (`sluice_store_errors_total{kind="queue_full"}`) instead
/// of piling up behind it.
pub const MAX_WAITING_CALLS: usize = 16_384;

/// Units waiting for the next batch, and where their answers go.
struct Waiting {
    units: Vec<Unit>,
    answer: oneshot::Sender<Result<Vec<UnitReply>, StoreError>>,
}

/// One node's queue and the task that drains it; the task ends when the
/// queue is dropped with its node, and is aborted then at the latest.
pub struct BatchQueue {
    queue: mpsc::Sender<Waiting>,
    _task: OwnedTask,
}

impl BatchQueue {
    /// Starts the task for `node` (held weakly: the node owns the queue).
    pub fn start(node: Weak<NodeConnection>) -> BatchQueue {
        let (queue, waiting) = mpsc::channel(MAX_WAITING_CALLS);
        BatchQueue {
            queue,
            _task: OwnedTask::spawn(drain(node, waiting)),
        }
    }

    /// Decides `units` in the node's next batch.
    pub async fn decide(&self, units: Vec<Unit>) -> Result<Vec<UnitReply>, StoreError> {
        let (answer, answered) = oneshot::channel();
        let closed = || StoreError::Connection("the node's batch queue closed".into());
        self.queue
            .try_send(Waiting { units, answer })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::QueueFull {
                    max: MAX_WAITING_CALLS,
                },
                mpsc::error::TrySendError::Closed(_) => closed(),
            })?;
        answered.await.map_err(|_| closed())?
    }
}

async fn drain(node: Weak<NodeConnection>, mut waiting: mpsc::Receiver<Waiting>) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Answers first: they free a place for the next batch.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            first = waiting.recv(), if in_flight.len() < MAX_BATCHES_IN_FLIGHT => {
                let Some(first) = first else { break };
                let mut count = operations(&first.units);
                let mut batch = vec![first];
                while count < MAX_BATCH_OPERATIONS {
                    match waiting.try_recv() {
                        Ok(next) => {
                            count += operations(&next.units);
                            batch.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let Some(node) = node.upgrade() else { return };
                histogram!(names::REDIS_BATCH_OPERATIONS, "store" => node.kind())
                    .record(count as f64);
                in_flight.push(send_batch(node, batch));
            }
        }
    }
    // The queue closed with its node: finish what was sent.
    while in_flight.next().await.is_some() {}
}

/// Sends one batch and hands each waiting call its answers.
async fn send_batch(node: Arc<NodeConnection>, batch: Vec<Waiting>) {
    let units: Vec<&Unit> = batch.iter().flat_map(|w| &w.units).collect();
    match execute(&node, &units, false).await {
        Ok(replies) => {
            let mut replies = replies.into_iter();
            for w in batch {
                let mine = replies.by_ref().take(w.units.len()).collect();
                // The caller may have given up (its deadline passed).
                let _ = w.answer.send(Ok(mine));
            }
        }
        Err(e) => {
            for w in batch {
                let _ = w.answer.send(Err(e.clone()));
            }
        }
    }
}

fn operations(units: &[Unit]) -> usize {
    units.iter().map(|u| u.ops.len()).sum()
}

/// Sends `units` to `node` now, in one pipeline: one script call per slot on
/// a Cluster node (a script's keys must share a slot), one in all on a
/// standalone Redis; each call after `ASKING` if `asking`. A call that finds
/// the script missing (restart, failover, `SCRIPT FLUSH`) did not run: the
/// script is loaded and those calls sent again, once, in one round trip.
pub async fn execute(
    node: &Arc<NodeConnection>,
    units: &[&Unit],
    asking: bool,
) -> Result<Vec<UnitReply>, StoreError> {
    let groups = group_by_slot(units, node.sharded());
    let mut replies: Vec<Option<UnitReply>> = vec![None; units.len()];
    let missing = send_groups(node, units, &groups, asking, false, &mut replies).await?;
    if !missing.is_empty() {
        counter!(names::REDIS_RETRIES, "reason" => "noscript").increment(1);
        let again: Vec<Vec<usize>> = missing.into_iter().map(|g| groups[g].clone()).collect();
        let still = send_groups(node, units, &again, asking, true, &mut replies).await?;
        for g in still {
            for &i in &again[g] {
                replies[i] = Some(Err(Reply::Failed(
                    "NOSCRIPT right after SCRIPT LOAD".into(),
                )));
            }
        }
    }
    replies
        .into_iter()
        .map(|r| r.ok_or_else(|| StoreError::Script("a unit got no answer".into())))
        .collect()
}

/// One pipeline: `SCRIPT LOAD` first if `load`, then a script call per group.
/// Fills `replies`; returns the groups that found no script.
async fn send_groups(
    node: &Arc<NodeConnection>,
    units: &[&Unit],
    groups: &[Vec<usize>],
    asking: bool,
    load: bool,
    replies: &mut [Option<UnitReply>],
) -> Result<Vec<usize>, StoreError> {
    let mut pipe = redis::pipe();
    if load {
        add_load(&mut pipe);
    }
    let (mut key, mut unit) = (String::with_capacity(64), Vec::with_capacity(64));
    for group in groups {
        if asking {
            pipe.cmd("ASKING");
        }
        add_script_call(
            &mut pipe,
            group.iter().map(|&i| units[i]),
            &mut key,
            &mut unit,
        );
    }
    let per_call = 1 + usize::from(asking);
    let skip = usize::from(load) + usize::from(asking);
    let values = node
        .send(&pipe, usize::from(load) + groups.len() * per_call)
        .await?;
    let calls: Vec<&Value> = values.iter().skip(skip).step_by(per_call).collect();
    if calls.len() != groups.len() {
        return Err(StoreError::Script(
            "Redis answered fewer commands than were sent".into(),
        ));
    }
    let mut missing = Vec::new();
    for (g, (group, value)) in groups.iter().zip(calls).enumerate() {
        let count: usize = group.iter().map(|&i| units[i].ops.len()).sum();
        match parse_outcomes(value, count) {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for &i in group {
                    replies[i] = Some(Ok(outcomes.by_ref().take(units[i].ops.len()).collect()));
                }
            }
            Err(Reply::NoScript) => missing.push(g),
            Err(other) => {
                for &i in group {
                    replies[i] = Some(Err(other.clone()));
                }
            }
        }
    }
    Ok(missing)
}

/// Unit indexes by slot, in first-seen order (a unit's keys share one slot
/// on a Cluster); everything in one group on a standalone Redis.
fn group_by_slot(units: &[&Unit], sharded: bool) -> Vec<Vec<usize>> {
    if !sharded {
        return vec![(0..units.len()).collect()];
    }
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, unit) in units.iter().enumerate() {
        let slot = unit.ops.first().map_or(0, |(op, _)| counter_slot(&op.key));
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, members)) => members.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}
