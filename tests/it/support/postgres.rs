//! A real PostgreSQL primary with a streaming hot-standby replica, started
//! by `.ci/postgres-replica.sh` in a fresh directory under /tmp on free
//! ports, and stopped (and deleted) on drop. Tests can stop and restart both
//! servers to play an outage.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{block_until, free_port, repo, tool};

pub struct PgCluster {
    pub dir: PathBuf,
    pub primary_port: u16,
    pub replica_port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/sluice`
    pub primary_url: String,
    pub replica_url: String,
}

fn script() -> PathBuf {
    repo().join(".ci/postgres-replica.sh")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// The `sluice` binary run against this cluster's primary, with the
    /// servers' key secret (`sluice migrate`, `tenants`, `keys issue`, ...).
    pub fn sluice(&self, key_secret: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .env("SLUICE_DATABASE_URL", &self.primary_url)
            .env("SLUICE_KEY_SECRET", key_secret)
            .current_dir(repo())
            .output()
            .expect("running sluice")
    }

    /// [`PgCluster::sluice`] for a command that must succeed: its stdout.
    pub fn sluice_ok(&self, key_secret: &str, args: &[&str]) -> String {
        let out = self.sluice(key_secret, args);
        assert!(
            out.status.success(),
            "sluice {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts both servers (about 3 s) and returns once the replica streams.
    pub fn start() -> PgCluster {
        // The servers run as `postgres` when we are root: the directory must
        // be one it can enter, so not under a 0700 home or temp dir.
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir under /tmp")
            .keep();
        let primary_port = free_port();
        let mut replica_port = free_port();
        while replica_port == primary_port {
            replica_port = free_port();
        }
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .arg(primary_port.to_string())
            .arg(replica_port.to_string())
            .env("PATH", path_with_tools())
            .stdin(Stdio::null())
            .output()
            .expect("running .ci/postgres-replica.sh");
        let cluster = PgCluster {
            dir,
            primary_port,
            replica_port,
            primary_url: format!("postgres://postgres@127.0.0.1:{primary_port}/sluice"),
            replica_url: format!("postgres://postgres@127.0.0.1:{replica_port}/sluice"),
        };
        assert!(
            out.status.success(),
            "could not start PostgreSQL (primary + replica); install it with \
             `bash .ci/install-tools.sh` or `apt-get install -y postgresql`:\n{}",
            describe(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&cluster.primary_url) && stdout.contains(&cluster.replica_url),
            "unexpected output from .ci/postgres-replica.sh:\n{}",
            describe(&out)
        );
        cluster
    }

    /// Stops both servers (fast shutdown: clients are disconnected).
    pub fn stop_servers(&self) {
        let out = self
            .stop_command()
            .expect("running .ci/postgres-replica.sh stop");
        assert!(
            out.status.success(),
            "stopping PostgreSQL:\n{}",
            describe(&out)
        );
    }

    /// `.ci/postgres-replica.sh stop` for this pair, run to completion.
    fn stop_command(&self) -> std::io::Result<Output> {
        Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .arg(self.primary_port.to_string())
            .arg(self.replica_port.to_string())
            .env("PATH", path_with_tools())
            .stdin(Stdio::null())
            .output()
    }

    /// Starts both servers again from their data directories.
    pub fn restart_servers(&self) {
        self.pg_ctl("primary", &["start"]);
        self.pg_ctl("replica", &["start"]);
        self.wait_accepting(&[self.primary_port, self.replica_port]);
    }

    /// Stops the replica alone (fast shutdown: clients are disconnected).
    pub fn stop_replica(&self) {
        self.pg_ctl("replica", &["-m", "fast", "stop"]);
    }

    /// Starts the replica again; it resumes streaming from the primary.
    pub fn start_replica(&self) {
        self.pg_ctl("replica", &["start"]);
        self.wait_accepting(&[self.replica_port]);
    }

    /// `pg_ctl -D <name's data> -w ACTION...`, as `postgres` when root.
    fn pg_ctl(&self, name: &str, action: &[&str]) {
        let data = self.dir.join(name);
        let log = self.dir.join(format!("{name}.log"));
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool("pg_ctl"));
            c
        } else {
            Command::new(tool("pg_ctl"))
        };
        let out = cmd
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60"])
            .args(action)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("running pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {action:?} on the {name}:\n{}\n{}",
            describe(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn wait_accepting(&self, ports: &[u16]) {
        for &port in ports {
            let back = block_until(Duration::from_secs(30), Duration::from_millis(50), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            assert!(back.is_some(), "port {port} did not come back");
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_command();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_with_tools() -> String {
    let tools = repo().join(".tools/bin");
    match std::env::var("PATH") {
        Ok(path) => format!("{}:{path}", tools.display()),
        Err(_) => tools.display().to_string(),
    }
}
