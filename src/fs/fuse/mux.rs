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
//! [`LayerFs::lookups`]). Those properties let a restarted daemon take the
//! connection over ([`MuxMount::adopt`], [`crate::fs::handover`]) and
//! answer the inode numbers the kernel already holds.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
use super::adopt::{adopt, request_resend};
use super::mount::{MountHandle, MountOptions, Prepared, Unmounted, prepare, unmount};
use super::ops::{GEN, negotiate};
use crate::fs::handover::KernelInit;

/// Bits of an inode number that belong to the layer; the slot is above.
pub const SLOT_BITS: u32 = 32;
/// Version of the inode numbering (slot in the high bits, TOC node + 1 in
/// the low bits, whiteouts after the last node). A daemon only takes over a
/// connection whose numbering it shares; change this with the scheme.
pub const INODE_LAYOUT: u32 = 1;
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
    /// What the kernel offered at `FUSE_INIT`, for a successor.
    kernel: Arc<Mutex<Option<KernelInit>>>,
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
        if t.is_empty() {
            drop(t);
            // The last layer's index is freed now (the kernel let go).
            crate::fs::trim_heap();
        }
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
        let abi = config.kernel_abi();
        *self.kernel.lock().unwrap_or_else(|p| p.into_inner()) = Some(KernelInit {
            major: abi.0,
            minor: abi.1,
            flags: config.capabilities().bits(),
            // fuser does not tell; only used to replay the handshake.
            max_readahead: 128 << 10,
            inode_layout: INODE_LAYOUT,
        });
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

/// Whether the session answers the kernel yet.
enum Serving {
    Running(MountHandle),
    /// Adopted, waiting for [`MuxMount::resume`]: the layers are being put
    /// back in their slots, and their bind mounts (which need the session
    /// to answer lookups) wait here.
    Paused {
        prepared: Box<Prepared<MuxFs>>,
        binds: Vec<(u32, PathBuf)>,
    },
    Stopped,
}

/// The daemon's multiplexed FUSE mount. Dropping it unbinds every layer and
/// unmounts (lazily if busy), unless it was [parked](MuxMount::park).
pub struct MuxMount {
    dir: PathBuf,
    table: Arc<Table>,
    notifier: Notifier,
    serving: Mutex<Serving>,
    /// A duplicate of the session's `/dev/fuse` fd, to park with the holder.
    device: OwnedFd,
    kernel: Arc<Mutex<Option<KernelInit>>>,
    parked: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for MuxMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxMount").field("dir", &self.dir).finish()
    }
}

/// Whether `dir` is a `fuse.rstargz` mount point, from mountinfo (which,
/// unlike stat, does not ask the FUSE daemon).
pub fn is_mounted_here(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let fstype = f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1));
        f.get(4) == Some(&want.as_ref()) && fstype == Some(&"fuse.rstargz")
    })
}

impl MuxMount {
    fn new_fs(max_inflight_reads: usize) -> (MuxFs, Arc<Table>, Arc<Mutex<Option<KernelInit>>>) {
        let table = Arc::new(Table::default());
        let kernel = Arc::new(Mutex::new(None));
        let fs = MuxFs {
            table: table.clone(),
            max_inflight_reads,
            mounted_at: SystemTime::now(),
            kernel: kernel.clone(),
        };
        (fs, table, kernel)
    }

    /// Mounts an empty multiplexed filesystem at `dir` (created if needed;
    /// a stale mount left there by a crashed daemon is cleared first) and
    /// serves it. Blocking: mount(2) and the FUSE handshake.
    pub fn mount(dir: &Path, opts: &MountOptions, max_inflight_reads: usize) -> io::Result<Self> {
        // A dead mount answers ENOTCONN: clear it before looking at the dir.
        let _ = unmount(dir);
        std::fs::create_dir_all(dir)?;
        let (fs, table, kernel) = Self::new_fs(max_inflight_reads);
        let prepared = prepare(dir, fs, opts)?;
        let notifier = prepared.notifier();
        let device = prepared.device()?;
        let handle = prepared.spawn()?;
        Ok(MuxMount {
            dir: dir.to_path_buf(),
            table,
            notifier,
            serving: Mutex::new(Serving::Running(handle)),
            device,
            kernel,
            parked: false.into(),
        })
    }

