//! The counter script, loaded once (`SCRIPT LOAD`) and called by hash
//! (`EVALSHA`): one script call decides a batch of units (a counter
//! operation, or all of one request's counters), each atomically; how to
//! call it and read its answers.

use std::sync::LazyLock;

use redis::{Pipeline, Value};

use crate::limiter::{Algorithm, CounterOp, Outcome};

/// Every counter key starts with this; the rest is `{hash}:algorithm:period`.
pub const KEY_PREFIX: &str = "sluice:";

/// One Lua script and its SHA1, as `EVALSHA` names it.
pub struct CounterScript {
    pub source: &'static str,
    pub sha: String,
}

/// The script every call runs (`storage/scripts/batch.lua` after the shared
/// arithmetic and the algorithms).
pub fn script() -> &'static CounterScript {
    static SCRIPT: LazyLock<CounterScript> = LazyLock::new(|| {
        let source = concat!(
            include_str!("../scripts/prelude.lua"),
            include_str!("../scripts/sliding_window.lua"),
            include_str!("../scripts/fixed_window.lua"),
            include_str!("../scripts/gcra.lua"),
            include_str!("../scripts/batch.lua")
        );
        CounterScript {
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    });
    &SCRIPT
}

/// Appends `SCRIPT LOAD` of the script, e.g. to a probe.
pub fn add_load(pipe: &mut Pipeline) {
    pipe.cmd("SCRIPT").arg("LOAD").arg(script().source);
}

/// The time a unit is decided at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time {
    /// `None`: the script reads Redis' `TIME` (production). Tests pass their
    /// clock's time to replay exact sequences.
    pub now_us: Option<u64>,
    /// This instance's clock (the same as `now_us` when that is given).
    /// Lua has no tz database, so calendar windows' boundaries are computed
    /// here, around this time, and the script picks among them by its own.
    pub local_us: u64,
}

/// Operations decided atomically in one script call: one counter operation,
/// or all of one request's. Owned, to wait in a node's batch queue.
#[derive(Clone, Debug)]
pub struct Unit {
    /// Each operation, and whether its denial denies the whole unit.
    pub ops: Vec<(CounterOp, bool)>,
    /// Denied already (by an answer known without Redis): only check.
    pub denied: bool,
    pub time: Time,
}

impl Unit {
    /// One operation on its own.
    pub fn single(op: &CounterOp, time: Time) -> Unit {
        Unit {
            ops: vec![(*op, false)],
            denied: false,
            time,
        }
    }

    /// All of one request's operations (see [`Request`]).
    pub fn request(ops: &[&CounterOp], request: Request<'_>, time: Time) -> Unit {
        Unit {
            ops: ops
                .iter()
                .enumerate()
                .map(|(i, op)| (**op, request.vetoes.get(i).copied().unwrap_or(false)))
                .collect(),
            denied: request.denied,
            time,
        }
    }
}

/// Appends one `EVALSHA` deciding `units` in order. On a Cluster every key
/// must be in one slot. `key` and `unit` are reused buffers.
pub fn add_script_call<'u>(
    pipe: &mut Pipeline,
    units: impl Iterator<Item = &'u Unit> + Clone,
    key: &mut String,
    unit: &mut Vec<u8>,
) {
    let keys: usize = units.clone().map(|u| u.ops.len()).sum();
    let call = pipe.cmd("EVALSHA").arg(&script().sha).arg(keys);
    for u in units.clone() {
        for (op, _) in &u.ops {
            key.clear();
            op.key.write_redis_key(KEY_PREFIX, key);
            call.arg(key.as_str());
        }
    }
    for u in units {
        encode_unit(u, unit);
        call.arg(unit.as_slice());
    }
}

