//! The Redis store against a real standalone `redis-server` (started here):
//! exact arithmetic in the scripts, Redis' own clock, script reloads,
//! commands per decision and the local over-limit cache, Redis down at
//! start-up and during operation (circuit breaker, no reconnect storm,
//! recovery), and TLS and AUTH.
//!
//! The storage contract itself is `storage_contract.rs`.

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clap::Parser as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::clock::{SkewedClock, SystemClock};
use sluice::limiter::{
    Algorithm, Calendar, CalendarUnit, CounterOp, CounterSpec, Entry, KeyHasher,
};
use sluice::proto::rls::rate_limit_response::Code;
use sluice::service::FailureMode;
use sluice::storage::redis::{RedisOptions, RedisStore, RedisTarget};
use sluice::storage::{CounterStore, StoreHealth};
use support::redis::{drive, RedisConfig, RedisServer, Tally};
use support::{eventually, request, rules_from_yaml, TestConfig, TestServer};

const PRELUDE: &str = include_str!("../../src/storage/scripts/prelude.lua");

/// Slack for a busy two-core machine on top of a promised deadline.
const MARGIN: Duration = Duration::from_millis(250);

fn options(timeout_ms: u64) -> RedisOptions {
    RedisOptions::new(Duration::from_millis(timeout_ms))
}

async fn up(store: &RedisStore) {
    let ok = eventually(Duration::from_secs(10), || {
        store.health() == StoreHealth::Up
    })
    .await
    .is_some();
    assert!(ok, "store never came up: {:?}", store.health());
}

fn fixed_op(value: &str, limit: u64, period_us: u64) -> CounterOp {
    let h = KeyHasher::from_secret(b"redis tests");
    CounterOp {
        key: h.counter_key(
            "t",
            &[Entry { key: "k", value }],
            &[],
            Algorithm::FixedWindow,
            period_us / 1_000_000,
        ),
        spec: CounterSpec {
            algorithm: Algorithm::FixedWindow,
            limit,
            period_us,
            burst: limit,
            calendar: None,
        },
        hits: 1,
    }
}

// === Arithmetic ===

/// `floor(a * b / c)` must be exact where `a * b` is beyond 2^53, which a
/// double cannot hold; the sliding window depends on it for long periods.
/// Compared with u128 arithmetic, on products that land exactly on, just
/// below and just above a multiple of `c` (where rounding would show).
#[test]
fn lua_integer_arithmetic_is_exact_beyond_two_to_the_53() {
    let server = RedisServer::start();
    let script = format!("{PRELUDE}\nlocal q, r = muldiv(tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]))\nlocal dq, dr = divmod(tonumber(ARGV[6]), tonumber(ARGV[8]))\nreturn {{ q, r, dq, dr }}");
    let path = server.dir().join("arith.lua");
    std::fs::write(&path, script).unwrap();

    let year = 365 * 86_400_000_000u64;
    let mut cases: Vec<(u64, u64, u64)> = Vec::new();
    for a in [
        u64::from(u32::MAX),
        4_000_000_001,
        999_999_937,
        1_000_000,
        3,
        0,
        1,
    ] {
        for c in [
            year,
            30 * 86_400_000_000,
            86_400_000_000,
            3_600_000_000,
            1_000_000,
        ] {
            // b such that a * b is a multiple of c, and its neighbours.
            let g = gcd(a.max(1), c);
            for t in [1u64, 7, 13] {
                let b = (c / g * t).min(c);
                for b in [b.saturating_sub(1), b, (b + 1).min(c)] {
                    cases.push((a, b, c));
                }
            }
            cases.push((a, c - 1, c));
            cases.push((a, c / 3, c));
        }
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let c = 1 + x % year;
        cases.push((x % (1 << 33), (x >> 11) % c, c));
    }

    let source = std::fs::read_to_string(&path).unwrap();
    for &(a, b, c) in &cases {
        let (a_s, b_s, c_s) = (a.to_string(), b.to_string(), c.to_string());
        let out = server.cli(&[
            "EVAL", &source, "0", "1", "1", "1", "0", "1", &a_s, &b_s, &c_s,
        ]);
        let got: Vec<u128> = out
            .lines()
            .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("reply {out:?}")))
            .collect();
        let p = u128::from(a) * u128::from(b);
        let c128 = u128::from(c);
        let want = vec![p / c128, p % c128, u128::from(a / c), u128::from(a % c)];
        assert_eq!(got, want, "muldiv({a}, {b}, {c}) and divmod({a}, {c})");
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