    /// Takes over the live mount at `dir` through `device`, its `/dev/fuse`
    /// fd parked by a previous daemon. Nothing is answered until
    /// [`resume`](Self::resume): requests wait in the kernel while the
    /// layers are attached again in their old slots. Blocking.
    pub fn adopt(
        dir: &Path,
        device: OwnedFd,
        init: &KernelInit,
        opts: &MountOptions,
        max_inflight_reads: usize,
    ) -> io::Result<Self> {
        if init.inode_layout != INODE_LAYOUT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the parked connection numbers inodes by layout {}, this daemon by {INODE_LAYOUT}",
                    init.inode_layout
                ),
            ));
        }
        if !is_mounted_here(dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no rstargz FUSE mount at {}", dir.display()),
            ));
        }
        let (fs, table, kernel) = Self::new_fs(max_inflight_reads);
        let keep = device.try_clone()?;
        let prepared = adopt(dir, fs, device, init, opts)?;
        // The replayed handshake recorded the same offer again.
        *kernel.lock().unwrap_or_else(|p| p.into_inner()) = Some(init.clone());
        Ok(MuxMount {
            dir: dir.to_path_buf(),
            table,
            notifier: prepared.notifier(),
            serving: Mutex::new(Serving::Paused {
                prepared: Box::new(prepared),
                binds: Vec::new(),
            }),
            device: keep,
            kernel,
            parked: false.into(),
        })
    }

    /// Starts answering an adopted connection: the kernel first moves back
    /// the requests the previous daemon read but never answered, then the
    /// layers' bind mounts are made. No-op when already serving. Blocking.
    pub fn resume(&self) -> io::Result<()> {
        let mut serving = self.lock_serving();
        let Serving::Paused { .. } = &*serving else {
            return Ok(());
        };
        let Serving::Paused { prepared, binds } =
            std::mem::replace(&mut *serving, Serving::Stopped)
        else {
            unreachable!("checked above");
        };
        if let Err(e) = request_resend(self.device.as_fd()) {
            tracing::warn!(error = %e, "kernel refused FUSE_NOTIFY_RESEND; requests the old daemon had read stay unanswered");
        }
        *serving = Serving::Running(prepared.spawn()?);
        drop(serving);
        let n = binds.len();
        for (slot, target) in binds {
            if let Err(e) = self.bind(slot, &target) {
                tracing::warn!(slot, target = %target.display(), error = %e, "rebinding an adopted layer failed");
                self.detach(slot);
            }
        }
        tracing::info!(layers = n, dir = %self.dir.display(), "serving the adopted FUSE connection");
        Ok(())
    }

    /// The `/dev/fuse` fd and the kernel's `FUSE_INIT` offer, for the holder.
    pub fn handover_parts(&self) -> Option<(BorrowedFd<'_>, KernelInit)> {
        let init = self
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some((self.device.as_fd(), init))
    }

    /// Leave everything mounted when dropped: the connection is parked with
    /// the holder for the next daemon.
    pub fn park(&self) {
        self.parked.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn lock_serving(&self) -> std::sync::MutexGuard<'_, Serving> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner())
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
        if let Serving::Paused { binds, .. } = &mut *self.lock_serving() {
            binds.push((slot, target.to_path_buf()));
            return Ok(());
        }
        if let Err(e) = self.bind(slot, target) {
            self.detach(slot);
            return Err(e);
        }
        Ok(())
    }

    fn bind(&self, slot: u32, target: &Path) -> io::Result<()> {
        let _ = unmount(target);
        let src = self.dir.join(slot.to_string());
        nix::mount::mount(
            Some(&src),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            io::Error::other(format!(
                "bind mount of {} on {}: {e}",
                src.display(),
                target.display()
            ))
        })
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
        if let Serving::Paused { binds, .. } = &mut *self.lock_serving() {
            // Never bound: nothing to unmount, and no session to notify.
            binds.retain(|(s, _)| *s != slot);
            reap(&self.table, slot);
            return Unmounted::NotMounted;
        }
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
        let serving = std::mem::replace(&mut *self.lock_serving(), Serving::Stopped);
        if self.parked.load(std::sync::atomic::Ordering::SeqCst) {
            // The holder keeps the connection; the kernel keeps the mounts.
            if let Serving::Running(h) = serving {
                h.abandon();
            }
            return;
        }
        *self.lock_serving() = serving;
        let slots: Vec<u32> = read(&self.table)
            .iter()
            .filter(|(_, s)| s.target.is_some())
            .map(|(&n, _)| n)
            .collect();
        for slot in slots {
            self.detach(slot);
        }
        let serving = std::mem::replace(&mut *self.lock_serving(), Serving::Stopped);
        let result = match serving {
            Serving::Running(h) => h.unmount(),
            // Adopted but never served: unmount by path.
            Serving::Paused { .. } => unmount(&self.dir),
            Serving::Stopped => Ok(Unmounted::NotMounted),
        };
        if let Err(e) = result {
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
    fn a_connection_numbered_differently_is_not_adopted() {
        let d = tempfile::tempdir().unwrap();
        let device: OwnedFd = tempfile::tempfile().unwrap().into();
        let init = KernelInit {
            major: 7,
            minor: 45,
            flags: 0,
            max_readahead: 0,
            inode_layout: INODE_LAYOUT + 1,
        };
        let e = MuxMount::adopt(d.path(), device, &init, &MountOptions::default(), 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Same layout, but nothing mounted there: refused as well.
        let device: OwnedFd = tempfile::tempfile().unwrap().into();
        let init = KernelInit {
            inode_layout: INODE_LAYOUT,
            ..init
        };
        let e = MuxMount::adopt(d.path(), device, &init, &MountOptions::default(), 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn readdir_offsets_resume_after_the_last_slot() {
        assert_eq!(first_slot(0), Some(1));
        assert_eq!(first_slot(2), Some(1));
        // Slot 5 was returned with offset 8: continue at 6.
        assert_eq!(first_slot(8), Some(6));
    }
}
