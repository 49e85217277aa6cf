//! Rules, tenants and API keys in PostgreSQL, against a real primary with a
//! streaming replica (started per test by `.ci/postgres-replica.sh`): the
//! schema, `rules apply`/`export`, live reload on two instances, API keys,
//! an outage, start-up from the snapshot, and usage records.
//!
//! Servers are built by the real `app::build` from `sluice serve` flags;
//! admin commands run the real `sluice` binary.

use crate::support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use clap::Parser as _;
use sluice::config::{Cli, Command as SluiceCommand};
use sluice::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::RateLimitRequest;
use sqlx::PgPool;
use support::postgres::PgCluster;
use support::{repo, request, wait_until, TestServer};

/// What the feature promises: a change in force within a second.
const PROMISED: Duration = Duration::from_secs(1);
/// What the tests wait for it, on a 2-core machine busy compiling; the
/// measured time is printed (`--nocapture`).
const DEADLINE: Duration = Duration::from_secs(3);
const KEY_SECRET: &str = "postgres test secret";

// === Helpers ===

fn sluice(pg: &PgCluster, args: &[&str]) -> Output {
    pg.sluice(KEY_SECRET, args)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
fn ok(pg: &PgCluster, args: &[&str]) -> String {
    pg.sluice_ok(KEY_SECRET, args)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn start_cluster() -> PgCluster {
    let pg = PgCluster::start();
    ok(&pg, &["migrate"]);
    pg
}

/// `sluice serve --rules postgres ...` on free ports, built by `app::build`.
async fn serve(pg: &PgCluster, extra: &[&str]) -> TestServer {
    let mut args = vec![
        "--rules",
        "postgres",
        "--database-url",
        &pg.primary_url,
        "--database-replica-url",
        &pg.replica_url,
        "--key-secret",
        KEY_SECRET,
        "--database-timeout",
        "1s",
    ];
    args.extend_from_slice(extra);
    TestServer::from_cli(&args).await
}

type Client = sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient<
    tonic::transport::Channel,
>;

/// One call; (overall code, the first status's limit, if any).
async fn call(client: &mut Client, domain: &str, entries: &[(&str, &str)]) -> (Code, Option<u32>) {
    let response = client
        .should_rate_limit(request(domain, &[entries]))
        .await
        .expect("should_rate_limit")
        .into_inner();
    let limit = response.statuses[0]
        .current_limit
        .as_ref()
        .map(|l| l.requests_per_unit);
    (response.overall_code(), limit)
}

/// The limit in force for a descriptor, without consuming (hits_addend 0).
async fn limit_of(client: &mut Client, domain: &str, entries: &[(&str, &str)]) -> Option<u32> {
    let request = RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).to_owned(),
                    value: (*v).to_owned(),
                })
                .collect(),
            limit: None,
            hits_addend: Some(0u64.into()),
        }],
        hits_addend: 0,
    };
    let response = client.should_rate_limit(request).await.ok()?.into_inner();
    response.statuses[0]
        .current_limit
        .as_ref()
        .map(|l| l.requests_per_unit)
}

/// Polls until `f` holds, up to `DEADLINE`; returns how long it took.
async fn time_until<F, Fut>(what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if f().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?} (promised {PROMISED:?})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls until the limit in force for `entries` is `want`; how long it took.
async fn time_until_limit(
    what: &str,
    client: &mut Client,
    domain: &str,
    entries: &[(&str, &str)],
    want: Option<u32>,
    deadline: Duration,
) -> Duration {
    let in_force = wait_until(deadline, || {
        let mut client = client.clone();
        async move { limit_of(&mut client, domain, entries).await == want }
    })
    .await;
    in_force.unwrap_or_else(|| {
        panic!("{what}: limit {want:?} not in force within {deadline:?} (promised {PROMISED:?})")
    })
}

async fn readyz(server: &TestServer) -> (u16, serde_json::Value) {
    let response = support::http::get(server.http_addr, "/readyz")
        .await
        .expect("GET /readyz");
    (response.status, response.json())
}

fn per_user(domain: &str, limit: u32) -> String {
    format!(
        "domain: {domain}\ndescriptors:\n  - key: user\n    rate_limit: {{unit: minute, requests_per_unit: {limit}}}\n"
    )
}

