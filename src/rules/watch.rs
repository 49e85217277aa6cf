//! Reloads rule files when they change (see [`crate::reload`] for why it
//! polls).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};

use super::{yaml, RuleErrors, RulesHandle};
use crate::health::Readiness;
use crate::limiter::RuleSet;
use crate::reload;
use crate::telemetry::names;

/// A digest of the names and contents of the rule files under `path`;
/// `None` when they cannot be read.
fn fingerprint(path: &Path) -> Option<[u8; 32]> {
    reload::fingerprint(yaml::rule_files(path).ok()?)
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
    let apply = || match yaml::load_path(&path) {
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
    };
    reload::on_change(poll, || fingerprint(&path), apply).await;
}
