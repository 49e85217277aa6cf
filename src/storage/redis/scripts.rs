//! The counter scripts: one per algorithm, loaded once (`SCRIPT LOAD`) and
//! called by hash (`EVALSHA`); how to call them and read their answers.

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

/// The three scripts, built once per store.
pub struct Scripts {
    sliding: CounterScript,
    fixed: CounterScript,
    gcra: CounterScript,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            sliding: CounterScript::new(concat!(
                include_str!("../scripts/prelude.lua"),
                include_str!("../scripts/sliding_window.lua")
            )),
            fixed: CounterScript::new(concat!(
                include_str!("../scripts/prelude.lua"),
                include_str!("../scripts/fixed_window.lua")
            )),
            gcra: CounterScript::new(concat!(
                include_str!("../scripts/prelude.lua"),
                include_str!("../scripts/gcra.lua")
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

    pub fn all(&self) -> [&CounterScript; 3] {
        [&self.sliding, &self.fixed, &self.gcra]
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
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
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

/// Reads a script's `{admitted, remaining, reset_us, used}`, or the error in
/// its place.
pub fn parse_reply(value: &Value) -> Reply {
    match value {
        Value::Array(items) if items.len() == 4 => {
            let mut n = [0u64; 4];
            for (slot, item) in n.iter_mut().zip(items) {
                match item {
                    Value::Int(i) if *i >= 0 => *slot = *i as u64,
                    other => {
                        return Reply::Failed(format!("unexpected script reply item {other:?}"))
                    }
                }
            }
            Reply::Outcome(Outcome {
                admitted: n[0] == 1,
                remaining: n[1],
                reset_us: n[2],
                used: n[3],
            })
        }
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
