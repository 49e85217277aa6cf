//! The counter scripts, loaded once (`SCRIPT LOAD`) and called by hash
//! (`EVALSHA`): one per algorithm for one counter, and one for all of a
//! request's counters on one server; how to call them and read their answers.

use redis::{Pipeline, Value};

use crate::limiter::{Algorithm, CounterOp, Outcome};

/// Every counter key starts with this; the rest is `{hash}:algorithm:period`.
pub const KEY_PREFIX: &str = "sluice:";

/// One Lua script and its SHA1, as `EVALSHA` names it.
pub struct CounterScript {
    pub source: &'static str,
    pub sha: String,
}

impl CounterScript {
    fn new(source: &'static str) -> CounterScript {
        CounterScript {
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    }
}

/// The scripts, built once per store.
pub struct Scripts {
    sliding: CounterScript,
    fixed: CounterScript,
    gcra: CounterScript,
    request: CounterScript,
}

/// The script for one counter with `$algorithm`, defined in `$file`.
macro_rules! counter_script {
    ($file:literal, $algorithm:literal) => {
        concat!(
            include_str!("../scripts/prelude.lua"),
            include_str!(concat!("../scripts/", $file)),
            "local decide = ",
            $algorithm,
            "\n",
            include_str!("../scripts/counter.lua")
        )
    };
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            sliding: CounterScript::new(counter_script!("sliding_window.lua", "sliding_window")),
            fixed: CounterScript::new(counter_script!("fixed_window.lua", "fixed_window")),
            gcra: CounterScript::new(counter_script!("gcra.lua", "gcra")),
            request: CounterScript::new(concat!(
                include_str!("../scripts/prelude.lua"),
                include_str!("../scripts/sliding_window.lua"),
                include_str!("../scripts/fixed_window.lua"),
                include_str!("../scripts/gcra.lua"),
                include_str!("../scripts/request.lua")
            )),
        }
    }

    pub fn for_algorithm(&self, algorithm: Algorithm) -> &CounterScript {
        match algorithm {
            Algorithm::SlidingWindow => &self.sliding,
            Algorithm::FixedWindow => &self.fixed,
            Algorithm::Gcra => &self.gcra,
        }
    }

    pub fn all(&self) -> [&CounterScript; 4] {
        [&self.sliding, &self.fixed, &self.gcra, &self.request]
    }

    /// Appends `SCRIPT LOAD` for every script, e.g. to a probe.
    pub fn add_loads(&self, pipe: &mut Pipeline) {
        for script in self.all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script.source);
        }
    }

    /// Appends one `EVALSHA` for `op`. `now_us` is `None` in production
    /// (the script reads Redis' `TIME`); `key` is a reused buffer.
    pub fn add_call(
        &self,
        pipe: &mut Pipeline,
        op: &CounterOp,
        now_us: Option<u64>,
        key: &mut String,
    ) {
        key.clear();
        op.key.write_redis_key(KEY_PREFIX, key);
        let call = pipe
            .cmd("EVALSHA")
            .arg(&self.for_algorithm(op.spec.algorithm).sha)
            .arg(1)
            .arg(key.as_str())
            .arg(op.spec.limit)
            .arg(op.spec.period_us)
            .arg(op.spec.burst)
            .arg(op.hits);
        match now_us {
            Some(now_us) => call.arg(now_us),
            None => call.arg(""),
        };
    }

    /// Appends one `EVALSHA` of the request script for all of `ops`: a
    /// denied operation marked in `request.vetoes`, or `request.denied`,
    /// leaves every counter unchanged. Every key must be on the same server.
    pub fn add_request_call(
        &self,
        pipe: &mut Pipeline,
        ops: &[&CounterOp],
        request: Request<'_>,
        now_us: Option<u64>,
        key: &mut String,
    ) {
        let call = pipe.cmd("EVALSHA").arg(&self.request.sha).arg(ops.len());
        for op in ops {
            key.clear();
            op.key.write_redis_key(KEY_PREFIX, key);
            call.arg(key.as_str());
        }
        match now_us {
            Some(now_us) => call.arg(now_us),
            None => call.arg(""),
        };
        call.arg(u8::from(request.denied));
        for (i, op) in ops.iter().enumerate() {
            let veto = request.vetoes.get(i).copied().unwrap_or(false);
            let algorithm = match op.spec.algorithm {
                Algorithm::SlidingWindow => 1,
                Algorithm::FixedWindow => 2,
                Algorithm::Gcra => 3,
            };
            call.arg(algorithm)
                .arg(op.spec.limit)
                .arg(op.spec.period_us)
                .arg(op.spec.burst)
                .arg(op.hits)
                .arg(u8::from(veto));
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}

/// How the request script treats its operations.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Per operation: whether its denial denies the whole request.
    pub vetoes: &'a [bool],
    /// The request is denied already (by an answer known without Redis):
    /// only check.
    pub denied: bool,
}

