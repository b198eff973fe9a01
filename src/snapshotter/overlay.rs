//! Snapshot directories, overlayfs mount descriptions and disk usage.
//!
//! Every snapshot owns `<root>/snapshots/<id>/` with `fs/` (its contents, the
//! overlay upper dir) and `work/` (overlayfs' work dir). Directories are
//! built under a temporary name (`new-<pid>-<n>`) and renamed to `<id>` in
//! the same transaction that inserts the record; removal renames `<id>` to
//! `rm-<id>` before deleting it. Any other name under `snapshots/`, or an
//! `<id>` with no record, is debris from a crash.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::types::Mount;

use super::error::{Error, Result};
use super::metadata::Kind;

/// Prefix of directories being built.
const TEMP_PREFIX: &str = "new-";
/// Prefix of directories being deleted.
const REMOVE_PREFIX: &str = "rm-";

/// Paths under the snapshotter root.
#[derive(Debug)]
pub struct Layout {
    snapshots: PathBuf,
    counter: AtomicU64,
}

impl Layout {
    /// Creates `<root>/snapshots` if needed.
    pub fn new(root: &Path) -> Result<Layout> {
        let snapshots = root.join("snapshots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots)
            .map_err(|e| Error::io("create", &snapshots, e))?;
        Ok(Layout {
            snapshots,
            counter: AtomicU64::new(0),
        })
    }

    /// `<root>/snapshots`.
    pub fn snapshots_dir(&self) -> &Path {
        &self.snapshots
    }

    /// `<root>/snapshots/<id>`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    /// `<root>/snapshots/<id>/fs`: the snapshot's contents.
    pub fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// `<root>/snapshots/<id>/work`.
    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Builds a complete, fsync'd snapshot directory under a temporary name
    /// and returns its path.
    pub fn make_temp(&self) -> Result<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .snapshots
            .join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
        let mk = |p: &Path, mode: u32| {
            fs::DirBuilder::new()
                .mode(mode)
                .create(p)
                .map_err(|e| Error::io("create", p, e))
        };
        mk(&tmp, 0o700)?;
        let built = mk(&tmp.join("fs"), 0o755)
            .and_then(|_| mk(&tmp.join("work"), 0o711))
            .and_then(|_| fsync_dir(&tmp));
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    /// Renames a temporary directory to `<id>` and makes the rename durable.
    pub fn place(&self, tmp: &Path, id: u64) -> Result<()> {
        let dst = self.dir(id);
        // Ids come from the store's counter, so an existing `<id>` can only
        // be the orphan of a create whose transaction never committed.
        if dst.exists() {
            delete_tree(&dst)?;
        }
        fs::rename(tmp, &dst).map_err(|e| Error::io("rename into place", &dst, e))?;
        fsync_dir(&self.snapshots)
    }

    /// Moves `<id>` aside to its removal name; returns the new path, or
    /// `None` when the directory is already gone.
    pub fn retire(&self, id: u64) -> Result<Option<PathBuf>> {
        let src = self.dir(id);
        let dst = self.snapshots.join(format!("{REMOVE_PREFIX}{id}"));
        match fs::rename(&src, &dst) {
            Ok(()) => Ok(Some(dst)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("rename for removal", &src, e)),
        }
    }

    /// Renames an orphan named like a snapshot id (`<id>`) to a removal
    /// name, so that a new snapshot can take the id; returns the new path.
    /// Other names are left alone (`None`).
    pub fn set_aside(&self, path: &Path) -> Result<Option<PathBuf>> {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return Ok(None);
        };
        if name.parse::<u64>().is_err() {
            return Ok(None);
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let aside = self.snapshots.join(format!(
            "{REMOVE_PREFIX}orphan-{name}-{}-{n}",
            std::process::id()
        ));
        fs::rename(path, &aside).map_err(|e| Error::io("rename for removal", path, e))?;
        Ok(Some(aside))
    }

    /// Every entry under `snapshots/` that is not the directory of a live
    /// id: temporary and removal leftovers and orphans.
    pub fn debris(&self, live: &HashSet<u64>) -> Result<Vec<PathBuf>> {
        let rd =
            fs::read_dir(&self.snapshots).map_err(|e| Error::io("read", &self.snapshots, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("read", &self.snapshots, e))?;
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| live.contains(&id));
            if !keep {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

/// Deletes a snapshot directory tree, first detaching anything still
/// mounted on its `fs` (a remote mount left by a crashed process).
pub fn delete_tree(path: &Path) -> Result<()> {
    let _ = nix::mount::umount2(&path.join("fs"), nix::mount::MntFlags::MNT_DETACH);
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// fsyncs a directory so that entries created or renamed in it persist.
pub fn fsync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("fsync", path, e))
}

/// The mounts that give a snapshot of `kind` with directory `id` and
/// ancestors `parent_ids` (nearest first), following containerd's overlay
/// snapshotter.
pub fn mounts(layout: &Layout, kind: Kind, id: u64, parent_ids: &[u64]) -> Vec<Mount> {
    let bind = |source: PathBuf, ro: bool| Mount {
        r#type: "bind".to_string(),
        source: source.to_string_lossy().into_owned(),
        target: String::new(),
        options: vec![
            if ro { "ro" } else { "rw" }.to_string(),
            "rbind".to_string(),
        ],
    };
    let lowerdir = || {
        let dirs: Vec<String> = parent_ids
            .iter()
            .map(|p| layout.fs(*p).to_string_lossy().into_owned())
            .collect();
        format!("lowerdir={}", dirs.join(":"))
    };
    let overlay = |options: Vec<String>| Mount {
        r#type: "overlay".to_string(),
        source: "overlay".to_string(),
        target: String::new(),
        options,
    };
    let mount = match (kind, parent_ids) {
        (Kind::View, []) => bind(layout.fs(id), true),
        (Kind::View, [one]) => bind(layout.fs(*one), true),
        (Kind::View, _) => overlay(vec![lowerdir()]),
        (_, []) => bind(layout.fs(id), false),
        (_, _) => overlay(vec![
            format!("workdir={}", layout.work(id).display()),
            format!("upperdir={}", layout.fs(id).display()),
            lowerdir(),
        ]),
    };
    vec![mount]
}

/// Disk usage of a tree: (bytes allocated, inodes), counting every inode
/// once however many hard links reach it. Does not follow symlinks.
pub fn usage(root: &Path) -> Result<(i64, i64)> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut size: u64 = 0;
    let mut inodes: u64 = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            // Files may vanish while an active snapshot is in use.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("stat", &path, e)),
        };
        if seen.insert((md.dev(), md.ino())) {
            inodes += 1;
            size += md.blocks() * 512;
        }
        if md.is_dir() {
            let rd = match fs::read_dir(&path) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("read", &path, e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| Error::io("read", &path, e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok((
        i64::try_from(size).unwrap_or(i64::MAX),
        i64::try_from(inodes).unwrap_or(i64::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_layouts() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path()).unwrap();
        let s = |id: u64| format!("{}/snapshots/{id}", d.path().display());

        let m = mounts(&l, Kind::Active, 1, &[]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, format!("{}/fs", s(1)));
        assert_eq!(m[0].options, vec!["rw", "rbind"]);

        let m = mounts(&l, Kind::Active, 5, &[4, 2, 1]);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(m[0].source, "overlay");
        assert_eq!(
            m[0].options,
            vec![
                format!("workdir={}/work", s(5)),
                format!("upperdir={}/fs", s(5)),
                format!("lowerdir={}/fs:{}/fs:{}/fs", s(4), s(2), s(1)),
            ]
        );

        let m = mounts(&l, Kind::View, 7, &[3]);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, format!("{}/fs", s(3)));
        assert_eq!(m[0].options, vec!["ro", "rbind"]);

        let m = mounts(&l, Kind::View, 7, &[3, 2]);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            vec![format!("lowerdir={}/fs:{}/fs", s(3), s(2))]
        );

        let m = mounts(&l, Kind::View, 7, &[]);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, format!("{}/fs", s(7)));
        assert_eq!(m[0].options, vec!["ro", "rbind"]);
    }

    #[test]
    fn usage_counts_hardlinks_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("fs");
        fs::create_dir(&root).unwrap();
        let (s0, i0) = usage(&root).unwrap();
        assert_eq!(i0, 1);
        fs::write(root.join("a"), vec![1u8; 64 * 1024]).unwrap();
        fs::hard_link(root.join("a"), root.join("b")).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink("a", root.join("sub/l")).unwrap();
        let (s1, i1) = usage(&root).unwrap();
        assert_eq!(i1, 4, "root, a (=b), sub, sub/l");
        assert!(s1 - s0 >= 64 * 1024, "{s0} -> {s1}");
        assert!(
            s1 - s0 < 2 * 64 * 1024,
            "hard link counted twice: {s0} -> {s1}"
        );
    }

    #[test]
    fn temp_place_retire_debris() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path()).unwrap();
        let t = l.make_temp().unwrap();
        assert!(t.join("fs").is_dir() && t.join("work").is_dir());
        let t2 = l.make_temp().unwrap();
        l.place(&t, 1).unwrap();
        assert!(l.fs(1).is_dir());
        let live: HashSet<u64> = [1].into();
        assert_eq!(l.debris(&live).unwrap(), vec![t2.clone()]);
        let rm = l.retire(1).unwrap().unwrap();
        assert!(l.retire(1).unwrap().is_none());
        let mut debris = l.debris(&live).unwrap();
        debris.sort();
        let mut want = vec![t2, rm];
        want.sort();
        assert_eq!(debris, want);
        for p in debris {
            delete_tree(&p).unwrap();
        }
        assert!(l.debris(&HashSet::new()).unwrap().is_empty());
    }
}
