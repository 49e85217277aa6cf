//! Replays every committed input of the fuzz corpora (`fuzz/corpus/TARGET/`:
//! seeds, inputs the fuzzer found that reach new code, and every crash it
//! ever found, kept as a regression) through the same function the fuzz
//! target calls (`fuzz/src/lib.rs`), on the stable compiler, in CI.

use crate::support;

// `lua_differential` opens its own connection, for the fuzzer; the replay
// below hands `lua_differential_on` one to a Redis of its own.
#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = support::repo().join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("fuzz target {target} fails on {}", path.display());
        }
    }
}

#[test]
fn rules_yaml() {
    replay("rules_yaml", targets::rules_yaml);
}

#[test]
fn catalog() {
    replay("catalog", targets::catalog);
}

#[test]
fn decision() {
    replay("decision", targets::decision);
}

#[test]
fn json_body() {
    replay("json_body", targets::json_body);
}

#[test]
fn lua_differential() {
    let redis = support::redis::RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_connection().unwrap();
    let dir = support::repo().join("fuzz/corpus/lua_differential");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let run =
            std::panic::AssertUnwindSafe(|| targets::lua_differential_on(&mut connection, &data));
        if std::panic::catch_unwind(run).is_err() {
            panic!("fuzz target lua_differential fails on {}", path.display());
        }
        replayed += 1;
    }
    assert!(replayed > 0, "no inputs in {}", dir.display());
}
