//! Rules reload while serving, through the real `app::build` (the file
//! watcher `sluice serve` runs) and the real servers: a changed file's new
//! limit applies, an invalid edit keeps the rules in force and says why in
//! `/readyz`, and a Kubernetes ConfigMap update (a `..data` symlink swap) is
//! picked up.

use crate::support;

use std::path::Path;
use std::time::Duration;

use clap::Parser as _;
use sluice::config::{Cli, Command};
use sluice::proto::rls::rate_limit_response::Code;
use support::{http, request, wait_until, TestServer};

/// The watcher polls every 250 ms (the default `--rules-poll`); a second is
/// what the README promises. The margin is for a machine busy compiling.
const PROMISED: Duration = Duration::from_secs(1);
const MARGIN: Duration = Duration::from_secs(4);

fn weather(limit: u32) -> String {
    format!(
        "domain: weather\ndescriptors:\n  - key: client_id\n    rate_limit: {{unit: minute, requests_per_unit: {limit}}}\n"
    )
}

/// Writes `text` to `path` the way editors and ConfigMap updates do: a new
/// file renamed into place, so the watcher never reads half a file.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `sluice serve --rules DIR` on free ports, built by `app::build`.
async fn serve(rules: &Path) -> TestServer {
    let cli = Cli::try_parse_from([
        "sluice",
        "serve",
        "--rules",
        rules.to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ])
    .expect("serve flags parse");
    let Command::Serve(args) = cli.command else {
        panic!("not the serve command");
    };
    let deps = sluice::app::build(&args).await.expect("app::build");
    TestServer::serve(deps).await
}

/// The configured limit for `domain`/`key=value`, checked without consuming.
async fn limit_of(server: &TestServer, domain: &str, key: &str) -> Option<u32> {
    let mut req = request(domain, &[&[(key, "probe")]]);
    req.descriptors[0].hits_addend = Some(0u64.into());
    let r = server
        .client()
        .await
        .should_rate_limit(req)
        .await
        .expect("ShouldRateLimit")
        .into_inner();
    assert_eq!(r.overall_code(), Code::Ok);
    r.statuses[0]
        .current_limit
        .as_ref()
        .map(|l| l.requests_per_unit)
}

async fn wait_for_limit(server: &TestServer, domain: &str, key: &str, want: u32) {
    let applied = wait_until(PROMISED + MARGIN, || async {
        limit_of(server, domain, key).await == Some(want)
    })
    .await
    .is_some();
    assert!(
        applied,
        "the new limit {want} did not apply within {:?}; in force: {:?}",
        PROMISED + MARGIN,
        limit_of(server, domain, key).await
    );
}

async fn readyz(server: &TestServer) -> serde_json::Value {
    let r = http::get(server.http_addr, "/readyz").await.unwrap();
    assert_eq!(
        r.status,
        200,
        "an invalid reload must not make sluice unready: {}",
        r.text()
    );
    r.json()
}

#[tokio::test]
async fn an_edited_file_applies_its_new_limit_and_a_new_file_its_domain() {
    let dir = tempfile::tempdir().unwrap();
    replace_file(&dir.path().join("weather.yaml"), &weather(5));
    let server = serve(dir.path()).await;
    assert_eq!(limit_of(&server, "weather", "client_id").await, Some(5));

    replace_file(&dir.path().join("weather.yaml"), &weather(7));
    wait_for_limit(&server, "weather", "client_id", 7).await;

    // The new limit is enforced, not only reported.
    for _ in 0..7 {
        let r = server
            .client()
            .await
            .should_rate_limit(request("weather", &[&[("client_id", "c-1")]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code(), Code::Ok);
    }
    let r = server
        .client()
        .await
        .should_rate_limit(request("weather", &[&[("client_id", "c-1")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code(), Code::OverLimit);

    // A file added to the directory brings its domain.
    assert_eq!(limit_of(&server, "business", "api_key").await, None);
    replace_file(
        &dir.path().join("business.yaml"),
        "domain: business\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: second, requests_per_unit: 11}\n",
    );
    wait_for_limit(&server, "business", "api_key", 11).await;
    assert!(readyz(&server).await["rules"]["last_error"].is_null());
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_rules_in_force_and_readyz_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weather.yaml");
    replace_file(&file, &weather(5));
    let server = serve(dir.path()).await;
    assert!(readyz(&server).await["rules"]["last_error"].is_null());

    replace_file(&file, &weather(9).replace("minute", "minit"));
    let reported = wait_until(PROMISED + MARGIN, || async {
        readyz(&server).await["rules"]["last_error"].is_string()
    })
    .await
    .is_some();
    let report = readyz(&server).await;
    assert!(
        reported,
        "/readyz never reported the invalid edit: {report}"
    );
    let error = report["rules"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("weather.yaml") && error.contains("invalid rate limit unit 'minit'"),
        "{error}"
    );
    assert_eq!(report["ready"], true);
    assert_eq!(limit_of(&server, "weather", "client_id").await, Some(5));

    // Broken YAML: the same.
    replace_file(&file, "domain: weather\ndescriptors: [\n");
    let reported = wait_until(PROMISED + MARGIN, || async {
        readyz(&server).await["rules"]["last_error"]
            .as_str()
            .is_some_and(|e| !e.contains("minit"))
    })
    .await
    .is_some();
    assert!(reported, "{}", readyz(&server).await);
    assert_eq!(limit_of(&server, "weather", "client_id").await, Some(5));

    let metrics = http::get(server.http_addr, "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(r#"sluice_rule_reloads_total{result="failure"}"#),
        "{metrics}"
    );

    // Fixed: the new rules apply and the error clears.
    replace_file(&file, &weather(9));
    wait_for_limit(&server, "weather", "client_id", 9).await;
    assert!(readyz(&server).await["rules"]["last_error"].is_null());
}

#[cfg(unix)]
#[tokio::test]
async fn a_kubernetes_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;

    // What the kubelet makes of a ConfigMap volume: the files live in a
    // timestamped directory, `..data` points at it, and each key is a
    // symlink through `..data`. An update writes a new directory and
    // renames a new `..data` link over the old one.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let v1 = root.join("..2026_11_22_08_00_00.1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("weather.yaml"), weather(5)).unwrap();
    symlink("..2026_11_22_08_00_00.1", root.join("..data")).unwrap();
    symlink("..data/weather.yaml", root.join("weather.yaml")).unwrap();

    let server = serve(root).await;
    assert_eq!(limit_of(&server, "weather", "client_id").await, Some(5));

    let v2 = root.join("..2026_11_22_08_05_00.2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("weather.yaml"), weather(13)).unwrap();
    symlink("..2026_11_22_08_05_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    wait_for_limit(&server, "weather", "client_id", 13).await;
    assert!(readyz(&server).await["rules"]["last_error"].is_null());
}
