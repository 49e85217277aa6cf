//! The event stream against a real RabbitMQ and PostgreSQL: sluice publishes
//! aggregated usage and violations, `sluice consume usage` (the real binary)
//! writes them, and the totals in PostgreSQL equal what the decisions made,
//! through a broker outage and a consumer killed with SIGKILL. Every event
//! seen on the broker validates against docs/events/*.schema.json and
//! carries no raw identifier.
//!
//! RabbitMQ must run on 127.0.0.1:5672 (guest/guest); each test uses its own
//! exchange and queue prefix. The tests that take the broker away
//! (`rabbitmqctl stop_app`) and the others hold one lock, so no test sees
//! another's outage.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sluice::proto::rls::rate_limit_response::Code;
use sqlx::PgPool;

use crate::support::postgres::PgCluster;
use crate::support::{self, repo, request, wait_until, ChildGuard, TestServer};

pub(crate) const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub(crate) const KEY_SECRET: &str = "events test secret";
pub(crate) static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Client = sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient<
    tonic::transport::Channel,
>;

// === Helpers ===

pub(crate) fn require_rabbitmq() {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 5672)).is_ok(),
        "RabbitMQ is not reachable on 127.0.0.1:5672 (guest/guest): start it with \
         `rabbitmq-server -detached`, or install it with `bash .ci/install-tools.sh` \
         (apt-get install rabbitmq-server)"
    );
}

/// Exchange and queue names of this test alone.
pub(crate) fn unique_prefix(test: &str) -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    format!("it-{test}-{:08x}.", u32::from_le_bytes(b))
}

pub(crate) fn sluice_cmd(pg: &PgCluster, args: &[&str]) -> String {
    pg.sluice_ok(KEY_SECRET, args)
}

