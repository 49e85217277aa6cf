//! The bodies of sluice's fuzz targets, one function per target, each
//! taking the fuzzer's bytes. `fuzz_targets/*.rs` hand them to libFuzzer
//! (`cargo fuzz run TARGET`); the integration test `fuzz_corpus` includes
//! this file and replays every committed input of `fuzz/corpus/TARGET/`
//! through the same function on every CI run, without a nightly compiler.
//!
//! A function panics exactly when sluice breaks a promise: a panic inside
//! sluice, a rule rejection that does not say where, an answer that is
//! neither a decision nor INVALID_ARGUMENT.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use prost::Message as _;
use sluice::clock::ManualClock;
use sluice::convert::{request_from_proto, verdict_to_proto};
use sluice::limiter::{Algorithm, KeyHasher, PlanOptions, RuleSet};
use sluice::proto::rls::RateLimitRequest;
use sluice::rules::catalog::Catalog;
use sluice::rules::yaml;
use sluice::rules::RuleErrors;
use sluice::service::{DecideError, FailureMode, LimiterSettings, RateLimiter};
use sluice::storage::memory::MemoryStore;
use sluice::storage::redis::scripts::{self, Time, Unit};

/// The file name rule errors must carry.
const FILE: &str = "fuzz.yaml";

/// Rules YAML, parsed and compiled: never a panic; a rejection is at least
/// one error, each naming the file and saying where in it.
pub fn rules_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match yaml::parse_str(FILE, text) {
        Err(errors) => assert_located(&errors, FILE),
        Ok(root) => {
            if let Err(errors) = yaml::compile_all(&[(FILE.to_owned(), root)]) {
                assert_located(&errors, FILE);
            }
        }
    }
}

/// A PostgreSQL catalog as the rules snapshot stores it (JSON: plans,
/// tenants, keys, rule rows), compiled as the loader compiles the rows it
/// reads: never a panic; a rejection names where.
pub fn catalog(data: &[u8]) {
    let Ok(catalog) = serde_json::from_slice::<Catalog>(data) else {
        return;
    };
    if let Err(errors) = catalog.compile() {
        assert!(!errors.0.is_empty(), "a rejection with no error");
        for e in &errors.0 {
            assert!(!e.file.is_empty(), "an error naming no source: {e:?}");
            assert!(
                !e.message.trim().is_empty(),
                "an error with no message: {e:?}"
            );
        }
    }
}

/// Any bytes that decode as a `RateLimitRequest`, decided on the
/// in-process store: an answer, or INVALID_ARGUMENT with a message; never a
/// panic, never UNAVAILABLE. The first byte picks how many times the
/// request is made (1 to 4) and the second how far the clock moves between
/// times, so counters fill, deny and roll over.
pub fn decision(data: &[u8]) {
    let [repeat, step, proto @ ..] = data else {
        return;
    };
    let Ok(message) = RateLimitRequest::decode(proto) else {
        return;
    };
    decide_repeatedly(&message, *repeat, *step);
}

/// A `/json` body, decoded as `POST /json` decodes it and decided as
/// [`decision`] decides; a body refused says why.
pub fn json_body(data: &[u8]) {
    match sluice::http::decode_request(data) {
        Ok(message) => decide_repeatedly(&message, 1, 0),
        Err(reason) => assert!(!reason.trim().is_empty(), "a refusal that says nothing"),
    }
}

fn decide_repeatedly(message: &RateLimitRequest, repeat: u8, step: u8) {
    let clock = Arc::new(ManualClock::new(1_767_225_600_000_000));
    let limiter = limiter(clock.clone());
    for _ in 0..=(repeat % 4) {
        let result = match request_from_proto(message) {
            Ok(request) => runtime().block_on(limiter.should_rate_limit(&request)),
            Err(e) => Err(DecideError::Invalid(e)),
        };
        match result {
            Ok(verdict) => {
                assert_eq!(
                    verdict.statuses.len(),
                    message.descriptors.len(),
                    "one status per descriptor"
                );
                for status in &verdict.statuses {
                    if let Some(limit) = &status.limit {
                        assert!(
                            status.remaining <= limit.requests_per_unit,
                            "remaining {} over the limit {}",
                            status.remaining,
                            limit.requests_per_unit
                        );
                    }
                }
                let response = verdict_to_proto(message, &verdict);
                assert_eq!(response.statuses.len(), message.descriptors.len());
                let _ = response.encode_to_vec();
            }
            Err(DecideError::Invalid(e)) => {
                assert!(
                    !e.to_string().trim().is_empty(),
                    "INVALID_ARGUMENT saying nothing"
                )
            }
            Err(DecideError::Unavailable(e)) => {
                panic!("the in-process store failed under --failure-mode allow: {e}")
            }
        }
        clock.advance(u64::from(step) * 50_000);
    }
}

