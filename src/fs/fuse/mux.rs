//! One FUSE mount for every layer of the daemon.
//!
//! Mounting each layer on its own costs a fuser session (a session thread
//! and its workers, a `/dev/fuse` fd each) per layer. Instead the daemon
//! mounts one [`MuxFs`] at `<root>/fuse`: its root lists one directory per
//! layer, named by the layer's *slot* number, and one small worker pool
//! answers them all. A snapshot's `fs` directory becomes a bind mount of
//! `<root>/fuse/<slot>`, so overlayfs and mountinfo see a `fuse.rstargz`
//! mount there as before.
//!
//! Inode numbers are `slot << 32 | local` ([`slot_base`]), `local` being the
//! layer's own numbering (from its TOC, deterministic). Slot 0 is the root.
//! A slot is never reused while the kernel may still hold inode numbers of
//! its previous layer: detaching a layer unbinds it and invalidates its
//! root entry, and the layer stays in the table (answering requests) until
//! the kernel has forgotten every inode it was given (lookup counting,
//! [`LayerFs::lookups`]). Those properties are what a future hand-over of
//! the `/dev/fuse` fd to a restarted daemon needs (ARCHITECTURE.md).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    KernelConfig, LockOwner, Notifier, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use nix::mount::MsFlags;

use super::LayerFs;
use super::mount::{MountHandle, MountOptions, Unmounted, start, unmount};
use super::ops::{GEN, negotiate};

/// Bits of an inode number that belong to the layer; the slot is above.
pub const SLOT_BITS: u32 = 32;
const ROOT: INodeNo = INodeNo(1);
/// The root's listing changes as layers come and go: cache it briefly.
const ROOT_TTL: Duration = Duration::from_secs(1);

/// First inode number of `slot`'s layer (its root is `base + 1`).
pub fn slot_base(slot: u32) -> u64 {
    u64::from(slot) << SLOT_BITS
}

fn slot_of(ino: INodeNo) -> Option<u32> {
    u32::try_from(ino.0 >> SLOT_BITS).ok().filter(|&s| s != 0)
}

struct Slot {
    fs: Arc<LayerFs>,
    /// The bind mount; `None` once detached (then only the kernel's
    /// remaining references keep the slot).
    target: Option<PathBuf>,
}

type Table = RwLock<BTreeMap<u32, Slot>>;

fn read(t: &Table) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Slot>> {
    // Every update is a single insert, remove or field store.
    t.read().unwrap_or_else(|p| p.into_inner())
}

fn write(t: &Table) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, Slot>> {
    t.write().unwrap_or_else(|p| p.into_inner())
}

/// The `fuser::Filesystem` of the multiplexed mount: the root directory
/// here, everything below it forwarded to the slot's [`LayerFs`]. No lock
/// is held while a layer answers.
struct MuxFs {
    table: Arc<Table>,
    max_inflight_reads: usize,
    mounted_at: SystemTime,
}

impl MuxFs {
    fn layer(&self, ino: INodeNo) -> Option<Arc<LayerFs>> {
        let slot = slot_of(ino)?;
        read(&self.table).get(&slot).map(|s| s.fs.clone())
    }