/// A unit as `batch.lua` reads it with `struct.unpack`: one binary argument
/// instead of nine per operation. Numbers go as doubles, exact below 2^53:
/// limits and bursts are u32, periods at most a year of microseconds, hits
/// a u32 sum, and times in microseconds stay below 2^53 until 2255.
pub fn encode_unit(unit: &Unit, buf: &mut Vec<u8>) {
    buf.clear();
    // At most `MAX_DESCRIPTORS` operations (64), far below u16::MAX.
    let count = u16::try_from(unit.ops.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&count.to_le_bytes());
    buf.push(u8::from(unit.denied));
    match unit.time.now_us {
        Some(now_us) => {
            buf.push(1);
            buf.extend_from_slice(&(now_us as f64).to_le_bytes());
        }
        None => buf.push(0),
    }
    for (op, veto) in unit.ops.iter().take(usize::from(count)) {
        buf.push(match (op.spec.calendar, op.spec.algorithm) {
            (Some(_), _) => 4,
            (None, Algorithm::SlidingWindow) => 1,
            (None, Algorithm::FixedWindow) => 2,
            (None, Algorithm::Gcra) => 3,
        });
        for n in [op.spec.limit, op.spec.period_us, op.spec.burst, op.hits] {
            buf.extend_from_slice(&(n as f64).to_le_bytes());
        }
        buf.push(u8::from(*veto));
        if let Some(calendar) = op.spec.calendar {
            for bound in calendar.bounds_around(unit.time.local_us) {
                buf.extend_from_slice(&(bound as f64).to_le_bytes());
            }
        }
    }
}

/// How a request's unit treats its operations.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Per operation: whether its denial denies the whole request.
    pub vetoes: &'a [bool],
    /// The request is denied already (by an answer known without Redis):
    /// only check.
    pub denied: bool,
}

/// Why one `EVALSHA` did not answer with outcomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The node does not have the script (restart, failover, `SCRIPT FLUSH`).
    NoScript,
    /// Cluster: the slot lives elsewhere now; the command did not run.
    Moved { address: String },
    /// Cluster: the slot is migrating; ask there once; the command did not run.
    Ask { address: String },
    /// Cluster: the slot is unavailable right now (`CLUSTERDOWN`, `TRYAGAIN`).
    ClusterDown(String),
    /// Anything else: a bug or an incompatible server.
    Failed(String),
}