/// The Lua counter script (what Redis runs) against the Rust core (what
/// the in-process store runs), differential: the same sequence of hits at
/// the same times on one counter, the same answers. The bytes pick the
/// algorithm, the limit, the period, GCRA's burst, then up to 64 steps of
/// (hits, time moved on). Runs on the Redis at `SLUICE_FUZZ_REDIS` (default
/// redis://127.0.0.1:6379/15); each run deletes its key.
pub fn lua_differential(data: &[u8]) {
    static CONNECTION: OnceLock<std::sync::Mutex<redis::Connection>> = OnceLock::new();
    let connection = CONNECTION.get_or_init(|| {
        let url = std::env::var("SLUICE_FUZZ_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/15".to_owned());
        let connection = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("the differential needs Redis at {url}: {e}"));
        std::sync::Mutex::new(connection)
    });
    let mut connection = connection.lock().unwrap_or_else(|p| p.into_inner());
    lua_differential_on(&mut connection, data);
}

/// [`lua_differential`] on a given Redis connection.
pub fn lua_differential_on(con: &mut redis::Connection, data: &[u8]) {
    use sluice::limiter::{CounterOp, CounterSpec, Entry};
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUN: AtomicU64 = AtomicU64::new(0);

    let [algorithm, l0, l1, period, burst, steps @ ..] = data else {
        return;
    };
    let algorithm = match algorithm % 3 {
        0 => Algorithm::SlidingWindow,
        1 => Algorithm::FixedWindow,
        _ => Algorithm::Gcra,
    };
    let limit = 1 + u64::from(u16::from_le_bytes([*l0, *l1])) % 2000;
    let period_s = [1, 2, 60, 3600, 86_400][usize::from(*period) % 5];
    let period_us = period_s * 1_000_000;
    let burst = match algorithm {
        Algorithm::Gcra => 1 + u64::from(*burst) % (limit + 1),
        _ => limit,
    };
    let run = RUN.fetch_add(1, Ordering::Relaxed).to_string();
    let op_at = |hits: u64| CounterOp {
        key: KeyHasher::from_secret(b"fuzz").counter_key(
            "lua",
            &[Entry {
                key: "run",
                value: &run,
            }],
            &[],
            algorithm,
            period_s,
        ),
        spec: CounterSpec {
            algorithm,
            limit,
            period_us,
            burst,
            calendar: None,
        },
        hits,
    };
    let mut key = String::new();
    op_at(0).key.write_redis_key(scripts::KEY_PREFIX, &mut key);

    // Redis expires keys by its own clock: start ahead of it, so that no
    // key the sequence writes expires in Redis while it lives here.
    let mut now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
        + 60_000_000;
    let clock = Arc::new(ManualClock::new(now_us));
    let store = MemoryStore::new(64, clock);
    let mut unit = Vec::new();
    for (i, step) in steps.chunks_exact(3).take(64).enumerate() {
        let hits = u64::from(step[0]) % (limit + 3);
        let advance = u64::from(u16::from_le_bytes([step[1], step[2]])) * period_us / 8192;
        now_us += advance;
        let op = op_at(hits);
        let rust = store
            .apply_one(&op, now_us)
            .unwrap_or_else(|e| panic!("the in-process store failed: {e}"));
        scripts::encode_unit(
            &Unit::single(
                &op,
                Time {
                    now_us: Some(now_us),
                    local_us: now_us,
                },
            ),
            &mut unit,
        );
        let reply: redis::Value = redis::cmd("EVAL")
            .arg(scripts::script().source)
            .arg(1)
            .arg(&key)
            .arg(unit.as_slice())
            .query(con)
            .unwrap_or_else(|e| panic!("EVAL failed: {e}"));
        let lua = scripts::parse_outcomes(&reply, 1)
            .unwrap_or_else(|e| panic!("the script's answer does not parse: {e:?} ({reply:?})"));
        assert_eq!(
            lua.first(),
            Some(&rust),
            "step {i}: {algorithm:?} limit {limit} per {period_s} s, burst {burst}, {hits} hits \
             after {advance} µs: Lua (left) and Rust (right) disagree"
        );
    }
    let _: Result<(), _> = redis::cmd("DEL").arg(&key).query(con);
}