// === Schema ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_to_an_empty_database_and_reapply_as_a_no_op() {
    let pg = PgCluster::start();
    let first = ok(&pg, &["migrate"]);
    assert_eq!(first.trim(), "applied migrations: 1, 5, 6, 7");
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let schema = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(table_name || '.' || column_name || ':' || data_type, ',' ORDER BY table_name, column_name)
             FROM information_schema.columns WHERE table_schema = 'public'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let migrations = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(version || ':' || installed_on::text, ',') FROM _sqlx_migrations",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let (schema1, applied1) = (schema().await, migrations().await);
    for table in [
        "plans",
        "tenants",
        "api_keys",
        "rules",
        "usage_hourly",
        "violations",
    ] {
        assert!(
            schema1.contains(&format!("{table}.")),
            "{table} missing: {schema1}"
        );
    }
    assert_eq!(ok(&pg, &["migrate"]).trim(), "schema up to date");
    assert_eq!(schema().await, schema1);
    assert_eq!(migrations().await, applied1, "nothing re-applied");

    // The constraints keep bad rows out.
    let bad = [
        "INSERT INTO rules (domain, position, path_keys, path_values, unit, requests_per_unit)
         VALUES ('d', 0, '{k}', '{\"\"}', 'fortnight', 1)",
        "INSERT INTO rules (domain, position, path_keys, path_values, unit, requests_per_unit)
         VALUES ('d', 0, '{k}', '{\"\"}', 'minute', 0)",
        "INSERT INTO rules (domain, position, path_keys, path_values, unit)
         VALUES ('d', 0, '{k}', '{\"\"}', 'minute')",
        "INSERT INTO plans (name, monthly_quota) VALUES ('x', -1)",
        "INSERT INTO api_keys (key_hash, prefix, tenant_id) VALUES ('nothex', 'slk_00000000', gen_random_uuid())",
    ];
    for sql in bad {
        assert!(
            sqlx::query(sql).execute(&pool).await.is_err(),
            "accepted: {sql}"
        );
    }
    let good =
        "INSERT INTO rules (domain, position, path_keys, path_values, unit, requests_per_unit)
                VALUES ('d', 0, '{k}', '{\"\"}', 'minute', 1)";
    sqlx::query(good).execute(&pool).await.unwrap();
    let duplicate = good.replace("0, '{k}'", "1, '{k}'");
    assert!(
        sqlx::query(&duplicate).execute(&pool).await.is_err(),
        "a path is unique per domain"
    );
}

