//! The snapshot metadata store.
//!
//! # Why redb
//! The store must survive `kill -9` and power loss at any instant without a
//! recovery step of its own. [redb](https://docs.rs/redb) is an embedded,
//! pure-Rust B-tree store with ACID transactions: a write transaction either
//! commits completely (copy-on-write pages plus an fsync'd commit slot) or is
//! invisible after a crash; readers see consistent snapshots without
//! blocking the single writer. It needs no C library or background thread,
//! which keeps the daemon small.
//!
//! # Layout
//! - `snapshots`: name or key → JSON [`Record`]. Keys of active/view
//!   snapshots and names of committed ones share this one table, so they
//!   share one namespace, as in containerd.
//! - `children`: `(parent id, child id)` → `()`, so "has children" is one
//!   range probe.
//! - `meta`: `next_id` → the id counter. Ids are never reused once committed.
//!
//! Every mutation runs in one write transaction and the caller can hook a
//! step (`on_commit`) that runs inside the transaction just before commit:
//! the snapshotter uses it to rename the snapshot's directory into place, so
//! a crash leaves either no record (and an orphan directory, cleaned up at
//! start) or a record whose directory is complete.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: TableDefinition<(u64, u64), ()> = TableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// containerd's limit on one label's key plus value, in bytes.
pub const MAX_LABEL_SIZE: usize = 4096;

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The name used by filters (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What the store keeps per snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Directory id: the snapshot lives in `snapshots/<id>/`.
    pub id: u64,
    pub kind: Kind,
    /// Name of the parent (a committed snapshot), or empty.
    #[serde(default)]
    pub parent: String,
    /// Ids of all ancestors, nearest first: the overlay lower dirs. Fixed at
    /// creation because committed parents can neither change nor go away
    /// while they have children.
    #[serde(default)]
    pub parent_ids: Vec<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Disk usage in bytes, measured at commit (0 until then).
    #[serde(default)]
    pub size: i64,
    /// Inodes used, measured at commit.
    #[serde(default)]
    pub inodes: i64,
}

/// Checks containerd's label size rule.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({} bytes) greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {k}",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

fn encode(r: &Record) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(r)?)
}

fn decode(b: &[u8]) -> Result<Record> {
    Ok(serde_json::from_slice(b)?)
}

