//! A wire-level fuzz of the running server, from a separate process: the
//! real `sluice` binary serves, and this process sends it random and mutated
//! HTTP/2 and gRPC frames on the gRPC port and random and mutated HTTP on
//! the HTTP port, from several connections at once, for a bounded time
//! (`SLUICE_WIRE_FUZZ_SECS`, default 8; the seed is printed, and
//! `SLUICE_WIRE_FUZZ_SEED` replays one). Throughout, well-formed gRPC and
//! `/json` calls must be answered within a deadline; at the end the process
//! must still run, and its log must hold no panic.

use crate::support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::proto::rls::rate_limit_response::Code;
use support::{request, SluiceProcess};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const CALL_DEADLINE: Duration = Duration::from_secs(2);
const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// xorshift64*: small, fast, and reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

// === HTTP/2 frames ===

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header as an HPACK literal without indexing, new name (RFC 7541 6.2.2).
fn literal(name: &str, value: &str, out: &mut Vec<u8>) {
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn grpc_headers(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "sluice"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        literal(name, value, &mut block);
    }
    block
}

/// A well-formed `ShouldRateLimit` message for the examples' rules.
fn grpc_message(rng: &mut Rng) -> Vec<u8> {
    use prost::Message as _;
    let domain = *rng.pick(&["weather", "business", "nope", ""]);
    let client = format!("wire-{}", rng.below(1000));
    let message = request(domain, &[&[("client_id", client.as_str())]]).encode_to_vec();
    let mut data = vec![0];
    data.extend_from_slice(&(message.len() as u32).to_be_bytes());
    data.extend(message);
    data
}

/// One well-formed gRPC call on stream `stream`: HEADERS then DATA.
fn grpc_call(rng: &mut Rng, stream: u32) -> Vec<Vec<u8>> {
    vec![
        frame(0x1, 0x4, stream, &grpc_headers(PATH)),
        frame(0x0, 0x1, stream, &grpc_message(rng)),
    ]
}

/// Changes a few bytes, cuts, repeats or splices the frames.
fn mutate(rng: &mut Rng, frames: &mut Vec<Vec<u8>>) {
    for _ in 0..=rng.below(4) {
        if frames.is_empty() {
            return;
        }
        let i = rng.below(frames.len() as u64) as usize;
        match rng.below(6) {
            0 if !frames[i].is_empty() => {
                let f = &mut frames[i];
                let at = rng.below(f.len() as u64) as usize;
                f[at] = rng.next() as u8;
            }
            1 => {
                let cut = rng.below(frames[i].len() as u64) as usize;
                frames[i].truncate(cut);
            }
            2 => {
                let copy = frames[i].clone();
                for _ in 0..rng.below(50) {
                    frames.push(copy.clone());
                }
            }
            3 => {
                // A frame type, flags or stream id of its own.
                let f = &mut frames[i];
                if f.len() >= 9 {
                    f[3 + rng.below(6) as usize] = rng.next() as u8;
                }
            }
            4 => {
                let len = rng.below(300) as usize;
                frames.insert(i, rng.bytes(len));
            }
            _ => {
                frames.remove(i);
            }
        }
    }
}