    fn root_attr(&self) -> FileAttr {
        let t = self.mounted_at;
        FileAttr {
            ino: ROOT,
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Attached slots from `start` on, in order (a readdir page).
    fn listing(&self, start: u32) -> Vec<(u32, Arc<LayerFs>)> {
        read(&self.table)
            .range(start..)
            .filter(|(_, s)| s.target.is_some())
            .map(|(&n, s)| (n, s.fs.clone()))
            .collect()
    }

    fn forget_one(&self, ino: INodeNo, n: u64) {
        let Some(slot) = slot_of(ino) else { return };
        let left = match read(&self.table).get(&slot) {
            Some(s) => (s.fs.forgot(n), s.target.is_none()),
            None => return,
        };
        if left == (0, true) {
            reap(&self.table, slot);
        }
    }
}

/// Drops a detached slot once the kernel holds none of its inodes.
fn reap(table: &Table, slot: u32) {
    let mut t = write(table);
    if t.get(&slot)
        .is_some_and(|s| s.target.is_none() && s.fs.lookups() == 0)
    {
        t.remove(&slot);
        tracing::debug!(slot, "layer slot released");
    }
}

/// Readdir offsets: 1 and 2 are `.` and `..`, then slot `n` is `n + 3`.
fn first_slot(offset: u64) -> Option<u32> {
    match offset {
        0..=2 => Some(1),
        o => u32::try_from(o - 2).ok(),
    }
}

impl Filesystem for MuxFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        negotiate(config, self.max_inflight_reads);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT {
            return match self.layer(parent) {
                Some(fs) => fs.lookup(req, parent, name, reply),
                None => reply.error(Errno::ENOENT),
            };
        }
        let slot = name.to_str().and_then(|n| n.parse::<u32>().ok());
        let fs = slot.and_then(|n| {
            read(&self.table)
                .get(&n)
                .filter(|s| s.target.is_some())
                .map(|s| s.fs.clone())
        });
        match fs {
            Some(fs) => fs.reply_root_entry(reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_one(ino, nlookup);
    }

    // `batch_forget` falls back to `forget` per node (fuser's default).

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT {
            return reply.attr(&ROOT_TTL, &self.root_attr());
        }
        match self.layer(ino) {
            Some(fs) => fs.getattr(req, ino, fh, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.layer(ino) {
            Some(fs) => fs.readlink(req, ino, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino == ROOT {
            return reply.error(Errno::EISDIR);
        }
        match self.layer(ino) {
            Some(fs) => fs.open(req, ino, flags, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.layer(ino) {
            Some(fs) => fs.read(req, ino, fh, offset, size, flags, lock_owner, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.layer(ino) {
            Some(fs) => fs.release(req, ino, fh, flags, lock_owner, flush, reply),
            None => reply.ok(),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino == ROOT {
            return reply.opened(FileHandle(0), FopenFlags::empty());
        }
        match self.layer(ino) {
            Some(fs) => fs.opendir(req, ino, flags, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return match self.layer(ino) {
                Some(fs) => fs.readdir(req, ino, fh, offset, reply),
                None => reply.error(Errno::ENOENT),
            };
        }
        for (o, name) in [(1, "."), (2, "..")] {
            if offset < o && reply.add(ROOT, o, FileType::Directory, name) {
                return reply.ok();
            }
        }
        if let Some(start) = first_slot(offset) {
            for (slot, fs) in self.listing(start) {
                let off = u64::from(slot) + 3;
                if reply.add(fs.root_ino(), off, FileType::Directory, slot.to_string()) {
                    break;
                }
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if ino != ROOT {
            return match self.layer(ino) {
                Some(fs) => fs.readdirplus(req, ino, fh, offset, reply),
                None => reply.error(Errno::ENOENT),
            };
        }
        let root = self.root_attr();
        for (o, name) in [(1, "."), (2, "..")] {
            if offset < o && reply.add(ROOT, o, name, &ROOT_TTL, &root, GEN) {
                return reply.ok();
            }
        }
        if let Some(start) = first_slot(offset) {
            for (slot, fs) in self.listing(start) {
                let Some(attr) = fs.root_attr() else { continue };
                let off = u64::from(slot) + 3;
                // The kernel takes a reference on each entry it accepts.
                fs.count_lookup();
                if reply.add(attr.ino, off, slot.to_string(), &fs.ttl(), &attr, GEN) {
                    fs.forgot(1);
                    break;
                }
            }
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.layer(ino) {
            Some(fs) => fs.statfs(req, ino, reply),
            None => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.layer(ino) {
            Some(fs) => fs.getxattr(req, ino, name, size, reply),
            None if ino == ROOT => reply.error(Errno::from_i32(libc::ENODATA)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.layer(ino) {
            Some(fs) => fs.listxattr(req, ino, size, reply),
            None if ino == ROOT && size == 0 => reply.size(0),
            None if ino == ROOT => reply.data(&[]),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.layer(ino) {
            Some(fs) => fs.access(req, ino, mask, reply),
            None if ino == ROOT && mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            None if ino == ROOT => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}

/// The daemon's multiplexed FUSE mount. Dropping it unbinds every layer and
/// unmounts (lazily if busy).
pub struct MuxMount {
    dir: PathBuf,
    table: Arc<Table>,
    notifier: Notifier,
    handle: Mutex<Option<MountHandle>>,
}

impl std::fmt::Debug for MuxMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxMount").field("dir", &self.dir).finish()
    }
}

impl MuxMount {
    /// Mounts an empty multiplexed filesystem at `dir` (created if needed;
    /// a stale mount left there by a crashed daemon is cleared first).
    /// Blocking: mount(2) and the FUSE handshake.
    pub fn mount(dir: &Path, opts: &MountOptions, max_inflight_reads: usize) -> io::Result<Self> {
        // A dead mount answers ENOTCONN: clear it before looking at the dir.
        let _ = unmount(dir);
        std::fs::create_dir_all(dir)?;
        let table = Arc::new(Table::default());
        let fs = MuxFs {
            table: table.clone(),
            max_inflight_reads,
            mounted_at: SystemTime::now(),
        };
        let (handle, notifier) = start(dir, fs, opts)?;
        Ok(MuxMount {
            dir: dir.to_path_buf(),
            table,
            notifier,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Where the multiplexed filesystem is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `slot` can take a layer: never used, or its previous layer
    /// fully forgotten by the kernel.
    pub fn is_free(&self, slot: u32) -> bool {
        slot != 0 && !read(&self.table).contains_key(&slot)
    }

    /// Layers in the table: attached plus detached ones the kernel still
    /// references.
    pub fn slots_in_use(&self) -> (usize, usize) {
        let t = read(&self.table);
        let attached = t.values().filter(|s| s.target.is_some()).count();
        (attached, t.len() - attached)
    }

    /// Serves `fs` as `<dir>/<slot>` and bind-mounts that on `target` (an
    /// existing directory; a stale mount there is cleared first).
    /// Blocking.
    pub fn attach(&self, slot: u32, fs: LayerFs, target: &Path) -> io::Result<()> {
        let fs = Arc::new(fs.with_ino_base(slot_base(slot)));
        {
            let mut t = write(&self.table);
            if slot == 0 || t.contains_key(&slot) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("FUSE slot {slot} is in use"),
                ));
            }
            t.insert(
                slot,
                Slot {
                    fs,
                    target: Some(target.to_path_buf()),
                },
            );
        }
        let _ = unmount(target);
        let src = self.dir.join(slot.to_string());
        let bound = nix::mount::mount(
            Some(&src),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        );
        if let Err(e) = bound {
            self.detach(slot);
            return Err(io::Error::other(format!(
                "bind mount of {} on {}: {e}",
                src.display(),
                target.display()
            )));
        }
        Ok(())
    }

    /// Unbinds `slot`'s layer (lazily if busy) and drops the kernel's cached
    /// entry for it. The layer keeps answering the kernel's remaining
    /// references (an overlay still using it) and leaves the table when
    /// they are forgotten. Blocking.
    pub fn detach(&self, slot: u32) -> Unmounted {
        let target = match write(&self.table).get_mut(&slot) {
            Some(s) => s.target.take(),
            None => return Unmounted::NotMounted,
        };
        let how = match &target {
            Some(t) => unmount(t).unwrap_or_else(|e| {
                tracing::warn!(target = %t.display(), error = %e, "unbinding layer failed");
                Unmounted::NotMounted
            }),
            None => Unmounted::NotMounted,
        };
        // Unused dentries below go now; the kernel forgets their inodes.
        let inval = self
            .notifier
            .inval_entry(ROOT, OsStr::new(&slot.to_string()));
        if let Err(e) = inval
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(slot, error = %e, "invalidating slot entry failed");
        }
        reap(&self.table, slot);
        how
    }
}

impl Drop for MuxMount {
    fn drop(&mut self) {
        let slots: Vec<u32> = read(&self.table)
            .iter()
            .filter(|(_, s)| s.target.is_some())
            .map(|(&n, _)| n)
            .collect();
        for slot in slots {
            self.detach(slot);
        }
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Err(e)) = handle.map(MountHandle::unmount) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "unmounting FUSE failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_live_in_the_high_bits() {
        assert_eq!(slot_of(INodeNo(1)), None);
        assert_eq!(slot_of(INodeNo(slot_base(7) + 1)), Some(7));
        assert_eq!(
            slot_of(INodeNo(slot_base(7) + u64::from(u32::MAX))),
            Some(7)
        );
        assert_eq!(slot_of(INodeNo(slot_base(u32::MAX) + 5)), Some(u32::MAX));
    }

    #[test]
    fn readdir_offsets_resume_after_the_last_slot() {
        assert_eq!(first_slot(0), Some(1));
        assert_eq!(first_slot(2), Some(1));
        // Slot 5 was returned with offset 8: continue at 6.
        assert_eq!(first_slot(8), Some(6));
    }
}