/// The redb-backed store. All methods block (they may fsync); call them
/// from a blocking thread.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens or creates the database at `path` and its tables.
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(CHILDREN)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(Store { db })
    }

    /// The record stored under `name`, if any.
    pub fn get(&self, name: &str) -> Result<Option<Record>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        match table.get(name)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Like [`Store::get`], but a missing record is `NotFound`.
    pub fn must_get(&self, name: &str) -> Result<Record> {
        self.get(name)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {name}")))
    }

    /// Calls `f` for every record, in name order.
    pub fn for_each(&self, mut f: impl FnMut(&str, Record)) -> Result<()> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        for item in table.iter()? {
            let (k, v) = item?;
            f(k.value(), decode(v.value())?);
        }
        Ok(())
    }

    /// Ids of every record: the directories that must exist.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        let mut ids = HashSet::new();
        self.for_each(|_, r| {
            ids.insert(r.id);
        })?;
        Ok(ids)
    }

    /// Inserts an active or view snapshot `key` on `parent` with a fresh id.
    /// `on_commit(id)` runs inside the transaction just before it commits;
    /// if it fails nothing is stored. Returns the new record.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        on_commit: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Record> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "only active or view snapshots can be created".into(),
            ));
        }
        validate_labels(&labels)?;
        let txn = self.db.begin_write()?;
        let record = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut parent_ids = Vec::new();
            if !parent.is_empty() {
                let p = match snaps.get(parent)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(Error::NotFound(format!("parent snapshot {parent:?}"))),
                };
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )));
                }
                parent_ids.push(p.id);
                parent_ids.extend_from_slice(&p.parent_ids);
            }
            if snaps.get(key)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {key}")));
            }
            let mut meta = txn.open_table(META)?;
            let id = meta.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
            meta.insert(NEXT_ID, id + 1)?;
            let now = SystemTime::now();
            let record = Record {
                id,
                kind,
                parent: parent.to_string(),
                parent_ids,
                labels: without_empty(labels),
                created: now,
                updated: now,
                size: 0,
                inodes: 0,
            };
            snaps.insert(key, encode(&record)?.as_slice())?;
            if let Some(&pid) = record.parent_ids.first() {
                txn.open_table(CHILDREN)?.insert((pid, id), ())?;
            }
            record
        };
        on_commit(record.id)?;
        txn.commit()?;
        Ok(record)
    }

    /// Commits active snapshot `key` as `name`: same id, kind committed,
    /// labels replaced by `labels`, usage recorded.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: (i64, i64),
    ) -> Result<Record> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        validate_labels(&labels)?;
        let txn = self.db.begin_write()?;
        let record = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            if snaps.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("committed snapshot {name}")));
            }
            let mut r = match snaps.get(key)? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(format!("active snapshot {key:?}"))),
            };
            if r.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            let now = SystemTime::now();
            r.kind = Kind::Committed;
            r.labels = without_empty(labels);
            r.created = now;
            r.updated = now;
            (r.size, r.inodes) = usage;
            snaps.remove(key)?;
            snaps.insert(name, encode(&r)?.as_slice())?;
            r
        };
        txn.commit()?;
        Ok(record)
    }

    /// Deletes `key` unless it has children. `on_commit` runs inside the
    /// transaction just before it commits. Returns the removed record.
    pub fn remove(
        &self,
        key: &str,
        on_commit: impl FnOnce(&Record) -> Result<()>,
    ) -> Result<Record> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let r = match snaps.get(key)? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(format!("snapshot {key}"))),
            };
            let mut children = txn.open_table(CHILDREN)?;
            if children
                .range((r.id, 0)..=(r.id, u64::MAX))?
                .next()
                .is_some()
            {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?} with child"
                )));
            }
            if let Some(&pid) = r.parent_ids.first() {
                children.remove((pid, r.id))?;
            }
            snaps.remove(key)?;
            r
        };
        on_commit(&record)?;
        txn.commit()?;
        Ok(record)
    }

    /// Whether snapshot `id` has children.
    pub fn has_children(&self, id: u64) -> Result<bool> {
        let txn = self.db.begin_read()?;
        let children = txn.open_table(CHILDREN)?;
        Ok(children.range((id, 0)..=(id, u64::MAX))?.next().is_some())
    }

    /// Updates the mutable fields (labels) of `name` following containerd's
    /// field paths: none = all mutable fields, `labels` = replace all,
    /// `labels.<k>` = set `k` (or delete it when `labels` lacks it or maps it
    /// to ""). Anything else is `InvalidArgument`.
    pub fn update(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut r = match snaps.get(name)? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(format!("snapshot {name}"))),
            };
            r.labels = apply_field_paths(name, &r.labels, labels, paths)?;
            validate_labels(&r.labels)?;
            r.updated = SystemTime::now();
            snaps.insert(name, encode(&r)?.as_slice())?;
            r
        };
        txn.commit()?;
        Ok(record)
    }
}

/// containerd never stores a label with an empty value: setting one to ""
/// is how a client deletes it, on every call that takes labels.
fn without_empty(mut labels: BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels.retain(|_, v| !v.is_empty());
    labels
}

