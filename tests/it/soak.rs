//! The chaos soak, short by default: two `sluice` processes on a 6-node
//! Redis Cluster, many clients calling both under steady load, while a
//! schedule SIGKILLs a Cluster master (and brings it back), restarts one
//! sluice instance, and changes the rules. Every decision is recorded, and
//! checked afterwards per counter and window: for the fixed window and GCRA,
//! admitted never passes the limit, across instances; no call waits past
//! its deadline; the failure mode (`deny`) answers within the store
//! timeout; no process panics.
//!
//! `SLUICE_SOAK_SECS` sets the duration (default 30; an hour is
//! `SLUICE_SOAK_SECS=3600 cargo test --release --test it -- soak:: --nocapture`).
//! The summary line is what docs/reliability.md records.

use crate::support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice::proto::rls::rate_limit_response::Code;
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use support::redis::RedisCluster;
use support::{eventually, request, SluiceProcess};
use tonic::transport::Channel;

const FIXED_LIMIT: u64 = 20;
const GCRA_RATE: u64 = 10;
const GCRA_BURST: u64 = 3;

/// Fixed window: 20 a second. GCRA: 10 a second, bursts of 3.
const RULES: &str = r#"
domain: soak
descriptors:
  - key: fixed
    rate_limit: {unit: second, requests_per_unit: 20, algorithm: fixed_window}
  - key: gcra
    rate_limit: {unit: second, requests_per_unit: 10, algorithm: gcra, burst: 3}
  - key: changing
    rate_limit: {unit: second, requests_per_unit: 5, algorithm: fixed_window}
"#;

/// How long a client waits for an answer (the store timeout is 100 ms).
const DEADLINE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Admitted,
    Denied,
    /// UNAVAILABLE: the store failed, answered by `--failure-mode deny`.
    FailureMode,
    /// No answer within the deadline.
    Late,
    /// No connection (the instance was restarting), or another error.
    Refused,
}