/// What one `EVALSHA` answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Outcome(Outcome),
    /// The node does not have the script (restart, failover, `SCRIPT FLUSH`).
    NoScript,
    /// Cluster: the slot lives elsewhere now; the command did not run.
    Moved {
        address: String,
    },
    /// Cluster: the slot is migrating; ask there once; the command did not run.
    Ask {
        address: String,
    },
    /// Cluster: the slot is unavailable right now (`CLUSTERDOWN`, `TRYAGAIN`).
    ClusterDown(String),
    /// Anything else: a bug or an incompatible server.
    Failed(String),
}

/// Reads a counter script's `{admitted, remaining, reset_us, used}`, or the
/// error in its place.
pub fn parse_reply(value: &Value) -> Reply {
    match value {
        Value::Array(items) if items.len() == 4 => match parse_outcome(items) {
            Ok(outcome) => Reply::Outcome(outcome),
            Err(e) => Reply::Failed(e),
        },
        Value::ServerError(e) => {
            let address = || {
                // "MOVED 3999 127.0.0.1:6381": the details are "slot address".
                e.details()
                    .and_then(|d| d.split_whitespace().nth(1))
                    .unwrap_or_default()
                    .to_owned()
            };
            match e.code() {
                "NOSCRIPT" => Reply::NoScript,
                "MOVED" => Reply::Moved { address: address() },
                "ASK" => Reply::Ask { address: address() },
                "CLUSTERDOWN" | "TRYAGAIN" => Reply::ClusterDown(e.to_string()),
                _ => Reply::Failed(e.to_string()),
            }
        }
        other => Reply::Failed(format!("unexpected script reply {other:?}")),
    }
}

/// Reads the request script's reply: `count` outcomes, four numbers each.
/// `Err` carries the reply to read as [`parse_reply`] does (an error).
pub fn parse_request_reply(value: &Value, count: usize) -> Result<Vec<Outcome>, Reply> {
    match value {
        Value::Array(items) if items.len() == 4 * count => items
            .chunks_exact(4)
            .map(|chunk| parse_outcome(chunk).map_err(Reply::Failed))
            .collect(),
        Value::Array(items) => Err(Reply::Failed(format!(
            "request script answered {} numbers for {count} counters",
            items.len()
        ))),
        other => Err(parse_reply(other)),
    }
}

fn parse_outcome(items: &[Value]) -> Result<Outcome, String> {
    let mut n = [0u64; 4];
    for (slot, item) in n.iter_mut().zip(items) {
        match item {
            Value::Int(i) if *i >= 0 => *slot = *i as u64,
            other => return Err(format!("unexpected script reply item {other:?}")),
        }
    }
    Ok(Outcome {
        admitted: n[0] == 1,
        remaining: n[1],
        reset_us: n[2],
        used: n[3],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha1_of_the_sources() {
        let s = Scripts::new();
        for script in s.all() {
            assert_eq!(script.sha.len(), 40);
            assert!(script.source.contains("redis.call('TIME')"));
        }
        assert_ne!(s.sliding.sha, s.fixed.sha);
        assert_ne!(s.fixed.sha, s.gcra.sha);
    }

    #[test]
    fn replies_parse() {
        let v = Value::Array(vec![
            Value::Int(1),
            Value::Int(2),
            Value::Int(3),
            Value::Int(4),
        ]);
        assert_eq!(
            parse_reply(&v),
            Reply::Outcome(Outcome {
                admitted: true,
                remaining: 2,
                reset_us: 3,
                used: 4
            })
        );
        assert!(matches!(parse_reply(&Value::Nil), Reply::Failed(_)));
        let moved = redis::parse_redis_value(b"-MOVED 3999 127.0.0.1:6381\r\n").unwrap();
        assert_eq!(
            parse_reply(&moved),
            Reply::Moved {
                address: "127.0.0.1:6381".into()
            }
        );
        let noscript = redis::parse_redis_value(b"-NOSCRIPT No matching script.\r\n").unwrap();
        assert_eq!(parse_reply(&noscript), Reply::NoScript);
    }
}
