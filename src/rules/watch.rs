//! Reloads rule files when they change.
//!
//! It polls a content fingerprint instead of using inotify: Kubernetes
//! updates a mounted ConfigMap by swapping a symlink (`..data`), which
//! file-event watchers miss or report confusingly, and hashing a few
//! kilobytes of YAML a few times a second costs nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};

use super::{yaml, RuleErrors, RulesHandle};
use crate::health::Readiness;
use crate::limiter::RuleSet;
use crate::telemetry::names;

/// A digest of the names and contents of the rule files under `path`;
/// `None` when they cannot be read.
pub fn fingerprint(path: &Path) -> Option<[u8; 32]> {
    let files = yaml::rule_files(path).ok()?;
    let mut h = blake3::Hasher::new();
    for file in files {
        h.update(file.to_string_lossy().as_bytes());
        h.update(&[0]);
        h.update(&std::fs::read(&file).ok()?);
        h.update(&[0]);
    }
    Some(*h.finalize().as_bytes())
}

/// Loads the rules once and publishes them; the start-up path.
pub fn load_into(
    path: &Path,
    rules: &RulesHandle,
    readiness: &Readiness,
) -> Result<(), RuleErrors> {
    let set = yaml::load_path(path)?;
    publish(set, rules, readiness, path);
    Ok(())
}

fn publish(set: RuleSet, rules: &RulesHandle, readiness: &Readiness, path: &Path) {
    let count = set.rules().len();
    rules.store(Arc::new(set));
    gauge!(names::RULES_LOADED).set(count as f64);
    readiness.update_rules(|s| {
        s.loaded = true;
        s.source = format!("file:{}", path.display());
        s.last_error = None;
    });
}

/// Watches `path` and swaps in each valid new rule set. An invalid edit is
/// logged and counted, and the rules in force stay.
pub async fn watch(path: PathBuf, poll: Duration, rules: RulesHandle, readiness: Arc<Readiness>) {
    let mut last = fingerprint(&path);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let current = fingerprint(&path);
        if current == last || current.is_none() {
            continue;
        }
        last = current;
        match yaml::load_path(&path) {
            Ok(set) => {
                let count = set.rules().len();
                publish(set, &rules, &readiness, &path);
                counter!(names::RULE_RELOADS, "result" => "success").increment(1);
                tracing::info!(path = %path.display(), rules = count, "rules reloaded");
            }
            Err(errors) => {
                counter!(names::RULE_RELOADS, "result" => "failure").increment(1);
                for e in &errors.0 {
                    tracing::warn!(error = %e, "invalid rules; keeping the rules in force");
                }
                readiness.update_rules(|s| s.last_error = Some(errors.to_string()));
            }
        }
    }
}
