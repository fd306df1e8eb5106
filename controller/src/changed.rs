//! "Something changed": set by a source's watchers (API server watch
//! events, file-system notifications), taken by the publisher, which sleeps
//! until it is set. No fixed poll.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

/// Changes arriving together are read as one: the publisher waits this
/// long after the first before it reads the source.
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// Waited on by a plain thread (the publisher's), so nothing here needs an
/// async runtime, not even one shutting down.
#[derive(Debug, Default)]
pub struct Changed {
    flag: AtomicBool,
    /// Counts the changes; a waiter remembers the last it saw.
    generation: Mutex<u64>,
    wake: Condvar,
}

impl Changed {
    /// Records a change and wakes the publisher.
    pub fn mark(&self) {
        self.flag.store(true, Ordering::Release);
        *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        self.wake.notify_all();
    }

    /// Whether anything changed since the last call.
    pub fn take(&self) -> bool {
        self.flag.swap(false, Ordering::AcqRel)
    }

    /// The changes counted so far.
    pub fn generation(&self) -> u64 {
        *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until a change after `seen` (at once if there was one), then
    /// [`DEBOUNCE`] more; returns the generation then. None past `limit`.
    pub fn wait_after(&self, seen: u64, limit: Option<Duration>) -> Option<u64> {
        let deadline = limit.map(|l| Instant::now() + l);
        let mut g = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *g == seen {
            g = match deadline {
                None => self.wake.wait(g).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.wake
                        .wait_timeout(g, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        drop(g);
        std::thread::sleep(DEBOUNCE);
        Some(self.generation())
    }
}

/// Marks `changed` whenever an entry of `dir` is written, moved in or out,
/// or removed (inotify, on a thread of its own). Without inotify, it says
/// so and checks the directory every second instead.
pub fn watch_dir(dir: &Path, changed: Arc<Changed>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let watch = Inotify::init(InitFlags::IN_CLOEXEC).and_then(|ino| {
        ino.add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_ATTRIB,
        )?;
        Ok(ino)
    });
    let dir_name = dir.display().to_string();
    let spawned = std::thread::Builder::new()
        .name("manifests-watch".into())
        .spawn(move || match watch {
            Ok(ino) => loop {
                match ino.read_events() {
                    Ok(_) => changed.mark(),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        warn!(dir = %dir_name, error = %e, "reading file-system notifications failed; checking every second");
                        loop {
                            std::thread::sleep(Duration::from_secs(1));
                            changed.mark();
                        }
                    }
                }
            },
            Err(e) => {
                warn!(dir = %dir_name, error = %e, "no file-system notifications for the manifests directory; checking every second");
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    changed.mark();
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the manifests watcher");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write into the directory wakes the publisher; nothing wakes it
    /// when nothing changes (no fixed poll).
    #[test]
    fn a_write_wakes_and_quiet_does_not() {
        let dir = std::env::temp_dir().join(format!("weft-changed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let changed = Arc::new(Changed::default());
        watch_dir(&dir, changed.clone());
        let seen = changed.generation();
        let quiet = changed.wait_after(seen, Some(Duration::from_millis(300)));
        assert_eq!(quiet, None, "woken with nothing changed");
        let tmp = dir.join(".a.yaml.tmp");
        std::fs::write(&tmp, "kind: Namespace\n").unwrap();
        std::fs::rename(&tmp, dir.join("a.yaml")).unwrap();
        let woke = changed.wait_after(seen, Some(Duration::from_secs(2)));
        assert!(woke.is_some_and(|g| g > seen), "a write wakes it");
        assert!(changed.take());
        assert!(!changed.take());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