// === rules apply / export ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_then_export_round_trips_and_apply_rejects_what_validate_rejects() {
    let pg = start_cluster();
    ok(&pg, &["rules", "apply", "examples/rules"]);
    for (domain, file) in [("business", "business.yaml"), ("weather", "weather.yaml")] {
        let original = std::fs::read_to_string(repo().join("examples/rules").join(file)).unwrap();
        let exported = ok(&pg, &["rules", "export", "--domain", domain]);
        let parse = |name: &str, text: &str| sluice::rules::yaml::parse_str(name, text).unwrap();
        assert_eq!(
            parse("exported", &exported),
            parse(file, &original),
            "{domain}:\n{exported}"
        );
        // And the exported text is itself a valid rules file.
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "x.yaml", &exported);
        ok(&pg, &["rules", "validate", &path]);
    }
    // A plan's rules round-trip too, and stay apart from the domain's.
    let dir = tempfile::tempdir().unwrap();
    let pro = write(dir.path(), "pro.yaml", &per_user("business", 77));
    ok(&pg, &["rules", "apply", &pro, "--plan", "pro"]);
    let exported = ok(
        &pg,
        &["rules", "export", "--domain", "business", "--plan", "pro"],
    );
    assert!(exported.contains("requests_per_unit: 77"), "{exported}");
    let domain = ok(&pg, &["rules", "export", "--domain", "business"]);
    assert!(!domain.contains("77"), "{domain}");

    // Every rejection of the validator, with the same message, and nothing written.
    let invalid = [
        "domain: business\ndescriptors:\n  - key: k\n    rate_limit: {unit: minit, requests_per_unit: 1}\n",
        "domain: business\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 0}\n",
        "domain: business\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute}\n",
        "domain: business\ndescriptors:\n  - key: k\n  - key: k\n",
        "domain: business\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: second}\n",
        "domain: business\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 5, burst: 9}\n",
        "domain: business\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 5, algorithm: leaky}\n",
        "domain: business\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 5, name: a, replaces: [{name: a}]}\n",
        "domain: business\ndescriptors:\n  - key: k\n    value: x\n    share_threshold: true\n",
        "domain: business\ndescriptors:\n  - value: x\n",
        "descriptors:\n  - key: k\n",
        "domain: business\ndescriptors:\n  - key: k\n    unknown_field: 1\n",
        "domain: [\n",
        "",
    ];
    let before = ok(&pg, &["rules", "export", "--domain", "business"]);
    for (i, text) in invalid.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &format!("bad{i}.yaml"), text);
        let validate = sluice(&pg, &["rules", "validate", &path]);
        let apply = sluice(&pg, &["rules", "apply", &path]);
        assert_eq!(
            validate.status.code(),
            Some(1),
            "validate accepted:\n{text}"
        );
        assert_eq!(apply.status.code(), Some(1), "apply accepted:\n{text}");
        assert!(!stderr(&validate).is_empty());
        assert_eq!(stderr(&apply), stderr(&validate), "for:\n{text}");
    }
    assert_eq!(
        ok(&pg, &["rules", "export", "--domain", "business"]),
        before
    );
    // A directory with one bad file writes none of its domains.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &per_user("fresh", 1));
    write(dir.path(), "b.yaml", invalid[0]);
    assert_eq!(
        sluice(&pg, &["rules", "apply", &dir.path().display().to_string()])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        sluice(&pg, &["rules", "export", "--domain", "fresh"])
            .status
            .code(),
        Some(1)
    );
    // sluice's window extensions are valid rules that rule rows cannot hold
    // yet: refused by name, never stored without them.
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "windows.yaml",
        "domain: windows
descriptors:
  - key: k
    rate_limits:
      - {unit: second, requests_per_unit: 1}
      - {unit: day, requests_per_unit: 9}
",
    );
    ok(&pg, &["rules", "validate", &path]);
    let apply = sluice(&pg, &["rules", "apply", &path]);
    assert_eq!(apply.status.code(), Some(1));
    assert_eq!(
        stderr(&apply).trim(),
        format!(
            "{path}: descriptors[0]: rate_limits cannot be stored in PostgreSQL rules yet; \
             serve this rule from a YAML file"
        )
    );
    assert_eq!(
        sluice(&pg, &["rules", "export", "--domain", "windows"])
            .status
            .code(),
        Some(1)
    );
}

// === Live reload ===

/// A change is in force on two instances within a second; and every
/// PostgreSQL socket they hold has TCP_NODELAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_limit_is_in_force_on_two_instances_within_a_second() {
    let pg = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("live.yaml");
    std::fs::write(&file, per_user("live", 2)).unwrap();
    let file = file.display().to_string();
    ok(&pg, &["rules", "apply", &file]);

    let a = serve(&pg, &[]).await;
    let b = serve(&pg, &[]).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    for client in [&mut ca, &mut cb] {
        assert_eq!(
            call(client, "live", &[("user", "u")]).await,
            (Code::Ok, Some(2))
        );
        assert_eq!(
            call(client, "live", &[("user", "u")]).await,
            (Code::Ok, Some(2))
        );
        assert_eq!(
            call(client, "live", &[("user", "u")]).await,
            (Code::OverLimit, Some(2))
        );
    }
    let (_, ready) = readyz(&a).await;
    assert_eq!(ready["rules"]["source"], "postgres:replica", "{ready}");

    for (round, limit) in [(1, 5u32), (2, 9)] {
        std::fs::write(&file, per_user("live", limit)).unwrap();
        let started = Instant::now();
        ok(&pg, &["rules", "apply", &file]);
        let committed = Instant::now();
        let user = [("user", "u")];
        let ta =
            time_until_limit("instance a", &mut ca, "live", &user, Some(limit), DEADLINE).await;
        let tb =
            time_until_limit("instance b", &mut cb, "live", &user, Some(limit), DEADLINE).await;
        eprintln!(
            "MEASURED live reload round {round}: `sluice rules apply` took {:?}; in force after it \
             returned: instance a {:?}, instance b (after a) {:?}",
            committed - started,
            ta,
            tb
        );
        // The new limit counts: the request that was over 2 is now allowed.
        assert_eq!(call(&mut ca, "live", &[("user", "u")]).await.0, Code::Ok);
    }

    // Every PostgreSQL socket the two instances hold (LISTEN on the
    // primary, the pools on the primary and the replica) has TCP_NODELAY,
    // which sqlx sets; this test process opens no other.
    let sockets = support::sockets::connected_tcp_sockets();
    for port in [pg.primary_port, pg.replica_port] {
        let found: Vec<_> = sockets.iter().filter(|s| s.peer.port() == port).collect();
        support::sockets::assert_nodelay(&format!("PostgreSQL :{port}"), &found, &sockets);
    }
}