struct Decision {
    key: &'static str,
    value: u8,
    sent_us: u64,
    answered_us: u64,
    answer: Answer,
    reset_us: Option<u64>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn sluice_command(cluster: &RedisCluster, rules: &std::path::Path) -> Command {
    let nodes: Vec<String> = cluster
        .ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let mut command = Command::new(support::sluice_bin());
    command
        .arg("serve")
        .args(["--rules", &support::path_str(rules)])
        .args(["--rules-poll", "100ms"])
        .args(["--store", &format!("redis+cluster://{}", nodes.join(","))])
        .args(["--key-secret", "soak secret"])
        .args(["--failure-mode", "deny"])
        .args(["--store-timeout", "100ms"]);
    command
}

/// (RSS in KiB, open file descriptors) of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

async fn call(
    clients: &mut HashMap<SocketAddr, RateLimitServiceClient<Channel>>,
    addr: SocketAddr,
    key: &'static str,
    value: u8,
) -> Decision {
    let sent_us = now_us();
    let value_text = format!("v{value}");
    let result = tokio::time::timeout(DEADLINE, async {
        if let std::collections::hash_map::Entry::Vacant(vacant) = clients.entry(addr) {
            let c = RateLimitServiceClient::connect(format!("http://{addr}"))
                .await
                .map_err(|_| Answer::Refused)?;
            vacant.insert(c);
        }
        let client = clients.get_mut(&addr).ok_or(Answer::Refused)?;
        let answer = client
            .should_rate_limit(request("soak", &[&[(key, value_text.as_str())]]))
            .await;
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                let reset_us = r.statuses.first().and_then(|s| {
                    let d = s.duration_until_reset.as_ref()?;
                    Some(d.seconds as u64 * 1_000_000 + d.nanos as u64 / 1_000)
                });
                let answer = match r.overall_code() {
                    Code::Ok => Answer::Admitted,
                    _ => Answer::Denied,
                };
                Ok((answer, reset_us))
            }
            Err(s)
                if s.code() == tonic::Code::Unavailable && !s.message().contains("transport") =>
            {
                Ok((Answer::FailureMode, None))
            }
            Err(_) => Err(Answer::Refused),
        }
    })
    .await;
    let (answer, reset_us) = match result {
        Ok(Ok(a)) => a,
        Ok(Err(a)) => {
            clients.remove(&addr);
            (a, None)
        }
        Err(_) => (Answer::Late, None),
    };
    Decision {
        key,
        value,
        sent_us,
        answered_us: now_us(),
        answer,
        reset_us,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_never_passes_the_limit_through_failovers_and_restarts() {
    let _machine = crate::support::MACHINE.lock().await;
    let seconds: u64 = std::env::var("SLUICE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("soak.yaml");
    std::fs::write(&rules, RULES).unwrap();

    let mut instances = vec![
        SluiceProcess::start(sluice_command(&cluster, &rules)).await,
        SluiceProcess::start(sluice_command(&cluster, &rules)).await,
    ];
    let addrs = Arc::new(RwLock::new(
        instances.iter().map(|s| s.grpc).collect::<Vec<_>>(),
    ));
    // Wait until both decide (the cluster store connects in the background).
    let first: Vec<SocketAddr> = addrs.read().unwrap().clone();
    for addr in first {
        let mut clients = HashMap::new();
        let since = Instant::now();
        while call(&mut clients, addr, "changing", 255).await.answer != Answer::Admitted {
            assert!(
                since.elapsed() < Duration::from_secs(20),
                "sluice on {addr} never decided on the cluster"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let footprint_start: Vec<_> = instances
        .iter()
        .map(|s| footprint(s.process.child.id()))
        .collect();

    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut load = Vec::new();
    for worker in 0..12u64 {
        let addrs = addrs.clone();
        load.push(tokio::spawn(async move {
            let mut clients = HashMap::new();
            let mut decisions = Vec::new();
            let mut i = worker;
            while Instant::now() < until {
                let key = ["fixed", "gcra", "changing"][(i % 3) as usize];
                let value = ((i / 3) % 4) as u8;
                let addr = {
                    let addrs = addrs.read().unwrap();
                    addrs[(i as usize) % addrs.len()]
                };
                decisions.push(call(&mut clients, addr, key, value).await);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            decisions
        }));
    }

    // The fault schedule, by fractions of the run.
    let at = |fraction: f64| started + Duration::from_secs_f64(seconds as f64 * fraction);
    // (kind, from µs, to µs)
    let mut faults: Vec<(&str, u64, u64)> = Vec::new();

    tokio::time::sleep_until(at(0.2).into()).await;
    let victim = cluster.masters()[0];
    faults.push(("SIGKILL a Cluster master", now_us(), 0));
    cluster.kill(victim);
    let promoted = eventually(Duration::from_secs(30), || {
        let masters = cluster.masters();
        masters.len() == 3 && !masters.contains(&victim)
    })
    .await;
    assert!(
        promoted.is_some(),
        "no replica promoted in place of {victim}"
    );
    faults.last_mut().unwrap().2 = now_us();
    tokio::time::sleep(Duration::from_secs(2)).await;
    faults.push(("the killed master rejoins", now_us(), 0));
    cluster.restart(victim);
    let rejoined = eventually(Duration::from_secs(30), || cluster.healthy()).await;
    assert!(rejoined.is_some(), "node {victim} never rejoined");
    faults.last_mut().unwrap().2 = now_us();

    tokio::time::sleep_until(at(0.5).into()).await;
    faults.push(("SIGKILL and restart a sluice instance", now_us(), 0));
    let killed = instances.remove(1);
    let old = killed.grpc;
    drop(killed);
    let restarted = SluiceProcess::start(sluice_command(&cluster, &rules)).await;
    {
        let mut addrs = addrs.write().unwrap();
        addrs.retain(|a| *a != old);
        addrs.push(restarted.grpc);
    }
    instances.push(restarted);
    faults.last_mut().unwrap().2 = now_us();

    tokio::time::sleep_until(at(0.7).into()).await;
    faults.push(("rule change", now_us(), 0));
    std::fs::write(
        &rules,
        RULES.replace("requests_per_unit: 5,", "requests_per_unit: 7,"),
    )
    .unwrap();
    faults.last_mut().unwrap().2 = now_us() + 500_000;

    let mut decisions = Vec::new();
    for task in load {
        decisions.extend(task.await.unwrap());
    }
    let footprint_end: Vec<_> = instances
        .iter()
        .map(|s| footprint(s.process.child.id()))
        .collect();

    // === checks ===
    let count = |a: Answer| decisions.iter().filter(|d| d.answer == a).count();
    let in_fault = |d: &Decision| {
        faults
            .iter()
            .any(|(_, from, to)| d.sent_us <= *to + 1_000_000 && d.answered_us >= *from)
    };
    // Fixed window: admitted per counter and window, the window known from
    // when it resets (Redis' clock and this one are the same host's).
    let mut windows: HashMap<(u8, u64), u64> = HashMap::new();
    let mut without_reset = 0;
    for d in decisions
        .iter()
        .filter(|d| d.key == "fixed" && d.answer == Answer::Admitted)
    {
        match d.reset_us {
            Some(reset) => {
                let window = (d.answered_us + reset + 500_000) / 1_000_000;
                *windows.entry((d.value, window)).or_default() += 1;
            }
            None => without_reset += 1,
        }
    }
    let fixed_over: Vec<_> = windows.iter().filter(|(_, n)| **n > FIXED_LIMIT).collect();
    // GCRA: in any span of T seconds at most burst + rate x T are admitted;
    // checked over each second (by when a call was sent, with the slowest
    // call's time added to the span) and over the whole run.
    let slowest_us = decisions
        .iter()
        .filter(|d| d.answer != Answer::Late && d.answer != Answer::Refused)
        .map(|d| d.answered_us - d.sent_us)
        .max()
        .unwrap_or(0);
    let mut gcra_over = Vec::new();
    for value in 0..4u8 {
        let mut times: Vec<u64> = decisions
            .iter()
            .filter(|d| d.key == "gcra" && d.value == value && d.answer == Answer::Admitted)
            .map(|d| d.sent_us)
            .collect();
        times.sort_unstable();
        let span_us = 1_000_000 + slowest_us;
        let bound = GCRA_BURST + 1 + GCRA_RATE * span_us.div_ceil(1_000_000);
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] > 1_000_000 {
                lo += 1;
            }
            let n = (hi - lo + 1) as u64;
            if n > bound {
                gcra_over.push((value, times[lo], n, bound));
            }
        }
        if let (Some(first), Some(last)) = (times.first(), times.last()) {
            let whole =
                GCRA_BURST + 1 + GCRA_RATE * (last - first + slowest_us).div_ceil(1_000_000);
            if times.len() as u64 > whole {
                gcra_over.push((value, *first, times.len() as u64, whole));
            }
        }
    }
    let late = count(Answer::Late);
    let late_outside_faults = decisions
        .iter()
        .filter(|d| d.answer == Answer::Late && !in_fault(d))
        .count();
    let failure_mode_outside = decisions
        .iter()
        .filter(|d| d.answer == Answer::FailureMode && !in_fault(d))
        .count();
    // The failure mode answers within the store timeout (100 ms), plus a
    // margin for a busy two-core machine; outside the faults it answers
    // only when the store did not answer in time, which a starved machine
    // causes too: counted, not refused.
    let slowest_failure_mode_us = decisions
        .iter()
        .filter(|d| d.answer == Answer::FailureMode)
        .map(|d| d.answered_us - d.sent_us)
        .max()
        .unwrap_or(0);
    let logs: Vec<String> = instances.iter().map(|s| s.log_text()).collect();
    let panics = logs.iter().filter(|l| l.contains("panicked")).count();

    println!(
        "soak: {seconds} s, {} decisions ({} admitted, {} denied, {} by the failure mode ({} of them outside the faults, the slowest in {} ms), {} refused while an instance restarted, {} past the {DEADLINE:?} deadline), faults: {}; fixed-window windows over the limit: {}, GCRA spans over the bound: {}; slowest answer {} ms; RSS KiB / fds start {:?} end {:?}",
        decisions.len(),
        count(Answer::Admitted),
        count(Answer::Denied),
        count(Answer::FailureMode),
        failure_mode_outside,
        slowest_failure_mode_us / 1000,
        count(Answer::Refused),
        late,
        faults.iter().map(|f| f.0).collect::<Vec<_>>().join(", "),
        fixed_over.len(),
        gcra_over.len(),
        slowest_us / 1000,
        footprint_start,
        footprint_end,
    );
    assert!(decisions.len() > 1000, "only {} decisions", decisions.len());
    assert!(count(Answer::Denied) > 0, "the load never met a limit");
    assert!(
        fixed_over.is_empty(),
        "fixed window admitted over its limit of {FIXED_LIMIT}: {fixed_over:?}"
    );
    assert!(
        gcra_over.is_empty(),
        "GCRA admitted over its bound: (value, from µs, admitted, bound) {gcra_over:?}"
    );
    assert_eq!(
        without_reset, 0,
        "admitted fixed-window answers without a reset"
    );
    assert_eq!(
        late_outside_faults, 0,
        "calls past their deadline outside any fault"
    );
    assert!(
        slowest_failure_mode_us < 400_000,
        "a failure-mode answer took {} ms, past the 100 ms store timeout and its margin",
        slowest_failure_mode_us / 1000
    );
    assert_eq!(panics, 0, "a panic in a sluice log:\n{}", logs.join("\n"));
}
