//! The operations kit against a live sluice (the real binary, with rules
//! and API keys in a real PostgreSQL and counters in a real Redis): the
//! `tenant` label of decisions; every query of the Grafana dashboard and of
//! the alert rules parses (`promtool query instant` against a real
//! Prometheus scraping that sluice) and names only metrics its `/metrics`
//! exports; and when Redis is stopped, the store alert goes from inactive to
//! firing within its `for` plus two scrape intervals, read from
//! Prometheus' own API.

use crate::support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::http;
use support::postgres::PgCluster;
use support::redis::RedisServer;
use support::{free_port, repo, request, tool, wait_until, ChildGuard, SluiceProcess};

const KEY_SECRET: &str = "observability test secret";
/// The test Prometheus scrapes and evaluates this often.
const SCRAPE: Duration = Duration::from_secs(1);

const RULES: &str = "domain: ops
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 5, name: per_key}
  - key: client_id
    rate_limit: {unit: minute, requests_per_unit: 5, name: per_client}
  - key: route
    value: /search
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, name: search_shadow}
";

fn sluice_cli(pg: &PgCluster, args: &[&str]) -> String {
    let out = Command::new(support::sluice_bin())
        .args(args)
        .env("SLUICE_DATABASE_URL", &pg.primary_url)
        .env("SLUICE_KEY_SECRET", KEY_SECRET)
        .output()
        .expect("running sluice");
    assert!(
        out.status.success(),
        "sluice {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sample names in a Prometheus text exposition.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `sluice_*` name a query mentions.
fn sluice_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("sluice_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The dashboard's queries, with Grafana's variables replaced by values.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo().join("helm/sluice/files/sluice-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let expr = expr.replace("$__rate_interval", "1m").replace("$job", ".*");
            queries.push((panel["title"].as_str().unwrap_or("").to_owned(), expr));
        }
    }
    assert!(queries.len() > 20, "the dashboard has its panels");
    queries
}

/// The alert rules: (name, expr, for).
fn alert_rules() -> Vec<(String, String, Duration)> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yaml")).unwrap();
    let file: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("alerts YAML");
    let mut rules = Vec::new();
    for group in file["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let for_ = rule["for"].as_str().map_or(Duration::ZERO, |f| {
                humantime::parse_duration(f).expect("for")
            });
            rules.push((
                rule["alert"].as_str().expect("alert").to_owned(),
                rule["expr"].as_str().expect("expr").to_owned(),
                for_,
            ));
        }
    }
    rules
}