/// The replica goes down: a change is read from the primary instead, and
/// `/readyz` says so; once the replica is back, reads return to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_read_from_the_primary_while_the_replica_is_down() {
    let pg = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "failover.yaml", &per_user("failover", 2));
    ok(&pg, &["rules", "apply", &file]);
    let server = serve(&pg, &[]).await;
    let mut client = server.client().await;
    let user = [("user", "u")];
    assert_eq!(limit_of(&mut client, "failover", &user).await, Some(2));
    let (_, ready) = readyz(&server).await;
    assert_eq!(ready["rules"]["source"], "postgres:replica", "{ready}");

    // Applies a new limit and waits until it is in force; how long that took.
    let change = |limit: u32, what: &'static str, deadline: Duration| {
        write(dir.path(), "failover.yaml", &per_user("failover", limit));
        ok(&pg, &["rules", "apply", &file]);
        let client = client.clone();
        async move {
            let mut client = client;
            let user = [("user", "u")];
            let took =
                time_until_limit(what, &mut client, "failover", &user, Some(limit), deadline).await;
            eprintln!("MEASURED {what}: change in force {took:?} after `rules apply` returned");
        }
    };

    pg.stop_replica();
    // The replica is given up on after --database-timeout (1 s here).
    change(4, "replica down", DEADLINE).await;
    let (code, ready) = readyz(&server).await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(
        ready["rules"]["source"], "postgres:primary (replica failing)",
        "{ready}"
    );
    // While it stays down, a change waits for it only briefly (200 ms), so
    // the usual promise holds again.
    change(
        5,
        "replica still down",
        PROMISED + Duration::from_millis(500),
    )
    .await;

    pg.start_replica();
    change(6, "replica back", DEADLINE).await;
    let (_, ready) = readyz(&server).await;
    assert_eq!(ready["rules"]["source"], "postgres:replica", "{ready}");
}