/// What one connection to the gRPC port sends.
fn grpc_session(rng: &mut Rng) -> Vec<u8> {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut frames: Vec<Vec<u8>> = match rng.below(8) {
        // Random bytes, with or without the preface.
        0 => {
            let len = rng.below(2048) as usize;
            vec![rng.bytes(len)]
        }
        1 => {
            let len = rng.below(2048) as usize;
            vec![preface.clone(), rng.bytes(len)]
        }
        // Random frames.
        2 => {
            let mut frames = vec![preface.clone(), frame(0x4, 0, 0, &[])];
            for _ in 0..rng.below(40) {
                let len = rng.below(64) as usize;
                let payload = rng.bytes(len);
                frames.push(frame(
                    rng.below(12) as u8,
                    rng.next() as u8,
                    rng.below(8) as u32,
                    &payload,
                ));
            }
            frames
        }
        // Floods: PINGs, RST_STREAMs, SETTINGS, CONTINUATIONs, WINDOW_UPDATEs.
        3 => {
            let mut frames = vec![preface.clone(), frame(0x4, 0, 0, &[])];
            let flood = match rng.below(5) {
                0 => frame(0x6, 0, 0, &[0; 8]),
                1 => frame(0x3, 0, 1, &[0, 0, 0, 8]),
                2 => frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 0]),
                3 => frame(0x9, 0, 1, &grpc_headers(PATH)),
                _ => frame(0x8, 0, 0, &[0x7f, 0xff, 0xff, 0xff]),
            };
            for _ in 0..rng.below(2000) {
                frames.push(flood.clone());
            }
            frames
        }
        // Calls opened and cancelled at once (rapid reset).
        4 => {
            let mut frames = vec![preface.clone(), frame(0x4, 0, 0, &[])];
            for stream in (1..400u32).step_by(2) {
                frames.push(frame(0x1, 0x4, stream, &grpc_headers(PATH)));
                frames.push(frame(0x3, 0, stream, &[0, 0, 0, 8]));
            }
            frames
        }
        // Mutated well-formed calls.
        _ => {
            let mut frames = vec![preface.clone(), frame(0x4, 0, 0, &[])];
            for stream in (1..=(1 + 2 * rng.below(8) as u32)).step_by(2) {
                frames.extend(grpc_call(rng, stream));
            }
            mutate(rng, &mut frames);
            frames
        }
    };
    if rng.chance(4) {
        mutate(rng, &mut frames);
    }
    frames.concat()
}

/// What one connection to the HTTP port sends.
fn http_session(rng: &mut Rng) -> Vec<u8> {
    let body = format!(
        r#"{{"domain":"weather","descriptors":[{{"entries":[{{"key":"client_id","value":"w{}"}}]}}]}}"#,
        rng.below(100)
    );
    let well_formed = format!(
        "POST /json HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut bytes = match rng.below(6) {
        0 => {
            let len = rng.below(2048) as usize;
            rng.bytes(len)
        }
        1 => {
            let method = *rng.pick(&["GET", "POST", "PUT", "DELETE", "OPTIONS", "X", ""]);
            let path = *rng.pick(&["/json", "/explain", "/metrics", "/readyz", "/", "*", "/%ff"]);
            let len = rng.below(100) as usize;
            let junk = String::from_utf8_lossy(&rng.bytes(len)).into_owned();
            format!("{method} {path} HTTP/1.1\r\nHost: s\r\nX: {junk}\r\n\r\n").into_bytes()
        }
        2 => format!(
            "POST /json HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n",
            rng.below(100_000),
            String::from_utf8_lossy(&rng.bytes(64))
        )
        .into_bytes(),
        3 => format!(
            "POST /json HTTP/1.1\r\nHost: s\r\nContent-Length: {}\r\n\r\n{{\"domain\":",
            rng.next()
        )
        .into_bytes(),
        // Pipelined well-formed requests.
        4 => well_formed.repeat(1 + rng.below(20) as usize).into_bytes(),
        _ => {
            let mut bytes = well_formed.into_bytes();
            for _ in 0..=rng.below(8) {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = rng.next() as u8;
            }
            bytes
        }
    };
    if rng.chance(8) {
        // And a header block far over the bound.
        bytes.extend(b"X-Big: ".iter().chain(&vec![b'a'; 200_000]));
    }
    bytes
}

/// Sends `bytes` (in a few pieces) and reads what comes back for a moment.
async fn send(addr: SocketAddr, bytes: Vec<u8>, rng: &mut Rng) -> usize {
    let Ok(Ok(mut tcp)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
    else {
        return 0;
    };
    let pieces = 1 + rng.below(4) as usize;
    let size = bytes.len().div_ceil(pieces).max(1);
    for piece in bytes.chunks(size) {
        if tcp.write_all(piece).await.is_err() {
            break;
        }
    }
    let mut read = 0;
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_millis(100 + rng.below(300));
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        read += n;
    }
    read
}