struct Prometheus {
    addr: SocketAddr,
    _process: ChildGuard,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` as job "sluice" in namespace "sluice" (as the alert
    /// rules select) every [`SCRAPE`], with the alert rules loaded.
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            repo().join("deploy/prometheus/alerts.yaml"),
            dir.path().join("alerts.yaml"),
        )
        .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {s}s\n  evaluation_interval: {s}s\n\
                 rule_files: [alerts.yaml]\n\
                 scrape_configs:\n  - job_name: sluice\n    static_configs:\n      \
                 - targets: ['{target}']\n        labels: {{namespace: sluice}}\n",
                s = SCRAPE.as_secs()
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let process = ChildGuard::spawn(
            "prometheus",
            Command::new(tool("prometheus"))
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let prometheus = Prometheus {
            addr,
            _process: process,
            dir,
        };
        let scraping = wait_until(Duration::from_secs(30), || async {
            prometheus
                .query("up{job=\"sluice\"} == 1")
                .await
                .is_some_and(|r| !r.is_empty())
        })
        .await;
        assert!(
            scraping.is_some(),
            "Prometheus did not scrape sluice within 30 s:\n{}",
            prometheus.log()
        );
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn api(&self, path: &str) -> Option<serde_json::Value> {
        let response = http::get(self.addr, path).await.ok()?;
        (response.status == 200).then(|| response.json())
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Option<Vec<serde_json::Value>> {
        let mut encoded = String::new();
        for b in expr.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        let body = self.api(&format!("/api/v1/query?query={encoded}")).await?;
        body["data"]["result"].as_array().cloned()
    }

    /// The state of an alerting rule in `/api/v1/rules`: inactive, pending
    /// or firing.
    async fn rule_state(&self, alert: &str) -> Option<String> {
        let body = self.api("/api/v1/rules?type=alert").await?;
        body["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .find(|r| r["name"] == alert)
            .and_then(|r| r["state"].as_str().map(str::to_owned))
    }

    /// The states of an alert's instances in `/api/v1/alerts`.
    async fn alert_states(&self, alert: &str) -> Vec<String> {
        let Some(body) = self.api("/api/v1/alerts").await else {
            return Vec::new();
        };
        body["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == alert)
            .filter_map(|a| a["state"].as_str().map(str::to_owned))
            .collect()
    }
}

/// `promtool query instant`: parsed and run by Prometheus itself.
fn promtool_query(prometheus: &Prometheus, expr: &str) -> Result<(), String> {
    let out = Command::new(tool("promtool"))
        .args(["query", "instant", &prometheus.url(), expr])
        .output()
        .expect("running promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_against_a_live_sluice() {
    // Fail at once, saying what to install, if a tool is missing.
    tool("prometheus");
    tool("promtool");
    let mut redis = RedisServer::start();
    let pg = PgCluster::start();
    sluice_cli(&pg, &["migrate"]);
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = write(rules_dir.path(), "ops.yaml", RULES);
    sluice_cli(&pg, &["rules", "apply", &rules.display().to_string()]);
    sluice_cli(&pg, &["tenants", "create", "acme", "--plan", "free"]);
    sluice_cli(&pg, &["tenants", "create", "globex", "--plan", "free"]);
    let acme = sluice_cli(&pg, &["keys", "issue", "--tenant", "acme"])
        .trim()
        .to_owned();
    let globex = sluice_cli(&pg, &["keys", "issue", "--tenant", "globex"])
        .trim()
        .to_owned();

    let mut command = Command::new(support::sluice_bin());
    command
        .arg("serve")
        .args(["--rules", "postgres", "--database-url", &pg.primary_url])
        .args(["--key-secret", KEY_SECRET])
        .args(["--store", &redis.url()])
        .args(["--store-timeout", "200ms"])
        // acme gets a label of its own; globex, beyond the cap, is "other".
        .args(["--metrics-tenants", "1"]);
    let sluice = SluiceProcess::start(command).await;
    let grpc = format!("http://{}", sluice.grpc);
    let mut client =
        sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(
            grpc.clone(),
        )
        .await
        .unwrap();
    let run = std::process::id();
    // Decisions of every kind: OK and OVER_LIMIT for both tenants and a
    // keyless client, shadow-mode and near-limit hits.
    for _ in 0..7 {
        for entries in [
            vec![("api_key", acme.as_str())],
            vec![("api_key", globex.as_str())],
            vec![("client_id", &*format!("anon-{run}"))],
            vec![("route", "/search")],
        ] {
            client
                .should_rate_limit(request("ops", &[&entries]))
                .await
                .expect("a decision");
        }
    }
    let json = format!(
        r#"{{"domain":"ops","descriptors":[{{"entries":[{{"key":"client_id","value":"json-{run}"}}]}}]}}"#
    );
    let r = http::post_json(sluice.http, "/json", &json).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // A rules change through NOTIFY: the reload-latency histogram.
    write(
        rules_dir.path(),
        "ops.yaml",
        &RULES.replace(
            "requests_per_unit: 5, name: per_client",
            "requests_per_unit: 6, name: per_client",
        ),
    );
    sluice_cli(&pg, &["rules", "apply", &rules.display().to_string()]);
    let reloaded = wait_until(Duration::from_secs(10), || async {
        http::get(sluice.http, "/metrics").await.is_ok_and(|r| {
            r.text()
                .contains("sluice_rules_reload_duration_seconds_count")
        })
    })
    .await;
    assert!(reloaded.is_some(), "no NOTIFY reload seen");

    let metrics = http::get(sluice.http, "/metrics").await.unwrap().text();
    // The tenant label: acme's own, globex and keyless requests as "other".
    assert!(
        metrics.contains(r#"sluice_decisions_total{domain="ops",tenant="acme",code="OVER_LIMIT"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"sluice_decisions_total{domain="ops",tenant="other",code="OK"}"#));
    assert!(
        !metrics.contains(r#"tenant="globex""#),
        "beyond --metrics-tenants"
    );
    let exported = exported_names(&metrics);

    let prometheus = Prometheus::start(sluice.http).await;

    // Every dashboard query parses and names only exported metrics.
    let mut problems = Vec::new();
    for (title, expr) in dashboard_queries() {
        if let Err(e) = promtool_query(&prometheus, &expr) {
            problems.push(format!("{title}: {expr}: {e}"));
        }
        for name in sluice_names(&expr) {
            if !exported.contains(&name) {
                problems.push(format!("{title}: {name} is not in sluice's /metrics"));
            }
        }
    }
    // So do the alert rules' (besides kube-state-metrics' and Prometheus'
    // own `up`).
    let alerts = alert_rules();
    assert_eq!(alerts.len(), 8);
    for (name, expr, _) in &alerts {
        if let Err(e) = promtool_query(&prometheus, expr) {
            problems.push(format!("alert {name}: {e}"));
        }
        for metric in sluice_names(expr) {
            if !exported.contains(&metric) {
                problems.push(format!(
                    "alert {name}: {metric} is not in sluice's /metrics"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The store alert: inactive while Redis answers...
    let (_, _, for_) = alerts
        .iter()
        .find(|(name, _, _)| name == "SluiceStoreUnavailable")
        .expect("the store alert")
        .clone();
    let inactive = wait_until(Duration::from_secs(20), || async {
        prometheus
            .rule_state("SluiceStoreUnavailable")
            .await
            .as_deref()
            == Some("inactive")
    })
    .await;
    assert!(
        inactive.is_some(),
        "the store alert is not inactive:\n{}",
        prometheus.log()
    );
    assert!(prometheus
        .alert_states("SluiceStoreUnavailable")
        .await
        .is_empty());

    // ... and firing within its `for` plus two scrape intervals of Redis
    // stopping, under traffic (the breaker opens on failed calls).
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let id = format!("load-{}", i % 50);
                let _ = client
                    .should_rate_limit(request("ops", &[&[("client_id", &id)]]))
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = Instant::now();
    redis.kill();
    let deadline = for_ + 2 * SCRAPE;
    let firing = wait_until(deadline + Duration::from_secs(10), || async {
        prometheus
            .alert_states("SluiceStoreUnavailable")
            .await
            .iter()
            .any(|s| s == "firing")
    })
    .await
    .map(|_| stopped.elapsed());
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    eprintln!(
        "SluiceStoreUnavailable (for: {for_:?}) firing {firing:?} after Redis stopped \
         (scrape and evaluation every {SCRAPE:?})"
    );
    let firing = firing.unwrap_or_else(|| {
        panic!(
            "the store alert did not fire within {:?}:\n{}",
            deadline + Duration::from_secs(10),
            prometheus.log()
        )
    });
    // One more evaluation interval: the alert turns firing at the first
    // evaluation after `for` has passed; and the 200 ms poll.
    assert!(
        firing <= deadline + SCRAPE + Duration::from_millis(500),
        "fired {firing:?} after Redis stopped; promised within {deadline:?} (+ one evaluation)"
    );
}
