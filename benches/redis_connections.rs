//! Multiplexed connection vs. a bb8 pool, for the Redis store's calls.
//!
//! Starts its own `redis-server` (from `.tools/bin` or PATH) and runs the
//! store's real fixed-window script (one `EVALSHA` per call, as a decision
//! with one descriptor does) from 64 concurrent tasks, through:
//!
//! - one multiplexed connection (a `ConnectionManager` here; the store's
//!   `NodeConnection` holds the same `MultiplexedConnection` directly);
//! - four multiplexed connections, round-robin;
//! - bb8-redis pools of 8 and 64 connections (each checkout is exclusive;
//!   no `PING` on checkout, which would double the commands).
//!
//! Variants alternate over several rounds so they see the same machine.
//!
//! ```text
//! cargo bench --bench redis_connections
//! ROUNDS=3 SECONDS=5 IN_FLIGHT=64 cargo bench --bench redis_connections
//! ```

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8_redis::{bb8, RedisConnectionManager};
use hdrhistogram::Histogram;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, Value};
use sluice::limiter::{Algorithm, CounterOp, CounterSpec, Entry, KeyHasher};
use sluice::storage::redis::scripts::{add_load, add_script_call, parse_outcomes, Time, Unit};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> (Server, u16) {
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/bin/redis-server");
    let bin = if std::path::Path::new(local).exists() {
        local
    } else {
        "redis-server"
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server(
        Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (install with bash .ci/install-tools.sh)"),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server did not start");
}

/// One call's pipeline: the script for one counter out of 10 000.
fn pipeline(i: usize) -> Pipeline {
    let hasher = KeyHasher::from_secret(b"bench");
    let value = (i % 10_000).to_string();
    let op = CounterOp {
        key: hasher.counter_key(
            "bench",
            &[Entry {
                key: "k",
                value: &value,
            }],
            &[],
            Algorithm::FixedWindow,
            3600,
        ),
        spec: CounterSpec {
            algorithm: Algorithm::FixedWindow,
            limit: 1_000_000_000,
            period_us: 3_600_000_000,
            burst: 1_000_000_000,
            calendar: None,
        },
        hits: 1,
    };
    let mut pipe = redis::pipe();
    let (mut key, mut unit) = (String::new(), Vec::new());
    add_script_call(
        &mut pipe,
        std::iter::once(&Unit::single(
            &op,
            Time {
                now_us: None,
                local_us: 0,
            },
        )),
        &mut key,
        &mut unit,
    );
    pipe
}

enum Via {
    Multiplexed(Vec<ConnectionManager>),
    Pool(bb8::Pool<RedisConnectionManager>),
}

impl Via {
    async fn call(&self, pipe: &Pipeline, n: usize) -> Vec<Value> {
        match self {
            Via::Multiplexed(conns) => {
                let mut conn = conns[n % conns.len()].clone();
                conn.send_packed_commands(pipe, 0, 1).await.unwrap()
            }
            Via::Pool(pool) => {
                let mut conn = pool.get().await.unwrap();
                conn.req_packed_commands(pipe, 0, 1).await.unwrap()
            }
        }
    }
}

async fn run(via: Arc<Via>, in_flight: usize, seconds: u64) -> (f64, Histogram<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let (via, stop, counter) = (via.clone(), stop.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let mut n = t;
            while !stop.load(Ordering::Relaxed) {
                let pipe = pipeline(n);
                let started = Instant::now();
                let values = via.call(&pipe, n).await;
                hist.record(started.elapsed().as_micros() as u64).unwrap();
                assert!(
                    values.first().is_some_and(|v| parse_outcomes(v, 1).is_ok()),
                    "{values:?}"
                );
                counter.fetch_add(1, Ordering::Relaxed);
                n += in_flight;
            }
            hist
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let start_count = counter.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let calls = counter.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut merged = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        merged.add(t.await.unwrap()).unwrap();
    }
    (calls as f64 / elapsed.as_secs_f64(), merged)
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`: then
    // one short round checks that every variant works, and measures nothing.
    let measuring = std::env::args().any(|a| a == "--bench");
    let (rounds, seconds) = if measuring {
        (env_or("ROUNDS", 3), env_or("SECONDS", 5))
    } else {
        (1, 1)
    };
    let in_flight = env_or("IN_FLIGHT", 64) as usize;
    let (_server, port) = redis_server();
    let url = format!("redis://127.0.0.1:{port}");

    // Load the script once.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut loads = redis::pipe();
    add_load(&mut loads);
    let _: Vec<Value> = conn.req_packed_commands(&loads, 0, 1).await.unwrap();

    let manager = |n: usize| {
        let url = url.clone();
        async move {
            let mut conns = Vec::new();
            for _ in 0..n {
                let c = redis::Client::open(url.as_str()).unwrap();
                conns.push(
                    c.get_connection_manager_with_config(ConnectionManagerConfig::new())
                        .await
                        .unwrap(),
                );
            }
            Arc::new(Via::Multiplexed(conns))
        }
    };
    let pool = |size: u32| {
        let url = url.clone();
        async move {
            let pool = bb8::Pool::builder()
                .max_size(size)
                .min_idle(Some(size))
                .test_on_check_out(false)
                .build(RedisConnectionManager::new(url.as_str()).unwrap())
                .await
                .unwrap();
            Arc::new(Via::Pool(pool))
        }
    };

    println!(
        "{in_flight} calls in flight, {seconds} s per run, {rounds} rounds; 1 EVALSHA per call"
    );
    println!(
        "{:<28} {:>10} {:>8} {:>8} {:>8}",
        "variant", "calls/s", "p50 µs", "p99 µs", "p999 µs"
    );
    for round in 1..=rounds {
        for (name, via) in [
            ("multiplexed x1", manager(1).await),
            ("multiplexed x4", manager(4).await),
            ("bb8 pool of 8", pool(8).await),
            ("bb8 pool of 64", pool(64).await),
        ] {
            let (rate, h) = run(via, in_flight, seconds).await;
            println!(
                "{:<28} {:>10.0} {:>8} {:>8} {:>8}",
                format!("{name} (round {round})"),
                rate,
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999)
            );
        }
    }
}