#[tokio::test]
async fn random_and_mutated_frames_never_stop_well_formed_calls() {
    let _machine = crate::support::MACHINE.lock().await;
    let seconds: u64 = std::env::var("SLUICE_WIRE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("SLUICE_WIRE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("wire fuzz: SLUICE_WIRE_FUZZ_SEED={seed} for {seconds} s");

    let mut command = Command::new(support::sluice_bin());
    command
        .args(["serve", "--rules", "examples/rules"])
        .args(["--handshake-timeout", "1s", "--http-idle-timeout", "1s"])
        .current_dir(support::repo());
    let mut sluice = SluiceProcess::start(command).await;
    let (grpc, http) = (sluice.grpc, sluice.http);

    let until = Instant::now() + Duration::from_secs(seconds);
    let sessions = Arc::new(AtomicU64::new(0));
    let answered_bytes = Arc::new(AtomicU64::new(0));
    let mut fuzzers = Vec::new();
    for worker in 0..6u64 {
        let (sessions, answered_bytes) = (sessions.clone(), answered_bytes.clone());
        fuzzers.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (worker + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            while Instant::now() < until {
                let (addr, bytes) = if worker % 3 == 2 {
                    (http, http_session(&mut rng))
                } else {
                    (grpc, grpc_session(&mut rng))
                };
                let read = send(addr, bytes, &mut rng).await;
                sessions.fetch_add(1, Ordering::Relaxed);
                answered_bytes.fetch_add(read as u64, Ordering::Relaxed);
            }
        }));
    }

    // Well-formed calls throughout: on one connection, on new connections,
    // and on /json.
    let mut steady =
        sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(format!(
            "http://{grpc}"
        ))
        .await
        .expect("connecting to sluice");
    let mut calls = 0;
    let body = r#"{"domain":"weather","descriptors":[{"entries":[{"key":"client_id","value":"steady"}]}]}"#;
    while Instant::now() < until {
        let call = steady.should_rate_limit(request("weather", &[&[("client_id", "steady")]]));
        let answer = tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .unwrap_or_else(|_| {
                panic!("call {calls} not answered within {CALL_DEADLINE:?} (seed {seed})")
            })
            .unwrap_or_else(|e| panic!("call {calls} failed: {e} (seed {seed})"));
        assert!(matches!(
            answer.into_inner().overall_code(),
            Code::Ok | Code::OverLimit
        ));
        if calls % 10 == 0 {
            let fresh = tokio::time::timeout(CALL_DEADLINE, async {
                let mut c =
                    sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(
                        format!("http://{grpc}"),
                    )
                    .await
                    .ok()?;
                c.should_rate_limit(request("weather", &[&[("client_id", "fresh")]]))
                    .await
                    .ok()
            })
            .await;
            assert!(
                matches!(fresh, Ok(Some(_))),
                "a new connection's call not answered within {CALL_DEADLINE:?} (seed {seed})"
            );
            let json =
                tokio::time::timeout(CALL_DEADLINE, support::http::post_json(http, "/json", body))
                    .await;
            assert!(
                matches!(&json, Ok(Ok(r)) if r.status == 200 || r.status == 429),
                "/json not answered within {CALL_DEADLINE:?}: {json:?} (seed {seed})"
            );
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for fuzzer in fuzzers {
        fuzzer.await.unwrap();
    }
    let sessions = sessions.load(Ordering::Relaxed);
    println!(
        "wire fuzz: {sessions} fuzzing connections, {} bytes answered to them, {calls} well-formed calls answered",
        answered_bytes.load(Ordering::Relaxed)
    );
    assert!(
        sessions > 100,
        "only {sessions} fuzzing connections were made"
    );
    assert!(
        answered_bytes.load(Ordering::Relaxed) > 0,
        "the server never answered a fuzzing connection: the generator sends nothing it reads"
    );
    let log = sluice.log_text();
    sluice.process.assert_running(&log);
    assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
}
