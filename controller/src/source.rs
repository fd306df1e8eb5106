//! The manifests-directory source: every `*.yaml` / `*.yml` file in a
//! directory, re-read when it changes. A file that stops parsing keeps its
//! last good contents; a bad document keeps its last good version (or is
//! left out if it never had one), and the rest still load.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::warn;

use crate::Snapshot;
use crate::manifests::{self, ManifestError};

#[derive(Debug)]
struct FileState {
    stamp: (SystemTime, u64),
    snapshot: Snapshot,
    errors: Vec<ManifestError>,
}

/// A watched directory of manifests.
#[derive(Debug)]
pub struct ManifestsDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl ManifestsDir {
    pub fn new(dir: &Path) -> Self {
        ManifestsDir {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads what changed since the last call. Returns the merged snapshot
    /// and the current problems when anything changed, `None` otherwise.
    pub fn poll(&mut self) -> std::io::Result<Option<(Snapshot, Vec<String>)>> {
        let mut seen = Vec::new();
        let mut changed = false;
        let mut entries: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        entries.sort();
        for path in entries {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            seen.push(path.clone());
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            changed = true;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot read manifest; keeping its last good contents");
                    continue;
                }
            };
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
                    prev.stamp = stamp;
                    prev.errors = errors;
                    warn!(file = %path.display(), "manifest is not valid YAML; keeping its last good contents");
                }
                _ => {
                    self.files.insert(
                        path,
                        FileState {
                            stamp,
                            snapshot,
                            errors,
                        },
                    );
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        changed |= before != self.files.len();
        if !changed {
            return Ok(None);
        }
        let mut merged = Snapshot::default();
        let mut problems = Vec::new();
        for (path, f) in &self.files {
            problems.extend(f.errors.iter().map(ToString::to_string));
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            problems.extend(merged.merge(&f.snapshot, &name));
        }
        Ok(Some((merged, problems)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changes are seen, a broken file keeps its last good contents, a
    /// duplicate in another file is refused by name, a removed file is gone.
    #[test]
    fn watch() {
        let dir = std::env::temp_dir().join(format!("weft-manifests-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
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
}
