//! `sluice-load`: a closed-loop load generator for Envoy's rate-limit API, and
//! the no-op server that is its ceiling.
//!
//! ```text
//! sluice-load --addr 127.0.0.1:8081 --connections 4 --concurrency 16 --duration 20s
//! sluice-load noop-server --listen 127.0.0.1:9091 [--stack tonic|hyper|raw-h2]
//! ```
//!
//! `--connections` HTTP/2 connections each carry `--concurrency` calls in
//! flight; every worker sends its next call as soon as the last one answers
//! (closed loop: latency is service time under that load, not under a fixed
//! arrival rate). Calls that complete during the warm-up are not counted.
//! Latencies go into one HDR histogram per worker, merged at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use sluice::grpc::{framed, ok_trailers, OkBody};
use sluice::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
use sluice::proto::rls::rate_limit_response::{Code, DescriptorStatus};
use sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::rls::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use sluice::proto::rls::{RateLimitRequest, RateLimitResponse};
use sluice::telemetry;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-load",
    about = "Load generator for Envoy's rate-limit API, and a no-op server (the ceiling)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the rate-limit API with a handler that answers OK at once.
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:9091")]
        listen: SocketAddr,
        /// Tokio worker threads (default: one per core, as `sluice serve`).
        #[arg(long)]
        threads: Option<usize>,
        /// The stack to answer on.
        #[arg(long, value_enum, default_value_t = Stack::Tonic)]
        stack: Stack,
    },
}

/// What the no-op server answers on.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Stack {
    /// tonic's server, as `sluice serve`.
    Tonic,
    /// hyper's HTTP/2 server with a hand-written handler: no tower or tonic.
    Hyper,
    /// The `h2` crate alone, each connection's calls polled in its own
    /// task: the ceiling of HTTP/2 itself.
    RawH2,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// The server to load.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: String,
    /// HTTP/2 connections.
    #[arg(long, short = 'c', default_value_t = 4)]
    connections: usize,
    /// Calls in flight on each connection.
    #[arg(long, short = 'm', default_value_t = 16)]
    concurrency: usize,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long to load before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Send exactly this many calls, all measured, instead of a timed run
    /// (no warm-up); for instruction counts under callgrind.
    #[arg(long, conflicts_with_all = ["duration", "warmup"])]
    calls: Option<u64>,
    /// The request's domain.
    #[arg(long, default_value = "weather")]
    domain: String,
    /// Descriptor keys; descriptor i of a call uses key i modulo their number.
    #[arg(long = "key", default_value = "client_id")]
    keys: Vec<String>,
    /// Descriptors per call: `N`, or `A..B` for a uniform draw in A..=B.
    #[arg(long, default_value = "1")]
    descriptors: DescriptorCount,
    /// Distinct values (client ids) drawn uniformly per descriptor.
    #[arg(long, default_value_t = 10_000)]
    clients: u64,
    /// Every descriptor carries the same value: one hot counter (overrides
    /// `--clients`).
    #[arg(long)]
    hot: bool,
    /// The request's `hits_addend` (0 means 1).
    #[arg(long, default_value_t = 0)]
    hits: u32,
    /// Per-call deadline; a call past it counts as an error.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Tokio worker threads of the client (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the value draws, for repeatable key sequences.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `N` or `A..B` (inclusive).
#[derive(Clone, Copy, Debug)]
struct DescriptorCount {
    min: usize,
    max: usize,
}

impl FromStr for DescriptorCount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| t.trim().parse::<usize>().map_err(|e| format!("'{t}': {e}"));
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b.trim_start_matches('='))?),
            None => {
                let n = parse(s)?;
                (n, n)
            }
        };
        if min == 0 || max < min {
            return Err(format!("'{s}': need 1 <= A <= B"));
        }
        Ok(DescriptorCount { min, max })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The subscriber `sluice serve` installs (text, `info`) for the no-op
    // server, so both servers filter h2's trace spans alike. With none
    // installed, each of those spans goes through tracing's `log` fallback:
    // about 8,500 instructions per call that sluice does not pay.
    let level = match cli.command {
        Some(Command::NoopServer { .. }) => "info",
        None => "warn",
    };
    if let Err(e) = telemetry::init_tracing(telemetry::LogFormat::Text, level, None) {
        eprintln!("sluice-load: {e:#}");
        return ExitCode::FAILURE;
    }
    let threads = match &cli.command {
        Some(Command::NoopServer { threads, .. }) => *threads,
        None => cli.load.threads,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-load: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::NoopServer { listen, stack, .. }) => match stack {
                Stack::Tonic => noop_server(listen).await,
                Stack::Hyper => each_connection(listen, "hyper", hyper_noop_connection).await,
                Stack::RawH2 => each_connection(listen, "raw h2", raw_h2_noop_connection).await,
            },
            None => run_load(cli.load).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// === The ceiling ===

