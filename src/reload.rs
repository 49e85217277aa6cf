//! Reloading from files: poll a digest of their names and contents, and act
//! when it changes. The rule files and the TLS certificates reload this way.
//!
//! Polling, not inotify: Kubernetes updates a mounted ConfigMap or Secret by
//! swapping a symlink (`..data`), which file-event watchers miss or report
//! confusingly, and hashing a few kilobytes a few times a second costs
//! nothing.

use std::path::Path;
use std::time::Duration;

/// A digest of the names and contents of `files`; `None` when one of them
/// cannot be read.
pub fn fingerprint<P: AsRef<Path>>(files: impl IntoIterator<Item = P>) -> Option<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    for file in files {
        let file = file.as_ref();
        h.update(file.to_string_lossy().as_bytes());
        h.update(&[0]);
        h.update(&std::fs::read(file).ok()?);
        h.update(&[0]);
    }
    Some(*h.finalize().as_bytes())
}

/// Reads `fingerprint` every `poll` and calls `changed` each time it differs
/// from the one before (the first is read at once). `None`, files missing or
/// unreadable in the middle of a rotation, is no change: the next poll looks
/// again. Runs until dropped.
pub async fn on_change(
    poll: Duration,
    mut fingerprint: impl FnMut() -> Option<[u8; 32]>,
    mut changed: impl FnMut(),
) {
    let mut last = fingerprint();
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let current = fingerprint();
        if current.is_none() || current == last {
            continue;
        }
        last = current;
        changed();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_fingerprint_covers_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "x").unwrap();
        std::fs::write(&b, "x").unwrap();
        let of_a = fingerprint([&a]);
        assert!(of_a.is_some());
        assert_ne!(of_a, fingerprint([&b]), "same contents, another name");
        std::fs::write(&a, "y").unwrap();
        assert_ne!(of_a, fingerprint([&a]), "same name, other contents");
        assert_eq!(fingerprint([dir.path().join("missing")]), None);
    }

    /// A fingerprint the test sets (0: unreadable), and the changes seen;
    /// the watcher has read the first fingerprint when this returns.
    async fn watched(poll: Duration) -> (Arc<AtomicU8>, Arc<AtomicUsize>) {
        let state = Arc::new(AtomicU8::new(1));
        let changes = Arc::new(AtomicUsize::new(0));
        let (s, c) = (state.clone(), changes.clone());
        tokio::spawn(on_change(
            poll,
            move || match s.load(Ordering::SeqCst) {
                0 => None,
                n => Some([n; 32]),
            },
            move || {
                c.fetch_add(1, Ordering::SeqCst);
            },
        ));
        tokio::task::yield_now().await;
        (state, changes)
    }

    /// Lets the watcher run up to and including its poll at `by` from now.
    async fn poll_within(by: Duration) {
        tokio::time::advance(by).await;
        tokio::task::yield_now().await;
    }

    #[tokio::test(start_paused = true)]
    async fn acts_once_per_change_and_skips_unreadable_files() {
        let poll = Duration::from_millis(250);
        let (state, changes) = watched(poll).await;
        let seen = || changes.load(Ordering::SeqCst);
        poll_within(poll).await;
        assert_eq!(seen(), 0, "nothing changed");

        state.store(2, Ordering::SeqCst);
        poll_within(poll / 2).await;
        assert_eq!(seen(), 0, "not before the next poll");
        poll_within(poll / 2).await;
        assert_eq!(seen(), 1, "at the next poll");
        poll_within(3 * poll).await;
        assert_eq!(seen(), 1, "once per change");

        state.store(0, Ordering::SeqCst);
        poll_within(poll).await;
        assert_eq!(seen(), 1, "unreadable: no change");
        state.store(2, Ordering::SeqCst);
        poll_within(poll).await;
        assert_eq!(seen(), 1, "readable again, as before");
        state.store(3, Ordering::SeqCst);
        poll_within(poll).await;
        assert_eq!(seen(), 2);
    }
}
