//! Real Redis servers for tests: a standalone `redis-server` on its own port
//! (optionally with a password, an ACL user, TLS only), and a 6-node Cluster
//! started by `.ci/redis-cluster.sh`. Everything is stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::certs::TestCa;
use super::{block_until, free_port, free_port_range, repo, tool, ChildGuard};

/// How to start a standalone server.
#[derive(Clone, Default)]
pub struct RedisConfig {
    /// `requirepass`: the default user's password.
    pub password: Option<String>,
    /// An ACL user `(name, password)` allowed everything.
    pub user: Option<(String, String)>,
    /// Serve TLS only (no plaintext port), with a certificate from a test CA.
    pub tls: bool,
}

pub struct RedisServer {
    pub port: u16,
    pub config: RedisConfig,
    /// The CA that signed the server certificate, when TLS is on.
    pub ca_pem: Option<String>,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

impl RedisServer {
    /// A plain server without authentication.
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisConfig::default())
    }

    pub fn start_with(config: RedisConfig) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let ca_pem = config.tls.then(|| {
            let ca = TestCa::new("sluice test redis CA");
            ca.write_ca(dir.path());
            ca.server().write(dir.path(), "redis");
            ca.cert_pem()
        });
        let mut server = RedisServer {
            port: free_port(),
            config,
            ca_pem,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let mut cmd = Command::new(tool("redis-server"));
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"));
        if self.config.tls {
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(dir.join("redis.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("redis.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        if let Some(password) = &self.config.password {
            cmd.args(["--requirepass", password]);
        }
        if let Some((user, password)) = &self.config.user {
            let password = format!(">{password}");
            cmd.args(["--user", user, "on", &password, "~*", "&*", "+@all"]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        self.child = Some(ChildGuard::spawn("redis-server", &mut cmd));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let ready = block_until(Duration::from_secs(10), Duration::from_millis(20), || {
            if self.cli(&["PING"]).trim() == "PONG" {
                return true;
            }
            let log = self.log();
            if let Some(child) = &mut self.child {
                child.assert_running(&log);
            }
            false
        });
        assert!(
            ready.is_some(),
            "redis-server on port {} not ready after 10 s:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `redis://` (or `rediss://`) URL, with credentials if configured.
    pub fn url(&self) -> String {
        let scheme = if self.config.tls { "rediss" } else { "redis" };
        let auth = match (&self.config.user, &self.config.password) {
            (Some((user, password)), _) => format!("{user}:{password}@"),
            (None, Some(password)) => format!(":{password}@"),
            (None, None) => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{}/0", self.port)
    }

    /// The same URL without credentials.
    pub fn url_without_auth(&self) -> String {
        let scheme = if self.config.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli` against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(tool("redis-cli"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.config.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(self.dir.path().join("ca.pem"));
        }
        match (&self.config.user, &self.config.password) {
            (Some((user, password)), _) => {
                cmd.args(["--user", user, "--pass", password, "--no-auth-warning"]);
            }
            (None, Some(password)) => {
                cmd.args(["-a", password, "--no-auth-warning"]);
            }
            (None, None) => {}
        }
        let out = cmd.args(args).output().expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the server (SIGKILL): it is down until [`RedisServer::restart`].
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Redis' own clock, in microseconds.
    pub fn time_us(&self) -> u64 {
        parse_time(&self.cli(&["TIME"]))
    }

    /// `calls` of one command from `INFO commandstats` (0 if never called).
    pub fn command_calls(&self, command: &str) -> u64 {
        command_calls(&self.cli(&["INFO", "commandstats"]), command)
    }
}

/// `TIME` output of redis-cli (two lines) -> microseconds.
pub fn parse_time(out: &str) -> u64 {
    let mut lines = out
        .lines()
        .map(|l| l.trim().parse::<u64>().expect("TIME output"));
    let (s, us) = (lines.next().unwrap(), lines.next().unwrap());
    s * 1_000_000 + us
}

/// `cmdstat_evalsha:calls=12,...` -> 12.
pub fn command_calls(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{}:calls=", command.to_lowercase());
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A 3-master, 3-replica Cluster on `base..base+6`, started and stopped by
/// `.ci/redis-cluster.sh`.
pub struct RedisCluster {
    pub base: u16,
    dir: tempfile::TempDir,
    /// Node port -> the port it announces to clients, when not its own
    /// ([`RedisCluster::announce`]).
    announced: std::sync::Mutex<std::collections::HashMap<u16, u16>>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        tool("redis-server");
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let base = free_port_range(6);
        let out = Command::new("bash")
            .arg(repo().join(".ci/redis-cluster.sh"))
            .arg("start")
            .arg(dir.path())
            .arg(base.to_string())
            .stderr(Stdio::piped())
            .output()
            .expect("running .ci/redis-cluster.sh");
        assert!(
            out.status.success(),
            "bash .ci/redis-cluster.sh start {} {base} failed:\n{}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("REDIS_CLUSTER_NODES="),
            "unexpected output: {stdout}"
        );
        RedisCluster {
            base,
            dir,
            announced: Default::default(),
        }
    }

    /// Makes each node announce another port to clients (`CLUSTER SLOTS`,
    /// redirections; replicas follow it too), e.g. a proxy's in front of
    /// it, and waits until every node sees every announcement. The cluster
    /// bus stays direct, so a proxy that cuts clients off fails no node
    /// over. A restarted node announces the same port.
    pub async fn announce(&self, ports: &std::collections::HashMap<u16, u16>) {
        for (node, port) in ports {
            let set = self.cli(
                *node,
                &["CONFIG", "SET", "cluster-announce-port", &port.to_string()],
            );
            assert_eq!(set.trim(), "OK", "node {node}: {set}");
        }
        self.announced.lock().unwrap().clone_from(ports);
        let seen = super::eventually(Duration::from_secs(10), || {
            self.ports().iter().all(|node| {
                let nodes = self.cli(*node, &["CLUSTER", "NODES"]);
                ports
                    .values()
                    .all(|p| nodes.contains(&format!("127.0.0.1:{p}@")))
            })
        })
        .await;
        assert!(seen.is_some(), "the nodes never saw the announced ports");
    }

    /// A node's port from the port it announces.
    fn node_of(&self, announced: u16) -> u16 {
        let map = self.announced.lock().unwrap();
        map.iter()
            .find(|(_, a)| **a == announced)
            .map_or(announced, |(node, _)| *node)
    }

    pub fn ports(&self) -> Vec<u16> {
        (self.base..self.base + 6).collect()
    }

    /// Seed URLs: every node, as an operator would list them.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new(tool("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ports of the current masters that serve slots, as the first
    /// answering node sees them. (Right after start-up a node's view may
    /// still show a replica as a master without slots.)
    pub fn masters(&self) -> Vec<u16> {
        for port in self.ports() {
            let nodes = self.cli(port, &["CLUSTER", "NODES"]);
            let masters: Vec<u16> = nodes
                .lines()
                .filter(|l| {
                    let fields: Vec<&str> = l.split(' ').collect();
                    let flags = fields.get(2).copied().unwrap_or("");
                    flags.contains("master") && !flags.contains("fail") && fields.len() > 8
                })
                .filter_map(|l| {
                    let addr = l.split(' ').nth(1)?;
                    let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
                    Some(self.node_of(port))
                })
                .collect();
            if !masters.is_empty() {
                return masters;
            }
        }
        Vec::new()
    }

    fn pid(&self, port: u16) -> i32 {
        let path = self.dir.path().join(port.to_string()).join("redis.pid");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .trim()
            .parse()
            .expect("pid")
    }

    /// SIGKILL one node.
    pub fn kill(&self, port: u16) {
        let pid = self.pid(port);
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -9 {pid} failed");
        let path = self.dir.path().join(port.to_string()).join("redis.pid");
        let _ = std::fs::remove_file(path);
    }

    /// Starts a killed node again with its old configuration; it rejoins
    /// (as a replica if it was failed over).
    pub fn restart(&self, port: u16) {
        let node_dir: PathBuf = self.dir.path().join(port.to_string());
        let status = Command::new(tool("redis-server"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&node_dir)
            .arg("--logfile")
            .arg(node_dir.join("redis.log"))
            .arg("--pidfile")
            .arg(node_dir.join("redis.pid"))
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", "2000"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .args(["--daemonize", "yes"])
            .args(
                self.announced
                    .lock()
                    .unwrap()
                    .get(&port)
                    .map(|p| ["--cluster-announce-port".to_owned(), p.to_string()])
                    .iter()
                    .flatten(),
            )
            .status()
            .expect("starting redis-server");
        assert!(status.success(), "restarting node {port} failed");
    }

    /// Whether every node says the cluster is ok and every replica is linked.
    pub fn healthy(&self) -> bool {
        Command::new("bash")
            .arg(repo().join(".ci/redis-cluster.sh"))
            .arg("status")
            .arg(self.dir.path())
            .arg(self.base.to_string())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Redis' clock on one node, in microseconds.
    pub fn time_us(&self, port: u16) -> u64 {
        parse_time(&self.cli(port, &["TIME"]))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join(".ci/redis-cluster.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .arg(self.base.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// === Load ===

/// What one gRPC call got, and how long it took.
#[derive(Default)]
pub struct Tally {
    pub decided: AtomicU64,
    pub by_failure_mode: AtomicU64,
    pub errors: AtomicU64,
    pub slowest_us: AtomicU64,
}

impl Tally {
    pub fn reset(&self) {
        for n in [
            &self.decided,
            &self.by_failure_mode,
            &self.errors,
            &self.slowest_us,
        ] {
            n.store(0, Ordering::SeqCst);
        }
    }

    pub fn snapshot(&self) -> (u64, u64, u64, Duration) {
        (
            self.decided.load(Ordering::SeqCst),
            self.by_failure_mode.load(Ordering::SeqCst),
            self.errors.load(Ordering::SeqCst),
            Duration::from_micros(self.slowest_us.load(Ordering::SeqCst)),
        )
    }
}

/// `tasks` gRPC callers in a loop until `stop`, each over 64 values of
/// `key`; a decision carries the limit, an answer by the failure mode
/// (allow) does not.
pub fn drive(
    sluice: &super::TestServer,
    domain: &'static str,
    key: &'static str,
    tasks: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|t| {
            let url = sluice.grpc_url();
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let mut client =
                    sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(
                        url,
                    )
                    .await
                    .unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let value = format!("{t}-{}", i % 64);
                    let started = Instant::now();
                    let reply = client
                        .should_rate_limit(super::request(domain, &[&[(key, &value)]]))
                        .await;
                    tally
                        .slowest_us
                        .fetch_max(started.elapsed().as_micros() as u64, Ordering::SeqCst);
                    match reply {
                        Ok(r)
                            if r.get_ref()
                                .statuses
                                .iter()
                                .all(|s| s.current_limit.is_some()) =>
                        {
                            tally.decided.fetch_add(1, Ordering::SeqCst)
                        }
                        Ok(_) => tally.by_failure_mode.fetch_add(1, Ordering::SeqCst),
                        Err(_) => tally.errors.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect()
}

impl RedisCluster {
    /// Moves `slots` slots (and their keys) from the master on `from` to the
    /// master on `to`, with `redis-cli --cluster reshard`.
    pub fn reshard(&self, from: u16, to: u16, slots: u32) {
        let id = |port| self.cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
        let out = Command::new(tool("redis-cli"))
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A 3-master, 3-replica Cluster that speaks only TLS (clients, replication
/// and the cluster bus) and requires a password on every node, with a
/// certificate from a test CA. Started here (not by `.ci/redis-cluster.sh`,
/// whose health checks speak plaintext); stopped on drop.
pub struct TlsRedisCluster {
    pub base: u16,
    pub password: String,
    pub ca_pem: String,
    dir: tempfile::TempDir,
    _nodes: Vec<ChildGuard>,
}

impl TlsRedisCluster {
    pub fn start() -> TlsRedisCluster {
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let ca = TestCa::new("sluice test redis cluster CA");
        ca.write_ca(dir.path());
        ca.server().write(dir.path(), "redis");
        // The cluster bus always wants mutual TLS: nodes dial each other
        // with a client certificate.
        ca.client("redis-node").write(dir.path(), "node");
        let base = free_port_range(6);
        let password = "cluster-pw".to_owned();
        let mut nodes = Vec::new();
        for port in base..base + 6 {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut cmd = Command::new(tool("redis-server"));
            cmd.args(["--bind", "127.0.0.1", "--port", "0"])
                .args(["--tls-port", &port.to_string()])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .arg("--tls-cert-file")
                .arg(dir.path().join("redis.pem"))
                .arg("--tls-key-file")
                .arg(dir.path().join("redis.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.path().join("ca.pem"))
                .arg("--tls-client-cert-file")
                .arg(dir.path().join("node.pem"))
                .arg("--tls-client-key-file")
                .arg(dir.path().join("node.key"))
                .args(["--tls-auth-clients", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--requirepass", &password, "--masterauth", &password])
                .arg("--dir")
                .arg(&node_dir)
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            nodes.push(ChildGuard::spawn("redis-server", &mut cmd));
        }
        let cluster = TlsRedisCluster {
            base,
            password,
            ca_pem: ca.cert_pem(),
            dir,
            _nodes: nodes,
        };
        for port in cluster.ports() {
            cluster.wait_for(port, "PONG", &["PING"]);
        }
        let mut create = cluster.cli_command(base);
        create.args(["--cluster", "create"]);
        for port in cluster.ports() {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --tls --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every node agrees, and every replica streams from its master.
        for port in cluster.ports() {
            cluster.wait_for(port, "cluster_state:ok", &["CLUSTER", "INFO"]);
        }
        let linked = block_until(Duration::from_secs(30), Duration::from_millis(100), || {
            let ports = cluster.ports();
            let linked = ports.iter().filter(|&&p| {
                cluster
                    .cli(p, &["INFO", "replication"])
                    .contains("master_link_status:up")
            });
            linked.count() == 3
        });
        assert!(
            linked.is_some(),
            "TLS cluster replicas not linked after 30 s"
        );
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        (self.base..self.base + 6).collect()
    }

    /// Seed URLs without credentials (the password comes separately).
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("rediss://127.0.0.1:{p}"))
            .collect()
    }

    /// `redis-cli` for one node, killed after 60 s (`--cluster create`
    /// waits forever for nodes that cannot reach each other).
    fn cli_command(&self, port: u16) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg("60")
            .arg(tool("redis-cli"))
            .args(["--tls", "--cacert"])
            .arg(self.dir.path().join("ca.pem"))
            .args(["-a", &self.password, "--no-auth-warning"])
            .args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        cmd
    }

    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = self
            .cli_command(port)
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, port: u16, expect: &str, args: &[&str]) {
        let seen = block_until(Duration::from_secs(30), Duration::from_millis(50), || {
            self.cli(port, args).contains(expect)
        });
        if seen.is_none() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{port}/redis.log")))
                .unwrap_or_default();
            panic!("node {port}: no `{expect}` from {args:?} within 30 s:\n{log}");
        }
    }
}

// === Sentinel ===

/// A Redis Sentinel group on 127.0.0.1: a master and two replicas (with a
/// password, as a production group has) and three sentinels (without one)
/// monitoring them as `mymaster` with a quorum of 2, each a child process
/// killed on drop. Sentinels declare a master down after 1 s without an
/// answer.
pub struct RedisSentinels {
    pub password: String,
    /// The data nodes' ports: the first starts as the master.
    pub ports: Vec<u16>,
    pub sentinel_ports: Vec<u16>,
    nodes: Vec<Option<ChildGuard>>,
    _sentinels: Vec<ChildGuard>,
    dir: tempfile::TempDir,
}

pub const SENTINEL_MASTER: &str = "mymaster";

impl RedisSentinels {
    pub fn start() -> RedisSentinels {
        let sentinel_bin = tool("redis-sentinel");
        let dir = tempfile::tempdir().expect("temp dir for the sentinel group");
        let password = "sentinel-group-secret".to_owned();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut group = RedisSentinels {
            password,
            ports: ports.clone(),
            sentinel_ports: sentinel_ports.clone(),
            nodes: Vec::new(),
            _sentinels: Vec::new(),
            dir,
        };
        for (i, &port) in ports.iter().enumerate() {
            let node = group.spawn_node(port, (i > 0).then_some(ports[0]));
            group.nodes.push(Some(node));
        }
        let linked = block_until(Duration::from_secs(20), Duration::from_millis(50), || {
            ports[1..].iter().all(|&p| {
                group
                    .cli(p, &["INFO", "replication"])
                    .contains("master_link_status:up")
            })
        });
        assert!(
            linked.is_some(),
            "the replicas never synced with the master"
        );
        for &port in &sentinel_ports {
            let dir = group.dir.path().join(format!("sentinel-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            // Sentinels rewrite their config file: it must be writable.
            let config = dir.join("sentinel.conf");
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                     sentinel auth-pass {SENTINEL_MASTER} {password}\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 10000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    dir = dir.display(),
                    log = dir.join("sentinel.log").display(),
                    master = ports[0],
                    password = group.password,
                ),
            )
            .unwrap();
            let mut cmd = Command::new(&sentinel_bin);
            cmd.arg(&config).stdout(Stdio::null()).stderr(Stdio::null());
            group
                ._sentinels
                .push(ChildGuard::spawn("redis-sentinel", &mut cmd));
        }
        // Ready once every sentinel knows both replicas and both other
        // sentinels (they find each other through the master).
        let ready = block_until(Duration::from_secs(30), Duration::from_millis(100), || {
            sentinel_ports.iter().all(|&p| {
                let info = group.sentinel_cli(p, &["SENTINEL", "MASTER", SENTINEL_MASTER]);
                field(&info, "num-slaves") == Some("2")
                    && field(&info, "num-other-sentinels") == Some("2")
                    && field(&info, "flags") == Some("master")
            })
        });
        assert!(
            ready.is_some(),
            "the sentinels did not see the whole group within 30 s:\n{}",
            group.sentinel_log(sentinel_ports[0])
        );
        group
    }

    fn spawn_node(&self, port: u16, replica_of: Option<u16>) -> ChildGuard {
        let dir = self.dir.path().join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(tool("redis-server"));
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--requirepass", &self.password])
            .args(["--masterauth", &self.password])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"));
        if let Some(master) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        ChildGuard::spawn("redis-server", &mut cmd)
    }

    /// The store URL sluice takes: every sentinel, the master's password.
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!(
            "redis+sentinel://:{}@{}/{SENTINEL_MASTER}",
            self.password,
            sentinels.join(",")
        )
    }

    /// `redis-cli` against a data node.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new(tool("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-a", &self.password, "--no-auth-warning"])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `redis-cli` against a sentinel.
    pub fn sentinel_cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new(tool("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sentinel_log(&self, port: u16) -> String {
        let path = self
            .dir
            .path()
            .join(format!("sentinel-{port}/sentinel.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn master(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|&p| {
            let out =
                self.sentinel_cli(p, &["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER]);
            out.lines().nth(1)?.trim().parse().ok()
        })
    }

    /// SIGKILL the data node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).expect("a node");
        self.nodes[i] = None;
    }

    /// Starts a killed node again, empty; the sentinels make it a replica.
    pub fn restart(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).expect("a node");
        self.nodes[i] = Some(self.spawn_node(port, None));
    }
}

/// A field of a flat `key\nvalue\n...` redis-cli reply.
fn field<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let lines: Vec<&str> = reply.lines().map(str::trim).collect();
    lines
        .iter()
        .position(|l| *l == name)
        .and_then(|i| lines.get(i + 1).copied())
}