/// A rule set that fails validation in the database is refused and the
/// running one stays; `/readyz` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_change_in_the_database_is_refused_and_the_rules_in_force_stay() {
    let pg = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    ok(
        &pg,
        &[
            "rules",
            "apply",
            &write(dir.path(), "a.yaml", &per_user("guarded", 4)),
        ],
    );
    let server = serve(&pg, &[]).await;
    let mut client = server.client().await;
    assert_eq!(
        limit_of(&mut client, "guarded", &[("user", "u")]).await,
        Some(4)
    );
    // A child row without its parent: only possible by hand, in SQL.
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    sqlx::query(
        "INSERT INTO rules (domain, position, path_keys, path_values, unit, requests_per_unit)
         VALUES ('guarded', 5, '{orphan,child}', '{\"\",\"\"}', 'second', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let s = &server;
    let waited = time_until("readyz reports the refusal", || async move {
        let (_, r) = readyz(s).await;
        r["rules"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no parent row"))
    })
    .await;
    eprintln!("MEASURED refusal reported after {waited:?}");
    let (code, ready) = readyz(&server).await;
    assert_eq!(code, 200, "still ready: the previous rules serve");
    assert_eq!(ready["rules"]["loaded"], true);
    assert_eq!(
        limit_of(&mut client, "guarded", &[("user", "u")]).await,
        Some(4)
    );
}

// === API keys ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_issue_use_revoke_and_unknown() {
    let pg = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    let domain = "domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 1000, name: default_per_key}\n  - key: route\n    rate_limit: {unit: minute, requests_per_unit: 2, name: per_route}\n";
    let free = "domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 3, name: free_per_key}\n";
    ok(
        &pg,
        &["rules", "apply", &write(dir.path(), "api.yaml", domain)],
    );
    ok(
        &pg,
        &[
            "rules",
            "apply",
            &write(dir.path(), "free.yaml", free),
            "--plan",
            "free",
        ],
    );
    ok(&pg, &["tenants", "create", "acme", "--plan", "free"]);
    ok(&pg, &["tenants", "create", "globex", "--plan", "startup"]);
    let acme_key = ok(&pg, &["keys", "issue", "--tenant", "acme"])
        .trim()
        .to_owned();
    let globex_key = ok(&pg, &["keys", "issue", "--tenant", "globex"])
        .trim()
        .to_owned();
    assert!(
        acme_key.starts_with("slk_") && acme_key.len() == 4 + 8 + 1 + 48,
        "{acme_key}"
    );
    // Only the hash is stored.
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash || prefix FROM api_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        stored.iter().all(|s| !s.contains(&acme_key[13..])),
        "raw key stored"
    );
    let listed = ok(&pg, &["keys", "list", "--tenant", "acme"]);
    assert!(
        listed.contains(&acme_key[..12]) && !listed.contains(&acme_key),
        "{listed}"
    );

    let server = serve(&pg, &[]).await;
    let mut client = server.client().await;
    // acme is on free: its plan's 3 a minute, counted per key.
    for _ in 0..3 {
        assert_eq!(
            call(&mut client, "api", &[("api_key", &acme_key)]).await,
            (Code::Ok, Some(3))
        );
    }
    assert_eq!(
        call(&mut client, "api", &[("api_key", &acme_key)]).await,
        (Code::OverLimit, Some(3))
    );
    // globex's plan has no rules of its own for the domain: the domain's.
    assert_eq!(
        call(&mut client, "api", &[("api_key", &globex_key)]).await,
        (Code::Ok, Some(1000))
    );
    // Unknown key: denied (the default), without a limit.
    assert_eq!(
        call(&mut client, "api", &[("api_key", "slk_00000000_nope")]).await,
        (Code::OverLimit, None)
    );
    // ... and a request it denies consumes nothing from its other limits.
    for _ in 0..3 {
        let r = client
            .should_rate_limit(request(
                "api",
                &[&[("api_key", "slk_00000000_nope")], &[("route", "/orders")]],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code(), Code::OverLimit);
        assert_eq!(r.statuses[1].limit_remaining, 2, "{r:?}");
    }
    let r = client
        .should_rate_limit(request("api", &[&[("route", "/orders")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.overall_code(), r.statuses[0].limit_remaining),
        (Code::Ok, 1),
        "the refused requests consumed from the route's limit"
    );

    // No query per request: the replica sees no transactions for 200 calls.
    let replica = PgPool::connect(&pg.replica_url).await.unwrap();
    let commits = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = 'sluice'",
        )
        .fetch_one(&replica)
        .await
        .unwrap()
    };
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&replica)
        .await
        .unwrap();
    let before = commits().await;
    for _ in 0..200 {
        call(&mut client, "api", &[("api_key", &globex_key)]).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // stats are flushed every 500 ms
    let after = commits().await;
    assert!(
        after - before <= 3,
        "the replica saw {} transactions for 200 calls",
        after - before
    );

    // Revoke: the next call sees it within a second.
    let prefix = &acme_key[..12];
    let started = Instant::now();
    assert_eq!(
        ok(&pg, &["keys", "revoke", prefix]).trim(),
        format!("revoked {prefix}")
    );
    let returned = started.elapsed();
    let waited = {
        let key = [("api_key", acme_key.as_str())];
        time_until_limit(
            "revocation in force",
            &mut client,
            "api",
            &key,
            None,
            DEADLINE,
        )
        .await
    };
    assert_eq!(
        call(&mut client, "api", &[("api_key", &acme_key)]).await,
        (Code::OverLimit, None)
    );
    eprintln!("MEASURED revocation: `sluice keys revoke` took {returned:?}; refused {waited:?} after it returned");
    assert!(ok(&pg, &["keys", "list", "--tenant", "acme"])
        .lines()
        .nth(1)
        .is_some_and(|l| !l.ends_with('-')));

    // With --unknown-key anonymous, unknown (and revoked) keys get the domain's rules.
    let lenient = serve(&pg, &["--unknown-key", "anonymous"]).await;
    let mut lenient_client = lenient.client().await;
    assert_eq!(
        call(
            &mut lenient_client,
            "api",
            &[("api_key", "slk_00000000_nope")]
        )
        .await,
        (Code::Ok, Some(1000))
    );
    assert_eq!(
        call(&mut lenient_client, "api", &[("api_key", &acme_key)]).await,
        (Code::Ok, Some(1000))
    );
}

// === PostgreSQL down ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_keeps_deciding_and_a_later_change_is_picked_up() {
    let pg = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "outage.yaml", &per_user("outage", 3));
    ok(&pg, &["rules", "apply", &file]);
    let snapshot = dir.path().join("snapshot.json").display().to_string();
    let server = serve(&pg, &["--rules-snapshot", &snapshot]).await;
    let mut client = server.client().await;
    assert_eq!(
        limit_of(&mut client, "outage", &[("user", "a")]).await,
        Some(3)
    );
    assert!(Path::new(&snapshot).exists(), "a snapshot after the load");

    pg.stop_servers();
    // Decisions go on, unchanged.
    for _ in 0..3 {
        assert_eq!(
            call(&mut client, "outage", &[("user", "b")]).await,
            (Code::Ok, Some(3))
        );
    }
    assert_eq!(
        call(&mut client, "outage", &[("user", "b")]).await,
        (Code::OverLimit, Some(3))
    );
    let s = &server;
    let noticed = time_until("readyz reports the outage", || async move {
        let (_, r) = readyz(s).await;
        r["rules"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unavailable"))
    })
    .await;
    eprintln!("MEASURED outage noticed in /readyz after {noticed:?}");
    let (code, _) = readyz(&server).await;
    assert_eq!(code, 200, "still ready with the rules in force");

    // Start-up while PostgreSQL is down: from the snapshot, saying so.
    let from_snapshot = serve(&pg, &["--rules-snapshot", &snapshot]).await;
    let (code, ready) = readyz(&from_snapshot).await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(
        ready["rules"]["source"],
        format!("snapshot:{snapshot}"),
        "{ready}"
    );
    assert!(
        ready["rules"]["last_error"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL unavailable"),
        "{ready}"
    );
    let mut snapshot_client = from_snapshot.client().await;
    assert_eq!(
        limit_of(&mut snapshot_client, "outage", &[("user", "c")]).await,
        Some(3)
    );
    // Without a snapshot: refuse with --require-rules, else serve nothing-limited.
    let missing = dir.path().join("missing.json").display().to_string();
    let cli = Cli::try_parse_from([
        "sluice",
        "serve",
        "--rules",
        "postgres",
        "--database-url",
        &pg.primary_url,
        "--key-secret",
        KEY_SECRET,
        "--database-timeout",
        "1s",
        "--rules-snapshot",
        &missing,
        "--require-rules",
    ])
    .unwrap();
    let SluiceCommand::Serve(args) = cli.command else {
        panic!()
    };
    let refused = sluice::app::build(&args)
        .await
        .err()
        .expect("refuses to start");
    assert!(
        format!("{refused:#}").contains("refusing to start"),
        "{refused:#}"
    );
    let unlimited = serve(&pg, &[]).await;
    let (code, ready) = readyz(&unlimited).await;
    assert_eq!(
        (code, ready["rules"]["source"].as_str()),
        (200, Some("none")),
        "{ready}"
    );
    let mut unlimited_client = unlimited.client().await;
    assert_eq!(
        limit_of(&mut unlimited_client, "outage", &[("user", "d")]).await,
        None
    );

    // PostgreSQL back: a change made after the restart is picked up by the
    // running instance and by the one that started from the snapshot.
    pg.restart_servers();
    std::fs::write(dir.path().join("outage.yaml"), per_user("outage", 8)).unwrap();
    let restarted = Instant::now();
    // The CLI may need a moment while the replica reconnects; retry.
    let mut applied = sluice(&pg, &["rules", "apply", &file]);
    while !applied.status.success() && restarted.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        applied = sluice(&pg, &["rules", "apply", &file]);
    }
    assert!(applied.status.success(), "{}", stderr(&applied));
    let after_apply = Instant::now();
    for (name, client) in [
        ("running", &mut client),
        ("from snapshot", &mut snapshot_client),
    ] {
        // Reconnecting backs off up to 5 s; allow for it on top of the deadline.
        let user = [("user", "e")];
        time_until_limit(
            name,
            client,
            "outage",
            &user,
            Some(8),
            Duration::from_secs(15),
        )
        .await;
        eprintln!(
            "MEASURED after restart: {name} instance has the change {:?} after apply returned ({:?} after the restart)",
            after_apply.elapsed(),
            restarted.elapsed()
        );
    }
    let (_, ready) = readyz(&from_snapshot).await;
    assert_eq!(ready["rules"]["source"], "postgres:replica", "{ready}");
    assert!(ready["rules"]["last_error"].is_null(), "{ready}");
}

