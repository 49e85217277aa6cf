//! One Redis server: one multiplexed connection shared by all concurrent
//! calls, whose script calls are coalesced into batches (see `batch`). A
//! Sentinel's master is one too (see `sentinel`).

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;

use super::connect::{Connector, NodeConnection};
use super::scripts::{add_load, Reply, Request, Unit};
use super::Call;
use crate::limiter::Outcome;
use crate::storage::StoreError;

pub struct Standalone {
    node: Arc<NodeConnection>,
}

impl Standalone {
    /// `pace`: the least time between failed connection attempts.
    pub fn new(connector: &Connector, pace: Duration) -> Result<Standalone, RedisError> {
        Ok(Standalone {
            node: NodeConnection::new(connector, pace, false)?,
        })
    }

    pub fn address(&self) -> &str {
        self.node.address()
    }

    /// Why Redis cannot be reached, if connecting failed last.
    pub fn failing(&self) -> Option<String> {
        self.node.failing()
    }

    /// Decides every operation of `call` on its own (in the node's next
    /// batch).
    pub async fn run(&self, call: &Call<'_>) -> Result<Vec<Outcome>, StoreError> {
        let units = call
            .ops
            .iter()
            .map(|op| Unit::single(op, call.time))
            .collect();
        self.decide(units).await
    }

    /// Decides all of one request's operations as one unit, so that a denied
    /// request changes no counter (see [`Request`]).
    pub async fn run_request(
        &self,
        call: &Call<'_>,
        request: Request<'_>,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.decide(vec![Unit::request(call.ops, request, call.time)])
            .await
    }

    async fn decide(&self, units: Vec<Unit>) -> Result<Vec<Outcome>, StoreError> {
        let replies = self.node.decide(units).await?;
        let mut outcomes = Vec::with_capacity(replies.len());
        for reply in replies {
            outcomes.extend(reply.map_err(|e| self.reply_error(e))?);
        }
        Ok(outcomes)
    }

    fn reply_error(&self, reply: Reply) -> StoreError {
        match reply {
            Reply::Moved { .. } | Reply::Ask { .. } | Reply::ClusterDown(_) => {
                StoreError::Redirect(format!(
                    "{} answered with a Cluster redirect; use redis+cluster://",
                    self.address()
                ))
            }
            // A master demoted by a failover: not a script failure, but
            // "cannot count here now", like a refused connection.
            Reply::Failed(e) if e.contains("READONLY") => {
                StoreError::Connection(format!("{} is a replica now: {e}", self.address()))
            }
            Reply::NoScript | Reply::Failed(_) => StoreError::Script(format!("{reply:?}")),
        }
    }

    /// `PING` and load the script: what the breaker's probe and start-up do.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.node.allow_attempt_now();
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        add_load(&mut pipe);
        let values = self.node.send(&pipe, 2).await?;
        super::check_probe_replies(self.address(), &values)
    }
}
