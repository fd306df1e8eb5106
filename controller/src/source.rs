//! The manifests-directory source: every `*.yaml` / `*.yml` file in a
//! directory, re-read when it changes. A file that stops parsing keeps its
//! last good contents; a bad document keeps its last good version (or is
//! left out if it never had one), and the rest still load.

use std::collections::BTreeMap;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::Snapshot;
use crate::kinds::{Kind, Visitor, each_kind};
use crate::manifests::{self, ManifestError};

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    /// The stamp was taken well after the file's last write: an equal stamp
    /// means the same contents.
    trusted: bool,
    /// Of the contents last read, to tell a rewrite with the same text.
    digest: u64,
    snapshot: Snapshot,
    errors: Vec<ManifestError>,
    /// Its resources that another file defined first.
    duplicates: Vec<String>,
}

/// A watched directory of manifests.
#[derive(Debug)]
pub struct ManifestsDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Every file's resources, the first definition of each name.
    merged: Arc<Snapshot>,
}

/// Whether two snapshots hold the same names of every kind.
fn same_names(a: &Snapshot, b: &Snapshot) -> bool {
    struct Same<'a>(&'a Snapshot, &'a Snapshot, bool);
    impl Visitor for Same<'_> {
        fn visit<K: Kind>(&mut self) {
            self.2 &= K::of(self.0).keys().eq(K::of(self.1).keys());
        }
    }
    let mut same = Same(a, b, true);
    each_kind(&mut same);
    same.2
}

/// In `merged`, each resource that is `old`'s becomes `new`'s version.
fn replace_versions(merged: &mut Snapshot, old: &Snapshot, new: &Snapshot) {
    struct Replace<'a>(&'a mut Snapshot, &'a Snapshot, &'a Snapshot);
    impl Visitor for Replace<'_> {
        fn visit<K: Kind>(&mut self) {
            let (old, into) = (K::of(self.1), K::of_mut(self.0));
            for (k, v) in K::of(self.2) {
                if let (Some(cur), Some(was)) = (into.get_mut(k), old.get(k))
                    && Arc::ptr_eq(cur, was)
                {
                    *cur = v.clone();
                }
            }
        }
    }
    each_kind(&mut Replace(merged, old, new));
}

/// What tells that a file may have changed without reading it: its inode
/// (a file renamed over it, as atomic writers and ConfigMap volumes do),
/// its change and modification times, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    changed: (i64, i64),
    modified: SystemTime,
    len: u64,
}

/// A stamp taken this soon after a write is not trusted: file-system times
/// move by clock ticks, so a second write of the same size within the tick
/// would leave the stamp as it was. Such a file is read again at the next
/// poll (a write wakes one), and its contents compared.
const SETTLED: Duration = Duration::from_secs(2);

impl Stamp {
    /// The stamp, and whether it can be trusted: every write sets the
    /// ctime (which, unlike the mtime, cannot be set back), so a ctime
    /// [`SETTLED`] old means no write since.
    fn of(meta: &fs::Metadata) -> (Self, bool) {
        let changed = (meta.ctime(), meta.ctime_nsec());
        let changed_at = SystemTime::UNIX_EPOCH
            + Duration::new(
                u64::try_from(changed.0).unwrap_or(0),
                u32::try_from(changed.1).unwrap_or(0),
            );
        let settled = SystemTime::now()
            .duration_since(changed_at)
            .is_ok_and(|age| age >= SETTLED);
        let stamp = Stamp {
            inode: meta.ino(),
            changed,
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: meta.len(),
        };
        (stamp, settled)
    }
}

