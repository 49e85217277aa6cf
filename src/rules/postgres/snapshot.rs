//! The local snapshot: the last catalog loaded from PostgreSQL, as JSON in
//! a file, so that sluice can start with the rules it last had while
//! PostgreSQL is down.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::rules::catalog::Catalog;

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    version: u32,
    /// RFC 3339, for humans.
    written_at: String,
    catalog: Catalog,
}

/// Writes the catalog atomically (a temporary file, then rename), readable
/// by its owner only: it holds key hashes.
pub fn write_snapshot(path: &Path, catalog: &Catalog) -> std::io::Result<()> {
    let file = SnapshotFile {
        version: 1,
        written_at: chrono::Utc::now().to_rfc3339(),
        catalog: catalog.clone(),
    };
    let json = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads a snapshot back; the error says why it cannot be used.
pub fn read_snapshot(path: &Path) -> Result<(Catalog, String), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: SnapshotFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a sluice snapshot: {e}", path.display()))?;
    if file.version != 1 {
        return Err(format!(
            "{}: unknown snapshot version {}",
            path.display(),
            file.version
        ));
    }
    Ok((file.catalog, file.written_at))
}