fn rabbitmqctl(action: &str) {
    let out = Command::new("rabbitmqctl")
        .arg(action)
        .stdin(Stdio::null())
        .output()
        .expect("running rabbitmqctl (installed with rabbitmq-server)");
    assert!(
        out.status.success(),
        "rabbitmqctl {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Brings the broker back even when the test fails half-way.
struct BrokerStopped;

impl BrokerStopped {
    fn stop() -> BrokerStopped {
        rabbitmqctl("stop_app");
        BrokerStopped
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        rabbitmqctl("start_app");
    }
}

/// PostgreSQL with the schema and `rules` (YAML) applied.
pub(crate) fn database_with(rules: &str) -> PgCluster {
    let pg = PgCluster::start();
    sluice_cmd(&pg, &["migrate"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, rules).unwrap();
    sluice_cmd(&pg, &["rules", "apply", path.to_str().unwrap()]);
    pg
}

/// PostgreSQL with the schema, a domain metered by API key, and tenants
/// with one key each: (cluster, keys by tenant name).
fn database(tenants: &[&str]) -> (PgCluster, HashMap<String, String>) {
    let pg = database_with(
        "domain: metered\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 40, name: per_key}\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 3, name: per_user}\n",
    );
    let mut keys = HashMap::new();
    for t in tenants {
        sluice_cmd(&pg, &["tenants", "create", t, "--plan", "startup"]);
        let key = sluice_cmd(&pg, &["keys", "issue", "--tenant", t]);
        keys.insert((*t).to_owned(), key.trim().to_owned());
    }
    (pg, keys)
}

pub(crate) async fn serve(
    pg: &PgCluster,
    prefix: &str,
    spool: &Path,
    extra: &[&str],
) -> TestServer {
    let mut args = vec![
        "--rules",
        "postgres",
        "--database-url",
        &pg.primary_url,
        "--key-secret",
        KEY_SECRET,
        "--events-url",
        RABBIT,
        "--events-prefix",
        prefix,
        "--events-spool",
        spool.to_str().unwrap(),
        "--events-flush",
        "50ms",
        "--events-confirm-timeout",
        "2s",
        "--instance",
        "it-events",
    ];
    args.extend_from_slice(extra);
    TestServer::from_cli(&args).await
}

/// `sluice consume usage`, the real binary, killed on drop.
fn consumer(pg: &PgCluster, prefix: &str, prefetch: &str, log: &Path) -> ChildGuard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    ChildGuard::spawn(
        "sluice consume usage",
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["consume", "usage", "--prefetch", prefetch])
            .env("SLUICE_EVENTS_URL", RABBIT)
            .env("SLUICE_EVENTS_PREFIX", prefix)
            .env("SLUICE_DATABASE_URL", &pg.primary_url)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
}

/// Every message published to the test's exchanges, as raw bodies, read
/// through a queue of the test's own bound to each of them.
pub(crate) async fn tap(prefix: &str) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let connection = sluice::events::amqp::connect(RABBIT).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    sluice::events::amqp::declare(&channel, prefix, &[sluice::events::Group::Usage])
        .await
        .unwrap();
    let queue = format!("{prefix}tap");
    channel
        .queue_declare(
            &queue,
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for topic in sluice::events::Topic::ALL {
        channel
            .queue_bind(
                &queue,
                &sluice::events::amqp::exchange_name(prefix, topic),
                "#",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let mut consumer = channel
        .basic_consume(
            &queue,
            "tap",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        let _keep = connection;
        while let Some(Ok(delivery)) = consumer.next().await {
            seen.lock().unwrap().push(delivery.data.clone());
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
    });
    bodies
}

/// Allowed and denied requests per tenant name, and violation hits, in
/// PostgreSQL.
async fn totals(pool: &PgPool) -> (HashMap<String, (i64, i64)>, i64) {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT t.name, sum(allowed)::int8, sum(denied)::int8
         FROM usage_hourly u JOIN tenants t ON t.id = u.tenant_id
         WHERE u.domain = 'metered' GROUP BY t.name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let hits: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(hits), 0)::int8 FROM violations WHERE domain = 'metered'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    (
        rows.into_iter().map(|(t, a, d)| (t, (a, d))).collect(),
        hits,
    )
}

/// What the decisions produced, counted by the test as it makes them.
#[derive(Default)]
struct Made {
    usage: Mutex<HashMap<String, (i64, i64)>>,
    /// Denied descriptors: one violation hit each.
    hits: AtomicU64,
}

impl Made {
    fn snapshot(&self) -> (HashMap<String, (i64, i64)>, i64) {
        (
            self.usage.lock().unwrap().clone(),
            self.hits.load(Ordering::SeqCst) as i64,
        )
    }
}

/// One call for `tenant`: its API key and a user descriptor; records what
/// it produced. Returns the call's latency.
async fn call(client: &mut Client, made: &Made, tenant: &str, key: &str, user: &str) -> Duration {
    let started = Instant::now();
    let response = client
        .should_rate_limit(request(
            "metered",
            &[&[("api_key", key)], &[("user", user)]],
        ))
        .await
        .expect("should_rate_limit")
        .into_inner();
    let took = started.elapsed();
    let denied = response
        .statuses
        .iter()
        .filter(|s| s.code() == Code::OverLimit)
        .count() as u64;
    made.hits.fetch_add(denied, Ordering::SeqCst);
    let mut usage = made.usage.lock().unwrap();
    let sums = usage.entry(tenant.to_owned()).or_default();
    if response.overall_code() == Code::Ok {
        sums.0 += 1;
    } else {
        sums.1 += 1;
    }
    took
}

pub(crate) fn schemas() -> HashMap<String, jsonschema::Validator> {
    [
        "usage",
        "rate-limit-violations",
        "request-logs",
        "quota-alerts",
        "billing",
    ]
    .into_iter()
    .map(|name| {
        let path = repo().join(format!("docs/events/{name}.schema.json"));
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (name.to_owned(), validator)
    })
    .collect()
}

/// Every body validates against its type's schema and contains none of
/// `raw`; returns the count of events by type.
pub(crate) fn check_bodies(bodies: &[Vec<u8>], raw: &[&str]) -> HashMap<String, usize> {
    let schemas = schemas();
    let mut by_type = HashMap::new();
    for body in bodies {
        let text = String::from_utf8(body.clone()).expect("UTF-8 JSON");
        for r in raw {
            assert!(
                !text.contains(r),
                "raw identifier {r:?} in an event: {text}"
            );
        }
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let kind = value["type"].as_str().unwrap_or_default().to_owned();
        let schema = schemas
            .get(&kind)
            .unwrap_or_else(|| panic!("no schema for event type {kind:?}: {text}"));
        let errors: Vec<String> = schema.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{text}\ndoes not validate: {errors:?}");
        *by_type.entry(kind).or_insert(0) += 1;
    }
    by_type
}

async fn events_report(server: &TestServer) -> serde_json::Value {
    let response = support::http::get(server.http_addr, "/readyz")
        .await
        .expect("GET /readyz");
    response.json()["events"].clone()
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_validate_carry_no_raw_identifier_and_are_applied_once() {
    require_rabbitmq();
    let _broker = BROKER.lock().await;
    let (pg, keys) = database(&["initech", "hooli"]);
    let prefix = unique_prefix("schema");
    let bodies = tap(&prefix).await;
    let spool = tempfile::tempdir().unwrap();
    let server = serve(&pg, &prefix, spool.path(), &["--request-log-sample", "1"]).await;
    let mut client = server.client().await;
    let made = Made::default();
    let users = ["alice@example.com", "203.0.113.77"];
    for i in 0..30 {
        for (tenant, user) in [("initech", users[0]), ("hooli", users[1])] {
            if tenant == "hooli" && i >= 10 {
                continue;
            }
            call(&mut client, &made, tenant, &keys[tenant], user).await;
        }
    }
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("consumer.log");
    let _consumer = consumer(&pg, &prefix, "100", &log);
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let want = made.snapshot();
    let pool_ref = &pool;
    let want_ref = &want;
    let waited = wait_until(Duration::from_secs(30), || async move {
        totals(pool_ref).await == *want_ref
    })
    .await;
    assert!(
        waited.is_some(),
        "PostgreSQL holds {:?}, the decisions made {want:?}\n{}",
        totals(&pool).await,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(want.0["initech"], (3, 27), "3 per minute for one user");
    assert_eq!(want.1, 27 + 7);

    let report = events_report(&server).await;
    assert_eq!(report["broker"], "up", "{report}");
    assert_eq!(report["dropped"], 0, "{report}");

    // Every event the broker carried, each type seen, none with a raw value.
    let all = bodies.lock().unwrap().clone();
    let mut raw: Vec<&str> = keys.values().map(String::as_str).collect();
    raw.extend(users);
    let by_type = check_bodies(&all, &raw);
    assert_eq!(by_type.get("request-logs"), Some(&40), "{by_type:?}");
    assert!(by_type.get("usage").is_some_and(|&n| n >= 2), "{by_type:?}");
    assert!(
        by_type
            .get("rate-limit-violations")
            .is_some_and(|&n| n >= 1),
        "{by_type:?}"
    );
    let usage_events = by_type["usage"] + by_type["rate-limit-violations"];
    eprintln!(
        "MEASURED {usage_events} usage and violation events for 40 decisions ({} per 1000)",
        usage_events * 1000 / 40
    );

    // The same events again (a publisher retry): applied once.
    let connection = sluice::events::amqp::connect(RABBIT).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    for body in &all {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap();
        let topic = sluice::events::Topic::from_name(value["type"].as_str().unwrap()).unwrap();
        channel
            .basic_publish(
                &sluice::events::amqp::exchange_name(&prefix, topic),
                "-",
                lapin::options::BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    let drained = support::eventually(Duration::from_secs(20), || {
        queue_depth(&format!("{prefix}usage.usage")) == Some(0)
            && queue_depth(&format!("{prefix}rate-limit-violations.usage")) == Some(0)
    })
    .await;
    assert!(drained.is_some(), "the consumer read the duplicates");
    assert_eq!(totals(&pool).await, want, "duplicates changed nothing");
}

/// Messages ready in a queue, by `rabbitmqctl list_queues`.
pub(crate) fn queue_depth(queue: &str) -> Option<u64> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next()? == queue).then(|| parts.next()?.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_and_a_killed_consumer_lose_and_double_nothing() {
    require_rabbitmq();
    let _broker = BROKER.lock().await;
    let (pg, keys) = database(&["initech", "hooli"]);
    let prefix = unique_prefix("outage");
    let spool = tempfile::tempdir().unwrap();
    let server = serve(&pg, &prefix, spool.path(), &[]).await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("consumer.log");
    let mut consumer_process = Some(consumer(&pg, &prefix, "5", &log));

    // Steady load from two tenants until told to stop; latencies by phase.
    let made = Arc::new(Made::default());
    let phase = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(HashMap::<u64, Vec<Duration>>::new()));
    let load = {
        let (made, phase, stop, latencies) =
            (made.clone(), phase.clone(), stop.clone(), latencies.clone());
        let mut client = server.client().await;
        let keys = keys.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let tenant = if i % 3 == 0 { "hooli" } else { "initech" };
                let user = format!("user-{}", i % 7);
                let took = call(&mut client, &made, tenant, &keys[tenant], &user).await;
                latencies
                    .lock()
                    .unwrap()
                    .entry(phase.load(Ordering::SeqCst))
                    .or_default()
                    .push(took);
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    let outage = BrokerStopped::stop();
    phase.store(1, Ordering::SeqCst);
    let server_ref = &server;
    let spooled = wait_until(Duration::from_secs(10), || async move {
        let r = events_report(server_ref).await;
        r["broker"].as_str().is_some_and(|b| b.starts_with("down"))
            && r["spool_events"].as_u64() > Some(0)
    })
    .await;
    assert!(
        spooled.is_some(),
        "events spooled while the broker is down: {}",
        events_report(&server).await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(outage); // start_app
    phase.store(2, Ordering::SeqCst);
    let back = wait_until(Duration::from_secs(30), || async move {
        let r = events_report(server_ref).await;
        r["broker"] == "up" && r["spool_events"] == 0
    })
    .await;
    assert!(
        back.is_some(),
        "the spool drains once the broker is back: {}",
        events_report(&server).await
    );
    eprintln!("MEASURED spool drained {back:?} after the broker came back");

    // The consumer killed mid-batch (prefetch 5, a backlog from the
    // outage just published), then started again.
    if let Some(mut process) = consumer_process.take() {
        process.child.kill().unwrap(); // SIGKILL
        process.child.wait().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer_process = Some(consumer(&pg, &prefix, "5", &log));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let want = made.snapshot();
    let (pool_ref, want_ref) = (&pool, &want);
    let waited = wait_until(Duration::from_secs(60), || async move {
        totals(pool_ref).await == *want_ref
    })
    .await;
    let report = events_report(&server).await;
    assert!(
        waited.is_some(),
        "PostgreSQL holds {:?}, the decisions made {want:?}; {report}\n{}",
        totals(&pool).await,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(report["retried"].as_u64() > Some(0), "{report}");
    assert_eq!(report["dropped"], 0, "{report}");
    // Still exact a moment later: nothing doubled by a late redelivery.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(totals(&pool).await, want);
    let decisions: i64 = want.0.values().map(|(a, d)| a + d).sum();
    let latencies = latencies.lock().unwrap();
    for (phase, name) in [(0, "broker up"), (1, "broker down"), (2, "broker back")] {
        if let Some(l) = latencies.get(&phase) {
            let mut l = l.clone();
            l.sort();
            eprintln!(
                "MEASURED {name}: {} decisions, p50 {:?}, p99 {:?}",
                l.len(),
                l[l.len() / 2],
                l[l.len() * 99 / 100]
            );
        }
    }
    eprintln!("MEASURED {decisions} decisions in all; totals exact");
    drop(consumer_process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_counts_and_sluice_keeps_deciding() {
    // No broker at all (a closed port): the spool fills and then drops.
    let spool = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("r.yaml"),
        "domain: spooled\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 1}\n",
    )
    .unwrap();
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", support::free_port());
    let server = TestServer::from_cli(&[
        "--rules",
        rules.path().to_str().unwrap(),
        "--events-url",
        &closed,
        "--events-spool",
        spool.path().to_str().unwrap(),
        "--events-spool-max-bytes",
        "2000",
        "--events-flush",
        "20ms",
    ])
    .await;
    let mut client = server.client().await;
    let mut over = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dropped = None;
    for i in 0.. {
        let user = format!("u{}", i % 50);
        for _ in 0..2 {
            let r = client
                .should_rate_limit(request("spooled", &[&[("user", &user)]]))
                .await
                .expect("sluice keeps deciding");
            if r.into_inner().overall_code() == Code::OverLimit {
                over += 1;
            }
        }
        if events_report(&server).await["dropped"].as_u64() > Some(0) {
            dropped = Some(i);
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = events_report(&server).await;
    assert!(dropped.is_some(), "nothing dropped: {report}");
    assert!(report["spool_bytes"].as_u64() <= Some(2000), "{report}");
    assert!(
        report["broker"].as_str().unwrap().starts_with("down"),
        "{report}"
    );
    assert!(over > 0, "decisions went on, over-limit ones too");
    let metrics = support::http::get(server.http_addr, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_events_dropped_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Still deciding after the drops.
    let r = client
        .should_rate_limit(request("spooled", &[&[("user", "fresh")]]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().overall_code(), Code::Ok);
}