fn digest(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl ManifestsDir {
    pub fn new(dir: &Path) -> Self {
        ManifestsDir {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            merged: Arc::default(),
        }
    }

    /// Re-reads what changed since the last call. Returns the merged snapshot
    /// and the current problems when anything changed, `None` otherwise.
    /// When files changed only the versions of resources they hold (the
    /// same names), the merged snapshot is updated in place, not merged
    /// again.
    pub fn poll(&mut self) -> std::io::Result<Option<(Arc<Snapshot>, Vec<String>)>> {
        let mut seen = Vec::new();
        let mut changed = false;
        // Files that now hold other names, or came or went: merge again.
        let mut renamed = self.files.is_empty();
        // Files whose resources changed version only, with the old ones.
        let mut edited: Vec<(PathBuf, Snapshot)> = Vec::new();
        let mut entries: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        entries.sort();
        for path in entries {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let (stamp, trusted) = Stamp::of(&meta);
            seen.push(path.clone());
            if self
                .files
                .get(&path)
                .is_some_and(|f| f.trusted && f.stamp == stamp)
            {
                continue;
            }
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    // Nothing read, nothing changed: read again at the
                    // next poll.
                    warn!(file = %path.display(), error = %e, "cannot read manifest; keeping its last good contents");
                    continue;
                }
            };
            let digest = digest(&text);
            if let Some(f) = self.files.get_mut(&path)
                && f.digest == digest
            {
                // Read again for an untrusted stamp or touched: the same.
                (f.stamp, f.trusted) = (stamp, trusted);
                continue;
            }
            changed = true;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut snapshot = Snapshot::default();
            let errors = manifests::parse(&text, &name, &mut snapshot);
            let syntax = errors.iter().any(ManifestError::is_syntax);
            if let Some(prev) = self.files.get(&path) {
                // A document that no longer reads keeps its last good version.
                for e in &errors {
                    if snapshot.keep_previous(&prev.snapshot, &e.kind, &e.key) {
                        warn!(file = %path.display(), kind = %e.kind, name = %e.key, "keeping the last good version");
                    }
                }
            }
            match self.files.get_mut(&path) {
                Some(prev) if syntax => {
                    // Half a file is worse than the last whole one.
                    (prev.stamp, prev.trusted, prev.digest) = (stamp, trusted, digest);
                    prev.errors = errors;
                    warn!(file = %path.display(), "manifest is not valid YAML; keeping its last good contents");
                }
                _ => {
                    // Same names: its duplicates are as they were.
                    let duplicates = match self.files.remove(&path) {
                        Some(old) if same_names(&old.snapshot, &snapshot) => {
                            edited.push((path.clone(), old.snapshot));
                            old.duplicates
                        }
                        _ => {
                            renamed = true;
                            Vec::new()
                        }
                    };
                    let state = FileState {
                        stamp,
                        trusted,
                        digest,
                        snapshot,
                        errors,
                        duplicates,
                    };
                    self.files.insert(path, state);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        renamed |= before != self.files.len();
        changed |= renamed;
        if !changed {
            return Ok(None);
        }
        if renamed {
            let mut merged = Snapshot::default();
            for (path, f) in &mut self.files {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                f.duplicates = merged.merge(&f.snapshot, &name);
            }
            self.merged = Arc::new(merged);
        } else {
            // In place, unless the last snapshot handed out is still held.
            let merged = Arc::make_mut(&mut self.merged);
            for (path, old) in &edited {
                replace_versions(merged, old, &self.files[path].snapshot);
            }
        }
        let mut problems = Vec::new();
        for f in self.files.values() {
            problems.extend(f.errors.iter().map(ToString::to_string));
            problems.extend(f.duplicates.iter().cloned());
        }
        Ok(Some((self.merged.clone(), problems)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty directory of this process's own for test `tag`.
    fn fresh_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-manifests-{tag}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ns(name: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
    }

    /// A second write of the same size within one clock tick leaves the
    /// file's times as they were: the stamp of a file just written is not
    /// trusted, so the change is read; an untouched file reads as unchanged.
    #[test]
    fn a_rewrite_within_the_same_tick_is_seen() {
        let dir = fresh_dir("tick-");
        let file = dir.join("a.yaml");
        fs::write(&file, ns("shop")).unwrap();
        let mut src = ManifestsDir::new(&dir);
        assert!(src.poll().unwrap().is_some());
        assert!(src.poll().unwrap().is_none(), "read again, the same");
        // In place, the same size; then the stamp as it was, as when the
        // clock had not ticked between the two writes.
        let before = src.files[&file].stamp;
        fs::write(&file, ns("shoq")).unwrap();
        assert!(
            !Stamp::of(&fs::metadata(&file).unwrap()).1,
            "just written: not trusted"
        );
        let entry = src.files.get_mut(&file).unwrap();
        // Untrusted, as a stamp within the same tick as a write is (a slow
        // machine may have let 2 s pass since the poll above).
        (entry.stamp, entry.trusted) = (before, false);
        let (snap, _) = src.poll().unwrap().expect("the rewrite is seen");
        assert!(snap.namespaces.contains_key("shoq"));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Changes are seen, a broken file keeps its last good contents, a
    /// duplicate in another file is refused by name, a removed file is gone.
    #[test]
    fn watch() {
        let dir = fresh_dir("");
        fs::write(dir.join("a.yaml"), ns("shop")).unwrap();
        let mut src = ManifestsDir::new(&dir);
        let (snap, problems) = src.poll().unwrap().unwrap();
        assert!(snap.namespaces.contains_key("shop") && problems.is_empty());
        assert!(src.poll().unwrap().is_none(), "nothing changed");

        fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: [oops\n").unwrap();
        let (snap, problems) = src.poll().unwrap().unwrap();
        assert!(
            snap.namespaces.contains_key("shop"),
            "last good contents kept"
        );
        assert!(problems[0].contains("a.yaml"), "{problems:?}");

        // One document stops reading (a misspelt field): that resource keeps
        // its last good version, the others in the file change.
        let policy = |field: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: shop}}\nspec: {{{field}: {{mode: STRICT}}}}\n---\n{}",
                ns("shop")
            )
        };
        fs::write(dir.join("a.yaml"), policy("mtls")).unwrap();
        let (snap, _) = src.poll().unwrap().unwrap();
        let good = snap.peer_authentications["shop/default"].clone();
        fs::write(dir.join("a.yaml"), policy("mtsl") + "---\n" + &ns("ops")).unwrap();
        let (snap, problems) = src.poll().unwrap().unwrap();
        assert_eq!(snap.peer_authentications["shop/default"], good);
        assert!(snap.namespaces.contains_key("ops"));
        assert!(
            problems[0].contains("(PeerAuthentication default)") && problems[0].contains("mtsl"),
            "{problems:?}"
        );

        fs::write(dir.join("b.yml"), ns("shop")).unwrap();
        let (_, problems) = src.poll().unwrap().unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("b.yml") && p.contains("Namespace shop")),
            "{problems:?}"
        );

        fs::remove_file(dir.join("a.yaml")).unwrap();
        fs::remove_file(dir.join("b.yml")).unwrap();
        let (snap, _) = src.poll().unwrap().unwrap();
        assert!(snap.namespaces.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// An edit that changes only versions updates the merged snapshot in
    /// place: the first definition of a name still wins, the duplicate is
    /// still reported, what the edit left alone is the same object, and the
    /// result is what a fresh read of the directory gives.
    #[test]
    fn an_edit_updates_the_merged_snapshot_in_place() {
        let dir = fresh_dir("edit-");
        let file = |ns_label: u32, pod: &str, app: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{x: '{ns_label}'}}}}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: shop, labels: {{app: {app}}}}}\n"
            )
        };
        let label = |snap: &Snapshot| {
            snap.namespaces["shop"].metadata.labels.as_ref().unwrap()["x"].clone()
        };
        fs::write(dir.join("a.yaml"), file(1, "p1", "web")).unwrap();
        fs::write(dir.join("b.yaml"), file(2, "p2", "web")).unwrap();
        let mut src = ManifestsDir::new(&dir);
        let (first, problems) = src.poll().unwrap().unwrap();
        assert_eq!(label(&first), "1");
        assert_eq!(problems.len(), 1, "{problems:?}");

        // Distinct sizes, so the change is seen whatever the clock's grain.
        fs::write(dir.join("b.yaml"), file(3, "p2", "shop-web")).unwrap();
        let (second, problems) = src.poll().unwrap().unwrap();
        assert_eq!(label(&second), "1", "a.yaml's Namespace still wins");
        assert!(
            problems[0].contains("b.yaml") && problems[0].contains("Namespace shop"),
            "{problems:?}"
        );
        assert_eq!(
            second.pods["shop/p2"].metadata.labels.as_ref().unwrap()["app"],
            "shop-web"
        );
        assert!(Arc::ptr_eq(&first.pods["shop/p1"], &second.pods["shop/p1"]));
        drop((first, second));

        fs::write(dir.join("a.yaml"), file(44, "p1", "web")).unwrap();
        let (third, problems) = src.poll().unwrap().unwrap();
        assert_eq!(label(&third), "44");
        let (fresh, fresh_problems) = ManifestsDir::new(&dir).poll().unwrap().unwrap();
        assert_eq!(third.namespaces, fresh.namespaces);
        assert_eq!(third.pods, fresh.pods);
        assert_eq!(problems, fresh_problems);
        fs::remove_dir_all(&dir).unwrap();
    }
}
