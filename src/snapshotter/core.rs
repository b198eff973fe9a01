//! The snapshotter proper: metadata store + directories + remote seam.
//!
//! # Crash consistency
//! Invariant: **a record exists ⇒ its directory is complete.**
//! - Create: build `new-*/{fs,work}` and fsync it; then, in one write
//!   transaction, insert the record, rename the directory to `<id>`, fsync
//!   `snapshots/`, commit. A crash before the commit leaves a directory
//!   without a record.
//! - Remove: delete the record in a committed transaction first; then rename
//!   `<id>` to `rm-<id>` and delete it. A crash leaves, again, only a
//!   directory without a record.
//! - At start and on `Cleanup`, every entry under `snapshots/` without a
//!   record is deleted.
//!
//! Directory changes and cleanup are serialized by one mutex, so `Cleanup`
//! never deletes a directory that a concurrent `Prepare` is still building.
//!
//! All methods except the `async` ones block; the gRPC service runs them on
//! the blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::proto::types::Mount;

use super::error::{Error, Result};
use super::filters::{Filter, SnapshotFields};
use super::metadata::{Kind, Record, Store};
use super::overlay::{self, Layout};
use super::remote::{REMOTE_LABEL, REMOTE_LABEL_VALUE, RemoteFs, TARGET_REF_LABEL};

/// A snapshot as reported by `Stat`, `Update` and `List`.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

impl Info {
    fn from_record(name: &str, r: Record) -> Info {
        Info {
            name: name.to_string(),
            parent: r.parent,
            kind: r.kind,
            labels: r.labels,
            created: r.created,
            updated: r.updated,
        }
    }
}

/// A step at which tests can simulate a crash (see [`Snapshotter::set_crash_point`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Create: the temporary directory is built, no transaction yet.
    CreateAfterTempDir,
    /// Create: record inserted and directory renamed, not committed.
    CreateBeforeCommit,
    /// Remove: record deletion committed, directory untouched.
    RemoveAfterCommit,
    /// Remove: directory renamed to its removal name, not deleted.
    RemoveAfterRetire,
}

impl CrashPoint {
    fn name(self) -> &'static str {
        match self {
            CrashPoint::CreateAfterTempDir => "create: after temp dir",
            CrashPoint::CreateBeforeCommit => "create: before commit",
            CrashPoint::RemoveAfterCommit => "remove: after commit",
            CrashPoint::RemoveAfterRetire => "remove: after retire",
        }
    }
}

/// The snapshotter. Share it as `Arc<Snapshotter>`.
pub struct Snapshotter {
    root: PathBuf,
    layout: Layout,
    store: Store,
    remote: Arc<dyn RemoteFs>,
    dirs: Mutex<()>,
    crash_at: Mutex<Option<CrashPoint>>,
    /// Labels of the snapshots mounted through [`RemoteFs`], by id: what
    /// `Mounts` checks before handing out lower dirs.
    remote_layers: Mutex<HashMap<u64, BTreeMap<String, String>>>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.root)
            .finish()
    }
}