// === Time and scripts ===

/// Without a test clock the scripts take Redis' `TIME`: a fixed window's
/// reset is where Redis' clock says the window ends.
#[tokio::test]
async fn windows_follow_redis_time() {
    let server = RedisServer::start();
    let store = RedisStore::new(&RedisTarget::Standalone(server.url()), options(1_000)).unwrap();
    up(&store).await;
    let period = 1_000_000_000; // 1000 s: a boundary between the reads is unlikely, and detected
    let before = server.time_us();
    let outcome = store.apply(&[fixed_op("time", 10, period)]).await.unwrap()[0];
    let after = server.time_us();
    if before / period != after / period {
        return; // crossed a boundary; nothing to compare
    }
    let (latest, earliest) = (period - after % period, period - before % period);
    assert!(
        (latest..=earliest).contains(&outcome.reset_us),
        "reset {} not between {latest} and {earliest} (Redis TIME)",
        outcome.reset_us
    );
}

/// A calendar window's boundaries come from sluice's clock (Lua has no tz
/// database), but the script picks the window by Redis' `TIME`: instances
/// whose clocks are 20 hours behind and ahead count in the same calendar day
/// as one whose clock is right, and all name the same end.
#[tokio::test]
async fn calendar_windows_follow_redis_time_whatever_sluices_clock_says() {
    let server = RedisServer::start();
    let hour = 3_600_000_000u64;
    // A zone where it is about noon now, so no midnight falls in the test.
    let offset = 12 - (server.time_us() / hour % 24) as i64;
    let zone = match offset {
        0 => "Etc/GMT".to_owned(),
        // tz database names have the sign the other way round.
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    let calendar = Calendar {
        unit: CalendarUnit::Day,
        time_zone: zone.parse().unwrap(),
    };
    let day_of = |offset_us: i64| {
        let mut options = options(1_000);
        options.local_clock = Arc::new(SkewedClock {
            inner: SystemClock,
            offset_us,
        });
        RedisStore::new(&RedisTarget::Standalone(server.url()), options).unwrap()
    };
    let stores = [
        day_of(0),
        day_of(-20 * hour as i64),
        day_of(20 * hour as i64),
    ];
    for store in &stores {
        up(store).await;
    }
    let h = KeyHasher::from_secret(b"redis tests");
    let op = CounterOp {
        key: h.calendar_key(
            "t",
            &[Entry {
                key: "k",
                value: "cal",
            }],
            &[],
            calendar,
        ),
        spec: CounterSpec {
            algorithm: Algorithm::FixedWindow,
            limit: 3,
            period_us: 24 * hour,
            burst: 3,
            calendar: Some(calendar),
        },
        hits: 1,
    };
    let mut resets = Vec::new();
    for (store, remaining) in stores.iter().zip([2, 1, 0]) {
        let outcome = store.apply(&[op]).await.unwrap()[0];
        assert!(outcome.admitted, "{zone}: {outcome:?}");
        assert_eq!(
            outcome.remaining, remaining,
            "{zone}: one counter for all three"
        );
        resets.push(outcome.reset_us);
    }
    for store in &stores {
        assert!(!store.apply(&[op]).await.unwrap()[0].admitted, "{zone}");
    }
    let (low, high) = (resets.iter().min().unwrap(), resets.iter().max().unwrap());
    assert!(
        high - low < 2_000_000,
        "{zone}: resets disagree: {resets:?}"
    );
    assert!(
        (10 * hour..14 * hour).contains(low),
        "{zone}: about noon, reset {low}"
    );
}

/// After `SCRIPT FLUSH` (as after a restart or failover) the next call
/// reloads the scripts and still answers, in the same call.
#[tokio::test]
async fn scripts_are_reloaded_after_noscript() {
    let server = RedisServer::start();
    let store = RedisStore::new(&RedisTarget::Standalone(server.url()), options(1_000)).unwrap();
    up(&store).await;
    assert!(
        store
            .apply(&[fixed_op("reload", 2, 60_000_000)])
            .await
            .unwrap()[0]
            .admitted
    );
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    let loads = server.command_calls("script|load");
    let out = store
        .apply(&[
            fixed_op("reload", 2, 60_000_000),
            fixed_op("reload", 2, 60_000_000),
        ])
        .await
        .unwrap();
    assert_eq!(
        (out[0].admitted, out[1].admitted),
        (true, false),
        "one call, scripts reloaded in it"
    );
    assert!(
        server.command_calls("script|load") > loads,
        "SCRIPT LOAD was sent"
    );
}

// === Commands per decision, and the local over-limit cache ===

const HOURLY: &str = r#"
domain: bench
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 5}
"#;

