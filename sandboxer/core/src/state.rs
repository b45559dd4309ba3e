//! Persisted state: one JSON file per sandbox and per task, keyed by
//! (namespace, id), always replaced atomically.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{io_context, Result};

#[derive(Clone)]
pub struct StateStore {
    dir: PathBuf,
}

#[derive(Clone, Copy)]
pub enum Record {
    Sandbox,
    Task,
}

impl Record {
    fn dir(self) -> &'static str {
        match self {
            Record::Sandbox => "sandboxes",
            Record::Task => "tasks",
        }
    }
}

impl StateStore {
    pub fn new(dir: PathBuf) -> StateStore {
        StateStore { dir }
    }

    pub fn path(&self, record: Record, namespace: &str, id: &str) -> PathBuf {
        self.dir
            .join(namespace)
            .join(record.dir())
            .join(format!("{id}.json"))
    }

    pub fn save(
        &self,
        record: Record,
        namespace: &str,
        id: &str,
        value: &impl Serialize,
    ) -> Result<()> {
        let path = self.path(record, namespace, id);
        let parent = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent)
            .map_err(io_context(format!("creating {}", parent.display())))?;
        let data = serde_json::to_vec_pretty(value)
            .map_err(|e| crate::error::Error::Internal(format!("encoding state: {e}")))?;
        kuasar_protocol::shim::write_atomic(&path, &data)
            .map_err(io_context(format!("writing {}", path.display())))
    }

    /// Every record of `record`'s kind, as (namespace, id, contents); a
    /// file that cannot be read is skipped with a warning.
    pub fn list(&self, record: Record) -> Vec<(String, String, Vec<u8>)> {
        let mut out = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for ns in namespaces.flatten() {
            let Some(namespace) = ns.file_name().to_str().map(String::from) else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(ns.path().join(record.dir())) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                match std::fs::read(f.path()) {
                    Ok(data) => out.push((namespace.clone(), id.to_string(), data)),
                    Err(e) => tracing::warn!("reading {}: {e}", f.path().display()),
                }
            }
        }
        out
    }

    /// A directory a backend may keep a sandbox's files in (created by the
    /// backend when it needs one; removed with the sandbox).
    pub fn sandbox_dir(&self, namespace: &str, id: &str) -> PathBuf {
        self.dir.join(namespace).join("sandbox-files").join(id)
    }

    /// Removes a record and the namespace directories it leaves empty.
    pub fn remove(&self, record: Record, namespace: &str, id: &str) {
        let path = self.path(record, namespace, id);
        let _ = std::fs::remove_file(&path);
        let mut dir = path.parent();
        for _ in 0..2 {
            match dir {
                Some(d) if std::fs::remove_dir(d).is_ok() => dir = d.parent(),
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_replaces_and_remove_cleans_empty_dirs() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::new(root.path().join("state"));
        store
            .save(Record::Task, "ns", "c1", &serde_json::json!({"pid": 1}))
            .unwrap();
        store
            .save(Record::Task, "ns", "c1", &serde_json::json!({"pid": 2}))
            .unwrap();
        let got: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.path(Record::Task, "ns", "c1")).unwrap())
                .unwrap();
        assert_eq!(got["pid"], 2);
        store.remove(Record::Task, "ns", "c1");
        assert!(!root.path().join("state/ns").exists());
        assert!(root.path().join("state").exists());
    }
}
