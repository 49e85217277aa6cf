//! Billing cycles, quota alerts, webhooks and invoices against a real
//! RabbitMQ and PostgreSQL, through the real `sluice` binary: two alerts
//! consumers deliver each threshold once, signed, retrying a receiver that
//! fails; two billing consumers close a cycle into one invoice; and a
//! request at the last second of a month and one at the first second of
//! the next count in the cycles the usage report shows, in a tenant's zone
//! half an hour off UTC.

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Datelike as _, TimeZone as _, Utc};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use sluice::proto::rls::rate_limit_response::Code;
use sqlx::PgPool;

use crate::events::{
    check_bodies, database_with, require_rabbitmq, serve, sluice_cmd, tap, unique_prefix, BROKER,
    KEY_SECRET, RABBIT,
};
use crate::support::postgres::PgCluster;
use crate::support::{eventually, request, ChildGuard};

/// One POST a receiver got.
#[derive(Clone, Debug)]
struct Received {
    event_id: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

/// A webhook receiver on a free port: records every POST and answers 500
/// to the first `fail_first`, 200 after.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

async fn receiver(fail_first: usize) -> Receiver {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let record = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let record = record.clone();
            let seen = seen.clone();
            async move {
                let status = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                };
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                record.lock().unwrap().push(Received {
                    event_id: header("sluice-event-id"),
                    signature: header("sluice-signature"),
                    body: body.to_vec(),
                    answered: status.as_u16(),
                });
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver {
        url: format!("http://{addr}/hook"),
        got,
    }
}

/// Checks a `t=...,v1=...` signature by the documented recipe, computed
/// here: HMAC-SHA256 over "<t>.<body>" with the webhook's secret.
fn signature_ok(secret: &str, header: &str, body: &[u8]) -> bool {
    let parts: HashMap<&str, &str> = header
        .split(',')
        .filter_map(|p| p.split_once('='))
        .collect();
    let (Some(t), Some(v1)) = (parts.get("t"), parts.get("v1")) else {
        return false;
    };
    let fresh = t
        .parse::<i64>()
        .is_ok_and(|t| (Utc::now().timestamp() - t).abs() < 300);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    fresh && hex::encode(mac.finalize().into_bytes()) == *v1
}

/// `sluice consume KIND ...`, the real binary, killed on drop.
fn consume(pg: &PgCluster, prefix: &str, kind: &str, args: &[&str], name: &str) -> ChildGuard {
    ChildGuard::spawn(
        "sluice consume",
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["consume", kind])
            .args(args)
            .env("SLUICE_EVENTS_URL", RABBIT)
            .env("SLUICE_EVENTS_PREFIX", prefix)
            .env("SLUICE_DATABASE_URL", &pg.primary_url)
            .env("SLUICE_INSTANCE", name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
}

/// PostgreSQL with the schema and a domain whose only rule is generous:
/// the tenants' monthly quotas are what denies.
fn database() -> PgCluster {
    database_with(
        "domain: metered\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 10000}\n",
    )
}

fn tenant_with_key(pg: &PgCluster, name: &str, plan: &str, zone: &str) -> String {
    sluice_cmd(
        pg,
        &[
            "tenants",
            "create",
            name,
            "--plan",
            plan,
            "--time-zone",
            zone,
        ],
    );
    sluice_cmd(pg, &["keys", "issue", "--tenant", name])
        .trim()
        .to_owned()
}

/// `sluice webhooks add`: (id, secret) from what it prints.
fn add_webhook(pg: &PgCluster, tenant: &str, url: &str) -> String {
    let out = sluice_cmd(pg, &["webhooks", "add", "--tenant", tenant, "--url", url]);
    out.lines()
        .find_map(|l| l.strip_prefix("signing secret (shown once): "))
        .unwrap_or_else(|| panic!("no secret in {out:?}"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_alert_consumers_deliver_each_threshold_once_signed_retrying_a_failing_receiver() {
    require_rabbitmq();
    let _broker = BROKER.lock().await;
    let pg = database();
    sluice_cmd(&pg, &["plans", "set", "tiny", "--monthly-quota", "20"]);
    let acme_key = tenant_with_key(&pg, "acme", "tiny", "UTC");
    let globex_key = tenant_with_key(&pg, "globex", "tiny", "America/New_York");
    let acme_rx = receiver(0).await;
    let globex_rx = receiver(2).await;
    let acme_secret = add_webhook(&pg, "acme", &acme_rx.url);
    let globex_secret = add_webhook(&pg, "globex", &globex_rx.url);

    let prefix = unique_prefix("alerts");
    let bodies = tap(&prefix).await;
    let spool = tempfile::tempdir().unwrap();
    // The alerts group's queue exists before the first event, whenever its
    // consumers get to start.
    let server = serve(&pg, &prefix, spool.path(), &["--events-groups", "alerts"]).await;
    let backoff = [
        "--webhook-backoff",
        "100ms",
        "--webhook-max-backoff",
        "300ms",
    ];
    let _one = consume(&pg, &prefix, "alerts", &backoff, "alerts-1");
    let _two = consume(&pg, &prefix, "alerts", &backoff, "alerts-2");

    // acme: 25 calls on a quota of 20 (80, 90 and 100 % crossed; 5
    // denied); globex: 18 (80 and 90 % crossed).
    let mut client = server.client().await;
    let mut denied = HashMap::<&str, usize>::new();
    for (tenant, key, calls) in [("acme", &acme_key, 25), ("globex", &globex_key, 18)] {
        for _ in 0..calls {
            let r = client
                .should_rate_limit(request("metered", &[&[("api_key", key)]]))
                .await
                .unwrap()
                .into_inner();
            *denied.entry(tenant).or_default() += usize::from(r.overall_code() == Code::OverLimit);
        }
    }
    assert_eq!(denied["acme"], 5, "the quota of 20 denies the last 5");
    assert_eq!(denied["globex"], 0);

    let delivered = |rx: &Receiver| {
        rx.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.answered == 200)
            .count()
    };
    let waited = eventually(Duration::from_secs(40), || {
        delivered(&acme_rx) >= 3 && delivered(&globex_rx) >= 2
    })
    .await;
    assert!(
        waited.is_some(),
        "deliveries: acme {:?}, globex {:?}",
        acme_rx.got.lock().unwrap(),
        globex_rx.got.lock().unwrap()
    );
    // Time for a duplicate to show up, if any would.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let thresholds = |rx: &Receiver, secret: &str| -> BTreeSet<u64> {
        let got = rx.got.lock().unwrap();
        let ok: Vec<&Received> = got.iter().filter(|r| r.answered == 200).collect();
        let ids: BTreeSet<&str> = ok.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids.len(), ok.len(), "an event delivered twice: {ok:?}");
        for r in got.iter() {
            assert!(
                signature_ok(secret, &r.signature, &r.body),
                "bad signature {:?} on {}",
                r.signature,
                String::from_utf8_lossy(&r.body)
            );
        }
        ok.iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(v["type"], "quota-alerts");
                assert_eq!(v["id"], r.event_id.as_str());
                assert_eq!(v["data"]["quota"], 20);
                v["data"]["threshold"].as_u64().unwrap()
            })
            .collect()
    };
    assert_eq!(
        thresholds(&acme_rx, &acme_secret),
        BTreeSet::from([80, 90, 100])
    );
    assert_eq!(
        thresholds(&globex_rx, &globex_secret),
        BTreeSet::from([80, 90])
    );
    assert_eq!(
        acme_rx.got.lock().unwrap().len(),
        3,
        "acme never failed: no retry"
    );
    let globex_got: Vec<u16> = globex_rx
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.answered)
        .collect();
    assert_eq!(
        globex_got.len(),
        4,
        "2 failed attempts, then the 2 alerts: {globex_got:?}"
    );

    // The delivery log: every attempt with its status code.
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let attempts: Vec<(String, Option<i32>)> = sqlx::query_as(
        "SELECT t.name, a.status_code FROM webhook_attempts a
         JOIN webhook_deliveries d ON d.id = a.delivery_id
         JOIN webhooks w ON w.id = d.webhook_id JOIN tenants t ON t.id = w.tenant_id
         ORDER BY a.at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let codes = |tenant: &str| -> Vec<Option<i32>> {
        let mut c: Vec<_> = attempts
            .iter()
            .filter(|(t, _)| t == tenant)
            .map(|(_, s)| *s)
            .collect();
        c.sort();
        c
    };
    assert_eq!(codes("acme"), vec![Some(200); 3]);
    assert_eq!(
        codes("globex"),
        vec![Some(200), Some(200), Some(500), Some(500)]
    );
    let listed = sluice_cmd(&pg, &["webhooks", "list", "--tenant", "globex"]);
    assert!(
        listed.lines().nth(1).is_some_and(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1) == Some(&"2") && cols.get(3) == Some(&"0") && cols.get(4) == Some(&"200")
        }),
        "{listed}"
    );
    assert!(!listed.contains("whsec_"), "a secret listed: {listed}");

    // One quota-alerts event per alert on the broker, each valid.
    let waited = eventually(Duration::from_secs(10), || {
        let b = bodies.lock().unwrap();
        let by_type = check_bodies(&b, &[&acme_key, &globex_key]);
        by_type.get("quota-alerts").copied().unwrap_or(0) >= 5
    })
    .await;
    assert!(waited.is_some(), "quota-alerts events not published");
    let b = bodies.lock().unwrap().clone();
    let alerts: Vec<serde_json::Value> = b
        .iter()
        .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap())
        .filter(|v| v["type"] == "quota-alerts")
        .collect();
    let distinct: BTreeSet<(String, u64)> = alerts
        .iter()
        .map(|v| {
            (
                v["data"]["tenant_id"].as_str().unwrap().to_owned(),
                v["data"]["threshold"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(distinct.len(), 5, "{alerts:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_alerts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_billing_consumers_close_a_cycle_into_one_invoice() {
    use sluice::events::{Event, EventSink as _, Group, Record, Topic, UsageData};

    require_rabbitmq();
    let _broker = BROKER.lock().await;
    let pg = database();
    sluice_cmd(
        &pg,
        &[
            "plans",
            "set",
            "metered",
            "--monthly-quota",
            "100",
            "--price-cents",
            "4900",
            "--overage-cents-per-1000",
            "50",
        ],
    );
    tenant_with_key(&pg, "initech", "metered", "Europe/Berlin");
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let tenant_id: String =
        sqlx::query_scalar("SELECT id::text FROM tenants WHERE name = 'initech'")
            .fetch_one(&pool)
            .await
            .unwrap();

    let prefix = unique_prefix("billing");
    let bodies = tap(&prefix).await;
    // The billing group's queue, as its consumer declares it, before any
    // event is published.
    let connection = sluice::events::amqp::connect(RABBIT).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    sluice::events::amqp::declare(&channel, &prefix, &[Group::Billing])
        .await
        .unwrap();

    // Usage 40 days ago (a closed cycle in Berlin) and now (open).
    let berlin = chrono_tz::Europe::Berlin;
    let then = Utc::now() - chrono::Duration::days(40);
    let minute = |t: DateTime<Utc>| Utc.timestamp_opt(t.timestamp() / 60 * 60, 0).unwrap();
    let usage = |at: DateTime<Utc>, allowed: u64| {
        Event::new(
            Topic::Usage,
            "it-billing",
            Utc::now(),
            UsageData {
                tenant_id: tenant_id.clone(),
                domain: "metered".into(),
                minute: minute(at),
                allowed,
                denied: 0,
            },
        )
    };
    let first = usage(then, 70);
    let records = vec![
        Record::of(&first, Some(&tenant_id)),
        Record::of(
            &usage(then + chrono::Duration::hours(1), 60),
            Some(&tenant_id),
        ),
        // A redelivery of the first: counted once.
        Record::of(&first, Some(&tenant_id)),
        Record::of(&usage(Utc::now(), 5), Some(&tenant_id)),
    ];
    let mut sink =
        sluice::events::amqp::AmqpSink::new(RABBIT, &prefix, Duration::from_secs(5), &[]);
    sink.publish(&records).await.unwrap();

    let args = ["--grace", "0s", "--close-every", "200ms"];
    let _one = consume(&pg, &prefix, "billing", &args, "billing-1");
    let _two = consume(&pg, &prefix, "billing", &args, "billing-2");

    let closed = then.with_timezone(&berlin);
    let cycle = format!("{}-{:02}", closed.year(), closed.month());
    let invoice = || async {
        let b = sluice_cmd(&pg, &["billing", "--tenant", "initech", "--cycle", &cycle]);
        (!b.contains("open")).then_some(b)
    };
    let mut printed = None;
    for _ in 0..100 {
        if let Some(b) = invoice().await {
            printed = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let printed = printed.expect("the closed cycle is invoiced within 20 s");
    // 130 requests on a quota of 100: 30 over at 0.50 per 1 000 is 1.5
    // cents, rounded up once to 2; with the plan's 49.00, 49.02.
    let line = |kind: &str| -> Vec<String> {
        printed
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} line in {printed}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        line("subscription")[1..4],
        ["1", "49.00", "49.00"],
        "{printed}"
    );
    assert_eq!(line("included")[1], "100", "{printed}");
    assert_eq!(line("overage")[1..4], ["30", "0.50", "0.02"], "{printed}");
    assert_eq!(line("total")[1], "49.02", "{printed}");
    assert!(printed.contains("130 requests"), "{printed}");

    let now = Utc::now().with_timezone(&berlin);
    let open_cycle = format!("{}-{:02}", now.year(), now.month());
    let open = sluice_cmd(
        &pg,
        &["billing", "--tenant", "initech", "--cycle", &open_cycle],
    );
    assert!(
        open.contains("open") && open.contains("5 requests"),
        "{open}"
    );

    tokio::time::sleep(Duration::from_millis(600)).await;
    let invoices: i64 = sqlx::query_scalar("SELECT count(*) FROM invoices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(invoices, 1, "two consumers, one invoice");
    let waited = eventually(Duration::from_secs(10), || {
        let b = bodies.lock().unwrap();
        check_bodies(&b, &[]).get("billing").copied().unwrap_or(0) >= 1
    })
    .await;
    assert!(waited.is_some(), "no billing event published");
    let b = bodies.lock().unwrap().clone();
    let billing: Vec<serde_json::Value> = b
        .iter()
        .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap())
        .filter(|v| v["type"] == "billing")
        .collect();
    assert_eq!(billing.len(), 1, "{billing:?}");
    assert_eq!(billing[0]["data"]["total_cents"], 4902);
    assert_eq!(billing[0]["data"]["cycle"], cycle.as_str());
}

/// The last second of November and the first of December in Asia/Kolkata
/// (UTC+5:30, so the month turns at 18:30 UTC, inside an hour): the
/// tenant's monthly quota and `sluice usage` put each request in the same
/// cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_enforcement_and_the_usage_report_agree_on_the_cycle_at_its_boundary() {
    use sluice::clock::{Clock, ManualClock};
    use sluice::limiter::Code::{Ok as Allowed, OverLimit};
    use sluice::limiter::Descriptor;
    use sluice::service::{ApiKeyPolicy, RateLimiter, UnknownKey};
    use sluice::storage::memory::MemoryStore;
    use sluice::usage::UsageRecorder;

    let pg = database();
    sluice_cmd(&pg, &["plans", "set", "pair", "--monthly-quota", "2"]);
    let key = tenant_with_key(&pg, "kolkata", "pair", "Asia/Kolkata");
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let rules = sluice::rules::postgres::load_catalog(&pool)
        .await
        .unwrap()
        .compile()
        .unwrap();

    let last_second = Utc.with_ymd_and_hms(2026, 11, 30, 18, 29, 59).unwrap();
    let clock = Arc::new(ManualClock::new(last_second.timestamp_micros() as u64));
    let settings = crate::support::TestConfig::new(Default::default()).settings;
    let (recorder, writer) = UsageRecorder::new(pool.clone(), Duration::from_millis(50), 1_000);
    let writer = tokio::spawn(writer);
    let limiter = RateLimiter::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(rules)),
        Arc::new(MemoryStore::new(1_000, clock.clone() as Arc<dyn Clock>)),
        sluice::limiter::KeyHasher::from_secret(KEY_SECRET.as_bytes()),
        settings,
        clock.clone() as Arc<dyn Clock>,
    )
    .with_api_keys(ApiKeyPolicy {
        descriptor: "api_key".into(),
        unknown: UnknownKey::Deny,
    })
    .with_usage(recorder.clone());

    let mut codes = Vec::new();
    for second in [0, 0, 0, 1, 1, 1] {
        clock.set((last_second.timestamp() + second) as u64 * 1_000_000);
        let request = sluice::limiter::Request {
            domain: "metered",
            descriptors: vec![Descriptor::new([("api_key", key.as_str())], None, None)],
            hits: 1,
        };
        codes.push(limiter.should_rate_limit(&request).await.unwrap().overall);
    }
    assert_eq!(
        codes,
        [Allowed, Allowed, OverLimit, Allowed, Allowed, OverLimit],
        "two per cycle, the cycle turning at 18:30 UTC"
    );
    assert!(recorder.close(Duration::from_secs(10)).await);
    writer.await.unwrap();

    let report = |month: &str| {
        let out = sluice_cmd(&pg, &["usage", "--tenant", "kolkata", "--month", month]);
        let total: Vec<String> = out
            .lines()
            .find(|l| l.starts_with("total"))
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (total[1].clone(), total[2].clone())
    };
    assert_eq!(report("2026-11"), ("2".into(), "1".into()));
    assert_eq!(report("2026-12"), ("2".into(), "1".into()));
}
