//! sluice against a real Redis Sentinel group (a master, two replicas,
//! three sentinels, started here): the master is found through the
//! sentinels, and when it is killed under load sluice keeps answering within
//! the store timeout, follows `+switch-master` to the promoted replica
//! without a restart, and decides exactly again.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::proto::rls::rate_limit_response::Code;
use sluice::service::FailureMode;
use sluice::storage::redis::{RedisOptions, RedisStore, RedisTarget};
use sluice::storage::{CounterStore, StoreHealth};
use support::redis::{drive, RedisSentinels, Tally, SENTINEL_MASTER};
use support::{eventually, request, rules_from_yaml, wait_until, TestConfig, TestServer};

/// Slack for a busy two-core machine on top of a promised deadline.
const MARGIN: Duration = Duration::from_millis(250);

const RULES: &str = r#"
domain: sentinel
descriptors:
  - key: load
    rate_limit: {unit: hour, requests_per_unit: 1000000}
  - key: exact
    rate_limit: {unit: hour, requests_per_unit: 3, algorithm: fixed_window}
"#;

fn sentinel_target(group: &RedisSentinels) -> RedisTarget {
    sentinel_target_from(&group.url())
}

/// The URL as `--store` parses it.
fn parse_store(url: &str) -> sluice::config::StoreUrl {
    use clap::Parser as _;
    let cli = sluice::config::Cli::try_parse_from(["sluice", "serve", "--store", url])
        .expect("--store parses");
    let sluice::config::Command::Serve(args) = cli.command else {
        panic!("not serve");
    };
    args.store
}

/// Four calls for a fresh key with a limit of 3: exactly 3 admitted, all
/// decided (none by the failure mode).
async fn exact(sluice: &TestServer, tag: &str) {
    let mut client = sluice.client().await;
    for i in 0..10 {
        let value = format!("{tag}-{i}-{}", std::process::id());
        let mut ok = 0;
        for _ in 0..4 {
            let r = client
                .should_rate_limit(request("sentinel", &[&[("exact", &value)]]))
                .await
                .unwrap()
                .into_inner();
            assert!(
                r.statuses[0].current_limit.is_some(),
                "{tag}: decided, not by the failure mode"
            );
            ok += usize::from(r.overall_code == Code::Ok as i32);
        }
        assert_eq!(ok, 3, "{tag}: key {i} has a limit of 3");
    }
}