/// Answers OK at once, one OK status per descriptor: what the same gRPC stack
/// costs with no decision behind it.
struct NoopHandler;

#[tonic::async_trait]
impl RateLimitService for NoopHandler {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let n = request.get_ref().descriptors.len();
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::Ok as i32,
                    ..DescriptorStatus::default()
                };
                n
            ],
            ..RateLimitResponse::default()
        }))
    }
}

async fn noop_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("sluice-load: no-op server on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(NoopHandler))
        .serve_with_incoming_shutdown(
            // TCP_NODELAY, as `sluice serve` sets it.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}

/// Accepts connections on `listen` (TCP_NODELAY, as `sluice serve`) and
/// serves each in its own task.
async fn each_connection<F, Fut>(listen: SocketAddr, stack: &str, serve: F) -> anyhow::Result<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "sluice-load: {stack} no-op server on {}",
        listener.local_addr()?
    );
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        tokio::spawn(serve(socket));
    }
}

/// One connection on `h2` alone: its calls are polled in its own task.
async fn raw_h2_noop_connection(socket: tokio::net::TcpStream) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let Ok(mut conn) = h2::server::handshake(socket).await else {
        return;
    };
    let mut calls = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => calls.push(raw_h2_call(request, respond)),
                _ => break,
            },
            Some(_) = calls.next(), if !calls.is_empty() => {}
        }
    }
}

/// One connection on hyper's HTTP/2 server.
async fn hyper_noop_connection(socket: tokio::net::TcpStream) {
    let service = hyper::service::service_fn(hyper_noop_call);
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
        .await;
}

async fn hyper_noop_call(
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<OkBody>, hyper::Error> {
    use http_body_util::BodyExt;
    let body = request.into_body().collect().await?.to_bytes();
    let mut response = http::Response::new(OkBody::new(noop_reply(&body)));
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The no-op answer to one framed `RateLimitRequest`, framed.
fn noop_reply(framed_request: &[u8]) -> bytes::Bytes {
    use prost::Message;
    let n = RateLimitRequest::decode(framed_request.get(5..).unwrap_or_default())
        .map(|r| r.descriptors.len())
        .unwrap_or(0);
    framed(&RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses: vec![
            DescriptorStatus {
                code: Code::Ok as i32,
                ..DescriptorStatus::default()
            };
            n
        ],
        ..RateLimitResponse::default()
    })
}

async fn raw_h2_call(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
) -> Result<(), h2::Error> {
    let mut body = request.into_body();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    let response = http::Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap_or_default();
    let mut send = respond.send_response(response, false)?;
    send.send_data(noop_reply(&buf), false)?;
    send.send_trailers(ok_trailers())
}

// === The load ===

/// What one worker saw during the measured window.
struct Tally {
    latency_us: Histogram<u64>,
    ok: u64,
    over_limit: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            // 1 µs .. 60 s at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            ok: 0,
            over_limit: 0,
            errors: BTreeMap::new(),
        })
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.latency_us.add(&other.latency_us)?;
        self.ok += other.ok;
        self.over_limit += other.over_limit;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        Ok(())
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The request shape shared by all workers.
struct Shape {
    domain: String,
    keys: Vec<String>,
    descriptors: DescriptorCount,
    /// The value pool; `--hot` makes it one value.
    values: Vec<String>,
    hits: u32,
}

impl Shape {
    fn request(&self, rng: &mut SplitMix64) -> RateLimitRequest {
        let span = (self.descriptors.max - self.descriptors.min) as u64 + 1;
        let n = self.descriptors.min + (rng.next() % span) as usize;
        let descriptors = (0..n)
            .map(|i| {
                let value = &self.values[(rng.next() % self.values.len() as u64) as usize];
                RateLimitDescriptor {
                    entries: vec![Entry {
                        key: self.keys[i % self.keys.len()].clone(),
                        value: value.clone(),
                    }],
                    limit: None,
                    hits_addend: None,
                }
            })
            .collect();
        RateLimitRequest {
            domain: self.domain.clone(),
            descriptors,
            hits_addend: self.hits,
        }
    }
}

/// A tiny, seedable generator; the draws only need to spread keys.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

