//! Rules: the model every source compiles into, the envoyproxy/ratelimit
//! YAML format, and the file watcher that reloads it; PostgreSQL as a second
//! source (the `catalog` it reads, and the `postgres` loader and reloader).

pub mod catalog;
pub mod postgres;
pub mod watch;
pub mod yaml;

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::limiter::RuleSet;

/// The rules in force, swapped whole by whichever source reloads them.
pub type RulesHandle = Arc<ArcSwap<RuleSet>>;

/// One problem in a rules source, located by file and by the path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: String,
    /// e.g. `descriptors[2].descriptors[0]`; empty for file-level problems.
    pub path: String,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.message)
        }
    }
}

/// Every problem found in a rules source; loading fails if there is any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RuleErrors(pub Vec<RuleError>);

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