/// Computes the labels after an update with `paths` (see [`Store::update`]).
pub fn apply_field_paths(
    name: &str,
    current: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    paths: &[String],
) -> Result<BTreeMap<String, String>> {
    if paths.is_empty() {
        return Ok(without_empty(new.clone()));
    }
    let mut out = current.clone();
    for path in paths {
        if let Some(key) = path.strip_prefix("labels.") {
            match new.get(key) {
                Some(v) if !v.is_empty() => {
                    out.insert(key.to_string(), v.clone());
                }
                _ => {
                    out.remove(key);
                }
            }
        } else if path == "labels" {
            out = without_empty(new.clone());
        } else {
            return Err(Error::InvalidArgument(format!(
                "cannot update {path:?} field on snapshot {name:?}"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.redb")).unwrap();
        (dir, store)
    }

    fn ok(_: u64) -> Result<()> {
        Ok(())
    }

    #[test]
    fn create_commit_remove() {
        let (_d, s) = open();
        let a = s
            .create(Kind::Active, "a", "", labels(&[("x", "1")]), ok)
            .unwrap();
        assert_eq!(a.id, 1);
        let c = s
            .commit("base", "a", labels(&[("y", "2")]), (10, 2))
            .unwrap();
        assert_eq!(c.id, 1);
        assert_eq!(c.labels, labels(&[("y", "2")]), "commit replaces labels");
        assert!(s.get("a").unwrap().is_none());
        let b = s
            .create(Kind::Active, "b", "base", BTreeMap::new(), ok)
            .unwrap();
        assert_eq!(b.parent_ids, vec![1]);
        assert!(s.has_children(1).unwrap());
        let err = s.remove("base", |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        s.remove("b", |_| Ok(())).unwrap();
        assert!(!s.has_children(1).unwrap());
        s.remove("base", |_| Ok(())).unwrap();
        assert!(s.ids().unwrap().is_empty());
        // Ids are not reused.
        let d = s.create(Kind::View, "d", "", BTreeMap::new(), ok).unwrap();
        assert_eq!(d.id, 3);
    }

    #[test]
    fn status_of_each_mistake() {
        let (_d, s) = open();
        let e = s
            .create(Kind::Active, "", "", BTreeMap::new(), ok)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        let e = s
            .create(Kind::Active, "a", "nope", BTreeMap::new(), ok)
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        s.create(Kind::Active, "a", "", BTreeMap::new(), ok)
            .unwrap();
        let e = s
            .create(Kind::View, "a", "", BTreeMap::new(), ok)
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)));
        let e = s
            .create(Kind::Active, "b", "a", BTreeMap::new(), ok)
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(_)),
            "parent not committed"
        );
        s.create(Kind::View, "v", "", BTreeMap::new(), ok).unwrap();
        let e = s.commit("c", "v", BTreeMap::new(), (0, 0)).unwrap_err();
        assert!(
            matches!(e, Error::FailedPrecondition(_)),
            "commit of a view"
        );
        let e = s
            .commit("c", "missing", BTreeMap::new(), (0, 0))
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        let e = s.commit("v", "a", BTreeMap::new(), (0, 0)).unwrap_err();
        assert!(
            matches!(e, Error::AlreadyExists(_)),
            "names and keys share a namespace"
        );
        let big = "v".repeat(MAX_LABEL_SIZE);
        let e = s
            .create(Kind::Active, "z", "", labels(&[("k", &big)]), ok)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        let e = s.remove("missing", |_| Ok(())).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        // A failing on_commit leaves nothing behind.
        let e = s
            .create(Kind::Active, "f", "", BTreeMap::new(), |_| {
                Err(Error::Internal("boom".into()))
            })
            .unwrap_err();
        assert!(matches!(e, Error::Internal(_)));
        assert!(s.get("f").unwrap().is_none());
    }

    #[test]
    fn field_paths() {
        let cur = labels(&[("a", "1"), ("b", "2")]);
        let new = labels(&[("a", "9"), ("c", "3")]);
        let up = |paths: &[&str]| {
            let p: Vec<String> = paths.iter().map(|s| s.to_string()).collect();
            apply_field_paths("s", &cur, &new, &p)
        };
        assert_eq!(up(&[]).unwrap(), new);
        assert_eq!(up(&["labels"]).unwrap(), new);
        assert_eq!(
            up(&["labels.a"]).unwrap(),
            labels(&[("a", "9"), ("b", "2")])
        );
        assert_eq!(
            up(&["labels.b"]).unwrap(),
            labels(&[("a", "1")]),
            "absent value deletes"
        );
        assert_eq!(
            up(&["labels.c", "labels.a"]).unwrap(),
            labels(&[("a", "9"), ("b", "2"), ("c", "3")])
        );
        for bad in ["name", "parent", "kind", "labelsx", "created_at"] {
            assert!(
                matches!(up(&[bad]).unwrap_err(), Error::InvalidArgument(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn update_persists() {
        let (d, s) = open();
        s.create(Kind::Active, "a", "", labels(&[("a", "1")]), ok)
            .unwrap();
        s.update("a", &labels(&[("b", "2")]), &["labels.b".to_string()])
            .unwrap();
        let e = s.update("zz", &BTreeMap::new(), &[]).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        drop(s);
        let s = Store::open(&d.path().join("meta.redb")).unwrap();
        assert_eq!(
            s.must_get("a").unwrap().labels,
            labels(&[("a", "1"), ("b", "2")])
        );
    }
}