impl Snapshotter {
    /// Opens (or creates) the snapshotter under `root` and deletes crash
    /// debris. Blocking; does not touch remote mounts (see
    /// [`Snapshotter::restore_remote`]).
    pub fn open_blocking(root: &Path, remote: Arc<dyn RemoteFs>) -> Result<Snapshotter> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| Error::io("create", root, e))?;
        let layout = Layout::new(root)?;
        let store = Store::open(&root.join("metadata.redb"))?;
        let s = Snapshotter {
            root: root.to_path_buf(),
            layout,
            store,
            remote,
            dirs: Mutex::new(()),
            crash_at: Mutex::new(None),
            remote_layers: Mutex::new(HashMap::new()),
        };
        let removed = s.cleanup()?;
        if removed > 0 {
            tracing::info!(removed, "deleted snapshot directories left by a crash");
        }
        Ok(s)
    }

    /// Opens the snapshotter on the blocking pool, then remounts the remote
    /// snapshots.
    pub async fn open(root: &Path, remote: Arc<dyn RemoteFs>) -> Result<Arc<Snapshotter>> {
        let root = root.to_path_buf();
        let s = Arc::new(blocking(move || Snapshotter::open_blocking(&root, remote)).await?);
        s.restore_remote().await?;
        s.remote.restored().await;
        Ok(s)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Makes the next operation that reaches `point` stop there as if the
    /// process had been killed. For crash tests only.
    pub fn set_crash_point(&self, point: Option<CrashPoint>) {
        *self.crash_at.lock().unwrap_or_else(|p| p.into_inner()) = point;
    }

    fn crash_here(&self, point: CrashPoint) -> Result<()> {
        let mut at = self.crash_at.lock().unwrap_or_else(|p| p.into_inner());
        if *at == Some(point) {
            *at = None;
            return Err(Error::SimulatedCrash(point.name()));
        }
        Ok(())
    }

    fn lock_dirs(&self) -> MutexGuard<'_, ()> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates an active or view snapshot and returns its mounts.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(Record, Vec<Mount>)> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let _g = self.lock_dirs();
        let tmp = self.layout.make_temp()?;
        self.crash_here(CrashPoint::CreateAfterTempDir)?;
        let mut placed = None;
        let result = self.store.create(kind, key, parent, labels, |id| {
            self.layout.place(&tmp, id)?;
            placed = Some(id);
            self.crash_here(CrashPoint::CreateBeforeCommit)
        });
        match result {
            Ok(r) => {
                let m = overlay::mounts(&self.layout, r.kind, r.id, &r.parent_ids);
                Ok((r, m))
            }
            Err(e) => {
                if matches!(e, Error::SimulatedCrash(_)) {
                    return Err(e);
                }
                // The transaction did not commit: undo the directory.
                let dir = placed.map_or(tmp, |id| self.layout.dir(id));
                if let Err(de) = overlay::delete_tree(&dir) {
                    tracing::warn!(error = %de, "cannot delete directory of failed snapshot; Cleanup will");
                }
                Err(e)
            }
        }
    }

    /// The mounts of an active or view snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.store.must_get(key)?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed, not active or view"
            )));
        }
        Ok(overlay::mounts(&self.layout, r.kind, r.id, &r.parent_ids))
    }

    /// Commits active snapshot `key` as `name`, measuring its usage.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Record> {
        let r = self.store.must_get(key)?;
        let usage = if r.kind == Kind::Active && !labels.contains_key(REMOTE_LABEL) {
            overlay::usage(&self.layout.fs(r.id))?
        } else {
            // Remote snapshots are not walked: that would fetch the layer.
            (0, 0)
        };
        self.store.commit(name, key, labels, usage)
    }

    /// Deletes the record of `key` and then its directory. The caller has
    /// unmounted anything remote.
    pub fn remove_blocking(&self, key: &str) -> Result<Record> {
        let retired = {
            let _g = self.lock_dirs();
            let r = self.store.remove(key, |_| Ok(()))?;
            self.crash_here(CrashPoint::RemoveAfterCommit)?;
            let retired = self.layout.retire(r.id)?;
            self.crash_here(CrashPoint::RemoveAfterRetire)?;
            (r, retired)
        };
        if let Some(path) = &retired.1
            && let Err(e) = overlay::delete_tree(path)
        {
            // The snapshot is gone as far as anyone can see; Cleanup or the
            // next start deletes what is left.
            tracing::warn!(path = %path.display(), error = %e, "cannot delete removed snapshot's directory");
        }
        Ok(retired.0)
    }

    /// `Stat`.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(Info::from_record(key, self.store.must_get(key)?))
    }

    /// `Update` with containerd's field paths.
    pub fn update(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        Ok(Info::from_record(
            name,
            self.store.update(name, labels, paths)?,
        ))
    }

    /// `Usage`: measured now for active snapshots, stored otherwise.
    pub fn usage(&self, key: &str) -> Result<(i64, i64)> {
        let r = self.store.must_get(key)?;
        if r.kind == Kind::Active {
            overlay::usage(&self.layout.fs(r.id))
        } else {
            Ok((r.size, r.inodes))
        }
    }

    /// `List` with containerd filters.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse_all(filters)?;
        let mut out = Vec::new();
        self.store.for_each(|name, r| {
            let fields = SnapshotFields {
                name,
                parent: &r.parent,
                kind: r.kind.as_str(),
                labels: &r.labels,
            };
            if filter.matches(&fields) {
                out.push(Info::from_record(name, r));
            }
        })?;
        Ok(out)
    }

    /// Deletes every directory under `snapshots/` without a record. Returns
    /// how many entries were deleted.
    pub fn cleanup(&self) -> Result<usize> {
        let debris = {
            let _g = self.lock_dirs();
            let live = self.store.ids()?;
            let mut debris = self.layout.debris(&live)?;
            // An orphan `<id>` could be reused by the next create as soon
            // as the lock is released: move it aside while still holding it.
            for path in &mut debris {
                if let Some(aside) = self.layout.set_aside(path)? {
                    *path = aside;
                }
            }
            debris
        };
        let mut deleted = 0;
        for path in &debris {
            tracing::debug!(path = %path.display(), "deleting orphan snapshot directory");
            match overlay::delete_tree(path) {
                Ok(()) => deleted += 1,
                // A concurrent Remove may be deleting the same `rm-*`.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete orphan")
                }
            }
        }
        Ok(deleted)
    }

    /// Every record, with its name; for consistency checks.
    pub fn records(&self) -> Result<Vec<(String, Record)>> {
        let mut out = Vec::new();
        self.store.for_each(|n, r| out.push((n.to_string(), r)))?;
        Ok(out)
    }

    // ---- async operations that involve the remote filesystem ----

    /// `Prepare`. With [`TARGET_REF_LABEL`], tries to mount the layer
    /// remotely; on success commits it under the target and returns
    /// `AlreadyExists`, as containerd's remote-snapshot protocol expects.
    pub async fn prepare(
        self: &Arc<Self>,
        key: String,
        parent: String,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let target = labels.get(TARGET_REF_LABEL).cloned();
        if let Some(target) = &target {
            let (s, t) = (self.clone(), target.clone());
            if blocking(move || s.store.get(&t)).await?.is_some() {
                return Err(target_exists(target));
            }
        }
        let s = self.clone();
        let (k, p, l) = (key.clone(), parent, labels.clone());
        let (record, mounts) = blocking(move || s.create(Kind::Active, &k, &p, l)).await?;
        let Some(target) = target else {
            return Ok(mounts);
        };
        let fs = self.layout.fs(record.id);
        match self.remote.mount(&fs, &labels).await {
            Err(e) => {
                tracing::info!(
                    key = %key,
                    target = %target,
                    remote_snapshot_prepared = false,
                    reason = %e,
                    "layer will be pulled and unpacked normally"
                );
                Ok(mounts)
            }
            Ok(()) => {
                let mut labels = labels;
                labels.insert(REMOTE_LABEL.to_string(), REMOTE_LABEL_VALUE.to_string());
                let (s, t, k) = (self.clone(), target.clone(), key.clone());
                match blocking(move || s.commit(&t, &k, labels)).await {
                    Ok(committed) => {
                        self.remote_layers().insert(committed.id, committed.labels);
                        tracing::info!(key = %key, target = %target, remote_snapshot_prepared = true, "layer mounted remotely");
                        Err(target_exists(&target))
                    }
                    Err(e) => {
                        let lost_race = matches!(e, Error::AlreadyExists(_));
                        tracing::info!(
                            key = %key,
                            target = %target,
                            remote_snapshot_prepared = false,
                            reason = %format!("commit failed: {e}"),
                            "undoing remote mount"
                        );
                        if let Err(ue) = self.remote.unmount(&fs).await {
                            tracing::warn!(path = %fs.display(), error = %ue, "remote unmount failed");
                        }
                        if lost_race {
                            // Someone else committed the target meanwhile.
                            let (s, k) = (self.clone(), key.clone());
                            let _ = blocking(move || s.remove_blocking(&k)).await;
                            return Err(target_exists(&target));
                        }
                        Ok(mounts)
                    }
                }
            }
        }
    }

    /// `Remove`: unmounts a remote snapshot first, then deletes it.
    pub async fn remove(self: &Arc<Self>, key: String) -> Result<()> {
        let s = self.clone();
        let k = key.clone();
        let r = blocking(move || s.store.must_get(&k)).await?;
        if r.labels.contains_key(REMOTE_LABEL) {
            let s = self.clone();
            if blocking(move || s.store.has_children(r.id)).await? {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?} with child"
                )));
            }
            let fs = self.layout.fs(r.id);
            self.remote
                .unmount(&fs)
                .await
                .map_err(|e| Error::Remote(format!("unmount {}: {e}", fs.display())))?;
        }
        let s = self.clone();
        let removed = blocking(move || s.remove_blocking(&key)).await?;
        self.remote_layers().remove(&removed.id);
        Ok(())
    }

    fn remote_layers(&self) -> MutexGuard<'_, HashMap<u64, BTreeMap<String, String>>> {
        self.remote_layers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Mounts`, checking first that every remote layer below the snapshot
    /// is still served (a dead FUSE server would fail every read of the
    /// container otherwise). A failed check tries one remount.
    pub async fn checked_mounts(self: &Arc<Self>, key: &str) -> Result<Vec<Mount>> {
        let r = self.store.must_get(key)?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed, not active or view"
            )));
        }
        let remote: Vec<(u64, BTreeMap<String, String>)> = {
            let layers = self.remote_layers();
            if layers.is_empty() {
                Vec::new()
            } else {
                r.parent_ids
                    .iter()
                    .filter_map(|id| layers.get(id).map(|l| (*id, l.clone())))
                    .collect()
            }
        };
        for (id, labels) in remote {
            let fs = self.layout.fs(id);
            let Err(e) = self.remote.check(&fs, &labels).await else {
                continue;
            };
            tracing::warn!(key = %key, layer = %fs.display(), reason = %e, "remote layer check failed; remounting");
            let _ = nix::mount::umount2(&fs, nix::mount::MntFlags::MNT_DETACH);
            self.remote.mount(&fs, &labels).await.map_err(|me| {
                Error::Remote(format!(
                    "layer {} unavailable: {e}; remount: {me}",
                    fs.display()
                ))
            })?;
        }
        Ok(overlay::mounts(&self.layout, r.kind, r.id, &r.parent_ids))
    }

    /// Remounts every snapshot labelled remote: `check` first, `mount` if
    /// the check fails. Failures are logged, not fatal. Up to
    /// [`RESTORE_CONCURRENCY`] layers at once: while a FUSE connection taken
    /// over from a previous daemon waits for them, running containers' reads
    /// wait too.
    pub async fn restore_remote(self: &Arc<Self>) -> Result<()> {
        let s = self.clone();
        let records = blocking(move || s.records()).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for (name, r) in records {
            if !r.labels.contains_key(REMOTE_LABEL) {
                continue;
            }
            self.remote_layers().insert(r.id, r.labels.clone());
            while tasks.len() >= RESTORE_CONCURRENCY {
                let _ = tasks.join_next().await;
            }
            let s = self.clone();
            tasks.spawn(async move { s.restore_one(&name, r.id, &r.labels).await });
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    async fn restore_one(&self, name: &str, id: u64, labels: &BTreeMap<String, String>) {
        let fs = self.layout.fs(id);
        if self.remote.check(&fs, labels).await.is_ok() {
            return;
        }
        // A stale mount from the previous process may still be there.
        let _ = nix::mount::umount2(&fs, nix::mount::MntFlags::MNT_DETACH);
        match self.remote.mount(&fs, labels).await {
            Ok(()) => tracing::info!(snapshot = %name, "remote snapshot restored"),
            Err(e) => tracing::warn!(
                snapshot = %name,
                path = %fs.display(),
                reason = %e,
                "failed to restore remote snapshot"
            ),
        }
    }
}

/// Remote layers reopened at once on start.
pub(crate) const RESTORE_CONCURRENCY: usize = 4;

fn target_exists(target: &str) -> Error {
    Error::AlreadyExists(format!("target snapshot {target:?}"))
}

/// Runs blocking work on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