async fn run_load(args: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(!args.keys.is_empty(), "--key needs at least one key");
    anyhow::ensure!(args.hot || args.clients > 0, "--clients must be at least 1");
    let uri = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let values = if args.hot {
        vec!["hot-client".to_owned()]
    } else {
        (0..args.clients).map(|i| format!("client-{i}")).collect()
    };
    let shape = std::sync::Arc::new(Shape {
        domain: args.domain.clone(),
        keys: args.keys.clone(),
        descriptors: args.descriptors,
        values,
        hits: args.hits,
    });

    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        // One Endpoint::connect is one HTTP/2 connection.
        let channel = Endpoint::from_shared(uri.clone())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {uri}: {e}"))?;
        channels.push(channel);
    }

    let started = Instant::now();
    let (measure_from, stop_at) = match args.calls {
        // A fixed count: everything is measured, and the budget ends the run.
        Some(_) => (started, started + Duration::from_secs(24 * 3_600)),
        None => (started + args.warmup, started + args.warmup + args.duration),
    };
    let budget = std::sync::Arc::new(AtomicU64::new(args.calls.unwrap_or(u64::MAX)));
    let mut workers = Vec::new();
    for (c, channel) in channels.iter().enumerate() {
        for m in 0..args.concurrency {
            let seed = args
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add((c * args.concurrency + m) as u64);
            workers.push(tokio::spawn(worker(
                RateLimitServiceClient::new(channel.clone()),
                shape.clone(),
                seed,
                args.timeout,
                measure_from,
                stop_at,
                budget.clone(),
            )));
        }
    }
    let mut total = Tally::new()?;
    for w in workers {
        total.merge(w.await??)?;
    }
    let elapsed = match args.calls {
        Some(_) => started.elapsed(),
        None => args.duration,
    };
    report(&args, &total, elapsed)
}

async fn worker(
    mut client: RateLimitServiceClient<Channel>,
    shape: std::sync::Arc<Shape>,
    seed: u64,
    timeout: Duration,
    measure_from: Instant,
    stop_at: Instant,
    budget: std::sync::Arc<AtomicU64>,
) -> anyhow::Result<Tally> {
    let mut rng = SplitMix64(seed);
    let mut tally = Tally::new()?;
    loop {
        let sent = Instant::now();
        if sent >= stop_at || !take_one(&budget) {
            break;
        }
        let mut request = tonic::Request::new(shape.request(&mut rng));
        request.set_timeout(timeout);
        let result = client.should_rate_limit(request).await;
        let done = Instant::now();
        // Count what completes inside the window, wherever it started.
        if done < measure_from || done > stop_at {
            continue;
        }
        let micros = u64::try_from((done - sent).as_micros()).unwrap_or(u64::MAX);
        tally.latency_us.saturating_record(micros.max(1));
        match result {
            Ok(response) => match response.into_inner().overall_code() {
                Code::Ok => tally.ok += 1,
                Code::OverLimit => tally.over_limit += 1,
                Code::Unknown => *tally.errors.entry("UNKNOWN_CODE".into()).or_default() += 1,
            },
            Err(status) => {
                *tally
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1
            }
        }
    }
    Ok(tally)
}

/// Takes one call from the shared budget; `false` once it is spent.
fn take_one(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

fn report(args: &LoadArgs, t: &Tally, elapsed: Duration) -> anyhow::Result<()> {
    let calls = t.ok + t.over_limit + t.error_count();
    let secs = elapsed.as_secs_f64();
    let rate = calls as f64 / secs;
    let h = &t.latency_us;
    let q = |p: f64| h.value_at_quantile(p);
    if args.json {
        let json = serde_json::json!({
            "addr": args.addr,
            "connections": args.connections,
            "concurrency_per_connection": args.concurrency,
            "in_flight": args.connections * args.concurrency,
            "duration_s": secs,
            "warmup_s": if args.calls.is_some() { 0.0 } else { args.warmup.as_secs_f64() },
            "domain": args.domain,
            "descriptors": format!("{}..{}", args.descriptors.min, args.descriptors.max),
            "clients": if args.hot { 1 } else { args.clients },
            "calls": calls,
            "calls_per_s": rate,
            "ok": t.ok,
            "over_limit": t.over_limit,
            "errors": t.error_count(),
            "errors_by_code": t.errors,
            "latency_us": {
                "mean": h.mean(),
                "p50": q(0.50),
                "p90": q(0.90),
                "p99": q(0.99),
                "p999": q(0.999),
                "max": h.max(),
            },
        });
        println!("{json}");
    } else {
        println!(
            "{} x {} in flight ({} total) for {:.2?}{}, against {}",
            args.connections,
            args.concurrency,
            args.connections * args.concurrency,
            elapsed,
            match args.calls {
                Some(n) => format!(" ({n} calls, no warm-up)"),
                None => format!(" after {:?} warm-up", args.warmup),
            },
            args.addr
        );
        println!("calls       {calls} ({rate:.0} calls/s)");
        println!(
            "results     ok {}  over_limit {}  errors {}",
            t.ok,
            t.over_limit,
            t.error_count()
        );
        for (code, n) in &t.errors {
            println!("  error     {code}: {n}");
        }
        println!(
            "latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.1})",
            q(0.50),
            q(0.90),
            q(0.99),
            q(0.999),
            h.max(),
            h.mean()
        );
    }
    Ok(())
}