/// One `EVALSHA` per decision with one descriptor; none for the denials the
/// local over-limit cache answers, and their decisions are unchanged.
#[tokio::test]
async fn one_evalsha_per_descriptor_and_none_for_cached_denials() {
    let server = RedisServer::start();
    let store =
        Arc::new(RedisStore::new(&RedisTarget::Standalone(server.url()), options(1_000)).unwrap());
    up(&store).await;
    let mut config = TestConfig::new(rules_from_yaml(&[HOURLY]));
    config.store = Some(store.clone());
    config.settings.store_timeout = Duration::from_secs(1);
    let sluice = TestServer::start(config).await;
    let mut client = sluice.client().await;

    server.cli(&["CONFIG", "RESETSTAT"]);
    for i in 0..40 {
        let user = format!("user-{i}");
        let r = client
            .should_rate_limit(request("bench", &[&[("user", &user)]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    assert_eq!(
        server.command_calls("evalsha"),
        40,
        "one EVALSHA per decision"
    );

    // A hot key at 20x its limit: 5 admitted, then one denial from Redis,
    // then every denial from the cache.
    server.cli(&["CONFIG", "RESETSTAT"]);
    let mut codes = Vec::new();
    for _ in 0..100 {
        let r = client
            .should_rate_limit(request("bench", &[&[("user", "hot")]]))
            .await
            .unwrap()
            .into_inner();
        codes.push(r.overall_code);
    }
    let ok = codes.iter().filter(|&&c| c == Code::Ok as i32).count();
    assert_eq!(ok, 5, "exactly the limit is admitted");
    assert!(codes[5..].iter().all(|&c| c == Code::OverLimit as i32));
    assert_eq!(
        server.command_calls("evalsha"),
        6,
        "95 denials cost one EVALSHA"
    );
    assert_eq!(store.local_cache_len(), 1);
}

// === One request, several counters ===

const TIGHT_AND_WIDE: &str = r#"
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: shop
    rate_limit: {unit: hour, requests_per_unit: 100000}
"#;

/// Requests counted against a tight per-user limit and a wide shared one,
/// many at once: the shared counter counts exactly the admitted requests
/// (a request the user limit denies consumes nothing, even when concurrent
/// requests race for the same counters, and share script calls), each
/// request costs at most one `EVALSHA`, and a request the over-limit cache
/// can deny still reports the shared counter's real budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_consumes_nothing_even_under_concurrency() {
    let server = RedisServer::start();
    let store =
        Arc::new(RedisStore::new(&RedisTarget::Standalone(server.url()), options(1_000)).unwrap());
    up(&store).await;
    let mut config = TestConfig::new(rules_from_yaml(&[TIGHT_AND_WIDE]));
    config.store = Some(store.clone());
    config.settings.store_timeout = Duration::from_secs(2);
    let sluice = TestServer::start(config).await;
    let client = sluice.client().await;

    const USERS: usize = 20;
    const EACH: usize = 10;
    server.cli(&["CONFIG", "RESETSTAT"]);
    let calls = (0..USERS * EACH).map(|i| {
        let mut client = client.clone();
        async move {
            let user = format!("user-{}", i % USERS);
            client
                .should_rate_limit(request("shop", &[&[("user", &user)], &[("shop", "all")]]))
                .await
                .unwrap()
                .into_inner()
        }
    });
    let answers = futures::future::join_all(calls).await;
    let admitted = answers
        .iter()
        .filter(|r| r.overall_code == Code::Ok as i32)
        .count();
    assert_eq!(admitted, USERS * 3, "each user admitted exactly its limit");
    let evalsha = server.command_calls("evalsha");
    assert!(
        (1..=(USERS * EACH) as u64).contains(&evalsha),
        "at most one EVALSHA per request (concurrent ones share), not {evalsha}"
    );

    // The shared counter holds the admitted requests, and nothing else.
    let mut client = client.clone();
    let r = client
        .should_rate_limit(request("shop", &[&[("shop", "all")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.statuses[0].limit_remaining as usize,
        100_000 - admitted - 1,
        "denied requests consumed from the shared limit"
    );

    // A user the cache knows is over: denied, nothing consumed, and the
    // shared counter's budget reported as Redis has it.
    let r = client
        .should_rate_limit(request(
            "shop",
            &[&[("user", "user-0")], &[("shop", "all")]],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    assert_eq!(
        r.statuses[1].limit_remaining as usize,
        100_000 - admitted - 1
    );
}

// === Redis down ===

const GENEROUS: &str = r#"
domain: d
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 1000000}
"#;

/// Redis goes away under load: every call is still answered within the
/// store timeout, by the failure mode; the breaker opens and sluice tries
/// to reconnect about once per cool-down, not once per call; when Redis is
/// back, decisions resume within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back() {
    let mut server = RedisServer::start();
    // Not the 50 ms default: on a busy two-core machine a few healthy calls
    // exceed 50 ms, and the healthy phase here must see none answered by the
    // failure mode. The bound under test is the same at any value.
    let timeout = Duration::from_millis(200);
    let cooldown = Duration::from_millis(500);
    let mut opts = options(200);
    opts.breaker_cooldown = cooldown;
    let store = Arc::new(RedisStore::new(&RedisTarget::Standalone(server.url()), opts).unwrap());
    up(&store).await;
    let mut config = TestConfig::new(rules_from_yaml(&[GENEROUS]));
    config.store = Some(store.clone());
    config.settings.store_timeout = timeout;
    config.settings.failure_mode = FailureMode::Allow;
    let sluice = TestServer::start(config).await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = drive(&sluice, "d", "k", 4, tally.clone(), stop.clone());

    tokio::time::sleep(Duration::from_millis(500)).await;
    let (decided, by_failure_mode, errors, _) = tally.snapshot();
    assert!(
        decided > 0 && by_failure_mode == 0 && errors == 0,
        "healthy: {:?}",
        tally.snapshot()
    );

    // Down: kill Redis and listen on its port, counting connection attempts
    // (each is accepted and closed at once, as by a broken server).
    server.kill();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", server.port))
        .await
        .unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    let counter = {
        let attempts = attempts.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                attempts.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        })
    };
    tally.reset();
    let down_for = Duration::from_secs(3);
    tokio::time::sleep(down_for).await;
    let (decided, by_failure_mode, errors, slowest) = tally.snapshot();
    let attempts_seen = attempts.load(Ordering::SeqCst);
    counter.abort();
    let _ = counter.await;
    assert_eq!(errors, 0, "failure mode allow answers OK");
    assert!(
        by_failure_mode > 100,
        "calls kept being answered: {:?}",
        tally.snapshot()
    );
    assert!(
        decided <= 20,
        "only calls already under way when Redis died were decided: {decided}"
    );
    assert!(
        slowest <= timeout + MARGIN,
        "a call waited {slowest:?}, past the {timeout:?} store timeout"
    );
    assert!(store.breaker_open(), "the breaker opened");
    assert!(
        matches!(store.health(), StoreHealth::Down(_)),
        "{:?}",
        store.health()
    );
    eprintln!("Redis down {down_for:?}: {by_failure_mode} calls by the failure mode, {attempts_seen} connection attempts");
    // About one attempt per cool-down, plus the few failing calls before the
    // breaker opened; never one per call.
    let probes = (down_for.as_millis() / cooldown.as_millis()) as u64;
    assert!(
        attempts_seen <= probes + 10,
        "{attempts_seen} connection attempts in {down_for:?} for {by_failure_mode} calls: a reconnect storm"
    );

    // Back: decisions resume within a second of Redis answering.
    server.restart();
    let back = Instant::now();
    tally.reset();
    let resumed = eventually(Duration::from_secs(5), || {
        tally.decided.load(Ordering::SeqCst) > 0
    })
    .await
    .is_some();
    let took = back.elapsed();
    assert!(resumed, "decisions never resumed");
    assert!(
        took <= Duration::from_secs(1) + MARGIN,
        "decisions resumed {took:?} after Redis came back"
    );
    assert_eq!(store.health(), StoreHealth::Up);

    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
}

/// sluice starts while Redis is down, answers by the failure mode (deny:
/// UNAVAILABLE) at once, and decides as soon as Redis appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_redis_down() {
    let port = support::free_port();
    let timeout = Duration::from_millis(50);
    let store = Arc::new(
        RedisStore::new(
            &RedisTarget::Standalone(format!("redis://127.0.0.1:{port}")),
            options(50),
        )
        .unwrap(),
    );
    let mut config = TestConfig::new(rules_from_yaml(&[GENEROUS]));
    config.store = Some(store.clone());
    config.settings.store_timeout = timeout;
    config.settings.failure_mode = FailureMode::Deny;
    let sluice = TestServer::start(config).await;
    let mut client = sluice.client().await;

    for _ in 0..20 {
        let started = Instant::now();
        let status = client
            .should_rate_limit(request("d", &[&[("k", "v")]]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(started.elapsed() <= timeout + MARGIN);
    }
    let down = eventually(Duration::from_secs(3), || store.breaker_open())
        .await
        .is_some();
    assert!(
        down,
        "breaker open while Redis is down: {:?}",
        store.health()
    );

    // Redis appears on that port.
    let mut server = RedisServer::start();
    server.port = port;
    server.restart();
    let back = Instant::now();
    loop {
        if client
            .should_rate_limit(request("d", &[&[("k", "v")]]))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            back.elapsed() <= Duration::from_secs(1) + MARGIN,
            "no decision {:?} after Redis came up",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === TLS and AUTH ===

/// Waits for the start-up probe; then a counter call must succeed.
async fn decides(store: RedisStore) -> Result<(), String> {
    let connecting = StoreHealth::Down("connecting".into());
    let settled = eventually(Duration::from_secs(5), || store.health() != connecting)
        .await
        .is_some();
    assert!(settled, "the start-up probe never finished");
    if let StoreHealth::Down(why) = store.health() {
        return Err(why);
    }
    let out = store
        .apply(&[fixed_op("auth", 3, 60_000_000)])
        .await
        .map_err(|e| e.to_string())?;
    assert!(out[0].admitted);
    Ok(())
}

#[tokio::test]
async fn tls_with_a_password() {
    let server = RedisServer::start_with(RedisConfig {
        password: Some("s3cret-pw".into()),
        tls: true,
        ..RedisConfig::default()
    });
    let mut opts = options(1_000);
    opts.ca_cert = server.ca_pem.clone().map(String::into_bytes);
    assert!(server.url().starts_with("rediss://"));
    decides(RedisStore::new(&RedisTarget::Standalone(server.url()), opts.clone()).unwrap())
        .await
        .unwrap();

    // The password from --redis-password instead of the URL.
    opts.password = Some("s3cret-pw".into());
    decides(
        RedisStore::new(
            &RedisTarget::Standalone(server.url_without_auth()),
            opts.clone(),
        )
        .unwrap(),
    )
    .await
    .unwrap();

    // A certificate from a CA we do not trust is refused.
    let mut untrusted = opts.clone();
    untrusted.ca_cert = None;
    let err = decides(RedisStore::new(&RedisTarget::Standalone(server.url()), untrusted).unwrap())
        .await
        .unwrap_err();
    eprintln!("untrusted certificate: {err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // A wrong password is reported, and never printed.
    let mut wrong = opts.clone();
    wrong.password = Some("not-the-password".into());
    let store = RedisStore::new(&RedisTarget::Standalone(server.url()), wrong.clone()).unwrap();
    let err = decides(store).await.unwrap_err();
    eprintln!("wrong password: {err}");
    assert!(err.contains("AuthenticationFailed"), "{err}");
    assert!(
        !err.contains("not-the-password") && !err.contains("s3cret-pw"),
        "{err}"
    );
    assert!(!format!("{wrong:?}").contains("not-the-password"));
    let target = RedisTarget::Standalone(server.url());
    assert!(!format!("{target:?}").contains("s3cret-pw"), "{target:?}");
}

#[tokio::test]
async fn acl_user_and_password() {
    let server = RedisServer::start_with(RedisConfig {
        user: Some(("sluice".into(), "user-pw".into())),
        password: Some("default-pw".into()),
        ..RedisConfig::default()
    });
    assert!(server.url().starts_with("redis://sluice:user-pw@"));
    decides(RedisStore::new(&RedisTarget::Standalone(server.url()), options(1_000)).unwrap())
        .await
        .unwrap();
    let anonymous = RedisStore::new(
        &RedisTarget::Standalone(server.url_without_auth()),
        options(1_000),
    )
    .unwrap();
    let err = decides(anonymous).await.unwrap_err();
    assert!(err.contains("NOAUTH"), "no credentials, no counters: {err}");
}

// === From the command line ===

async fn store_status(
    sluice: &TestServer,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(sluice.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: sluice::app::STORE_HEALTH_SERVICE.into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .unwrap_or(tonic_health::pb::health_check_response::ServingStatus::Unknown)
}

/// `sluice serve --store redis://... --redis-password ...` decides with
/// Redis, and `/readyz` and gRPC health report the store's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_redis_from_the_command_line() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut server = RedisServer::start_with(RedisConfig {
        password: Some("from-the-flag".into()),
        ..RedisConfig::default()
    });
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("d.yaml"), GENEROUS).unwrap();
    let url = server.url_without_auth();
    let rules_path = rules.path().display().to_string();
    let cli = sluice::config::Cli::try_parse_from([
        "sluice",
        "serve",
        "--store",
        &url,
        "--redis-password",
        "from-the-flag",
        "--key-secret",
        "shared between instances",
        "--rules",
        &rules_path,
        "--breaker-cooldown",
        "200ms",
    ])
    .unwrap();
    let sluice::config::Command::Serve(args) = cli.command else {
        panic!("not serve");
    };
    args.validate().unwrap();
    assert!(!format!("{args:?}").contains("from-the-flag"));
    let deps = sluice::app::build(&args).await.unwrap();
    let sluice = TestServer::serve(deps).await;
    let store = sluice.deps.limiter.store().clone();
    assert_eq!(store.kind(), "redis");
    assert!(
        eventually(Duration::from_secs(5), || store.health() == StoreHealth::Up)
            .await
            .is_some()
    );

    let mut client = sluice.client().await;
    let r = client
        .should_rate_limit(request("d", &[&[("k", "v")]]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.statuses[0].current_limit.is_some(), "decided by Redis");
    assert_eq!(server.command_calls("evalsha"), 1);
    let ready = support::http::get(sluice.http_addr, "/readyz")
        .await
        .unwrap()
        .json();
    assert_eq!(
        (ready["store"].as_str(), ready["store_state"].as_str()),
        (Some("redis"), Some("up"))
    );
    let mut serving = false;
    for _ in 0..50 {
        serving = store_status(&sluice).await == ServingStatus::Serving;
        if serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serving, "gRPC health of the store");

    server.kill();
    for _ in 0..10 {
        // Calls fail until the breaker opens.
        let _ = client
            .should_rate_limit(request("d", &[&[("k", "v")]]))
            .await;
    }
    let mut down = false;
    for _ in 0..100 {
        down = store_status(&sluice).await == ServingStatus::NotServing;
        if down {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "gRPC health of the store while Redis is down");
    let ready = support::http::get(sluice.http_addr, "/readyz")
        .await
        .unwrap()
        .json();
    assert!(
        ready["store_state"].as_str().unwrap().starts_with("down"),
        "{ready}"
    );
    assert_eq!(
        ready["ready"], true,
        "still ready: it answers by the failure mode"
    );
}

// === TCP_NODELAY ===

/// Every socket sluice holds, accepted (gRPC, HTTP) and outgoing (Redis),
/// has TCP_NODELAY: without it, Nagle's algorithm holds a small write back
/// until the peer's delayed ACK, and with two calls in flight on one
/// connection one in a hundred took 40 ms (the Envoy filter's whole default
/// timeout is 20 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_socket_sluice_holds_has_tcp_nodelay() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let redis = RedisServer::start();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("d.yaml"), GENEROUS).unwrap();
    let rules_path = rules.path().display().to_string();
    let sluice = TestServer::from_cli(&[
        "--store",
        &redis.url(),
        "--key-secret",
        "nodelay test",
        "--rules",
        &rules_path,
    ])
    .await;
    let store = sluice.deps.limiter.store().clone();
    assert!(
        eventually(Duration::from_secs(5), || store.health() == StoreHealth::Up)
            .await
            .is_some()
    );

    // Two calls in flight on one gRPC connection, decided by Redis.
    let client = sluice.client().await;
    let (mut one, mut two) = (client.clone(), client);
    let (a, b) = tokio::join!(
        one.should_rate_limit(request("d", &[&[("k", "a")]])),
        two.should_rate_limit(request("d", &[&[("k", "b")]])),
    );
    assert!(a.unwrap().into_inner().statuses[0].current_limit.is_some());
    assert!(b.unwrap().into_inner().statuses[0].current_limit.is_some());
    // An HTTP/1.1 connection kept alive after its answer.
    let mut http = tokio::net::TcpStream::connect(sluice.http_addr)
        .await
        .unwrap();
    http.write_all(b"GET /healthz HTTP/1.1\r\nhost: sluice\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 64];
    let n = http.read(&mut answer).await.unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));

    let sockets = support::sockets::connected_tcp_sockets();
    let accepted_grpc: Vec<_> = sockets
        .iter()
        .filter(|s| s.local == sluice.grpc_addr)
        .collect();
    let accepted_http: Vec<_> = sockets
        .iter()
        .filter(|s| s.local == sluice.http_addr)
        .collect();
    let to_redis: Vec<_> = sockets
        .iter()
        .filter(|s| s.peer.port() == redis.port)
        .collect();
    for (what, found) in [
        ("accepted gRPC", &accepted_grpc),
        ("accepted HTTP", &accepted_http),
        ("Redis", &to_redis),
    ] {
        support::sockets::assert_nodelay(what, found, &sockets);
    }
}

// === Batching ===

/// Concurrent decisions bound for one Redis share script calls: 64 calls at
/// a time, 20 times over, cost far fewer than one `EVALSHA` each, and every
/// one is still decided exactly (the counter holds exactly the admitted hits,
/// and exactly the limit is admitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_share_script_calls() {
    let server = RedisServer::start();
    let store =
        Arc::new(RedisStore::new(&RedisTarget::Standalone(server.url()), options(2_000)).unwrap());
    up(&store).await;
    server.cli(&["CONFIG", "RESETSTAT"]);
    const AT_ONCE: usize = 64;
    const ROUNDS: usize = 20;
    // Below the hot counter's 640 calls.
    const LIMIT: u64 = 300;
    let mut admitted = 0;
    for round in 0..ROUNDS {
        let calls = (0..AT_ONCE).map(|i| {
            let store = store.clone();
            // Half the calls on one hot counter, half on counters of their own.
            let value = if i % 2 == 0 {
                "hot".to_owned()
            } else {
                format!("own-{round}-{i}")
            };
            async move { store.apply(&[fixed_op(&value, LIMIT, 3_600_000_000)]).await }
        });
        for (i, outcome) in futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            let outcome = outcome.unwrap();
            assert_eq!(outcome.len(), 1);
            if i % 2 == 0 {
                admitted += u64::from(outcome[0].admitted);
            } else {
                assert!(
                    outcome[0].admitted,
                    "round {round} call {i}: its own counter"
                );
            }
        }
    }
    let decisions = (AT_ONCE * ROUNDS) as u64;
    let evalsha = server.command_calls("evalsha");
    eprintln!(
        "MEASURED {decisions} decisions in {evalsha} EVALSHA calls ({:.3} per decision)",
        evalsha as f64 / decisions as f64
    );
    assert!(
        evalsha * 4 <= decisions,
        "{evalsha} EVALSHA calls for {decisions} concurrent decisions: not batched"
    );
    let hot = store
        .apply(&[CounterOp {
            hits: 0,
            ..fixed_op("hot", LIMIT, 3_600_000_000)
        }])
        .await
        .unwrap();
    assert_eq!(admitted, LIMIT, "exactly the limit admitted");
    assert_eq!(
        (hot[0].remaining, hot[0].used),
        (0, LIMIT),
        "the hot counter holds exactly the admitted hits"
    );
}