/// Reads an error reply.
pub fn parse_error(value: &Value) -> Reply {
    match value {
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

/// One outcome in a script's reply: admitted (u8), then remaining,
/// reset_us and used (f64), little-endian (`batch.lua`).
const OUTCOME_BYTES: usize = 1 + 3 * 8;

/// Reads a script call's reply: `count` outcomes, packed in one string.
pub fn parse_outcomes(value: &Value, count: usize) -> Result<Vec<Outcome>, Reply> {
    match value {
        Value::BulkString(bytes) if bytes.len() == OUTCOME_BYTES * count => bytes
            .chunks_exact(OUTCOME_BYTES)
            .map(|chunk| parse_outcome(chunk).map_err(Reply::Failed))
            .collect(),
        Value::BulkString(bytes) => Err(Reply::Failed(format!(
            "the script answered {} bytes for {count} counters",
            bytes.len()
        ))),
        other => Err(parse_error(other)),
    }
}

fn parse_outcome(record: &[u8]) -> Result<Outcome, String> {
    let number = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&record[at..at + 8]);
        let n = f64::from_le_bytes(word);
        // Truncated, as Redis truncates a Lua number it replies.
        if n >= 0.0 && n < 2f64.powi(64) {
            Ok(n as u64)
        } else {
            Err(format!("unexpected number {n} in the script's reply"))
        }
    };
    let admitted = match record[0] {
        0 => false,
        1 => true,
        other => {
            return Err(format!(
                "unexpected admitted flag {other} in the script's reply"
            ))
        }
    };
    Ok(Outcome {
        admitted,
        remaining: number(1)?,
        reset_us: number(9)?,
        used: number(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_sha1_of_the_source() {
        let s = script();
        assert_eq!(s.sha, redis::Script::new(s.source).get_hash());
        assert_eq!(s.sha.len(), 40);
        assert!(s.source.contains("redis.call('TIME')"));
    }

    #[test]
    fn a_unit_encodes_as_batch_lua_unpacks_it() {
        use crate::limiter::{CounterKey, CounterSpec};
        let op = CounterOp {
            key: CounterKey {
                hash: [7; 16],
                algorithm: Algorithm::Gcra,
                period_s: 60,
            },
            spec: CounterSpec {
                algorithm: Algorithm::Gcra,
                limit: 100,
                period_us: 60_000_000,
                burst: 5,
                calendar: None,
            },
            hits: 2,
        };
        let unit = Unit {
            ops: vec![(op, true), (op, false)],
            denied: true,
            time: Time {
                now_us: Some(1_700_000_000_000_000),
                local_us: 1_700_000_000_000_000,
            },
        };
        let mut buf = Vec::new();
        encode_unit(&unit, &mut buf);
        // '<I2BB', then '<d', then '<BddddB' per operation.
        assert_eq!(buf.len(), 2 + 1 + 1 + 8 + 2 * (1 + 4 * 8 + 1));
        assert_eq!(&buf[..4], &[2, 0, 1, 1]);
        let f64_at = |at: usize| f64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        assert_eq!(f64_at(4), 1_700_000_000_000_000.0);
        assert_eq!(buf[12], 3, "gcra");
        assert_eq!(
            [f64_at(13), f64_at(21), f64_at(29), f64_at(37)],
            [100.0, 60_000_000.0, 5.0, 2.0]
        );
        assert_eq!((buf[45], buf[46 + 33]), (1, 0), "the vetoes");
        let redis_time = Time {
            now_us: None,
            local_us: 0,
        };
        encode_unit(&Unit::single(&op, redis_time), &mut buf);
        assert_eq!(&buf[..4], &[1, 0, 0, 0], "Redis' clock: no time follows");
        assert_eq!(buf.len(), 4 + 34);

        // A calendar window: algorithm 4, then the bounds of three windows.
        let calendar = crate::limiter::Calendar {
            unit: crate::limiter::CalendarUnit::Day,
            time_zone: chrono_tz::UTC,
        };
        let day = 86_400_000_000;
        let mut op = op;
        op.spec.calendar = Some(calendar);
        let time = Time {
            now_us: None,
            local_us: 20_000 * day + 5,
        };
        encode_unit(&Unit::single(&op, time), &mut buf);
        assert_eq!(buf.len(), 4 + 34 + 4 * 8);
        assert_eq!(buf[4], 4, "calendar");
        let f64_at = |at: usize| f64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        let bounds = [f64_at(38), f64_at(46), f64_at(54), f64_at(62)];
        let day = day as f64;
        assert_eq!(
            bounds,
            [
                19_999.0 * day,
                20_000.0 * day,
                20_001.0 * day,
                20_002.0 * day
            ]
        );
    }

    #[test]
    fn replies_parse() {
        let record = |admitted: u8, numbers: [f64; 3]| {
            let mut bytes = vec![admitted];
            for n in numbers {
                bytes.extend_from_slice(&n.to_le_bytes());
            }
            bytes
        };
        let mut two = record(1, [2.0, 3.9, 4.0]);
        two.extend(record(0, [0.0, 5e12, 7.0]));
        let v = Value::BulkString(two);
        assert_eq!(
            parse_outcomes(&v, 2),
            Ok(vec![
                Outcome {
                    admitted: true,
                    remaining: 2,
                    reset_us: 3,
                    used: 4
                },
                Outcome {
                    admitted: false,
                    remaining: 0,
                    reset_us: 5_000_000_000_000,
                    used: 7
                }
            ])
        );
        assert!(matches!(parse_outcomes(&v, 1), Err(Reply::Failed(_))));
        for bad in [
            record(2, [1.0; 3]),
            record(1, [-1.0, 0.0, 0.0]),
            record(1, [f64::NAN; 3]),
        ] {
            assert!(
                matches!(
                    parse_outcomes(&Value::BulkString(bad), 1),
                    Err(Reply::Failed(_))
                ),
                "accepted a bad record"
            );
        }
        assert!(matches!(
            parse_outcomes(&Value::Nil, 1),
            Err(Reply::Failed(_))
        ));
        let moved = redis::parse_redis_value(b"-MOVED 3999 127.0.0.1:6381\r\n").unwrap();
        assert_eq!(
            parse_outcomes(&moved, 1),
            Err(Reply::Moved {
                address: "127.0.0.1:6381".into()
            })
        );
        let noscript = redis::parse_redis_value(b"-NOSCRIPT No matching script.\r\n").unwrap();
        assert_eq!(parse_error(&noscript), Reply::NoScript);
    }
}
