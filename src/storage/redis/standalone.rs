//! One Redis server: every call is one pipeline on one multiplexed
//! connection, shared by all concurrent calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use redis::{Pipeline, RedisError, Value};

use super::connect::{Connector, NodeConnection};
use super::scripts::{parse_reply, parse_request_reply, Reply, Request, Scripts};
use super::{redis_error, Call};
use crate::limiter::Outcome;
use crate::storage::StoreError;
use crate::telemetry::names;

pub struct Standalone {
    node: Arc<NodeConnection>,
    timeout: Duration,
}

impl Standalone {
    /// `pace`: the least time between failed connection attempts.
    pub fn new(
        connector: &Connector,
        timeout: Duration,
        pace: Duration,
    ) -> Result<Standalone, RedisError> {
        Ok(Standalone {
            node: NodeConnection::new(connector, pace)?,
            timeout,
        })
    }

    pub fn address(&self) -> &str {
        self.node.address()
    }

    /// Why Redis cannot be reached, if connecting failed last.
    pub fn failing(&self) -> Option<String> {
        self.node.failing()
    }

    async fn send(&self, pipe: &Pipeline, count: usize) -> Result<Vec<Value>, StoreError> {
        let conn = self.node.get().await?;
        let started = Instant::now();
        let result = (*conn).clone().send_packed_commands(pipe, 0, count).await;
        histogram!(names::REDIS_DURATION, "store" => "redis")
            .record(started.elapsed().as_secs_f64());
        result.map_err(|e| {
            self.node.failed(&conn, &e);
            redis_error(&e, self.timeout)
        })
    }

    /// Runs every operation of `call` in one pipeline; reloads the scripts
    /// and runs again only what found them missing.
    pub async fn run(
        &self,
        scripts: &Scripts,
        call: &Call<'_>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut key = String::with_capacity(64);
        let mut pipe = redis::pipe();
        for op in call.ops {
            scripts.add_call(&mut pipe, op, call.now_us, &mut key);
        }
        let values = self.send(&pipe, call.ops.len()).await?;
        let mut outcomes = vec![None; call.ops.len()];
        let mut missing = Vec::new();
        for (i, value) in values.iter().enumerate().take(call.ops.len()) {
            match parse_reply(value) {
                Reply::Outcome(o) => outcomes[i] = Some(o),
                Reply::NoScript => missing.push(i),
                Reply::Moved { .. } | Reply::Ask { .. } | Reply::ClusterDown(_) => {
                    return Err(self.redirected())
                }
                Reply::Failed(e) => return Err(StoreError::Script(e)),
            }
        }
        if missing.is_empty() {
            return super::complete(outcomes);
        }

        // Restarted or flushed: load the scripts and rerun in one round trip.
        counter!(names::REDIS_RETRIES, "reason" => "noscript").increment(1);
        let mut pipe = redis::pipe();
        scripts.add_loads(&mut pipe);
        let loads = scripts.all().len();
        for &i in &missing {
            scripts.add_call(&mut pipe, call.ops[i], call.now_us, &mut key);
        }
        let values = self.send(&pipe, loads + missing.len()).await?;
        for (&i, value) in missing.iter().zip(&values[loads..]) {
            match parse_reply(value) {
                Reply::Outcome(o) => outcomes[i] = Some(o),
                other => return Err(StoreError::Script(format!("after SCRIPT LOAD: {other:?}"))),
            }
        }
        super::complete(outcomes)
    }

    /// Runs all of one request's operations in one `EVALSHA` of the
    /// request script, so that a denied request changes no counter (see
    /// [`Scripts::add_request_call`]); loads the scripts and runs it again if
    /// Redis lacks them.
    pub async fn run_request(
        &self,
        scripts: &Scripts,
        call: &Call<'_>,
        request: Request<'_>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut key = String::with_capacity(64);
        let mut pipe = redis::pipe();
        scripts.add_request_call(&mut pipe, call.ops, request, call.now_us, &mut key);
        let values = self.send(&pipe, 1).await?;
        let reply = match values
            .first()
            .map(|v| parse_request_reply(v, call.ops.len()))
        {
            Some(Ok(outcomes)) => return Ok(outcomes),
            Some(Err(reply)) => reply,
            None => return Err(no_reply()),
        };
        match reply {
            Reply::NoScript => {}
            Reply::Moved { .. } | Reply::Ask { .. } | Reply::ClusterDown(_) => {
                return Err(self.redirected())
            }
            other => return Err(StoreError::Script(format!("{other:?}"))),
        }

        counter!(names::REDIS_RETRIES, "reason" => "noscript").increment(1);
        let mut pipe = redis::pipe();
        scripts.add_loads(&mut pipe);
        let loads = scripts.all().len();
        scripts.add_request_call(&mut pipe, call.ops, request, call.now_us, &mut key);
        let values = self.send(&pipe, loads + 1).await?;
        match values
            .get(loads)
            .map(|v| parse_request_reply(v, call.ops.len()))
        {
            Some(Ok(outcomes)) => Ok(outcomes),
            Some(Err(other)) => Err(StoreError::Script(format!("after SCRIPT LOAD: {other:?}"))),
            None => Err(no_reply()),
        }
    }

    fn redirected(&self) -> StoreError {
        StoreError::Redirect(format!(
            "{} answered with a Cluster redirect; use redis+cluster://",
            self.address()
        ))
    }

    /// `PING` and load the scripts: what the breaker's probe and start-up do.
    pub async fn probe(&self, scripts: &Scripts) -> Result<(), StoreError> {
        self.node.allow_attempt_now();
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        scripts.add_loads(&mut pipe);
        let values = self.send(&pipe, 1 + scripts.all().len()).await?;
        super::check_probe_replies(self.address(), &values)
    }
}

fn no_reply() -> StoreError {
    StoreError::Script("Redis did not answer the request script".into())
}
