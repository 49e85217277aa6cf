//! Rules and API keys from PostgreSQL, one job a file: `read` fills a
//! [`Catalog`](super::catalog::Catalog) in one consistent snapshot,
//! `snapshot` keeps the last one in a local file for a start-up while
//! PostgreSQL is down, and `listen` keeps the rules in force current
//! (LISTEN/NOTIFY, reading a replica once it has replayed the change).
//! Writes to the catalog are `crate::admin`'s.

mod listen;
mod read;
mod snapshot;

pub use listen::{Connections, PostgresSource, SourceError, CHANNEL};
pub use read::{domain_rules, load_catalog};
pub use snapshot::{read_snapshot, write_snapshot};
