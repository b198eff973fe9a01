//! Durable slot numbers of the mounted layers.
//!
//! Each remote layer is served as `<root>/fuse/<slot>` and its inode numbers
//! carry the slot ([`crate::fs::fuse::slot_base`]). The slot of each
//! mountpoint is recorded in a small JSON file, rewritten atomically on every
//! change, so that a restarted daemon gives every layer the slot, and hence
//! the inode numbers, it had: the precondition for taking over the kernel's
//! FUSE connection from a previous daemon without invalidating what running
//! containers hold (ARCHITECTURE.md, "One FUSE mount").

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the slot file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("slot file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("slot file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("all {0} FUSE slots are in use")]
    Exhausted(u32),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The next never-used slot.
    next: u32,
    slots: BTreeMap<PathBuf, u32>,
}

/// Mountpoint → slot, persisted.
#[derive(Debug)]
pub struct SlotTable {
    path: PathBuf,
    state: State,
}

impl SlotTable {
    /// Loads `path`; a missing file is an empty table. Blocking.
    pub fn load(path: &Path) -> Result<SlotTable, SlotError> {
        let state = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| SlotError::Corrupt {
                path: path.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => {
                return Err(SlotError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(SlotTable {
            path: path.to_path_buf(),
            state,
        })
    }

    /// The slot recorded for `mountpoint`, if any.
    pub fn get(&self, mountpoint: &Path) -> Option<u32> {
        self.state.slots.get(mountpoint).copied()
    }

    /// The slot for `mountpoint`: its recorded one if `free` says it can be
    /// used, else a new one never handed out before. Persisted before it
    /// returns. Blocking.
    pub fn assign(
        &mut self,
        mountpoint: &Path,
        free: impl Fn(u32) -> bool,
    ) -> Result<u32, SlotError> {
        if let Some(s) = self.get(mountpoint).filter(|&s| free(s)) {
            return Ok(s);
        }
        let mut next = self.state.next.max(1);
        let highest = self.state.slots.values().copied().max().unwrap_or(0);
        next = next.max(highest.saturating_add(1));
        while !free(next) {
            next = next.checked_add(1).ok_or(SlotError::Exhausted(u32::MAX))?;
        }
        self.state.next = next.checked_add(1).ok_or(SlotError::Exhausted(u32::MAX))?;
        self.state.slots.insert(mountpoint.to_path_buf(), next);
        self.save()?;
        Ok(next)
    }

    /// Forgets `mountpoint`'s slot (its snapshot is gone). Blocking.
    pub fn release(&mut self, mountpoint: &Path) -> Result<(), SlotError> {
        if self.state.slots.remove(mountpoint).is_some() {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), SlotError> {
        let io = |source| SlotError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let body = serde_json::to_vec(&self.state).expect("slot table serializes");
        tmp.write_all(&body).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_survive_a_reload_and_are_not_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("slots.json");
        let mut t = SlotTable::load(&p).unwrap();
        let a = t.assign(Path::new("/s/1/fs"), |_| true).unwrap();
        let b = t.assign(Path::new("/s/2/fs"), |_| true).unwrap();
        assert_ne!(a, b);
        assert!(a >= 1 && b >= 1);
        t.release(Path::new("/s/1/fs")).unwrap();
        let mut t = SlotTable::load(&p).unwrap();
        assert_eq!(t.get(Path::new("/s/2/fs")), Some(b));
        assert_eq!(t.get(Path::new("/s/1/fs")), None);
        // Same mountpoint keeps its slot; a new one gets a fresh number.
        assert_eq!(t.assign(Path::new("/s/2/fs"), |_| true).unwrap(), b);
        let c = t.assign(Path::new("/s/3/fs"), |_| true).unwrap();
        assert!(c != a && c != b, "{a} {b} {c}");
        // A recorded slot still held by the kernel is replaced.
        let d2 = t.assign(Path::new("/s/2/fs"), |s| s != b).unwrap();
        assert!(d2 != b && d2 != c);
    }

    #[test]
    fn corrupt_file_is_a_typed_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("slots.json");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            SlotTable::load(&p),
            Err(SlotError::Corrupt { .. })
        ));
    }
}