/// The rules the decisions are made on: the examples, and a domain with
/// every algorithm, wildcards, nesting, shadow and quota mode.
const FUZZ_RULES: &str = r#"
domain: fuzz
descriptors:
  - key: a
    rate_limit: { unit: second, requests_per_unit: 3 }
  - key: f
    rate_limit: { unit: minute, requests_per_unit: 2, algorithm: fixed_window }
  - key: g
    rate_limit: { unit: second, requests_per_unit: 5, algorithm: gcra, burst: 2 }
  - key: w
    value: "x*"
    rate_limit: { unit: hour, requests_per_unit: 1 }
  - key: s
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: q
    quota_mode: true
    rate_limit: { unit: day, requests_per_unit: 2 }
  - key: n
    descriptors:
      - key: m
        value: v
        rate_limit: { unit: second, requests_per_unit: 1 }
      - key: m
        rate_limit: { unlimited: true }
"#;

fn rules() -> &'static Arc<RuleSet> {
    static RULES: OnceLock<Arc<RuleSet>> = OnceLock::new();
    RULES.get_or_init(|| {
        let files = [
            ("fuzz.yaml", FUZZ_RULES),
            (
                "business.yaml",
                include_str!("../../examples/rules/business.yaml"),
            ),
            (
                "weather.yaml",
                include_str!("../../examples/rules/weather.yaml"),
            ),
        ];
        let parsed: Vec<_> = files
            .iter()
            .map(|(name, text)| {
                let root = yaml::parse_str(name, text).unwrap_or_else(|e| panic!("{e}"));
                ((*name).to_owned(), root)
            })
            .collect();
        Arc::new(yaml::compile_all(&parsed).unwrap_or_else(|e| panic!("{e}")))
    })
}

/// A fresh limiter on a small in-process store (so it fills up too).
fn limiter(clock: Arc<ManualClock>) -> RateLimiter {
    RateLimiter::new(
        Arc::new(ArcSwap::new(rules().clone())),
        Arc::new(MemoryStore::new(256, clock.clone())),
        KeyHasher::from_secret(b"fuzz"),
        LimiterSettings {
            plan: PlanOptions {
                default_algorithm: Algorithm::SlidingWindow,
                global_shadow: false,
                global_quota: false,
            },
            failure_mode: FailureMode::Allow,
            store_timeout: Duration::from_secs(1),
            rate_limit_headers: true,
            dynamic_metadata: true,
        },
        clock,
    )
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("a runtime for the decisions: {e}"))
    })
}

/// Every error names `file`, says something, and says where: a path in
/// the file, a line (YAML syntax), the key at fault (a duplicate one at the
/// top), or that the file as a whole is wrong (its domain, its documents).
fn assert_located(errors: &RuleErrors, file: &str) {
    assert!(!errors.0.is_empty(), "a rejection with no error");
    for e in &errors.0 {
        assert_eq!(e.file, file, "an error naming another file: {e}");
        assert!(
            !e.message.trim().is_empty(),
            "an error with no message: {e:?}"
        );
        assert!(
            !e.path.is_empty()
                || e.message.contains("line ")
                || e.message.contains("domain")
                || e.message.contains("document")
                || e.message.contains("field `"),
            "an error that does not say where: {e}"
        );
    }
}