// === Usage ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_rows_match_the_decisions_made() {
    let pg = start_cluster();
    let dir = tempfile::tempdir().unwrap();
    let rules = "domain: metered\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 5, name: per_key}\n";
    ok(
        &pg,
        &["rules", "apply", &write(dir.path(), "m.yaml", rules)],
    );
    ok(&pg, &["tenants", "create", "initech", "--plan", "startup"]);
    ok(&pg, &["tenants", "create", "hooli", "--plan", "startup"]);
    let initech = ok(&pg, &["keys", "issue", "--tenant", "initech"])
        .trim()
        .to_owned();
    let hooli = ok(&pg, &["keys", "issue", "--tenant", "hooli"])
        .trim()
        .to_owned();

    let mut server = serve(&pg, &["--usage-flush", "200ms"]).await;
    let mut client = server.client().await;
    let mut made = std::collections::HashMap::<&str, (i64, i64)>::new();
    for (tenant, key, n) in [("initech", &initech, 12), ("hooli", &hooli, 4)] {
        for _ in 0..n {
            let (code, _) = call(&mut client, "metered", &[("api_key", key)]).await;
            let sums = made.entry(tenant).or_default();
            if code == Code::Ok {
                sums.0 += 1;
            } else {
                sums.1 += 1;
            }
        }
    }
    assert_eq!(made["initech"], (5, 7));
    assert_eq!(made["hooli"], (4, 0));

    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    let usage = |tenant: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT coalesce(sum(allowed), 0)::int8, coalesce(sum(denied), 0)::int8
                 FROM usage_hourly u JOIN tenants t ON t.id = u.tenant_id
                 WHERE t.name = $1 AND u.domain = 'metered'",
            )
            .bind(tenant)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // Written in the background every --usage-flush...
    let (want_initech, want_hooli) = (made["initech"], made["hooli"]);
    let usage = &usage;
    let waited = time_until("usage written", || async move {
        usage("initech").await == want_initech && usage("hooli").await == want_hooli
    })
    .await;
    eprintln!(
        "MEASURED usage rows written {waited:?} after the last decision (--usage-flush 200ms)"
    );
    // ...and at shutdown, without counting anything twice.
    for _ in 0..2 {
        call(&mut client, "metered", &[("api_key", &hooli)]).await;
    }
    server.begin_shutdown();
    server.wait().await.unwrap();
    assert_eq!(usage("initech").await, (5, 7));
    assert_eq!(
        usage("hooli").await,
        (5, 1),
        "the last two calls, written at shutdown"
    );

    let violations: (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT client_id), sum(hits)::int8 FROM violations v
         JOIN tenants t ON t.id = v.tenant_id WHERE t.name = 'initech' AND v.rule = 'per_key'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(violations, (1, 7), "one client, seven denials");

    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let printed = ok(&pg, &["usage", "--tenant", "initech", "--month", &month]);
    let line = printed
        .lines()
        .find(|l| l.starts_with("metered"))
        .unwrap_or_default();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        ["metered", "5", "7"],
        "{printed}"
    );

    let metrics = sluice::telemetry::prometheus().render();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("sluice_usage_dropped_total") && !l.ends_with(" 0")),
        "nothing was dropped:\n{metrics}"
    );
}