/// SIGKILL the master under load. No call waits past the store timeout;
/// calls are answered by the failure mode until the sentinels promote a
/// replica; sluice follows the switch and decides exactly again, without a
/// restart. Prints the times BENCHMARKS.md records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_under_load_is_followed() {
    // Sentinels' timing (failover, and the old master's conversion within
    // 30 s) is what this test checks: not beside the chaos soak, which
    // made a CI run miss the conversion.
    let _machine = crate::support::MACHINE.lock().await;
    let mut group = RedisSentinels::start();
    let first_master = group.master().expect("the sentinels name a master");
    assert_eq!(first_master, group.ports[0]);

    // Not the 50 ms default: on a busy two-core machine a few healthy calls
    // exceed 50 ms, and the healthy phases must see none answered by the
    // failure mode. The bound under test is the same at any value.
    let timeout = Duration::from_millis(200);
    let store = Arc::new(
        RedisStore::new(&sentinel_target(&group), RedisOptions::new(timeout))
            .expect("a valid sentinel target"),
    );
    assert_eq!(store.kind(), "redis-sentinel");
    let up = eventually(Duration::from_secs(10), || {
        store.health() == StoreHealth::Up
    })
    .await;
    assert!(
        up.is_some(),
        "the master was never found: {:?}",
        store.health()
    );
    let mut config = TestConfig::new(rules_from_yaml(&[RULES]));
    config.store = Some(store.clone());
    config.settings.store_timeout = timeout;
    config.settings.failure_mode = FailureMode::Allow;
    let sluice = TestServer::start(config).await;
    exact(&sluice, "before").await;
    assert!(
        group
            .cli(first_master, &["DBSIZE"])
            .trim()
            .parse::<u64>()
            .unwrap()
            > 0,
        "the counters are on the master the sentinels named"
    );

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = drive(&sluice, "sentinel", "load", 4, tally.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (decided, by_failure_mode, errors, _) = tally.snapshot();
    assert!(
        decided > 0 && by_failure_mode == 0 && errors == 0,
        "healthy: {:?}",
        tally.snapshot()
    );

    // Kill the master. Once calls fail, the ones in flight before the kill
    // are answered: from then on a decision is one made after the kill.
    tally.reset();
    let killed = Instant::now();
    group.kill(first_master);
    let failing = wait_until(Duration::from_secs(5), || async {
        tally.by_failure_mode.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(
        failing.is_some(),
        "calls kept succeeding with the master dead"
    );
    tally.decided.store(0, Ordering::SeqCst);
    let promoted = wait_until(Duration::from_secs(30), || async {
        group.master().is_some_and(|m| m != first_master)
    })
    .await;
    let Some(promoted) = promoted else {
        panic!(
            "no replica was promoted within 30 s:\n{}",
            group.sentinel_log(group.sentinel_ports[0])
        );
    };
    let new_master = group.master().unwrap();
    // The first decision after the kill: sluice is right again.
    let resumed = wait_until(Duration::from_secs(10), || async {
        tally.decided.load(Ordering::SeqCst) > 0
    })
    .await
    .map(|_| killed.elapsed());
    let (decided, by_failure_mode, errors, slowest) = tally.snapshot();
    let promoted = promoted + failing.unwrap();
    eprintln!(
        "sentinel failover: calls failing {failing:?} after the kill, replica \
         127.0.0.1:{new_master} promoted {promoted:?} after it, decisions right again \
         {resumed:?} after it; {decided} decided, {by_failure_mode} by the failure mode, \
         slowest call {slowest:?}"
    );
    let resumed = resumed.expect("decisions resumed within 10 s of the promotion");
    assert_eq!(errors, 0, "failure mode allow answers OK");
    assert!(
        by_failure_mode > 0,
        "while no master answered, calls were answered by the failure mode"
    );
    assert!(
        slowest <= timeout + MARGIN,
        "a call waited {slowest:?} during the failover"
    );
    assert!(
        resumed <= promoted + Duration::from_secs(2),
        "decisions resumed {resumed:?} after the kill, the promotion was at {promoted:?}"
    );

    // Right again, on the new master.
    let up = eventually(Duration::from_secs(5), || store.health() == StoreHealth::Up).await;
    assert!(up.is_some(), "store still {:?}", store.health());
    tally.reset();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (decided, by_failure_mode, errors, slowest) = tally.snapshot();
    assert!(
        decided > 0 && by_failure_mode == 0 && errors == 0,
        "after the failover: {:?}\n{}",
        tally.snapshot(),
        sluice::telemetry::prometheus()
            .render()
            .lines()
            .filter(|l| l.contains("store_errors")
                || l.contains("breaker")
                || l.contains("master_changes")
                || l.contains("failure_mode"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(slowest <= timeout + MARGIN, "a call waited {slowest:?}");
    exact(&sluice, "after").await;
    assert_eq!(store.health(), StoreHealth::Up);

    // The old master comes back, empty: the sentinels make it a replica of
    // the new one, and nothing changes for callers. How soon is Redis'
    // doing: a sentinel asks a replica for INFO every 10 s and converts
    // one that reports the wrong role for 8 s, so 20 s is usual; a loaded
    // CI machine has taken over 30 s.
    tally.reset();
    group.restart(first_master);
    let demoted = wait_until(Duration::from_secs(60), || async {
        group
            .cli(first_master, &["INFO", "replication"])
            .contains(&format!("master_port:{new_master}"))
    })
    .await;
    assert!(
        demoted.is_some(),
        "the old master was not made a replica of {new_master}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (decided, by_failure_mode, errors, slowest) = tally.snapshot();
    assert!(
        decided > 0 && by_failure_mode == 0 && errors == 0,
        "while the old master rejoined: {:?}",
        tally.snapshot()
    );
    assert!(slowest <= timeout + MARGIN, "a call waited {slowest:?}");
    exact(&sluice, "rejoined").await;

    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
}

/// `sluice serve --store redis+sentinel://...` as the command line gives
/// it: the master found, its password used, the sentinels (which have
/// none) asked without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_finds_the_master_through_the_sentinels() {
    let group = RedisSentinels::start();
    let sluice = TestServer::from_cli(&[
        "--store",
        &group.url(),
        "--key-secret",
        "sentinel test",
        "--rules",
        &support::path_str(&support::repo().join("examples/rules")),
    ])
    .await;
    let store = sluice.deps.limiter.store().clone();
    assert_eq!(store.kind(), "redis-sentinel");
    let up = eventually(Duration::from_secs(10), || {
        store.health() == StoreHealth::Up
    })
    .await;
    assert!(up.is_some(), "store: {:?}", store.health());
    let mut client = sluice.client().await;
    let r = client
        .should_rate_limit(request(
            "weather",
            &[&[("client_id", &format!("sentinel-{}", std::process::id()))]],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.statuses[0].current_limit.is_some(), "decided: {r:?}");
    let master = group.master().unwrap();
    assert!(
        group.cli(master, &["DBSIZE"]).trim() != "0",
        "the counter is on the master {master}"
    );
    // A wrong master name is a store that stays down, and says why.
    let url = group.url().replace(SENTINEL_MASTER, "nosuchmaster");
    let wrong = Arc::new(
        RedisStore::new(
            &sentinel_target_from(&url),
            RedisOptions::new(Duration::from_millis(100)),
        )
        .unwrap(),
    );
    let said = eventually(Duration::from_secs(10), || {
        matches!(wrong.health(), StoreHealth::Down(why) if why.contains("monitors no master named 'nosuchmaster'"))
    })
    .await;
    assert!(said.is_some(), "health: {:?}", wrong.health());
    sluice.stop().await.unwrap();
}

fn sentinel_target_from(url: &str) -> RedisTarget {
    let sluice::config::StoreUrl::Sentinel {
        sentinels, master, ..
    } = parse_store(url)
    else {
        panic!("not a sentinel URL: {url}");
    };
    RedisTarget::Sentinel { sentinels, master }
}
